"""Blockwise (flash) vs. naive causal attention: training memory in T, and CPU time.

1. Memory (compile-only `memory_analysis().temp_size_in_bytes`, nothing allocated): one
   training forward + backward of a 4-layer, 512-wide Transformer (V=32000, MLP 1536, 8 query /
   4 KV heads, tied embeddings, float32; loss = mean of `logprobs_from_hidden`) at B=1, T = 1k,
   4k, 8k, 16k, with `ModelConfig(attention="naive")` vs. the default ("auto": blockwise).
2. Time (median of `--repeats` after warm-up, CPU): value_and_grad of sum(attention * w) of the
   attention core alone, at the GRPO benchmark's shape (B=16, T=256, 4 / 2 heads, head_dim 64)
   and at B=1, T=2048, 8 / 4 heads; naive vs. blockwise at block sizes 64 and 128.

Run:  .venv/bin/python benchmarks/attention.py            (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from bench_utils import LONG_CONTEXT_MODEL, lm_training_step, median_seconds

from rljax.models import attention as A
from rljax.models.config import ModelConfig
from rljax.models.transformer import positions_from_mask

def training_temp_mib(attention: str, t: int) -> float:
  """Temp MiB of the compiled forward + backward of the memory model at B=1 and T=t."""
  step, state = lm_training_step(ModelConfig(**LONG_CONTEXT_MODEL, attention=attention))
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  return step.lower(state, tokens).compile().memory_analysis().temp_size_in_bytes / 2**20


def attention_seconds(impl: str, b: int, t: int, h: int, kv: int, dh: int, block: int,
                      repeats: int) -> float:
  """Median seconds of value_and_grad of sum(attention(q, k, v) * w), left-padded rows."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, w = (jax.random.normal(key, (b, t, h, dh)) for key in ks[:2])
  k, v = (jax.random.normal(key, (b, t, kv, dh)) for key in ks[2:])
  mask = jnp.arange(t)[None, :] >= jnp.arange(b)[:, None] * (t // (4 * b))
  positions = positions_from_mask(mask)

  def loss(q, k, v):
    if impl == "naive":
      out = A.naive_attention(q, k, v, A.causal_attention_mask(mask, positions, positions))
    else:
      out = A.blockwise_attention(q, k, v, mask, positions, block_size=block)
    return jnp.sum(out * w)

  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  return median_seconds(lambda: step(q, k, v), repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, nproc {os.cpu_count()}, "
        f"load before {os.getloadavg()}")

  print("\n1. Training temp memory (MiB), B=1, compile-only\n")
  print("| T | naive | blockwise (auto) | naive / blockwise |")
  print("| --- | --- | --- | --- |")
  for t in args.lengths:
    naive, auto = training_temp_mib("naive", t), training_temp_mib("auto", t)
    print(f"| {t} | {naive:.0f} | {auto:.0f} | {naive / auto:.1f}x |", flush=True)

  print("\n2. Attention core forward + backward, ms (median)\n")
  print("| shape | naive | blockwise 64 | blockwise 128 | naive / best blockwise |")
  print("| --- | --- | --- | --- | --- |")
  for b, t, h, kv in ((16, 256, 4, 2), (1, 2048, 8, 4)):
    times = [attention_seconds(impl, b, t, h, kv, 64, block, args.repeats) * 1e3
             for impl, block in (("naive", 0), ("blockwise", 64), ("blockwise", 128))]
    print(f"| B={b} T={t} H={h} KV={kv} Dh=64 | {times[0]:.1f} | {times[1]:.1f} | "
          f"{times[2]:.1f} | {times[0] / min(times[1:]):.2f}x |", flush=True)
  print(f"\nload after {os.getloadavg()}")


if __name__ == "__main__":
  main()
