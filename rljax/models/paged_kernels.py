"""Decode kernels behind `rljax.models.paged_kv.decode_attention`, each with the check of what it
supports; a call a kernel cannot run takes the pure-JAX `paged_attention` ("blockwise": the
online softmax over blocks in a `lax.while_loop`).

* **Pallas paged attention** ("pallas", GPU: the Triton kernel of
  `jax.experimental.pallas.ops.gpu.paged_attention`). One query per row against its pages; a
  grid of (row, head block, partition of the block table), each partition stopping at the
  row's length (a decode step's cost follows each row's length). The public function returns
  the normalized output only, but the engine's query also attends to its own key and to the
  decode loop's recent keys, which are not in the pool (the pool is read-only inside the loop:
  `paged_kv`). So this module runs the kernel body (`paged_attention_kernel`) in its own
  `pallas_call` that returns every partition's unnormalized output o and its softmax
  residuals (m, l) in float32, and `paged_kv` merges them with the own / recent keys by their
  log-sum-exp. (Writing the recent keys into the pool before each step instead would make the
  pool a loop carry written at every step, the per-step copy the recent buffer exists to
  avoid, and would change the engine's loop.)

  Layout: the kernel reads, for one KV head, pages [pages, block_size, Dh]. The pool
  [L, KV, NB, block_size, Dh] is viewed (a free reshape) as one head of L·KV·NB pages and
  every (slot, KV head) is a kernel row with its G query heads and the block table offset to
  its layer and head, (layer·KV + kv)·NB + table: no layer slice of the pool is copied into the
  kernel's operand (with scanned layers the layer index is traced, and `pool.k[layer]` would
  be materialized for the custom call at every layer of every step).

  Constraints (Triton): every array inside the kernel has a power-of-two size, so head_dim is a
  power of two >= 16 (the dot's sizes are >= 16), block_size and blocks_per_step (pages per
  compute block) are powers of two with blocks_per_step · block_size >= 16; queries and pool
  in one of float32 (IEEE dots), bfloat16, float16; compute capability >= 8.0. Grouped-query
  heads: the G query heads of a KV head are padded to 16 rows (the kernel's `block_h`).
  Soft-cap is supported; a sliding window is not (windowed layers take the pure-JAX path).
  The scale is folded into the queries (the kernel computes q·k unscaled).
* **Ragged paged attention** ("ragged", TPU: `jax.experimental.pallas.ops.tpu.
  ragged_paged_attention`): unsupported. Its cache is one array of pages first with keys and
  values interleaved on the head axis, [pages, block_size, 2·KV, Dh], per layer, where the
  pool is [L, KV, NB, block_size, Dh] twice; its queries are ragged ([tokens, H, Dh] with
  cumulative query lengths) and must find their own keys already in the pages (kv_lens count
  them), and it returns no softmax residuals, so neither the own key nor the recent buffer can
  be merged in. Using it needs the pool in its layout and the new keys written into the pool
  before each step (see above): an engine change, not an adapter.

`unsupported` says why a kernel cannot run a decode step (None if it can); `decode_kernel`
resolves `EngineConfig.attention` ("auto": the backend's kernel where supported, else the
pure-JAX path; a kernel named explicitly that cannot run raises).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from rljax.models import kernels

Array = jax.Array
DECODE_KERNELS = ("pallas", "ragged")
DECODE_ATTENTION = ("auto", "blockwise", *DECODE_KERNELS)
_BACKEND_KERNEL = {"gpu": "pallas", "tpu": "ragged"}
_BLOCK_H = 16  # query rows per program of the Pallas kernel (a multiple of 16)
_MAX_SPLITS = 16  # partitions of the block table per row (the kernel's default k_splits)
_PALLAS_DTYPES = ("float32", "bfloat16", "float16")


def kernel_for(attention: str) -> str | None:
  """The decode kernel `attention` (one of `DECODE_ATTENTION`) asks for on this backend."""
  if attention not in DECODE_ATTENTION:
    raise ValueError(f"decode attention must be one of {list(DECODE_ATTENTION)}, got "
                     f"{attention!r}")
  if attention in DECODE_KERNELS:
    return attention
  return _BACKEND_KERNEL.get(kernels._backend()) if attention == "auto" else None


def _power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported(kernel: str, *, dtype: Any, pool_dtype: Any, head_dim: int, block_size: int,
                blocks_per_step: int) -> str | None:
  """Why decode `kernel` cannot run a step with these static features (None: it can)."""
  backend = kernels._backend()
  if kernel == "ragged":
    return ("ragged_paged_attention needs the KV pool in its own layout ([pages, block_size, "
            "2·KV, Dh] per layer, keys and values interleaved) with the new keys in the pool, "
            "and returns no softmax residuals to merge the decode loop's recent keys: not "
            f"supported by the engine's pool (backend: {backend})")
  if kernel != "pallas":
    raise ValueError(f"kernel must be one of {list(DECODE_KERNELS)}, got {kernel!r}")
  if backend != "gpu":
    return f"the Pallas paged-attention kernel needs a GPU (backend: {backend})"
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is not None and float(capability) < 8.0:
    return f"the Pallas paged-attention kernel needs compute capability >= 8.0, got {capability}"
  if jnp.dtype(dtype) != jnp.dtype(pool_dtype) or jnp.dtype(dtype).name not in _PALLAS_DTYPES:
    return (f"the Pallas paged-attention kernel needs queries and pool of one dtype among "
            f"{list(_PALLAS_DTYPES)}, got {jnp.dtype(dtype).name} and "
            f"{jnp.dtype(pool_dtype).name}")
  if not _power_of_two(head_dim) or head_dim < 16:
    return f"the Pallas paged-attention kernel needs head_dim a power of two >= 16, got {head_dim}"
  if not (_power_of_two(block_size) and _power_of_two(blocks_per_step)):
    return ("the Pallas paged-attention kernel needs block_size and blocks_per_step powers of "
            f"two, got {block_size} and {blocks_per_step}")
  if block_size * blocks_per_step < 16:
    return ("the Pallas paged-attention kernel needs block_size * blocks_per_step >= 16, got "
            f"{block_size} * {blocks_per_step}")
  return None


def decode_kernel(attention: str, **features: Any) -> str | None:
  """The kernel that runs the decode attention `attention` ("auto", "blockwise" or a kernel) for
  a step with these `unsupported` features, or None for the pure-JAX path; ValueError when a
  kernel named explicitly cannot run."""
  kernel = kernel_for(attention)
  if kernel is None:
    return None
  reason = unsupported(kernel, **features)
  if reason is None:
    return kernel
  if attention == kernel:
    raise ValueError(f"decode attention {kernel!r}: {reason} (\"auto\" falls back to the "
                     "pure-JAX path)")
  return None


def _gpu_paged_attention():
  """The module of JAX's GPU paged-attention kernel (deprecated with the Pallas Triton backend
  from JAX 0.11 on; still shipped)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*deprecated", category=DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention
  return paged_attention


