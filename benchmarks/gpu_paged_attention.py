"""GPU check of the paged decode kernel (run once when a GPU is lent; issue 12).

  python benchmarks/gpu_paged_attention.py           # parity, then timings
  python benchmarks/gpu_paged_attention.py --smoke   # tiny shapes on CPU, Pallas interpreter:
                                                     # checks this script, times nothing real

1. Parity: `paged_attention(..., kernel="pallas")` (JAX's Pallas GPU paged-attention kernel, its
   residuals merged with the own and recent keys) against the pure-JAX loop in float32 (goal
   <= 1e-5 max abs) and in bfloat16 against the float32 loop (goal <= 2e-2 relative), with and
   without soft-cap: 32 slots, 32 query / 8 KV heads, head_dim 128, blocks of 16, lengths up to
   2048 (16 table partitions of 16 blocks) and 2176 (17 compute blocks: 16 partitions of 16,
   the table padded), one idle slot, up to 16 recent keys.
2. Timings (median of 10 after warm-up, one layer's decode attention, bfloat16, the layer index
   traced as under scanned layers) at S = 32 / 128 slots, lengths all at T (fixed) or drawn
   geometric with mean T / 8 capped at T (long-tailed: the loop runs to the longest slot, the
   kernel stops each row at its own length), T = 1k / 4k / 16k: kernel vs loop, and the
   bandwidth of the keys / values the live tokens hold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rljax.models import kernels as K
from rljax.models import paged_kernels as PK
from rljax.models.paged_kv import PagedKV, paged_attention

H, KV, DH, BS, PER_STEP, LAYERS, RECENT = 32, 8, 128, 16, 8, 2, 16


def _case(slots, lengths, dtype, seed=0, h=H, kv=KV, dh=DH, bs=BS, per_step=PER_STEP):
  """A pool holding every slot's `lengths` tokens in shuffled private blocks (+ the null block),
  tables of width max(lengths) rounded up to `per_step` blocks."""
  rng = np.random.default_rng(seed)
  need = -(-lengths // bs)
  width = max(per_step, -(-int(need.max()) // per_step) * per_step)
  nb = 1 + int(need.sum())
  ids = rng.permutation(np.arange(1, nb))
  table = np.zeros((slots, width), np.int32)
  start = 0
  for s, n in enumerate(need):
    table[s, :n] = ids[start:start + n]
    start += n
  keys = jax.random.split(jax.random.key(seed), 7)
  pool = PagedKV(*(jax.random.normal(k, (LAYERS, kv, nb, bs, dh), dtype) for k in keys[:2]))
  q = jax.random.normal(keys[2], (slots, h, dh), dtype)
  k_self, v_self = (jax.random.normal(k, (slots, kv, dh), dtype) for k in keys[3:5])
  recent_k, recent_v = (jax.random.normal(k, (slots, RECENT, kv, dh), dtype) for k in keys[5:])
  count = jnp.asarray(rng.integers(0, RECENT + 1, slots), jnp.int32)
  return (q, k_self, v_self, pool, jnp.asarray(table), jnp.asarray(lengths, jnp.int32),
          dict(recent_k=recent_k, recent_v=recent_v, recent_count=count))


def _attention(kernel, softcap, per_step):
  @jax.jit
  def run(q, k_self, v_self, pool, layer, table, lengths, recent):
    return paged_attention(q, k_self, v_self, pool, layer, table, lengths, softcap=softcap,
                           blocks_per_step=per_step, kernel=kernel, **recent)
  return run


def parity(slots=32, max_length=2048, shape=None):
  shape = shape or {}
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, max_length + 1, slots)
  lengths[0], lengths[-1] = 0, max_length  # an idle slot; the longest sets the table width
  per_step = shape.get("per_step", PER_STEP)
  for softcap in (None, 30.0):
    q, k_self, v_self, pool, table, lens, recent = _case(slots, lengths, jnp.float32, **shape)
    args = (q, k_self, v_self, pool, jnp.int32(1), table, lens, recent)
    want = _attention(None, softcap, per_step)(*args)
    got = _attention("pallas", softcap, per_step)(*args)
    f32 = float(jnp.max(jnp.abs(got - want)))
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, args)
    got16 = _attention("pallas", softcap, per_step)(*low).astype(jnp.float32)
    rel = float(jnp.linalg.norm(got16 - want) / jnp.linalg.norm(want))
    print(f"parity T<={max_length} softcap={softcap}: float32 max abs {f32:.2e} "
          f"({'OK' if f32 <= 1e-5 else 'ABOVE 1e-5'}), bfloat16 relative {rel:.2e} "
          f"({'OK' if rel <= 2e-2 else 'ABOVE 2e-2'})")


def _median_time(f, args, repeats=10):
  jax.block_until_ready(f(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    runs.append(time.perf_counter() - start)
  return statistics.median(runs)


def timing(slots, max_length, tailed):
  rng = np.random.default_rng(2)
  if tailed:
    lengths = np.minimum(rng.geometric(8 / max_length, slots), max_length)
  else:
    lengths = np.full(slots, max_length)
  q, k_self, v_self, pool, table, lens, recent = _case(slots, lengths, jnp.bfloat16)
  args = (q, k_self, v_self, pool, jnp.int32(1), table, lens, recent)
  times = {name: _median_time(_attention(kernel, None, PER_STEP), args)
           for name, kernel in (("pallas", "pallas"), ("loop", None))}
  live = 2 * int(lengths.sum()) * KV * DH * 2  # k and v bytes of the live tokens, bfloat16
  kind = "long-tailed" if tailed else "fixed"
  print(f"S={slots} T={max_length} {kind} (mean length {lengths.mean():.0f}): "
        + ", ".join(f"{n} {s * 1e6:.0f} us ({live / s / 1e9:.0f} GB/s)" for n, s in times.items())
        + f"; loop / pallas = {times['loop'] / times['pallas']:.2f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes on CPU through the Pallas interpreter")
  smoke = parser.parse_args().smoke
  print(jax.devices(), "jax", jax.__version__)
  if smoke:
    K._backend = lambda: "gpu"  # the seam the CPU tests use: the kernel runs interpreted
    parity(slots=4, max_length=40, shape=dict(h=4, kv=2, dh=16, bs=4, per_step=4))
    return
  if jax.default_backend() != "gpu":
    raise SystemExit("this script needs a GPU (or --smoke)")
  reason = PK.unsupported("pallas", dtype=jnp.bfloat16, pool_dtype=jnp.bfloat16, head_dim=DH,
                          block_size=BS, blocks_per_step=PER_STEP)
  if reason is not None:
    raise SystemExit(reason)
  for max_length in (2048, 2176):
    parity(max_length=max_length)
  for slots in (32, 128):
    for max_length in (1024, 4096, 16384):
      for tailed in (False, True):
        timing(slots, max_length, tailed)


if __name__ == "__main__":
  main()
