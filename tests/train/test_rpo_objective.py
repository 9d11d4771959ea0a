"""RPO: `dpo_objective(..., nll_coef=α)` adds α · (chosen token-mean NLL, averaged over pairs).

Checked against float64 numpy log-probs of the full logits; the added gradient against an
unfused log-softmax NLL; exact microbatch accumulation through `make_train_step`; α = 0 is
plain DPO bit for bit; a negative α is rejected."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rljax.losses.dpo import dpo_loss
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.train.objectives import dpo_objective, pair_count, pair_sequence_logps
from rljax.train.state import create_train_state
from rljax.train.step import make_train_step

CONFIG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
PROMPT, RESPONSE = 3, 5
T = PROMPT + RESPONSE
B = 8
CHUNK = 8
BETA = 0.3


def pair_batch(seed: int) -> dict[str, np.ndarray]:
  """Right-padded pairs with response lengths 1..5; chosen row 2 is empty (no loss tokens)."""
  rng = np.random.default_rng(seed)
  batch = {}
  prompts = rng.integers(1, CONFIG.vocab_size, (B, PROMPT))
  for side in ("chosen", "rejected"):
    ids, attention, loss = (np.zeros((B, T), np.int32) for _ in range(3))
    for b, n in enumerate(rng.integers(1, RESPONSE + 1, B)):
      n = 0 if (side == "chosen" and b == 2) else n
      ids[b, :PROMPT] = prompts[b]
      ids[b, PROMPT:PROMPT + n] = rng.integers(1, CONFIG.vocab_size, n)
      attention[b, :PROMPT + n], loss[b, PROMPT:PROMPT + n] = 1, 1
    batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention,
                  f"{side}_loss_mask": loss})
  batch["ref_chosen"] = rng.normal(-8.0, 2.0, B).astype(np.float32)
  batch["ref_rejected"] = rng.normal(-8.0, 2.0, B).astype(np.float32)
  return batch


@pytest.fixture(scope="module")
def parts():
  return nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)


def numpy_token_logps(parts, ids, attention) -> np.ndarray:
  """[B, T-1] float64 log-softmax log-probs of ids[:, 1:] from the model's full logits."""
  graphdef, params, frozen = parts
  logits = np.asarray(nnx.merge(graphdef, params, frozen)(ids, attention), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]


