"""Hugging Face directories: load_pretrained / save_pretrained, sharded placement, errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from tiny_tokenizer import tiny_tokenizer

from rljax.models import hf_blocks
from rljax.models.config import ModelConfig
from rljax.models.hf_weights import hf_to_rljax_layout, to_hf_state_dict
from rljax.models.io import (
  load_pretrained, parse_size, resolve_model_dir, save_pretrained, weight_map,
)
from rljax.models.transformer import Transformer
from rljax.parallel.rules import MESH_AXES, mesh_and_rules

# Qwen3-style (q/k norm) with q/k/v biases, untied, GQA: every tensor kind of the mapping.
CONFIG = ModelConfig(
  vocab_size=len(tiny_tokenizer().get_vocab()) + 13, hidden_size=32, intermediate_size=48,
  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True, attention_out_bias=True, qk_norm=True,
  model_type="qwen3", bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _mesh(shape):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _flat(model):
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_bitwise_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for path in fa:
    x, y = np.asarray(fa[path]), np.asarray(fb[path])
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), path


def _random_model(param_dtype=jnp.float32, seed=0, config=CONFIG):
  """A model with random values everywhere (norms and biases too, so no swap goes unnoticed).

  Filled from numpy into an abstract module: no per-shape compilation of random draws.
  """
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(
    nnx.eval_shape(lambda: Transformer(config.replace(param_dtype=param_dtype), rngs=nnx.Rngs(0)))
  )
  for _, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.shape), param_dtype))
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A float32 model saved with its tokenizer, single file and sharded."""
  model, tok = _random_model(), tiny_tokenizer()
  single = tmp_path_factory.mktemp("single")
  sharded = tmp_path_factory.mktemp("sharded")
  files_single = save_pretrained(model, tok, single)
  files_sharded = save_pretrained(model, tok, sharded, max_shard_size="20KB")
  return model, tok, single, sharded, files_single, files_sharded


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_load_save_load_is_bitwise_exact(tmp_path, param_dtype):
  model, tok = _random_model(param_dtype), tiny_tokenizer()
  assert save_pretrained(model, tok, tmp_path / "a") == ["model.safetensors"]
  loaded, tok2 = load_pretrained(tmp_path / "a")
  assert loaded.config.param_dtype == param_dtype  # read back from config.json "dtype"
  _assert_bitwise_equal(model, loaded)
  save_pretrained(loaded, tok2, tmp_path / "b")
  with open(tmp_path / "a" / "model.safetensors", "rb") as fa, open(tmp_path / "b" / "model.safetensors", "rb") as fb:
    assert fa.read() == fb.read()
  _assert_bitwise_equal(loaded, load_pretrained(tmp_path / "b")[0])
  assert tok2("what is 2 + 3 ?")["input_ids"] == tok("what is 2 + 3 ?")["input_ids"]


def test_sharded_save_writes_index_and_round_trips(saved):
  model, _, single, sharded, files_single, files_sharded = saved
  assert files_single == ["model.safetensors"]
  assert len(files_sharded) > 2 and files_sharded[0] == f"model-00001-of-{len(files_sharded):05d}.safetensors"
  assert not os.path.exists(sharded / "model.safetensors")
  with open(sharded / "model.safetensors.index.json") as f:
    index = json.load(f)
  total = 0
  for file in files_sharded:
    tensors = load_file(sharded / file)
    size = sum(t.nbytes for t in tensors.values())
    assert size <= 20_000 or len(tensors) == 1, file
    assert all(index["weight_map"][n] == file for n in tensors)
    total += size
  assert index["metadata"]["total_size"] == total
  assert sorted(index["weight_map"]) == sorted(to_hf_state_dict(model))
  assert weight_map(sharded) == index["weight_map"]
  _assert_bitwise_equal(model, load_pretrained(sharded)[0])
  _assert_bitwise_equal(model, load_pretrained(single)[0])


def test_resaving_replaces_old_weight_files(saved, tmp_path):
  model, tok, _, sharded, _, files_sharded = saved
  out = tmp_path / "re"
  shutil.copytree(sharded, out)
  assert save_pretrained(model, tok, out) == ["model.safetensors"]
  leftovers = [n for n in os.listdir(out) if n.startswith("model-") or n.endswith("index.json")]
  assert leftovers == []


def test_transformers_reads_config_and_tokenizer(saved):
  from transformers import AutoConfig, AutoTokenizer

  _, tok, single, sharded, _, _ = saved
  for directory in (single, sharded):
    hf = AutoConfig.from_pretrained(directory, local_files_only=True)
    assert hf.model_type == "qwen3" and hf.architectures == ["Qwen3ForCausalLM"]
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.head_dim) == (32, 2, 2, 8)
    assert hf.attention_bias and not hf.tie_word_embeddings
    assert ModelConfig.from_hf(hf) == CONFIG
    back = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    chat = [{"role": "user", "content": "what is 2 + 3 ?"}]
    assert back.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
      chat, add_generation_prompt=True
    )
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 0)
  assert load_pretrained(single)[1].decode([4, 5]) == "hello world"


