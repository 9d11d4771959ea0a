"""Tests for rljax.ops.fused_logprobs.logprobs_from_hidden (chunked along T, custom VJP)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec
from jax.extend.core import jaxprs_in_params
from jax.test_util import check_grads

from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.ops.logprobs import entropy_from_logits, token_logprobs

B, T, D, V = 2, 7, 5, 11
CHUNK = 3  # T is not a multiple of it: the remainder is padded internally

# Jitted once per (shape, options): compiled programs are shared across tests.
fused_jit = jax.jit(
    logprobs_from_hidden,
    static_argnames=("temperature", "chunk_size", "return_entropy", "softcap"),
)


# ---------------------------------------------------------------- references


def np_logprobs_and_entropy(hidden, unembedding, tokens, temperature, softcap=None):
  """Plain float64 transcription: logits (soft-capped: c·tanh(ℓ/c)), log-softmax, gather,
  entropy, position by position."""
  hidden, unembedding = np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64)
  logp = np.zeros(tokens.shape)
  ent = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      z = [float(np.dot(hidden[b, t], unembedding[v])) for v in range(len(unembedding))]
      if softcap is not None:
        z = [softcap * math.tanh(x / softcap) for x in z]
      z = [x / temperature for x in z]
      m = max(z)
      lse = m + math.log(sum(math.exp(x - m) for x in z))
      logp[b, t] = z[tokens[b, t]] - lse
      ent[b, t] = -sum(math.exp(x - lse) * (x - lse) for x in z)
  return logp, ent


def naive(hidden, unembedding, tokens, temperature, softcap=None):
  """The unfused computation through [B, T, V] logits (the autodiff reference for gradients)."""
  logits = jnp.einsum("btd,vd->btv", hidden, unembedding)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return (
      token_logprobs(logits, tokens, temperature=temperature),
      entropy_from_logits(logits, temperature=temperature),
  )


def weighted_sum(outputs, weights):
  """Σ w_lp·logp + Σ w_ent·entropy: random cotangents for both outputs."""
  return sum(jnp.sum(w * o) for o, w in zip(outputs, weights))


def make_inputs(seed=0, dtype=np.float64, shape=(B, T, D, V)):
  b, t, d, v = shape
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((b, t, d)).astype(dtype)
  unembedding = rng.standard_normal((v, d)).astype(dtype)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  weights = (rng.standard_normal((b, t)), rng.standard_normal((b, t)))
  return hidden, unembedding, tokens, weights


def value_and_grads(outputs_fn, hidden, unembedding, weights):
  """Jitted value_and_grad w.r.t. (hidden, unembedding) of Σ w·logp + Σ w'·entropy, with random
  cotangents on both outputs; the outputs come back as the aux value."""

  def loss(h, w):
    outs = outputs_fn(h, w)
    return weighted_sum(outs, weights), outs

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, unembedding)


def fused_and_naive_value_and_grads(hidden, unembedding, tokens, weights, temperature, chunk=CHUNK,
                                    softcap=None):
  def fused(h, w):
    return logprobs_from_hidden(
        h, w, tokens, temperature=temperature, chunk_size=chunk, return_entropy=True,
        softcap=softcap,
    )

  return (
      value_and_grads(fused, hidden, unembedding, weights),
      value_and_grads(lambda h, w: naive(h, w, tokens, temperature, softcap), hidden, unembedding,
                      weights),
  )


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_numpy_float64(x64, temperature):
  hidden, unembedding, tokens, _ = make_inputs()
  logp, ent = fused_jit(
      hidden, unembedding, tokens, temperature=temperature, chunk_size=CHUNK, return_entropy=True
  )
  assert logp.dtype == jnp.float64 and ent.dtype == jnp.float64
  ref_logp, ref_ent = np_logprobs_and_entropy(hidden, unembedding, tokens, temperature)
  np.testing.assert_allclose(logp, ref_logp, atol=1e-6)
  np.testing.assert_allclose(ent, ref_ent, atol=1e-6)


def test_matches_numpy_float32():
  hidden, unembedding, tokens, _ = make_inputs(seed=1, dtype=np.float32)
  logp, ent = fused_jit(
      hidden, unembedding, tokens, temperature=1.3, chunk_size=CHUNK, return_entropy=True
  )
  assert logp.dtype == jnp.float32
  ref_logp, ref_ent = np_logprobs_and_entropy(hidden, unembedding, tokens, 1.3)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
  # Without entropy: a plain array, the same log-probs.
  alone = fused_jit(hidden, unembedding, tokens, temperature=1.3, chunk_size=CHUNK)
  assert isinstance(alone, jax.Array)
  np.testing.assert_allclose(alone, logp, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_independent_of_chunk_size(chunk):
  hidden, unembedding, tokens, _ = make_inputs(seed=2, dtype=np.float32)
  ref = fused_jit(hidden, unembedding, tokens, chunk_size=2, return_entropy=True)
  got = fused_jit(hidden, unembedding, tokens, chunk_size=chunk, return_entropy=True)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_out_of_range_tokens_are_clipped():
  hidden, unembedding, tokens, _ = make_inputs(seed=3, dtype=np.float32)
  padded = np.full_like(tokens, -100)
  np.testing.assert_allclose(
      fused_jit(hidden, unembedding, padded, chunk_size=CHUNK),
      fused_jit(hidden, unembedding, padded * 0, chunk_size=CHUNK),
  )


# ---------------------------------------------------------------- gradients


def test_value_and_grads_match_naive_float64(x64):
  hidden, unembedding, tokens, weights = make_inputs(seed=4)
  ((value, _), grads), ((ref_value, _), ref_grads) = fused_and_naive_value_and_grads(
      hidden, unembedding, tokens, weights, 0.7
  )
  np.testing.assert_allclose(value, ref_value, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == jnp.float64
    np.testing.assert_allclose(g, r, atol=1e-6)


def test_value_and_grads_match_naive_float32():
  hidden, unembedding, tokens, weights = make_inputs(seed=5, dtype=np.float32)
  ((value, _), grads), ((ref_value, _), ref_grads) = fused_and_naive_value_and_grads(
      hidden, unembedding, tokens, weights, 1.0
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_metric_only_entropy_has_the_logprob_gradient():
  """entropy_grad=False: the same values; the gradient of a loss using both outputs is that of
  the log-prob term alone, i.e. of the naive path with the entropy under stop_gradient."""
  hidden, unembedding, tokens, weights = make_inputs(seed=11, dtype=np.float32)

  def loss(fn):
    def f(h, w):
      logp, ent = fn(h, w)
      return jnp.sum(logp * weights[0]) + jnp.sum(ent * weights[1])
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  metric = loss(lambda h, w: logprobs_from_hidden(h, w, tokens, chunk_size=CHUNK,
                                                 return_entropy=True, entropy_grad=False))
  def naive_stopped(h, w):
    logp, ent = naive(h, w, tokens, 1.0)
    return logp, jax.lax.stop_gradient(ent)
  (value, grads), (ref_value, ref_grads) = metric(hidden, unembedding), loss(naive_stopped)(
      hidden, unembedding)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature, softcap, entropy", [(1.0, None, "none"), (0.7, 2.0, "metric"),
                                                     (0.7, None, "trained")])
def test_frozen_unembedding_gradient_matches_naive(x64, temperature, softcap, entropy):
  """Differentiated w.r.t. hidden only (a frozen table, e.g. a LoRA base's), the forward forms
  d logp / d hidden and the backward scales it: values and hidden gradients equal the naive
  path's, eager and jitted, and the jitted gradient w.r.t. hidden has 2 matmuls with the table
  where the gradient w.r.t. both has 4 (the logits twice, the hidden and the table gradients;
  with a differentiated entropy it recomputes too, and still matches)."""
  hidden, unembedding, tokens, weights = make_inputs(seed=13)

  def loss(fn):
    def f(h):
      logp, ent = fn(h)
      ent = jax.lax.stop_gradient(ent) if entropy == "metric" else ent
      return jnp.sum(logp * weights[0]) + (0.0 if entropy == "none" else jnp.sum(ent * weights[1]))
    return jax.value_and_grad(f)

  fused = loss(lambda h: logprobs_from_hidden(
      h, unembedding, tokens, temperature=temperature, chunk_size=CHUNK, return_entropy=True,
      entropy_grad=entropy == "trained", softcap=softcap))
  reference = loss(lambda h: naive(h, unembedding, tokens, temperature, softcap))(hidden)
  for value, grad in (fused(hidden), jax.jit(fused)(hidden)):
    np.testing.assert_allclose(value, reference[0], atol=1e-10)
    np.testing.assert_allclose(grad, reference[1], atol=1e-10)

  def table_dots(argnums):  # dot_generals with the [V, D] table in the lowered gradient
    f = jax.grad(lambda h, w: logprobs_from_hidden(h, w, tokens, chunk_size=CHUNK,
                                                   softcap=softcap).sum(), argnums=argnums)
    return jax.jit(f).lower(hidden, unembedding).as_text().count("dot_general")

  assert (table_dots(0), table_dots((0, 1))) == (2, 4)


def test_grads_numerical_check(x64):
  # The custom VJP against finite differences (reverse mode; custom_vjp has no forward mode).
  hidden, unembedding, tokens, weights = make_inputs(seed=6, shape=(1, 4, 3, 5))
  w_lp, w_ent = jnp.asarray(weights[0]), jnp.asarray(weights[1])

  @jax.jit
  def f(h, w):
    logp, ent = logprobs_from_hidden(
        h, w, tokens, temperature=0.8, chunk_size=3, return_entropy=True
    )
    return w_lp * logp + w_ent * ent

  check_grads(f, (jnp.asarray(hidden), jnp.asarray(unembedding)), order=1, modes=("rev",))


def test_logprob_only_cotangent_and_entropy_only_cotangent(x64):
  # Each output's backward formula on its own (the other output's cotangent is zero).
  hidden, unembedding, tokens, weights = make_inputs(seed=7)

  def grads_per_output(outputs_fn):
    def loss(h, w, pick):
      return jnp.sum(weights[pick] * outputs_fn(h, w)[pick])

    grad = jax.grad(loss, argnums=(0, 1))
    return jax.jit(lambda h, w: (grad(h, w, 0), grad(h, w, 1)))(hidden, unembedding)

  fused = grads_per_output(lambda h, w: logprobs_from_hidden(
      h, w, tokens, temperature=1.5, chunk_size=CHUNK, return_entropy=True))
  reference = grads_per_output(lambda h, w: naive(h, w, tokens, 1.5))
  for got, ref in zip(jax.tree.leaves(fused), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_bf16_inputs_finite_and_close():
  hidden, unembedding, tokens, weights = make_inputs(seed=8, dtype=np.float32)
  low_h, low_w = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembedding, jnp.bfloat16)
  (_, (logp, ent)), grads = value_and_grads(
      lambda h, w: logprobs_from_hidden(h, w, tokens, chunk_size=CHUNK, return_entropy=True),
      low_h, low_w, weights,
  )
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  for x in (logp, ent, *grads):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  # The same computation on the bf16-rounded values in float32.
  ref_h, ref_w = low_h.astype(jnp.float32), low_w.astype(jnp.float32)
  (_, (ref_logp, ref_ent)), ref_grads = value_and_grads(
      lambda h, w: naive(h, w, tokens, 1.0), ref_h, ref_w, weights
  )
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-4, atol=1e-4)
  for g, r in zip(grads, ref_grads):  # the backward matmuls take bf16 operands
    np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=3e-2, atol=3e-2)


def test_jit_equals_eager():
  hidden, unembedding, tokens, weights = make_inputs(seed=9, dtype=np.float32)

  def loss(h, w):
    outs = logprobs_from_hidden(
        h, w, tokens, temperature=0.9, chunk_size=CHUNK, return_entropy=True
    )
    return weighted_sum(outs, weights), outs

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  eager = value_and_grad(hidden, unembedding)
  jitted = jax.jit(value_and_grad)(hidden, unembedding)
  for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(j, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- properties


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.3, 1.0, 2.5]))
def test_properties(seed, temperature):
  rng = np.random.default_rng(seed)
  row = rng.standard_normal(D).astype(np.float32)
  unembedding = rng.standard_normal((V, D)).astype(np.float32)
  hidden = np.tile(row, (V, 1))[None]  # [1, V, D]: every position has the same distribution
  every_token = np.arange(V)[None]
  logp, ent = fused_jit(
      hidden, unembedding, every_token, temperature=temperature, chunk_size=4, return_entropy=True
  )
  np.testing.assert_allclose(np.sum(np.exp(logp)), 1.0, rtol=1e-5)  # a distribution over V
  assert np.all(ent >= -1e-6) and np.all(ent <= math.log(V) + 1e-5)
  np.testing.assert_allclose(ent, -np.sum(np.exp(logp) * logp), rtol=1e-4, atol=1e-5)
  # Temperature divides the logits, i.e. the hidden states.
  cooled = fused_jit(hidden / temperature, unembedding, every_token, chunk_size=4)
  np.testing.assert_allclose(logp, cooled, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_extreme_logits_finite(dtype):
  hidden, unembedding, tokens, weights = make_inputs(seed=10, dtype=np.float32)
  scale = 1e4 / np.max(np.abs(np.einsum("btd,vd->btv", hidden, unembedding)))
  hidden = jnp.asarray(hidden * scale, dtype)  # logits reach ±1e4
  unembedding = jnp.asarray(unembedding, dtype)

  (value, (logp, ent)), grads = value_and_grads(
      lambda h, w: logprobs_from_hidden(h, w, tokens, chunk_size=CHUNK, return_entropy=True),
      hidden, unembedding, weights,
  )
  for x in (value, logp, ent, *grads):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  assert np.all(logp <= 0) and np.all(ent >= 0)
  (_, (ref_logp, ref_ent)), ref_grads = value_and_grads(
      lambda h, w: naive(h, w, tokens, 1.0),
      hidden.astype(jnp.float32), unembedding.astype(jnp.float32), weights,
  )
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-2)
  np.testing.assert_allclose(ent, ref_ent, atol=1e-2)
  if dtype == np.float32:
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.max(np.abs(r)))


# ---------------------------------------------------------------- memory and sharding


def _contains_full_logits(jaxpr, size: int) -> bool:
  for eqn in jaxpr.eqns:
    for var in (*eqn.invars, *eqn.outvars):
      aval = getattr(var, "aval", None)
      if aval is not None and getattr(aval, "size", 0) >= size:
        return True
    for sub in jaxprs_in_params(eqn.params):
      if _contains_full_logits(sub, size):
        return True
  return False


def test_never_traces_full_logits():
  b, t, d, v = 2, 16, 4, 64
  args = make_inputs(seed=11, dtype=np.float32, shape=(b, t, d, v))[:3]

  def fused_loss(h, w, tokens):
    logp, ent = logprobs_from_hidden(h, w, tokens, chunk_size=4, return_entropy=True)
    return jnp.sum(logp) + jnp.sum(ent)

  fused = jax.make_jaxpr(jax.value_and_grad(fused_loss, argnums=(0, 1)))(*args)
  assert not _contains_full_logits(fused.jaxpr, b * t * v)
  # The check itself can fail: the naive computation does contain [B, T, V] arrays.
  unfused = jax.make_jaxpr(jax.value_and_grad(
      lambda h, w, tokens: jnp.sum(naive(h, w, tokens, 1.0)[0]), argnums=(0, 1)))(*args)
  assert _contains_full_logits(unfused.jaxpr, b * t * v)


def test_compiled_temp_memory_at_most_quarter_of_naive():
  b, t, d, v = 4, 128, 64, 8192  # 512 tokens; one f32 [B, T, V] logits array is 16 MiB
  args = (
      jax.ShapeDtypeStruct((b, t, d), jnp.float32),
      jax.ShapeDtypeStruct((v, d), jnp.float32),
      jax.ShapeDtypeStruct((b, t), jnp.int32),
  )

  def temp_bytes(loss):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  naive_bytes = temp_bytes(lambda h, w, tokens: jnp.sum(naive(h, w, tokens, 1.0)[0]))
  fused_bytes = temp_bytes(
      lambda h, w, tokens: jnp.sum(logprobs_from_hidden(h, w, tokens, chunk_size=16))
  )
  assert naive_bytes >= b * t * v * 4  # the naive program does hold the logits
  assert fused_bytes <= naive_bytes / 4, (fused_bytes, naive_bytes)


def test_data_sharded_batch_matches_unsharded():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (emulated) devices")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  hidden, unembedding, tokens, weights = make_inputs(seed=12, dtype=np.float32, shape=(8, T, D, V))
  rows = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())

  def step(h, w, tok):
    def loss(h, w):
      outs = logprobs_from_hidden(
          h, w, tok, temperature=0.8, chunk_size=CHUNK, return_entropy=True
      )
      return weighted_sum(outs, weights), outs

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)

  sharded_args = (
      jax.device_put(hidden, rows),
      jax.device_put(unembedding, replicated),
      jax.device_put(tokens, rows),
  )
  compiled = jax.jit(step).lower(*sharded_args).compile()
  (value, outs), grads = compiled(*sharded_args)
  (ref_value, ref_outs), ref_grads = jax.jit(step)(hidden, unembedding, tokens)
  # B stays sharded through the scan: row-sharded outputs and hidden gradient, no all-gather.
  assert outs[0].sharding.is_equivalent_to(rows, 2)
  assert grads[0].sharding.is_equivalent_to(rows, 3)
  assert "all-gather" not in compiled.as_text()
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, ref in zip((*outs, *grads), (*ref_outs, *ref_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the final logit soft-cap


SOFTCAP = 1.5  # logits here are ~N(0, 5): well inside tanh's non-linear range


def test_softcap_matches_numpy_float64(x64):
  hidden, unembedding, tokens, _ = make_inputs(seed=12)
  logp, ent = fused_jit(hidden, unembedding, tokens, temperature=0.7, chunk_size=CHUNK,
                        return_entropy=True, softcap=SOFTCAP)
  ref_logp, ref_ent = np_logprobs_and_entropy(hidden, unembedding, tokens, 0.7, SOFTCAP)
  np.testing.assert_allclose(logp, ref_logp, atol=1e-9)
  np.testing.assert_allclose(ent, ref_ent, atol=1e-9)
  uncapped = np_logprobs_and_entropy(hidden, unembedding, tokens, 0.7)[0]
  assert np.abs(uncapped - ref_logp).max() > 0.1  # the cap matters at these logits


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softcap_value_and_grads_match_naive_float64(x64, temperature):
  hidden, unembedding, tokens, weights = make_inputs(seed=13)
  ((value, outs), grads), ((ref_value, ref_outs), ref_grads) = fused_and_naive_value_and_grads(
      hidden, unembedding, tokens, weights, temperature, softcap=SOFTCAP
  )
  np.testing.assert_allclose(value, ref_value, atol=1e-9)
  for g, r in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-9)


def test_softcap_grads_numerical_check(x64):
  hidden, unembedding, tokens, weights = make_inputs(seed=14, shape=(1, 4, 3, 5))
  w_lp, w_ent = jnp.asarray(weights[0]), jnp.asarray(weights[1])

  @jax.jit
  def f(h, w):
    logp, ent = logprobs_from_hidden(h, w, tokens, temperature=0.8, chunk_size=3,
                                     return_entropy=True, softcap=SOFTCAP)
    return w_lp * logp + w_ent * ent

  check_grads(f, (jnp.asarray(hidden), jnp.asarray(unembedding)), order=1, modes=("rev",))


# ---------------------------------------------------------------- bad input


def test_bad_inputs():
  hidden, unembedding, tokens, _ = make_inputs(dtype=np.float32)
  with pytest.raises(ValueError, match="hidden"):
    logprobs_from_hidden(hidden[0], unembedding, tokens)
  with pytest.raises(ValueError, match="unembedding"):
    logprobs_from_hidden(hidden, unembedding[0], tokens)
  with pytest.raises(ValueError, match="unembedding"):
    logprobs_from_hidden(hidden, unembedding[:, :-1], tokens)
  with pytest.raises(ValueError, match="tokens"):
    logprobs_from_hidden(hidden, unembedding, tokens[:, :-1])
  with pytest.raises(ValueError, match="tokens"):
    logprobs_from_hidden(hidden, unembedding, tokens.astype(np.float32))
  with pytest.raises(ValueError, match="temperature"):
    logprobs_from_hidden(hidden, unembedding, tokens, temperature=0.0)
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs_from_hidden(hidden, unembedding, tokens, chunk_size=0)
  with pytest.raises(ValueError, match="softcap"):
    logprobs_from_hidden(hidden, unembedding, tokens, softcap=0.0)
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs_from_hidden(hidden, unembedding, tokens, chunk_size=2.5)
