"""Benchmark (issue 12): the rollout engine vs. the static `generate` and Tunix's `Sampler`.

One run compares three samplers on the same model, prompts and sampling options:
`rljax.rollout.generate` (a static batch), `rljax.rollout.engine.engine_generate` (continuous
batching over decode slots, paged prefix-shared KV) and Google Tunix 0.1.7's
`tunix.generate.sampler.Sampler`. Install Tunix in a venv of its own, OUTSIDE the repo (it pins
jax < 0.11.1, so it must never become an rljax dependency):

  python3 -m venv /work/tunix-venv
  /work/tunix-venv/bin/pip install google-tunix==0.1.7

Run (from the repo root, in rljax's venv; the defaults take about 15 min on a quiet 2-core CPU,
most of it the static samplers on (b), ~4 x 30 s per repetition; `--cases` runs a subset):

  .venv/bin/python benchmarks/rollout_engine.py --tunix-python /work/tunix-venv/bin/python \\
      --json rollout_engine.json
  .venv/bin/python benchmarks/rollout_engine.py --slots 16,32,64 ...   # sweep the engine's slots
  .venv/bin/python benchmarks/rollout_engine.py --repeats 1 --samples 2 --max-new-tokens 128
  .venv/bin/python benchmarks/rollout_engine.py            # no Tunix: rljax numbers only

Model: `grpo_step.py`'s Qwen3-style decoder with random weights (6,032,128 parameters, V=8192, 4
layers, d=256, MLP 1024, 4 query / 2 KV heads, head_dim 64, q/k norm, tied embeddings, f32),
copied into Tunix's `Qwen3` by `tunix_worker.py`. Prompts: 16 rows of 64 random ids in [1, V)
(no padding); pad id 0. Every case samples at temperature 1 over the full vocabulary (Tunix:
`top_p=1.0, top_k=None`, its plain `jax.random.categorical` path; rljax: top_p None), except
the separate top-p row (0.95 in all three: a sort over V per step).

Cases (useful tokens: the completion tokens up to and including a stop token, summed over rows):
  (a)   16 prompts, 128 new tokens, no stop token; engine num_slots = 16. Also at top-p 0.95.
  (b1)  16 prompts x 8 samples (R = 128): per-request budgets drawn once from a seeded geometric
        distribution of mean 64, capped at 512. The engine takes them (`budgets=`); generate
        and Tunix have no per-request budget, so they run max_new_tokens = the largest budget
        (no stop) and are charged for it: useful tokens = sum of the budgets for all three.
  (b2)  R = 128, stop-token set = ids 0..127 (a row ends w.p. ~1/64 per step under the random
        model), max_new_tokens 512; every sampler stops when its last row has stopped.
  (fixed@S) the engine alone at the (b) slot count S, R = 128, 128 new tokens each, no stop:
        the hardware-relative reference of (b) ("long tails should cost almost nothing").
  (c)   bytes of the engine's KV pool + block tables at its default sizing for (b)
        (`engine_layout`) vs. generate's static cache [L, R, P + N, KV, Dh] x (k, v).
Tunix's `Sampler` reads ids through a tokenizer: `tunix_worker.IdTokenizer` maps ids <-> "5 17
3" text, with no BOS, and the worker checks that the prompts it pads and the completions it
decodes are exactly those ids. Rows that never stop use eos id V (outside the vocabulary), so
Tunix decodes to its full length; with a stop set it leaves its decode loop when every row
has emitted one of `eos_tokens`, as generate does (each reports its longest row). Tunix gets
one Sampler per case (its jitted functions keep the eos set of their first trace), its KV
cache sized P + N.

Timing: after one warm-up call per (case, sampler) (compile excluded), `--repeats` rounds, each
running every case and, within a case, generate, the engine(s), Tunix back to back with the
same seed (rljax: `jax.random.key(seed)`; Tunix: `seed=`), so ratios of adjacent samples are
also reported ("paired"). A call is timed up to `jax.block_until_ready` of its result (Tunix:
its `__call__`, which returns host arrays). The two processes never run at the same time (the
idle one is blocked on a pipe). Also checked, once, on (a): the engine and generate return
identical tokens for the same key, and Tunix's greedy completions equal generate's (the
same model, positions and caches in both samplers). Tunix runs N decode steps after its
prefill (its last token is dropped), generate N - 1. Load average, machine and both pip
freezes are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.transformer import Transformer
from rljax.rollout import generate
from rljax.rollout.engine import EngineConfig, engine_generate, engine_layout
from rljax.rollout.sampling import SamplingConfig

from bench_utils import print_side_by_side, require_positive
from grpo_step import (
  CONFIG,
  EXPECTED_PARAMS,
  TunixWorker,
  flatten_params,
  key_versions,
  machine_info,
  model_config,
  pip_freeze,
  summary,
  timed,
)

NA = "–"


@dataclasses.dataclass(frozen=True)
class Case:
  """One workload: `samplers` are "generate", "tunix" and ("engine", num_slots) entries; the
  static samplers run `max_new_tokens`, the engine takes `budgets` (None: max_new_tokens)."""

  name: str
  label: str
  samples: int
  max_new_tokens: int
  stop_tokens: tuple[int, ...]
  top_p: float | None
  samplers: tuple
  budgets: np.ndarray | None = None

  def useful_tokens(self, lengths: np.ndarray) -> int:
    """Tokens anyone asked for: the budgets when there are budgets (whatever a sampler without
    them ran), else the completion lengths (stop token included)."""
    return int(self.budgets.sum() if self.budgets is not None else np.sum(lengths))


def sampler_name(sampler) -> str:
  return sampler if isinstance(sampler, str) else f"engine@{sampler[1]}"


def geometric_budgets(requests: int, mean: float, cap: int, seed: int) -> np.ndarray:
  """[requests] budgets ~ Geometric(1 / mean) on {1, 2, ...}, capped at `cap` (seeded)."""
  return np.minimum(np.random.default_rng(seed).geometric(1.0 / mean, requests), cap)


def make_cases(args) -> list[Case]:
  """The cases of the module docstring selected by --cases, sized by the command line."""
  engines = tuple(("engine", s) for s in args.slots)
  requests = args.prompts * args.samples
  budgets = geometric_budgets(requests, args.mean_length, args.max_new_tokens, args.seed)
  stops = tuple(range(args.stop_ids))
  a = f"{args.prompts}x{args.prompt_length}+{args.new_tokens}"
  cases = [Case("a", f"(a) fixed {a}, no stop", 1, args.new_tokens, (), None,
                ("generate", ("engine", args.prompts), "tunix"))]
  if args.top_p:
    cases.append(Case("a_top_p", f"(a) fixed {a}, top-p {args.top_p}", 1, args.new_tokens,
                      (), args.top_p, ("generate", ("engine", args.prompts), "tunix")))
  cases.append(Case("fixed", f"engine fixed {args.prompts}x{args.samples}x{args.new_tokens}, "
                    "no stop", args.samples, args.new_tokens, (), None, engines))
  cases.append(Case("b1", f"(b1) budgets Geo(mean {args.mean_length:g}) <= "
                    f"{args.max_new_tokens}, max {budgets.max()}", args.samples,
                    int(budgets.max()), (), None, ("generate",) + engines + ("tunix",),
                    budgets=budgets))
  cases.append(Case("b2", f"(b2) stop ids 0..{args.stop_ids - 1}, N={args.max_new_tokens}",
                    args.samples, args.max_new_tokens, stops, None,
                    ("generate",) + engines + ("tunix",)))
  return [case for case in cases if case.name in args.cases]


# ----------------------------------------------------------------------------------------------
# The samplers: each call returns (seconds, completion lengths [R], the rljax Rollout or None).
# ----------------------------------------------------------------------------------------------


def rljax_call(model, case: Case, sampler, prompts: np.ndarray, seed: int, pad_id: int):
  sampling = SamplingConfig(max_new_tokens=case.max_new_tokens, temperature=1.0,
                            top_p=case.top_p, num_samples=case.samples)
  mask = np.ones(prompts.shape, bool)
  key = jax.random.key(seed)
  if sampler == "generate":
    seconds, rollout = timed(generate, model, prompts, mask, key, sampling,
                             stop_tokens=case.stop_tokens, pad_id=pad_id)
  else:
    seconds, rollout = timed(engine_generate, model, prompts, mask, key, sampling,
                             stop_tokens=case.stop_tokens, pad_id=pad_id,
                             engine=EngineConfig(num_slots=sampler[1]), budgets=case.budgets)
  return seconds, np.asarray(rollout.lengths), rollout


def tunix_setup_case(worker: TunixWorker, case: Case, prompts: np.ndarray, vocab: int) -> None:
  worker.call("sampler_case", name=case.name, prompts=np.repeat(prompts, case.samples,
                                                                 axis=0).tolist(),
              max_new_tokens=case.max_new_tokens,
              eos_tokens=list(case.stop_tokens) or [vocab],  # V: an id never sampled
              top_p=case.top_p or 1.0)


def greedy_check(worker: TunixWorker, model, prompts: np.ndarray, n: int, vocab: int,
                 pad_id: int) -> dict:
  """Greedy completions of the prompts by Tunix's Sampler and by generate: the two decode the
  same model with the same positions and caches when they agree (float rounding may flip a
  near tie, after which a row differs)."""
  worker.call("sampler_case", name="greedy", prompts=prompts.tolist(), max_new_tokens=n,
              eos_tokens=[vocab], top_p=None)
  theirs = np.asarray(worker.call("sample", name="greedy", seed=0, tokens=True)["tokens"])
  ours = np.asarray(generate(model, prompts, np.ones(prompts.shape, bool), jax.random.key(0),
                             max_new_tokens=n, temperature=0.0, stop_tokens=(),
                             pad_id=pad_id).tokens)[:, -n:]
  return {"equal_tokens": f"{int(np.sum(theirs == ours))}/{ours.size}",
          "identical_rows": f"{int(np.sum(np.all(theirs == ours, axis=1)))}/{len(ours)}"}


def tunix_call(worker: TunixWorker, case: Case, seed: int):
  reply = worker.call("sample", name=case.name, seed=seed)
  if not reply["same_ids"]:
    raise RuntimeError(f"Tunix did not read / return the ids it was given (case {case.name})")
  return reply["seconds"], np.asarray(reply["lengths"]), None


# ----------------------------------------------------------------------------------------------
# (c) memory.
# ----------------------------------------------------------------------------------------------


def kv_bytes(config, case: Case, prompts: int, prompt_length: int, slots: int) -> dict:
  """The engine's pool + block tables at its default sizing (`engine_layout`) vs. the static
  cache of generate (and Tunix): 2·L·R·(P + N)·KV·Dh elements."""
  requests = prompts * case.samples
  layout = engine_layout(EngineConfig(num_slots=slots), requests=requests,
                         prompt_length=prompt_length, max_new_tokens=case.max_new_tokens,
                         num_samples=case.samples)
  item = jnp.dtype(config.dtype).itemsize
  per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * item
  pool = per_token * layout.num_blocks * layout.block_size
  table = layout.slots * layout.table_width * np.dtype(np.int32).itemsize
  static = per_token * requests * (prompt_length + case.max_new_tokens)
  return {"case": case.name, "slots": slots, "num_blocks": layout.num_blocks,
          "block_size": layout.block_size, "table_width": layout.table_width,
          "pool_bytes": pool, "table_bytes": table, "static_bytes": static,
          "ratio": (pool + table) / static}


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def run(args) -> dict:
  """All measurements; the Tunix worker and the temporary directory (the weights for the
  worker) are cleaned up even if a measurement fails."""
  workdir = tempfile.mkdtemp(prefix="rollout_engine_")
  try:
    return _run(args, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def start_tunix(args, workdir: str, c: dict, result: dict):
  """The Tunix worker with the Qwen3 loaded, or None (the reason in result["tunix_skipped"])."""
  result["tunix"], result["tunix_skipped"] = None, None
  if not args.tunix_python:
    result["tunix_skipped"] = "no --tunix-python given"
    return None
  if not (os.path.isfile(args.tunix_python) and os.access(args.tunix_python, os.X_OK)):
    result["tunix_skipped"] = f"{args.tunix_python} is not an executable"
    return None
  worker = None
  try:
    worker = TunixWorker(args.tunix_python, workdir)
    result["tunix"] = worker.call("setup_sampler", workdir=workdir, config=c)
    assert result["tunix"]["params"] == EXPECTED_PARAMS, result["tunix"]["params"]
    return worker
  except Exception as e:  # noqa: BLE001
    lines = str(e).strip().splitlines() or [type(e).__name__]
    result["tunix_skipped"], result["tunix_error"] = f"worker failed: {lines[-1]}", str(e)
    print(f"Tunix worker failed:\n{e}", file=sys.stderr)
    if worker is not None:
      worker.close()
    result["tunix"] = None
    return None


def _run(args, workdir: str) -> dict:
  c = dict(CONFIG, attention="auto")
  vocab, pad_id = c["vocab_size"], c["pad_id"]
  result: dict[str, Any] = {"config": c, "args": vars(args), "machine": machine_info(),
                            "load": [("start", os.getloadavg())]}
  model = Transformer(model_config(c), rngs=nnx.Rngs(args.seed))
  params = nnx.state(model, nnx.Param)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  assert num_params == EXPECTED_PARAMS, num_params
  np.savez(os.path.join(workdir, "weights.npz"), **flatten_params(params))
  prompts = np.random.default_rng(args.seed).integers(
    1, vocab, (args.prompts, args.prompt_length)).astype(np.int32)
  cases = make_cases(args)
  result["rljax"] = {"params": num_params, "versions": key_versions(), "freeze": pip_freeze(),
                     "backend": jax.default_backend(), "python": sys.executable}
  result["budgets"] = next((c.budgets.tolist() for c in cases if c.budgets is not None), None)

  worker = start_tunix(args, workdir, c, result)
  try:
    if worker:
      for case in cases:
        if "tunix" in case.samplers:
          tunix_setup_case(worker, case, prompts, vocab)

    def call(case: Case, sampler, seed: int):
      if sampler == "tunix":
        return tunix_call(worker, case, seed)
      return rljax_call(model, case, sampler, prompts, seed, pad_id)

    failures = result["failures"] = {}

    def active(case: Case):
      return [s for s in case.samplers if (s != "tunix" or worker)
              and f"{case.name}/{sampler_name(s)}" not in failures]

    seconds: dict[str, list[float]] = {}
    useful: dict[str, list[int]] = {}
    longest: dict[str, list[int]] = {}
    first: dict[str, float] = {}
    warm: dict[str, Any] = {}
    for case in cases:  # warm-up (compiles), seed args.seed
      for sampler in active(case):
        key = f"{case.name}/{sampler_name(sampler)}"
        try:
          first[key], lengths, rollout = call(case, sampler, args.seed)
        except Exception as e:  # noqa: BLE001 - reported, the other samplers still run
          failures[key] = f"{type(e).__name__}: {e}"
          print(f"{key} failed; left out:\n{traceback.format_exc()}", file=sys.stderr)
          continue
        warm[key] = (lengths, rollout)
        seconds[key], useful[key], longest[key] = [], [], []
    result["first_call_seconds"] = first
    result["checks"] = checks(cases, warm)
    if worker:
      result["checks"]["tunix_greedy"] = greedy_check(worker, model, prompts, args.greedy_tokens,
                                                      vocab, pad_id)

    for rep in range(args.repeats):
      result["load"].append((f"rep {rep}", os.getloadavg()))
      for case in cases:
        for sampler in active(case):
          key = f"{case.name}/{sampler_name(sampler)}"
          t, lengths, _ = call(case, sampler, args.seed + 1 + rep)
          seconds[key].append(t)
          useful[key].append(case.useful_tokens(lengths))
          longest[key].append(int(lengths.max()))
    result["load"].append(("end", os.getloadavg()))
  finally:
    if worker:
      worker.close()

  rates = {k: [u / t for u, t in zip(useful[k], seconds[k])] for k in seconds}
  result.update(
    cases=[{"name": k.name, "label": k.label, "samples": k.samples,
            "max_new_tokens": k.max_new_tokens, "stop_tokens": len(k.stop_tokens),
            "top_p": k.top_p, "samplers": [sampler_name(s) for s in k.samplers]}
           for k in cases],
    seconds={k: summary(v) for k, v in seconds.items()},
    tokens_per_second={k: summary(v) for k, v in rates.items()},
    useful_tokens={k: summary(v) for k, v in useful.items()},
    longest_row={k: summary(v) for k, v in longest.items()},
    memory=[kv_bytes(model.config, case, args.prompts, args.prompt_length, s)
            for case in cases if case.name in ("b1", "b2") for s in args.slots],
  )
  result["ratios"] = ratios(cases, rates, args.slots)
  return result


def checks(cases: list[Case], warm: dict) -> dict:
  """Engine vs. generate on the warm-up calls (same key): identical tokens on (a); equal
  completion lengths on (b2); the engine's lengths equal the budgets on (b1)."""
  out = {}
  for case in cases:
    for sampler in case.samplers:
      if isinstance(sampler, str) or "generate" not in case.samplers:
        continue
      mine = warm.get(f"{case.name}/{sampler_name(sampler)}")
      ref = warm.get(f"{case.name}/generate")
      if mine is None or ref is None:
        continue
      if case.name == "a":
        n = case.max_new_tokens
        a, b = np.asarray(mine[1].tokens)[:, -n:], np.asarray(ref[1].tokens)[:, -n:]
        m = np.asarray(ref[1].completion_mask)
        out[f"a/{sampler_name(sampler)}"] = {
          "identical_tokens": bool(np.array_equal(a, b)),
          "equal_completion_tokens": f"{int(np.sum(a == b))}/{a.size}",
          "logprob_max_abs_diff": float(np.max(np.abs(np.where(
            m, np.asarray(mine[1].logprobs) - np.asarray(ref[1].logprobs), 0.0))))}
      elif case.name == "b2":
        out[f"b2/{sampler_name(sampler)}"] = {
          "equal_lengths": bool(np.array_equal(mine[0], ref[0]))}
      elif case.name == "b1":
        out[f"b1/{sampler_name(sampler)}"] = {
          "lengths_equal_budgets": bool(np.array_equal(mine[0], case.budgets))}
  return out


