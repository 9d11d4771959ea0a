"""Device meshes with `Auto` axes, and sharding constraints on activations by logical names.

A mesh has the three named axes of `rljax.parallel.rules.MESH_AXES`: `data` (batch split, all
parameters replicated), `fsdp` (batch split *and* parameters split, gathered per layer, ZeRO-3 /
FSDP style) and `tensor` (Megatron tensor parallelism inside a layer). `MeshConfig` fixes their
sizes; −1 fills the devices that are left. Which parameter or activation dimension goes on which
axis is not the mesh's business: the logical-axis rule sets of `rljax.parallel.rules` decide that.

All axes are `jax.sharding.AxisType.Auto`: shardings of intermediate values are propagated by the
compiler (GSPMD / Shardy), and `jax.lax.with_sharding_constraint` is a real constraint that
steers it, as in MaxText. (`jax.make_mesh` defaults to `Explicit` axes, under which sharding is
part of the type and a constraint must match it.)

Example:
  >>> mesh = make_mesh(MeshConfig(data=-1, fsdp=4, tensor=2))   # 8·k devices → (k, 4, 2)
  >>> with use_mesh(mesh, "fsdp_tp"):
  ...   model = Transformer(config, rngs=nnx.Rngs(0))             # parameters created sharded
  ...   step = jax.jit(train_step, in_shardings=..., out_shardings=...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rljax.parallel.rules import (
  MESH_AXES,
  Rules,
  current_rules,
  logical_to_mesh_spec,
  mesh_and_rules,
)

AUTO_AXES = (AxisType.Auto,) * len(MESH_AXES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the `data`, `fsdp` and `tensor` mesh axes.

  Each size is a positive int, or −1 (at most one axis) for "all remaining devices". The product
  must equal the number of devices the mesh is built on. Defaults: pure data parallelism over
  every device (`data=-1, fsdp=1, tensor=1`).

  Typical layouts on 8 devices: `MeshConfig()` → 8×1×1 (data parallel);
  `MeshConfig(data=1, fsdp=-1)` → 1×8×1 (FSDP);
  `MeshConfig(data=1, fsdp=-1, tensor=2)` → 1×4×2 (FSDP + tensor parallel).
  Keep `tensor` within a host (fast interconnect); `data` is the axis to span slow links (DCN).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self) -> None:
    sizes = self.sizes()
    for name, size in zip(MESH_AXES, sizes):
      if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size != -1 and size < 1
      ):
        raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}")
    if sum(size == -1 for size in sizes) > 1:
      unset = [n for n, s in zip(MESH_AXES, sizes) if s == -1]
      raise ValueError(f"at most one MeshConfig axis may be -1, got -1 for {unset}")

  def sizes(self) -> tuple[int, int, int]:
    """(data, fsdp, tensor) as configured (−1 kept)."""
    return (self.data, self.fsdp, self.tensor)

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """The concrete (data, fsdp, tensor) shape for `num_devices` devices (−1 resolved).

    Raises:
      ValueError: the sizes do not multiply to `num_devices` (or −1 cannot fill it evenly);
        the message names the axes, their sizes and the device count.
    """
    sizes = self.sizes()
    fixed = math.prod(s for s in sizes if s != -1)
    described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(
          f"MeshConfig({described}): the fixed axes multiply to {fixed}, which does not divide "
          f"the {num_devices} devices"
        )
      sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
    elif fixed != num_devices:
      raise ValueError(
        f"MeshConfig({described}) multiplies to {fixed} devices but there are {num_devices}"
      )
    return sizes  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes ("data", "fsdp", "tensor"), all of type `AxisType.Auto`.

  Built with `jax.make_mesh`, which orders the devices for the physical topology (TPU torus,
  GPU NVLink islands, hosts): on several hosts, consecutive devices of one process fill the
  innermost axes (`tensor`, then `fsdp`), so `data` is the one that crosses hosts when it is
  at least the number of processes.

  Args:
    config: axis sizes; default `MeshConfig()` (data parallel over every device).
    devices: the devices to use; default `jax.devices()` (every device of every process).

  Returns:
    The mesh. Use it with `use_mesh(mesh, rules)` or `rljax.parallel.named_shardings`.

  Raises:
    ValueError: the config does not fit the number of devices (see `MeshConfig.shape`).
  """
  config = MeshConfig() if config is None else config
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=AUTO_AXES, devices=devices)


def use_mesh(mesh: Mesh, rules: Rules | str):
  """Context: `jax.set_mesh(mesh)` plus the logical axis `rules` (a rule set or its name).

  Inside, models are constructed with sharded parameters and `constrain` is active. The same as
  `rljax.parallel.rules.mesh_and_rules`.
  """
  return mesh_and_rules(mesh, rules)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Any) -> PartitionSpec:
  """`spec` with every dimension that its mesh axes do not divide left unsplit (replicated)."""

  def size(axes: Any) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)

  return PartitionSpec(*(None if axes is not None and dim % size(axes) else axes
                         for axes, dim in zip(tuple(spec) + (None,) * len(shape), shape)))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains the sharding of activation `x` by its logical axis names, under the current rules.

  Maps `logical_axes` (e.g. `("batch", "length", "act_embed")`) through the installed rules
  (`use_mesh` / `logical_axis_rules`) to a `PartitionSpec` on the current mesh and applies
  `jax.lax.with_sharding_constraint` (on `Auto` axes; on an `Explicit` mesh the value is
  `jax.sharding.reshard`-ed instead). With no mesh set or no rules installed, `x` is returned
  unchanged, so model code can call it unconditionally. Mesh axes the rules name but the mesh
  lacks are dropped, and a dimension its mesh axes do not divide (a batch of 3 rows on 2 data
  shards) is left unsplit rather than failing.

  Args:
    x: any array (traced under `jax.jit`, or concrete).
    logical_axes: one logical name (or None, replicated) per dimension of `x`.

  Returns:
    `x`, with its sharding constrained.

  Raises:
    ValueError: `len(logical_axes) != x.ndim` (the message gives both).

  Example:
    >>> h = constrain(h, ("batch", "length", "act_embed"))
  """
  logical_axes = tuple(logical_axes)
  if len(logical_axes) != np.ndim(x):
    raise ValueError(
      f"logical_axes {logical_axes} has {len(logical_axes)} names but x has shape "
      f"{np.shape(x)} ({np.ndim(x)} dimensions)"
    )
  rules = current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not rules:
    return x
  spec = _divisible_spec(logical_to_mesh_spec(logical_axes, rules, mesh), np.shape(x), mesh)
  sharding = NamedSharding(mesh, spec)
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return jax.lax.with_sharding_constraint(x, sharding)
  return jax.sharding.reshard(x, sharding)
