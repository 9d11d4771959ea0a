"""KV-cache decoding and `generate`: parity with the full forward pass, log-probs, stops, samples.

References are the full (uncached) forward pass `Transformer.__call__` and
`rljax.ops.logprobs.token_logprobs`, run on the tokens the sampler produced; sampling filters are
checked against a plain-numpy transcription of top-k / top-p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.models.config import ModelConfig
from rljax.models.kv_cache import forward_with_cache, init_kv_cache
from rljax.models.transformer import Transformer
from rljax.ops.logprobs import token_logprobs
from rljax.rollout.generate import _generate_jit, generate
from rljax.rollout.sampling import sample_next_token, top_p_keep
from rljax.train.compiles import count_compiles

CONFIG = ModelConfig(
  vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
  num_kv_heads=2, head_dim=8, attention_bias=True, qk_norm=True,
  rope_scaling={"rope_type": "linear", "factor": 2.0},
)
P, N = 6, 6
PROMPTS = np.array(
  [[0, 0, 0, 5, 9, 17], [3, 4, 5, 6, 7, 8], [63, 63, 21, 22, 40, 2]], np.int32
)
PROMPT_MASK = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)


def _make_model(config: ModelConfig, seed: int = 0) -> Transformer:
  """A tiny model with weights scaled up so that next-token distributions are far from uniform."""
  model = Transformer(config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return _make_model(CONFIG)


@nnx.jit
def _full_logits(m, ids, mask):
  return m(ids, mask)


def _generate(model, key=0, prompts=PROMPTS, **kw):
  options = dict(max_new_tokens=N, stop_tokens=(), pad_id=0, num_samples=2, temperature=1.0)
  options.update(kw)
  with jax.default_matmul_precision("highest"):
    return jax.device_get(generate(model, prompts, PROMPT_MASK, jax.random.key(key), **options))


def _teacher_forced_logits(model, out):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_full_logits(model, out.tokens, out.attention_mask))[:, P - 1 : -1]


# ---------------------------------------------------------------------------------------------
# (a) KV-cache logits == full forward logits, left-padded prompts, sliding window.
# ---------------------------------------------------------------------------------------------


@nnx.jit
def _cache_logits(m, prompt, mask, continuation):
  """Prefill, then one token per call, then the last two tokens in one call: [B, K+1, V]."""
  p, k = prompt.shape[1], continuation.shape[1]
  cache = init_kv_cache(m.config, prompt.shape[0], p + k)
  logits, cache = forward_with_cache(m, prompt, cache, 0, mask)
  prefill, out = logits, [logits[:, -1]]
  for t in range(k - 2):
    logits, cache = m.forward_with_cache(continuation[:, t : t + 1], cache, p + t)
    out.append(logits[:, 0])
  logits, cache = forward_with_cache(m, continuation[:, k - 2 :], cache, p + k - 2)
  return prefill, jnp.stack(out + [logits[:, 0], logits[:, 1]], axis=1)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_cache_logits_equal_full_forward(model, sliding_window):
  m = model if sliding_window is None else _make_model(
    CONFIG.replace(model_type="mistral", sliding_window=sliding_window, qk_norm=False), seed=1
  )
  continuation = np.asarray(jax.random.randint(jax.random.key(2), (3, 4), 0, 64), np.int32)
  ids = np.concatenate([PROMPTS, continuation], axis=1)
  mask = np.concatenate([PROMPT_MASK, np.ones_like(continuation, bool)], axis=1)
  with jax.default_matmul_precision("highest"):
    prefill, cached = _cache_logits(m, PROMPTS, PROMPT_MASK, continuation)
    full = np.asarray(_full_logits(m, ids, mask))
  assert np.abs(full).max() > 1.0  # logits are not trivially small
  np.testing.assert_allclose(np.asarray(prefill)[PROMPT_MASK], full[:, :P][PROMPT_MASK], atol=1e-5)
  np.testing.assert_allclose(cached, full[:, P - 1 :], atol=1e-5, rtol=1e-5)


def test_cache_index_out_of_range_is_named(model):
  cache = init_kv_cache(CONFIG, 3, 4)
  with pytest.raises(ValueError, match="index"):
    forward_with_cache(model, jnp.zeros((3, 2), jnp.int32), cache, 3)
  with pytest.raises(ValueError, match="cache"):
    forward_with_cache(model, jnp.zeros((2, 1), jnp.int32), cache, 0)


# ---------------------------------------------------------------------------------------------
# (b) rollout log-probs == teacher-forced token_logprobs; (e) contiguity; (f) determinism;
# (i) (graphdef, state) input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "options",
  [dict(temperature=1.0), dict(temperature=0.7, top_k=8, top_p=0.9)],
  ids=["T1", "T0.7-topk-topp"],
)
def test_logprobs_equal_teacher_forced(model, options):
  out = _generate(model, **options)
  temperature = options["temperature"]
  logits = _teacher_forced_logits(model, out)
  completion = out.tokens[:, P:]
  expected = np.asarray(token_logprobs(logits, completion, temperature=temperature))
  m = out.completion_mask
  assert m.all()  # no stop tokens: every row runs N steps
  np.testing.assert_allclose(out.logprobs[m], expected[m], atol=1e-5)
  assert (out.lengths == N).all() and not out.finished.any()
  if "top_k" in options:
    # Every sampled token is inside the top-k, then inside the top-p nucleus (numpy reference);
    # its reported log-prob is the untruncated one (checked above), below the renormalised one.
    z = logits / temperature
    for b in range(z.shape[0]):
      for t in range(N):
        order = np.argsort(-z[b, t], kind="stable")
        rank = int(np.where(order == completion[b, t])[0][0])
        assert rank < 8
        top = z[b, t][order[:8]]
        probs = np.exp(top - top.max()) / np.exp(top - top.max()).sum()
        assert probs[:rank].sum() < 0.9 + 1e-6
    assert (out.logprobs[m] < 0).all()


def test_samples_of_a_prompt_are_contiguous_and_prefill_is_shared(model):
  out = _generate(model)
  for i in range(3):
    for j in range(2):
      np.testing.assert_array_equal(out.tokens[2 * i + j, :P], PROMPTS[i])
      np.testing.assert_array_equal(out.prompt_mask[2 * i + j], PROMPT_MASK[i])
  assert any((out.tokens[2 * i, P:] != out.tokens[2 * i + 1, P:]).any() for i in range(3))
  # (The repeated prefill cache is checked by the teacher-forced log-probs of these rows.)


def test_deterministic_given_key_and_keys_differ(model):
  a, b, c = _generate(model, key=0), _generate(model, key=0), _generate(model, key=1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert (a.tokens != c.tokens).any()
  # A (graphdef, state) pair gives the same rollout as the module.
  pair = _generate(nnx.split(model), key=0)
  for x, y in zip(a, pair):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# (c) greedy == argmax of the full forward re-run step by step; (h) top_k=1 == greedy;
# (d) per-row stop, pad == eos.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(model):
  return _generate(model, temperature=0.0, num_samples=1)


def test_greedy_equals_step_by_step_full_forward_argmax(model, greedy):
  tokens = np.zeros((3, P + N), np.int32)
  mask = np.zeros((3, P + N), bool)
  tokens[:, :P], mask[:, :P] = PROMPTS, PROMPT_MASK
  for t in range(N):
    with jax.default_matmul_precision("highest"):
      logits = np.asarray(_full_logits(model, tokens, mask))[:, P - 1 + t]
    tokens[:, P + t], mask[:, P + t] = logits.argmax(-1), True
    # Greedy log-probs are the temperature-1 log-softmax of the chosen token.
    ref = logits[np.arange(3), tokens[:, P + t]] - np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(greedy.logprobs[:, t], ref, atol=1e-5)
  np.testing.assert_array_equal(greedy.tokens, tokens)
  assert len({tuple(r) for r in tokens[:, P:]}) > 1  # rows differ: the test is not vacuous


def test_per_row_stop_with_pad_equal_to_eos_and_top_k_one_is_greedy(model, greedy):
  completion = greedy.tokens[:, P:]
  eos = int(completion[0, 2])
  # top_k=1 at temperature 0.7 must choose the greedy tokens, and report the untruncated
  # temperature-0.7 log-probs (not log 1 = 0).
  out = _generate(
    model, temperature=0.7, top_k=1, num_samples=1, stop_tokens=[eos], pad_id=eos, key=5
  )
  logits = _teacher_forced_logits(model, out)
  tf_logprobs = np.asarray(token_logprobs(logits, out.tokens[:, P:], temperature=0.7))
  for b in range(3):
    hits = np.where(completion[b] == eos)[0]
    length = int(hits[0]) + 1 if hits.size else N
    assert out.lengths[b] == length and out.finished[b] == bool(hits.size)
    np.testing.assert_array_equal(out.completion_mask[b], np.arange(N) < length)
    np.testing.assert_array_equal(out.tokens[b, : P + length], greedy.tokens[b, : P + length])
    assert (out.tokens[b, P + length :] == eos).all()
    np.testing.assert_allclose(out.logprobs[b, :length], tf_logprobs[b, :length], atol=1e-5)
    assert (out.logprobs[b, length:] == 0).all()
  assert out.lengths[0] <= 3 and out.finished[0]
  assert out.completion_mask[0, out.lengths[0] - 1]  # the stop token itself is inside the mask


# ---------------------------------------------------------------------------------------------
# (g) no recompilation for the same shapes and options.
# ---------------------------------------------------------------------------------------------


def test_same_shapes_and_options_compile_once(model):
  _generate(model, key=0)  # compiles unless an earlier test already did
  size = _generate_jit._cache_size()
  with count_compiles() as compiles:
    with jax.default_matmul_precision("highest"):  # part of the jit cache key, as in _generate
      again = generate(
        model, (PROMPTS + 1) % 64, ~PROMPT_MASK, jax.random.key(3),
        max_new_tokens=N, stop_tokens=(), pad_id=0, num_samples=2,
      )
    jax.block_until_ready(again)
  assert compiles.count == 0 and _generate_jit._cache_size() == size
  with count_compiles() as compiles:
    jax.jit(lambda x: x * 3)(np.zeros(17))  # the counter does see a new program
  assert compiles.count == 1


def test_bf16_model_and_every_row_stopping_at_once():
  bf16 = _make_model(CONFIG.replace(dtype=jnp.bfloat16), seed=3)
  out = generate(
    bf16, PROMPTS, PROMPT_MASK, jax.random.key(0),
    max_new_tokens=4, stop_tokens=tuple(range(64)), pad_id=1, temperature=1.0,
  )
  # Every token is a stop token: all rows stop after one token, the loop exits at once.
  assert (np.asarray(out.lengths) == 1).all() and np.asarray(out.finished).all()
  assert (np.asarray(out.tokens[:, P + 1 :]) == 1).all()
  assert (np.asarray(out.logprobs[:, 1:]) == 0).all()
  assert out.logprobs.dtype == jnp.float32 and np.isfinite(np.asarray(out.logprobs)).all()
  assert (np.asarray(out.logprobs[:, 0]) < 0).all()


# ---------------------------------------------------------------------------------------------
# Sampler: top-k / top-p against numpy, greedy limits (h), frequencies.
# ---------------------------------------------------------------------------------------------


def _numpy_nucleus(logits: np.ndarray, top_k: int | None, top_p: float | None) -> set[int]:
  order = np.argsort(-logits, kind="stable")
  if top_k is not None:
    order = order[:top_k]
  probs = np.exp(logits[order] - logits[order].max())
  probs /= probs.sum()
  kept, mass = [], 0.0
  for token, prob in zip(order, probs):
    if top_p is not None and mass >= top_p:
      break
    kept.append(int(token))
    mass += prob
  return set(kept)


_sample_many = jax.jit(
  jax.vmap(
    lambda logits, key, k, p: sample_next_token(logits, key, temperature=0.8, top_k=k, top_p=p),
    in_axes=(None, 0, None, None),
  ),
  static_argnums=(2, 3),
)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 4.0))
def test_top_k_top_p_support_matches_numpy(seed, scale):
  logits = np.asarray(scale * jax.random.normal(jax.random.key(seed), (1, 12)), np.float32)
  keys = jax.random.split(jax.random.key(seed + 1), 400)
  tokens, logps = _sample_many(logits, keys, 5, 0.7)
  allowed = _numpy_nucleus(logits[0] / 0.8, 5, 0.7)
  assert set(np.asarray(tokens).ravel().tolist()) <= allowed
  z = logits[0] / 0.8
  ref = z - np.log(np.exp(z).sum())
  np.testing.assert_allclose(np.asarray(logps)[:, 0], ref[np.asarray(tokens)[:, 0]], atol=1e-5)


def test_top_k_frequencies_match_renormalised_probs():
  logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0, 3.0]], np.float32)
  tokens, _ = _sample_many(logits, jax.random.split(jax.random.key(0), 4000), 3, None)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=6) / 4000
  z = logits[0] / 0.8
  expected = np.zeros(6)
  top = [5, 0, 1]
  expected[top] = np.exp(z[top]) / np.exp(z[top]).sum()
  np.testing.assert_allclose(counts, expected, atol=0.03)


def test_tiny_top_p_and_top_k_one_are_greedy():
  logits = np.asarray(jax.random.normal(jax.random.key(3), (8, 50)), np.float32)
  for k, p in ((1, None), (None, 1e-6)):
    sample = jax.jit(lambda x, key: sample_next_token(x, key, temperature=1.3, top_k=k, top_p=p))
    tokens, logps = sample(logits, jax.random.key(1))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    np.testing.assert_allclose(
      logps, np.asarray(token_logprobs(logits[:, None], tokens[:, None], temperature=1.3))[:, 0]
    )


def test_top_p_keep_numpy_reference():
  logits = np.sort(np.asarray(jax.random.normal(jax.random.key(4), (4, 10))), -1)[:, ::-1]
  for p in (0.05, 0.5, 0.9, 1.0):
    keep = np.asarray(jax.jit(top_p_keep)(jnp.asarray(logits.copy()), p))
    for b in range(4):
      assert set(np.where(keep[b])[0]) == _numpy_nucleus(logits[b], None, p)


# ---------------------------------------------------------------------------------------------
# (j) bad inputs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "change, name",
  [
    (dict(prompt_tokens=PROMPTS[0]), "prompt_tokens"),
    (dict(prompt_tokens=PROMPTS.astype(np.float32)), "prompt_tokens"),
    (dict(prompt_mask=PROMPT_MASK[:, 1:]), "prompt_mask"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), "key"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_samples=0), "num_samples"),
    (dict(stop_tokens=["a"]), "stop_tokens"),
    (dict(stop_tokens=[3, CONFIG.vocab_size]), r"stop_tokens.*\[0, 64\)"),
    (dict(pad_id=-1), "pad_id"),
    (dict(pad_id=CONFIG.vocab_size), r"pad_id.*\[0, 64\).*got 64"),
    (dict(prompt_tokens=np.where(PROMPTS == 9, 64, PROMPTS)), r"prompt_tokens.*got 64 at row 0"),
    (dict(prompt_tokens=jnp.asarray(np.where(PROMPTS == 40, -3, PROMPTS))),
     r"prompt_tokens.*got -3 at row 2, column 4"),
    (dict(model="not a model"), "model"),
    (dict(model=nnx.Linear(2, 2, rngs=nnx.Rngs(0))), "model"),
  ],
)
def test_bad_inputs_name_the_argument(model, change, name):
  args = dict(
    model=model, prompt_tokens=PROMPTS, prompt_mask=PROMPT_MASK, key=jax.random.key(0),
    max_new_tokens=2, stop_tokens=(), pad_id=0,
  )
  args.update(change)
  with pytest.raises(ValueError, match=name):
    generate(**args)


def test_padding_ids_of_prompts_are_never_read(model):
  """Any id (>= V, negative) in the prompts' padding slots gives the rollout of pad id 0."""
  garbage = np.where(PROMPT_MASK, PROMPTS, np.array([64, -1, 2**31 - 1])[:, None])
  out = _generate(model, 3, garbage)  # the options of the other tests: no new compile
  valid = _generate(model, 3, np.where(PROMPT_MASK, PROMPTS, 0))
  np.testing.assert_array_equal(out.tokens[:, P:], valid.tokens[:, P:])
  np.testing.assert_array_equal(out.logprobs, valid.logprobs)
  assert np.all(np.isfinite(out.logprobs))


