"""Device meshes with `Auto` axes, and sharding constraints on activations by logical names.

A mesh has the three named axes of `rljax.parallel.rules.MESH_AXES`: `data` (batch split, all
parameters replicated), `fsdp` (batch split *and* parameters split, gathered per layer, ZeRO-3 /
FSDP style) and `tensor` (Megatron tensor parallelism inside a layer); with context parallelism
a fourth, `context` (activations split along T, `rljax.parallel.context`). `MeshConfig` fixes
their sizes; −1 fills the devices that are left. Which parameter or activation dimension goes on
which axis is not the mesh's business: the logical-axis rule sets of `rljax.parallel.rules`
decide that.

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
  CONTEXT,
  DATA,
  FSDP,
  TENSOR,
  Rules,
  current_rules,
  logical_to_mesh_spec,
  mesh_and_rules,
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the `data`, `fsdp`, `tensor` and `context` mesh axes.

  Each size is a positive int, or −1 (at most one axis) for "all remaining devices". The product
  must equal the number of devices the mesh is built on. Defaults: pure data parallelism over
  every device (`data=-1, fsdp=1, tensor=1, context=1`).

  Typical layouts on 8 devices: `MeshConfig()` → 8×1×1 (data parallel);
  `MeshConfig(data=1, fsdp=-1)` → 1×8×1 (FSDP);
  `MeshConfig(data=1, fsdp=-1, tensor=2)` → 1×4×2 (FSDP + tensor parallel);
  `MeshConfig(data=2, context=4)` → 2×1×4×1 (context parallel: activations split along T,
  `rljax.parallel.context`). Keep `tensor` and `context` within a host (fast interconnect: a
  layer's keys and values are all-gathered over `context`); `data` is the axis to span slow
  links (DCN). The `context` axis is in the mesh only when its size exceeds 1 (the axes are
  then data, fsdp, context, tensor); otherwise the mesh is the three-axis one.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  context: int = 1

  def __post_init__(self) -> None:
    named = self._named()
    for name, size in named:
      if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size != -1 and size < 1
      ):
        raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}")
    if sum(size == -1 for _, size in named) > 1:
      unset = [n for n, s in named if s == -1]
      raise ValueError(f"at most one MeshConfig axis may be -1, got -1 for {unset}")

  def _named(self) -> tuple[tuple[str, int], ...]:
    """(axis, configured size) in mesh order: data, fsdp, context, tensor."""
    return ((DATA, self.data), (FSDP, self.fsdp), (CONTEXT, self.context), (TENSOR, self.tensor))

  def _resolved(self, num_devices: int) -> tuple[tuple[str, int], ...]:
    """(axis, size) of the mesh for `num_devices` devices: −1 resolved, a size-1 `context`
    left out."""
    named = self._named()
    fixed = math.prod(s for _, s in named if s != -1)
    described = ", ".join(f"{n}={s}" for n, s in named if n != CONTEXT or s != 1)
    if any(s == -1 for _, s in named):
      if num_devices % fixed:
        raise ValueError(
          f"MeshConfig({described}): the fixed axes multiply to {fixed}, which does not divide "
          f"the {num_devices} devices"
        )
      named = tuple((n, num_devices // fixed if s == -1 else s) for n, s in named)
    elif fixed != num_devices:
      raise ValueError(
        f"MeshConfig({described}) multiplies to {fixed} devices but there are {num_devices}"
      )
    return tuple((n, s) for n, s in named if n != CONTEXT or s > 1)

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """The concrete mesh shape for `num_devices` devices (−1 resolved): (data, fsdp, tensor),
    or (data, fsdp, context, tensor) when `context` > 1.

    Raises:
      ValueError: the sizes do not multiply to `num_devices` (or −1 cannot fill it evenly);
        the message names the axes, their sizes and the device count.
    """
    return tuple(s for _, s in self._resolved(num_devices))

  def axis_names(self, num_devices: int) -> tuple[str, ...]:
    """The mesh's axis names for `num_devices` devices (matching `shape`)."""
    return tuple(n for n, _ in self._resolved(num_devices))


def make_mesh(config: MeshConfig | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes ("data", "fsdp", "tensor") — ("data", "fsdp", "context", "tensor") with
  context parallelism — all of type `AxisType.Auto`.

  Built with `jax.make_mesh`, which orders the devices for the physical topology (TPU torus,
  GPU NVLink islands, hosts): on several hosts, consecutive devices of one process fill the
  innermost axes (`tensor`, then `context`, then `fsdp`), so `data` is the one that crosses hosts
  when it is at least the number of processes.

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
  names = config.axis_names(len(devices))
  return jax.make_mesh(config.shape(len(devices)), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


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

  Maps `logical_axes` (e.g. `("batch", "sequence", "act_embed")`) through the installed rules
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
    >>> h = constrain(h, ("batch", "sequence", "act_embed"))
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
