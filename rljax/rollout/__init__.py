"""Sampling: tokens, behaviour log-probs and masks (`Rollout`) from the static jitted KV-cache
`generate` (the reference) or the continuous-batching `engine_generate`."""

from rljax.rollout.engine import EngineConfig, EngineRun, engine_generate
from rljax.rollout.generate import Rollout, generate
from rljax.rollout.sampling import SamplingConfig, request_keys, sample_next_token, top_p_keep

__all__ = ["EngineConfig", "EngineRun", "Rollout", "SamplingConfig", "engine_generate", "generate",
           "request_keys", "sample_next_token", "top_p_keep"]
