"""Flax NNX decoder-only language models (Llama / Mistral / Qwen2 / Qwen3 / SmolLM / Gemma 2 / 3),
value and reward heads, and Hugging Face / GGUF weight I/O."""

from rljax.models.config import ModelConfig
from rljax.models.gguf import convert_gguf
from rljax.models.heads import RewardModel, ValueModel
from rljax.models.io import load_pretrained, save_pretrained
from rljax.models.transformer import Transformer

__all__ = [
    "ModelConfig",
    "RewardModel",
    "Transformer",
    "ValueModel",
    "convert_gguf",
    "load_pretrained",
    "save_pretrained",
]
