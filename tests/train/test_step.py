"""Train step: declared shardings kept, exact microbatch accumulation, non-finite skip, bf16 compute,
and the SFT / DPO objectives against numpy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.rules import MESH_AXES
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from rljax.train.state import TrainState, create_train_state, state_shardings
from rljax.train.step import make_grad_fn, make_train_step, split_microbatches

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
OPT_CONFIG = OptimizerConfig(1e-3, warmup_steps=2, schedule="cosine", total_steps=10,
                             weight_decay=0.1)
OPTIMIZER = make_optimizer(OPT_CONFIG)
B, T = 8, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time
sft = functools.partial(sft_loss, chunk_size=8)
dpo = functools.partial(dpo_objective, chunk_size=8, beta=0.1)


def sft_batch(seed=0, batch=B):
  """Rows with different numbers of loss tokens (1..7), so microbatch token counts differ."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, CONFIG.vocab_size, (batch, T)).astype(np.int32)
  lengths = 1 + (np.arange(batch) * 5) % (T - 1)
  loss_mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones((batch, T), np.int32),
          "loss_mask": loss_mask}


def dpo_batch(seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for side in ("chosen", "rejected"):
    part = sft_batch(seed + (side == "rejected"))
    out.update({f"{side}_{k}": v for k, v in part.items()})
    out[f"ref_{side}"] = (-4.2 * part["loss_mask"][:, 1:].sum(-1)
                          + rng.normal(size=B)).astype(np.float32)
  return out


@functools.lru_cache(maxsize=None)
def grad_fn(objective: str, num_microbatches: int = 1, counted: bool = True):
  """Jitted grad fns shared by the tests (each compiles once per batch shape)."""
  loss_fn, count_fn = {"sft": (sft, sft_token_count), "dpo": (dpo, pair_count)}[objective]
  graphdef = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))[0]
  return jax.jit(make_grad_fn(loss_fn, graphdef, count_fn=count_fn if counted else None,
                              num_microbatches=num_microbatches),
                 compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def model_parts():
  graphdef, params, frozen = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)
  return graphdef, params, frozen


def _log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
  return jax.jit(lambda params, frozen, ids: nnx.merge(graphdef, params, frozen)(ids))


def _numpy_token_logps(graphdef, params, frozen, ids):
  logits = _forward(graphdef)(params, frozen, jnp.asarray(ids))
  logp = _log_softmax64(logits)[:, :-1]
  return np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], -1)[..., 0]


def _allclose_trees(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# ------------------------------------------------------------------------------------------------
# Objectives against numpy.
# ------------------------------------------------------------------------------------------------


def test_sft_loss_matches_numpy_nll(model_parts):
  graphdef, params, frozen = model_parts
  batch = sft_batch()
  token_logp = _numpy_token_logps(graphdef, params, frozen, batch["input_ids"])
  mask = batch["loss_mask"][:, 1:]
  want = -(token_logp * mask).sum() / mask.sum()
  loss, _, metrics = grad_fn("sft", counted=False)(params, frozen, batch)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["nll"], want, rtol=1e-5)
  assert float(sft_token_count(batch)) == mask.sum()
  half, _ = jax.jit(lambda p, f, b: sft(nnx.merge(graphdef, p, f), b, normalizer=2.0 * mask.sum()))(
    params, frozen, batch)
  np.testing.assert_allclose(half, want / 2, rtol=1e-5)


