"""ModelConfig ↔ transformers configs (built locally; nothing is downloaded)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
import transformers

from rljax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig

_SMALL = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=3,
  num_attention_heads=8,
  num_key_value_heads=2,
  max_position_embeddings=256,
  rms_norm_eps=1e-5,
)


def _fields(c: ModelConfig):
  return (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
          c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.max_position_embeddings)


def test_llama_with_llama3_rope_scaling():
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
  hf = transformers.LlamaConfig(**_SMALL, rope_parameters=rope, tie_word_embeddings=True)
  c = ModelConfig.from_hf(hf)
  assert _fields(c) == (128, 64, 96, 3, 8, 2, 8, 1e-5, 256)
  assert c.model_type == "llama" and c.tie_word_embeddings and not c.attention_bias
  assert c.rope_theta == 500000.0
  assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
  assert not c.qk_norm and c.sliding_window is None


def test_mistral_sliding_window_and_default_rope():
  c = ModelConfig.from_hf(transformers.MistralConfig(**_SMALL, sliding_window=32))
  assert c.model_type == "mistral" and c.sliding_window == 32
  assert c.rope_scaling is None and c.rope_theta == 10000.0
  assert not c.tie_word_embeddings


def test_qwen2_has_qkv_bias_but_no_output_bias():
  c = ModelConfig.from_hf(transformers.Qwen2Config(**_SMALL, rope_theta=1e6))
  assert c.attention_bias and not c.attention_out_bias and not c.qk_norm
  assert c.rope_theta == 1e6


def test_qwen3_has_qk_norm_and_explicit_head_dim():
  c = ModelConfig.from_hf(transformers.Qwen3Config(**_SMALL, head_dim=16))
  assert c.qk_norm and c.head_dim == 16 and not c.attention_bias


def test_from_dict_and_from_path(tmp_path):
  hf = transformers.Qwen2Config(**_SMALL)
  (tmp_path / "config.json").write_text(json.dumps(hf.to_dict()))
  a = ModelConfig.from_hf(hf)
  assert ModelConfig.from_hf(hf.to_dict()) == a
  assert ModelConfig.from_hf(tmp_path) == a
  assert ModelConfig.from_hf(str(tmp_path / "config.json")) == a


def test_overrides_and_dtype_names():
  c = ModelConfig.from_hf(transformers.LlamaConfig(**_SMALL), dtype="bfloat16", remat=True)
  assert c.dtype == jnp.bfloat16 and c.remat and c.param_dtype == jnp.float32
  assert c.replace(num_layers=5).num_layers == 5


@pytest.mark.parametrize(
  "make",
  [
    lambda: transformers.LlamaConfig(**_SMALL, rope_parameters={
      "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    lambda: transformers.LlamaConfig(**_SMALL, tie_word_embeddings=True),
    lambda: transformers.MistralConfig(**_SMALL, sliding_window=16),
    lambda: transformers.Qwen2Config(**_SMALL),
    lambda: transformers.Qwen3Config(**_SMALL, head_dim=16),
  ],
  ids=["llama3", "smollm", "mistral", "qwen2", "qwen3"],
)
def test_to_hf_dict_round_trips_through_transformers(make):
  c = ModelConfig.from_hf(make())
  d = c.to_hf_dict()
  hf = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
  assert ModelConfig.from_hf(hf) == c
  assert ModelConfig.from_hf(d) == c


def test_unknown_model_type_names_it_and_the_supported_ones():
  with pytest.raises(ValueError, match=r"'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
    ModelConfig.from_hf(transformers.GPT2Config())
  assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3"}


def test_bad_values_raise():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4,
                num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_type"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="dtype"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                dtype="float8")
