"""A jitted, sharded training step: exact gradient accumulation, non-finite skipping, metrics.

`make_train_step(loss_fn, graphdef, optimizer, ...)` returns `step(state, batch) -> (state,
metrics)`, one `jax.jit` with `in_shardings` / `out_shardings` / `donate_argnums=(0,)` when the
state's shardings are given (`rljax.train.state.state_shardings`). The same step runs on one
device or a mesh: only the shardings change (docs/architecture.md: scale is placement).

The loss contract. `loss_fn(model, batch, *, normalizer) -> (loss, metrics)` with `model =
nnx.merge(graphdef, params, frozen)`. When `count_fn` is given, the step computes
`normalizer = count_fn(full_batch)` (e.g. the number of loss tokens, or of preference pairs)
ONCE over the whole batch and passes it to every microbatch; the loss_fn must then return a
*sum* over its rows divided by `normalizer` (`aggregate(..., normalizer=normalizer)` does exactly
this for the token-level modes). The step SUMS the microbatch losses and gradients, which is then
exactly the full-batch loss and gradient (up to float summation order). Averaging per-microbatch
means instead (`optax.MultiSteps`) weights a token by 1 / (tokens of its microbatch), which is
biased when microbatches hold different numbers of tokens. Without `count_fn` the loss_fn gets
`normalizer=None` and the step AVERAGES the microbatch losses and gradients (exact only for
equal-weight microbatches).

Microbatch i holds the rows i, i + k, i + 2k, ... of the batch (k = `num_microbatches`): a strided
split keeps every microbatch spread over the data-parallel devices exactly like the batch, so
splitting moves no data between devices. A packed batch (`rljax.train.packed`) splits its row
arrays ([R, T], rank >= 2) the same way and gives every microbatch its per-sequence arrays ([N],
rank 1) whole: each microbatch reads the sequences present in its rows by segment id.

Non-finite steps. If the loss or any gradient entry is NaN or ±inf, the update is not applied:
params and opt_state are returned unchanged (so the learning-rate schedule does not advance
either), `skipped_steps` is incremented and the metric `skipped` is 1. `state.step` counts steps
*attempted* and advances in both cases, so it stays in lockstep with the data position and the
logs.

Randomness. The model of a training step runs in training mode (`model.train()`: nnx's
`deterministic=False`) with its `dropout` RNG stream reseeded from `fold_in(state.rng,
state.step)` and the microbatch index (`nnx.reseed`), so dropout (LoRA's, `rljax.models.lora`)
draws fresh masks every step and microbatch, reproducibly; a model without dropout is
unaffected. Anywhere else (evaluation, log-prob passes, sampling) models are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rljax.parallel.rules import DATA, FSDP
from rljax.train.packed import is_packed
from rljax.train.optim import current_learning_rate
from rljax.train.state import TrainState, cast_floating, state_shardings

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
GradFn = Callable[[Any, Any, Any], tuple[jax.Array, Any, dict[str, jax.Array]]]


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
  """[B, ...] leaves → [k, B / k, ...]; microbatch i holds rows i, i + k, i + 2k, ...

  A packed batch's rank-1 leaves (per-sequence arrays, [N]) are repeated instead: [k, N].

  Raises:
    ValueError: a leaf's leading dimension is not divisible by `num_microbatches`.
  """
  packed_batch = is_packed(batch)

  def split(x):
    if packed_batch and jnp.ndim(x) == 1:
      return jnp.broadcast_to(jnp.asarray(x), (num_microbatches, *jnp.shape(x)))
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(
        f"batch size {b} (leaf shape {x.shape}) is not divisible by "
        f"`num_microbatches` ({num_microbatches})."
      )
    x = x.reshape(b // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def _constrain_microbatches(batch: Any, batch_sharding: Any) -> Any:
  """Keeps the per-microbatch rows sharded like the batch's rows ([k, B/k, ...])."""
  if not isinstance(batch_sharding, NamedSharding):
    return batch
  spec = PartitionSpec(None, *batch_sharding.spec)
  sharding = NamedSharding(batch_sharding.mesh, spec)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), batch)


