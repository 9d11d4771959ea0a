"""Causal self-attention: the naive reference and a blockwise (flash) core, behind one adapter.

Both compute, for queries q [B, T, H, Dh] and keys / values k, v [B, S, KV, Dh] (grouped-query:
H a multiple of KV),

    s_ts = c · tanh(scale · q_t·k_s / c)        (soft-cap c; without one s_ts = scale · q_t·k_s)
    out_t = Σ_s softmax_s(s_ts | visible_ts) v_s

in float32, where key s is visible to query t iff it is causal by slot (s ≤ t), a real token
(`key_mask`), in the query's segment (`segment_ids`, packed rows) and inside the sliding window
(positions[t] − positions[s] < window).

* `naive_attention` materialises the [B, H, T, S] scores and a dense [B, T, S] mask: the
  reference, and what the KV-cache decoder uses (one query per row).
* `blockwise_attention` is the flash-attention algorithm in pure JAX: queries and keys in
  blocks, an online softmax over key blocks, block pairs skipped where no row needs them
  (causal, padding, packed segments, sliding window), queries at any slot offset of the keys
  (prefill into a KV cache, a context-parallel shard), and a custom VJP that
  recomputes each block's scores in the backward from the saved log-sum-exp instead of storing
  [T, S] residuals. Masks are built per block from [B, S]-sized inputs: no array with B·T·S
  elements exists in its forward or backward program, so memory grows linearly in T.
* `self_attention` builds a batch's `attend(q, k, v, window)` by `ModelConfig.attention`: the
  adapter where the accelerator kernels of `rljax.models.kernels` (cuDNN, splash) plug in,
  each checking what it supports and falling back to the pure-JAX path.

A query with no visible key (a left-padding slot) gets a zero output from the blockwise core
and a uniform average from the naive one; neither is ever read by a real position.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rljax.models import kernels
from rljax.models.kernels import KERNELS
from rljax.ops._checks import check_int, check_number
from rljax.parallel.context import context_parallel, context_shards

if TYPE_CHECKING:
  from rljax.models.config import ModelConfig

Array = jax.Array
# (q, k, v, window) -> attention output; window: this layer's sliding window (a traced int32
# scalar, `NO_WINDOW` for a full-attention layer) or None when no layer has one.
Attend = Callable[[Array, Array, Array, "Array | None"], Array]
NO_WINDOW = 2**30  # the window of a full-attention layer among windowed ones (> any position)

ATTENTION_IMPLEMENTATIONS = ("auto", "naive", "blockwise", *KERNELS)
# Up to this many blocks per row the blockwise core's forward is unrolled by block diagonals
# (XLA schedules it best); beyond, its loops are `lax` loops (program size independent of T).
# The backward always loops over block pairs: a diagonal's backward holds the scores, their
# gradient and the probabilities of all its pairs at once (the diagonal schedule's backward
# took 97 MiB more temporaries in the SmolLM2-135M GRPO update at B=8, T=512, for a time within
# ±6 % on the core: BENCHMARKS.md, LoRA).
_MAX_DIAGONAL_BLOCKS = 16
_LOOP_KEY_BLOCKS = 4  # key block = this many query blocks in the loop schedule
# The blockwise core's einsums: plain batched matmuls over (B, KV, n blocks), the G query heads
# of a KV head stacked as rows: q [B, KV, n, G·b, Dh], k / v [B, KV, n, b, Dh], scores
# [B, KV, n, G·b, b] (XLA:CPU runs them without layout copies).
_QK = "bknqd,bknsd->bknqs"
_PV = "bknqs,bknsd->bknqd"
_PTV = "bknqs,bknqd->bknsd"


def causal_attention_mask(
  key_mask: Array,
  q_positions: Array,
  k_positions: Array,
  *,
  q_index: Array | None = None,
  k_index: Array | None = None,
  sliding_window: int | None = None,
  segment_ids: Array | None = None,
) -> Array:
  """Boolean [B, T, S] mask: key s visible to query t (causal, valid key, inside the window,
  in the query's segment).

  Causality is by slot index (`q_index`/`k_index`, default 0..T-1 / 0..S-1, shared by all rows),
  so left padding works; the window is measured in positions; `segment_ids` [B, S] are the key
  slots' (packed rows), a query's own being the one at its slot `q_index`.
  """
  t, s = q_positions.shape[-1], k_positions.shape[-1]
  q_index = jnp.arange(t) if q_index is None else q_index
  k_index = jnp.arange(s) if k_index is None else k_index
  mask = (q_index[..., :, None] >= k_index[..., None, :]) & key_mask.astype(bool)[:, None, :]
  if sliding_window is not None:
    distance = q_positions[:, :, None] - k_positions[:, None, :]
    mask = mask & (distance < sliding_window)
  if segment_ids is not None:
    q_segments = segment_ids if t == s else jnp.take(segment_ids, q_index, axis=1)
    mask = mask & (q_segments[:, :, None] == segment_ids[:, None, :])
  return mask


def _scores(
  q: Array, k: Array, scale: float, softcap: float | None, spec: str = "btkgd,bskd->bkgts"
) -> tuple[Array, Array | None]:
  """Scores [B, KV, G, T, S] (float32) of q [B, T, KV, G, Dh] against k [B, S, KV, Dh] (or the
  head-major layouts of `spec`), and tanh(raw / softcap) when soft-capped (for the backward)."""
  s = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t


def naive_attention(
  q: Array, k: Array, v: Array, mask: Array, *, scale: float | None = None,
  softcap: float | None = None,
) -> Array:
  """Grouped-query softmax attention over a dense mask (the reference path).

  Args:
    q: [B, T, H, Dh] queries (RoPE applied).
    k, v: [B, S, KV, Dh] keys / values (H a multiple of KV); S may exceed T (a KV cache).
    mask: [B, T, S] boolean, True where the key is visible.
    scale: score scale, default Dh ** -0.5.
    softcap: None, or c > 0 for soft-capped scores c · tanh(s / c) (Gemma 2).

  Returns:
    [B, T, H, Dh]. Scores and softmax in float32; a query with no visible key gets a uniform
    (finite) average instead of NaN.
  """
  b, t, h, dh = q.shape
  kv = k.shape[2]
  scale = dh**-0.5 if scale is None else scale
  s, _ = _scores(q.reshape(b, t, kv, h // kv, dh), k, scale, softcap)
  s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, dh)


# ----------------------------------------------------------------------------------------------
# Blockwise (flash) attention.
# ----------------------------------------------------------------------------------------------


class _Blocks(NamedTuple):
  """Static layout of one blockwise call (hashable: a `nondiff_argnums` argument)."""

  q_size: int  # query block size
  k_size: int  # key block size (== q_size in the diagonal schedule)
  num_q: int  # query blocks (T padded to a multiple of `q_size`)
  num_k: int  # key blocks (S padded to a multiple of `k_size`)
  groups: int  # query heads per KV head
  scale: float
  softcap: float | None
  has_window: bool
  has_segments: bool
  diagonal: bool  # the forward's schedule: by block diagonals (unrolled) or pairs (`lax` loops)
  skip_diagonals: bool  # diagonal schedule: skip a diagonal none of whose pairs is needed


class _Inputs(NamedTuple):
  """The blocked [B, n, b] masks of one call, its scalars and the pairs to compute (no gradient)."""

  q_positions: Array  # [B, num_q, q_size]
  q_segments: Array  # [B, num_q, q_size]
  key_mask: Array  # [B, num_k, k_size] bool
  k_positions: Array  # [B, num_k, k_size]
  k_segments: Array  # [B, num_k, k_size]
  offset: Array  # int32 scalar: the key slot of query 0
  window: Array  # int32 scalar: the sliding window (unused without one)
  pairs: Array  # [num_q, num_k] bool: some row has a visible (query, key) in the two blocks


def _take(x: Array, start, count: int, axis: int) -> Array:
  """Blocks start..start+count-1 along `axis` (a static slice, or a dynamic one when traced)."""
  if isinstance(start, int):
    return jax.lax.slice_in_dim(x, start, start + count, axis=axis)
  return jax.lax.dynamic_slice_in_dim(x, start, count, axis=axis)


def _put(x: Array, update: Array, start, axis: int) -> Array:
  """x with blocks start.. along `axis` replaced by `update`."""
  return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=axis)


def _where_visible(layout: _Blocks, qi, kj, n: int, inputs: _Inputs, s: Array, fill) -> Array:
  """Scores s [B, KV, n, G·bq, bk] with `fill` where the key is hidden (see `_visible`)."""
  shape = (*s.shape[:3], layout.groups, layout.q_size, layout.k_size)
  return jnp.where(_visible(layout, qi, kj, n, inputs), s.reshape(shape), fill).reshape(s.shape)


def _visible(layout: _Blocks, qi, kj, n: int, x: _Inputs) -> Array:
  """Visibility [B, 1, n, 1, bq, bk] of key blocks kj..kj+n-1 to query blocks qi..qi+n-1 (pairs
  qi + m, kj + m; n > 1 only with equal block sizes): causal by slot (query slot
  offset + qi·bq + r >= key slot kj·bk + c), a real key, the same segment, inside the window."""
  bq, bk = layout.q_size, layout.k_size
  causal = (x.offset + qi * bq - kj * bk + jnp.arange(bq)[:, None]
            >= jnp.arange(bk)[None, :])  # [bq, bk]
  mask = causal[None, None] & _take(x.key_mask, kj, n, 1)[:, :, None, :]
  if layout.has_segments:
    seg_q, seg_k = _take(x.q_segments, qi, n, 1), _take(x.k_segments, kj, n, 1)
    mask = mask & (seg_q[..., :, None] == seg_k[..., None, :])
  if layout.has_window:
    pos_q, pos_k = _take(x.q_positions, qi, n, 1), _take(x.k_positions, kj, n, 1)
    mask = mask & (pos_q[..., :, None] - pos_k[..., None, :] < x.window)
  return mask[:, None, :, None]


def _block_pairs(layout: _Blocks, x: _Inputs, skip: bool) -> Array:
  """[num_q, num_k] bool: the block pairs some row needs. A pair is skipped only when no
  (query, key) in it can be visible in any row: the key block starts after the query block's
  last slot (causal), holds no real key, shares no segment id with the query block (their id
  ranges are disjoint) or lies wholly outside the window (min query position − max key
  position >= window). `skip=False` computes every pair (the baseline without skipping)."""
  if not skip:
    return jnp.ones((layout.num_q, layout.num_k), bool)
  q_last = x.offset + (jnp.arange(layout.num_q) + 1) * layout.q_size - 1
  need = (jnp.arange(layout.num_k) * layout.k_size)[None, :] <= q_last[:, None]  # [nq, nk]
  need = need[None] & jnp.any(x.key_mask, axis=-1)[:, None, :]  # [B, nq, nk]
  big = jnp.iinfo(jnp.int32).max

  def key_max(values):
    return jnp.max(jnp.where(x.key_mask, values, -big), axis=-1)[:, None, :]

  if layout.has_segments:
    k_min = jnp.min(jnp.where(x.key_mask, x.k_segments, big), axis=-1)[:, None, :]
    q_min, q_max = (f(x.q_segments, axis=-1)[:, :, None] for f in (jnp.min, jnp.max))
    need = need & (q_min <= key_max(x.k_segments)) & (k_min <= q_max)
  if layout.has_window:
    need = need & (jnp.min(x.q_positions, axis=-1)[:, :, None] - key_max(x.k_positions) < x.window)
  return jnp.any(need, axis=0)


def _span(needed: Array) -> tuple[Array, Array]:
  """(lo, hi): the smallest range [lo, hi) holding every True of the 1-D `needed` ((0, 0) if
  none), the loop bounds over one block's partner blocks."""
  n = needed.shape[0]
  lo = jnp.argmax(needed)
  hi = n - jnp.argmax(needed[::-1])
  some = jnp.any(needed)
  return jnp.where(some, lo, 0), jnp.where(some, hi, 0)


def _diagonal_needed(x: _Inputs, d: int) -> Array:
  """Whether some pair (d + m, m) of diagonal d is needed (a scalar bool)."""
  return jnp.any(jnp.diagonal(x.pairs, offset=-d))


def _on_diagonal(layout: _Blocks, x: _Inputs, d: int, compute, operand):
  """compute(operand) for diagonal d, skipped (operand unchanged) when none of its pairs is
  needed and the layout allows it (segments or a window make far diagonals empty)."""
  if not layout.skip_diagonals:
    return compute(operand)
  return jax.lax.cond(_diagonal_needed(x, d), compute, lambda o: o, operand)


def _forward_blocks(layout: _Blocks, carry, qi, kj, n: int, q, k, v, inputs):
  """Online-softmax update of the (acc, m, l) of query blocks qi.. by key blocks kj.. (n pairs):

    m' = max(m, max_s S),  P = exp(S − m'),  l' = e^(m − m') l + Σ_s P,  acc' = e^(m − m') acc + P V
  """
  acc, m, l = carry  # [B, KV, n, G·b, Dh], [B, KV, n, G·b] x 2
  s, _ = _scores(_take(q, qi, n, 2), _take(k, kj, n, 2), layout.scale, layout.softcap, _QK)
  s = _where_visible(layout, qi, kj, n, inputs, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.exp(s - m_safe[..., None])  # exactly 0 where masked
  alpha = jnp.exp(m - m_safe)
  pv = jnp.einsum(_PV, p.astype(v.dtype), _take(v, kj, n, 2), preferred_element_type=jnp.float32)
  return alpha[..., None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=-1)


def _forward(layout: _Blocks, q, k, v, inputs: _Inputs):
  """(out [B, KV, num_q, G·b, Dh], lse [B, KV, num_q, G·b]).

  Diagonal schedule (self-attention): step d updates every query block i >= d with key block
  i - d at once (one batched op per diagonal). Pair schedule: query blocks in a `fori_loop`,
  each over the span of its needed key blocks (`_block_pairs`) in an inner one.
  """
  state = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32),
           jnp.zeros(q.shape[:-1], jnp.float32))
  if layout.diagonal:
    num = layout.num_q
    for d in range(num):

      def diagonal(state, d=d):
        part = tuple(_take(x, d, num - d, 2) for x in state)
        part = _forward_blocks(layout, part, d, 0, num - d, q, k, v, inputs)
        return tuple(_put(x, y, d, 2) for x, y in zip(state, part))

      state = _on_diagonal(layout, inputs, d, diagonal, state)
  else:

    def q_block(i, state):
      part = tuple(_take(x, i, 1, 2) for x in state)
      lo, hi = _span(inputs.pairs[i])
      part = jax.lax.fori_loop(
        lo, hi, lambda j, c: _forward_blocks(layout, c, i, j, 1, q, k, v, inputs), part
      )
      return tuple(_put(x, y, i, 2) for x, y in zip(state, part))

    state = jax.lax.fori_loop(0, layout.num_q, q_block, state)
  acc, m, l = state
  seen = l > 0
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  # +inf for a query that sees nothing, so exp(S - lse) is 0 for it in the backward.
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  return out.astype(q.dtype), lse


