"""Tests for rljax.ops.logprobs: token log-probs, entropy, sequence log-probs, causal shift."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rljax.ops import logprobs as eager
from rljax.ops.logprobs import shift_for_next_token

B, T, V = 2, 5, 7

# Most tests call jitted versions, so each (shape, dtype, option) compiles once for the whole
# file; the eager functions are compared with these in the jit-vs-eager tests.
token_logprobs = jax.jit(eager.token_logprobs, static_argnames="temperature")
entropy_from_logits = jax.jit(eager.entropy_from_logits, static_argnames="temperature")
sequence_logprobs = jax.jit(eager.sequence_logprobs, static_argnames="average")


# ---------------------------------------------------------------- numpy references (float64)


def np_log_softmax_row(z):
  z = np.asarray(z, np.float64)
  m = max(z)
  lse = m + math.log(sum(math.exp(x - m) for x in z))
  return np.array([x - lse for x in z])


def np_token_logprobs(logits, tokens, temperature=1.0):
  logits = np.asarray(logits, np.float64)
  out = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      out[b, t] = np_log_softmax_row(logits[b, t] / temperature)[tokens[b, t]]
  return out


def np_entropy(logits, temperature=1.0):
  logits = np.asarray(logits, np.float64)
  out = np.zeros(logits.shape[:2])
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      logp = np_log_softmax_row(logits[b, t] / temperature)
      out[b, t] = -sum(math.exp(lp) * lp for lp in logp if math.exp(lp) > 0)
  return out


def np_sequence_logprobs(logps, mask, average=False):
  out = np.zeros(logps.shape[0])
  for b in range(logps.shape[0]):
    total = sum(float(logps[b, t]) * float(mask[b, t]) for t in range(logps.shape[1]) if mask[b, t])
    count = sum(float(mask[b, t]) for t in range(logps.shape[1]))
    out[b] = (total / count if count else 0.0) if average else total
  return out


def make_inputs(seed=0, dtype=np.float64, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((B, T, V))).astype(dtype)
  tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
  return logits, tokens


# ---------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_token_logprobs_matches_numpy_float64(x64, temperature):
  logits, tokens = make_inputs()
  got = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature=temperature)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, np_token_logprobs(logits, tokens, temperature), atol=1e-6)


def test_token_logprobs_float32_and_bf16():
  logits, tokens = make_inputs(dtype=np.float32)
  got = token_logprobs(logits, tokens, temperature=0.7)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_token_logprobs(logits, tokens, 0.7), rtol=1e-5, atol=1e-5)
  low = jnp.asarray(logits, jnp.bfloat16)
  got = token_logprobs(low, tokens, temperature=0.7)
  assert got.dtype == jnp.float32  # promoted for the vocabulary reduction
  assert np.all(np.isfinite(got))
  # bf16 -> f32 is exact, so the only error is float32 rounding of the reduction.
  ref = np_token_logprobs(np.asarray(low.astype(jnp.float32)), tokens, 0.7)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradient(x64):
  logits, tokens = make_inputs(seed=1)
  logits = jnp.asarray(logits)
  check_grads(lambda z: token_logprobs(z, tokens, temperature=0.7), (logits,), order=1, modes=("rev",))
  # Analytic: d logp[b,t] / d logits[b,t,v] = (1[v = token] - softmax(logits/τ)_v) / τ.
  weights = jnp.asarray(np.random.default_rng(2).standard_normal((B, T)))
  grad = jax.grad(lambda z: jnp.sum(weights * token_logprobs(z, tokens, temperature=0.7)))(logits)
  expected = np.zeros((B, T, V))
  for b in range(B):
    for t in range(T):
      p = np.exp(np_log_softmax_row(np.asarray(logits[b, t]) / 0.7))
      onehot = np.eye(V)[tokens[b, t]]
      expected[b, t] = float(weights[b, t]) * (onehot - p) / 0.7
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_token_logprobs_jit_equals_eager():
  logits, tokens = make_inputs(dtype=np.float32)
  jitted = jax.jit(eager.token_logprobs, static_argnames="temperature")
  np.testing.assert_allclose(
      jitted(logits, tokens, temperature=0.5), eager.token_logprobs(logits, tokens, temperature=0.5),
      rtol=1e-6, atol=1e-6,
  )


def test_token_logprobs_leading_dims_and_clipped_ids():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2, 3, 4, V)).astype(np.float32)
  tokens = rng.integers(0, V, size=(2, 3, 4))
  got = token_logprobs(logits, tokens)
  flat = token_logprobs(logits.reshape(6, 4, V), tokens.reshape(6, 4))
  np.testing.assert_allclose(got.reshape(6, 4), flat, rtol=1e-6)
  # Documented: ids outside [0, V) are clipped into range (finite; to be masked by the caller).
  padded = np.full((2, 3, 4), -100)
  np.testing.assert_allclose(token_logprobs(logits, padded), token_logprobs(logits, 0 * padded))
  np.testing.assert_allclose(
      token_logprobs(logits, padded + 10**6), token_logprobs(logits, padded * 0 + V - 1)
  )


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 50.0), temperature=st.floats(0.1, 10.0))
def test_token_logprobs_properties(seed, scale, temperature):
  rng = np.random.default_rng(seed)
  row = (scale * rng.standard_normal(V)).astype(np.float32)
  logits = np.tile(row, (V, 1))[None]  # [1, V, V]: every position has the same distribution
  every_token = np.arange(V)[None]
  # Eager calls: a drawn temperature is an operand of a cached kernel, not a recompile.
  logp = eager.token_logprobs(logits, every_token, temperature=temperature)
  assert np.all(logp <= 1e-6)
  np.testing.assert_allclose(np.sum(np.exp(logp)), 1.0, rtol=1e-5)  # a distribution
  # Temperature divides the logits.
  cooled = eager.token_logprobs(logits / temperature, every_token)
  np.testing.assert_allclose(logp, cooled, rtol=1e-4, atol=1e-4)
  # Invariant to adding a constant to all logits of a position.
  shifted = eager.token_logprobs(logits + 17.0, every_token, temperature=temperature)
  np.testing.assert_allclose(logp, shifted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_extreme_logits_finite(dtype):
  logits = np.zeros((B, T, V), np.float32)
  logits[..., 0] = 1e4
  logits[..., 1] = -1e4
  logits = jnp.asarray(logits, dtype)
  tokens = jnp.asarray(np.tile([0, 1, 2, 0, 1], (B, 1)))
  value = token_logprobs(logits, tokens)
  assert np.all(np.isfinite(value))
  big = float(logits[0, 0, 0])  # 1e4 rounded to the dtype (9984 in bf16)
  np.testing.assert_allclose(value[:, 0], 0.0, atol=1e-3)  # the dominant token
  np.testing.assert_allclose(value[:, 1], -2 * big, rtol=1e-6)
  np.testing.assert_allclose(value[:, 2], -big, rtol=1e-6)
  grad = jax.grad(lambda z: jnp.sum(token_logprobs(z, tokens)))(logits)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_token_logprobs_bad_inputs():
  logits, tokens = make_inputs(dtype=np.float32)
  with pytest.raises(ValueError, match="tokens"):
    token_logprobs(logits, tokens[:, :-1])
  with pytest.raises(ValueError, match="tokens"):
    token_logprobs(logits, tokens.astype(np.float32))
  with pytest.raises(ValueError, match="temperature"):
    token_logprobs(logits, tokens, temperature=0.0)
  with pytest.raises(ValueError, match="temperature"):
    token_logprobs(logits, tokens, temperature=-1.0)
  with pytest.raises(ValueError, match="logits"):
    token_logprobs(logits[0, 0], tokens[0, 0])


# ---------------------------------------------------------------- entropy_from_logits


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_matches_numpy_float64(x64, temperature):
  logits, _ = make_inputs(seed=4)
  got = entropy_from_logits(jnp.asarray(logits), temperature=temperature)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, np_entropy(logits, temperature), atol=1e-6)


def test_entropy_float32_and_bf16():
  logits, _ = make_inputs(seed=5, dtype=np.float32)
  np.testing.assert_allclose(entropy_from_logits(logits), np_entropy(logits), rtol=1e-5, atol=1e-5)
  low = jnp.asarray(logits, jnp.bfloat16)
  got = entropy_from_logits(low)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
  ref = np_entropy(np.asarray(low.astype(jnp.float32)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_entropy_gradient(x64):
  logits, _ = make_inputs(seed=6)
  logits = jnp.asarray(logits)
  check_grads(lambda z: entropy_from_logits(z, temperature=1.3), (logits,), order=1, modes=("rev",))
  # Analytic: dH/dz_v = -p_v (log p_v + H).
  grad = jax.grad(lambda z: jnp.sum(entropy_from_logits(z)))(logits)
  for b in range(B):
    for t in range(T):
      logp = np_log_softmax_row(np.asarray(logits[b, t]))
      ent = -np.sum(np.exp(logp) * logp)
      np.testing.assert_allclose(grad[b, t], -np.exp(logp) * (logp + ent), atol=1e-6)


def test_entropy_jit_equals_eager():
  logits, _ = make_inputs(dtype=np.float32)
  jitted = jax.jit(eager.entropy_from_logits, static_argnames="temperature")
  np.testing.assert_allclose(
      jitted(logits, temperature=0.9), eager.entropy_from_logits(logits, temperature=0.9),
      rtol=1e-6, atol=1e-6,
  )


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 100.0), temperature=st.floats(0.1, 10.0))
def test_entropy_properties(seed, scale, temperature):
  logits, _ = make_inputs(seed=seed, dtype=np.float32, scale=scale)
  ent = eager.entropy_from_logits(logits, temperature=temperature)
  assert np.all(ent >= -1e-6) and np.all(ent <= math.log(V) + 1e-5)
  np.testing.assert_allclose(ent, eager.entropy_from_logits(logits / temperature), rtol=1e-4, atol=1e-4)


def test_entropy_uniform_and_point_mass():
  np.testing.assert_allclose(entropy_from_logits(np.zeros((B, T, V))), math.log(V), rtol=1e-6)
  point = np.full((B, T, V), -1e4, np.float32)
  point[..., 3] = 1e4
  np.testing.assert_allclose(entropy_from_logits(point), 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_entropy_extreme_logits_finite(dtype):
  rng = np.random.default_rng(7)
  logits = jnp.asarray(1e4 * np.sign(rng.standard_normal((B, T, V))), dtype)
  ent, grad = jax.value_and_grad(lambda z: jnp.sum(entropy_from_logits(z)))(logits)
  assert np.isfinite(ent) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_entropy_masked_vocabulary_entries():
  # -inf logits (a banned token) contribute 0·log 0 = 0; values and gradients stay finite.
  logits, _ = make_inputs(seed=8, dtype=np.float32)
  banned = logits.copy()
  banned[..., -2:] = -np.inf
  ent, grad = jax.value_and_grad(lambda z: jnp.sum(entropy_from_logits(z)))(jnp.asarray(banned))
  assert np.isfinite(ent) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(entropy_from_logits(banned), np_entropy(logits[..., :-2]), rtol=1e-5)


def test_entropy_bad_inputs():
  logits, _ = make_inputs(dtype=np.float32)
  with pytest.raises(ValueError, match="temperature"):
    entropy_from_logits(logits, temperature=0)
  with pytest.raises(ValueError, match="logits"):
    entropy_from_logits(logits[0, 0])


# ---------------------------------------------------------------- sequence_logprobs


def make_logps_and_mask(seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  logps = -np.abs(rng.standard_normal((B, T))).astype(dtype) * 3
  mask = (rng.uniform(size=(B, T)) < 0.7).astype(dtype)
  mask[0, :] = 0  # an all-zero row
  mask[1, 0] = 1
  return logps, mask


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_numpy_float64(x64, average):
  logps, mask = make_logps_and_mask()
  got = sequence_logprobs(jnp.asarray(logps), jnp.asarray(mask), average=average)
  assert got.shape == (B,) and got.dtype == jnp.float64
  np.testing.assert_allclose(got, np_sequence_logprobs(logps, mask, average), atol=1e-6)
  weights = mask * 0.5  # float weights act as weights
  np.testing.assert_allclose(
      sequence_logprobs(jnp.asarray(logps), jnp.asarray(weights), average=average),
      np_sequence_logprobs(logps, weights, average), atol=1e-6,
  )


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_float32_bf16_and_bool_mask(average):
  logps, mask = make_logps_and_mask(seed=1, dtype=np.float32)
  ref = np_sequence_logprobs(logps, mask, average)
  got = sequence_logprobs(logps, mask.astype(bool), average=average)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  got = sequence_logprobs(jnp.asarray(logps, jnp.bfloat16), mask, average=average)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_gradient(x64, average):
  logps, mask = make_logps_and_mask(seed=2)
  mask = jnp.asarray(mask)
  check_grads(lambda x: sequence_logprobs(x, mask, average=average), (jnp.asarray(logps),), order=1)
  grad = jax.grad(lambda x: jnp.sum(sequence_logprobs(x, mask, average=average)))(jnp.asarray(logps))
  counts = np.maximum(np.asarray(mask).sum(-1, keepdims=True), 1)
  expected = np.asarray(mask) / counts if average else np.asarray(mask)
  np.testing.assert_allclose(grad, expected, atol=1e-12)


def test_sequence_logprobs_jit_equals_eager():
  logps, mask = make_logps_and_mask(dtype=np.float32)
  jitted = jax.jit(eager.sequence_logprobs, static_argnames="average")
  for average in (False, True):
    np.testing.assert_allclose(
        jitted(logps, mask, average=average),
        eager.sequence_logprobs(logps, mask, average=average),
        rtol=1e-6,
    )


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_sequence_logprobs_properties(seed):
  logps, mask = make_logps_and_mask(seed=seed, dtype=np.float32)
  total = sequence_logprobs(logps, mask)
  mean = sequence_logprobs(logps, mask, average=True)
  np.testing.assert_allclose(mean * mask.sum(-1), total, rtol=1e-5, atol=1e-5)
  assert np.all(total <= 0) and np.all(mean <= 0)  # log-probs are <= 0
  # Additive over a split of the mask.
  rng = np.random.default_rng(seed)
  part = mask * (rng.uniform(size=mask.shape) < 0.5)
  np.testing.assert_allclose(
      sequence_logprobs(logps, part) + sequence_logprobs(logps, mask - part), total,
      rtol=1e-5, atol=1e-5,
  )


def test_sequence_logprobs_degenerate():
  logps, mask = make_logps_and_mask(dtype=np.float32)
  logps[mask == 0] = -np.inf  # masked positions never leak
  for average in (False, True):
    loss = lambda x: jnp.sum(sequence_logprobs(x, mask, average=average))  # noqa: E731
    values, grad = jax.value_and_grad(loss)(logps)
    assert np.isfinite(values) and np.all(np.isfinite(grad))
    assert sequence_logprobs(logps, mask, average=average)[0] == 0.0  # all-zero row gives 0


def test_sequence_logprobs_bad_inputs():
  logps, mask = make_logps_and_mask(dtype=np.float32)
  with pytest.raises(ValueError, match="mask"):
    sequence_logprobs(logps, mask[:, :-1])
  with pytest.raises(ValueError, match="token_logps"):
    sequence_logprobs(np.float32(1.0), np.float32(1.0))


# ---------------------------------------------------------------- shift_for_next_token


def test_shift_for_next_token_aligns_with_numpy_reference(x64):
  rng = np.random.default_rng(9)
  logits = rng.standard_normal((B, T, V))
  input_ids = rng.integers(0, V, size=(B, T))
  mask = rng.uniform(size=(B, T)) < 0.5
  shifted_logits, targets, shifted_mask = shift_for_next_token(logits, input_ids, mask)
  assert shifted_logits.shape == (B, T - 1, V) and targets.shape == (B, T - 1)
  np.testing.assert_array_equal(shifted_mask, mask[:, 1:])
  got = token_logprobs(jnp.asarray(shifted_logits), jnp.asarray(targets))
  for b in range(B):
    for t in range(T - 1):  # position t predicts the next id
      expected = np_log_softmax_row(logits[b, t])[input_ids[b, t + 1]]
      assert abs(float(got[b, t]) - expected) < 1e-6
  assert shift_for_next_token(logits, input_ids)[2] is None


def test_shift_for_next_token_gradient_and_jit():
  logits, tokens = make_inputs(dtype=np.float32)

  def loss(z):
    shifted, targets, _ = shift_for_next_token(z, tokens)
    return jnp.sum(token_logprobs(shifted, targets))

  grad = jax.grad(loss)(jnp.asarray(logits))
  assert np.all(grad[:, -1] == 0) and np.all(np.isfinite(grad))  # the last position predicts nothing
  np.testing.assert_allclose(jax.jit(loss)(logits), loss(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(logits), grad, rtol=1e-6, atol=1e-7)


def test_shift_for_next_token_bad_inputs():
  logits, tokens = make_inputs(dtype=np.float32)
  with pytest.raises(ValueError, match="input_ids"):
    shift_for_next_token(logits, tokens[:, 1:])
  with pytest.raises(ValueError, match="mask"):
    shift_for_next_token(logits, tokens, tokens[:, 1:])
  with pytest.raises(ValueError, match="logits"):
    shift_for_next_token(logits[:, :1], tokens[:, :1])
  with pytest.raises(ValueError, match="logits"):
    shift_for_next_token(logits[0, 0], tokens[0, 0])
