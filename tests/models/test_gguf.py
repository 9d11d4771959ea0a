"""GGUF import: tiny GGUF files written here with `gguf.GGUFWriter` (as llama.cpp writes them)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from safetensors.numpy import load_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

from rljax import cli  # noqa: E402
from rljax.models import convert  # noqa: E402
from rljax.models.config import ModelConfig  # noqa: E402
from rljax.models.gguf import (  # noqa: E402
  convert_gguf,
  hf_config_from_gguf,
  hf_tensor_name,
  permute_qk,
  unpermute_qk,
)
from rljax.models.gguf_tokenizer import hf_tokenizer_from_gguf  # noqa: E402
from rljax.models.hf_weights import load_hf_state_dict  # noqa: E402
from rljax.models.transformer import Transformer  # noqa: E402

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a", "1 2"]
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # independent of the code under test
TOKENS = SPECIALS + ALPHABET + [m.replace(" ", "") for m in MERGES] + ["<think>"]
TYPES = [3, 3, 3] + [1] * (len(TOKENS) - 4) + [4]
TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
D, H, KV, DH, F, L = 32, 4, 2, 8, 64, 2
V = len(TOKENS)


def reference_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation by hand: row i + half of each head goes next to row i, at 2i + 1."""
  head_dim = w.shape[0] // n_head
  half = head_dim // 2
  out = np.empty_like(w)
  for h in range(n_head):
    for i in range(half):
      out[h * head_dim + 2 * i] = w[h * head_dim + i]
      out[h * head_dim + 2 * i + 1] = w[h * head_dim + half + i]
  return out


