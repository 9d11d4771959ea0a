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
    lambda: transformers.Gemma2Config(**_SMALL, head_dim=16, query_pre_attn_scalar=144,
                                      sliding_window=32),
    lambda: transformers.Gemma3TextConfig(**_SMALL, head_dim=16, sliding_window=32,
                                          rope_scaling={"rope_type": "linear", "factor": 8.0}),
  ],
  ids=["llama3", "smollm", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"],
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
  assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma2",
                                        "gemma3_text"}


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
  with pytest.raises(ValueError, match="remat_policy"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                remat=True, remat_policy="everything")


def test_gemma2_details():
  c = ModelConfig.from_hf(transformers.Gemma2Config(**_SMALL, head_dim=16,
                                                    query_pre_attn_scalar=144))
  assert c.model_type == "gemma2" and c.tie_word_embeddings and not c.qk_norm
  assert c.norm_plus_one and c.post_norms and c.scale_embeddings
  assert c.mlp_activation == "gelu_tanh"
  assert c.attention_scale == 144**-0.5  # query_pre_attn_scalar, not head_dim
  assert (c.attention_softcap, c.final_logit_softcap) == (50.0, 30.0)
  assert c.sliding_window == (4096, None, 4096)  # alternating, the first layer local
  assert c.local_rope_theta is None and c.rope_theta == 10000.0


def test_gemma3_text_details_and_the_default_layer_pattern():
  hf = transformers.Gemma3TextConfig(**dict(_SMALL, num_hidden_layers=12), head_dim=16,
                                     sliding_window=512, attn_logit_softcapping=50.0)
  c = ModelConfig.from_hf(hf)
  assert c.model_type == "gemma3_text" and c.qk_norm and c.norm_plus_one and c.post_norms
  assert c.sliding_window == (512,) * 5 + (None,) + (512,) * 5 + (None,)  # 5 local : 1 global
  assert c.layer_local_rope == (True,) * 5 + (False,) + (True,) * 5 + (False,)
  assert (c.rope_theta, c.local_rope_theta, c.rope_scaling) == (1e6, 1e4, None)
  assert c.attention_softcap is None  # transformers' Gemma 3 attention ignores it
  assert c.final_logit_softcap is None


def test_gemma3_multimodal_config_reads_its_text_config():
  """A Gemma3ForConditionalGeneration config.json as on the Hub (4B: a sparse text_config over
  transformers' defaults, the older flat RoPE keys, linear scaling of the global layers)."""
  d = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
       "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
       "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                       "model_type": "gemma3_text", "num_hidden_layers": 34,
                       "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                       "sliding_window": 1024},
       "vision_config": {"model_type": "siglip_vision_model"}}
  c = ModelConfig.from_hf(d)
  assert (c.model_type, c.num_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 34, 2560,
                                                                       262208)
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.attention_scale) == (8, 4, 256, 1 / 16)
  assert c.rope_scaling == {"factor": 8.0, "rope_type": "linear"} and c.rope_theta == 1e6
  assert c.local_rope_theta == 1e4 and c.sliding_window[:6] == (1024,) * 5 + (None,)
  assert c.eos_token_id == [1, 106] and c.param_dtype == jnp.bfloat16 and c.tie_word_embeddings
  hf = transformers.Gemma3Config(text_config=d["text_config"], vision_config=d["vision_config"])
  assert ModelConfig.from_hf(hf).replace(eos_token_id=[1, 106],
                                         param_dtype=jnp.bfloat16) == c


def test_gemma_errors_name_the_field():
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    ModelConfig.from_hf(dict(transformers.Gemma3TextConfig(**_SMALL).to_dict(),
                             use_bidirectional_attention=True))
  with pytest.raises(ValueError, match="layer_types"):
    ModelConfig.from_hf(dict(transformers.Gemma2Config(**_SMALL).to_dict(),
                             layer_types=["sliding_attention"]))
  with pytest.raises(ValueError, match="text_config"):
    ModelConfig.from_hf({"model_type": "gemma3"})
  llama = ModelConfig.from_hf(transformers.LlamaConfig(**_SMALL))
  with pytest.raises(ValueError, match="post_norms"):
    llama.replace(post_norms=True).to_hf_dict()
  gemma = ModelConfig.from_hf(transformers.Gemma2Config(**_SMALL))
  with pytest.raises(ValueError, match="norm_plus_one"):
    gemma.replace(norm_plus_one=False).to_hf_dict()
  with pytest.raises(ValueError, match="local_rope_theta"):
    gemma.replace(sliding_window=None, local_rope_theta=1e4)
  with pytest.raises(ValueError, match="mlp_activation"):
    gemma.replace(mlp_activation="relu")
