"""DPO on the addition task: preference pairs from the SFT model's own correct / incorrect samples.

  1. SFT on the careless demonstrations (as the GRPO pipeline, `pipeline.run_sft`);
  2. sample G answers per training prompt from the SFT model (`rljax.rollout.generate`), verify
     them with the exact-match reward, and keep one (correct, incorrect) pair per prompt that has
     both — the "on-policy preference pairs" of RLHF-from-verifier recipes;
  3. DPO (`rljax.train.objectives.dpo_objective`, sigmoid, β = 0.3, lr 3e-5) against the frozen
     SFT model, reference log-probs computed once per batch
     (`rljax.train.preference.add_reference_logps`);
  4. greedy accuracy on the held-out problems before and after.

Measured (seed 0): 28.3% → 36.0% greedy (+7.7 points), 117 s. With lr 1e-4 / 5e-4 (β = 0.1) the
chosen log-ratios go negative too (likelihood displacement) and greedy accuracy collapses to
2.7% / 0.4%; an NLL term on the chosen answers (RPO) would be the next thing to try.

Run: python experiments/addition/dpo.py [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.addition.pipeline import (  # noqa: E402
  AdditionConfig,
  AdditionData,
  Log,
  build_data,
  run_sft,
)
from experiments.addition.task import exact_match_reward  # noqa: E402
from rljax.data.batching import collate_prompts, collator  # noqa: E402
from rljax.data.iterator import BatchIterator  # noqa: E402
from rljax.data.tokenize import tokenize_dataset  # noqa: E402
from rljax.rollout.generate import generate  # noqa: E402
from rljax.train.objectives import dpo_objective, pair_count  # noqa: E402
from rljax.train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rljax.train.preference import add_reference_logps  # noqa: E402
from rljax.train.state import create_train_state  # noqa: E402
from rljax.train.step import make_train_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DPOSettings:
  num_pair_prompts: int = 2048
  samples_per_prompt: int = 8
  sample_chunk: int = 256  # prompts per `generate` call
  steps: int = 150
  batch_size: int = 64
  learning_rate: float = 3e-5
  beta: float = 0.3


def sample_answers(graphdef, state, data: AdditionData, records, config: AdditionConfig, key,
                   *, num_samples: int, temperature: float):
  """[(prompt text, [completion texts], answer)] for `records` (prompt records)."""
  tok = data.tokenizer
  batch = collate_prompts(records, pad_id=tok.pad_token_id, buckets=[config.prompt_length])
  out = generate((graphdef, state), batch.tokens, batch.mask, key,
                 max_new_tokens=config.max_new_tokens, temperature=temperature,
                 stop_tokens=[tok.eos_token_id], pad_id=tok.pad_token_id, num_samples=num_samples)
  p = batch.tokens.shape[1]
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  texts = tok.batch_decode([row[p:p + n].tolist() for row, n in zip(tokens, lengths)],
                           skip_special_tokens=True)
  return [(batch.texts[i], texts[i * num_samples:(i + 1) * num_samples],
           batch.fields["answer"][i]) for i in range(len(records))]


def greedy_accuracy(graphdef, state, data: AdditionData, config: AdditionConfig) -> float:
  """Greedy exact-match accuracy on the held-out problems (`generate`, temperature 0)."""
  tok, b = data.tokenizer, data.eval_batch
  out = generate((graphdef, state), b.tokens, b.mask, jax.random.key(config.seed),
                 max_new_tokens=config.max_new_tokens, temperature=0.0,
                 stop_tokens=[tok.eos_token_id], pad_id=tok.pad_token_id)
  p = b.tokens.shape[1]
  texts = tok.batch_decode([row[p:p + n].tolist() for row, n in
                            zip(np.asarray(out.tokens), np.asarray(out.lengths))],
                           skip_special_tokens=True)
  return float(exact_match_reward(b.texts, texts, answer=b.fields["answer"]).mean())


def preference_rows(samples) -> list[dict[str, str]]:
  """One {"prompt", "chosen", "rejected"} row per prompt with a correct and an incorrect sample
  (the first of each)."""
  rows = []
  for prompt, completions, answer in samples:
    right = exact_match_reward(None, completions, answer=[answer] * len(completions)) > 0.5
    if right.any() and not right.all():
      rows.append({"prompt": prompt, "chosen": completions[int(np.argmax(right))],
                   "rejected": completions[int(np.argmin(right))]})
  return rows


def run_dpo(config: AdditionConfig, settings: DPOSettings, *, log: Log = print) -> dict:
  times, start = {}, time.perf_counter()
  data = build_data(config)
  tok = data.tokenizer
  graphdef, sft_state = run_sft(config, data, log=log)
  times["sft_seconds"] = time.perf_counter() - start
  sft_params = jax.tree.map(np.asarray, (sft_state.params, sft_state.frozen))
  sampler = nnx.merge_state(sft_state.params, sft_state.frozen)
  before = greedy_accuracy(graphdef, sampler, data, config)
  log(f"after SFT: greedy accuracy {100 * before:.1f}%")

  t = time.perf_counter()
  records = data.rl_records[: settings.num_pair_prompts]
  key = jax.random.key(config.seed + 4)
  samples = []
  for i in range(0, len(records), settings.sample_chunk):
    samples += sample_answers(graphdef, sampler, data, records[i:i + settings.sample_chunk],
                              config, jax.random.fold_in(key, i),
                              num_samples=settings.samples_per_prompt,
                              temperature=config.temperature)
  rows = preference_rows(samples)
  log(f"  {len(rows)} preference pairs from {len(records)} prompts × "
      f"{settings.samples_per_prompt} samples")
  if not rows:
    raise RuntimeError("no prompt had both a correct and an incorrect sample; train SFT longer.")
  pairs, _ = tokenize_dataset(tok, rows, "preference")
  length = config.prompt_length + config.max_new_tokens + 1  # a truncated sample + <eos>
  batches = BatchIterator(pairs, min(settings.batch_size, len(pairs)), seed=config.seed,
                          collate=collator("preference", pad_id=tok.pad_token_id,
                                           buckets=[length]))
  optimizer = make_optimizer(OptimizerConfig(settings.learning_rate, warmup_steps=10))
  policy = nnx.merge(graphdef, sft_state.params, sft_state.frozen)
  dpo_graphdef, state = create_train_state(policy, optimizer, rng=config.seed)
  step = make_train_step(functools.partial(dpo_objective, beta=settings.beta), dpo_graphdef,
                         optimizer, count_fn=pair_count)
  for i in range(settings.steps):
    batch = add_reference_logps(dpo_graphdef, sft_params, next(batches))
    state, metrics = step(state, batch)
    if (i + 1) % max(1, settings.steps // 5) == 0:
      log(f"  dpo step {i + 1:4d}  loss {float(metrics['loss']):.4f}  "
          f"reward accuracy {float(metrics['reward_accuracy']):.3f}  "
          f"chosen {float(metrics['rewards_chosen']):+.2f}  "
          f"rejected {float(metrics['rewards_rejected']):+.2f}")
  times["dpo_seconds"] = time.perf_counter() - t
  after = greedy_accuracy(dpo_graphdef, nnx.merge_state(state.params, state.frozen), data,
                          config)
  times["total_seconds"] = time.perf_counter() - start
  log(f"after DPO: greedy accuracy {100 * after:.1f}%  (gain {100 * (after - before):+.1f} "
      "points)")
  return {"before": before, "after": after, "pairs": len(rows), **times}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sft-steps", type=int, default=AdditionConfig.sft_steps)
  parser.add_argument("--dpo-steps", type=int, default=DPOSettings.steps)
  parser.add_argument("--dpo-lr", type=float, default=DPOSettings.learning_rate)
  parser.add_argument("--beta", type=float, default=DPOSettings.beta)
  args = parser.parse_args()
  r = run_dpo(AdditionConfig(seed=args.seed, sft_steps=args.sft_steps),
              DPOSettings(steps=args.dpo_steps, learning_rate=args.dpo_lr, beta=args.beta))
  print(f"accuracy before DPO {100 * r['before']:.1f}%  →  after DPO {100 * r['after']:.1f}%   "
        f"(SFT {r['sft_seconds']:.0f}s, pairs + DPO {r['dpo_seconds']:.0f}s, "
        f"total {r['total_seconds']:.0f}s)")


if __name__ == "__main__":
  main()