def test_torch_transformers_loads_saved_sharded_weights(saved):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM

  model, _, _, sharded, _, _ = saved
  hf_model = AutoModelForCausalLM.from_pretrained(sharded, local_files_only=True)
  ids = np.array([[1, 4, 5, 6, 7, 8]])
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_tied_fixture_loads_every_tensor_unchanged():
  directory = os.path.join(FIXTURES, "smollm")
  model, tokenizer = load_pretrained(directory)
  assert tokenizer is None  # the fixture has no tokenizer files
  assert model.config.tie_word_embeddings and not hasattr(model, "lm_head")
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  back = to_hf_state_dict(model)
  assert sorted(back) == sorted(n for n in tensors if n != "lm_head.weight")
  for name, value in back.items():
    assert value.dtype == tensors[name].dtype and value.tobytes() == tensors[name].tobytes(), name


@pytest.mark.parametrize("mesh_shape, rules, q_spec", [
  ((1, 8, 1), "fsdp", P(None, "fsdp", None, None)),
  ((1, 4, 2), "fsdp_tp", P(None, "fsdp", "tensor", None)),
])
def test_loads_sharded_onto_a_mesh(saved, monkeypatch, mesh_shape, rules, q_spec):
  model, _, _, sharded, _, _ = saved
  reads = []
  real = hf_blocks._read_block
  monkeypatch.setattr(hf_blocks, "_read_block", lambda t, n, i, c: reads.append((n, r := real(t, n, i, c))) or r)
  mesh = _mesh(mesh_shape)
  loaded, _ = load_pretrained(sharded, mesh=mesh, rules=rules)
  q = loaded.layers.q_proj[...]
  assert q.sharding.mesh == mesh and q.sharding.spec == q_spec
  fsdp, tp = mesh_shape[1], mesh_shape[2]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32 // fsdp, 4 // tp, 8)}
  assert len(q.sharding.device_set) == 8
  assert loaded.embed[...].sharding.spec == (P(None, "fsdp") if rules == "fsdp" else P("tensor", "fsdp"))
  # Each device read only its block of a sharded tensor, never the whole (per-layer) tensor.
  q_blocks = {r.shape for n, r in reads if n == "q_proj"}
  assert q_blocks == {(32 // fsdp, 4 // tp, 8)}
  _assert_bitwise_equal(model, loaded)
  # Saving a sharded model gathers it: the files are those of the unsharded model.
  assert to_hf_state_dict(loaded).keys() == to_hf_state_dict(model).keys()


def test_mesh_from_context_and_placement_errors(saved):
  _, _, single, _, _, _ = saved
  mesh = _mesh((1, 8, 1))
  with mesh_and_rules(mesh, "fsdp"):
    loaded, _ = load_pretrained(single)
  assert loaded.layers.gate_proj[...].sharding.spec == P(None, "fsdp", None)
  with pytest.raises(ValueError, match="rules"):
    load_pretrained(single, mesh=mesh)
  with pytest.raises(ValueError, match="mesh"):
    load_pretrained(single, rules="fsdp")


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_block_reads_agree_with_hf_weights_layout(seed):
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0)))
  for name in model.layers.names:
    shape = getattr(model.layers, name).shape[1:]
    hf_shape = hf_blocks.hf_shapes(("layers", name), (1, *shape), CONFIG)[hf_blocks.hf_layer_name(name, 0, CONFIG)]
    hf = rng.standard_normal(hf_shape).astype(np.float32)
    full = hf_to_rljax_layout(name, hf, CONFIG)
    index = []
    for n in shape:
      a, b = sorted(rng.choice(n + 1, size=2, replace=False))
      index.append(slice(int(a), int(b)))
    np.testing.assert_array_equal(hf_blocks._read_block(hf, name, tuple(index), CONFIG), full[tuple(index)], err_msg=name)


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_config(directory, **changes):
  with open(directory / "config.json") as f:
    d = json.load(f)
  d.update(changes)
  with open(directory / "config.json", "w") as f:
    json.dump(d, f)


def test_config_errors(saved, tmp_path):
  _, _, single, _, _, _ = saved
  with pytest.raises(ValueError, match="config.json"):
    load_pretrained(tmp_path)
  d = _copy(single, tmp_path / "arch")
  _edit_config(d, architectures=["Qwen3ForSequenceClassification"])
  with pytest.raises(ValueError, match="Qwen3ForSequenceClassification"):
    load_pretrained(d)
  _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    load_pretrained(d)
  _edit_config(d, architectures=None, model_type="gpt2")
  with pytest.raises(ValueError, match="gpt2"):
    load_pretrained(d)


