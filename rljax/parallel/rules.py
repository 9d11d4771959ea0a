"""Logical axis names and the rules that map them onto mesh axes.

Models name every parameter dimension with a *logical* axis (``embed``, ``vocab``, ``heads``, …).
A *rule set* maps each logical name to a mesh axis (``data``, ``fsdp``, ``tensor``,
``context``), a tuple of mesh axes, or ``None`` (replicated). Changing the rule set changes the
parallelism strategy without touching model code (docs/architecture.md: scale is placement).

Rule sets are tuples of ``(logical_name, mesh_axes)`` pairs, the format of
``flax.nnx.logical_axis_rules`` / ``flax.linen.logical_axis_rules``, so they can be used directly
as Flax's rule context: a model constructed under ``jax.set_mesh(mesh)`` and
``logical_axis_rules(rules)`` creates its parameters already sharded.

Example:
  >>> mesh = jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  >>> with jax.set_mesh(mesh), logical_axis_rules(FSDP_TP_RULES):
  ...   model = Transformer(config, rngs=nnx.Rngs(0))     # parameters created sharded
  >>> shardings = named_shardings(nnx.state(model), mesh, FSDP_TP_RULES)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Union

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axes.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)  # the axes of every mesh `rljax.parallel.make_mesh` builds
# Context parallelism (`rljax.parallel.context`): activations split along T. `make_mesh` adds it
# (between fsdp and tensor) only when `MeshConfig.context` > 1; absent, the rules' mapping of
# `sequence` onto it is dropped, so a mesh without context parallelism is unchanged.
CONTEXT = "context"

# Logical axes of parameters.
EMBED = "embed"  # model width D
VOCAB = "vocab"  # vocabulary V
HEADS = "heads"  # query heads H
KV_HEADS = "kv_heads"  # key/value heads (grouped-query attention)
HEAD_DIM = "head_dim"  # per-head width
MLP = "mlp"  # MLP hidden width F
LAYERS = "layers"  # leading axis of stacked (scanned) layer parameters; never sharded
NORM = "norm"  # reserved for scalar-per-feature parameters that should stay replicated
LORA_RANK = "lora_rank"  # rank r of LoRA adapters (`rljax.models.lora`): in no rule set, so replicated

# Logical axes of activations.
BATCH = "batch"
SEQUENCE = "sequence"  # the token axis T of activations: split over `context` (context parallelism)
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

PARAM_AXES = (EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, NORM)
ACTIVATION_AXES = (BATCH, SEQUENCE, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB)

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

_REPLICATED_PARAMS: Rules = tuple(
  (name, None) for name in (EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, NORM)
)
_BATCH_ONLY_ACTIVATIONS: Rules = (
  (BATCH, (DATA, FSDP)),
  (SEQUENCE, CONTEXT),
  (ACT_EMBED, None),
  (ACT_HEADS, None),
  (ACT_KV_HEADS, None),
  (ACT_MLP, None),
  (ACT_VOCAB, None),
)

# Every rule set splits activations along T over `context` (a no-op on a mesh without that axis).
# Pure data parallelism: every parameter replicated, the batch split over data (and fsdp) axes.
DATA_PARALLEL_RULES: Rules = _REPLICATED_PARAMS + _BATCH_ONLY_ACTIVATIONS

# FSDP (ZeRO-3 style): the model width of every matrix split over `fsdp`; batch over data×fsdp.
FSDP_RULES: Rules = (
  (EMBED, FSDP),
  (VOCAB, None),
  (HEADS, None),
  (KV_HEADS, None),
  (HEAD_DIM, None),
  (MLP, None),
  (LAYERS, None),
  (NORM, None),
) + _BATCH_ONLY_ACTIVATIONS

# FSDP + tensor parallelism (Megatron layout): heads, MLP width and vocabulary over `tensor`.
FSDP_TP_RULES: Rules = (
  (EMBED, FSDP),
  (VOCAB, TENSOR),
  (HEADS, TENSOR),
  (KV_HEADS, TENSOR),
  (HEAD_DIM, None),
  (MLP, TENSOR),
  (LAYERS, None),
  (NORM, None),
  (BATCH, (DATA, FSDP)),
  (SEQUENCE, CONTEXT),
  (ACT_EMBED, None),
  (ACT_HEADS, TENSOR),
  (ACT_KV_HEADS, TENSOR),
  (ACT_MLP, TENSOR),
  (ACT_VOCAB, TENSOR),
)

RULE_SETS: dict[str, Rules] = {
  "data": DATA_PARALLEL_RULES,
  "fsdp": FSDP_RULES,
  "fsdp_tp": FSDP_TP_RULES,
}


def get_rules(name: str) -> Rules:
  """Returns a named default rule set: "data", "fsdp" or "fsdp_tp"."""
  if name not in RULE_SETS:
    raise ValueError(f"rules must be one of {sorted(RULE_SETS)}, got {name!r}")
  return RULE_SETS[name]


def inference_rules(rules: Rules | str) -> Rules:
  """`rules` with the `fsdp` mesh axis removed from every PARAMETER mapping (activations keep
  theirs): the layout to sample in.

  Under FSDP every decode step of a `lax.while_loop` would all-gather each weight matrix again;
  re-sharding the parameters to this layout once per rollout (verl's "hybrid engine" resharding)
  gathers them once, keeps tensor parallelism, and leaves the batch split over data × fsdp.
  """
  if isinstance(rules, str):
    rules = get_rules(rules)
  params = set(PARAM_AXES)

  def without_fsdp(name: str, axes: MeshAxes) -> MeshAxes:
    if name not in params:
      return axes
    kept = tuple(a for a in _as_tuple(axes) if a != FSDP)
    return None if not kept else kept[0] if len(kept) == 1 else kept

  return tuple((name, without_fsdp(name, axes)) for name, axes in rules)


def logical_axis_rules(rules: Rules | str) -> contextlib.AbstractContextManager:
  """Context manager installing `rules` as Flax's logical axis rules (accepts a rule-set name)."""
  if isinstance(rules, str):
    rules = get_rules(rules)
  return nnx.logical_axis_rules(rules)


def current_rules() -> Rules:
  """The logical axis rules installed by the innermost `logical_axis_rules` context (or ())."""
  return tuple(core_spmd.get_logical_axis_rules())


def place_by_logical_axes(value, axes: Sequence[str | None]):
  """Shards `value` by its logical `axes` when a mesh is set and logical axis rules are installed.

  With no mesh (or no rules) the value is returned as is. Concrete values are `device_put`
  (no compilation per parameter); traced ones (`nnx.eval_shape`, `jax.jit` init) get a
  sharding constraint. Mesh axes named by the rules but absent from the mesh are dropped.
  """
  rules = current_rules()
  abstract_mesh = jax.sharding.get_abstract_mesh()
  if abstract_mesh.empty or not rules:
    return value
  spec = logical_to_mesh_spec(tuple(axes), rules, abstract_mesh)
  try:
    concrete_mesh = jax.sharding.get_mesh()  # raises under a JAX transformation
  except ValueError:
    concrete_mesh = None
  if concrete_mesh is None or concrete_mesh.empty or isinstance(value, jax.core.Tracer):
    return jax.lax.with_sharding_constraint(value, NamedSharding(abstract_mesh, spec))
  return jax.device_put(value, NamedSharding(concrete_mesh, spec))


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def logical_to_mesh_spec(
  logical_axes: Sequence[str | None] | None, rules: Rules | str, mesh: Mesh | None = None
) -> PartitionSpec:
  """Maps a tuple of logical axis names to a `PartitionSpec` of mesh axes.

  Unknown logical names and `None` are replicated. When `mesh` is given, mesh axes absent from it
  are dropped (so the default rules work on a mesh with only some of `data`/`fsdp`/`tensor`/
  `context`).
  A mesh axis is used at most once per spec: a later dimension asking for an axis already taken
  is replicated along it instead (JAX rejects specs that repeat a mesh axis).
  """
  if isinstance(rules, str):
    rules = get_rules(rules)
  if logical_axes is None:
    return PartitionSpec()
  table = dict(rules)
  present = None if mesh is None else set(mesh.axis_names)
  used: set[str] = set()
  out: list[MeshAxes] = []
  for name in logical_axes:
    axes = _as_tuple(table.get(name)) if name is not None else ()
    kept = tuple(a for a in axes if (present is None or a in present) and a not in used)
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*out)


