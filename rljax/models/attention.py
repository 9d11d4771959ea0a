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
  blocks, an online softmax over key blocks, causal block skipping, and a custom VJP that
  recomputes each block's scores in the backward from the saved log-sum-exp instead of storing
  [T, S] residuals. Masks are built per block from [B, S]-sized inputs: no array with B·T·S
  elements exists in its forward or backward program, so memory grows linearly in T.
* `self_attention` builds a batch's `attend(q, k, v)` by `ModelConfig.attention` (the adapter
  where accelerator kernels will plug in, each falling back to the blockwise core).

A query with no visible key (a left-padding slot) gets a zero output from the blockwise core
and a uniform average from the naive one; neither is ever read by a real position.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_int, check_number

if TYPE_CHECKING:
  from rljax.models.config import ModelConfig

Array = jax.Array
Attend = Callable[[Array, Array, Array], Array]  # (q, k, v) -> attention output

ATTENTION_IMPLEMENTATIONS = ("auto", "naive", "blockwise")
# Up to this many blocks per row the blockwise core is unrolled by block diagonals (XLA schedules
# it best); beyond, its loops are `lax` loops (program size independent of T).
_MAX_DIAGONAL_BLOCKS = 16
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
  so left padding works; the window is measured in positions; `segment_ids` [B, T] (packed rows)
  applies to self-attention (S == T).
  """
  t, s = q_positions.shape[-1], k_positions.shape[-1]
  q_index = jnp.arange(t) if q_index is None else q_index
  k_index = jnp.arange(s) if k_index is None else k_index
  mask = (q_index[..., :, None] >= k_index[..., None, :]) & key_mask.astype(bool)[:, None, :]
  if sliding_window is not None:
    distance = q_positions[:, :, None] - k_positions[:, None, :]
    mask = mask & (distance < sliding_window)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
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

  size: int  # block size of queries and keys
  num: int  # blocks per row (T padded to a multiple of `size`)
  groups: int  # query heads per KV head
  scale: float
  softcap: float | None
  window: int | None
  has_segments: bool
  diagonal: bool  # the schedule: by block diagonals (unrolled) or by pairs (`lax` loops)


def _take(x: Array, start, count: int, axis: int) -> Array:
  """Blocks start..start+count-1 along `axis` (a static slice, or a dynamic one when traced)."""
  if isinstance(start, int):
    return jax.lax.slice_in_dim(x, start, start + count, axis=axis)
  return jax.lax.dynamic_slice_in_dim(x, start, count, axis=axis)


def _put(x: Array, update: Array, start, axis: int) -> Array:
  """x with blocks start.. along `axis` replaced by `update`."""
  return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=axis)


def _where_visible(layout: _Blocks, qi, kj, n: int, inputs, s: Array, fill: float) -> Array:
  """Scores s [B, KV, n, G·b, b] with `fill` where the key is hidden (see `_visible`)."""
  b = layout.size
  shape = (*s.shape[:3], layout.groups, b, b)
  return jnp.where(_visible(layout, qi, kj, n, inputs), s.reshape(shape), fill).reshape(s.shape)


def _visible(layout: _Blocks, qi, kj, n: int, inputs) -> Array:
  """Visibility [B, 1, n, 1, b, b] of key blocks kj..kj+n-1 to query blocks qi..qi+n-1 (pairs
  qi + m, kj + m), built from the [B, num, b] blocked key mask, positions and segment ids."""
  key_mask, positions, segment_ids = inputs
  b = layout.size
  causal = (qi - kj) * b + jnp.arange(b)[:, None] >= jnp.arange(b)[None, :]  # [b, b]
  mask = causal[None, None] & _take(key_mask, kj, n, 1)[:, :, None, :]
  if layout.has_segments:
    seg_q, seg_k = _take(segment_ids, qi, n, 1), _take(segment_ids, kj, n, 1)
    mask = mask & (seg_q[..., :, None] == seg_k[..., None, :])
  if layout.window is not None:
    pos_q, pos_k = _take(positions, qi, n, 1), _take(positions, kj, n, 1)
    mask = mask & (pos_q[..., :, None] - pos_k[..., None, :] < layout.window)
  return mask[:, None, :, None]


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


def _forward(layout: _Blocks, q, k, v, inputs):
  """(out [B, KV, num, G·b, Dh], lse [B, KV, num, G·b]).

  Diagonal schedule: step d updates every query block i >= d with key block i - d at once (one
  batched op per diagonal, `num` steps). Pair schedule: query blocks in a `fori_loop`, each over
  its key blocks 0..i in an inner one (program size independent of T).
  """
  num = layout.num
  state = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32),
           jnp.zeros(q.shape[:-1], jnp.float32))
  if layout.diagonal:
    for d in range(num):
      part = tuple(_take(x, d, num - d, 2) for x in state)
      part = _forward_blocks(layout, part, d, 0, num - d, q, k, v, inputs)
      state = tuple(_put(x, y, d, 2) for x, y in zip(state, part))
  else:

    def q_block(i, state):
      part = tuple(_take(x, i, 1, 2) for x in state)
      part = jax.lax.fori_loop(
        0, i + 1, lambda j, c: _forward_blocks(layout, c, i, j, 1, q, k, v, inputs), part
      )
      return tuple(_put(x, y, i, 2) for x, y in zip(state, part))

    state = jax.lax.fori_loop(0, num, q_block, state)
  acc, m, l = state
  seen = l > 0
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  # +inf for a query that sees nothing, so exp(S - lse) is 0 for it in the backward.
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  return out.astype(q.dtype), lse


def _backward_blocks(layout: _Blocks, qi, kj, n: int, q, k, v, d_out, lse, delta, inputs):
  """Gradient contributions (dq of query blocks qi.., dk and dv of key blocks kj..; n pairs):

    P = exp(S − lse),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − Δ),  Δ_t = Σ_d dO_td O_td,
    dQ = scale · dS' K,  dK = scale · dS'ᵀ Q,  dS' = dS ⊙ (1 − tanh²) when soft-capped.
  """
  qb, dob = _take(q, qi, n, 2), _take(d_out, qi, n, 2)
  kb, vb = _take(k, kj, n, 2), _take(v, kj, n, 2)
  s, t = _scores(qb, kb, layout.scale, layout.softcap, _QK)
  p = _where_visible(layout, qi, kj, n, inputs, jnp.exp(s - _take(lse, qi, n, 2)[..., None]), 0.0)
  f32 = jnp.float32
  dv = jnp.einsum(_PTV, p.astype(dob.dtype), dob, preferred_element_type=f32)
  ds = p * (jnp.einsum(_QK, dob, vb, preferred_element_type=f32) - _take(delta, qi, n, 2)[..., None])
  if t is not None:
    ds = ds * (1.0 - t * t)
  ds = ds * layout.scale
  dq = jnp.einsum(_PV, ds.astype(kb.dtype), kb, preferred_element_type=f32)
  dk = jnp.einsum(_PTV, ds.astype(qb.dtype), qb, preferred_element_type=f32)
  return dq, dk, dv


def _backward(layout: _Blocks, q, k, v, out, lse, d_out, inputs):
  """(dq, dk, dv), each pair's scores recomputed from lse: by diagonals (unrolled), or key
  blocks in a `fori_loop` (dk_j, dv_j local) over query blocks j.. in an inner one."""
  delta = jnp.einsum("...d,...d->...", d_out.astype(jnp.float32), out.astype(jnp.float32))
  num = layout.num
  grads = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  pair = functools.partial(_backward_blocks, layout, q=q, k=k, v=v, d_out=d_out, lse=lse,
                           delta=delta, inputs=inputs)

  def add(grads, part, qi, kj, n):
    dq, dk, dv = grads
    dq = _put(dq, _take(dq, qi, n, 2) + part[0], qi, 2)
    dk = _put(dk, _take(dk, kj, n, 2) + part[1], kj, 2)
    return dq, dk, _put(dv, _take(dv, kj, n, 2) + part[2], kj, 2)

  if layout.diagonal:
    for d in range(num):
      grads = add(grads, pair(qi=d, kj=0, n=num - d), d, 0, num - d)
  else:

    def k_block(j, grads):
      return jax.lax.fori_loop(j, num, lambda i, g: add(g, pair(qi=i, kj=j, n=1), i, j, 1), grads)

    grads = jax.lax.fori_loop(0, num, k_block, grads)
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
  sliding_window: int | None = None,
  scale: float | None = None,
  softcap: float | None = None,
  block_size: int = 128,
) -> Array:
  """Causal grouped-query self-attention by blocks (flash attention), memory linear in T.

  Args:
    q: [B, T, H, Dh] queries; k, v: [B, T, KV, Dh] keys / values of the same T slots.
    key_mask: [B, T] bool / 0-1, True where the slot is a real token.
    positions: [B, T] int position ids (needed with `sliding_window`).
    segment_ids: [B, T] int, or None; a query sees only keys of its own segment (packed rows).
    sliding_window: None, or w: keys with positions[t] - positions[s] >= w are masked.
    scale: score scale, default Dh ** -0.5. softcap: None, or c > 0 (scores c · tanh(s / c)).
    block_size: query and key block size (clipped to T; T is padded to a multiple).

  Returns:
    [B, T, H, Dh] in q's dtype; equals `naive_attention` at every query that sees a key (zero
    where none is visible). Only the (query block, key block) pairs on or below the diagonal
    are computed; gradients come from a custom VJP that recomputes them from the saved
    log-sum-exp. Up to `_MAX_DIAGONAL_BLOCKS` blocks per row the pairs are batched by diagonal
    (unrolled: one op per diagonal); beyond, they run in `lax.fori_loop`s.
  """
  b, t, h, dh = q.shape
  kv = k.shape[2]
  g = h // kv
  if k.shape[1] != t or v.shape[1] != t:
    raise ValueError(f"blockwise_attention is self-attention: q has {t} slots, k {k.shape[1]}")
  if sliding_window is not None and positions is None:
    raise ValueError("blockwise_attention: `positions` is required with `sliding_window`")
  check_int("block_size", block_size, minimum=1)
  for name, value in (("scale", scale), ("softcap", softcap)):
    if value is not None:
      check_number(name, value, low_open=True)
  if sliding_window is not None:
    check_int("sliding_window", sliding_window, minimum=1)
  size = min(block_size, t)
  num = -(-t // size)
  pad = num * size - t
  key_mask = key_mask.astype(bool)
  positions = jnp.zeros((b, t), jnp.int32) if positions is None else positions.astype(jnp.int32)
  segments = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    key_mask, positions, segments = (jnp.pad(x, ((0, 0), (0, pad))) for x in
                                     (key_mask, positions, segments))
  layout = _Blocks(
    size=size, num=num, scale=float(dh**-0.5 if scale is None else scale),
    softcap=None if softcap is None else float(softcap),
    window=None if sliding_window is None else int(sliding_window),
    has_segments=segment_ids is not None, diagonal=num <= _MAX_DIAGONAL_BLOCKS, groups=g,
  )
  # Blocks, head-major: q [B, KV, num, G·b, Dh], k / v [B, KV, num, b, Dh], masks [B, num, b].
  q = jnp.einsum("bnskgd->bkngsd", q.reshape(b, num, size, kv, g, dh))
  q = q.reshape(b, kv, num, g * size, dh)
  k, v = (jnp.einsum("bnskd->bknsd", x.reshape(b, num, size, kv, dh)) for x in (k, v))
  inputs = tuple(x.reshape(b, num, size) for x in (key_mask, positions, segments))
  out = _flash(layout, q, k, v, inputs).reshape(b, kv, num, g, size, dh)
  return jnp.einsum("bkngsd->bnskgd", out).reshape(b, num * size, h, dh)[:, :t]


def uses_blockwise(config: ModelConfig, length: int) -> bool:
  """Whether `self_attention` runs the blockwise core on rows of `length` slots."""
  return config.attention == "blockwise" or (
    config.attention == "auto" and length > 2 * config.attention_block
  )


def self_attention(
  config: ModelConfig, attention_mask: Array, positions: Array, segment_ids: Array | None = None
) -> Attend:
  """The causal self-attention `attend(q, k, v)` of rows with these [B, T] masks, positions and
  (optional) segment ids, by `config.attention`:

  * "blockwise": `blockwise_attention` with `config.attention_block`-sized blocks (memory
    linear in T);
  * "naive": `naive_attention` over a dense [B, T, T] mask built once for all layers;
  * "auto" (default): blockwise for rows longer than two blocks, naive up to
    `2 * attention_block` slots (256 by default). At one block the blockwise core is the dense
    computation with more ops; at two, causal skipping saves a quarter of the score FLOPs, which
    on CPU did not make the GRPO benchmark's update (T = 256) faster while its compile took
    ~1 s longer (`benchmarks/attention.py`, BENCHMARKS.md). Beyond, blockwise wins in time
    (3.2x at T = 2048 on CPU) and memory (linear in T).
  """
  if not uses_blockwise(config, attention_mask.shape[-1]):
    mask = causal_attention_mask(attention_mask, positions, positions,
                                 sliding_window=config.sliding_window, segment_ids=segment_ids)
    return lambda q, k, v: naive_attention(q, k, v, mask)
  return functools.partial(
    blockwise_attention,
    key_mask=attention_mask,
    positions=positions,
    segment_ids=segment_ids,
    sliding_window=config.sliding_window,
    block_size=config.attention_block,
  )
