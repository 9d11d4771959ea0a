"""The train state: one pytree holding everything a step reads and writes.

`TrainState` is a `flax.struct.PyTreeNode` (a plain pytree: it passes through `jax.jit`,
`jax.device_put`, orbax) with

  step           int32 scalar, steps attempted (a skipped non-finite step still counts)
  params         trainable `nnx.State` (fp32 master weights when `param_dtype=jnp.float32`)
  frozen         the rest of the model's state (non-trainable variables; may be empty)
  opt_state      the optax state of `params` only (frozen variables get none)
  rng            a typed PRNG key (`jax.random.key`); steps derive per-step keys by `fold_in`
  extras         dict of algorithm sub-states (critic params / optimizer state, KL-controller
                 state, data position, ...); default {}
  skipped_steps  int32 count of steps skipped for a non-finite loss or gradient

With a mesh and logical-axis rules, `create_train_state` builds the state directly sharded: one
`jax.jit` with `out_shardings` creates (or places) the parameters and the optimizer state on
their devices, so no host ever holds an unsharded copy of the optimizer state (nor of the
parameters, when the model is given as a constructor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rljax.parallel.rules import Rules, logical_axes_of, mesh_and_rules, value_shardings


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimizer state, counters, RNG and algorithm sub-states (see module doc)."""

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array
  extras: dict[str, Any] = flax.struct.field(default_factory=dict)
  skipped_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))

  def model(self, graphdef: nnx.GraphDef) -> nnx.Module:
    """The NNX model of these parameters (`nnx.merge(graphdef, params, frozen)`)."""
    return nnx.merge(graphdef, self.params, self.frozen)


def split_model(model: nnx.Module, trainable: Any = nnx.Param) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, trainable state, frozen state) of an NNX model; `trainable` is an nnx filter
  (a Variable type, a path predicate `(path, variable) -> bool`, `nnx.PathContains(...)`, ...)."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  return graphdef, params, frozen


def trainable_paths(predicate: Callable[[str], bool]) -> Callable[[tuple, Any], bool]:
  """An nnx filter selecting `nnx.Param`s whose "/"-joined path satisfies `predicate`.

  Example:
    >>> head_only = trainable_paths(lambda p: p.startswith("lm_head"))
    >>> graphdef, state = create_train_state(model, optimizer, rng=key, trainable=head_only)
  """

  def keep(path: tuple, value: Any) -> bool:
    return isinstance(value, nnx.Param) and predicate("/".join(str(p) for p in path))

  return keep


def cast_floating(tree: Any, dtype: Any | None) -> Any:
  """Casts the floating-point leaves of `tree` to `dtype` (None: unchanged)."""
  if dtype is None:
    return tree

  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


# ----------------------------------------------------------------------------------------------
# Shardings.
# ----------------------------------------------------------------------------------------------


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def variable_shardings(tree: Any, mesh: Mesh, rules: Rules | str) -> Any:
  """A `NamedSharding` for every array leaf of `tree`, from the logical axes of the
  `nnx.Variable` that holds it.

  Leaves not inside a Variable, Variables without logical axes, and Variables whose logical
  axes do not match the leaf's rank (e.g. factored optimizer moments) are replicated. Because
  optax builds its moments with `jax.tree.map` over the parameters, Adam's `mu` / `nu` keep the
  parameters' Variables (and their logical axes) and are sharded exactly like them. A quantised
  weight (QLoRA's `QuantizedParam`) gets one sharding per leaf, codes and scales by their own
  axes (`rljax.parallel.rules.value_shardings`).
  """

  def one(v: Any) -> Any:
    if isinstance(v, nnx.Variable):
      axes = logical_axes_of(v)
      value = v.get_value() if hasattr(v, "get_value") else v.value
      if axes is not None and len(axes) == len(getattr(value, "shape", ())):
        return v.replace(value_shardings(value, axes, mesh, rules))
      return jax.tree.map(lambda _: _replicated(mesh), v)
    return _replicated(mesh)

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(
  graphdef: nnx.GraphDef | None, state: TrainState, mesh: Mesh, rules: Rules | str
) -> TrainState:
  """The `NamedSharding` of every leaf of a `TrainState` (same pytree structure).

  Parameters, frozen variables and the optimizer moments follow the parameters' logical axes
  under `rules`; Variables inside `extras` (a critic's parameters and its optimizer state) too;
  the step, counters, RNG key and every other leaf are replicated. `state` may be abstract
  (`jax.ShapeDtypeStruct` leaves, from `jax.eval_shape`). `graphdef` is accepted for symmetry
  with the other helpers and is not needed.
  """
  del graphdef
  replicated = _replicated(mesh)
  return TrainState(
    step=replicated,
    params=variable_shardings(state.params, mesh, rules),
    frozen=variable_shardings(state.frozen, mesh, rules),
    opt_state=variable_shardings(state.opt_state, mesh, rules),
    rng=replicated,
    extras=variable_shardings(state.extras, mesh, rules),
    skipped_steps=replicated,
  )


# ----------------------------------------------------------------------------------------------
# Creation.
# ----------------------------------------------------------------------------------------------


