"""Parity with transformers' PyTorch implementation on committed golden fixtures (no torch needed).

The fixtures (tests/models/fixtures/<family>/) are made by make_parity_fixtures.py: a tiny random
model of each family, its config.json + model.safetensors, and the PyTorch fp32 logits of a batch
whose row 1 is left-padded. gemma3_multimodal is a Gemma3ForConditionalGeneration checkpoint
(text model under `language_model.`, a vision tower) whose text model is the gemma3 fixture's
architecture.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rljax.models.config import ModelConfig
from rljax.models.hf_weights import load_hf_state_dict, to_hf_state_dict
from rljax.models.io import load_pretrained
from rljax.models.transformer import Transformer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = ["llama", "smollm", "mistral", "qwen2", "qwen3", "gemma2", "gemma3",
            "gemma3_multimodal"]


def _load(family: str):
  directory = os.path.join(FIXTURES, family)
  config = ModelConfig.from_hf(directory)
  model = Transformer(config, rngs=nnx.Rngs(0))
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  load_hf_state_dict(model, tensors)
  data = dict(np.load(os.path.join(directory, "inputs.npz")))
  return config, model, tensors, data


def _logits(model, data):
  with jax.default_matmul_precision("highest"):
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, data["input_ids"],
                                                      data["attention_mask"]))


def _max_diff(logits, data):
  return np.abs(logits - data["logits"])[data["attention_mask"].astype(bool)].max()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
  config, model, _, data = _load(family)
  valid = data["attention_mask"].astype(bool)
  assert np.abs(data["logits"][valid]).max() > 0.5  # the fixture is not trivially small
  diff = _max_diff(_logits(model, data), data)
  assert diff <= 1e-5, f"{family}: max abs logit diff {diff:.3g}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_logits_match_transformers_on_the_blockwise_path(family):
  config, _, tensors, data = _load(family)
  model = Transformer(config.replace(attention="blockwise", attention_block=4), rngs=nnx.Rngs(0))
  load_hf_state_dict(model, tensors)
  diff = _max_diff(_logits(model, data), data)
  assert diff <= 1e-5, f"{family} (blockwise): max abs logit diff {diff:.3g}"


@pytest.mark.parametrize("family, change", [
  ("gemma2", dict(attention_softcap=None)),
  ("gemma2", dict(final_logit_softcap=None)),
  ("gemma2", dict(attention_scale=None)),
  ("gemma3", dict(local_rope_theta=1_000_000.0)),
  ("gemma3", dict(rope_scaling=None)),
  ("gemma3", dict(sliding_window=None, local_rope_theta=None)),
])
def test_gemma_fixtures_depend_on_each_feature(family, change):
  """Each Gemma detail changes the fixture's logits (so the parity test checks it)."""
  config, _, tensors, data = _load(family)
  model = Transformer(config.replace(**change), rngs=nnx.Rngs(0))
  load_hf_state_dict(model, tensors)
  assert _max_diff(_logits(model, data), data) > 1e-2, change


def test_gemma3_multimodal_checkpoint_loads_its_text_model():
  directory = os.path.join(FIXTURES, "gemma3_multimodal")
  model, tokenizer = load_pretrained(directory)
  data = dict(np.load(os.path.join(directory, "inputs.npz")))
  assert tokenizer is None and model.config.model_type == "gemma3_text"
  assert model.config == ModelConfig.from_hf(os.path.join(FIXTURES, "gemma3"))
  assert _max_diff(_logits(model, data), data) <= 1e-5


def test_fixture_families_cover_the_features():
  configs = {f: ModelConfig.from_hf(os.path.join(FIXTURES, f)) for f in FAMILIES}
  assert configs["llama"].rope_scaling["rope_type"] == "llama3"
  assert configs["smollm"].tie_word_embeddings
  assert configs["mistral"].sliding_window is not None
  assert configs["qwen2"].attention_bias
  assert configs["qwen3"].qk_norm
  gemma2, gemma3 = configs["gemma2"], configs["gemma3"]
  assert gemma2.sliding_window == (4, None) and gemma2.attention_scale == 12**-0.5
  assert (gemma2.attention_softcap, gemma2.final_logit_softcap) == (2.0, 3.0)
  assert gemma2.norm_plus_one and gemma2.post_norms and gemma2.scale_embeddings
  assert gemma2.mlp_activation == "gelu_tanh" and gemma2.tie_word_embeddings
  assert gemma3.sliding_window == (4, 4, None) and gemma3.qk_norm
  assert (gemma3.attention_softcap, gemma3.final_logit_softcap) == (None, None)
  assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e6, 1e4)
  assert gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}


@pytest.mark.parametrize("family", ["smollm", "qwen3", "gemma2", "gemma3"])
def test_hf_state_dict_round_trip(family):
  config, model, tensors, _ = _load(family)
  back = to_hf_state_dict(model)
  assert sorted(back) == sorted(k for k in tensors if not (config.tie_word_embeddings and k == "lm_head.weight"))
  for name, value in back.items():
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_missing_and_mismatched_tensors_are_named():
  _, model, tensors, _ = _load("qwen2")
  partial = dict(tensors)
  del partial["model.layers.1.self_attn.k_proj.bias"]
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
    load_hf_state_dict(model, partial)
  bad = dict(tensors)
  bad["model.norm.weight"] = np.ones((3,), np.float32)
  with pytest.raises(ValueError, match=r"model\.norm\.weight"):
    load_hf_state_dict(model, bad)
  extra = dict(tensors)
  extra["model.layers.0.foo.weight"] = np.ones((3,), np.float32)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.foo\.weight"):
    load_hf_state_dict(model, extra)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_multimodal"])
def test_gemma_save_and_load_round_trip(tmp_path, family):
  """save_pretrained writes a Gemma causal LM (a multimodal checkpoint's text model only) that
  transformers' config classes read and that loads back to the same logits."""
  import transformers

  from rljax.models.io import save_pretrained

  model, _ = load_pretrained(os.path.join(FIXTURES, family))
  save_pretrained(model, None, tmp_path)
  hf = transformers.AutoConfig.from_pretrained(tmp_path)
  assert hf.model_type == model.config.model_type
  assert hf.layer_types == [("full_attention" if w is None else "sliding_attention")
                            for w in model.config.sliding_window]
  again, _ = load_pretrained(tmp_path)
  assert again.config == model.config
  data = dict(np.load(os.path.join(FIXTURES, family, "inputs.npz")))
  assert _max_diff(_logits(again, data), data) <= 1e-5
