"""Fused vs. naive token log-probs: compiled temp memory and CPU time of value_and_grad.

naive:  logits = hidden @ unembedding.T ([B, T, V] materialised) -> token_logprobs -> sum
fused:  logprobs_from_hidden(hidden, unembedding, tokens) -> sum (chunked along T, custom VJP)

Both are differentiated w.r.t. hidden and unembedding. Memory is the XLA temp allocation of the
compiled program (`memory_analysis().temp_size_in_bytes`), compile-only on `jax.ShapeDtypeStruct`
inputs (nothing is allocated or run). Time is the median wall-clock of a few runs after warm-up,
on whatever backend jax uses (CPU here), at a smaller size.

Run:  python benchmarks/logprob_memory.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from rljax.ops.fused_logprobs import DEFAULT_CHUNK_SIZE, logprobs_from_hidden
from rljax.ops.logprobs import token_logprobs


def naive_loss(hidden, unembedding, tokens):
  logits = jnp.einsum("btd,vd->btv", hidden, unembedding)
  return jnp.sum(token_logprobs(logits, tokens))


def fused_loss(hidden, unembedding, tokens, *, chunk_size: int):
  return jnp.sum(logprobs_from_hidden(hidden, unembedding, tokens, chunk_size=chunk_size))


def value_and_grad_fn(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def compiled_temp_bytes(loss, batch: int, length: int, width: int, vocab: int, dtype) -> int:
  """Temp bytes of the compiled value_and_grad, from abstract inputs only."""
  args = (
      jax.ShapeDtypeStruct((batch, length, width), dtype),
      jax.ShapeDtypeStruct((vocab, width), dtype),
      jax.ShapeDtypeStruct((batch, length), jnp.int32),
  )
  compiled = value_and_grad_fn(loss).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def mib(n: int) -> str:
  return f"{n / 2**20:10.1f} MiB"


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=8, help="B for the memory comparison")
  parser.add_argument("--length", type=int, default=1024, help="T for the memory comparison")
  parser.add_argument("--width", type=int, default=1024, help="D for the memory comparison")
  parser.add_argument("--vocab", type=int, default=131072, help="V for the memory comparison")
  parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
  parser.add_argument("--time-batch", type=int, default=4, help="B for the timing")
  parser.add_argument("--time-length", type=int, default=512, help="T for the timing")
  parser.add_argument("--time-width", type=int, default=256, help="D for the timing")
  parser.add_argument("--time-vocab", type=int, default=32768, help="V for the timing")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
  args = parser.parse_args()

  def fused(h, w, t):
    return fused_loss(h, w, t, chunk_size=args.chunk_size)

  dtype = jnp.float32
  print(f"backend: {jax.default_backend()}  devices: {jax.device_count()}  jax {jax.__version__}")
  print(
      f"[memory] value_and_grad wrt (hidden, unembedding), f32, compile-only: "
      f"B={args.batch} T={args.length} (N={args.batch * args.length} tokens) D={args.width} "
      f"V={args.vocab} chunk_size={args.chunk_size}"
  )
  sizes = (args.batch, args.length, args.width, args.vocab, dtype)
  naive_bytes = compiled_temp_bytes(naive_loss, *sizes)
  fused_bytes = compiled_temp_bytes(fused, *sizes)
  logits_bytes = args.batch * args.length * args.vocab * jnp.dtype(dtype).itemsize
  print(f"  one [B,T,V] f32 logits array: {mib(logits_bytes)}")
  print(f"  naive temp:                  {mib(naive_bytes)}")
  print(f"  fused temp:                  {mib(fused_bytes)}")
  ratio = fused_bytes / naive_bytes
  verdict = "OK" if ratio <= 1 / 8 else "ABOVE TARGET"
  print(f"  fused / naive = {ratio:.4f}  (1/{1 / ratio:.1f}; target <= 1/8: {verdict})")

  b, t, d, v = args.time_batch, args.time_length, args.time_width, args.time_vocab
  print(
      f"[time] value_and_grad, f32, B={b} T={t} (N={b * t} tokens) D={d} V={v} "
      f"chunk_size={args.chunk_size}, median of {args.repeats} runs after warm-up"
  )
  keys = jax.random.split(jax.random.key(0), 3)
  inputs = (
      jax.random.normal(keys[0], (b, t, d), dtype),
      jax.random.normal(keys[1], (v, d), dtype) / jnp.sqrt(d),
      jax.random.randint(keys[2], (b, t), 0, v),
  )
  naive_s = median_seconds(value_and_grad_fn(naive_loss), inputs, args.repeats)
  fused_s = median_seconds(value_and_grad_fn(fused), inputs, args.repeats)
  print(f"  naive: {naive_s * 1e3:9.1f} ms")
  print(f"  fused: {fused_s * 1e3:9.1f} ms")
  print(f"  fused / naive time = {fused_s / naive_s:.2f}")


if __name__ == "__main__":
  main()