def test_missing_mismatched_and_unexpected_tensors_are_named(saved, tmp_path):
  _, _, single, _, _, _ = saved
  tensors = load_file(single / "model.safetensors")
  d = _copy(single, tmp_path / "t")
  cases = [
    ({k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.bias"},
     r"missing tensors.*model\.layers\.1\.self_attn\.k_proj\.bias"),
    ({**tensors, "model.layers.0.mlp.up_proj.weight": np.zeros((48, 31), np.float32)},
     r"model\.layers\.0\.mlp\.up_proj\.weight.*model\.safetensors.*\(48, 31\).*\(48, 32\)"),
    ({**tensors, "model.layers.0.foo.weight": np.zeros((2,), np.float32)},
     r"unexpected.*model\.layers\.0\.foo\.weight"),
  ]
  for bad, message in cases:
    save_file(bad, d / "model.safetensors")
    with pytest.raises(ValueError, match=message):
      load_pretrained(d)
  # strict=False ignores the unexpected tensor; rotary buffers are always ignored.
  save_file({**tensors, "model.layers.0.foo.weight": np.zeros((2,), np.float32),
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros((4,), np.float32)}, d / "model.safetensors")
  load_pretrained(d, strict=False)


def test_weight_file_errors(saved, tmp_path):
  _, _, single, sharded, _, files = saved
  d = _copy(single, tmp_path / "pickle")
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles.*safetensors"):
    load_pretrained(d)
  os.remove(d / "pytorch_model.bin")
  with pytest.raises(ValueError, match="no model.safetensors"):
    load_pretrained(d)
  d = _copy(sharded, tmp_path / "shards")
  os.remove(d / files[-1])
  with pytest.raises(ValueError, match=files[-1]):
    load_pretrained(d)
  d = _copy(sharded, tmp_path / "index")
  with open(d / "model.safetensors.index.json") as f:
    index = json.load(f)
  name = next(n for n, f in index["weight_map"].items() if f == files[0])
  index["weight_map"][name] = files[1]
  with open(d / "model.safetensors.index.json", "w") as f:
    json.dump(index, f)
  with pytest.raises(ValueError, match=rf"{name}.*{files[1]}"):
    load_pretrained(d)


def test_damaged_files_are_named(saved, tmp_path):
  _, _, single, sharded, _, files = saved
  d = _copy(single, tmp_path / "truncated")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
  with pytest.raises(ValueError, match=r"truncated/model\.safetensors: not a readable "
                                       r"safetensors file \(.*incomplete"):
    load_pretrained(d)
  d = _copy(sharded, tmp_path / "shard")
  (d / files[1]).write_bytes(b"\x13" * 64)
  with pytest.raises(ValueError, match=rf"shard/{files[1]}: not a readable safetensors file"):
    load_pretrained(d)
  (d / "model.safetensors.index.json").write_text('{"weight_map": {')
  with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: line 1: not valid"):
    load_pretrained(d)
  (d / "config.json").write_text("{")
  with pytest.raises(ValueError, match=r"shard/config\.json: line 1: not valid JSON"):
    load_pretrained(d)


def _hub_cache(root, repo_id, model_dir, sha="0123456789abcdef0123456789abcdef01234567"):
  """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
  repo = root / ("models--" + repo_id.replace("/", "--"))
  shutil.copytree(model_dir, repo / "snapshots" / sha)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(sha)
  return repo / "snapshots" / sha


def test_load_by_hub_id_offline_from_the_cache(saved, tmp_path, monkeypatch):
  model, _, single, _, _, _ = saved
  snapshot = _hub_cache(tmp_path / "hub", "tiny-org/tiny-model", single)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert os.path.samefile(resolve_model_dir("tiny-org/tiny-model"), snapshot)
  loaded, tok = load_pretrained("tiny-org/tiny-model")
  _assert_bitwise_equal(model, loaded)
  assert tok is not None and tok.eos_token_id == tiny_tokenizer().eos_token_id
  with pytest.raises(ValueError, match=r"'tiny-org/absent' is not a local directory, and as a "
                                       r"Hugging Face Hub id it is offline .*not in the cache"):
    load_pretrained("tiny-org/absent")
  assert resolve_model_dir(single) == str(single)  # a local directory is used as it is


def test_parse_size():
  assert parse_size("5GB") == 5 * 10**9
  assert parse_size("500MiB") == 500 * 2**20
  assert parse_size("1.5kb") == 1500
  assert parse_size(123) == 123
  for bad in ("5 parsecs", "", "-1GB", 0):
    with pytest.raises(ValueError, match="max_shard_size"):
      parse_size(bad)
