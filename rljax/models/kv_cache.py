"""A static-shape key/value cache for incremental decoding with the scanned `Transformer`.

The cache holds every layer's keys and values in `S` slots (`S` fixed when the cache is made, so
a decode loop never changes shape). Slots are shared by all rows: a batch of left-padded prompts
of length P fills slots 0..P-1 in one call (prefill), and decode step t writes slot P + t. A
boolean `mask` marks the slots that hold real tokens (padding and not-yet-written slots are never
attended to) and `positions` holds their position ids (RoPE was applied with these; the sliding
window of Mistral-type models is measured in them).

The layers are applied with `jax.lax.scan` over the stacked parameters *and* the per-layer cache
slices (scanned inputs); each layer returns the keys/values of the new tokens (scanned outputs),
which are written into the stacked cache with one `dynamic_update_slice` after the scan, so the
program does not grow with depth and the cache buffer can be updated in place inside a loop.

The numerics are those of `Transformer.__call__`: the same building blocks, the same masks. A
query attends to the cached slots plus the new tokens, so logits from the cache equal the full
forward's logits of the concatenated sequence (up to float summation order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from rljax.models.attention import Attend, layer_windows, self_attention
from rljax.models.config import ModelConfig
from rljax.models.transformer import (
  input_embeddings,
  layer_cos_sin,
  layer_residuals,
  layer_rope_index,
  norm,
  positions_from_mask,
  project_qkv,
  rope_tables,
)

if TYPE_CHECKING:
  from rljax.models.transformer import Transformer

Array = jax.Array


class KVCache(NamedTuple):
  """Keys and values of all layers in `S` static slots (a pytree).

  Attributes:
    k: [L, B, S, KV, Dh] keys (RoPE applied), in the model's activation dtype.
    v: [L, B, S, KV, Dh] values.
    mask: [B, S] bool, True where the slot holds a real token.
    positions: [B, S] int32 position ids of the tokens in the slots (0 where empty).
  """

  k: Array
  v: Array
  mask: Array
  positions: Array

  @property
  def max_length(self) -> int:
    """S, the number of slots."""
    return self.k.shape[2]

  def repeat(self, n: int) -> KVCache:
    """Each row repeated `n` times contiguously (row i → rows i*n .. i*n+n-1)."""
    if n == 1:
      return self
    return KVCache(
      k=jnp.repeat(self.k, n, axis=1),
      v=jnp.repeat(self.v, n, axis=1),
      mask=jnp.repeat(self.mask, n, axis=0),
      positions=jnp.repeat(self.positions, n, axis=0),
    )


def init_kv_cache(
  config: ModelConfig, batch_size: int, max_length: int, *, dtype: Any = None
) -> KVCache:
  """An empty cache (all slots masked) for `batch_size` rows and `max_length` slots.

  Args:
    config: the model's config (layers, kv heads, head_dim).
    batch_size: B.
    max_length: S, e.g. prompt length + max_new_tokens.
    dtype: dtype of k/v; default `config.dtype` (the activations' dtype).
  """
  if not isinstance(max_length, int) or max_length < 1:
    raise ValueError(f"`max_length` must be an int >= 1; got {max_length!r}.")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size!r}.")
  shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
  dtype = config.dtype if dtype is None else dtype
  return KVCache(
    k=jnp.zeros(shape, dtype),
    v=jnp.zeros(shape, dtype),
    mask=jnp.zeros((batch_size, max_length), bool),
    positions=jnp.zeros((batch_size, max_length), jnp.int32),
  )


def decoder_layer_with_cache(
  p: dict[str, Array],
  x: Array,
  cos: Array,
  sin: Array,
  attend: Attend,
  layer_k: Array,
  layer_v: Array,
  index: Array,
  config: ModelConfig,
  window: Array | None = None,
) -> tuple[Array, Array, Array]:
  """One decoder layer on new tokens x [B, T, D] attending to this layer's cache plus themselves.

  Args:
    attend: the new tokens' attention over the S slots (`self_attention` with
      `query_offset=index`); window: this layer's sliding window.
    layer_k, layer_v: [B, S, KV, Dh] this layer's cache (before the new tokens).
    index: the slot of the first new token (scalar int).

  Returns:
    (x_out [B, T, D], k_new [B, T, KV, Dh], v_new [B, T, KV, Dh]).
  """
  h = norm(x, p["attn_norm"], config)
  q, k, v = project_qkv(p, h, cos, sin, config)
  k, v = k.astype(layer_k.dtype), v.astype(layer_v.dtype)
  all_k = jax.lax.dynamic_update_slice_in_dim(layer_k, k, index, axis=1)
  all_v = jax.lax.dynamic_update_slice_in_dim(layer_v, v, index, axis=1)
  return layer_residuals(p, x, attend(q, all_k, all_v, window), config), k, v


def scan_layers_with_cache(
  stacked: dict[str, Array],
  x: Array,
  cos: Array,
  sin: Array,
  attend: Attend,
  cache_k: Array,
  cache_v: Array,
  index: Array,
  config: ModelConfig,
) -> tuple[Array, Array, Array]:
  """All layers by `jax.lax.scan` over (stacked params, per-layer windows and RoPE rows of the
  `rope_tables` cos, sin, cache_k, cache_v); returns x and the cache.

  The per-layer cache slices are scanned inputs; the new tokens' keys/values [L, B, T, KV, Dh]
  are scanned outputs, written into the stacked [L, B, S, KV, Dh] cache at slot `index`.
  """

  def body(carry: Array, xs):
    p, window, rope, layer_k, layer_v = xs
    layer_cos, layer_sin = layer_cos_sin(cos, sin, rope)
    out, k, v = decoder_layer_with_cache(p, carry, layer_cos, layer_sin, attend, layer_k,
                                         layer_v, index, config, window)
    return out, (k, v)

  xs = (stacked, layer_windows(config), layer_rope_index(config), cache_k, cache_v)
  x, (new_k, new_v) = jax.lax.scan(body, x, xs)
  cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, new_k, index, axis=2)
  cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, new_v, index, axis=2)
  return x, cache_k, cache_v


def hidden_states_with_cache(
  model: Transformer,
  input_ids: Array,
  cache: KVCache,
  index: Array | int,
  attention_mask: Array | None = None,
  positions: Array | None = None,
) -> tuple[Array, KVCache]:
  """Final hidden states [B, T, D] of new tokens written at slots index..index+T-1, and the cache.

  Args:
    model: a `Transformer`.
    input_ids: [B, T] new token ids.
    cache: the `KVCache` holding the earlier tokens (B rows, S slots).
    index: slot of the first new token (Python int or traced scalar). All rows share it; slots
      index..index+T-1 must fit in S (checked when `index` is a Python int; a traced index past
      the end is clamped by `dynamic_update_slice` and gives wrong results).
    attention_mask: [B, T], 1 marks a real new token (default all ones); a 0 slot is never
      attended to, now or later (left padding of a prompt).
    positions: [B, T] position ids; default (number of valid cached slots) + cumsum(mask) - 1
      clipped at the count, which continues the positions of `Transformer.__call__` on the
      concatenated sequence.

  Returns:
    (hidden [B, T, D] in `config.dtype`, updated cache).
  """
  c = model.config
  if input_ids.ndim != 2:
    raise ValueError(f"`input_ids` must be [B, T]; got shape {input_ids.shape}.")
  b, t = input_ids.shape
  if cache.mask.shape[0] != b:
    raise ValueError(
      f"`cache` has batch size {cache.mask.shape[0]} but `input_ids` has shape {input_ids.shape}."
    )
  if isinstance(index, int) and not 0 <= index <= cache.max_length - t:
    raise ValueError(
      f"`index` {index} + {t} new tokens does not fit in the cache of {cache.max_length} slots."
    )
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), bool)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(
      f"`attention_mask` has shape {attention_mask.shape} but `input_ids` has shape "
      f"{input_ids.shape}."
    )
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    count = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
    positions = count + positions_from_mask(attention_mask)
  positions = positions.astype(jnp.int32)
  index = jnp.asarray(index, jnp.int32)
  slot_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask, index, axis=1)
  slot_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, axis=1)
  attend = self_attention(c, slot_mask, slot_positions, query_offset=index, num_queries=t)
  x = input_embeddings(model.embed[...], input_ids, c)
  cos, sin = rope_tables(positions, c)
  x, k, v = scan_layers_with_cache(
    model.layers.stacked(), x, cos, sin, attend, cache.k, cache.v, index, c
  )
  hidden = norm(x, model.final_norm[...], c)
  return hidden, KVCache(k=k, v=v, mask=slot_mask, positions=slot_positions)


def forward_with_cache(
  model: Transformer,
  input_ids: Array,
  cache: KVCache,
  index: Array | int,
  attention_mask: Array | None = None,
  positions: Array | None = None,
) -> tuple[Array, KVCache]:
  """Logits [B, T, V] (float32) of new tokens and the updated cache; see `hidden_states_with_cache`.

  Example:
    >>> cache = init_kv_cache(model.config, batch_size=B, max_length=P + N)
    >>> logits, cache = forward_with_cache(model, prompt, cache, 0, prompt_mask)   # prefill
    >>> nxt = logits[:, -1].argmax(-1)[:, None]
    >>> logits, cache = forward_with_cache(model, nxt, cache, P)                   # one step
  """
  hidden, cache = hidden_states_with_cache(
    model, input_ids, cache, index, attention_mask, positions
  )
  return model.logits_from_hidden(hidden), cache