def _backward_pair(layout: _Blocks, qi, kj, q, k, v, d_out, lse, delta, inputs):
  """Gradient contributions of the block pair (qi, kj): dq of query block qi, dk and dv of key
  block kj:

    P = exp(S − lse),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − Δ),  Δ_t = Σ_d dO_td O_td,
    dQ = scale · dS' K,  dK = scale · dS'ᵀ Q,  dS' = dS ⊙ (1 − tanh²) when soft-capped.
  """
  qb, dob = _take(q, qi, 1, 2), _take(d_out, qi, 1, 2)
  kb, vb = _take(k, kj, 1, 2), _take(v, kj, 1, 2)
  s, t = _scores(qb, kb, layout.scale, layout.softcap, _QK)
  p = _where_visible(layout, qi, kj, 1, inputs, jnp.exp(s - _take(lse, qi, 1, 2)[..., None]), 0.0)
  f32 = jnp.float32
  dv = jnp.einsum(_PTV, p.astype(dob.dtype), dob, preferred_element_type=f32)
  ds = p * (jnp.einsum(_QK, dob, vb, preferred_element_type=f32) - _take(delta, qi, 1, 2)[..., None])
  if t is not None:
    ds = ds * (1.0 - t * t)
  ds = ds * layout.scale
  dq = jnp.einsum(_PV, ds.astype(kb.dtype), kb, preferred_element_type=f32)
  dk = jnp.einsum(_PTV, ds.astype(qb.dtype), qb, preferred_element_type=f32)
  return dq, dk, dv


