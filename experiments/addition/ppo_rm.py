"""PPO with a learned reward model on the addition task (the InstructGPT recipe, end to end).

  1. SFT on the careless demonstrations (`pipeline.run_sft`, as the GRPO main job);
  2. sample G answers per training prompt from the SFT model and verify them with the exact-match
     reward; every prompt with a correct and an incorrect answer gives (correct, incorrect) pairs
     (one per distinct incorrect answer, up to `pairs_per_prompt`); a slice of the prompts is
     held out for the reward model's pair accuracy;
  3. a `RewardModel` whose backbone is a copy of the SFT policy's (`RewardModel.from_policy`) is
     trained with Bradley–Terry (`reward_pair_objective` through `make_train_step`, counted with
     `pair_count`); its held-out pair accuracy is printed;
  4. PPO (`PPOTrainer`) with a critic copied from the SFT policy (`ValueModel.from_policy`), the
     reward being the reward model's score (`reward_model_reward`, token path: the rollout's
     own ids are scored, nothing is re-tokenized); the verifier is only used to print the true
     accuracy of the samples next to the learned reward (reward hacking would show there);
  5. greedy accuracy on the held-out problems before and after PPO.

Measured (seed 0, 2-core CPU shared with other jobs): 1760 training / 192 held-out pairs; reward
model held-out pair accuracy 74.5% (58.9% with the untrained head); greedy accuracy 28.3% →
45.0% after 60 PPO steps (+16.7 points); SFT 85 s, pairs + RM 53 s, PPO 82 s, total 225 s.
Seed 1: 1363 / 175 pairs, pair accuracy 76.0%, 29.0% → 35.4% (+6.4), 224 s; there the RM reward
keeps rising after step 30 while the samples' true accuracy falls (0.30 → 0.24): the ~75%
reward model is the limit, and the gain is positive but not robust across seeds.
Tuning notes: with kl_coef 0.01 the policy hacks the reward model (RM reward up, true accuracy
of the samples 0.43 → 0.01 in 20 steps); kl_coef 0.2 with lr 1e-4 is safe but slow (+6.6 in
40 steps); RM lr 3e-4 gives 70.8% pair accuracy, 3e-3 diverges (55.7%).

Run: python experiments/addition/ppo_rm.py [--seed 0] [--set ppo_steps=80 ...]
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

from experiments.addition.dpo import greedy_accuracy, sample_answers  # noqa: E402
from experiments.addition.pipeline import (  # noqa: E402
  AdditionConfig,
  AdditionData,
  Log,
  build_data,
  parse_overrides,
  run_sft,
)
from experiments.addition.task import exact_match_reward, preference_pairs  # noqa: E402
from rljax.data.batching import collator  # noqa: E402
from rljax.data.iterator import BatchIterator  # noqa: E402
from rljax.data.tokenize import tokenize_dataset  # noqa: E402
from rljax.models.heads import RewardModel, ValueModel  # noqa: E402
from rljax.rewards.model import reward_model_reward  # noqa: E402
from rljax.train.objectives import pair_count  # noqa: E402
from rljax.train.onpolicy import UpdateConfig  # noqa: E402
from rljax.train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rljax.train.ppo import PPOConfig, PPOTrainer, split_critic  # noqa: E402
from rljax.train.reward_modeling import (  # noqa: E402
  pair_accuracy,
  pair_rewards,
  reward_pair_objective,
)
from rljax.train.state import create_train_state  # noqa: E402
from rljax.train.step import make_train_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PPORMSettings:
  """Knobs of the reward-model and PPO stages (the task and SFT knobs are `AdditionConfig`)."""

  # preference pairs from the SFT model's samples
  num_pair_prompts: int = 2048
  samples_per_prompt: int = 8
  sample_chunk: int = 256
  pairs_per_prompt: int = 2
  held_out_fraction: float = 0.1
  # reward model
  rm_steps: int = 400
  rm_batch_size: int = 64
  rm_learning_rate: float = 1e-3
  # PPO
  ppo_steps: int = 60
  prompts_per_step: int = 64
  num_samples: int = 4
  learning_rate: float = 3e-4
  critic_learning_rate: float = 1e-3
  kl_coef: float = 0.1
  num_epochs: int = 2
  num_minibatches: int = 2
  entropy_coef: float = 0.0


def build_pairs(config: AdditionConfig, settings: PPORMSettings, data: AdditionData, graphdef,
                sft_state, *, log: Log = print) -> tuple[list[dict], list[dict]]:
  """(train, held-out) pair records, split by prompt."""
  records = data.rl_records[: settings.num_pair_prompts]
  samples = sample_answers(graphdef, nnx.merge_state(sft_state.params, sft_state.frozen), data,
                           records, config, jax.random.key(config.seed + 4),
                           num_samples=settings.samples_per_prompt,
                           temperature=config.temperature, chunk=settings.sample_chunk)
  split = int(len(samples) * (1 - settings.held_out_fraction))
  train = preference_pairs(samples[:split], max_pairs=settings.pairs_per_prompt)
  held_out = preference_pairs(samples[split:], max_pairs=settings.pairs_per_prompt)
  log(f"  {len(train)} training / {len(held_out)} held-out pairs from {len(records)} prompts × "
      f"{settings.samples_per_prompt} samples")
  if not train or not held_out:
    raise RuntimeError("too few prompts with both a correct and an incorrect sample.")
  tok = data.tokenizer
  return (tokenize_dataset(tok, train, "preference")[0],
          tokenize_dataset(tok, held_out, "preference")[0])


def train_reward_model(config: AdditionConfig, settings: PPORMSettings, data: AdditionData,
                       policy: nnx.Module, train_pairs: list, held_out_pairs: list, *,
                       log: Log = print) -> tuple[RewardModel, dict[str, float]]:
  """Bradley–Terry on the pairs; returns the reward model and its pair accuracies."""
  tok = data.tokenizer
  length = config.prompt_length + config.max_new_tokens + 1  # a truncated sample + <eos>
  collate = collator("preference", pad_id=tok.pad_token_id, buckets=[length])
  rm = RewardModel.from_policy(policy, rngs=nnx.Rngs(config.seed + 5))
  optimizer = make_optimizer(OptimizerConfig(
    settings.rm_learning_rate, warmup_steps=20, schedule="cosine",
    total_steps=settings.rm_steps, min_lr_ratio=0.1))
  rm_graphdef, state = create_train_state(rm, optimizer, rng=config.seed + 5)
  step = make_train_step(reward_pair_objective, rm_graphdef, optimizer, count_fn=pair_count)
  batches = BatchIterator(train_pairs, min(settings.rm_batch_size, len(train_pairs)),
                          seed=config.seed, collate=collate)
  held_out = list(BatchIterator(held_out_pairs, len(held_out_pairs), seed=0, shuffle=False,
                                drop_last=False, num_epochs=1, collate=collate))
  model = lambda s: (rm_graphdef, s.params, s.frozen)  # noqa: E731
  before = pair_accuracy(model(state), held_out)
  for i in range(settings.rm_steps):
    state, metrics = step(state, next(batches))
    if (i + 1) % max(1, settings.rm_steps // 4) == 0:
      log(f"  rm step {i + 1:4d}  loss {float(metrics['loss']):.4f}  "
          f"train pair accuracy {float(metrics['reward_accuracy']):.3f}")
  accuracy = {"rm_pair_accuracy_before": before,
              "rm_pair_accuracy": pair_accuracy(model(state), held_out),
              "rm_train_pair_accuracy": pair_accuracy(model(state), [next(batches)])}
  reward_model = nnx.merge(rm_graphdef, state.params, state.frozen)
  scores = np.concatenate([np.asarray(r) for _ in range(4)
                           for r in pair_rewards(reward_model, next(batches))])
  accuracy.update(rm_score_mean=float(scores.mean()), rm_score_std=float(scores.std()))
  return reward_model, accuracy


class _TrackedReward:
  """The learned reward, standardised with the mean / std of the reward model's scores on its
  training pairs (so `kl_coef` means the same whatever the RM's scale; InstructGPT normalises
  its RM the same way), also recording the verifier's verdict on the same samples (logs only)."""

  def __init__(self, rm_reward, mean: float, std: float):
    self.rm_reward, self.mean, self.std, self.true_accuracy = rm_reward, mean, std, []

  def __call__(self, prompts, completions, *, answer, prompt_tokens, prompt_mask=None,
               completion_tokens, completion_mask, completion_lengths=None):
    self.true_accuracy.append(float(exact_match_reward(prompts, completions, answer=answer).mean()))
    score = self.rm_reward(prompts, completions, prompt_tokens=prompt_tokens,
                           prompt_mask=prompt_mask, completion_tokens=completion_tokens,
                           completion_mask=completion_mask, completion_lengths=completion_lengths)
    return (score - self.mean) / max(self.std, 1e-6)


