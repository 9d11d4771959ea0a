"""Reward functions: host-side callables `fn(prompts, completions, **fields) -> float32 [B]`.

See `rljax.rewards.base` for the protocol and the fields the rljax trainers pass. Process reward
functions (`rljax.rewards.process`) return per-step `StepRewards` instead, for
`GRPOConfig(advantage="process")`.
"""

from rljax.rewards.base import RewardFn
from rljax.rewards.combine import CombinedReward, combine_rewards
from rljax.rewards.format import format_reward
from rljax.rewards.length import length_penalty, overlong_penalty, soft_overlong_penalty
from rljax.rewards.math import (
  answers_match,
  extract_final_answer,
  math_answer_reward,
  parse_number,
)
from rljax.rewards.model import reward_model_reward
from rljax.rewards.process import StepRewards, process_reward, step_ends

__all__ = [
  "CombinedReward",
  "RewardFn",
  "StepRewards",
  "answers_match",
  "combine_rewards",
  "extract_final_answer",
  "format_reward",
  "length_penalty",
  "math_answer_reward",
  "overlong_penalty",
  "parse_number",
  "process_reward",
  "reward_model_reward",
  "soft_overlong_penalty",
  "step_ends",
]