def _backward(layout: _Blocks, q, k, v, out, lse, d_out, inputs: _Inputs):
  """(dq, dk, dv), each pair's scores recomputed from lse: key blocks in a `fori_loop` over the
  span of their needed query blocks, one pair at a time (either schedule of the forward)."""
  delta = jnp.einsum("...d,...d->...", d_out.astype(jnp.float32), out.astype(jnp.float32))
  grads = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))

  def add(grads, qi, kj):
    dq, dk, dv = grads
    part = _backward_pair(layout, qi, kj, q, k, v, d_out, lse, delta, inputs)
    dq = _put(dq, _take(dq, qi, 1, 2) + part[0], qi, 2)
    dk = _put(dk, _take(dk, kj, 1, 2) + part[1], kj, 2)
    return dq, dk, _put(dv, _take(dv, kj, 1, 2) + part[2], kj, 2)

  def k_block(j, grads):
    lo, hi = _span(inputs.pairs[:, j])
    return jax.lax.fori_loop(lo, hi, lambda i, g: add(g, i, j), grads)

  grads = jax.lax.fori_loop(0, layout.num_k, k_block, grads)
  return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(layout, q, k, v, inputs):
  return _forward(layout, q, k, v, inputs)[0]


def _flash_fwd(layout, q, k, v, inputs):
  out, lse = _forward(layout, q, k, v, inputs)
  return out, (q, k, v, out, lse, inputs)


