"""GRPO on arithmetic word problems with SmolLM2-135M-Instruct and a verifiable reward.

  RLJAX_SMOLLM2_DIR=smollm2 rljax train experiments/smollm2/grpo.py --out runs/smollm2_grpo

The policy is the converted SmolLM2-135M-Instruct directory ($RLJAX_SMOLLM2_DIR, default
"smollm2": the README's `rljax convert ... smollm2`); the prompts are chat-templated word
problems (`word_problems.py`) asking for the final answer after "####"; the reward is

    r = math_answer_reward (1 if the final answer — "#### x", \\boxed{x} or the last number —
        equals the reference) + 0.1 · format_reward("#### <number>")

G = 8 samples per prompt, up to 128 new tokens, β = 0.04 (k3 KL to the frozen instruct model),
16 prompts (128 completions) per step, AdamW lr 1e-6 (TRL's GRPO default) with 10 warmup steps;
greedy accuracy on 200 held-out problems every 25 steps. Sized for one GPU.

CPU smoke run (2 cores; a few steps, tiny shapes, no held-out evaluation):

  RLJAX_SMOLLM2_DIR=/tmp/smollm2-hf rljax train experiments/smollm2/grpo.py \\
    --set steps=3 --set data.batch_size=2 --set grpo.sampling.num_samples=2 \\
    --set grpo.sampling.max_new_tokens=16 --set data.eval=null --out /tmp/smol_grpo

Measured on the 2-core CPU (shared with other jobs, so rough): steps of 31.9 s (step 1, with
its 20 XLA compilations), 14.8 s and 11.3 s; 1 min 44 s wall for the command including model
loading and the final checkpoint / model / plot. With `grpo.sampling.num_samples=4
grpo.sampling.max_new_tokens=64`
(and `logging.save_every=0 logging.save_model=false`): 57.7 s, 33.1 s, 27.6 s per step. No
recompilation after step 1 (the "compiles" column of metrics.jsonl is 0).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.smollm2.word_problems import (  # noqa: E402
  eval_problems,
  prompt_rows,
  train_problems,
)
from rljax.experiment.config import (  # noqa: E402
  DataSection,
  ExperimentConfig,
  LoggingSection,
  ModelSection,
)
from rljax.rewards import combine_rewards, format_reward, math_answer_reward  # noqa: E402
from rljax.rollout.sampling import SamplingConfig  # noqa: E402
from rljax.train.grpo import GRPOConfig  # noqa: E402
from rljax.train.optim import OptimizerConfig  # noqa: E402

MODEL_DIR = os.environ.get("RLJAX_SMOLLM2_DIR", "smollm2")
NUM_EVAL = 200


def train_rows() -> list[dict[str, str]]:
  """5000 {"prompt", "answer"} rows, disjoint from the held-out ones."""
  return prompt_rows(train_problems(5000, num_eval=NUM_EVAL))


def eval_rows() -> list[dict[str, str]]:
  """200 held-out {"prompt", "answer"} rows."""
  return prompt_rows(eval_problems(NUM_EVAL))


# The answer is worth 1; answering in the requested "#### <number>" form adds 0.1.
reward = combine_rewards([(math_answer_reward, 1.0),
                          (format_reward(r"####\s*-?\d+\s*$"), 0.1)],
                         names=["answer", "format"])

config = ExperimentConfig(
  algorithm="grpo",
  steps=200,
  model=ModelSection(path=MODEL_DIR),
  data=DataSection(train=train_rows, eval=eval_rows, kind="prompt", batch_size=16,
                   eval_batch_size=100, max_length=96, buckets=(96,), chat=True),
  reward=reward,
  grpo=GRPOConfig(sampling=SamplingConfig(num_samples=8, max_new_tokens=128, temperature=1.0),
                  kl_coef=0.04),
  optimizer=OptimizerConfig(1e-6, warmup_steps=10),
  logging=LoggingSection(out_dir="runs/smollm2_grpo", eval_every=25, save_every=50),
)
