"""Default evaluations of the runner (an experiment's `evaluate(run, state)` hook replaces them).

  supervised (sft, reward_model, dpo family)   the objective's metrics on the held-out batches,
      without an update: eval/loss, eval/nll (sft), eval/reward_accuracy (pairs), ...;
      rows-weighted means over the batches
  grpo / ppo                                   rollouts of the held-out prompts:
      eval/accuracy (greedy: mean of reward > 0.5), eval/reward_mean, the sampler's own
      metrics (multi-turn: eval/turns_mean, eval/truncated_rate, eval/env/...), and
      eval/pass@k when `config.eval_k` > 1 (k samples at the sampling temperature); the first
      `logging.samples` greedy completions (prompt, completion, reward) are left in
      `run.samples` for the runner to log (a custom hook may set `run.samples` too)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from rljax.train.preference import add_reference_logps
from rljax.train.scoring import accuracy_metrics


def _rows(batch: Any) -> int:
  if hasattr(batch, "tokens"):
    return int(batch.tokens.shape[0])
  return int(np.shape(next(iter(batch.values())))[0])


def _weighted_mean(results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
  total = sum(n for n, _ in results)
  keys = results[0][1].keys() if results else ()
  return {k: sum(n * r[k] for n, r in results) / total for k in keys}


def jitted_objective(graphdef: nnx.GraphDef, loss_fn: Any):
  """`jit(params, frozen, batch) -> {"loss", **metrics}` of a supervised objective (no update)."""

  def evaluate(params, frozen, batch):
    loss, metrics = loss_fn(nnx.merge(graphdef, params, frozen), batch, normalizer=None)
    return {"loss": loss, **metrics}

  return jax.jit(evaluate)


def reference_of(run: Any, state: Any) -> tuple[Any, Any]:
  """(params, frozen) of the DPO / KTO reference: `run.reference`, whose frozen part is None
  under LoRA — the state's own frozen base, never copied (the reference is the base with the
  initial adapters: `rljax.models.lora`)."""
  params, frozen = run.reference
  return params, state.frozen if frozen is None else frozen


def evaluate_supervised(run: Any, state: Any) -> dict[str, float]:
  """The objective's loss and metrics on `run.eval_batches` (no update)."""
  if run.eval_step is None:  # built once per run
    run.eval_step = jitted_objective(run.graphdef, run.loss_fn)
  fn = run.eval_step
  results = []
  for batch in run.eval_batches:
    if run.reference is not None:
      batch = add_reference_logps(run.graphdef, reference_of(run, state), batch)
    metrics = jax.device_get(fn(state.params, state.frozen, batch))
    results.append((_rows(batch), {k: float(v) for k, v in metrics.items()}))
  return _weighted_mean(results)


def sample_records(prompts: Any, scored: Any, n: int) -> list[dict[str, Any]]:
  """The first `n` rows of a scored rollout as `{"prompt", "completion", "reward", **fields}`
  (the prompt as the model saw it, chat template included; the row's scalar dataset fields)."""
  records = []
  for row in range(min(n, len(scored.completions))):
    p = int(scored.prompt_index[row])
    fields = {k: v[p] for k, v in prompts.fields.items()
              if isinstance(v[p], (str, int, float, bool))}
    records.append({**fields, "prompt": prompts.texts[p], "completion": scored.completions[row],
                    "reward": float(scored.raw_scores[row])})
  return records


def evaluate_generation(run: Any, state: Any) -> dict[str, float]:
  """Greedy accuracy (and pass@k) of the policy on `run.eval_batches` of prompts; the first
  `logging.samples` greedy completions go to `run.samples`."""
  key = jax.random.key(run.config.logging.seed + 1)
  trainer = run.trainer
  greedy = dataclasses.replace(trainer.config.sampling, num_samples=1, temperature=0.0)
  results, run.samples = [], []
  for i, prompts in enumerate(run.eval_batches):
    with trainer.scope():
      scored = trainer.rollout(state, prompts, jax.random.fold_in(key, i), greedy)
    metrics = accuracy_metrics(scored, 1)
    metrics.pop("pass@1")
    metrics.update(scored.metrics or {})  # multi-turn: turns, truncations, environment counts
    run.samples += sample_records(prompts, scored, run.config.logging.samples - len(run.samples))
    k = run.config.eval_k
    if k > 1:
      sampled = trainer.evaluate(state, prompts, jax.random.fold_in(key, 10_000 + i), k=k)
      metrics[f"pass@{k}"] = sampled[f"pass@{k}"]
    results.append((_rows(prompts), metrics))
  return _weighted_mean(results)


def default_evaluate(run: Any, state: Any) -> dict[str, float]:
  """The algorithm's default evaluation (see the module docstring)."""
  if run.trainer is not None:
    return evaluate_generation(run, state)
  return evaluate_supervised(run, state)
