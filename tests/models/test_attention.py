"""The blockwise (flash) attention core against the naive reference: values, gradients, every
mask feature, both schedules, dtypes, jit == eager, and its linear memory."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models import attention as A
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer, positions_from_mask

B, H, KV, DH = 2, 4, 2, 8


def _inputs(t: int, seed: int = 0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, t, H, DH), dtype)
  k = jax.random.normal(ks[1], (B, t, KV, DH), dtype)
  v = jax.random.normal(ks[2], (B, t, KV, DH), dtype)
  w = jax.random.normal(ks[3], (B, t, H, DH), jnp.float32)
  mask = np.ones((B, t), bool)
  mask[0, t - t // 5 :] = False  # right padding
  mask[1, : t // 3] = False  # left padding
  mask = jnp.asarray(mask)
  return q, k, v, w, mask, positions_from_mask(mask)


def _dense_mask(mask, positions, segment_ids, window):
  return A.causal_attention_mask(mask, positions, positions, sliding_window=window,
                                 segment_ids=segment_ids)


def _pair(t, block, *, window=None, softcap=None, scale=None, segments=False, dtype=jnp.float32):
  """(blockwise, naive) outputs and gradients of sum(out * w) over the queries that see a key."""
  q, k, v, w, mask, positions = _inputs(t, dtype=dtype)
  segment_ids = jnp.asarray(np.arange(t)[None] // 11 + np.zeros((B, 1), int)) if segments else None
  dense = _dense_mask(mask, positions, segment_ids, window)
  sees = jnp.any(dense, axis=-1)[..., None, None]

  def blockwise(q, k, v):
    return A.blockwise_attention(q, k, v, mask, positions, segment_ids, sliding_window=window,
                                 softcap=softcap, scale=scale, block_size=block)

  def naive(q, k, v):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return A.naive_attention(*f32, dense, softcap=softcap, scale=scale)

  def value_and_grad(f):  # one compile: the output rides along as the loss's aux
    def loss(q, k, v):
      out = f(q, k, v)
      return jnp.sum(jnp.where(sees, out.astype(jnp.float32) * w, 0.0)), out

    return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)[::-1]

  return value_and_grad(blockwise), value_and_grad(naive), sees


def _assert_close(got, want, sees, atol):
  (out, grads), (ref_out, ref_grads) = got, want
  np.testing.assert_allclose(np.where(sees, out, 0.0).astype(np.float32),
                             np.where(sees, ref_out, 0.0), atol=atol, rtol=atol)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=atol, rtol=atol)


def test_blockwise_equals_naive_values_and_gradients():
  """3 blocks by diagonals, T = 45 padded to a multiple of the block."""
  got, want, sees = _pair(45, 16)
  _assert_close(got, want, sees, atol=1e-5)


@pytest.mark.parametrize(
  "t, block",
  [(45, 16), (17 * 8, 8)],  # 17 blocks > _MAX_DIAGONAL_BLOCKS: the lax-loop schedule
)
def test_blockwise_masks_windows_segments_softcap_and_scale(t, block):
  """Packed segments, a sliding window (in positions), Gemma's soft-cap and a custom scale,
  together, on left- and right-padded rows."""
  got, want, sees = _pair(t, block, window=13, softcap=3.0, scale=0.3, segments=True)
  _assert_close(got, want, sees, atol=1e-5)


def test_blockwise_bfloat16_is_close_to_the_float32_reference():
  got, want, sees = _pair(32, 16, dtype=jnp.bfloat16)
  assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
  _assert_close(got, want, sees, atol=5e-2)


def test_blockwise_jit_equals_eager_and_hidden_queries_get_zero():
  q, k, v, _, mask, positions = _inputs(32)
  eager = A.blockwise_attention(q, k, v, mask, positions, block_size=16)
  jitted = jax.jit(lambda *a: A.blockwise_attention(*a, block_size=16))(q, k, v, mask, positions)
  np.testing.assert_allclose(eager, jitted, atol=1e-6)
  # Row 1 is left-padded: its first queries see no key at all.
  np.testing.assert_array_equal(eager[1, : 32 // 3], 0.0)


def test_garbage_at_hidden_keys_reaches_neither_values_nor_gradients():
  """Huge values at masked key slots change nothing the visible queries read."""
  q, k, v, w, mask, positions = _inputs(45)
  hidden = ~mask[:, :, None, None]
  k2, v2 = jnp.where(hidden, 1e4, k), jnp.where(hidden, -1e4, v)

  def loss(q, k, v):
    out = A.blockwise_attention(q, k, v, mask, positions, block_size=16)
    return jnp.sum(jnp.where(mask[..., None, None], out * w, 0.0))

  value_and_grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  (l1, g1), (l2, g2) = value_and_grad(q, k, v), value_and_grad(q, k2, v2)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(jnp.where(mask[:, :, None, None], a, 0.0),
                               jnp.where(mask[:, :, None, None], b, 0.0), atol=1e-5)


def _largest_intermediate(fn, *args) -> int:
  """The most elements of any array in `fn`'s jaxpr (sub-jaxprs included)."""
  largest = 0

  def visit(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        largest = max(largest, int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return largest


@pytest.mark.parametrize("diagonal_limit", [16, 0])
def test_blockwise_builds_no_array_of_b_t_s_elements(monkeypatch, diagonal_limit):
  """Forward and backward of a window + segments call: nothing as large as B·T·S (the dense
  mask alone would be), in either schedule; the naive path does build one."""
  monkeypatch.setattr(A, "_MAX_DIAGONAL_BLOCKS", diagonal_limit)
  t = 512
  q, k, v, w, mask, positions = _inputs(t)
  segment_ids = jnp.zeros((B, t), jnp.int32)

  def loss(q, k, v):
    out = A.blockwise_attention(q, k, v, mask, positions, segment_ids, sliding_window=100,
                                block_size=32)
    return jnp.sum(out * w)

  largest = _largest_intermediate(jax.value_and_grad(loss, (0, 1, 2)), q, k, v)
  assert largest < B * t * t, largest
  naive = lambda q, k, v: jnp.sum(A.naive_attention(q, k, v, _dense_mask(mask, positions, None, None)) * w)
  assert _largest_intermediate(jax.grad(naive), q, k, v) >= B * t * t


def test_blockwise_training_memory_grows_linearly_in_t(monkeypatch):
  """Compiled temp memory of forward + backward at 4x the tokens: ~4x for blockwise (linear),
  ~16x for the naive path (quadratic; 9.6x at these sizes, where linear terms still count)."""
  monkeypatch.setattr(A, "_MAX_DIAGONAL_BLOCKS", 0)  # the long-sequence schedule: one compile size

  def temp_bytes(impl, t):
    q, k, v, w, mask, positions = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(8))
    shapes = [jax.ShapeDtypeStruct((1, t, *x.shape[2:]), x.dtype) for x in (q, k, v, w)]
    m = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def loss(q, k, v, w, mask):
      positions = positions_from_mask(mask)
      if impl == "naive":
        out = A.naive_attention(q, k, v, A.causal_attention_mask(mask, positions, positions))
      else:
        out = A.blockwise_attention(q, k, v, mask, positions, block_size=32)
      return jnp.sum(out * w)

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*shapes, m).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  blockwise = temp_bytes("blockwise", 2048) / temp_bytes("blockwise", 512)
  naive = temp_bytes("naive", 2048) / temp_bytes("naive", 512)
  assert blockwise < 4.5, blockwise
  assert naive > 8, naive


