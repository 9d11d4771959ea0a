"""GPU check of the attention kernels (run once when a GPU is lent; issue 11).

  python benchmarks/gpu_attention.py            # parity, then timings

1. Parity: bfloat16 cuDNN flash attention (through the `self_attention` adapter and directly)
   against the float32 naive reference, values and gradients, relative error (goal <= 2e-2).
2. Timings (median of 5 after warm-up, forward + backward of the attention core) at
   T = 1k / 4k / 8k / 16k, B=1, 8 query / 4 KV heads, head_dim 64, bfloat16: cuDNN vs the
   pure-JAX blockwise core vs naive (naive skipped where its [B, H, T, T] scores exceed 8 GiB).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from rljax.models import attention as A
from rljax.models import kernels as K
from rljax.models.transformer import positions_from_mask

H, KV, DH = 8, 4, 64


def _inputs(t, b=1, dtype=jnp.bfloat16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, H, DH), dtype)
  k, v = (jax.random.normal(x, (b, t, KV, DH), dtype) for x in ks[1:])
  mask = jnp.ones((b, t), bool).at[0, : t // 8].set(False)  # left padding on row 0
  return q, k, v, mask, positions_from_mask(mask)


def _relative(a, b, real):
  a, b = (jnp.where(real, x.astype(jnp.float32), 0.0) for x in (a, b))
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def parity(t=2048, window=None):
  q, k, v, mask, positions = _inputs(t, b=2)
  real = mask[:, :, None, None]
  dense = A.causal_attention_mask(mask, positions, positions, sliding_window=window)

  def grads(f, *args):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.where(
      real, f(q, k, v).astype(jnp.float32) ** 2, 0.0)), (0, 1, 2)))(*args)

  cudnn = grads(lambda q, k, v: K.cudnn_attention(q, k, v, mask, window=window,
                                                  scale=DH**-0.5), q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = grads(lambda q, k, v: A.naive_attention(q, k, v, dense), *f32)
  out_c = K.cudnn_attention(q, k, v, mask, window=window, scale=DH**-0.5)
  out_r = A.naive_attention(*f32, dense)
  errors = [_relative(out_c, out_r, real)] + [
    _relative(a, b, True) for a, b in zip(cudnn[1], ref[1])
  ]
  print(f"parity T={t} window={window}: relative error out / dq / dk / dv = "
        + " / ".join(f"{e:.2e}" for e in errors)
        + ("  OK" if max(errors) <= 2e-2 else "  ABOVE 2e-2"))


def timing(t):
  q, k, v, mask, positions = _inputs(t)
  dense = None

  def fwd_bwd(f):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2)))

  paths = {
    "cudnn": lambda q, k, v: K.cudnn_attention(q, k, v, mask, window=None, scale=DH**-0.5),
    "blockwise": lambda q, k, v: A.blockwise_attention(q, k, v, mask, positions),
  }
  if H * t * t * 4 <= 8 * 2**30:
    dense = A.causal_attention_mask(mask, positions, positions)
    paths["naive"] = lambda q, k, v: A.naive_attention(q, k, v, dense)
  times = {}
  for name, f in paths.items():
    g = fwd_bwd(f)
    jax.block_until_ready(g(q, k, v))
    runs = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(g(q, k, v))
      runs.append(time.perf_counter() - start)
    times[name] = statistics.median(runs)
  flops = 4 * 2 * H * DH * t * t / 2 * 3.5  # fwd 2 matmuls, bwd 5 (causal half)
  line = ", ".join(f"{n} {s * 1e3:.2f} ms ({flops / s / 1e12:.0f} TFLOP/s)" for n, s in
                   times.items())
  print(f"T={t}: {line}; blockwise / cudnn = {times['blockwise'] / times['cudnn']:.1f}x")


def main():
  print(jax.devices(), "jax", jax.__version__)
  if jax.default_backend() != "gpu":
    raise SystemExit("this script needs a GPU")
  for window in (None, 512):
    parity(window=window)
  for t in (1024, 4096, 8192, 16384):
    timing(t)


if __name__ == "__main__":
  main()
