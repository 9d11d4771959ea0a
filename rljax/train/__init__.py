"""Training: train state, optimizer construction, jitted (sharded) steps and model-level objectives."""

from rljax.train.checkpoint import CheckpointRestoreError, Checkpointer
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.optim import (
  OptimizerConfig,
  current_learning_rate,
  decay_mask,
  make_optimizer,
  make_schedule,
)
from rljax.train.state import (
  TrainState,
  abstract_train_state,
  create_train_state,
  state_shardings,
  trainable_paths,
  variable_shardings,
)
from rljax.train.step import apply_gradients, make_grad_fn, make_train_step, split_microbatches

__all__ = [
  "CheckpointRestoreError",
  "Checkpointer",
  "OptimizerConfig",
  "TrainState",
  "abstract_train_state",
  "apply_gradients",
  "create_train_state",
  "current_learning_rate",
  "decay_mask",
  "dpo_objective",
  "make_grad_fn",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
  "pair_count",
  "sft_loss",
  "sft_token_count",
  "split_microbatches",
  "state_shardings",
  "trainable_paths",
  "variable_shardings",
]

# Reward modelling and the preference family beyond DPO (issue 5).
from rljax.train.preference import (  # noqa: E402
  add_reference_logps,
  cpo_objective,
  example_count,
  kto_objective,
  orpo_objective,
  precompute_reference_logps,
  reference_logps,
  simpo_objective,
)
from rljax.train.reward_modeling import (  # noqa: E402
  listwise_reward_objective,
  pair_accuracy,
  ranking_count,
  reward_pair_objective,
)

__all__ += [
  "add_reference_logps",
  "cpo_objective",
  "example_count",
  "kto_objective",
  "listwise_reward_objective",
  "orpo_objective",
  "pair_accuracy",
  "precompute_reference_logps",
  "ranking_count",
  "reference_logps",
  "reward_pair_objective",
  "simpo_objective",
]

# On-policy RL trainers (issue 5).
from rljax.rollout.sampling import SamplingConfig  # noqa: E402
from rljax.train.compiles import count_compiles  # noqa: E402
from rljax.train.experience import Experience  # noqa: E402
from rljax.train.forward import critic_values, policy_logprobs  # noqa: E402
from rljax.train.grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from rljax.train.onpolicy import UpdateConfig  # noqa: E402
from rljax.train.ppo import PPOConfig, PPOTrainer, split_critic  # noqa: E402

__all__ += [
  "Experience",
  "GRPOConfig",
  "GRPOTrainer",
  "PPOConfig",
  "PPOTrainer",
  "SamplingConfig",
  "UpdateConfig",
  "count_compiles",
  "critic_values",
  "policy_logprobs",
  "split_critic",
]

# The supervised objectives' typed options (one section per algorithm, issue 10).
from rljax.train.supervised import (  # noqa: E402
  CPOConfig,
  DPOConfig,
  KTOConfig,
  ORPOConfig,
  RewardModelConfig,
  SFTConfig,
  SimPOConfig,
)

__all__ += [
  "CPOConfig",
  "DPOConfig",
  "KTOConfig",
  "ORPOConfig",
  "RewardModelConfig",
  "SFTConfig",
  "SimPOConfig",
]