def test_dpo_objective_matches_numpy(model_parts):
  graphdef, params, frozen = model_parts
  batch = dpo_batch()
  seq = {}
  for side in ("chosen", "rejected"):
    logp = _numpy_token_logps(graphdef, params, frozen, batch[f"{side}_input_ids"])
    seq[side] = (logp * batch[f"{side}_loss_mask"][:, 1:]).sum(-1)
  delta = (seq["chosen"] - batch["ref_chosen"]) - (seq["rejected"] - batch["ref_rejected"])
  per_pair = np.log1p(np.exp(-0.1 * delta))  # −log σ(β δ)
  loss, _, metrics = grad_fn("dpo", counted=False)(params, frozen, batch)
  np.testing.assert_allclose(loss, per_pair.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["reward_margin"], 0.1 * delta.mean(), rtol=1e-4, atol=1e-6)
  assert float(pair_count(batch)) == B
  counted, _, _ = grad_fn("dpo")(params, frozen, batch)  # Σ ℓ / N with N = B: the mean
  np.testing.assert_allclose(counted, per_pair.mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Microbatch accumulation.
# ------------------------------------------------------------------------------------------------


def test_split_microbatches_is_strided_and_checks_divisibility():
  x = np.arange(8)
  np.testing.assert_array_equal(split_microbatches(x, 4), [[0, 4], [1, 5], [2, 6], [3, 7]])
  with pytest.raises(ValueError, match="num_microbatches"):
    split_microbatches(x, 3)
  with pytest.raises(ValueError, match="num_microbatches"):
    make_grad_fn(sft, None, num_microbatches=0)


def test_accumulated_gradient_equals_full_batch_and_multisteps_does_not(model_parts):
  graphdef, params, frozen = model_parts
  batch = sft_batch()
  full, micro = grad_fn("sft"), grad_fn("sft", 4)
  with jax.default_matmul_precision("highest"):
    loss_full, grads_full, _ = full(params, frozen, batch)
    loss_micro, grads_micro, metrics = micro(params, frozen, batch)
  np.testing.assert_allclose(loss_micro, loss_full, rtol=1e-6)
  _allclose_trees(grads_micro, grads_full, rtol=1e-5, atol=1e-7)
  assert float(metrics["normalizer"]) == float(sft_token_count(batch))

  # optax.MultiSteps averages the per-microbatch MEAN gradients: biased when counts differ.
  counts = split_microbatches(batch["loss_mask"][:, 1:], 4).sum((1, 2))
  assert len(set(counts.tolist())) > 1
  per_micro = grad_fn("sft", counted=False)  # normalizer=None: each microbatch's mean
  multi = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=4)
  multi_state = multi.init(params)
  micro_batches = split_microbatches(batch, 4)
  for i in range(4):
    _, g, _ = per_micro(params, frozen, jax.tree.map(lambda x: x[i], micro_batches))
    updates, multi_state = multi.update(g, multi_state, params)
  multi_grads = jax.tree.map(lambda u: -u, updates)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(multi_grads), jax.tree.leaves(grads_full)))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_full))
  assert diff > 1e-2 * scale


def test_dpo_accumulation_is_exact(model_parts):
  graphdef, params, frozen = model_parts
  batch = dpo_batch()
  full, micro = grad_fn("dpo"), grad_fn("dpo", 2)
  loss_full, grads_full, metrics_full = full(params, frozen, batch)
  loss_micro, grads_micro, metrics_micro = micro(params, frozen, batch)
  np.testing.assert_allclose(loss_micro, loss_full, rtol=1e-6)
  _allclose_trees(grads_micro, grads_full, rtol=1e-5, atol=1e-7)
  # Per-pair metrics averaged over equal-size microbatches are the full-batch means.
  np.testing.assert_allclose(metrics_micro["reward_margin"], metrics_full["reward_margin"],
                             rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------------


def test_sharded_step_keeps_declared_shardings():
  mesh = jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  build = lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, state = create_train_state(build, OPTIMIZER, rng=0, mesh=mesh, rules="fsdp_tp")
  shardings = state_shardings(graphdef, state, mesh, "fsdp_tp")
  step = make_train_step(sft, graphdef, OPTIMIZER, count_fn=sft_token_count,
                         shardings=shardings, compiler_options=FAST_COMPILE)
  batch = sft_batch()
  _, params, frozen = nnx.split(build(), nnx.Param, ...)
  ref_loss, _, _ = grad_fn("sft")(params, frozen, batch)  # same initial parameters, 1 device
  state, metrics = step(state, batch)
  state, metrics2 = step(state, sft_batch(seed=1))
  for declared, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)):
    assert leaf.sharding.is_equivalent_to(declared, leaf.ndim)
  q = state.params["layers"]["down_proj"][...]  # [L, F, D] = [2, 64, 32]
  assert q.sharding.spec == P(None, "tensor", "fsdp")
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 8)}
  assert {"loss", "grad_norm", "learning_rate", "skipped", "nll", "normalizer"} <= set(metrics)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  schedule = make_schedule(OPT_CONFIG)
  np.testing.assert_allclose(metrics["learning_rate"], schedule(0), rtol=1e-6)
  np.testing.assert_allclose(metrics2["learning_rate"], schedule(1), rtol=1e-6)
  assert int(state.step) == 2 and int(state.skipped_steps) == 0
  assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["grad_norm"]))