def _flash_bwd(layout, residuals, d_out):
  q, k, v, out, lse, inputs = residuals
  return (*_backward(layout, q, k, v, out, lse, d_out, inputs), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
  q: Array,
  k: Array,
  v: Array,
  key_mask: Array,
  positions: Array | None = None,
  segment_ids: Array | None = None,
  *,
  query_offset: int | Array = 0,
  sliding_window: int | Array | None = None,
  scale: float | None = None,
  softcap: float | None = None,
  block_size: int = 128,
  block_skipping: bool = True,
) -> Array:
  """Causal grouped-query attention by blocks (flash attention), memory linear in T.

  Args:
    q: [B, T, H, Dh] queries: the tokens in key slots query_offset .. query_offset + T - 1
      (T == S, offset 0: self-attention; T < S: a chunk, e.g. a prefill into a KV cache or a
      context-parallel shard).
    k, v: [B, S, KV, Dh] keys / values.
    key_mask: [B, S] bool / 0-1, True where the slot is a real token.
    positions: [B, S] int position ids of the slots (needed with `sliding_window`).
    segment_ids: [B, S] int, or None; a query sees only keys of its own segment (packed rows).
    query_offset: the key slot of query 0 (a Python int, or a traced scalar).
    sliding_window: None, or w (a Python int or a traced scalar, e.g. a scanned layer's own):
      keys with positions[t] - positions[s] >= w are masked.
    scale: score scale, default Dh ** -0.5. softcap: None, or c > 0 (scores c · tanh(s / c)).
    block_size: query and key block size (clipped to S; T and S are padded to multiples).
    block_skipping: False computes every block pair, masked (the baseline the skipping is
      measured against; the result is the same).

  Returns:
    [B, T, H, Dh] in q's dtype; equals `naive_attention` at every query that sees a key (zero
    where none is visible). Only the (query block, key block) pairs some row needs are computed
    (`_block_pairs`: causal, key mask, segments, window); gradients come from a custom VJP that
    recomputes them from the saved log-sum-exp. The forward of self-attention with up to
    `_MAX_DIAGONAL_BLOCKS` blocks per row is batched by block diagonal (unrolled: one op per
    diagonal); otherwise, and always in the backward, the pairs run in `lax.fori_loop`s bounded
    by the needed blocks.
  """
  b, t, h, dh = q.shape
  s_len, kv = k.shape[1], k.shape[2]
  g = h // kv
  if v.shape[1] != s_len or key_mask.shape != (b, s_len):
    raise ValueError(f"blockwise_attention: k, v and key_mask need S = {s_len} slots; got "
                     f"v {v.shape}, key_mask {key_mask.shape}")
  if t > s_len:
    raise ValueError(f"blockwise_attention: q has {t} slots, more than the {s_len} keys")
  if isinstance(query_offset, int) and not 0 <= query_offset <= s_len - t:
    raise ValueError(f"query_offset {query_offset} + {t} queries exceeds the {s_len} key slots")
  if sliding_window is not None and positions is None:
    raise ValueError("blockwise_attention: `positions` is required with `sliding_window`")
  check_int("block_size", block_size, minimum=1)
  for name, value in (("scale", scale), ("softcap", softcap)):
    if value is not None:
      check_number(name, value, low_open=True)
  if isinstance(sliding_window, int):
    check_int("sliding_window", sliding_window, minimum=1)
  q_size = min(block_size, s_len)
  num_q = -(-t // q_size)
  self_attention = t == s_len and isinstance(query_offset, int) and query_offset == 0
  diagonal = self_attention and num_q <= _MAX_DIAGONAL_BLOCKS
  # The loop schedule attends each query block to keys `_LOOP_KEY_BLOCKS` blocks at a time:
  # fewer, larger iterations (a few more masked pairs at the ends of each span).
  k_size = q_size if diagonal else min(q_size * _LOOP_KEY_BLOCKS, s_len)
  num_k = -(-s_len // k_size)
  key_mask = key_mask.astype(bool)
  positions = jnp.zeros((b, s_len), jnp.int32) if positions is None else positions.astype(jnp.int32)
  segments = (jnp.zeros((b, s_len), jnp.int32) if segment_ids is None
              else segment_ids.astype(jnp.int32))
  offset = jnp.asarray(query_offset, jnp.int32)

  def blocked(x, num, size, fill=0):
    x = jnp.pad(x, ((0, 0), (0, num * size - x.shape[1])), constant_values=fill)
    return x.reshape(b, num, size)

  if self_attention:
    q_positions, q_segments = positions, segments
  else:  # the queries' own slots of the [B, S] inputs (padded so the slice never clamps)
    q_positions, q_segments = (
      jax.lax.dynamic_slice_in_dim(jnp.pad(x, ((0, 0), (0, t))), offset, t, axis=1)
      for x in (positions, segments)
    )
  has_window = sliding_window is not None
  layout = _Blocks(
    q_size=q_size, k_size=k_size, num_q=num_q, num_k=num_k, groups=g,
    scale=float(dh**-0.5 if scale is None else scale),
    softcap=None if softcap is None else float(softcap), has_window=has_window,
    has_segments=segment_ids is not None,
    diagonal=diagonal,
    skip_diagonals=block_skipping and (has_window or segment_ids is not None),
  )
  inputs = _Inputs(
    q_positions=blocked(q_positions, num_q, q_size),
    q_segments=blocked(q_segments, num_q, q_size),
    key_mask=blocked(key_mask, num_k, k_size, False),
    k_positions=blocked(positions, num_k, k_size), k_segments=blocked(segments, num_k, k_size),
    offset=offset,
    window=jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32),
    pairs=jnp.zeros((), bool),
  )
  inputs = inputs._replace(pairs=_block_pairs(layout, inputs, block_skipping))
  # Blocks, head-major: q [B, KV, num_q, G·bq, Dh], k / v [B, KV, num_k, bk, Dh].
  q = jnp.pad(q, ((0, 0), (0, num_q * q_size - t), (0, 0), (0, 0)))
  q = jnp.einsum("bnskgd->bkngsd", q.reshape(b, num_q, q_size, kv, g, dh))
  q = q.reshape(b, kv, num_q, g * q_size, dh)
  k, v = (
    jnp.einsum("bnskd->bknsd", jnp.pad(x, ((0, 0), (0, num_k * k_size - s_len), (0, 0), (0, 0)))
               .reshape(b, num_k, k_size, kv, dh))
    for x in (k, v)
  )
  out = _flash(layout, q, k, v, inputs).reshape(b, kv, num_q, g, q_size, dh)
  return jnp.einsum("bkngsd->bnskgd", out).reshape(b, num_q * q_size, h, dh)[:, :t]


def uses_blockwise(config: ModelConfig, length: int) -> bool:
  """Whether the pure-JAX path of `self_attention` runs the blockwise core on `length` query
  slots (a kernel aside; "cudnn" / "splash" fall back by the "auto" rule)."""
  return config.attention == "blockwise" or (
    config.attention != "naive" and length > 2 * config.attention_block
  )


def layer_windows(config: ModelConfig) -> Array | None:
  """[L] int32 sliding windows of the layers (`NO_WINDOW` for full attention), or None when no
  layer has one: the scanned per-layer input of `attend`."""
  windows = config.layer_windows
  if windows is None:
    return None
  return jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)


