"""Benchmark: `rljax.ops.returns.gae` against the other formulations of masked GAE.

Every formulation below computes the same thing (masked positions skipped: both carries pass
across them; advantages and returns 0 there) on the same inputs: random response lengths with one
masked span of up to 32 tokens in the middle of each row (a tool output / observation). Each is
timed un-whitened and whitened (advantages through the batch `masked_whiten`), all jitted, with
the coefficients γ, γλ traced. The calls are interleaved (round-robin over the formulations, one
call each, for --repeats rounds after a warm-up), so that load from other processes on a shared
machine falls on all of them alike; the table reports medians and the load average before and
after.

Formulations:
  rljax gae                  the library: reverse `lax.scan` (not unrolled) over time-major
                             [T, B] (inputs transposed once), [B] carries; each step emits the
                             carried advantage, the zeros at masked positions and the returns
                             A + V are formed after the one transpose back; `whiten=True`
                             whitens in the same program (written out for advantages already
                             0 at masked positions: three passes over [B, T]).
  jit(gae + masked_whiten)   the same scan, whitened by the general `masked_whiten` in one
                             jitted program that also returns the returns (the library's
                             `whiten=True` before 2026-12-02).
  ... unroll=U               the same scan with `lax.scan(..., unroll=U)`.
  scan emits (A, R)          the previous implementation: the scan writes both the masked
                             advantage and the return at every step (two outputs transposed back).
  batch-major fori           no transposes: a `fori_loop` over t reading and writing [B] columns
                             of the [B, T] arrays (strided).
  blocked two-level scan     T split into K blocks of L: one scan of L steps with [K, B] carries
                             (each block from a zero state, with its sensitivity to the state
                             entering it), then a scan over the K blocks, then one fix-up pass.
  associative_scan           two parallel-prefix passes over T: the next valid value, then the
                             linear recurrence A_t = d_t + c_t·A_{t+1} (c = γλ or 1 when masked).
  numpy loop                 a per-step numpy loop over T on [B] vectors (not jitted), the
                             masked form of verl's `compute_gae_advantage_return`.
  Tunix                      Google Tunix 0.1.7's `algo_core.compute_gae_advantages` (jitted,
                             whitening included; the same reverse scan, masked carries by
                             arithmetic), in the same process, when `tunix` is importable: run
                             the script under Tunix's interpreter with this repo on PYTHONPATH
                             (both pin jax 0.10.2, so rljax imports there; see
                             benchmarks/grpo_step.py for the venv). Its whitened output is
                             checked equal to rljax's on the valid tokens.

Besides the medians the table gives each whitened formulation's *paired* ratio: the median over
rounds of (its time / rljax gae's time in the same round), which cancels most of the load that
other processes put on a shared machine.

  python benchmarks/gae.py                      # B=256, T=2048
  python benchmarks/gae.py --batch 64 --length 512 --repeats 10
  PYTHONPATH=$PWD /work/tunix-venv/bin/python benchmarks/gae.py --repeats 300 --no-numpy \
      --unrolls "" --short                      # rljax vs. Tunix, many paired rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rljax.ops import returns
from rljax.ops.masking import masked_whiten


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


# ------------------------------------------------------------------ alternative formulations
# Each takes (rewards, values, mask, gamma, gamma_lam) with traced coefficients and returns
# (advantages, returns); float32 inputs, bool mask.


def scan_emits_both(rewards, values, mask, gamma, gamma_lam):
  def step(carry, inputs):
    next_value, running = carry
    r_t, v_t, m_t = inputs
    adv = r_t + gamma * next_value - v_t + gamma_lam * running
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, running))
    return carry, (jnp.where(m_t, adv, 0), jnp.where(m_t, adv + v_t, 0))

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, (adv, ret) = jax.lax.scan(
      step, (zeros, zeros), (rewards.T, values.T, (mask != 0).T), reverse=True
  )
  return adv.T, ret.T


def batch_major_fori(rewards, values, mask, gamma, gamma_lam):
  length = rewards.shape[1]
  valid = mask != 0

  def body(i, carry):
    next_value, running, out = carry
    t = length - 1 - i
    r_t, v_t, m_t = (jax.lax.dynamic_index_in_dim(x, t, 1, False) for x in (rewards, values, valid))
    adv = r_t + gamma * next_value - v_t + gamma_lam * running
    out = jax.lax.dynamic_update_index_in_dim(out, jnp.where(m_t, adv, 0), t, 1)
    return jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, running), out

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, _, adv = jax.lax.fori_loop(0, length, body, (zeros, zeros, jnp.zeros_like(rewards)))
  return adv, jnp.where(valid, adv + values, 0)


def blocked_two_level(rewards, values, mask, gamma, gamma_lam, block: int = 64):
  batch, length = rewards.shape
  num_blocks = -(-length // block)
  pad = num_blocks * block - length
  valid = mask != 0
  # Trailing masked padding is skipped by the recursion, so it changes nothing.
  r, v, m = (jnp.pad(x, ((0, 0), (0, pad))) for x in (rewards, values, valid))
  # [B, K, L] -> [L, B, K]: scan over the L steps of all K blocks at once.
  r, v, m = (x.reshape(batch, num_blocks, block).transpose(2, 0, 1) for x in (r, v, m))

  def step(carry, inputs):  # each block from a zero state; q = d a_t / d (state entering)
    next_value, running, q, seen = carry
    r_t, v_t, m_t = inputs
    adv = r_t + gamma * next_value - v_t + gamma_lam * running
    q_t = jnp.where(seen, q * gamma_lam, 1)
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, running),
             jnp.where(m_t, q_t, q), seen | m_t)
    return carry, (jnp.where(m_t, adv, 0), jnp.where(m_t, q_t, 0))

  zeros = jnp.zeros((batch, num_blocks), rewards.dtype)
  init = (zeros, zeros, zeros, jnp.zeros((batch, num_blocks), bool))
  (first_v, first_a, first_q, any_valid), (local, q) = jax.lax.scan(
      step, init, (r, v, m), reverse=True
  )

  def across(carry, inputs):  # the state entering each block, from the last block backwards
    next_value, running = carry
    v_k, a_k, q_k, h_k = inputs
    inject = gamma * next_value + gamma_lam * running
    return (jnp.where(h_k, v_k, next_value), jnp.where(h_k, a_k + q_k * inject, running)), inject

  zeros_b = jnp.zeros((batch,), rewards.dtype)
  _, inject = jax.lax.scan(
      across, (zeros_b, zeros_b), tuple(x.T for x in (first_v, first_a, first_q, any_valid)),
      reverse=True,
  )
  adv = jnp.where(m, local + q * inject.T[None], 0)
  adv = adv.transpose(1, 2, 0).reshape(batch, num_blocks * block)[:, :length]
  return adv, jnp.where(valid, adv + values, 0)


def associative(rewards, values, mask, gamma, gamma_lam):
  valid = mask != 0

  def nearest(later, earlier):  # reverse scan: the nearest valid value at or after t
    has_l, val_l = later
    has_e, val_e = earlier
    return has_l | has_e, jnp.where(has_e, val_e, val_l)

  has, nearest_v = jax.lax.associative_scan(nearest, (valid, values), reverse=True, axis=1)
  zeros_col = jnp.zeros((rewards.shape[0], 1), rewards.dtype)
  next_v = jnp.where(jnp.concatenate([has[:, 1:], jnp.zeros_like(has[:, :1])], 1),
                     jnp.concatenate([nearest_v[:, 1:], zeros_col], 1), 0)
  delta = jnp.where(valid, rewards + gamma * next_v - values, 0)
  coef = jnp.where(valid, gamma_lam, jnp.ones_like(rewards))

  def affine(later, earlier):  # A ↦ d + c·A, composed right to left
    c_l, d_l = later
    c_e, d_e = earlier
    return c_e * c_l, d_e + c_e * d_l

  _, adv = jax.lax.associative_scan(affine, (coef, delta), reverse=True, axis=1)
  adv = jnp.where(valid, adv, 0)
  return adv, jnp.where(valid, adv + values, 0)


ALTERNATIVES = {
    "scan emits (A, R)": scan_emits_both,
    "batch-major fori": batch_major_fori,
    "blocked two-level scan": blocked_two_level,
    "associative_scan": associative,
}


def interleaved_times(cases: dict, repeats: int) -> dict:
  """Wall times of each case, called round-robin (one call per case per round, the order
  reversed every other round)."""
  for fn in cases.values():  # warm-up (compiles)
    jax.block_until_ready(fn())
  times = {name: [] for name in cases}
  names = list(cases)
  for i in range(repeats):
    for name in names if i % 2 == 0 else names[::-1]:
      start = time.perf_counter()
      jax.block_until_ready(cases[name]())
      times[name].append(time.perf_counter() - start)
  return times


def fmt(seconds: float) -> str:
  return f"{seconds * 1e3:8.3f} ms"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--gamma", type=float, default=1.0)
  parser.add_argument("--lam", type=float, default=0.95)
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per case (>= 10)")
  parser.add_argument("--unrolls", default="2,4,8,16,32", help="other scan unroll factors")
  parser.add_argument("--no-numpy", action="store_true", help="skip the (slow) numpy loop")
  parser.add_argument("--short", action="store_true",
                      help="time only rljax gae, jit(gae + masked_whiten) and Tunix's (if "
                           "importable), for many paired rounds")
  args = parser.parse_args()
  B, T, gamma, lam = args.batch, args.length, args.gamma, args.lam
  load_before = os.getloadavg()
  print(f"GAE benchmark  B={B} T={T} gamma={gamma} lam={lam} float32  "
        f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()}  "
        f"median of {args.repeats} interleaved calls after warm-up")
  print(f"load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}")

  rewards, values, mask = make_inputs(B, T)
  r, v, m = jax.device_put(rewards), jax.device_put(values), jax.device_put(mask)
  g, gl = np.float32(gamma), np.float32(gamma * lam)

  start = time.perf_counter()
  jax.block_until_ready(returns.gae(r, v, m, gamma=gamma, lam=lam))
  compile_s = time.perf_counter() - start

  def library(whiten, unroll=returns._UNROLL):
    return lambda: returns._gae(r, v, m, g, gl, None, whiten=whiten, eps=1e-8, unroll=unroll)

  def then_whiten(fn):
    return jax.jit(lambda *a: (lambda out: (masked_whiten(out[0], a[2]), out[1]))(fn(*a)))

  rows = [("rljax gae", lambda: returns.gae(r, v, m, gamma=gamma, lam=lam),
           lambda: returns.gae(r, v, m, gamma=gamma, lam=lam, whiten=True))]
  for u in [int(x) for x in args.unrolls.split(",") if x]:
    rows.append((f"  ... unroll={u}", library(False, u), library(True, u)))
  for name, fn in ({} if args.short else ALTERNATIVES).items():
    plain, whitened = jax.jit(fn), then_whiten(fn)
    rows.append((name, lambda f=plain: f(r, v, m, g, gl), lambda f=whitened: f(r, v, m, g, gl)))
  extra = {
      "gae, then masked_whiten (eager)":
          lambda: masked_whiten(returns.gae(r, v, m, gamma=gamma, lam=lam)[0], m),
      "jit(gae + masked_whiten)": (lambda f: lambda: f(r, v, m)[0])(jax.jit(
          lambda r, v, m: (lambda adv, ret: (masked_whiten(adv, m), ret))(
              *returns.gae(r, v, m, gamma=gamma, lam=lam)))),
  }
  if args.short:
    rows = rows[:1]
    del extra["gae, then masked_whiten (eager)"]

  # Correctness: every formulation against the numpy loop (and the whitened ones among themselves).
  ref_adv, ref_ret = numpy_loop_gae(rewards, values, mask, gamma, lam)
  ref_white = np.asarray(masked_whiten(jnp.asarray(ref_adv), m))
  worst = 0.0
  for name, plain, whitened in rows:
    adv, ret = plain()
    wadv = whitened()[0]
    worst = max(worst, float(np.max(np.abs(np.asarray(adv) - ref_adv))),
                float(np.max(np.abs(np.asarray(ret) - ref_ret))),
                float(np.max(np.abs(np.asarray(wadv) - ref_white))))
  for fn in extra.values():
    worst = max(worst, float(np.max(np.abs(np.asarray(fn()) - ref_white))))
  tunix_diff = None
  try:
    from tunix.rl import algo_core
  except ImportError:
    pass
  else:  # Tunix leaves its whitened values at masked positions: compare the valid tokens only
    tunix_gae = algo_core.compute_gae_advantages
    extra["Tunix compute_gae_advantages"] = lambda: tunix_gae(
        rewards=r, values=v, completion_mask=m, gamma=gamma, gae_lambda=lam)[0]
    ours_white = np.asarray(rows[0][2]()[0])
    tunix_diff = float(np.max(np.abs(np.where(mask, np.asarray(
        extra["Tunix compute_gae_advantages"]()) - ours_white, 0))))

  cases = {}
  for name, plain, whitened in rows:
    cases[(name, False)] = plain
    cases[(name, True)] = whitened
  for name, fn in extra.items():
    cases[(name, True)] = fn
  times = interleaved_times(cases, args.repeats)
  medians = {name: statistics.median(t) for name, t in times.items()}

  def paired(name) -> str:  # median over rounds of time / rljax gae's (whitened) time
    ratios = [a / b for a, b in zip(times[(name, True)], times[("rljax gae", True)])]
    q1, q3 = np.percentile(ratios, [25, 75])
    return f"{statistics.median(ratios):5.2f}x ({q1:.2f}-{q3:.2f})"

  numpy_s = None
  if not args.no_numpy:
    numpy_times = []
    for _ in range(max(3, args.repeats // 4)):
      start = time.perf_counter()
      numpy_loop_gae(rewards, values, mask, gamma, lam)
      numpy_times.append(time.perf_counter() - start)
    numpy_s = statistics.median(numpy_times)
  load_after = os.getloadavg()

  ours, ours_w = medians[("rljax gae", False)], medians[("rljax gae", True)]
  print(f"{'formulation':34s} {'un-whitened':>12s} {'whitened':>12s}   whitened vs rljax gae: "
        "ratio of medians, paired (interquartile range)")
  for name, _, _ in rows:
    a, w = medians[(name, False)], medians[(name, True)]
    print(f"{name:34s} {fmt(a)} {fmt(w)}   {w / ours_w:5.2f}x  {paired(name)}")
  for name in extra:
    w = medians[(name, True)]
    print(f"{name:34s} {'':>11s} {fmt(w)}   {w / ours_w:5.2f}x  {paired(name)}")
  if numpy_s is not None:
    print(f"{'numpy loop over T (not jitted)':34s} {fmt(numpy_s)} {'':>11s}    "
          f"{numpy_s / ours:5.1f}x the un-whitened rljax gae")
  print(f"first call of rljax gae (compile + run): {fmt(compile_s)};  all formulations agree with "
        f"the numpy loop to {worst:.1e}")
  if tunix_diff is not None:
    name = ("Tunix compute_gae_advantages", True)
    ratios = [a / b for a, b in zip(times[("rljax gae", True)], times[name])]
    print(f"rljax gae (whitened) / Tunix: {ours_w / medians[name]:.2f}x the time (ratio of "
          f"medians), paired {statistics.median(ratios):.2f}x (interquartile range "
          + "-".join(f"{q:.2f}" for q in np.percentile(ratios, [25, 75])) + ")")
    print(f"Tunix's whitened advantages vs rljax's, valid tokens: max |diff| {tunix_diff:.1e}")
  print(f"load average (1, 5, 15 min) after:  {load_after[0]:.2f} {load_after[1]:.2f} "
        f"{load_after[2]:.2f}")


if __name__ == "__main__":
  main()