def test_model_logits_and_gradients_equal_under_both_implementations():
  """`ModelConfig.attention` changes the program, not the function (left-padded rows)."""
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, qk_norm=True, attention_block=16)
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jax.random.randint(jax.random.key(1), (2, 32), 1, 64)
  mask = jnp.ones((2, 32), bool).at[1, :9].set(False)

  def loss(s, impl):
    m = nnx.merge(graphdef, s)
    m.config = m.layers.config = config.replace(attention=impl)
    logits = m(ids, mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, logits1), g1 = value_and_grad(state, "blockwise")
  (_, logits2), g2 = value_and_grad(state, "naive")
  np.testing.assert_allclose(jnp.where(mask[..., None], logits1, 0),
                             jnp.where(mask[..., None], logits2, 0), atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_attention_config_is_validated_at_construction():
  base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match="`attention` .flash.; valid choices"):
    ModelConfig(**base, attention="flash")
  with pytest.raises(ValueError, match="attention_block"):
    ModelConfig(**base, attention_block=0)
  q, k, v, _, mask, positions = _inputs(8)
  with pytest.raises(ValueError, match="need S = 8"):
    A.blockwise_attention(q, k, v[:, :4], mask, positions)
  with pytest.raises(ValueError, match="more than the 4 keys"):
    A.blockwise_attention(q, k[:, :4], v[:, :4], mask[:, :4], positions[:, :4])
  with pytest.raises(ValueError, match="query_offset 3"):
    A.blockwise_attention(q[:, :6], k, v, mask, positions, query_offset=3)
  for bad, name in ((dict(block_size=0), "block_size"), (dict(softcap=0.0), "softcap"),
                    (dict(scale=-1.0), "scale"), (dict(sliding_window=0), "sliding_window")):
    with pytest.raises(ValueError, match=name):
      A.blockwise_attention(q, k, v, mask, positions, **bad)


