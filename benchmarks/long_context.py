"""Long sequences (issue 11): training memory in T, achieved FLOP/s, block skipping, remat.

1. Memory, compile-only (`memory_analysis()`, nothing allocated): one training forward +
   backward (loss = mean of `logprobs_from_hidden`, B=1) at T = 1k .. 32k, the default attention
   ("auto": blockwise beyond 256 slots) vs "naive", for
     * the issue's model: V=32000, 4 layers, d=512, MLP 1536, 8 query / 4 KV heads, tied, f32;
     * a SmolLM2-135M-shaped one: V=49152, 30 layers, d=576, MLP 1536, 9 / 3 heads, tied, f32,
       `scan_unroll=1` (the accelerator default; unrolling 30 layers only slows the compile),
       and its 32k step with remat (goal: arguments + temp <= 20 GiB).
2. Achieved FLOP/s of that step on the issue's model at 1k and 8k (median of `--repeats` after
   warm-up; analytic model FLOPs with the causal half of attention: 3 · (layers + logits +
   attention/2) + logits, the fused log-prob backward recomputing the logits); remat's
   trade-off at 8k (temp memory and time, remat off vs on).
3. The attention core at 8k (B=1, 8 / 4 heads, head_dim 64, forward + backward): block
   skipping vs the same kernel computing every block pair (`block_skipping=False`).

Run:  .venv/bin/python benchmarks/long_context.py         (about 15 minutes on 2 CPU cores)
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
from rljax.train.flops import forward_flops

ISSUE_MODEL = LONG_CONTEXT_MODEL
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, tie_word_embeddings=True, scan_unroll=1)
GIB, MIB = 2**30, 2**20


def step_memory(config: ModelConfig, t: int) -> tuple[float, float]:
  """(argument bytes, temp bytes) of the compiled training step at B=1, T=t."""
  step, state = lm_training_step(config)
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  memory = step.lower(state, tokens).compile().memory_analysis()
  return memory.argument_size_in_bytes, memory.temp_size_in_bytes


def model_flops(config: ModelConfig, t: int) -> float:
  """3 · (layers + logits + causal-half attention) + logits (module doc)."""
  f = forward_flops(config.replace(attention="naive"), 1, 0, t)
  return 3.0 * (f["layers"] + f["logits"] + f["attention"] / 2) + f["logits"]


def step_seconds(config: ModelConfig, t: int, repeats: int) -> float:
  step, state = lm_training_step(config, abstract=False)
  tokens = jax.random.randint(jax.random.key(0), (1, t), 0, config.vocab_size)
  return median_seconds(lambda: step(state, tokens), repeats)


def attention_seconds(t: int, skipping: bool, repeats: int) -> float:
  ks = jax.random.split(jax.random.key(0), 4)
  q, w = (jax.random.normal(key, (1, t, 8, 64)) for key in ks[:2])
  k, v = (jax.random.normal(key, (1, t, 4, 64)) for key in ks[2:])
  mask = jnp.ones((1, t), bool)
  positions = positions_from_mask(mask)

  def loss(q, k, v):
    return jnp.sum(A.blockwise_attention(q, k, v, mask, positions, block_skipping=skipping) * w)

  grad = jax.jit(jax.grad(loss, (0, 1, 2)))
  return median_seconds(lambda: grad(q, k, v), repeats)


def memory_section(lengths: list[int]) -> None:
  print("\n1. Training step memory, B=1, compile-only (temp MiB; args MiB)\n")
  for name, shape in (("issue model", ISSUE_MODEL), ("SmolLM2-135M shape", SMOLLM2_135M)):
    print(f"{name}:\n")
    print("| T | default temp | naive temp | naive / default | default temp / temp(1k) |")
    print("| --- | --- | --- | --- | --- |")
    first = None
    for t in lengths:
      args, auto = step_memory(ModelConfig(**shape), t)
      _, naive = step_memory(ModelConfig(**shape, attention="naive"), t)
      first = first or auto
      print(f"| {t} | {auto / MIB:.0f} | {naive / MIB:.0f} | {naive / auto:.1f}x | "
            f"{auto / first:.1f} |", flush=True)
    print(f"\n(arguments: {args / MIB:.0f} MiB)\n")
  args, temp = step_memory(ModelConfig(**SMOLLM2_135M, remat=True), 32768)
  print(f"SmolLM2-135M shape, T=32768, remat: args {args / GIB:.2f} GiB + temp "
        f"{temp / GIB:.2f} GiB = {(args + temp) / GIB:.2f} GiB (goal <= 20)", flush=True)


def flops_section(repeats: int) -> None:
  print("\n2. Achieved FLOP/s, issue model, B=1 (median)\n")
  print("| T | remat | model GFLOP | seconds | GFLOP/s | temp MiB |")
  print("| --- | --- | --- | --- | --- | --- |")
  rates = {}
  for t, remat in ((1024, False), (8192, False), (8192, True)):
    config = ModelConfig(**ISSUE_MODEL, remat=remat)
    seconds = step_seconds(config, t, repeats)
    flops = model_flops(config, t)
    rates[t, remat] = flops / seconds
    print(f"| {t} | {remat} | {flops / 1e9:.0f} | {seconds:.2f} | {flops / seconds / 1e9:.1f} | "
          f"{step_memory(config, t)[1] / MIB:.0f} |", flush=True)
  print(f"\nFLOP/s at 8k / at 1k: {rates[8192, False] / rates[1024, False]:.2f} (goal >= 0.85)")


def skipping_section(repeats: int) -> None:
  print("\n3. Attention core at T=8192 (B=1, 8 / 4 heads, Dh 64, fwd + bwd)\n")
  skip, full = (attention_seconds(8192, s, repeats) for s in (True, False))
  print(f"block skipping {skip:.2f} s, every pair {full:.2f} s: {skip / full:.2f}x "
        "(goal <= 0.6)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
  parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3])
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, nproc {os.cpu_count()}, "
        f"load before {os.getloadavg()}")
  if 1 in args.sections:
    memory_section(args.lengths)
  if 2 in args.sections:
    flops_section(args.repeats)
  if 3 in args.sections:
    skipping_section(args.repeats)
  print(f"\nload after {os.getloadavg()}")


if __name__ == "__main__":
  main()