def self_attention(
  config: ModelConfig,
  attention_mask: Array,
  positions: Array,
  segment_ids: Array | None = None,
  *,
  query_offset: int | Array = 0,
  num_queries: int | None = None,
) -> Attend:
  """The causal attention `attend(q, k, v, window)` of rows with these [B, S] masks, positions
  and (optional) segment ids, with the config's scale and soft-cap. The queries are the
  `num_queries` slots from `query_offset` (default: all S, self-attention; fewer: new tokens
  written into a KV cache). By `config.attention`:

  * "blockwise": `blockwise_attention` with `config.attention_block`-sized blocks (memory
    linear in T);
  * "naive": `naive_attention` over a dense [B, T, S] mask built once for all layers (a
    windowed layer adds its window to it);
  * "cudnn" / "splash": that accelerator kernel (`rljax.models.kernels`); a call it cannot run
    is an error naming the missing feature;
  * "auto" (default): the backend's kernel (cuDNN on GPU, splash on TPU) where it supports the
    call, else the pure-JAX path: blockwise for more than two blocks of queries, naive up to
    `2 * attention_block` (256 by default; so a decode step is naive). At one block the
    blockwise core is the dense computation with more ops; at two, causal skipping saves a
    quarter of the score FLOPs, which on CPU did not make the GRPO benchmark's update (T = 256)
    faster while its compile took ~1 s longer (`benchmarks/attention.py`, BENCHMARKS.md).
    Beyond, blockwise wins in time (3.2x at T = 2048 on CPU) and memory (linear in T).

  Under a mesh and rules that split the rows along T (context parallelism), self-attention is
  `context_parallel_attention` instead.
  """
  s_len = attention_mask.shape[-1]
  t = s_len if num_queries is None else num_queries
  if t == s_len and context_shards() > 1:  # rows split along T over the mesh
    return context_parallel_attention(config, attention_mask, positions, segment_ids)
  attend = _pure_jax_attention(config, attention_mask, positions, segment_ids,
                               query_offset=query_offset, num_queries=t)
  kernel = kernels.kernel_for(config.attention)
  if kernel is None:
    return attend
  whole = t == s_len and isinstance(query_offset, int) and query_offset == 0

  def attend_kernel(q, k, v, window=None):
    reason = kernels.unsupported(kernel, dtype=q.dtype, head_dim=q.shape[-1], num_queries=t,
                                 num_keys=s_len, self_attention=whole,
                                 segments=segment_ids is not None,
                                 softcap=config.attention_softcap)
    if reason is not None:
      if config.attention == kernel:
        raise ValueError(f"ModelConfig.attention={kernel!r}: {reason} (\"auto\" falls back to "
                         "the pure-JAX path)")
      return attend(q, k, v, window)
    scale = q.shape[-1] ** -0.5 if config.attention_scale is None else config.attention_scale
    return kernels.kernel_attention(
      kernel, q, k, v, attention_mask, positions, segment_ids, windows=config.layer_windows,
      window=window, scale=scale, softcap=config.attention_softcap,
      fallback=lambda q, k, v: attend(q, k, v, window),
    )

  return attend_kernel