def value_shardings(value: Any, axes: Sequence[str | None] | None, mesh: Mesh,
                    rules: Rules | str) -> Any:
  """The `NamedSharding` of a variable's value with logical `axes`; for a quantised weight (a
  value with `map_leaf_axes`: `rljax.models.quant.QuantizedArray`) the value's pytree with one
  per leaf, codes and scales by their own axes."""
  def sharding(names):
    return NamedSharding(mesh, logical_to_mesh_spec(names, rules, mesh))

  if axes is not None and hasattr(value, "map_leaf_axes"):
    return value.map_leaf_axes(tuple(axes), sharding)
  return sharding(axes)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a variable was created with (its `out_sharding` metadata), or None."""
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding")
  return tuple(names) if names else None


def logical_partition_specs(tree: Any) -> Any:
  """Tree of logical axis-name tuples (None when unannotated) mirroring a state / module tree."""
  return jax.tree.map(
    lambda v: logical_axes_of(v) if isinstance(v, nnx.Variable) else None,
    tree,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def named_shardings(tree: Any, mesh: Mesh, rules: Rules | str) -> Any:
  """`NamedSharding`s for every variable of an NNX state (or module) under `rules` on `mesh`.

  Args:
    tree: an `nnx.State` (e.g. `nnx.state(model)`) or any pytree of `nnx.Variable`s whose
      `out_sharding` metadata holds logical axis names.
    mesh: the device mesh.
    rules: a rule set (tuple of pairs) or the name of a default one ("data", "fsdp", "fsdp_tp").

  Returns:
    The same tree structure with a `NamedSharding` in place of each variable's value
    (unannotated variables are replicated). Use as `out_shardings` / for `jax.device_put`.
  """

  def one(v: Any) -> Any:
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    return v.replace(value_shardings(v.get_value(), logical_axes_of(v), mesh, rules))

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: Any, mesh: Mesh, rules: Rules | str) -> Any:
  """`jax.device_put` of an NNX state onto the shardings given by `named_shardings`."""
  shardings = named_shardings(state, mesh, rules)
  return jax.device_put(state, shardings)


@contextlib.contextmanager
def mesh_and_rules(mesh: Mesh, rules: Rules | str) -> Iterator[None]:
  """`jax.set_mesh(mesh)` and `logical_axis_rules(rules)` together (construct models inside)."""
  with jax.set_mesh(mesh), logical_axis_rules(rules):
    yield
