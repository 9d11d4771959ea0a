"""Array-only operators: masking, log-probs, KL estimators and controllers, advantages, TRPO."""

from rljax.ops.advantages import (
    grpo_advantages,
    grpo_process_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.ops.kl import kl_from_logits, kl_penalty
from rljax.ops.kl_control import adaptive_kl_controller, fixed_kl_controller, ppo_kl_controller
from rljax.ops.logprobs import (
    entropy_from_logits,
    sequence_logprobs,
    shift_for_next_token,
    token_logprobs,
)
from rljax.ops.masking import aggregate, masked_mean, masked_sum, masked_var, masked_whiten
from rljax.ops.returns import discounted_returns, gae
from rljax.ops.segments import segment_sum
from rljax.ops.trust_region import trpo_step

__all__ = [
    "adaptive_kl_controller",
    "aggregate",
    "discounted_returns",
    "entropy_from_logits",
    "fixed_kl_controller",
    "gae",
    "grpo_advantages",
    "grpo_process_advantages",
    "kl_from_logits",
    "kl_penalty",
    "logprobs_from_hidden",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_kl_controller",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "segment_sum",
    "sequence_logprobs",
    "shift_for_next_token",
    "token_level_rewards",
    "token_logprobs",
    "trpo_step",
]