def _pure_jax_attention(
  config: ModelConfig,
  attention_mask: Array,
  positions: Array,
  segment_ids: Array | None,
  *,
  query_offset: int | Array,
  num_queries: int,
) -> Attend:
  """`self_attention`'s pure-JAX path: naive or blockwise by `uses_blockwise`."""
  s_len, t = attention_mask.shape[-1], num_queries
  options = dict(scale=config.attention_scale, softcap=config.attention_softcap)
  if not uses_blockwise(config, t):
    q_positions = (positions if t == s_len else
                   jax.lax.dynamic_slice_in_dim(positions, query_offset, t, axis=1))
    mask = causal_attention_mask(attention_mask, q_positions, positions,
                                 q_index=query_offset + jnp.arange(t), segment_ids=segment_ids)
    if config.layer_windows is not None:  # each windowed layer adds its window to the mask
      distance = q_positions[:, :, None] - positions[:, None, :]

    def attend_naive(q, k, v, window=None):
      visible = mask if window is None else mask & (distance < window)
      return naive_attention(q, k, v, visible, **options)

    return attend_naive

  def attend_blockwise(q, k, v, window=None):
    return blockwise_attention(q, k, v, attention_mask, positions, segment_ids,
                               query_offset=query_offset, sliding_window=window,
                               block_size=config.attention_block, **options)

  return attend_blockwise


def context_parallel_attention(
  config: ModelConfig, attention_mask: Array, positions: Array, segment_ids: Array | None = None
) -> Attend:
  """Self-attention of rows split along T over the mesh (`rljax.parallel.context`): each shard's
  queries against every slot's keys and values (all-gathered per layer) by `blockwise_attention`
  at the queries' slot offset, whatever `config.attention` says for short rows ("auto" and
  "blockwise" alike). "naive" is refused: its dense [B, T, S] mask and scores are what context
  parallelism exists to avoid.

  Raises:
    ValueError: `config.attention == "naive"`; T not divisible by the number of shards.
  """
  if config.attention == "naive":
    raise ValueError(
      'context parallelism (the mesh splits `sequence`) needs the blockwise core; '
      'ModelConfig.attention is "naive": use "auto" or "blockwise", or a mesh without context'
    )
  options = dict(scale=config.attention_scale, softcap=config.attention_softcap,
                 block_size=config.attention_block)

  def attend_shard(q, k, v, query_offset, key_inputs, window):
    return blockwise_attention(q, k, v, *key_inputs, query_offset=query_offset,
                               sliding_window=window, **options)

  return context_parallel(attend_shard, (attention_mask, positions, segment_ids))
