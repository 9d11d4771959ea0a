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