def _initial_state(
  params: Any,
  frozen: Any,
  optimizer: optax.GradientTransformation,
  rng: jax.Array,
  extras: dict[str, Any] | None,
  param_dtype: Any | None,
) -> TrainState:
  params = cast_floating(params, param_dtype)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    frozen=frozen,
    opt_state=optimizer.init(params),
    rng=rng,
    extras={} if extras is None else extras,
    skipped_steps=jnp.zeros((), jnp.int32),
  )


def _as_key(rng: Any) -> jax.Array:
  """A typed PRNG key from an int seed, a raw uint32 key or a typed key."""
  if isinstance(rng, int):
    return jax.random.key(rng)
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def create_train_state(
  model: nnx.Module | Callable[[], nnx.Module],
  optimizer: optax.GradientTransformation,
  *,
  rng: Any,
  mesh: Mesh | None = None,
  rules: Rules | str | None = None,
  trainable: Any = nnx.Param,
  extras: dict[str, Any] | None = None,
  param_dtype: Any | None = None,
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits an NNX model into (graphdef, `TrainState`), sharded when `mesh` and `rules` are given.

  Args:
    model: an NNX module, or a zero-argument constructor of one (e.g.
      `lambda: Transformer(config, rngs=nnx.Rngs(0))`). With a constructor and a mesh the
      parameters are initialised inside the sharded `jax.jit`, so they never exist unsharded.
    optimizer: the optax transformation (see `rljax.train.optim.make_optimizer`); it is
      initialised on the trainable parameters only.
    rng: the state's PRNG key (int seed, raw or typed key).
    mesh, rules: device mesh and logical-axis rules (a rule set or its name: "data", "fsdp",
      "fsdp_tp"); both or neither.
    trainable: nnx filter of the optimised variables (default `nnx.Param`); the others go to
      `frozen` (no optimizer state, never updated). See `trainable_paths`.
    extras: initial algorithm sub-states (default {}).
    param_dtype: cast the floating trainable parameters to this dtype (e.g. jnp.float32 master
      weights for a model built in bf16); None keeps the model's dtypes.

  Returns:
    (graphdef, state); `nnx.merge(graphdef, state.params, state.frozen)` rebuilds the model.

  Example:
    >>> mesh = jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    >>> graphdef, state = create_train_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)),
    ...                                      make_optimizer(OptimizerConfig(1e-4)), rng=0,
    ...                                      mesh=mesh, rules="fsdp_tp")
  """
  if (mesh is None) != (rules is None):
    raise ValueError("`mesh` and `rules` must be given together (or neither).")
  key = _as_key(rng)
  graphdef, build, args = _state_builder(model, optimizer, key, trainable, extras, param_dtype)
  if mesh is None:
    return graphdef, jax.jit(build)(*args)
  with mesh_and_rules(mesh, rules):
    abstract = jax.eval_shape(build, *args)
    shardings = state_shardings(graphdef, abstract, mesh, rules)
    state = jax.jit(build, out_shardings=shardings)(*args)
  return graphdef, state


def abstract_train_state(
  model: nnx.Module | Callable[[], nnx.Module],
  optimizer: optax.GradientTransformation,
  *,
  rng: Any = 0,
  mesh: Mesh | None = None,
  rules: Rules | str | None = None,
  trainable: Any = nnx.Param,
  extras: dict[str, Any] | None = None,
  param_dtype: Any | None = None,
) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state of `jax.ShapeDtypeStruct`s) that `create_train_state` would build, with the
  target `.sharding` of every leaf when `mesh` and `rules` are given — nothing is allocated.

  This is the `target` of `Checkpointer.restore` when resuming onto a (possibly different) mesh.

  Example:
    >>> graphdef, target = abstract_train_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)),
    ...                                         optimizer, mesh=mesh, rules="fsdp")
    >>> state, data_state, meta = checkpointer.restore(target)
  """
  if (mesh is None) != (rules is None):
    raise ValueError("`mesh` and `rules` must be given together (or neither).")
  graphdef, build, args = _state_builder(
    model, optimizer, _as_key(rng), trainable, extras, param_dtype
  )
  if mesh is None:
    return graphdef, jax.eval_shape(build, *args)
  with mesh_and_rules(mesh, rules):
    abstract = jax.eval_shape(build, *args)
    shardings = state_shardings(graphdef, abstract, mesh, rules)
  return graphdef, jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings
  )


def _state_builder(model, optimizer, key, trainable, extras, param_dtype):
  """(graphdef, build, args) with `build(*args)` the initial state (traceable, unsharded)."""
  is_constructor = not isinstance(model, nnx.Module)
  if is_constructor and not callable(model):
    raise ValueError(f"`model` must be an nnx.Module or a constructor; got {type(model)}.")

  if is_constructor:
    graphdef, _, _ = split_model(nnx.eval_shape(model), trainable)

    def build(key, extras):
      _, params, frozen = split_model(model(), trainable)
      return _initial_state(params, frozen, optimizer, key, extras, param_dtype)

    return graphdef, build, (key, extras)
  graphdef, params, frozen = split_model(model, trainable)

  def build(params, frozen, key, extras):
    return _initial_state(params, frozen, optimizer, key, extras, param_dtype)

  return graphdef, build, (params, frozen, key, extras)
