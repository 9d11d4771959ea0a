"""Jitted KV-cache sampling: tokens, behaviour log-probs and masks (`generate`, `Rollout`)."""

from rljax.rollout.generate import Rollout, generate
from rljax.rollout.sampling import sample_next_token, top_p_keep

__all__ = ["Rollout", "generate", "sample_next_token", "top_p_keep"]
