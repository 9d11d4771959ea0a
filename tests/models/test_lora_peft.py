"""PEFT's adapter format against a golden fixture made by PEFT itself (tests/models/fixtures/
lora_llama, `make_parity_fixtures.py`): its names, shapes and config keys, the adapted and the
merged logits of PEFT's forward, the save → load round trip, and the merged HF export."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rljax.models.adapters import (
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  load_adapter,
  lora_config_from_peft,
  save_adapter,
)
from rljax.models.io import load_pretrained, save_pretrained
from rljax.models.lora import LoRAConfig, add_lora, lora_config_of, merged
from rljax.models.transformer import PROJECTIONS

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
BASE, ADAPTER = os.path.join(FIXTURES, "llama"), os.path.join(FIXTURES, "lora_llama")
DATA = dict(np.load(os.path.join(ADAPTER, "inputs.npz")))
VALID = DATA["attention_mask"].astype(bool)


def _logits(model):
  with jax.default_matmul_precision("highest"):
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, DATA["input_ids"],
                                                       DATA["attention_mask"]))


@pytest.fixture(scope="module")
def adapted():
  model, _ = load_pretrained(BASE)
  return load_adapter(model, ADAPTER)


def test_peft_adapter_loads_with_its_config_and_gives_peft_s_logits(adapted):
  assert lora_config_of(adapted) == LoRAConfig(rank=4, alpha=8.0, use_rslora=True,
                                                target_modules="all-linear")
  base, _ = load_pretrained(BASE)
  assert np.abs(_logits(base) - DATA["logits"])[VALID].max() > 0.1  # the adapter matters
  for want, model in ((DATA["logits"], adapted), (DATA["merged_logits"], merged(adapted))):
    diff = np.abs(_logits(model) - want)[VALID]
    assert diff.max() < 1e-4, diff.max()


def test_save_adapter_writes_peft_s_names_shapes_and_keys_and_round_trips(adapted, tmp_path):
  save_adapter(adapted, tmp_path, base_model_name_or_path="llama")
  theirs, ours = (load_file(os.path.join(d, ADAPTER_WEIGHTS_FILE)) for d in (ADAPTER, tmp_path))
  assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 2 * len(PROJECTIONS)
  for name, value in theirs.items():
    assert ours[name].shape == value.shape and ours[name].dtype == value.dtype, name
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  with open(os.path.join(ADAPTER, ADAPTER_CONFIG_FILE)) as f:
    their_config = json.load(f)
  with open(os.path.join(tmp_path, ADAPTER_CONFIG_FILE)) as f:
    our_config = json.load(f)
  required = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
              "use_rslora", "bias", "base_model_name_or_path"}
  assert required <= set(our_config) and required <= set(their_config)
  for key in required - {"target_modules"}:
    assert our_config[key] == their_config[key], key
  assert lora_config_from_peft(our_config, 2) == lora_config_from_peft(their_config, 2)
  fresh, _ = load_pretrained(BASE)
  np.testing.assert_array_equal(_logits(load_adapter(fresh, tmp_path)), _logits(adapted))


def test_merged_export_is_a_plain_hf_checkpoint_with_the_merged_logits(adapted, tmp_path):
  save_pretrained(adapted, None, tmp_path)
  back, _ = load_pretrained(tmp_path)
  assert lora_config_of(back) is None
  assert np.abs(_logits(back) - DATA["merged_logits"])[VALID].max() < 1e-4


@pytest.mark.parametrize("change, match", [
  ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
  ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"peft_type": "IA3"}, "LoRA"),
  ({"target_modules": ["model.layers.0.self_attn.q_proj"]}, "only some layers"),
  ({"target_modules": "q_proj|v_proj"}, "target_modules"),
])
def test_unsupported_adapter_options_are_refused_by_name(change, match):
  with open(os.path.join(ADAPTER, ADAPTER_CONFIG_FILE)) as f:
    config = {**json.load(f), **change}
  with pytest.raises(ValueError, match=match):
    lora_config_from_peft(config, 2)


def test_loading_into_other_adapters_is_refused(tmp_path):
  model, _ = load_pretrained(BASE)
  add_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="differ"):
    load_adapter(model, ADAPTER)
