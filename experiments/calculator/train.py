"""The calculator job as a runner experiment: `rljax train experiments/calculator/train.py`.

The `build_model` hook runs the SFT stage of `pipeline.py` (demonstrations that use the tool on
30 % of the problems; kept in the run directory, so `--resume` does not redo it), the
`build_environment` hook gives the runner the calculator `ToolEnvironment`, so GRPO runs on
multi-turn rollouts, and the `evaluate` hook reports greedy accuracy and the tool-use rate on
the held-out problems (`eval/accuracy`, `eval/tool_rate`) with, computed once, those of the SFT
policy the run started from (`eval/accuracy_before`, `eval/tool_rate_before`).
`python experiments/calculator/main.py` is the same pipeline as a plain script.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from flax import nnx  # noqa: E402

from experiments.calculator.pipeline import (  # noqa: E402
  CalculatorConfig,
  build_data,
  evaluate as evaluate_rows,
  new_policy,
  run_sft,
  split_problems,
)
from experiments.calculator.task import (  # noqa: E402
  calculator_environment,
  calculator_tokenizer,
  problem_rows,
)
from rljax.experiment.config import DataSection, ExperimentConfig, LoggingSection  # noqa: E402
from rljax.experiment.stage import cached_stage  # noqa: E402
from rljax.train.optim import OptimizerConfig  # noqa: E402
from rljax.train.state import split_model  # noqa: E402

TASK = CalculatorConfig()


def train_rows() -> list[dict[str, str]]:
  """RL problems {"prompt": "a*b", "answer"} (the first train problems, as `build_data`)."""
  return problem_rows(split_problems(TASK)[0][: TASK.num_rl_prompts])


def eval_rows() -> list[dict[str, str]]:
  return problem_rows(split_problems(TASK)[1])


def build_model(config: ExperimentConfig, tokenizer) -> nnx.Module:
  """The SFT policy (once per run directory), seeded by `logging.seed` (the model's
  initialisation, which demonstrations use the tool, their order; the problems stay put)."""
  task = dataclasses.replace(TASK, seed=config.logging.seed)

  def sft() -> nnx.Module:
    graphdef, state = run_sft(task, build_data(task))
    return nnx.merge(graphdef, state.params, state.frozen)

  return cached_stage(config, "sft", sft, template=lambda: new_policy(task, len(tokenizer)))


def build_environment(config: ExperimentConfig, tokenizer):
  return calculator_environment()


_BEFORE: dict[int, dict[str, float]] = {}  # id(run) → the SFT policy's numbers


def evaluate(run, state) -> dict[str, float]:
  """Greedy accuracy and tool-use rate on the held-out problems, now and (once) at the start."""
  rows = eval_rows()
  if id(run) not in _BEFORE:
    _, params, frozen = split_model(run.model)
    start, _ = evaluate_rows(run.trainer, state.replace(params=params, frozen=frozen), rows)
    _BEFORE[id(run)] = {f"{k}_before": v for k, v in start.items()}
  metrics, run.samples = evaluate_rows(run.trainer, state, rows,
                                       samples=run.config.logging.samples)
  return {**metrics, **_BEFORE[id(run)]}


config = ExperimentConfig(
  algorithm="grpo",
  steps=TASK.rl_steps,
  tokenizer=calculator_tokenizer,
  data=DataSection(train=train_rows, eval=eval_rows, kind="prompt",
                   batch_size=TASK.rl_prompts_per_step, eval_batch_size=TASK.num_eval,
                   chat=False),  # the environment renders the chat
  grpo=TASK.grpo_config(),
  optimizer=OptimizerConfig(TASK.rl_learning_rate, warmup_steps=3),
  logging=LoggingSection(out_dir="runs/calculator_grpo", eval_every=10, seed=TASK.seed),
)
