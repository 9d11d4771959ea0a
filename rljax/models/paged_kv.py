"""A paged key/value cache: fixed-size blocks from one pool, a block table per decode slot.

The pool holds every layer's keys and values in `num_blocks` blocks of `block_size` tokens,
`k, v: [L, KV, num_blocks, block_size, Dh]` — heads before blocks, the layout of JAX's Pallas
paged-attention kernels, and the one in which a decode step's score and value products are
plain batched matmuls over (head, slot) with no layout copy of the gathered blocks. A slot's tokens 0, 1, … live in the blocks its
row of the block table names, token p at offset p % block_size of block `table[p //
block_size]`; several slots may name the same block (the prompt blocks that the samples of one
prompt share, never written after the prefill). Block 0 is the *null block*: the table entries
past a slot's blocks and idle slots point at it, so their writes land there and nothing reads
it as a real key.

Positions are contiguous: a slot's cached tokens have positions 0 … length − 1 (prompts are
stored without their padding, whose positions `Transformer.hidden_states` skips too), so a key
is visible to the query at position `length` iff its position is < length and inside the
layer's sliding window. `paged_attention` runs an online softmax (the flash-attention update)
over the query's own key and a *work list* of chunks — `blocks_per_step` blocks of one slot —
taking S chunks of all slots at a time in a `lax.while_loop` and merging each chunk's softmax
partials into its slot's: a decode step's cost follows the total number of blocks the active
slots hold (⌈Σ chunks / S⌉ iterations), never the pool size, the maximum length or S times the
longest live sequence.

Within one device call of the engine's decode loop the pool is read-only: each step's new keys
and values go to a small per-call buffer (`recent`, attended to densely) and `write_recent`
stores them into their blocks once when the call returns (a pool written inside the loop is
copied by XLA at every step).

`decode_attention`, what `decode_hidden` calls per layer, reads the cached keys with a kernel of
`rljax.models.paged_kernels` where the backend has one that supports the model (JAX's Pallas GPU
kernel reads this layout as it is; its softmax residuals are merged with those of the own and
recent keys) and with the loop of `paged_attention` otherwise, and on windowed layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from rljax.models import paged_kernels
from rljax.models.attention import NO_WINDOW, layer_windows
from rljax.models.config import ModelConfig
from rljax.models.transformer import (
  input_embeddings,
  layer_cos_sin,
  layer_residuals,
  layer_rope_index,
  layer_unroll,
  norm,
  project_qkv,
  rope_tables,
  soft_cap,
)
from rljax.ops._checks import check_int

if TYPE_CHECKING:
  from rljax.models.transformer import Transformer

Array = jax.Array
NULL_BLOCK = 0


class PagedKV(NamedTuple):
  """The key / value pool (a pytree): k, v [L, KV, num_blocks, block_size, Dh]."""

  k: Array
  v: Array

  @property
  def num_blocks(self) -> int:
    return self.k.shape[2]

  @property
  def block_size(self) -> int:
    return self.k.shape[3]


def init_paged_kv(config: ModelConfig, num_blocks: int, block_size: int, *,
                  dtype: Any = None) -> PagedKV:
  """An all-zero pool of `num_blocks` blocks (block 0 the null block) of `block_size` tokens,
  in `dtype` (default `config.dtype`, the activations')."""
  check_int("num_blocks", num_blocks, 2)
  check_int("block_size", block_size, 1)
  shape = (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)
  dtype = config.dtype if dtype is None else dtype
  return PagedKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def paged_attention(
  q: Array, k_self: Array, v_self: Array, pool: PagedKV, layer: Array | int, table: Array,
  lengths: Array, *, scale: float | None = None, softcap: float | None = None,
  window: Array | None = None, blocks_per_step: int = 4, recent_k: Array | None = None,
  recent_v: Array | None = None, recent_count: Array | None = None, kernel: str | None = None,
) -> Array:
  """One query per slot against its own key, its `recent_count` recent keys and its `lengths`
  cached keys in the pool.

    out_s = Σ_j softmax_j(c·tanh(scale·q_s·k_j / c)) v_j   over j ∈ {self} ∪ {recent r <
            recent_count_s} ∪ {cached p : p < lengths_s}, inside the window (q_s at position
            lengths_s + recent_count_s, recent key r at lengths_s + r)

  The recent keys are the tokens decoded since the pool was last written (`recent_k, recent_v`
  [S, M, KV, Dh]): the engine's decode loop keeps them apart and writes the pool once per call,
  so that the pool is an invariant of the loop (written inside it, every step copied it).

  in float32 with an online softmax over the work list of chunks (`blocks_per_step` blocks of
  one slot, from the first its window reaches to its last), S chunks per iteration (a slot with
  length 0 has none: idle slots pass 0); or, with `kernel` ("pallas", no window; see
  `rljax.models.paged_kernels`), the cached keys by the kernel, whose softmax partials are
  merged with those of the own and recent keys by their log-sum-exp.

  Args:
    q: [S, H, Dh] queries at positions `lengths` (RoPE applied).
    k_self, v_self: [S, KV, Dh] the queries' own keys / values (not yet in the pool).
    pool: the `PagedKV` pool; `layer` the layer to read (an int or a traced index).
    table: [S, MB] int32 block table, MB a multiple of `blocks_per_step` (null-padded).
    lengths: [S] int32 cached tokens per slot.
    scale: score scale (default Dh ** -0.5); softcap: None or c > 0; window: None or this
      layer's sliding window (a traced int32 scalar).

  Returns:
    [S, H, Dh] in q's dtype.
  """
  s_count, h, dh = q.shape
  kv = k_self.shape[1]
  g = h // kv
  bs = pool.block_size
  span = blocks_per_step * bs
  if table.shape[1] % blocks_per_step:
    raise ValueError(f"the block table's width {table.shape[1]} must be a multiple of "
                     f"`blocks_per_step` {blocks_per_step}.")
  if kernel is not None and window is not None:
    raise ValueError(f"the decode kernel {kernel!r} has no sliding window (`window` must be None).")
  scale = dh**-0.5 if scale is None else scale
  qg = jnp.swapaxes(q.reshape(s_count, kv, g, dh), 0, 1).astype(jnp.float32)  # [KV, S, G, Dh]

  def scores(keys, queries=qg):  # keys [KV, S, n, Dh] -> [KV, S, G, n]
    raw = jnp.einsum("ksgd,ksnd->ksgn", queries, keys.astype(jnp.float32)) * scale
    return soft_cap(raw, softcap)

  own = scores(jnp.swapaxes(k_self, 0, 1)[:, :, None])  # [KV, S, G, 1]
  position = lengths if recent_count is None else lengths + recent_count  # the query's
  m = own[..., 0]
  l = jnp.ones_like(m)
  acc = jnp.broadcast_to(jnp.swapaxes(v_self, 0, 1).astype(jnp.float32)[:, :, None, :],
                         (kv, s_count, g, dh))

  def update(carry, s, values):  # one online-softmax step over keys of scores s [KV, S, G, n]
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    probs = jnp.exp(s - m_new[..., None])
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(probs, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("ksgn,ksnd->ksgd", probs,
                                                   values.astype(jnp.float32))
    return m_new, l, acc

  if recent_k is not None:
    r = jnp.arange(recent_k.shape[1])
    visible = r[None, :] < recent_count[:, None]
    if window is not None:
      visible &= recent_count[:, None] - r[None, :] < window
    s = jnp.where(visible[None, :, None, :], scores(jnp.moveaxis(recent_k, 2, 0)), -jnp.inf)
    m, l, acc = update((m, l, acc), s, jnp.moveaxis(recent_v, 2, 0))

  if kernel is not None:
    parts = paged_kernels.pallas_partials(q, pool.k, pool.v, layer, table, lengths, scale=scale,
                                          softcap=softcap, blocks_per_step=blocks_per_step)
    m, l, acc = _merge((m, l, acc), parts)
  else:
    # The work list: chunk c < count_s of slot s reads the blocks_per_step blocks of block-step
    # first_s + c; the chunks of all slots in slot order, s_count of them per iteration.
    last = (lengths + span - 1) // span  # block-steps holding the slot's cached tokens
    first = jnp.zeros_like(lengths)
    if window is not None:
      first = jnp.minimum(jnp.maximum(position - window + 1, 0) // span, last)
    count = last - first
    ends = jnp.cumsum(count)
    total = ends[-1]
    slots = jnp.arange(s_count)

    def body(carry):
      i, m, l, acc = carry
      c = i * s_count + slots  # [K] chunk indices
      owner = jnp.minimum(jnp.sum(c[:, None] >= ends[None, :], axis=1), s_count - 1)
      valid = c < total
      step = first[owner] + c - (ends[owner] - count[owner])  # the chunk's block-step
      cols = jnp.minimum(step[:, None] * blocks_per_step + jnp.arange(blocks_per_step),
                         table.shape[1] - 1)
      ids = jnp.take_along_axis(table[owner], cols, axis=1)  # [K, blocks_per_step]
      keys = pool.k[layer][:, ids].reshape(kv, s_count, span, dh)
      values = pool.v[layer][:, ids].reshape(kv, s_count, span, dh)
      p = step[:, None] * span + jnp.arange(span)
      visible = valid[:, None] & (p < lengths[owner][:, None])
      if window is not None:
        visible &= position[owner][:, None] - p < window
      s = jnp.where(visible[None, :, None, :], scores(keys, qg[:, owner]), -jnp.inf)
      m_c = jnp.max(s, axis=-1)  # [KV, K, G]
      probs = jnp.exp(s - jnp.where(jnp.isfinite(m_c), m_c, 0.0)[..., None])
      parts = (m_c, jnp.sum(probs, axis=-1),
               jnp.einsum("kcgn,kcnd->kcgd", probs, values.astype(jnp.float32)))
      return (i + 1, *_merge_chunks((m, l, acc), parts, owner))

    steps = (total + s_count - 1) // s_count
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < steps, body, (0, m, l, acc))
  out = jnp.swapaxes(acc / l[..., None], 0, 1)  # [S, KV, G, Dh]
  return out.reshape(s_count, h, dh).astype(q.dtype)


def _merge(state: tuple[Array, Array, Array], parts: tuple[Array, Array, Array]):
  """The online-softmax state (m, l [..., G], acc [..., G, Dh]) extended by n partial states
  (m_n, l_n [..., G, n], o_n [..., G, n, Dh] over disjoint keys):
  m' = max(m, max_n m_n), l' = l·e^(m − m') + Σ_n l_n·e^(m_n − m'), likewise acc with o_n."""
  m, l, acc = state
  m_parts, l_parts, o_parts = parts
  m_new = jnp.maximum(m, jnp.max(m_parts, axis=-1))
  weight = jnp.exp(m_parts - m_new[..., None])
  correction = jnp.exp(m - m_new)
  l = l * correction + jnp.sum(l_parts * weight, axis=-1)
  acc = acc * correction[..., None] + jnp.einsum("...n,...nd->...d", weight, o_parts)
  return m_new, l, acc


def _merge_chunks(state: tuple[Array, Array, Array], parts: tuple[Array, Array, Array],
                  owner: Array):
  """The online-softmax state of the slots (m, l [KV, S, G], acc [KV, S, G, Dh]) extended by
  chunk partials (m_c, l_c [KV, K, G], o_c [KV, K, G, Dh]) over disjoint keys, chunk c of slot
  `owner[c]`: m'_s = max(m_s, max_{c ∈ s} m_c), l'_s = l_s·e^(m_s − m'_s) + Σ_{c ∈ s}
  l_c·e^(m_c − m'_s), likewise acc with o_c (the sums over a slot's chunks as one-hot matmuls).
  m_s is finite (every slot's own key is in the state), so a chunk with no visible key
  (m_c = −∞) has weight 0."""
  m, l, acc = state
  m_parts, l_parts, o_parts = parts
  onehot = owner[:, None] == jnp.arange(m.shape[1])[None, :]  # [K, S]
  chunk_max = jnp.max(jnp.where(onehot[None, :, None, :], m_parts[..., None], -jnp.inf), axis=1)
  m_new = jnp.maximum(m, jnp.swapaxes(chunk_max, 1, 2))  # [KV, S, G]
  weight = jnp.exp(m_parts - m_new[:, owner])  # [KV, K, G]
  spread = onehot.astype(jnp.float32)
  correction = jnp.exp(m - m_new)
  l = l * correction + jnp.einsum("kcg,cs->ksg", l_parts * weight, spread)
  acc = acc * correction[..., None] + jnp.einsum("kcgd,cs->ksgd", o_parts * weight[..., None],
                                                 spread)
  return m_new, l, acc


def decode_attention(
  q: Array, k_self: Array, v_self: Array, pool: PagedKV, layer: Array | int, table: Array,
  lengths: Array, *, kernel: str | None, windows: tuple[int | None, ...] | None,
  window: Array | None = None, **options: Any,
) -> Array:
  """`paged_attention` with the cached keys read by the decode `kernel` (from
  `paged_kernels.decode_kernel`; None: the pure-JAX loop) on the layers without a sliding
  window, which the kernels lack: `windows` the model's static per-layer windows
  (`ModelConfig.layer_windows`, None: no layer has one), `window` this layer's (traced,
  `NO_WINDOW` for full attention). Where windows differ between layers, `lax.cond` on the
  layer's window picks the kernel or the loop; `options` are `paged_attention`'s."""
  args = (q, k_self, v_self, pool, layer, table, lengths)
  if kernel is None or (windows is not None and None not in windows):
    return paged_attention(*args, window=window, **options)
  if windows is None:
    return paged_attention(*args, kernel=kernel, **options)
  return jax.lax.cond(window == NO_WINDOW,
                      lambda *a: paged_attention(*a, kernel=kernel, **options),
                      lambda *a: paged_attention(*a, window=window, **options), *args)


def unstacked_layers(model: Transformer) -> tuple[dict[str, Array], ...] | None:
  """Each layer's parameters sliced out of the stack once, for a decode loop that runs the
  layers unrolled (`layer_unroll` = L, the CPU default): built before the loop, they are
  loop-invariant operands, where slicing the stack inside every step copied all the weights
  per step. None when the layers are scanned (accelerators)."""
  c = model.config
  if layer_unroll(c) < c.num_layers:
    return None
  stacked = model.layers.stacked()
  return tuple({name: w[i] for name, w in stacked.items()} for i in range(c.num_layers))


def decode_hidden(
  model: Transformer, tokens: Array, pool: PagedKV, table: Array, lengths: Array, *,
  blocks_per_step: int = 4, layers: tuple[dict[str, Array], ...] | None = None,
  recent: PagedKV | None = None, recent_count: Array | None = None, attention: str = "auto",
) -> tuple[Array, Array, Array]:
  """One decode step of every slot: `tokens` [S] at positions `lengths` + `recent_count` [S]
  attending to their `lengths` tokens in the pool's blocks (0 for an idle slot) and their
  `recent_count` recent tokens (`recent`: k, v [L, S, M, KV, Dh], see `paged_attention`; None:
  none); `layers` from `unstacked_layers` (None scans the stacked parameters); `attention` the
  decode attention (`paged_kernels.DECODE_ATTENTION`: "auto" runs the backend's kernel where
  `paged_kernels.unsupported` allows, else the pure-JAX "blockwise" loop).

  Returns:
    (hidden [S, D] final-normed, k_new, v_new [L, S, KV, Dh] the tokens' keys / values, to be
    written with `write_recent`).
  """
  c = model.config
  x = input_embeddings(model.embed[...], tokens[:, None], c)
  position = lengths if recent_count is None else lengths + recent_count
  cos_tables, sin_tables = rope_tables(position[:, None], c)
  kernel = paged_kernels.decode_kernel(attention, dtype=c.dtype, pool_dtype=pool.k.dtype,
                                       head_dim=c.head_dim, block_size=pool.block_size,
                                       blocks_per_step=blocks_per_step)
  options = dict(scale=c.attention_scale, softcap=c.attention_softcap,
                 blocks_per_step=blocks_per_step, kernel=kernel, windows=c.layer_windows)

  def body(x, xs):
    p, window, rope, layer, recent_k, recent_v = xs
    h = norm(x, p["attn_norm"], c)
    cos, sin = layer_cos_sin(cos_tables, sin_tables, rope)
    q, k, v = project_qkv(p, h, cos, sin, c)
    k, v = k[:, 0].astype(pool.k.dtype), v[:, 0].astype(pool.v.dtype)
    attn = decode_attention(q[:, 0], k, v, pool, layer, table, lengths, window=window,
                            recent_k=recent_k, recent_v=recent_v, recent_count=recent_count,
                            **options)
    return layer_residuals(p, x, attn[:, None], c), (k, v)

  windows, ropes = layer_windows(c), layer_rope_index(c)
  recent_k, recent_v = (None, None) if recent is None else recent
  if layers is None:
    xs = (model.layers.stacked(), windows, ropes, jnp.arange(c.num_layers), recent_k, recent_v)
    x, (k_new, v_new) = jax.lax.scan(body, x, xs, unroll=layer_unroll(c))
  else:
    new = []
    for i, p in enumerate(layers):
      pick = lambda a: None if a is None else a[i]  # noqa: E731
      x, kv = body(x, (p, pick(windows), pick(ropes), i, pick(recent_k), pick(recent_v)))
      new.append(kv)
    k_new, v_new = (jnp.stack(parts) for parts in zip(*new))
  return norm(x, model.final_norm[...], c)[:, 0], k_new, v_new


def write_recent(pool: PagedKV, recent: PagedKV, table: Array, lengths: Array,
                 count: Array) -> PagedKV:
  """The pool with each slot's first `count` [S] recent tokens (k, v [L, S, M, KV, Dh]) at
  positions lengths, lengths + 1, … (the rest go to the null block)."""
  bs = pool.block_size
  layers, slots, m = recent.k.shape[:3]
  positions = lengths[:, None] + jnp.arange(m)[None, :]  # [S, M]
  valid = jnp.arange(m)[None, :] < count[:, None]
  block = jnp.take_along_axis(table, positions // bs, axis=1, mode="clip")
  block = jnp.where(valid, block, NULL_BLOCK).reshape(-1)
  offset = jnp.where(valid, positions % bs, 0).reshape(-1)

  def put(x, new):  # new [L, S, M, KV, Dh] -> [L, KV, S·M, Dh] at (block, offset)
    new = jnp.moveaxis(new.reshape(layers, slots * m, *new.shape[3:]), 2, 1)
    return x.at[:, :, block, offset].set(new.astype(x.dtype))

  return PagedKV(k=put(pool.k, recent.k), v=put(pool.v, recent.v))


def write_blocks(pool: PagedKV, k: Array, v: Array, blocks: Array) -> PagedKV:
  """The pool with contiguous keys / values k, v [L, R, n·bs, KV, Dh] (a prefill's) stored in
  `blocks` [R, n] (null for rows or blocks to discard)."""
  layers, rows, length, kv, dh = k.shape
  bs = pool.block_size
  ids = blocks.reshape(-1)

  def laid_out(x):  # [L, R, n·bs, KV, Dh] -> [L, KV, R·n, bs, Dh]
    x = x.reshape(layers, rows * (length // bs), bs, kv, dh)
    return jnp.moveaxis(x, 3, 1).astype(pool.k.dtype)

  return PagedKV(k=pool.k.at[:, :, ids].set(laid_out(k)), v=pool.v.at[:, :, ids].set(laid_out(v)))


def copy_blocks(pool: PagedKV, source: Array, target: Array) -> PagedKV:
  """The pool with block `source[i]` copied to `target[i]` for every i ([n] int32; a pair of
  null blocks is a no-op)."""
  return PagedKV(k=pool.k.at[:, :, target].set(pool.k[:, :, source]),
                 v=pool.v.at[:, :, target].set(pool.v[:, :, source]))
