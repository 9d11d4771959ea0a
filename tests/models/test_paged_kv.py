"""Paged decode attention against a numpy softmax over the same keys laid out contiguously.

Every slot's cached keys are scattered over random pool blocks (a block table per slot); the
reference gathers them back into a dense [length + 1, KV, Dh] row per slot (the query's own key
last) and applies the window mask. Idle slots (length 0) attend to their
own key only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.models.paged_kv import PagedKV, copy_blocks, paged_attention, write_blocks

S, H, KV, DH, BS, NB, MB = 5, 4, 2, 8, 4, 48, 8


def _case(seed: int):
  rng = np.random.default_rng(seed)
  pool = PagedKV(k=jnp.asarray(rng.normal(size=(2, KV, NB, BS, DH)), jnp.float32),
                 v=jnp.asarray(rng.normal(size=(2, KV, NB, BS, DH)), jnp.float32))
  blocks = rng.permutation(np.arange(1, NB))[: S * MB].reshape(S, MB).astype(np.int32)
  lengths = np.array([0, 1, 7, 16, 29], np.int32)  # idle, one key, partial, full, long
  q = jnp.asarray(rng.normal(size=(S, H, DH)), jnp.float32)
  k_self = jnp.asarray(rng.normal(size=(S, KV, DH)), jnp.float32)
  v_self = jnp.asarray(rng.normal(size=(S, KV, DH)), jnp.float32)
  return pool, blocks, lengths, q, k_self, v_self


def _reference(pool, layer, blocks, lengths, q, k_self, v_self, *, window, softcap, scale):
  """Softmax attention in numpy over each slot's keys gathered into one dense row (own key at
  the end, position = length), the window counted back from the query."""
  q, k_self, v_self = (np.asarray(x, np.float64) for x in (q, k_self, v_self))
  scale = DH**-0.5 if scale is None else scale
  outs = []
  for s, length in enumerate(lengths):
    ids = blocks[s]
    keys, values = (np.moveaxis(np.asarray(x[layer], np.float64)[:, ids], 0, 2)
                    .reshape(-1, KV, DH)[:length] for x in (pool.k, pool.v))
    keys = np.concatenate([keys, k_self[s][None]], 0)  # [length + 1, KV, Dh]
    values = np.concatenate([values, v_self[s][None]], 0)
    visible = np.ones(length + 1, bool)
    if window is not None:
      visible &= length - np.arange(length + 1) < window
    heads = np.arange(H) // (H // KV)  # the KV head of each query head
    scores = np.einsum("hd,nhd->hn", q[s], keys[:, heads]) * scale
    if softcap is not None:
      scores = softcap * np.tanh(scores / softcap)
    scores = np.where(visible[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    outs.append(np.einsum("hn,nhd->hd", weights, values[:, heads]))
  return np.stack(outs)


@pytest.mark.parametrize("window,softcap,scale,per_step", [
  (None, None, None, 1), (None, None, None, 4), (6, None, None, 2), (None, 5.0, 0.3, 2),
])
def test_paged_attention_equals_the_softmax_over_gathered_keys(window, softcap, scale, per_step):
  pool, blocks, lengths, q, k_self, v_self = _case(0)
  window_arg = None if window is None else jnp.int32(window)
  for layer in (0, 1):
    out = jax.jit(paged_attention, static_argnames=("scale", "softcap", "blocks_per_step"))(
      q, k_self, v_self, pool, layer, jnp.asarray(blocks), jnp.asarray(lengths), scale=scale,
      softcap=softcap, window=window_arg, blocks_per_step=per_step)
    ref = _reference(pool, layer, blocks, lengths, q, k_self, v_self, window=window,
                     softcap=softcap, scale=scale)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


_jitted_attention = jax.jit(paged_attention, static_argnames=("blocks_per_step",))


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(0, MB * BS), min_size=S, max_size=S),
       window=st.one_of(st.none(), st.integers(1, 12)))
def test_the_work_list_serves_any_mix_of_lengths(lengths, window):
  """Any lengths (several chunks of one slot in one iteration of the work list, slots without
  chunks, chunks left over in the last iteration) and windows: the naive result (values only
  are drawn: one compiled program)."""
  pool, blocks, _, q, k_self, v_self = _case(2)
  lengths = np.asarray(lengths, np.int32)
  out = _jitted_attention(q, k_self, v_self, pool, 1, jnp.asarray(blocks), jnp.asarray(lengths),
                          window=jnp.int32(2**30 if window is None else window), blocks_per_step=1)
  ref = _reference(pool, 1, blocks, lengths, q, k_self, v_self, window=window, softcap=None,
                   scale=None)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_paged_attention_reads_only_the_blocks_of_live_tokens():
  """NaN in every block past a slot's length (and in unlisted blocks) changes nothing: the loop
  stops at the longest slot and masks the rest."""
  pool, blocks, lengths, q, k_self, v_self = _case(1)
  clean = paged_attention(q, k_self, v_self, pool, 0, jnp.asarray(blocks), jnp.asarray(lengths))
  k = np.array(pool.k)
  live = {int(b) for s, n in enumerate(lengths) for b in blocks[s, : -(-n // BS)]}
  for block in set(range(NB)) - live:
    k[:, :, block] = np.nan  # keys only: a NaN key is masked by a select, never multiplied
  poisoned = paged_attention(q, k_self, v_self, PagedKV(k=jnp.asarray(k), v=pool.v), 0,
                             jnp.asarray(blocks), jnp.asarray(lengths))
  np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))


def test_paged_attention_rejects_a_table_not_a_multiple_of_the_step():
  pool, blocks, lengths, q, k_self, v_self = _case(0)
  with pytest.raises(ValueError, match="multiple of `blocks_per_step`"):
    paged_attention(q, k_self, v_self, pool, 0, jnp.asarray(blocks[:, :6]), jnp.asarray(lengths),
                    blocks_per_step=4)


def test_write_and_copy_blocks_move_whole_blocks():
  pool = PagedKV(k=jnp.zeros((2, KV, 6, BS, DH)), v=jnp.zeros((2, KV, 6, BS, DH)))
  k = jnp.arange(2 * 1 * 2 * BS * KV * DH, dtype=jnp.float32).reshape(2, 1, 2 * BS, KV, DH)
  pool = write_blocks(pool, k, -k, jnp.asarray([[3, 5]], jnp.int32))
  heads_first = np.moveaxis(np.asarray(k[:, 0]), 2, 1)  # [L, KV, 2·BS, Dh]
  np.testing.assert_array_equal(np.asarray(pool.k[:, :, 3]), heads_first[:, :, :BS])
  np.testing.assert_array_equal(np.asarray(pool.v[:, :, 5]), -heads_first[:, :, BS:])
  pool = copy_blocks(pool, jnp.asarray([5, 0], jnp.int32), jnp.asarray([1, 0], jnp.int32))
  np.testing.assert_array_equal(np.asarray(pool.k[:, :, 1]), np.asarray(pool.k[:, :, 5]))
  assert not np.asarray(pool.k[:, :, 2]).any() and not np.asarray(pool.k[:, :, 0]).any()
