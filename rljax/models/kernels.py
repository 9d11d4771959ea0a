"""Accelerator attention kernels behind `rljax.models.attention.self_attention`, each with the
check of what it supports; a call it cannot run takes the pure-JAX path.

* **cuDNN flash attention** (GPU): `jax.nn.dot_product_attention(implementation="cudnn",
  is_causal=True, query_seq_lengths=, key_value_seq_lengths=, local_window_size=(w − 1, 0))`.
  It needs bfloat16 / float16 inputs, head_dim a multiple of 8 and at most 128 (256 on Hopper
  and later), and right-padded rows: rows whose real tokens are one contiguous run (left and /
  or right padding) are rolled so the run starts at slot 0, attended with their lengths, and
  rolled back. It has no segment ids and no soft-cap (packed or soft-capped batches take the
  blockwise core), and runs self-attention only (a KV-cache chunk takes the pure-JAX path).
* **Pallas splash attention** (TPU; `jax.experimental.pallas.ops.tpu.splash_attention`): a
  causal or local mask, segment ids (padding becomes its own segment, so any key mask works),
  soft-cap, grouped-query heads; self-attention with a length that is a multiple of 128.

Both measure the sliding window in slots, which equals the window in positions when adjacent
real slots of a segment have consecutive positions and no padding lies inside a segment (every
batch rljax builds). That condition (and the contiguous run cuDNN needs) depends on the data,
so it is checked in the program: a batch that breaks it runs the pure-JAX path (`lax.cond`),
never a wrong kernel. A model with per-layer windows switches between one kernel per distinct
window (`lax.switch` on the layer's traced window).

`unsupported` says why a kernel cannot run a call (None if it can); `kernel_for` picks the
backend's kernel for `ModelConfig.attention="auto"`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
KERNELS = ("cudnn", "splash")
_BACKEND_KERNEL = {"gpu": "cudnn", "tpu": "splash"}
_SPLASH_LANES = 128  # splash's lengths and blocks are multiples of this


def _backend() -> str:
  """The platform the kernels are chosen for (a seam: the CPU tests set it to run a kernel's
  reference mode, cuDNN's "xla" implementation and splash's Pallas interpreter)."""
  return jax.default_backend()


def kernel_for(attention: str) -> str | None:
  """The kernel `attention` ("auto" or a kernel name) asks for on this backend, or None."""
  if attention in KERNELS:
    return attention
  return _BACKEND_KERNEL.get(_backend()) if attention == "auto" else None


def _cudnn_max_head_dim() -> int:
  """128, or 256 on compute capability >= 9 (Hopper)."""
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return 256 if float(capability) >= 9.0 else 128


def unsupported(
  kernel: str,
  *,
  dtype: Any,
  head_dim: int,
  num_queries: int,
  num_keys: int,
  self_attention: bool,
  segments: bool,
  softcap: float | None,
) -> str | None:
  """Why `kernel` cannot run a call with these static features (None: it can)."""
  backend = _backend()
  if kernel == "cudnn":
    if backend != "gpu":
      return f"cuDNN attention needs a GPU (backend: {backend})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    limit = _cudnn_max_head_dim()
    if head_dim % 8 or head_dim > limit:
      return f"cuDNN attention needs head_dim a multiple of 8 and <= {limit}, got {head_dim}"
    if segments:
      return "cuDNN attention has no segment ids (packed rows)"
    if softcap is not None:
      return "cuDNN attention has no logit soft-cap"
  elif kernel == "splash":
    if backend != "tpu":
      return f"splash attention needs a TPU (backend: {backend})"
    if num_queries % _SPLASH_LANES:
      return f"splash attention needs a length that is a multiple of 128, got {num_queries}"
  else:
    raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
  if not self_attention or num_queries != num_keys:
    return f"{kernel} attention runs self-attention only (not a chunk of a KV cache)"
  return None


# ----------------------------------------------------------------------------------------------
# Conditions on the data, checked in the program.
# ----------------------------------------------------------------------------------------------


def _one_run(key_mask: Array) -> Array:
  """Whether every row's real slots are one contiguous run (scalar bool)."""
  starts = key_mask[:, :1].astype(jnp.int32) + jnp.sum(key_mask[:, 1:] & ~key_mask[:, :-1], -1,
                                                        dtype=jnp.int32)[:, None]
  return jnp.all(starts <= 1)


def _window_in_slots(key_mask: Array, positions: Array, segment_ids: Array | None) -> Array:
  """Whether a window in slots equals the window in positions: adjacent real slots of one
  segment have consecutive positions, and no padding lies between two real slots of a segment
  (scalar bool)."""
  segments = jnp.zeros_like(positions) if segment_ids is None else segment_ids
  same = key_mask[:, 1:] & key_mask[:, :-1] & (segments[:, 1:] == segments[:, :-1])
  consecutive = jnp.all(~same | (positions[:, 1:] - positions[:, :-1] == 1))
  # The segment of the last real slot before each slot (-1: none yet).
  t = jnp.arange(key_mask.shape[-1])
  last_real = jax.lax.cummax(jnp.where(key_mask, t, -1), axis=1)
  before = jnp.concatenate([jnp.full_like(last_real[:, :1], -1), last_real[:, :-1]], axis=1)
  previous = jnp.take_along_axis(segments, jnp.maximum(before, 0), axis=1)
  reentry = key_mask & (before >= 0) & (before < t - 1) & (previous == segments)
  return consecutive & ~jnp.any(reentry)