def test_packed_row_equals_its_sequences_run_alone():
  """A row packing two sequences (segment ids, positions restarting per segment, right
  padding) gives each sequence the logits it gets alone: attention never crosses segments.
  (The naive path's segments: the packed objectives' tests, `tests/train`.)"""
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, attention="blockwise", attention_block=4)
  model = Transformer(config, rngs=nnx.Rngs(0))
  a, b = (jax.random.randint(jax.random.key(i), (1, n), 1, 64) for i, n in ((1, 5), (2, 7)))
  ids = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segments = jnp.asarray([[0] * 5 + [1] * 7 + [2] * 4])
  mask = jnp.asarray([[1] * 12 + [0] * 4])
  packed = model(ids, mask, segment_ids=segments)
  np.testing.assert_allclose(packed[:, :5], model(a), atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:12], model(b), atol=1e-5)
  with pytest.raises(ValueError, match="segment_ids shape"):
    model(ids, mask, segment_ids=segments[:, :8])


def test_query_chunks_at_an_offset_equal_the_rows_self_attention():
  """Queries of slots o..o+T-1 against all S keys (a prefill chunk, a context-parallel shard):
  the chunks, at a traced offset (one compile), reassemble the full self-attention."""
  q, k, v, _, mask, positions = _inputs(48)
  segments = jnp.asarray(np.arange(48)[None] // 20 + np.zeros((B, 1), int))
  full = A.blockwise_attention(q, k, v, mask, positions, segments, sliding_window=19,
                               block_size=8)

  def chunk(q_chunk, offset):
    return A.blockwise_attention(q_chunk, k, v, mask, positions, segments, query_offset=offset,
                                 sliding_window=19, block_size=8)

  run = jax.jit(chunk)
  parts = [run(q[:, o : o + 12], jnp.int32(o)) for o in range(0, 48, 12)]
  sees = jnp.any(_dense_mask(mask, positions, segments, 19), axis=-1)[..., None, None]
  np.testing.assert_allclose(jnp.where(sees, jnp.concatenate(parts, axis=1), 0.0),
                             jnp.where(sees, full, 0.0), atol=1e-5)


def test_block_skipping_computes_only_the_pairs_packed_rows_and_windows_need():
  """Segments and windows empty whole block pairs; skipping them (and a traced per-layer window)
  leaves values and gradients unchanged."""
  t, block = 64, 8
  q, k, v, w, mask, positions = _inputs(t)
  mask = jnp.ones_like(mask)
  positions = positions_from_mask(mask)
  segments = jnp.asarray(np.repeat(np.arange(4), 16)[None] + np.zeros((B, 1), int))
  layout = A._Blocks(q_size=block, k_size=block, num_q=8, num_k=8, groups=H // KV, scale=1.0,
                     softcap=None, has_window=True, has_segments=True, diagonal=False,
                     skip_diagonals=True)

  def blocked(x):
    return x.reshape(B, 8, block)

  inputs = A._Inputs(blocked(positions), blocked(segments), blocked(mask), blocked(positions),
                     blocked(segments), jnp.int32(0), jnp.int32(10**6), jnp.zeros((), bool))
  pairs = A._block_pairs(layout, inputs, True)
  assert int(pairs.sum()) == 4 * 3  # four segments of two blocks: 3 causal pairs each (of 36)
  assert int(A._block_pairs(layout, inputs._replace(window=jnp.int32(8)), True).sum()) == 8 + 4

  def loss(q, k, v, window, skip):
    out = A.blockwise_attention(q, k, v, mask, positions, segments, sliding_window=window,
                                block_size=block, block_skipping=skip)
    return jnp.sum(out * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=4)
  skipped, full = grad(q, k, v, jnp.int32(11), True), grad(q, k, v, jnp.int32(11), False)
  for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  static = jax.jit(loss, static_argnums=(3, 4))(q, k, v, 11, True)  # a Python-int window
  np.testing.assert_allclose(static, skipped[0], rtol=1e-6)


def _gemma_like(attention):
  """Two layers, a window on the first only, a custom scale and a soft-cap (Gemma 2's shape)."""
  return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, sliding_window=(5, None), attention_scale=0.2,
                     attention_softcap=2.0, attention=attention, attention_block=8)


