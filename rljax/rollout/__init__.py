"""Jitted KV-cache sampling: tokens, behaviour log-probs and masks (`generate`, `Rollout`)."""

from rljax.rollout.generate import Rollout, generate
from rljax.rollout.sampling import SamplingConfig, request_keys, sample_next_token, top_p_keep

__all__ = ["Rollout", "SamplingConfig", "generate", "request_keys", "sample_next_token", "top_p_keep"]