def test_inverse_cdf_draw_matches_numpy_float64():
  """`_categorical` against the float64 inverse CDF at the same uniforms: the first token whose
  cumulative probability exceeds u (−inf logits never drawn; blocks of 128 and a ragged tail)."""
  from rljax.rollout.sampling import _categorical, _uniform, request_keys

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 300)) * 3
  logits[rng.random(logits.shape) < 0.3] = -np.inf
  logits[:, 0] = 0.0  # every row keeps some mass
  keys = request_keys(jax.random.key(5), jnp.arange(64), 3)
  tokens = np.asarray(jax.jit(_categorical)(keys, jnp.asarray(logits, jnp.float32)))
  u = np.asarray(jax.jit(_uniform, static_argnums=1)(keys, 64), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  cdf = np.cumsum(p, -1) / p.sum(-1, keepdims=True)
  expected = (cdf <= u[:, None]).sum(-1)
  near = np.abs(cdf - u[:, None]).min(-1) < 1e-5  # float32 rounding may move a boundary draw
  assert np.isfinite(logits[np.arange(64), tokens]).all()
  np.testing.assert_array_equal(tokens[~near], expected[~near])


def test_full_vocabulary_frequencies_match_softmax():
  logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0, 3.0, -np.inf]], np.float32)
  tokens, _ = _sample_many(logits, jax.random.split(jax.random.key(1), 4000), None, None)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=7) / 4000
  z = logits[0] / 0.8
  np.testing.assert_allclose(counts, np.exp(z) / np.exp(z).sum(), atol=0.03)