def test_per_layer_windows_scale_and_softcap_follow_each_layer():
  """The scanned model == a plain loop over layers, each with a dense mask of its own window
  (the reference), under both implementations."""
  from rljax.models import transformer as T

  ids = jax.random.randint(jax.random.key(3), (2, 40), 1, 64)
  mask = jnp.ones((2, 40), bool).at[1, :7].set(False)
  positions = positions_from_mask(mask)
  model = Transformer(_gemma_like("naive"), rngs=nnx.Rngs(0))
  config, stacked = model.config, model.layers.stacked()
  x = jnp.take(model.embed[...], ids, axis=0)
  cos, sin = T.rope_cos_sin(positions, config)
  for layer, window in enumerate(config.sliding_window):
    dense = A.causal_attention_mask(mask, positions, positions, sliding_window=window)

    def attend(q, k, v, _, dense=dense):
      return A.naive_attention(q, k, v, dense, scale=0.2, softcap=2.0)

    p = jax.tree.map(lambda a, layer=layer: a[layer], stacked)
    x = T.decoder_layer(p, x, cos, sin, attend, config)
  want = model.logits_from_hidden(T.rms_norm(x, model.final_norm[...], config.rms_norm_eps))
  for impl in ("naive", "blockwise"):
    model.config = model.layers.config = _gemma_like(impl)
    np.testing.assert_allclose(jnp.where(mask[..., None], model(ids, mask), 0.0),
                               jnp.where(mask[..., None], want, 0.0), atol=2e-5)
  with pytest.raises(ValueError, match="2 layers"):
    _gemma_like("auto").replace(sliding_window=(5,))
  with pytest.raises(ValueError, match="attention_softcap"):
    _gemma_like("auto").replace(attention_softcap=0.0)


def test_long_prefill_runs_blockwise_and_decoding_continues_it():
  """A prompt of five blocks is prefilled through the blockwise core (query chunk at a traced
  cache slot); prefill + decode logits equal the full forward's."""
  config = _gemma_like("auto")
  model = Transformer(config, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(4), (2, 44), 1, 64)
  mask = jnp.ones((2, 44), bool).at[0, :3].set(False)
  assert A.uses_blockwise(config, 40) and not A.uses_blockwise(config, 1)
  cache = model.init_cache(2, 48)
  prefill, cache = jax.jit(model.forward_with_cache)(ids[:, :40], cache, 0, mask[:, :40])
  step = jax.jit(model.forward_with_cache)
  decoded = []
  for t in range(40, 44):
    logits, cache = step(ids[:, t : t + 1], cache, jnp.int32(t))
    decoded.append(logits)
  want = model(ids, mask)
  got = jnp.concatenate([prefill, *decoded], axis=1)
  np.testing.assert_allclose(jnp.where(mask[..., None], got, 0.0),
                             jnp.where(mask[..., None], want, 0.0), atol=2e-5)
