"""Jitted KV-cache sampling: tokens, behaviour log-probs and masks (`generate`, `Rollout`)."""

from rljax.rollout.generate import Rollout, generate
from rljax.rollout.sampling import SamplingConfig, sample_next_token, top_p_keep

__all__ = ["Rollout", "SamplingConfig", "generate", "sample_next_token", "top_p_keep"]