def run_ppo(config: AdditionConfig, settings: PPORMSettings, data: AdditionData,
            policy: nnx.Module, reward_model: RewardModel, rm_stats: dict, *,
            log: Log = print):
  """`ppo_steps` PPO steps on the training prompts; returns (graphdef, state)."""
  tok = data.tokenizer
  optimizer = make_optimizer(OptimizerConfig(settings.learning_rate, warmup_steps=5))
  critic_optimizer = make_optimizer(OptimizerConfig(settings.critic_learning_rate,
                                                    warmup_steps=5))
  critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(config.seed + 6))
  critic_graphdef, _, _ = split_critic(critic)
  reward = _TrackedReward(reward_model_reward(reward_model, tok), rm_stats["rm_score_mean"],
                          rm_stats["rm_score_std"])
  ppo = PPOConfig(sampling=config.sampling(settings.num_samples), kl_coef=settings.kl_coef,
                  update=UpdateConfig(num_epochs=settings.num_epochs,
                                      num_minibatches=settings.num_minibatches,
                                      agg="token-mean"),
                  entropy_coef=settings.entropy_coef)
  graphdef, state = create_train_state(policy, optimizer, rng=config.seed + 1)
  trainer = PPOTrainer(graphdef, critic_graphdef, optimizer, critic_optimizer, ppo, reward, tok,
                       stop_tokens=[tok.eos_token_id], pad_id=tok.pad_token_id)
  state = trainer.init_state(state, critic=critic)
  prompts = BatchIterator(
    data.rl_records, settings.prompts_per_step, seed=config.seed + 2,
    collate=collator("prompt", pad_id=tok.pad_token_id, buckets=[config.prompt_length]))
  key = jax.random.key(config.seed + 3)
  for i in range(settings.ppo_steps):
    state, m = trainer.step(state, next(prompts), jax.random.fold_in(key, i))
    if (i + 1) % max(1, settings.ppo_steps // 6) == 0:
      log(f"  ppo step {i + 1:4d}  rm reward {m['reward_mean']:+.3f}  "
          f"true accuracy of samples {reward.true_accuracy[-1]:.3f}  kl {m['kl']:.4f}  "
          f"value loss {m['value_loss']:.4f}  clipfrac {m['clipfrac']:.3f}")
  return graphdef, state


def run(config: AdditionConfig, settings: PPORMSettings, *, log: Log = print) -> dict:
  """SFT → pairs → reward model → PPO; returns accuracies (0..1) and timings (seconds)."""
  times, start = {}, time.perf_counter()
  data = build_data(config)
  graphdef, sft_state = run_sft(config, data, log=log)
  times["sft_seconds"] = time.perf_counter() - start
  before = greedy_accuracy(graphdef, nnx.merge_state(sft_state.params, sft_state.frozen), data,
                           config)
  log(f"after SFT: greedy accuracy {100 * before:.1f}%")
  t = time.perf_counter()
  train_pairs, held_out_pairs = build_pairs(config, settings, data, graphdef, sft_state, log=log)
  policy = functools.partial(nnx.merge, graphdef, sft_state.params, sft_state.frozen)
  reward_model, rm = train_reward_model(config, settings, data, policy(), train_pairs,
                                        held_out_pairs, log=log)
  times["rm_seconds"] = time.perf_counter() - t
  log(f"reward model: held-out pair accuracy {100 * rm['rm_pair_accuracy']:.1f}% "
      f"(untrained head {100 * rm['rm_pair_accuracy_before']:.1f}%)")
  t = time.perf_counter()
  ppo_graphdef, state = run_ppo(config, settings, data, policy(), reward_model, rm, log=log)
  times["ppo_seconds"] = time.perf_counter() - t
  after = greedy_accuracy(ppo_graphdef, nnx.merge_state(state.params, state.frozen), data,
                          config)
  times["total_seconds"] = time.perf_counter() - start
  log(f"after PPO: greedy accuracy {100 * after:.1f}%  (gain {100 * (after - before):+.1f} "
      "points)")
  return {"before": before, "after": after, **rm, **times}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args()
  task, rl = parse_overrides(args.set, AdditionConfig, PPORMSettings)
  r = run(AdditionConfig(seed=args.seed, **task), PPORMSettings(**rl))
  print(f"reward model held-out pair accuracy {100 * r['rm_pair_accuracy']:.1f}%; "
        f"accuracy before PPO {100 * r['before']:.1f}%  →  after PPO {100 * r['after']:.1f}%   "
        f"(SFT {r['sft_seconds']:.0f}s, pairs + RM {r['rm_seconds']:.0f}s, "
        f"PPO {r['ppo_seconds']:.0f}s, total {r['total_seconds']:.0f}s)")


if __name__ == "__main__":
  main()