def test_non_finite_step_is_skipped_and_counted(model_parts):
  graphdef, params, frozen = model_parts

  def scaled_sft(model, batch, *, normalizer):
    loss, metrics = sft(model, batch, normalizer=normalizer)
    return loss * jnp.mean(batch["scale"]), metrics

  state = TrainState(step=jnp.int32(0), params=params, frozen=frozen,
                     opt_state=OPTIMIZER.init(params), rng=jax.random.key(0))
  step = make_train_step(scaled_sft, graphdef, OPTIMIZER, count_fn=sft_token_count,
                         donate=False, compiler_options=FAST_COMPILE)
  batch = sft_batch()
  bad = dict(batch, scale=np.full((B,), np.nan, np.float32))
  good = dict(batch, scale=np.ones((B,), np.float32))
  skipped, metrics = step(state, bad)
  assert int(metrics["skipped"]) == 1 and int(skipped.skipped_steps) == 1
  np.testing.assert_allclose(metrics["learning_rate"], make_schedule(OPT_CONFIG)(0))  # would-be
  assert int(skipped.step) == 1  # steps attempted advance; the update does not
  for a, b in zip(jax.tree.leaves((skipped.params, skipped.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  inf = dict(batch, scale=np.full((B,), np.inf, np.float32))
  skipped, _ = step(skipped, inf)
  assert int(skipped.skipped_steps) == 2
  applied, metrics = step(skipped, good)
  assert int(metrics["skipped"]) == 0 and int(applied.skipped_steps) == 2
  assert int(applied.step) == 3
  # The learning-rate schedule did not advance on the skipped steps: this is update 0.
  np.testing.assert_allclose(metrics["learning_rate"], make_schedule(OPT_CONFIG)(0))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(applied.params))


def test_the_non_finite_skip_does_not_copy_the_optimizer_state():
  """A donated step with the skip needs no more temporaries than the plain optax step (a
  where(finite, new, old) over the leaves made XLA copy the Adam moments first: 0.94x the
  parameters' bytes more here, a third of a full-fine-tuning GRPO update's temporaries at 135M)."""
  from rljax.train.step import apply_gradients

  params = {"w": jnp.zeros((4, 256, 256)), "v": jnp.zeros((256, 64))}
  state = TrainState(step=jnp.int32(0), params=params, frozen={}, opt_state=OPTIMIZER.init(params),
                     rng=jax.random.key(0))

  def loss(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
    return jnp.mean((h @ p["v"]) ** 2)

  def guarded(state, x):
    value, grads = jax.value_and_grad(loss)(state.params, x)
    return apply_gradients(state, grads, value, OPTIMIZER)

  def plain(state, x):
    value, grads = jax.value_and_grad(loss)(state.params, x)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state), value

  def temp(fn):
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, jnp.ones((8, 256))).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert temp(guarded) <= temp(plain) + 0.02 * nbytes


def test_bf16_compute_with_fp32_master_weights():
  config = CONFIG.replace(dtype=jnp.bfloat16)
  graphdef, params, frozen = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  batch = sft_batch()
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  bf16 = jax.jit(make_grad_fn(sft, graphdef, count_fn=sft_token_count,
                              compute_dtype=jnp.bfloat16), compiler_options=FAST_COMPILE)
  loss, grads, _ = bf16(params, frozen, batch)
  ref_loss, ref_grads, _ = grad_fn("sft")(params, frozen, batch)  # fp32 compute
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
    g, r = np.ravel(g), np.ravel(r)
    cosine = g @ r / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30)
    assert cosine > 0.98