def make_grad_fn(
  loss_fn: LossFn,
  graphdef: nnx.GraphDef,
  *,
  count_fn: Callable[[Any], jax.Array] | None = None,
  num_microbatches: int = 1,
  compute_dtype: Any | None = None,
  batch_sharding: Any | None = None,
) -> GradFn:
  """`grad_fn(params, frozen, batch, key=None) -> (loss, grads, metrics)`, the gradient part of
  a step; with `key` the model runs in training mode, its dropout stream reseeded from it
  (module doc).

  `loss` and `grads` are the full-batch loss and its gradient with respect to `params`
  (accumulated over `num_microbatches` microbatches with `lax.scan`, see the module doc);
  `metrics` are the loss_fn's metrics averaged over microbatches plus `normalizer` when
  `count_fn` is given. `count_fn` may return a dict of scalars when the loss has several terms
  with their own global denominators (e.g. PPO-ptx: completion tokens and pretraining tokens);
  the loss_fn then gets that dict, and the metrics hold `{name}_normalizer`. With `compute_dtype` (e.g. jnp.bfloat16) the floating params and frozen
  variables are cast to it for the forward and backward passes; the cast is inside the
  differentiated function, so `grads` come back in the params' (master) dtype. (Activations
  follow the model's own `config.dtype`.) `frozen` gets no gradient.
  """
  if num_microbatches < 1:
    raise ValueError(f"`num_microbatches` must be >= 1; got {num_microbatches}.")

  def microbatch_loss(params, frozen, batch, normalizer, key):
    model = nnx.merge(  # with a key, Variables of this trace level: reseeding mutates them
      graphdef, cast_floating(params, compute_dtype), cast_floating(frozen, compute_dtype),
      copy=key is not None)
    if key is not None:
      model.train()
      nnx.reseed(model, dropout=key)
    loss, metrics = loss_fn(model, batch, normalizer=normalizer)
    return jnp.asarray(loss, jnp.float32), metrics

  value_and_grad = jax.value_and_grad(microbatch_loss, has_aux=True)

  def grad_fn(params, frozen, batch, key=None):
    frozen = jax.lax.stop_gradient(frozen)
    normalizer = None if count_fn is None else jax.tree.map(
      lambda n: jnp.asarray(n, jnp.float32), count_fn(batch))
    if num_microbatches == 1:
      (loss, metrics), grads = value_and_grad(params, frozen, batch, normalizer, key)
    else:
      micro = _constrain_microbatches(split_microbatches(batch, num_microbatches), batch_sharding)

      def body(carry, xs):
        loss_sum, grad_sum = carry
        mb, i = xs
        mb_key = None if key is None else jax.random.fold_in(key, i)
        (loss, metrics), grads = value_and_grad(params, frozen, mb, normalizer, mb_key)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, grad_sum), metrics

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss, grads), stacked = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                            (micro, jnp.arange(num_microbatches)))
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), stacked)
      if count_fn is None:
        loss = loss / num_microbatches
        grads = jax.tree.map(lambda g: g / num_microbatches, grads)
    metrics = dict(metrics)
    if isinstance(normalizer, dict):
      metrics.update({f"{name}_normalizer": n for name, n in normalizer.items()})
    elif normalizer is not None:
      metrics["normalizer"] = normalizer
    return loss, grads, metrics

  return grad_fn


def apply_gradients(
  state: TrainState, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of `state.params`, skipped when `loss` or `grads` is non-finite.

  Returns the new state and {"grad_norm" (before clipping), "skipped" (0/1 int32),
  "learning_rate" (of this update, if the optimizer records it)}.

  The update runs inside `lax.cond(finite, ...)`, not as `where(finite, new, old)` over every
  leaf: a select needs the old and the new optimizer moments at once, so XLA copies the donated
  moments before the update (at full fine-tuning of a 135M model, 336 MiB more temporaries per
  GRPO update; `benchmarks/lora.py`), while a skipped branch just passes them through.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state, grads):
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state

  def skip(params, opt_state, grads):
    return params, opt_state

  params, opt_state = jax.lax.cond(finite, update, skip, state.params, state.opt_state, grads)
  skipped = jnp.logical_not(finite).astype(jnp.int32)
  metrics = {"grad_norm": grad_norm, "skipped": skipped}
  # The learning rate this update uses (also when skipped): read from an update whose other
  # outputs are unused, so XLA keeps only the schedule's scalar of it.
  learning_rate = current_learning_rate(optimizer.update(grads, state.opt_state, state.params)[1])
  if learning_rate is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            skipped_steps=state.skipped_steps + skipped)
  return new_state, metrics