def random_hf_tensors(arch: str, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named random weights of a tiny model of `arch` ("llama", "qwen2", "qwen3")."""
  rng = np.random.default_rng(seed)

  def w(*shape):
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)

  t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D)}
  if not tied:
    t["lm_head.weight"] = w(V, D)
  for i in range(L):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = 1 + w(D)
    t[p + "post_attention_layernorm.weight"] = 1 + w(D)
    t[p + "self_attn.q_proj.weight"] = w(H * DH, D)
    t[p + "self_attn.k_proj.weight"] = w(KV * DH, D)
    t[p + "self_attn.v_proj.weight"] = w(KV * DH, D)
    t[p + "self_attn.o_proj.weight"] = w(D, H * DH)
    t[p + "mlp.gate_proj.weight"] = w(F, D)
    t[p + "mlp.up_proj.weight"] = w(F, D)
    t[p + "mlp.down_proj.weight"] = w(D, F)
    if arch == "qwen2":
      t[p + "self_attn.q_proj.bias"] = w(H * DH)
      t[p + "self_attn.k_proj.bias"] = w(KV * DH)
      t[p + "self_attn.v_proj.bias"] = w(KV * DH)
    if arch == "qwen3":
      t[p + "self_attn.q_norm.weight"] = 1 + w(DH)
      t[p + "self_attn.k_norm.weight"] = 1 + w(DH)
  return t


# HF name → GGUF name, written out by hand (the converter's table is the thing under test).
HF_TO_GGUF = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
  "input_layernorm.weight": "attn_norm.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "self_attn.q_proj.bias": "attn_q.bias",
  "self_attn.k_proj.bias": "attn_k.bias",
  "self_attn.v_proj.bias": "attn_v.bias",
  "self_attn.q_norm.weight": "attn_q_norm.weight",
  "self_attn.k_norm.weight": "attn_k_norm.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
  if hf in HF_TO_GGUF:
    return HF_TO_GGUF[hf]
  _, _, layer, rest = hf.split(".", 3)
  return f"blk.{layer}.{HF_TO_GGUF[rest]}"


def write_gguf(path, tensors, *, arch="llama", qtype=Q.F32, pre="gpt2", drop=(), extra=None):
  """Writes `tensors` (HF names) as llama.cpp would: GGUF names, Q/K permuted for llama."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_context_length(128)
  writer.add_embedding_length(D)
  writer.add_block_count(L)
  writer.add_feed_forward_length(F)
  writer.add_head_count(H)
  writer.add_head_count_kv(KV)
  writer.add_rope_dimension_count(DH)
  writer.add_rope_freq_base(5000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(V)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(TOKENS)
  writer.add_token_merges(MERGES)
  writer.add_token_types(TYPES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(True)
  writer.add_chat_template(TEMPLATE)
  items = dict(tensors, **(extra or {}))
  for hf, value in items.items():
    name = hf if hf.startswith("blk.") else gguf_name(hf)
    if name in drop:
      continue
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      value = reference_permute(value, H if ".attn_q." in name else KV)
    if qtype != Q.F32 and value.ndim == 2:
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def rljax_logits(out_dir: str, tensors: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
  model = Transformer(ModelConfig.from_hf(out_dir), rngs=nnx.Rngs(0))
  load_hf_state_dict(model, tensors)
  with jax.default_matmul_precision("highest"):
    return np.asarray(model(jnp.asarray(ids)))


IDS = np.array([[1, 5, 40, 77, 200, 3, 2]], np.int32)


# ------------------------------------------------------------------------------------------------
# Q/K permutation.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,shape", [(4, (32, 6)), (2, (16, 6)), (3, (18,)), (1, (4, 2))])
def test_permute_matches_llama_cpp_and_unpermute_inverts_it(n_head, shape):
  w = np.random.default_rng(1).standard_normal(shape)
  np.testing.assert_array_equal(permute_qk(w, n_head), reference_permute(w, n_head))
  np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
  np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_unpermute_is_inverse_property(seed):
  w = np.random.default_rng(seed).standard_normal((24, 5))
  np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
  assert not np.array_equal(permute_qk(w, 3), w)  # the permutation really moves rows


def test_permute_rejects_bad_rows():
  with pytest.raises(ValueError, match="n_head"):
    unpermute_qk(np.zeros((10, 2)), 3)


def test_tensor_names():
  assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
  assert hf_tensor_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
  assert hf_tensor_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
  with pytest.raises(ValueError, match="blk.0.weird.weight"):
    hf_tensor_name("blk.0.weird.weight")


# ------------------------------------------------------------------------------------------------
# Weights and config round trip.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("qwen3", True)])
def test_f32_round_trip_is_exact_and_runs(tmp_path, arch, tied):
  tensors = random_hf_tensors(arch, tied=tied)
  path = write_gguf(tmp_path / "m.gguf", tensors, arch=arch)
  out = convert_gguf(path, tmp_path / "hf")
  loaded = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(loaded) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == arch
  assert config["architectures"] == [{"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
                                     + "ForCausalLM"]
  expected = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=KV, head_dim=DH,
                  max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
  assert {k: config[k] for k in expected} == expected
  assert config["rms_norm_eps"] == pytest.approx(1e-5)
  hf_config = AutoConfig.from_pretrained(out)
  assert hf_config.model_type == arch and hf_config.num_key_value_heads == KV
  logits = rljax_logits(out, loaded, IDS)
  np.testing.assert_allclose(logits, rljax_logits(out, tensors, IDS), rtol=0, atol=1e-6)
  assert np.all(np.isfinite(logits)) and logits.shape == (1, IDS.shape[1], V)


def test_q8_0_round_trip_within_quantisation_error(tmp_path):
  tensors = random_hf_tensors("llama", tied=True, seed=3)
  path = write_gguf(tmp_path / "m.gguf", tensors, qtype=Q.Q8_0)
  loaded = load_file(os.path.join(convert_gguf(path, tmp_path / "hf"), "model.safetensors"))
  for name, value in tensors.items():
    if value.ndim == 1:
      np.testing.assert_array_equal(loaded[name], value, err_msg=name)
      continue
    # Q8_0: blocks of 32 along rows, scale d = max|x| / 127 stored in fp16 (relative error
    # <= 2**-11, times up to 127 steps), so the error is <= d / 2 + 127 * d * 2**-11 < 0.57 d.
    blocks = np.abs(value).reshape(value.shape[0], -1, 32).max(-1, keepdims=True)
    bound = np.broadcast_to(blocks / 127 * 0.57 + 1e-7, (*blocks.shape[:2], 32))
    err = np.abs(loaded[name] - value).reshape(bound.shape)
    assert np.all(err <= bound), name
    assert np.max(err) > 0, name  # really quantised


def test_bfloat16_output_and_cli(tmp_path):
  tensors = random_hf_tensors("llama", tied=True)
  path = write_gguf(tmp_path / "m.gguf", tensors)
  assert cli.main(["convert", path, str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
  assert convert.main([path, str(tmp_path / "f32")]) == 0
  bf16 = load_file(str(tmp_path / "bf16" / "model.safetensors"))
  f32 = load_file(str(tmp_path / "f32" / "model.safetensors"))
  for name, value in tensors.items():
    assert bf16[name].dtype.name == "bfloat16" and f32[name].dtype == np.float32
    np.testing.assert_array_equal(f32[name], value)
    np.testing.assert_allclose(bf16[name].astype(np.float32), value, rtol=2**-8, atol=0)
  with open(tmp_path / "bf16" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  with pytest.raises(SystemExit):
    cli.main(["convert", path, str(tmp_path / "x"), "--dtype", "float16"])


# ------------------------------------------------------------------------------------------------
# Tokenizer.
# ------------------------------------------------------------------------------------------------


def reference_tokenizer() -> Tokenizer:
  """Byte-level BPE built directly from the same vocab/merges (GPT-2's layout)."""
  vocab = {t: i for i, t in enumerate(TOKENS)}
  tok = Tokenizer(models.BPE(vocab, [tuple(m.split()) for m in MERGES]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  tok.add_tokens([AddedToken("<think>", normalized=False)])
  return tok


TEXTS = [
  "is the thing a test",
  "<|im_start|>user\nis the<|im_end|>\n",
  "héllo wörld ✓ 12 345  tabs\tand\nnewlines",
  "<think>is</think> the",
]


def test_tokenizer_matches_reference_bpe(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", random_hf_tensors("llama", tied=True))
  tok = AutoTokenizer.from_pretrained(convert_gguf(path, tmp_path / "hf"))
  ref = reference_tokenizer()
  for text in TEXTS:
    ids = tok(text)["input_ids"]
    assert ids == [1] + ref.encode(text).ids, text  # add_bos_token=True in the file
    assert tok.decode(ids[1:]) == text
  assert tok.convert_ids_to_tokens(tok("is the")["input_ids"]) == ["<|im_start|>", "is", "Ġthe"]
  assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
  assert tok.decode(tok("<|im_end|> a")["input_ids"], skip_special_tokens=True) == " a"
  text = tok.apply_chat_template(
    [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
  )
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _metadata(pre: str, **extra) -> dict:
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": MERGES,
          "tokenizer.ggml.token_type": TYPES, **extra}


def test_smollm_pre_tokenizer_splits_digits():
  gpt2 = hf_tokenizer_from_gguf(_metadata("gpt2"))
  smollm = hf_tokenizer_from_gguf(_metadata("smollm"))
  assert gpt2.convert_ids_to_tokens(gpt2("12")["input_ids"]) == ["12"]
  assert smollm.convert_ids_to_tokens(smollm("12")["input_ids"]) == ["1", "2"]
  assert smollm.convert_ids_to_tokens(smollm("is the")["input_ids"]) == ["is", "Ġthe"]


def test_unknown_pre_tokenizer_warns():
  with pytest.warns(UserWarning, match="mystery"):
    hf_tokenizer_from_gguf(_metadata("mystery"))


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


def test_unknown_architecture(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", random_hf_tensors("llama", tied=True), arch="mamba")
  with pytest.raises(ValueError, match="mamba"):
    convert_gguf(path, tmp_path / "hf")


def test_missing_tensor(tmp_path):
  tensors = random_hf_tensors("llama", tied=True)
  path = write_gguf(tmp_path / "m.gguf", tensors, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight"):
    convert_gguf(path, tmp_path / "hf")


def test_unknown_tensor(tmp_path):
  tensors = random_hf_tensors("llama", tied=True)
  extra = {"blk.0.mystery.weight": np.ones(4, np.float32)}
  path = write_gguf(tmp_path / "m.gguf", tensors, extra=extra)
  with pytest.raises(ValueError, match=r"blk\.0\.mystery\.weight"):
    convert_gguf(path, tmp_path / "hf")


def test_wrong_shape(tmp_path):
  tensors = random_hf_tensors("llama", tied=True)
  tensors["model.layers.0.mlp.gate_proj.weight"] = np.zeros((F + 32, D), np.float32)
  path = write_gguf(tmp_path / "m.gguf", tensors)
  with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight.*shape"):
    convert_gguf(path, tmp_path / "hf")


def test_bad_dtype_unsupported_tokenizer_and_missing_file(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", random_hf_tensors("llama", tied=True))
  with pytest.raises(ValueError, match="dtype"):
    convert_gguf(path, tmp_path / "hf", dtype="float16")
  with pytest.raises(ValueError, match="'llama'"):
    hf_tokenizer_from_gguf(_metadata("gpt2", **{"tokenizer.ggml.model": "llama"}))
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    convert_gguf(tmp_path / "nope.gguf", tmp_path / "hf")


def test_damaged_file_is_named(tmp_path):
  data = open(write_gguf(tmp_path / "m.gguf", random_hf_tensors("llama", tied=True)), "rb").read()
  for name, damaged in (("truncated", data[: len(data) - 100]), ("header", data[:40]),
                        ("garbage", b"\x13" * 200)):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=rf"{name}\.gguf: not a readable GGUF file"):
      convert_gguf(path, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------
# Gemma 2 / 3: llama.cpp stores every norm weight as 1 + w.
# ------------------------------------------------------------------------------------------------

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# The Gemma names, by hand (llama.cpp's tensor_mapping.py): ffn_norm is the pre-feedforward norm.
GEMMA_TO_GGUF = {
  **{k: v for k, v in HF_TO_GGUF.items() if "layernorm" not in k},
  "input_layernorm.weight": "attn_norm.weight",
  "post_attention_layernorm.weight": "post_attention_norm.weight",
  "pre_feedforward_layernorm.weight": "ffn_norm.weight",
  "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def write_gemma_gguf(path, family: str, arch: str) -> tuple[str, dict[str, np.ndarray]]:
  """The parity fixture `family` as llama.cpp's convert_hf_to_gguf.py writes it: GGUF names,
  norm weights + 1, no lm_head (tied), the hyper-parameters it stores. Returns (path, tensors)."""
  directory = os.path.join(FIXTURES, family)
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json")) as f:
    c = json.load(f)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_context_length(c["max_position_embeddings"])
  writer.add_embedding_length(c["hidden_size"])
  writer.add_block_count(c["num_hidden_layers"])
  writer.add_feed_forward_length(c["intermediate_size"])
  writer.add_head_count(c["num_attention_heads"])
  writer.add_head_count_kv(c["num_key_value_heads"])
  writer.add_key_length(c["head_dim"])
  writer.add_value_length(c["head_dim"])
  writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
  writer.add_sliding_window(c["sliding_window"])
  writer.add_vocab_size(c["vocab_size"])
  if arch == "gemma2":
    writer.add_attn_logit_softcapping(c["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(c["final_logit_softcapping"])
  else:  # the fixture's 3 layers are local, local, global (llama.cpp's default: 5 of 6 local)
    writer.add_rope_freq_base(c["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(c["rope_parameters"]["full_attention"]["factor"])
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("gpt2")
  writer.add_token_list(TOKENS)
  writer.add_token_merges(MERGES)
  writer.add_token_types(TYPES)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_pad_token_id(0)
  for hf, value in tensors.items():
    value = value + 1.0 if hf.endswith("norm.weight") else value
    name = hf.split(".", 3)
    name = (HF_TO_GGUF[hf] if hf in HF_TO_GGUF else f"blk.{name[2]}.{GEMMA_TO_GGUF[name[3]]}")
    writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path), tensors


@pytest.mark.parametrize("family,arch", [("gemma2", "gemma2"), ("gemma3", "gemma3")])
def test_gemma_gguf_undoes_the_norm_shift_and_matches_transformers(tmp_path, family, arch):
  path, tensors = write_gemma_gguf(tmp_path / "m.gguf", family, arch)
  out = convert_gguf(path, tmp_path / "hf")
  loaded = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(loaded) == sorted(tensors)
  for name, value in tensors.items():
    if name.endswith("norm.weight"):  # (1 + w) - 1 in float32: within an ulp of 1
      np.testing.assert_allclose(loaded[name], value, rtol=0, atol=2**-23, err_msg=name)
      assert np.abs(value).max() < 0.5  # stored as w (≈ 0), not as 1 + w
    else:
      np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  fixture = ModelConfig.from_hf(os.path.join(FIXTURES, family))
  config = ModelConfig.from_hf(out)
  assert AutoConfig.from_pretrained(out).model_type == fixture.model_type
  # A GGUF has no query_pre_attn_scalar: llama.cpp takes head_dim (the fixture's is 12).
  assert config.attention_scale == fixture.head_dim**-0.5
  reference = fixture.replace(attention_scale=config.attention_scale)
  for field in ("sliding_window", "attention_softcap", "final_logit_softcap", "rope_theta",
                "local_rope_theta", "rope_scaling", "qk_norm", "norm_plus_one", "post_norms",
                "mlp_activation", "scale_embeddings", "tie_word_embeddings", "vocab_size"):
    assert getattr(config, field) == getattr(reference, field), field
  ids = np.load(os.path.join(FIXTURES, family, "inputs.npz"))["input_ids"][:1]
  model = Transformer(reference, rngs=nnx.Rngs(0))
  load_hf_state_dict(model, tensors)
  with jax.default_matmul_precision("highest"):
    expected = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(rljax_logits(out, loaded, ids), expected, rtol=0, atol=1e-5)


def test_gemma_tensor_names_and_default_layer_pattern():
  assert hf_tensor_name("blk.2.ffn_norm.weight", "gemma2") == (
    "model.layers.2.pre_feedforward_layernorm.weight")
  assert hf_tensor_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
  assert hf_tensor_name("blk.0.post_ffw_norm.weight", "gemma3") == (
    "model.layers.0.post_feedforward_layernorm.weight")
  metadata = {"general.architecture": "gemma3", "gemma3.embedding_length": 32,
              "gemma3.attention.head_count": 4, "gemma3.attention.key_length": 8,
              "gemma3.feed_forward_length": 64, "gemma3.block_count": 12,
              "gemma3.attention.sliding_window": 512, "gemma3.vocab_size": 64}
  config = ModelConfig.from_hf(hf_config_from_gguf(metadata, ["output_norm.weight"]))
  assert config.sliding_window == ((512,) * 5 + (None,)) * 2
  assert (config.rope_theta, config.local_rope_theta) == (1e6, 1e4)
  assert config.attention_scale == 8**-0.5 and config.final_logit_softcap is None


# ------------------------------------------------------------------------------------------------
# LoRA on a converted model.
# ------------------------------------------------------------------------------------------------


def test_lora_on_a_gguf_converted_model_trains_adapters_only_and_merges(tmp_path):
  """A Q8_0 GGUF, converted and loaded, takes LoRA adapters; two SFT steps move every adapter
  (B first, then A) and leave the base bit for bit; merged == unmerged within 1e-5."""
  import functools

  from rljax.models.io import load_pretrained
  from rljax.models.lora import LoRAConfig, add_lora, lora_trainable, merged
  from rljax.train.objectives import sft_loss, sft_token_count
  from rljax.train.optim import OptimizerConfig, make_optimizer
  from rljax.train.state import create_train_state
  from rljax.train.step import make_train_step

  tensors = random_hf_tensors("llama", tied=False, seed=4)
  out = convert_gguf(write_gguf(tmp_path / "m.gguf", tensors, qtype=Q.Q8_0), tmp_path / "hf")
  model, tokenizer = load_pretrained(out)
  assert tokenizer is not None and model.config.num_layers == L
  add_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
  optimizer = make_optimizer(OptimizerConfig(1e-2))
  graphdef, state = create_train_state(model, optimizer, rng=0, trainable=lora_trainable)
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
  assert len(names) == 14 and all("_lora_" in n for n in names)  # A and B of all 7 projections
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, V, (4, 8)).astype(np.int32),
           "attention_mask": np.ones((4, 8), np.int32),
           "loss_mask": np.ones((4, 8), np.int32)}
  step = make_train_step(functools.partial(sft_loss, chunk_size=8), graphdef, optimizer,
                         count_fn=sft_token_count,
                         compiler_options={"xla_backend_optimization_level": 0})
  before = jax.tree.map(np.asarray, (state.params, state.frozen))
  state, first = step(state, batch)
  state, second = step(state, batch)
  assert float(second["loss"]) < float(first["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), before[1])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                       before[0])
  assert all(v > 0 for v in jax.tree.leaves(moved))
  trained = nnx.merge(graphdef, state.params, state.frozen)
  forward = nnx.jit(lambda m, ids: m(ids))
  with jax.default_matmul_precision("highest"):
    unmerged, merged_logits = forward(trained, IDS), forward(merged(trained), IDS)
  # 1e-5 of the logits' scale: merging reorders f32 sums of magnitude ~10 (one element near 0
  # once differed by 1.05e-5 absolute on a loaded CI run).
  unmerged = np.asarray(unmerged)
  np.testing.assert_allclose(np.asarray(merged_logits), unmerged, rtol=1e-5,
                             atol=1e-5 * np.abs(unmerged).max())
