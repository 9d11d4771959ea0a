"""The calculator pipeline through rljax: demonstrations → SFT → multi-turn GRPO with the tool.

  build_data(config)              demonstrated trajectories (the tool on `tool_prob` of them),
                                  RL and held-out problems
  run_sft(config, data)           supervised fine-tuning on the policy turns of the trajectories
  make_grpo_trainer(...)          `GRPOTrainer` with the calculator `ToolEnvironment`
  evaluate(trainer, state, rows)  greedy accuracy and tool-use rate on held-out problems
  run(config)                     all of it; both numbers before and after RL
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.calculator.task import (
  calculator_environment,
  calculator_tokenizer,
  demonstration,
  problem_rows,
  sample_problems,
)
from rljax.agents import ChatTurns
from rljax.agents.rollout import MultiTurnConfig
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.rollout.engine import EngineConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.objectives import sft_loss, sft_token_count
from rljax.train.onpolicy import UpdateConfig
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import TrainState, create_train_state
from rljax.train.step import make_train_step

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class CalculatorConfig:
  """Every knob of the run (defaults: the README's numbers on a 2-core CPU)."""

  seed: int = 0  # the model's initialisation, which demonstrations use the tool, SFT and RL
  # task
  problem_seed: int = 0  # the train / held-out problems (the same for every seed)
  tool_prob: float = 0.3
  num_demonstrations: int = 8000
  num_rl_prompts: int = 4000
  num_eval: int = 256
  # model
  hidden_size: int = 128
  intermediate_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  # SFT
  sft_steps: int = 400
  sft_batch_size: int = 64
  sft_learning_rate: float = 3e-3
  # RL (multi-turn GRPO)
  rl_steps: int = 30
  rl_prompts_per_step: int = 16
  group_size: int = 8
  rl_learning_rate: float = 3e-4
  max_new_tokens: int = 40  # every turn and observation of a trajectory
  max_turns: int = 3
  turn_tokens: int = 16
  prompt_length: int = 16

  @property
  def length(self) -> int:
    return self.prompt_length + self.max_new_tokens

  def multi_turn(self) -> MultiTurnConfig:
    return MultiTurnConfig(max_turns=self.max_turns, turn_tokens=self.turn_tokens,
                           prompt_length=self.prompt_length, env_timeout_s=30.0)

  def grpo_config(self) -> GRPOConfig:
    return GRPOConfig(
      sampling=SamplingConfig(num_samples=self.group_size, max_new_tokens=self.max_new_tokens),
      engine=EngineConfig(num_slots=min(64, self.rl_prompts_per_step * self.group_size)),
      multi_turn=self.multi_turn(), kl_coef=0.0, update=UpdateConfig(num_epochs=1))


@dataclasses.dataclass
class CalculatorData:
  tokenizer: Any
  chat: ChatTurns
  sft_ids: np.ndarray  # [N, L] demonstrated trajectories, right-padded
  sft_loss_mask: np.ndarray  # [N, L] their policy tokens
  rl_rows: list
  eval_rows: list
  demo_tool_rate: float


def split_problems(config: CalculatorConfig) -> tuple[list, list]:
  """(train, held-out) problems, disjoint; the RL prompts are the first train problems."""
  rng = np.random.default_rng(config.problem_seed)
  held_out = sample_problems(config.num_eval, rng)
  train = sample_problems(config.num_demonstrations, rng, exclude=set(held_out))
  return train, held_out


def build_data(config: CalculatorConfig) -> CalculatorData:
  tok = calculator_tokenizer()
  chat = ChatTurns(tok)
  train, held_out = split_problems(config)
  rows = problem_rows(train)
  use_tool = np.random.default_rng(config.seed + 1).random(len(rows)) < config.tool_prob
  ids = np.full((len(rows), config.length), tok.pad_token_id, np.int32)
  mask = np.zeros((len(rows), config.length), bool)
  for i, (row, tool) in enumerate(zip(rows, use_tool)):
    row_ids, row_mask = demonstration(chat, row, bool(tool))
    ids[i, :len(row_ids)], mask[i, :len(row_mask)] = row_ids, row_mask
  return CalculatorData(tok, chat, ids, mask, rows[:config.num_rl_prompts],
                        problem_rows(held_out), float(use_tool.mean()))


def new_policy(config: CalculatorConfig, vocab_size: int) -> Transformer:
  return Transformer(ModelConfig(
    vocab_size=vocab_size, hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size, num_layers=config.num_layers,
    num_heads=config.num_heads, num_kv_heads=config.num_heads,
    max_position_embeddings=config.length), rngs=nnx.Rngs(config.seed))


def run_sft(config: CalculatorConfig, data: CalculatorData, *, log: Log = print
            ) -> tuple[nnx.GraphDef, TrainState]:
  """Token-mean NLL of the policy turns of the demonstrated trajectories."""
  optimizer = make_optimizer(OptimizerConfig(
    config.sft_learning_rate, warmup_steps=config.sft_steps // 10, schedule="cosine",
    total_steps=config.sft_steps, min_lr_ratio=0.1, weight_decay=0.01))
  graphdef, state = create_train_state(new_policy(config, len(data.tokenizer)), optimizer,
                                       rng=config.seed)
  step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count)
  rng = np.random.default_rng(config.seed + 2)
  attention = data.sft_ids != data.tokenizer.pad_token_id
  t0 = time.perf_counter()
  for i in range(config.sft_steps):
    rows = rng.choice(len(data.sft_ids), config.sft_batch_size, replace=False)
    batch = {"input_ids": data.sft_ids[rows], "attention_mask": attention[rows],
             "loss_mask": data.sft_loss_mask[rows]}
    state, metrics = step(state, batch)
    if (i + 1) % max(1, config.sft_steps // 5) == 0:
      log(f"  [{time.perf_counter() - t0:.0f}s]  sft step {i + 1:5d}  "
          f"nll {float(metrics['nll']):.4f}")
  return graphdef, state


def make_grpo_trainer(config: CalculatorConfig, data: CalculatorData, graphdef: nnx.GraphDef,
                      sft_state: TrainState) -> tuple[GRPOTrainer, TrainState]:
  optimizer = make_optimizer(OptimizerConfig(config.rl_learning_rate, warmup_steps=3))
  policy = nnx.merge(graphdef, sft_state.params, sft_state.frozen)
  rl_graphdef, state = create_train_state(policy, optimizer, rng=config.seed + 3)
  trainer = GRPOTrainer(rl_graphdef, optimizer, config.grpo_config(), None, data.tokenizer,
                        stop_tokens=[data.tokenizer.eos_token_id],
                        pad_id=data.tokenizer.pad_token_id, environment=calculator_environment())
  return trainer, trainer.init_state(state)


def evaluate(trainer: GRPOTrainer, state: TrainState, rows: list, seed: int = 0, *,
             samples: int = 0) -> tuple[dict[str, float], list[dict]]:
  """Greedy accuracy (exact product) and tool-use rate (rows that called the calculator) of
  the multi-turn rollouts of `rows`, and the first `samples` of them as records (prompt,
  answer, completion, reward)."""
  sampling = dataclasses.replace(trainer.config.sampling, num_samples=1, temperature=0.0)
  with trainer.scope():
    scored = trainer.rollout(state, rows, jax.random.key(seed), sampling)
  tool = np.mean(["<tool_call>" in c for c in scored.completions])
  records = [{**row, "completion": c, "reward": float(r)} for row, c, r in
             zip(rows[:samples], scored.completions, scored.raw_scores)]
  return {"accuracy": float(np.mean(scored.raw_scores > 0.5)), "tool_rate": float(tool)}, records


def run_grpo(config: CalculatorConfig, data: CalculatorData, trainer: GRPOTrainer,
             state: TrainState, *, log: Log = print) -> TrainState:
  rng = np.random.default_rng(config.seed + 4)
  key = jax.random.key(config.seed + 5)
  for i in range(config.rl_steps):
    rows = [data.rl_rows[j] for j in rng.choice(len(data.rl_rows), config.rl_prompts_per_step,
                                                replace=False)]
    state, metrics = trainer.step(state, rows, jax.random.fold_in(key, i))
    if (i + 1) % max(1, config.rl_steps // 6) == 0:
      log(f"  grpo step {i + 1:4d}  reward {metrics['reward_mean']:.3f}  "
          f"tool calls/row {metrics.get('env/tool_calls', 0.0):.2f}  "
          f"turns {metrics['turns_mean']:.2f}")
  return state


def run(config: CalculatorConfig, *, log: Log = print) -> dict[str, float]:
  """The whole pipeline: accuracies and tool-use rates before / after RL, stage timings."""
  times, start = {}, time.perf_counter()
  data = build_data(config)
  log(f"{config.num_demonstrations} demonstrations, the calculator in "
      f"{100 * data.demo_tool_rate:.1f}% of them")
  t = time.perf_counter()
  graphdef, sft_state = run_sft(config, data, log=log)
  times["sft_seconds"] = time.perf_counter() - t
  trainer, state = make_grpo_trainer(config, data, graphdef, sft_state)
  before, _ = evaluate(trainer, state, data.eval_rows, config.seed)
  log(f"after SFT: accuracy {100 * before['accuracy']:.1f}%  tool use "
      f"{100 * before['tool_rate']:.1f}%")
  t = time.perf_counter()
  state = run_grpo(config, data, trainer, state, log=log)
  times["rl_seconds"] = time.perf_counter() - t
  after, _ = evaluate(trainer, state, data.eval_rows, config.seed)
  times["total_seconds"] = time.perf_counter() - start
  log(f"after GRPO: accuracy {100 * after['accuracy']:.1f}%  tool use "
      f"{100 * after['tool_rate']:.1f}%")
  return {"accuracy_before": before["accuracy"], "tool_rate_before": before["tool_rate"],
          "accuracy": after["accuracy"], "tool_rate": after["tool_rate"], **times}