def numpy_rpo(parts, batch, *, beta, nll_coef):
  """(loss, mean chosen token-mean NLL): mean −log σ(β δ) + α · mean_b(−Σ_t logp / |c_b|)."""
  sums, means = {}, {}
  for side in ("chosen", "rejected"):
    logp = numpy_token_logps(parts, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
    mask = batch[f"{side}_loss_mask"][:, 1:]
    sums[side] = (logp * mask).sum(-1)
    means[side] = sums[side] / np.maximum(mask.sum(-1), 1)  # an empty response: 0
  delta = (sums["chosen"] - batch["ref_chosen"]) - (sums["rejected"] - batch["ref_rejected"])
  nll = np.mean(-means["chosen"])
  return np.mean(np.logaddexp(0.0, -beta * delta)) + nll_coef * nll, nll


@functools.lru_cache(maxsize=None)
def loss_and_grads(graphdef, nll_coef):
  """jit of (loss, metrics), (d/d params, d/d ref_chosen, d/d ref_rejected)."""

  def loss(params, frozen, ref_chosen, ref_rejected, batch):
    batch = dict(batch, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    return dpo_objective(nnx.merge(graphdef, params, frozen), batch, beta=BETA,
                         nll_coef=nll_coef, chunk_size=CHUNK)

  def run(params, frozen, batch):
    return jax.value_and_grad(loss, argnums=(0, 2, 3), has_aux=True)(
      params, frozen, batch["ref_chosen"], batch["ref_rejected"], batch)

  return jax.jit(run, compiler_options=FAST_COMPILE)


def test_rpo_loss_and_nll_metric_match_numpy(parts):
  graphdef, params, frozen = parts
  batch = pair_batch(0)
  for alpha in (0.0, 0.5, 2.0):
    (loss, metrics), _ = loss_and_grads(graphdef, alpha)(params, frozen, batch)
    want, nll = numpy_rpo(parts, batch, beta=BETA, nll_coef=alpha)
    assert nll > 1.0  # the term is not negligible in this check
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-5)
  # Σ / N with N = 2B (this batch is half of the global batch): half the mean.
  half, _ = jax.jit(lambda p, f, b: dpo_objective(nnx.merge(graphdef, p, f), b, beta=BETA,
                                                   nll_coef=0.5, chunk_size=CHUNK,
                                                   normalizer=2.0 * B))(params, frozen, batch)
  np.testing.assert_allclose(half, numpy_rpo(parts, batch, beta=BETA, nll_coef=0.5)[0] / 2,
                             rtol=1e-5)


def test_nll_coef_zero_is_plain_dpo_exactly(parts):
  graphdef, params, frozen = parts
  batch = pair_batch(1)

  def plain(params, frozen, ref_chosen, ref_rejected, batch):
    s = pair_sequence_logps(nnx.merge(graphdef, params, frozen), batch, chunk_size=CHUNK)
    return dpo_loss(s["chosen"], s["rejected"], ref_chosen, ref_rejected, beta=BETA)

  want = jax.jit(jax.value_and_grad(plain, argnums=(0, 2, 3), has_aux=True),
                 compiler_options=FAST_COMPILE)(
    params, frozen, batch["ref_chosen"], batch["ref_rejected"], batch)
  got = loss_and_grads(graphdef, 0.0)(params, frozen, batch)
  assert float(got[0][0]) == float(want[0][0])
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_array_equal(a, b)


def test_nll_gradient_flows_only_through_the_policy(parts):
  graphdef, params, frozen = parts
  batch = pair_batch(2)
  alpha = 0.7
  (_, _), (g_rpo, dref_c, dref_r) = loss_and_grads(graphdef, alpha)(params, frozen, batch)
  (_, _), (g_dpo, dref_c0, dref_r0) = loss_and_grads(graphdef, 0.0)(params, frozen, batch)
  # The references get no gradient, with or without the NLL term.
  for g in (dref_c, dref_r, dref_c0, dref_r0):
    np.testing.assert_array_equal(g, np.zeros(B, np.float32))

  def unfused_nll(params):  # mean_b −Σ_t m·log_softmax(logits)[x] / max(Σ_t m, 1)
    ids, mask = batch["chosen_input_ids"], batch["chosen_loss_mask"][:, 1:]
    logits = nnx.merge(graphdef, params, frozen)(ids, batch["chosen_attention_mask"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    return jnp.mean(-(logp * mask).sum(-1) / np.maximum(mask.sum(-1), 1))

  g_nll = jax.jit(jax.grad(unfused_nll), compiler_options=FAST_COMPILE)(params)
  leaves = zip(jax.tree.leaves(g_rpo), jax.tree.leaves(g_dpo), jax.tree.leaves(g_nll))
  for rpo, dpo, nll in leaves:
    np.testing.assert_allclose(rpo - dpo, alpha * nll, rtol=1e-3, atol=1e-6)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g_nll)) > 1e-3


def test_microbatched_step_equals_full_batch(parts):
  batch = pair_batch(3)
  lengths = batch["chosen_loss_mask"].sum(-1)
  assert len({int(lengths[i::2].sum()) for i in range(2)}) == 2  # microbatch token counts differ
  optimizer = optax.sgd(0.5)
  loss_fn = functools.partial(dpo_objective, beta=BETA, nll_coef=0.8, chunk_size=CHUNK)
  out = {}
  for k in (1, 2):
    policy = nnx.merge(*parts)
    graphdef, state = create_train_state(policy, optimizer, rng=0)
    step = make_train_step(loss_fn, graphdef, optimizer, count_fn=pair_count,
                           num_microbatches=k, donate=False, compiler_options=FAST_COMPILE)
    out[k] = step(state, batch)
  (state1, m1), (state2, m2) = out[1], out[2]
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["nll"], m1["nll"], rtol=1e-5)  # equal pairs per microbatch
  np.testing.assert_allclose(m1["loss"], numpy_rpo(parts, batch, beta=BETA, nll_coef=0.8)[0],
                             rtol=1e-5)
  moved = 0.0
  for a, b, p0 in zip(jax.tree.leaves(state2.params), jax.tree.leaves(state1.params),
                      jax.tree.leaves(parts[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(p0)).max()))
  assert moved > 1e-3 and int(state1.skipped_steps) == int(state2.skipped_steps) == 0


def test_negative_nll_coef_is_rejected(parts):
  model = nnx.merge(*parts)
  with pytest.raises(ValueError, match="nll_coef"):
    dpo_objective(model, pair_batch(0), nll_coef=-0.1)