def default_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over the `data` and `fsdp` mesh axes present in `mesh`."""
  axes = tuple(a for a in (DATA, FSDP) if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def mesh_of(shardings: Any) -> jax.sharding.Mesh:
  """The mesh of the first `NamedSharding` in a pytree of shardings."""
  for leaf in jax.tree.leaves(shardings):
    if isinstance(leaf, NamedSharding):
      return leaf.mesh
  raise ValueError("`shardings` holds no NamedSharding to take the mesh from.")


def make_train_step(
  loss_fn: LossFn,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  *,
  count_fn: Callable[[Any], jax.Array] | None = None,
  shardings: TrainState | None = None,
  batch_sharding: Any | None = None,
  num_microbatches: int = 1,
  compute_dtype: Any | None = None,
  donate: bool = True,
  compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """Compiles `step(state, batch) -> (state, metrics)`.

  Args:
    loss_fn: `loss_fn(model, batch, *, normalizer) -> (loss, metrics)` (see the module doc),
      e.g. `rljax.train.objectives.sft_loss`.
    graphdef: the model's graphdef (from `create_train_state`).
    optimizer: the optax transformation the state was created with.
    count_fn: `count_fn(batch) -> scalar` (or a dict of scalars, see `make_grad_fn`), the
      global normalizer (e.g. `sft_token_count`, `pair_count`); None passes `normalizer=None`
      and averages microbatches.
    shardings: the state's shardings (`state_shardings(...)`); None jits without shardings.
    batch_sharding: sharding (or pytree of shardings) of the batch; default: the leading axis
      over ("data", "fsdp") of the shardings' mesh. Every batch leaf has the batch axis first.
    num_microbatches: split the batch into this many microbatches (gradient accumulation).
    compute_dtype: cast params to this dtype for the forward/backward (bf16 compute with fp32
      master weights); None computes in the params' dtype.
    donate: donate the input state's buffers (`donate_argnums=(0,)`); do not reuse a state
      after passing it to the step.
    compiler_options: XLA options passed to `jax.jit` (e.g.
      {"xla_backend_optimization_level": 0} halves CPU compile time in tests).

  Returns:
    The jitted step. Metrics (replicated scalars): "loss" (full-batch), "grad_norm" (before
    clipping), "learning_rate", "skipped" (1 if the update was skipped), "normalizer" (with
    `count_fn`) and the loss_fn's metrics averaged over microbatches.

  Example:
    >>> graphdef, state = create_train_state(model, optimizer, rng=0, mesh=mesh, rules="fsdp")
    >>> step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count,
    ...                        shardings=state_shardings(graphdef, state, mesh, "fsdp"),
    ...                        num_microbatches=4, compute_dtype=jnp.bfloat16)
    >>> state, metrics = step(state, batch)
  """
  if shardings is not None and batch_sharding is None:
    batch_sharding = default_batch_sharding(mesh_of(shardings))
  grad_fn = make_grad_fn(
    loss_fn,
    graphdef,
    count_fn=count_fn,
    num_microbatches=num_microbatches,
    compute_dtype=compute_dtype,
    batch_sharding=batch_sharding,
  )

  def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.rng, state.step)
    loss, grads, loss_metrics = grad_fn(state.params, state.frozen, batch, key)
    state, update_metrics = apply_gradients(state, grads, loss, optimizer)
    metrics = {**loss_metrics, "loss": loss, **update_metrics}
    return state, metrics

  return jit_step(step, shardings=shardings, batch_sharding=batch_sharding, donate=donate,
                  compiler_options=compiler_options)


def jit_step(
  step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]],
  *,
  shardings: TrainState | None = None,
  batch_sharding: Any | None = None,
  donate: bool = True,
  compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """`jax.jit` of a pure `step(state, batch) -> (state, metrics)`: the state donated, and with
  `shardings` the state kept in them, the batch in `batch_sharding` (default: rows over
  ("data", "fsdp")) and the metrics replicated. Used by `make_train_step` and by trainers with
  a step of their own (PPO's joint policy/critic update)."""
  jit_kwargs = {"donate_argnums": (0,) if donate else (), "compiler_options": compiler_options}
  if shardings is None:
    return jax.jit(step, **jit_kwargs)
  mesh = mesh_of(shardings)
  if batch_sharding is None:
    batch_sharding = default_batch_sharding(mesh)
  return jax.jit(
    step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
    **jit_kwargs,
  )


def jit_step_by_rules(
  step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
  mesh: jax.sharding.Mesh,
  rules: Any,
  *,
  donate: bool = True,
  compiler_options: dict[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """`jax.jit` of `step(state, batch, *rest)` on a mesh without an example state: the batch rows
  are constrained to the data axes, the returned state to the shardings of its logical axes
  (`state_shardings` of the traced state) and the metrics replicated. The input state keeps the
  shardings it carries (`create_train_state` placed it), so a state goes in and comes out in
  the same layout and its buffers are donated."""
  batch_sharding = default_batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())

  def constrained(state, batch, *rest):
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    new_state, metrics = step(state, batch, *rest)
    new_state = jax.lax.with_sharding_constraint(
      new_state, state_shardings(None, new_state, mesh, rules))
    return new_state, jax.lax.with_sharding_constraint(metrics, replicated)

  return jax.jit(constrained, donate_argnums=(0,) if donate else (),
                 compiler_options=compiler_options)
