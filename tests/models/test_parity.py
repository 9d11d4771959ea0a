"""Parity with transformers' PyTorch implementation on committed golden fixtures (no torch needed).

The fixtures (tests/models/fixtures/<family>/) are made by make_parity_fixtures.py: a tiny random
model of each family, its config.json + model.safetensors, and the PyTorch fp32 logits of a batch
whose row 1 is left-padded.
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
from rljax.models.transformer import Transformer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = ["llama", "smollm", "mistral", "qwen2", "qwen3"]


def _load(family: str):
  directory = os.path.join(FIXTURES, family)
  config = ModelConfig.from_hf(directory)
  model = Transformer(config, rngs=nnx.Rngs(0))
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  load_hf_state_dict(model, tensors)
  data = dict(np.load(os.path.join(directory, "inputs.npz")))
  return config, model, tensors, data


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
  config, model, _, data = _load(family)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, data["input_ids"], data["attention_mask"]))
  valid = data["attention_mask"].astype(bool)
  diff = np.abs(logits - data["logits"])[valid]
  assert np.abs(data["logits"][valid]).max() > 0.5  # the fixture is not trivially small
  assert diff.max() < 1e-4, f"{family}: max abs logit diff {diff.max():.3g}"


def test_fixture_families_cover_the_features():
  configs = {f: ModelConfig.from_hf(os.path.join(FIXTURES, f)) for f in FAMILIES}
  assert configs["llama"].rope_scaling["rope_type"] == "llama3"
  assert configs["smollm"].tie_word_embeddings
  assert configs["mistral"].sliding_window is not None
  assert configs["qwen2"].attention_bias
  assert configs["qwen3"].qk_norm


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
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
