"""Flax NNX decoder-only language models (Llama / Mistral / Qwen2 / Qwen3 / SmolLM) and HF weight names."""

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
