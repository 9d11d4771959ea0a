"""Losses: the policy-gradient family, the value loss, and the preference family.

Every loss returns `(loss, metrics)`: a scalar and a flat dict of scalar diagnostics.
"""

from rljax.losses.dpo import DPO_VARIANTS, dpo_loss
from rljax.losses.policy import (
    cispo_loss,
    grpo_loss,
    gspo_loss,
    policy_gradient_loss,
    ppo_clip_loss,
    ppo_penalty_loss,
    ppo_ptx_loss,
)
from rljax.losses.preference import cpo_loss, kto_loss, orpo_loss, simpo_loss
from rljax.losses.reward_model import listwise_reward_loss, reward_model_loss
from rljax.losses.value import value_loss

__all__ = [
    "DPO_VARIANTS",
    "cispo_loss",
    "cpo_loss",
    "dpo_loss",
    "grpo_loss",
    "gspo_loss",
    "kto_loss",
    "listwise_reward_loss",
    "orpo_loss",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "ppo_penalty_loss",
    "ppo_ptx_loss",
    "reward_model_loss",
    "simpo_loss",
    "value_loss",
]