# ----------------------------------------------------------------------------------------------
# The kernels.
# ----------------------------------------------------------------------------------------------


def _roll_rows(x: Array, shift: Array) -> Array:
  """Row b of x [B, T, ...] rolled left by shift[b] slots (slot t takes slot t + shift)."""
  t = x.shape[1]
  index = (jnp.arange(t)[None, :] + shift[:, None]) % t
  return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def cudnn_attention(
  q: Array, k: Array, v: Array, key_mask: Array, *, window: int | None, scale: float,
  implementation: str | None = None,
) -> Array:
  """Causal attention of rows whose real slots are one contiguous run, by
  `jax.nn.dot_product_attention` (cuDNN on a GPU; `implementation` overrides, e.g. "xla").

  Each row is rolled left by its first real slot (right padding), attended with
  query / key lengths = its real slots (at least 1, so an empty row stays finite) and
  `local_window_size=(window − 1, 0)`, and rolled back; padding queries get 0.
  """
  if implementation is None:
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
  key_mask = key_mask.astype(bool)
  shift = jnp.argmax(key_mask, axis=-1)
  lengths = jnp.maximum(jnp.sum(key_mask, axis=-1, dtype=jnp.int32), 1)
  q, k, v = (_roll_rows(x, shift) for x in (q, k, v))
  out = jax.nn.dot_product_attention(
    q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
    key_value_seq_lengths=lengths, implementation=implementation,
    local_window_size=None if window is None else (window - 1, 0),
  )
  out = _roll_rows(out, -shift)
  return jnp.where(key_mask[:, :, None, None], out, jnp.zeros((), out.dtype))


def _splash_block(length: int) -> int:
  return next(b for b in (512, 256, 128) if length % b == 0)


def splash_attention(
  q: Array, k: Array, v: Array, key_mask: Array, segment_ids: Array | None, *,
  window: int | None, scale: float, softcap: float | None, interpret: bool | None = None,
) -> Array:
  """Causal (or local: keys within `window` slots) attention by the Pallas splash kernel, one
  kernel over the heads vmapped over rows. Padding slots form their own segment, so real
  queries never see them; queries are pre-scaled (splash computes q·k unscaled), then
  soft-capped by the kernel. `interpret` (default: off a TPU) runs Pallas's interpreter."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, t, h, _ = q.shape
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  if window is None:
    head_mask = sm.CausalMask((t, t))
  else:
    head_mask = sm.LocalMask((t, t), (window - 1, 0), 0)
  block = _splash_block(t)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * h), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                              interpret=interpret)
  pad = jnp.iinfo(jnp.int32).min
  segments = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  segments = jnp.where(key_mask.astype(bool), segments, pad)
  heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, T, H, D] <-> [B, H, T, D]
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
    heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), segments
  )
  return heads_first(out)


def kernel_attention(
  kernel: str,
  q: Array,
  k: Array,
  v: Array,
  key_mask: Array,
  positions: Array,
  segment_ids: Array | None,
  *,
  windows: tuple[int | None, ...] | None,
  window: Array | None,
  scale: float,
  softcap: float | None,
  fallback: Callable[[Array, Array, Array], Array],
) -> Array:
  """`kernel`'s attention, where the data allow it (else `fallback(q, k, v)`), with this layer's
  `window` one of the model's `windows` (a `lax.switch` over one kernel per distinct window)."""
  key_mask = key_mask.astype(bool)

  def run(static_window: int | None) -> Callable[[Array, Array, Array], Array]:
    if kernel == "cudnn":
      return functools.partial(cudnn_attention, key_mask=key_mask, window=static_window,
                               scale=scale)
    return functools.partial(splash_attention, key_mask=key_mask, segment_ids=segment_ids,
                             window=static_window, scale=scale, softcap=softcap)

  distinct = sorted(set(windows or (None,)), key=lambda w: (w is None, w or 0))
  if len(distinct) == 1:
    fast = run(distinct[0])
  else:
    from rljax.models.attention import NO_WINDOW

    values = jnp.asarray([NO_WINDOW if w is None else w for w in distinct], jnp.int32)
    branches = [run(w) for w in distinct]

    def fast(q, k, v):
      return jax.lax.switch(jnp.argmax(values == window), branches, q, k, v)

  exact = []
  if kernel == "cudnn":
    exact.append(_one_run(key_mask))
  if any(w is not None for w in distinct):
    exact.append(_window_in_slots(key_mask, positions, segment_ids))
  if not exact:
    return fast(q, k, v)
  return jax.lax.cond(functools.reduce(jnp.logical_and, exact), fast, fallback, q, k, v)


__all__ = ["KERNELS", "cudnn_attention", "kernel_attention", "kernel_for", "splash_attention",
           "unsupported"]
