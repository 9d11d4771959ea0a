"""Benchmark (issue 14): multi-turn rollouts with extensible slots vs. re-prefilling the history
every turn.

One process, one model, one workload, three rollouts of it:

  (a) `rljax.agents.multi_turn_rollout`: each row stays in its engine slot between turns
      (`EngineRun(hold=True)`); an observation is appended to the slot's KV cache (`_extend`)
      and decoding resumes: the history is prefilled once, at the first prompt.
  (b) the straightforward loop on rljax's engine: every turn calls `engine_generate` on prompt =
      original prompt + all previous turns and observations (left-padded), max_new_tokens =
      the turn's budget: the whole history is prefilled again every turn. This is what Tunix's
      agentic learner does (it re-renders the conversation and calls `generate` each turn).
  (c) the same loop with Google Tunix 0.1.7's `Sampler` (its "vanilla" rollout engine, no KV
      reuse across calls), in a worker process under its own venv (`tunix_worker.py`, ops
      `turn_sampler` / `sample_ids`; the driver keeps the loop and the environment):

  python3 -m venv /work/tunix-venv && /work/tunix-venv/bin/pip install google-tunix==0.1.7

Run from the repository root (about 5 min with Tunix at the defaults on a shared 2-core CPU, load
~3.5; 7 with `--check`):

  python benchmarks/multi_turn.py [--turns 4] [--repeats 3] [--tunix-python PY] [--stop-ids 0]

Model: `grpo_step.py`'s Qwen3-style decoder with random weights (6,032,128 parameters, V=8192, 4
layers, d=256, f32), as `rollout_engine.py`. Workload: 16 prompts x 4 samples (R = 64 rows), a
prompt of 64 random ids in [1, V), `--turns` k policy turns of at most `--turn-tokens` 32
sampled tokens, each answered by a `RowEnvironment` with a fixed 32-token observation
(`Observation(tokens=...)`, ids in [128, V) drawn from the row's seeded generator: the same in
all three); temperature 1 over the full vocabulary. A row's budget is max_new_tokens =
k·(32 + 32) (never reached: k turns + k − 1 observations). A turn ends at a stop id —
`--stop-ids` 128: ids 0..127, so under the random model a turn stops w.p. ~1/64 per token (~40 %
of turns before 32 tokens), as `rollout_engine.py`'s (b2) — or at its 32 tokens (`--stop-ids 0`:
no stop id, every turn and row the same length). Every variant steps the environment after
every turn with `rljax.agents.safe_step` (the last one too: its reward), decodes the actions'
texts the same way (`action_text`) and runs k turns per row; the tokens differ between the
variants (each draws its own keys), their distribution does not.

(b) left-pads turn t's histories to the longest possible, P + (t − 1)·(32 + 32) (one compile per
turn whatever the stops; the engine prefills that width), runs turn 1 with num_samples = 4 on
the 16 prompts (the prefix shared, as (a)) and the later turns on the 64 histories. (c) does the
same with a Sampler per turn (`max_prompt_length` = that width, KV cache width + 32); Tunix cuts
its completions before the stop token, so the loop appends id 1 where a turn stopped (the chat
parser's end of turn in Tunix's agentic loop), keeping the lengths of (a) and (b). Both
engines use `EngineConfig(num_slots=--slots)` (64: every row resident; (a) needs a slot per
row to keep its cache between turns).

Figures: policy tokens (sampled by the policy, observations excluded) per second of one whole
rollout (environment steps included), median (min–max) of `--repeats` interleaved repetitions
(a, b, c back to back, same seed) after `--warmup` calls each (2: where turns stop decides
which bucket shapes the engine compiles, so one warm-up call leaves some to the timed calls).
The first call's time (compile included) is reported separately, with the XLA backend-compile
seconds of the rljax process. Compiles that still happen in a timed call are counted per call
and their seconds (synchronous, on the calling thread) taken off that call's time in tok/s;
Tunix compiles in its own process, once per turn Sampler, all in the warm-up. Ratios are of the
medians, with the per-repetition ("paired") ones. A profiled call of (a) and (b) afterwards
(each engine call waited for, so a little slower than the timed ones): seconds in `_prefill`,
`_decode`, `_extend`, `_compact`, `_initial_state`, in `safe_step` (the env steps; a worker
thread in (a)) and the rest (host). `--check` (untimed, ~1 min of compiles): at temperature 0,
(a)'s and (b)'s trajectories are identical (same model, same histories: the KV cache kept
across turns gives what re-prefilling gives), and (c)'s too on the rows where no turn stopped
early (elsewhere its history has id 1 for the sampled stop id). Load average before / after
(`os.getloadavg`: the machine may be shared, see the report).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import jax
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import rljax.agents.rollout as mt
import rljax.rollout.engine as engine_module
from rljax.agents import ChatTurns, Observation, RowEnvironment, RowStep, safe_step
from rljax.agents.rollout import MultiTurnConfig, action_text, multi_turn_rollout
from rljax.models.transformer import Transformer
from rljax.rollout.engine import EngineConfig, engine_generate
from rljax.rollout.sampling import SamplingConfig

from bench_utils import print_side_by_side, require_positive
from grpo_step import (
  CONFIG,
  EXPECTED_PARAMS,
  flatten_params,
  key_versions,
  machine_info,
  model_config,
  pip_freeze,
  summary,
)
from rollout_engine import start_tunix

NA = "–"
CLOSE_ID = 1  # appended where Tunix cut a turn before its stop token (not the pad id 0)
ENV_TIMEOUT_S = 60.0
VARIANTS = ("a", "b", "c")
LABELS = {"a": "(a) rljax multi_turn_rollout (KV kept, observations appended)",
          "b": "(b) rljax engine_generate, history re-prefilled every turn",
          "c": "(c) Tunix 0.1.7 Sampler, history re-prefilled every turn"}


def id_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
  """Ids as text ("5 17 3" <-> [5, 17, 3]) for `ChatTurns`: word-level over the strings of
  0..V−1, no special tokens, a chat template that writes the contents as they are (so a
  prompt's ids are its content's, and the end of turn is empty)."""
  backend = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")


def ids_text(ids) -> str:
  return " ".join(str(int(i)) for i in ids)


class ChunkEnv(RowEnvironment):
  """Answers every turn with a fixed chunk: row i's observations are `turns` x `length` ids in
  [low, V) from its seeded generator (drawn at reset), reward = the action's token count / 100,
  never done (a row ends after its turns)."""

  def __init__(self, turns: int, length: int, low: int, vocab: int):
    self.turns, self.length, self.low, self.vocab = turns, length, low, vocab

  def reset_row(self, example, rng):
    chunks = rng.integers(self.low, self.vocab, (self.turns, self.length))
    return [{"role": "user", "content": ids_text(example)}], (chunks, 0)

  def step_row(self, action, action_tokens, state):
    chunks, turn = state
    return RowStep(Observation(tokens=tuple(chunks[min(turn, len(chunks) - 1)].tolist())),
                   reward=len(action_tokens) / 100, done=False, state=(chunks, turn + 1))


# ----------------------------------------------------------------------------------------------
# The three rollouts: each returns (seconds, policy tokens, [R] row token ids after the prompt,
# [R] policy masks of those ids).
# ----------------------------------------------------------------------------------------------


class Workload:
  """What the three rollouts share: the model, prompts, environment and sizes (`args`)."""

  def __init__(self, args, model, prompts: np.ndarray):
    self.args, self.model, self.prompts = args, model, prompts
    self.vocab = model.config.vocab_size
    self.g, self.k = args.samples, args.turns
    self.t, self.o = args.turn_tokens, args.observation_tokens
    self.rows = len(prompts) * self.g
    self.stops = tuple(range(args.stop_ids))
    self.env = ChunkEnv(self.k, self.o, max(args.stop_ids, 2), self.vocab)
    self.chat = ChatTurns(id_tokenizer(self.vocab), dummy=[{"role": "user", "content": "1"}])
    self.examples = [tuple(p.tolist()) for p in prompts]
    self.engine = EngineConfig(num_slots=args.slots)
    self.budget = self.k * (self.t + self.o)

  def width(self, turn: int) -> int:
    """The left-padded history width of turn `turn` (0-based) in (b) and (c)."""
    return self.prompts.shape[1] + turn * (self.t + self.o)

  def reset(self, seed: int):
    return self.env.reset([x for x in self.examples for _ in range(self.g)], seed=seed)

  def step(self, actions: list[list[int]], states: list):
    """safe_step of the rows' actions, the texts as multi_turn_rollout makes them."""
    stops = set(self.stops)
    texts = [action_text(self.chat.tokenizer, np.asarray(a, np.int64), stops) for a in actions]
    return safe_step(self.env, texts, actions, states, timeout_s=ENV_TIMEOUT_S)

  def sampling(self, temperature: float) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=self.budget, temperature=temperature,
                          num_samples=self.g)

  # (a) --------------------------------------------------------------------------------------

  def extensible(self, seed: int, temperature: float = 1.0):
    config = MultiTurnConfig(max_turns=self.k, turn_tokens=self.t, env_timeout_s=ENV_TIMEOUT_S,
                             prompt_length=self.prompts.shape[1])
    start = time.perf_counter()
    out, _ = multi_turn_rollout(
      self.model, self.env, self.examples, jax.random.key(seed), self.sampling(temperature),
      chat=self.chat, stop_tokens=self.stops, pad_id=0, config=config, seed=seed,
      engine=self.engine)
    out = jax.device_get(out)
    seconds = time.perf_counter() - start
    if not (np.all(out.num_turns == self.k) and np.all(out.truncated)):
      raise RuntimeError(f"(a): every row should take {self.k} turns and end on them; got "
                         f"turns {out.num_turns.tolist()}, truncated {out.truncated.tolist()}")
    p = out.rollout.prompt_mask.shape[1]
    rows = [out.rollout.tokens[r, p:p + out.rollout.lengths[r]] for r in range(self.rows)]
    masks = [out.policy_mask[r, :out.rollout.lengths[r]] for r in range(self.rows)]
    return seconds, int(out.policy_mask.sum()), rows, masks

  # (b), (c) -----------------------------------------------------------------------------------

  def reprefill(self, seed: int, sample_turn, temperature: float = 1.0):
    """The re-prefill loop; `sample_turn(turn, histories, key_seed)` returns each row's sampled
    ids of the turn (the stop token included where one came)."""
    start = time.perf_counter()
    _, states = self.reset(seed)
    histories = [list(self.examples[r // self.g]) for r in range(self.rows)]
    rows = [[] for _ in range(self.rows)]
    masks = [[] for _ in range(self.rows)]
    policy = 0
    for turn in range(self.k):
      actions = sample_turn(turn, histories, seed, temperature)
      step = self.step(actions, states)
      states = step.states
      for r, action in enumerate(actions):
        policy += len(action)
        rows[r] += action
        masks[r] += [True] * len(action)
        if turn + 1 < self.k:
          chunk = self.chat.observation_tokens(step.observations[r])
          rows[r] += chunk
          masks[r] += [False] * len(chunk)
          histories[r] = histories[r] + action + chunk
    seconds = time.perf_counter() - start
    return seconds, policy, [np.asarray(r) for r in rows], [np.asarray(m) for m in masks]

  def rljax_turn(self, turn: int, histories, seed: int, temperature: float):
    """One turn of (b): engine_generate on the histories left-padded to `width(turn)` (turn 0:
    the prompts with num_samples = G)."""
    first = turn == 0
    source = [histories[r] for r in range(0, self.rows, self.g)] if first else histories
    w = self.width(turn)
    tokens, mask = np.zeros((len(source), w), np.int32), np.zeros((len(source), w), bool)
    for i, h in enumerate(source):
      tokens[i, w - len(h):], mask[i, w - len(h):] = h, True
    out = engine_generate(
      self.model, tokens, mask, jax.random.fold_in(jax.random.key(seed), turn),
      SamplingConfig(max_new_tokens=self.t, temperature=temperature,
                     num_samples=self.g if first else 1),
      stop_tokens=self.stops, pad_id=0, engine=self.engine)
    completion, lengths = jax.device_get((out.tokens[:, w:], out.lengths))
    return [completion[r, :lengths[r]].tolist() for r in range(self.rows)]

  def tunix_turn(self, worker, turn: int, histories, seed: int, temperature: float):
    """One turn of (c): the worker's Sampler for this turn on the 64 histories; a turn Tunix
    cut before a stop token gets CLOSE_ID appended."""
    reply = worker.call("sample_ids", name=f"turn{turn}", prompts=histories,
                        seed=seed * 1000 + turn, top_p=1.0 if temperature > 0 else None)
    if not reply["same_ids"]:
      raise RuntimeError("(c): Tunix did not read the history ids it was given")
    self.tunix_seconds += reply["seconds"]
    return [t + [CLOSE_ID] if len(t) < self.t else t for t in reply["tokens"]]


# ----------------------------------------------------------------------------------------------
# Instrumentation: backend compiles and, for the profile, the engine's device calls.
# ----------------------------------------------------------------------------------------------


class Compiles:
  """Counts XLA backend compiles of this process and their seconds (a jax.monitoring
  listener; `mark()` starts a new interval)."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1
      self.seconds += duration

  def mark(self) -> tuple[int, float]:
    out = (self.count, self.seconds)
    self.count, self.seconds = 0, 0.0
    return out


PROFILED = ("_prefill", "_decode", "_extend", "_compact", "_initial_state")


@contextlib.contextmanager
def profiled(times: dict[str, list[float]]):
  """Within the block, every call of the engine's jitted programs (and of `safe_step`, both as
  (a) and (b) call it) is timed up to `jax.block_until_ready` into `times[name]`."""

  def wrap(name, fn, block=True):
    def call(*args, **kwargs):
      start = time.perf_counter()
      out = fn(*args, **kwargs)
      if block:
        jax.block_until_ready(out)
      times.setdefault(name, []).append(time.perf_counter() - start)
      return out
    return call

  saved = {name: getattr(engine_module, name) for name in PROFILED}
  saved_step = mt.safe_step
  try:
    for name, fn in saved.items():
      setattr(engine_module, name, wrap(name, fn))
    mt.safe_step = wrap("safe_step", saved_step, block=False)
    yield
  finally:
    for name, fn in saved.items():
      setattr(engine_module, name, fn)
    mt.safe_step = saved_step


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def run(args) -> dict:
  with tempfile.TemporaryDirectory(prefix="rljax-multi-turn-") as workdir:
    return _run(args, workdir)


def _run(args, workdir: str) -> dict:
  compiles = Compiles()
  c = dict(CONFIG, attention="auto")
  vocab = c["vocab_size"]
  result: dict[str, Any] = {"config": c, "args": vars(args), "machine": machine_info(),
                            "load": [("start", os.getloadavg())]}
  model = Transformer(model_config(c), rngs=nnx.Rngs(args.seed))
  params = nnx.state(model, nnx.Param)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  assert num_params == EXPECTED_PARAMS, num_params
  prompts = np.random.default_rng(args.seed).integers(
    1, vocab, (args.prompts, args.prompt_length)).astype(np.int32)
  w = Workload(args, model, prompts)
  result["rljax"] = {"params": num_params, "versions": key_versions(),
                     "freeze": pip_freeze() if not args.no_freeze else [],
                     "backend": jax.default_backend(), "python": sys.executable}

  if args.tunix_python:
    np.savez(os.path.join(workdir, "weights.npz"), **flatten_params(params))
  worker = start_tunix(args, workdir, c, result)
  try:
    if worker:
      for turn in range(w.k):
        worker.call("turn_sampler", name=f"turn{turn}", width=w.width(turn),
                    max_new_tokens=w.t, eos_tokens=list(w.stops) or [vocab])

    def call(variant: str, seed: int, temperature: float = 1.0):
      if variant == "a":
        return w.extensible(seed, temperature)
      if variant == "b":
        return w.reprefill(seed, w.rljax_turn, temperature)
      w.tunix_seconds = 0.0
      return w.reprefill(seed, lambda *a: w.tunix_turn(worker, *a), temperature)

    variants = [v for v in VARIANTS if v != "c" or worker]
    failures = result["failures"] = {}
    first, first_compile = {}, {}
    seconds = {v: [] for v in variants}
    tokens = {v: [] for v in variants}
    compiles.mark()
    for v in variants:  # warm-up: compiles (the first call's shapes, then the buckets of others)
      try:
        first[v], _, _, _ = call(v, args.seed)
        first_compile[v] = compiles.mark()
        for extra in range(1, args.warmup):
          call(v, args.seed + 100 + extra)
        compiles.mark()
      except Exception as e:  # noqa: BLE001 - reported, the others still run
        failures[v] = f"{type(e).__name__}: {e}"
        print(f"({v}) failed; left out:\n{traceback.format_exc()}", file=sys.stderr)
    variants = [v for v in variants if v not in failures]
    result["first_call_seconds"] = first
    result["first_call_compiles"] = first_compile

    result["tunix_sampler_seconds"] = []
    in_call = result["timed_compiles"] = {v: [] for v in variants}
    for rep in range(args.repeats):
      result["load"].append((f"rep {rep}", os.getloadavg()))
      for v in variants:
        compiles.mark()
        t, n, _, _ = call(v, args.seed + 1 + rep)
        in_call[v].append(compiles.mark())
        seconds[v].append(t)
        tokens[v].append(n)
        if v == "c":
          result["tunix_sampler_seconds"].append(w.tunix_seconds)
    result["load"].append(("end of timing", os.getloadavg()))

    if args.check and {"a", "b"} <= set(variants):
      result["check"] = greedy_check(w, args.seed, worker if "c" in variants else None)
      compiles.mark()
    if not args.no_profile:
      result["profile"] = {}
      for v in ("a", "b"):
        if v in variants:
          times: dict[str, list[float]] = {}
          with profiled(times):
            if v == "b":
              step = w.step
              w.step = lambda *a, **k: _timed_into(times, "safe_step", step, *a, **k)
            try:
              total, n, _, _ = call(v, args.seed + 1000)
            finally:
              w.__dict__.pop("step", None)
          result["profile"][v] = {"total": total, "policy_tokens": n,
                                  **{k: {"seconds": sum(x), "calls": len(x)}
                                     for k, x in times.items()}}
      result["profile_compiles"] = compiles.mark()
    result["load"].append(("end", os.getloadavg()))
  finally:
    if worker:
      worker.close()

  # Compile excluded: a call's backend-compile seconds (synchronous, on this thread) off its time.
  rates = {v: [n / (t - c[1]) for n, t, c in zip(tokens[v], seconds[v], in_call[v])]
           for v in seconds if seconds[v]}
  result.update(seconds={v: summary(x) for v, x in seconds.items() if x},
                policy_tokens={v: summary(x) for v, x in tokens.items() if x},
                tokens_per_second={v: summary(x) for v, x in rates.items()})
  result["ratios"] = {}
  for other in ("b", "c"):
    if "a" in rates and other in rates:
      result["ratios"][f"a/{other}"] = {
        "ratio": statistics.median(rates["a"]) / statistics.median(rates[other]),
        "paired": summary([x / y for x, y in zip(rates["a"], rates[other])])}
  return result


def _timed_into(times, name, fn, *args, **kwargs):
  start = time.perf_counter()
  try:
    return fn(*args, **kwargs)
  finally:
    times.setdefault(name, []).append(time.perf_counter() - start)


def greedy_check(w: Workload, seed: int, worker) -> dict:
  """At temperature 0: (a)'s trajectories vs. (b)'s (and (c)'s, the rows whose turns all ran to
  their budget, where Tunix's ids are comparable) — same model, same histories, so the same
  greedy tokens up to float rounding (a near tie may flip a token, after which a row
  differs)."""
  _, _, a_rows, a_masks = w.extensible(seed, 0.0)
  _, _, b_rows, b_masks = w.reprefill(seed, w.rljax_turn, 0.0)
  out = {"a_vs_b_identical_rows": f"{sum(np.array_equal(x, y) for x, y in zip(a_rows, b_rows))}"
                                  f"/{len(a_rows)}",
         "a_vs_b_identical_masks": bool(all(np.array_equal(x, y)
                                            for x, y in zip(a_masks, b_masks)))}
  if worker is not None:
    w.tunix_seconds = 0.0
    _, _, c_rows, _ = w.reprefill(seed, lambda *a: w.tunix_turn(worker, *a), 0.0)
    stops = np.asarray(w.stops, np.int64)
    full = [r for r, (x, m) in enumerate(zip(a_rows, a_masks)) if not np.isin(x[m], stops).any()]
    same = sum(np.array_equal(a_rows[r], c_rows[r]) for r in full)
    out["a_vs_c_identical_rows_without_a_stop"] = f"{same}/{len(full)}"
  return out


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def report(r: dict) -> str:
  a = r["args"]
  lines = [f"Workload: {a['prompts']} prompts x {a['samples']} samples, prompt {a['prompt_length']}, "
           f"{a['turns']} turns of <= {a['turn_tokens']} sampled tokens + "
           f"{a['observation_tokens']}-token observations, max_new_tokens "
           f"{a['turns'] * (a['turn_tokens'] + a['observation_tokens'])}, stop ids "
           + (f"0..{a['stop_ids'] - 1}" if a["stop_ids"] else "none (turns run to their budget)")
           + f", engine num_slots {a['slots']}", ""]
  rows = [("rollout", "wall s / rollout", "policy tokens / rollout", "policy tok/s",
           "(a) / this, tok/s (paired)"), ("---",) * 5]
  for v, label in LABELS.items():
    if v not in r["seconds"]:
      continue
    s, n, t = r["seconds"][v], r["policy_tokens"][v], r["tokens_per_second"][v]
    ratio = r["ratios"].get(f"a/{v}")
    rows.append((label, f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})",
                 f"{n['median']:.0f}", f"{t['median']:.0f} ({t['min']:.0f}–{t['max']:.0f})",
                 NA if ratio is None else f"**{ratio['ratio']:.2f}x** "
                 f"({ratio['paired']['min']:.2f}–{ratio['paired']['max']:.2f})"))
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  reps = len(next(iter(r["seconds"].values()))["samples"])
  lines += ["", f"Median (min–max) of {reps} interleaved repetitions after {a['warmup']} warm-up "
            "call(s) each; tok/s with the timed calls' own backend compiles taken off (below)."]
  if r.get("tunix_sampler_seconds"):
    lines.append("(c): seconds inside Tunix's Sampler calls per rollout (the rest is the loop, "
                 "the environment and the pipe): "
                 + ", ".join(f"{x:.2f}" for x in r["tunix_sampler_seconds"]))
  for v, error in r["failures"].items():
    lines.append(f"FAILED (left out): ({v}): {error}")
  lines.append("First call (s, compile included) [rljax-process backend compiles, their s]: "
               + ", ".join(f"({v}) {x:.1f} [{r['first_call_compiles'][v][0]}, "
                           f"{r['first_call_compiles'][v][1]:.1f}]"
                           for v, x in r["first_call_seconds"].items()))
  lines.append("Backend compiles during the timed calls [(count, s) per call; their seconds are "
               "taken off the call's time in tok/s]: "
               + "; ".join(f"({v}) " + ", ".join(f"{n} {s:.1f}" for n, s in x)
                           for v, x in r["timed_compiles"].items()))
  if "check" in r:
    lines.append("Greedy check (temperature 0, untimed): "
                 + ", ".join(f"{k} {v}" for k, v in r["check"].items()))
  for v, p in r.get("profile", {}).items():
    parts = {k: x for k, x in p.items() if isinstance(x, dict)}
    device = sum(x["seconds"] for k, x in parts.items() if k != "safe_step")
    host = p["total"] - device - (parts.get("safe_step", {}).get("seconds", 0.0)
                                  if v == "b" else 0.0)
    text = ", ".join(f"{k} {x['seconds']:.2f} s / {x['calls']} calls"
                     for k, x in sorted(parts.items(), key=lambda kv: -kv[1]["seconds"]))
    lines.append(f"Profile ({v}), one call, each engine call waited for: total {p['total']:.2f} s "
                 f"({p['policy_tokens']} policy tokens): {text}; the rest (host: schedule, "
                 f"device_get, Python{'' if v == 'b' else '; env steps overlap in a thread'}) "
                 f"{host:.2f} s")
  if "profile_compiles" in r and r["profile_compiles"][0]:
    lines.append(f"(the profiled calls compiled {r['profile_compiles'][0]} programs, "
                 f"{r['profile_compiles'][1]:.1f} s)")
  m = r["machine"]
  loads = ", ".join(f"{label}: {x:.2f}/{y:.2f}/{z:.2f}" for label, (x, y, z) in r["load"]
                    if label in ("start", "end of timing", "end"))
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
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON"),
                      help="python of the Tunix venv (default: $TUNIX_PYTHON; none: skip (c))")
  parser.add_argument("--turns", type=int, default=4, help="policy turns k per row (4)")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (3)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--warmup", type=int, default=2,
                      help="warm-up calls per rollout (2: the first compiles its shapes, the "
                           "second more of the buckets that depend on where turns stop)")
  parser.add_argument("--prompts", type=int, default=16, help="prompts B (16)")
  parser.add_argument("--samples", type=int, default=4, help="samples per prompt G (4)")
  parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens P (64)")
  parser.add_argument("--turn-tokens", type=int, default=32, help="most tokens of a turn (32)")
  parser.add_argument("--observation-tokens", type=int, default=32,
                      help="tokens of each observation (32)")
  parser.add_argument("--stop-ids", type=int, default=128,
                      help="stop ids 0 .. stop_ids - 1 end a turn (128; 0: none, turns run to "
                           "their budget)")
  parser.add_argument("--slots", type=int, default=64, help="the engines' num_slots (64 = R)")
  parser.add_argument("--check", action="store_true",
                      help="also run the untimed greedy check (temperature 0: more compiles)")
  parser.add_argument("--no-profile", action="store_true", help="skip the profiled calls")
  parser.add_argument("--json", help="also write all results (samples, freezes) to this file")
  parser.add_argument("--no-freeze", action="store_true",
                      help="do not collect / print the pip freezes")
  args = parser.parse_args()
  require_positive(parser, args, ("turns", "repeats", "warmup", "prompts", "samples",
                                  "prompt_length", "turn_tokens", "observation_tokens", "slots"))
  if not 0 <= args.stop_ids < CONFIG["vocab_size"] - 2:
    parser.error(f"--stop-ids must lie in [0, {CONFIG['vocab_size'] - 2}); got {args.stop_ids}")
  if CLOSE_ID >= args.stop_ids > 0:
    parser.error(f"--stop-ids must be 0 or > {CLOSE_ID} (Tunix's end of turn id is a stop id)")
  start = time.perf_counter()
  result = run(args)
  result["wall_seconds"] = time.perf_counter() - start
  title = (f"Multi-turn rollout benchmark (issue 14): extensible slots vs. re-prefill, "
           f"{EXPECTED_PARAMS:,}-parameter Qwen3-style model, float32, temperature 1")
  print_side_by_side(title, report(result), result, freeze=not args.no_freeze,
                     json_path=args.json)


if __name__ == "__main__":
  main()