def _partitions(table_width: int, blocks_per_step: int) -> tuple[int, int]:
  """(partitions, blocks per partition) of a block table: up to _MAX_SPLITS partitions of whole
  compute blocks, the table padded with null blocks to fill them (never read: each partition
  stops at the row's length)."""
  steps = -(-table_width // blocks_per_step)
  splits = min(steps, _MAX_SPLITS)
  return splits, -(-steps // splits) * blocks_per_step


def pallas_partials(
  q: Array, pool_k: Array, pool_v: Array, layer: Array | int, table: Array, lengths: Array, *,
  scale: float, softcap: float | None, blocks_per_step: int, interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
  """The softmax partials of each slot's query over its `lengths` cached keys of layer `layer`,
  by the Pallas kernel, one per partition n of the block table:

    m_n = max_j s_j,   l_n = Σ_j exp(s_j − m_n),   o_n = Σ_j exp(s_j − m_n) v_j
    (s_j = c·tanh(scale·q·k_j / c) over the cached keys j of partition n; m_n = float32 min
    and l_n = o_n = 0 for a partition past the length)

  Args:
    q: [S, H, Dh] queries; pool_k, pool_v: [L, KV, NB, bs, Dh] the pool.
    layer: the layer (an int or a traced index); table: [S, MB] int32 block table (null
      blocks past each slot's); lengths: [S] int32.
    interpret: run Pallas's interpreter (default: off a GPU, e.g. the CPU tests).

  Returns:
    (m, l [KV, S, G, n], o [KV, S, G, n, Dh]) in float32, n = min(16, ⌈MB / blocks_per_step⌉)
    partitions of whole compute blocks.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  module = _gpu_paged_attention()
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  s_count, h, dh = q.shape
  layers, kv, nb, bs, _ = pool_k.shape
  g, width = h // kv, table.shape[1]
  rows, rows_h = s_count * kv, -(-g // _BLOCK_H) * _BLOCK_H
  splits, per_split = _partitions(width, blocks_per_step)

  queries = (q * jnp.asarray(scale, q.dtype)).reshape(rows, g, dh)
  queries = jnp.pad(queries, ((0, 0), (0, rows_h - g), (0, 0)))
  first_page = (jnp.asarray(layer, jnp.int32) * kv + jnp.arange(kv, dtype=jnp.int32)) * nb
  table = jnp.pad(table, ((0, 0), (0, splits * per_split - width)))  # null blocks
  tables = (table[:, None, :] + first_page[None, :, None]).reshape(rows, splits, per_split)
  row_lengths = jnp.repeat(lengths.astype(jnp.int32), kv)
  pages = (pool_k.reshape(1, layers * kv * nb, bs, dh), pool_v.reshape(1, layers * kv * nb, bs, dh))

  kernel = functools.partial(module.paged_attention_kernel, num_heads=g,
                             pages_per_compute_block=blocks_per_step,
                             mask_value=module.DEFAULT_MASK_VALUE, attn_logits_soft_cap=softcap)
  page_spec = pl.BlockSpec((None, layers * kv * nb, bs, dh), lambda r, i, n: (0, 0, 0, 0))
  o, l, m = pl.pallas_call(
    kernel,
    grid=(rows, rows_h // _BLOCK_H, splits),  # the kernel's partition is program_id(2)
    in_specs=[
      pl.BlockSpec((None, _BLOCK_H, dh), lambda r, i, n: (r, i, 0)),  # q
      page_spec, None, page_spec, None,  # k pages, (no k scales), v pages, (no v scales)
      pl.BlockSpec((None, None, per_split), lambda r, i, n: (r, n, 0)),  # block table
      pl.BlockSpec((1,), lambda r, i, n: (r,)),  # length
    ],
    out_specs=[
      pl.BlockSpec((None, None, _BLOCK_H, dh), lambda r, i, n: (r, n, i, 0)),
      pl.BlockSpec((None, None, _BLOCK_H), lambda r, i, n: (r, n, i)),
      pl.BlockSpec((None, None, _BLOCK_H), lambda r, i, n: (r, n, i)),
    ],
    out_shape=[jax.ShapeDtypeStruct((rows, splits, rows_h, dh), jnp.float32),
               jax.ShapeDtypeStruct((rows, splits, rows_h), jnp.float32),
               jax.ShapeDtypeStruct((rows, splits, rows_h), jnp.float32)],
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
    name="rljax_paged_decode",
  )(queries, pages[0], None, pages[1], None, tables, row_lengths)

  def heads_first(x):  # [S·KV, n, Gp, ...] -> [KV, S, G, n, ...]
    x = x[:, :, :g].reshape(s_count, kv, splits, g, *x.shape[3:])
    return jnp.moveaxis(jnp.swapaxes(x, 2, 3), 1, 0)

  return heads_first(m), heads_first(l), heads_first(o)


__all__ = ["DECODE_ATTENTION", "DECODE_KERNELS", "decode_kernel", "kernel_for",
           "pallas_partials", "unsupported"]
