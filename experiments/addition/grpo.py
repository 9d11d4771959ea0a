"""The addition main job as a runner experiment: `rljax train experiments/addition/grpo.py`.

The `build_model` hook runs the SFT stage of `pipeline.py` (careless demonstrations) and hands
the SFT policy to the runner, which then runs GRPO with the exact-match verifier and evaluates
greedy accuracy on the held-out problems every `logging.eval_every` steps (step 0 included when
the runner evaluates before training). `python experiments/addition/main.py` is the same
pipeline as a plain script.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.addition.pipeline import AdditionConfig, build_data, run_sft  # noqa: E402
from experiments.addition.task import (  # noqa: E402
  char_tokenizer,
  exact_match_reward,
  prompt_rows,
  sample_problems,
)
from rljax.experiment.config import (  # noqa: E402
  DataSection,
  ExperimentConfig,
  LoggingSection,
)
from rljax.train.grpo import GRPOConfig  # noqa: E402
from rljax.train.optim import OptimizerConfig  # noqa: E402

TASK = AdditionConfig()


def _split(seed: int = TASK.seed):
  rng = np.random.default_rng(seed)
  held_out = sample_problems(TASK.num_eval, rng, digits=TASK.digits)
  train = sample_problems(TASK.num_demonstrations, rng, digits=TASK.digits, exclude=set(held_out))
  return train[: TASK.num_rl_prompts], held_out


def train_rows() -> list[dict[str, str]]:
  """RL prompts {"prompt", "answer"} (the same problems `pipeline.build_data` uses)."""
  return prompt_rows(_split()[0], digits=TASK.digits, reverse=TASK.reverse)


def eval_rows() -> list[dict[str, str]]:
  """Held-out prompts {"prompt", "answer"}."""
  return prompt_rows(_split()[1], digits=TASK.digits, reverse=TASK.reverse)


def build_model(config: ExperimentConfig, tokenizer) -> nnx.Module:
  """The SFT policy: trains the from-scratch transformer on the careless demonstrations."""
  del config, tokenizer
  graphdef, state = run_sft(TASK, build_data(TASK))
  return nnx.merge(graphdef, state.params, state.frozen)


config = ExperimentConfig(
  algorithm="grpo",
  steps=TASK.rl_steps,
  tokenizer=char_tokenizer,
  data=DataSection(train=train_rows, eval=eval_rows, kind="prompt",
                   batch_size=TASK.rl_prompts_per_step, eval_batch_size=TASK.num_eval,
                   buckets=(TASK.prompt_length,), chat=False),
  reward=exact_match_reward,
  grpo=GRPOConfig(group_size=TASK.group_size, max_new_tokens=TASK.max_new_tokens,
                  temperature=TASK.temperature, beta=TASK.beta,
                  num_iterations=TASK.num_iterations),
  optimizer=OptimizerConfig(TASK.rl_learning_rate, warmup_steps=5),
  logging=LoggingSection(out_dir="runs/addition_grpo", eval_every=10, seed=TASK.seed),
)
