"""Benchmark: jitted `rljax.ops.returns.gae` against per-step Python loops over T.

Compares, on the same masked inputs (random response lengths, interleaved masked "tool" spans):
  1. rljax `gae` under `jax.jit` (one `lax.scan` over reversed time); compile time reported
     separately and excluded from the timings;
  2. the per-step numpy loop most codebases write (T iterations on [B] vectors, the masked form of
     verl's `compute_gae_advantage_return`);
  3. (optional, --naive-jax-length) the same loop written with eager `jnp` ops, at a smaller T.
Each timing is the median of --repeats runs after one warm-up run; the outputs are checked to agree.

  python benchmarks/gae.py                      # B=256, T=2048
  python benchmarks/gae.py --batch 64 --length 512 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rljax.ops.returns import gae

from bench_utils import median_seconds


def make_inputs(batch: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(batch, length)).astype(np.float32)
  values = rng.normal(size=(batch, length)).astype(np.float32)
  lengths = rng.integers(length // 4, length + 1, size=batch)
  mask = np.arange(length)[None, :] < lengths[:, None]
  starts = rng.integers(0, length, size=batch)
  for b, s in enumerate(starts):  # one masked span of up to 32 tokens per row (a tool output)
    mask[b, s : s + rng.integers(1, 33)] = False
  return rewards, values, mask


def numpy_loop_gae(rewards, values, mask, gamma, lam):
  """Per-step loop over T on [B] vectors (masked positions skipped, as verl does)."""
  m = mask.astype(rewards.dtype)
  next_values = np.zeros(rewards.shape[0], rewards.dtype)
  running = np.zeros(rewards.shape[0], rewards.dtype)
  advantages = np.zeros_like(rewards)
  for t in reversed(range(rewards.shape[1])):
    delta = rewards[:, t] + gamma * next_values - values[:, t]
    adv = delta + gamma * lam * running
    next_values = m[:, t] * values[:, t] + (1 - m[:, t]) * next_values
    running = m[:, t] * adv + (1 - m[:, t]) * running
    advantages[:, t] = m[:, t] * adv
  return advantages, (advantages + values) * m


def eager_jax_loop_gae(rewards, values, mask, gamma, lam):
  """The same loop with eager jnp ops: one dispatch per op per time step."""
  m = jnp.asarray(mask, rewards.dtype)
  next_values = jnp.zeros(rewards.shape[0], rewards.dtype)
  running = jnp.zeros(rewards.shape[0], rewards.dtype)
  columns = []
  for t in reversed(range(rewards.shape[1])):
    delta = rewards[:, t] + gamma * next_values - values[:, t]
    adv = delta + gamma * lam * running
    next_values = m[:, t] * values[:, t] + (1 - m[:, t]) * next_values
    running = m[:, t] * adv + (1 - m[:, t]) * running
    columns.append(m[:, t] * adv)
  advantages = jnp.stack(columns[::-1], axis=1)
  return advantages, (advantages + values) * m


def fmt(seconds: float) -> str:
  return f"{seconds * 1e3:10.3f} ms"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--gamma", type=float, default=1.0)
  parser.add_argument("--lam", type=float, default=0.95)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument(
      "--naive-jax-length", type=int, default=256,
      help="T for the eager-jnp loop comparison (0 skips it; it is slow at large T)",
  )
  args = parser.parse_args()
  B, T, gamma, lam = args.batch, args.length, args.gamma, args.lam
  print(f"GAE benchmark  B={B} T={T} gamma={gamma} lam={lam} float32  "
        f"backend={jax.default_backend()} devices={jax.device_count()}  "
        f"median of {args.repeats} after warm-up")

  rewards, values, mask = make_inputs(B, T)
  r, v, m = jax.device_put(rewards), jax.device_put(values), jax.device_put(mask)
  jitted = jax.jit(lambda r, v, m: gae(r, v, m, gamma=gamma, lam=lam))
  start = time.perf_counter()
  compiled = jitted.lower(r, v, m).compile()
  compile_s = time.perf_counter() - start

  ours_s = median_seconds(lambda: compiled(r, v, m), args.repeats)
  numpy_s = median_seconds(lambda: numpy_loop_gae(rewards, values, mask, gamma, lam), args.repeats)
  ours_adv = np.asarray(compiled(r, v, m)[0])
  ref_adv = numpy_loop_gae(rewards, values, mask, gamma, lam)[0]
  max_diff = float(np.max(np.abs(ours_adv - ref_adv)))

  print(f"  rljax gae, jit compile (once)     {fmt(compile_s)}")
  print(f"  rljax gae, jitted lax.scan        {fmt(ours_s)}")
  print(f"  numpy per-step loop over T        {fmt(numpy_s)}   -> jitted is "
        f"{numpy_s / ours_s:6.1f}x faster   (max |diff| {max_diff:.2e})")

  if args.naive_jax_length > 0:
    Tn = min(args.naive_jax_length, T)
    rn, vn, mn = (jnp.asarray(x[:, :Tn]) for x in (rewards, values, mask))
    small = jax.jit(lambda r, v, m: gae(r, v, m, gamma=gamma, lam=lam)).lower(rn, vn, mn).compile()
    ours_small = median_seconds(lambda: small(rn, vn, mn), args.repeats)
    eager_s = median_seconds(lambda: eager_jax_loop_gae(rn, vn, mn, gamma, lam), args.repeats)
    diff = float(jnp.max(jnp.abs(small(rn, vn, mn)[0] - eager_jax_loop_gae(rn, vn, mn, gamma, lam)[0])))
    print(f"  at T={Tn}:")
    print(f"    rljax gae, jitted lax.scan      {fmt(ours_small)}")
    print(f"    eager jnp loop over T           {fmt(eager_s)}   -> jitted is "
          f"{eager_s / ours_small:6.1f}x faster   (max |diff| {diff:.2e})")


if __name__ == "__main__":
  main()