def ratios(cases: list[Case], rates: dict, slots: list[int]) -> dict:
  """Per-case ratios of the median tokens/s, and the per-repetition ("paired") ones."""
  out = {}

  def add(name, a, b):
    if a in rates and b in rates and rates[a] and rates[b]:
      ma, mb = statistics.median(rates[a]), statistics.median(rates[b])
      out[name] = {"ratio": ma / mb,
                   "paired": summary([x / y for x, y in zip(rates[a], rates[b])])}

  for case in cases:
    for sampler in case.samplers:
      if isinstance(sampler, str):
        continue
      e = f"{case.name}/{sampler_name(sampler)}"
      add(f"{e}:generate", e, f"{case.name}/generate")
      add(f"{e}:tunix", e, f"{case.name}/tunix")
      if case.name in ("b1", "b2"):
        add(f"{e}:fixed", e, f"fixed/{sampler_name(sampler)}")
  return out


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def report(r: dict) -> str:
  tps, rat = r["tokens_per_second"], r["ratios"]

  def rate(key):
    if key not in tps:
      return NA
    x = tps[key]
    return f"{x['median']:.0f} ({x['min']:.0f}–{x['max']:.0f})"

  def ratio(key):
    if key not in rat:
      return NA
    x = rat[key]
    p = x["paired"]
    return f"{x['ratio']:.2f} ({p['min']:.2f}–{p['max']:.2f})"

  rows = [("case", "slots", "useful tok/call", "generate tok/s", "engine tok/s", "Tunix tok/s",
           "engine/generate", "engine/Tunix", "engine/fixed"), ("---",) * 9]
  for case in r["cases"]:
    for e in (s for s in case["samplers"] if s.startswith("engine")):
      n = case["name"]
      u = r["useful_tokens"].get(f"{n}/{e}", {}).get("median")
      rows.append((case["label"], e.split("@")[1], NA if u is None else f"{u:.0f}",
                   rate(f"{n}/generate"),
                   rate(f"{n}/{e}"), rate(f"{n}/tunix"), ratio(f"{n}/{e}:generate"),
                   ratio(f"{n}/{e}:tunix"), ratio(f"{n}/{e}:fixed")))
  lines = ["| " + " | ".join(row) + " |" for row in rows]
  reps = len(next(iter(r["seconds"].values()))["samples"])
  lines += ["", f"Tokens/s: useful tokens / wall time of one call; median (min–max) of {reps} "
            "interleaved repetitions after a warm-up call (compile excluded). Ratios: of the "
            "medians (min–max of the per-repetition ratios). engine/fixed: the engine's (b) "
            "rate over its own fixed-length rate at the same slot count. (b1): generate and "
            "Tunix run the largest budget for every row and are charged the sum of budgets."]
  requests = r["args"]["prompts"] * r["args"]["samples"]
  b2 = [f"{k.split('/')[1]} {v['median']:.0f} / {r['useful_tokens'][k]['median'] / requests:.1f}"
        for k, v in r["longest_row"].items() if k.startswith("b2/")]
  if b2:
    lines.append("(b2) longest row (a static batch's decode steps) / mean completion length, "
                 "medians: " + ", ".join(b2))
  bounds = []
  for key, x in r["longest_row"].items():
    case, sampler = key.split("/")
    if case in ("b1", "b2") and sampler.startswith("engine@"):
      slots, u = int(sampler.split("@")[1]), r["useful_tokens"][key]["median"]
      steps = max(-(-u // slots), x["median"])
      bounds.append(f"{case}@{slots} {steps:.0f} (slot occupancy <= {u / (slots * steps):.0%})")
  if bounds:
    lines.append("(b) the engine's decode steps >= max(useful tokens / slots, longest row), "
                 "medians: " + ", ".join(bounds))
  lines += ["", "| (c) KV bytes, engine default sizing | slots | blocks x size | pool MiB + "
            "tables KiB | static cache MiB | ratio |", "| --- | --- | --- | --- | --- | --- |"]
  for m in r["memory"]:
    lines.append(f"| {m['case']} (N={r_case(r, m['case'])['max_new_tokens']}) | {m['slots']} | "
                 f"{m['num_blocks']} x {m['block_size']} | "
                 f"{m['pool_bytes'] / 2**20:.1f} + {m['table_bytes'] / 2**10:.1f} | "
                 f"{m['static_bytes'] / 2**20:.1f} | {m['ratio']:.3f} |")
  for key, error in r["failures"].items():
    lines.append(f"FAILED (left out): {key}: {error}")
  lines += ["", "Goals of issue 12: " + "; ".join(goals(r))]
  for name, check in r["checks"].items():
    what = ("Tunix greedy vs generate greedy ((a)'s prompts)" if name == "tunix_greedy"
            else f"{name} vs generate (warm-up call, same key)")
    lines.append(f"Check {what}: " + ", ".join(f"{k} {v}" for k, v in check.items()))
  m = r["machine"]
  loads = ", ".join(f"{label}: {a:.2f}/{b:.2f}/{c:.2f}" for label, (a, b, c) in r["load"]
                    if label in ("start", "end"))
  lines.append(f"Machine: {m['cpu']}, nproc={m['nproc']} (affinity {m['affinity']}), "
               f"{m['platform']}; env {m['env'] or '{}'}")
  lines.append(f"Load average (1/5/15 min): {loads}")
  lines.append(f"rljax process: backend {r['rljax']['backend']}, "
               + ", ".join(f"{k} {v}" for k, v in r["rljax"]["versions"].items()))
  if r["tunix"]:
    t = r["tunix"]
    lines.append(f"Tunix process: backend {t['backend']}, "
                 + ", ".join(f"{k} {v}" for k, v in t["versions"].items()))
  else:
    lines.append(f"Tunix: skipped ({r['tunix_skipped']}).")
  lines.append("First calls (s, compile included): "
               + ", ".join(f"{k} {v:.1f}" for k, v in r["first_call_seconds"].items()))
  return "\n".join(lines)


GOALS = (("a", "tunix", 1.5), ("b1", "generate", 3.0), ("b1", "tunix", 3.0), ("b1", "fixed", 0.8),
         ("b2", "generate", 3.0), ("b2", "tunix", 3.0), ("b2", "fixed", 0.8))


def goals(r: dict) -> list[str]:
  """Each goal of the issue with the measured value (ratio of medians) and whether it is met."""
  out = []
  for case, other, target in GOALS:
    for key, x in r["ratios"].items():
      name, versus = key.split(":")
      if name.startswith(f"{case}/") and versus == other:
        engine = name.split("/")[1]
        out.append(f"{case} {engine}/{other} >= {target}: {x['ratio']:.2f} "
                   f"{'yes' if x['ratio'] >= target else 'no'}")
  for m in r["memory"]:
    out.append(f"(c) {m['case']} S={m['slots']} <= 0.25: {m['ratio']:.3f} "
               f"{'yes' if m['ratio'] <= 0.25 else 'no'}")
  return out


def r_case(r: dict, name: str) -> dict:
  return next(c for c in r["cases"] if c["name"] == name)


CASES = ("a", "a_top_p", "fixed", "b1", "b2")


def case_list(text: str) -> list[str]:
  values = [v.strip() for v in text.split(",") if v.strip()]
  if not values or any(v not in CASES for v in values):
    raise argparse.ArgumentTypeError(f"--cases must be names among {', '.join(CASES)} "
                                     f"separated by commas; got {text!r}")
  return values


def slot_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"--slots must be ints >= 1 separated by commas; got "
                                     f"{text!r}")
  return values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON"),
                      help="python of the Tunix venv (default: $TUNIX_PYTHON; none: skip Tunix)")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (>= 5)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--slots", type=slot_list, default=[32],
                      help="the engine's num_slots for (b) and fixed, e.g. 16,32,64 (32)")
  parser.add_argument("--cases", type=case_list, default=list(CASES),
                      help="the cases to run, e.g. a,fixed,b1 (default: all)")
  parser.add_argument("--prompts", type=int, default=16, help="prompts B (16)")
  parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens P (64)")
  parser.add_argument("--new-tokens", type=int, default=128,
                      help="new tokens of (a) and of the engine's fixed-length case (128)")
  parser.add_argument("--top-p", type=float, default=0.95, help="the top-p row (0: none)")
  parser.add_argument("--samples", type=int, default=8, help="samples per prompt in (b) (8)")
  parser.add_argument("--mean-length", type=float, default=64.0,
                      help="mean of the geometric budgets of (b1) (64)")
  parser.add_argument("--max-new-tokens", type=int, default=512,
                      help="cap of the budgets (b1) and max_new_tokens of (b2) (512)")
  parser.add_argument("--stop-ids", type=int, default=128,
                      help="(b2)'s stop-token set: ids 0 .. stop_ids - 1 (128)")
  parser.add_argument("--greedy-tokens", type=int, default=32,
                      help="new tokens of the untimed greedy Tunix-vs-generate check (32)")
  parser.add_argument("--json", help="also write all results (samples, freezes) to this file")
  parser.add_argument("--no-freeze", action="store_true",
                      help="do not print the two pip freezes (they are always in --json)")
  args = parser.parse_args()
  require_positive(parser, args, ("repeats", "prompts", "prompt_length", "new_tokens", "samples",
                                  "max_new_tokens", "stop_ids", "greedy_tokens"))
  if not 0 <= args.top_p <= 1:
    parser.error(f"--top-p must lie in [0, 1]; got {args.top_p}")
  if args.mean_length < 1:
    parser.error(f"--mean-length must be >= 1; got {args.mean_length}")
  start = time.perf_counter()
  result = run(args)
  result["wall_seconds"] = time.perf_counter() - start
  title = (f"Rollout engine benchmark: generate vs. engine_generate vs. Tunix Sampler, "
        f"{EXPECTED_PARAMS:,}-parameter Qwen3-style model, float32, temperature 1")
  print_side_by_side(title, report(result), result, freeze=not args.no_freeze,
                     json_path=args.json)


if __name__ == "__main__":
  main()
