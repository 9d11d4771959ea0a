"""GGUF import: a llama.cpp `.gguf` file → a Hugging Face directory (rljax and transformers load it).

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")          # or:
    rljax convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf
    python -m rljax.models.convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf --dtype bfloat16

The output is `config.json` (model_type + architectures), `model.safetensors` (float32 or bfloat16)
and the tokenizer files of a `transformers` fast tokenizer (see `rljax.models.gguf_tokenizer`).
Nothing here imports torch, and nothing executes code from the file.

What the converter undoes (the conventions of llama.cpp's `convert_hf_to_gguf.py`):
  * quantisation: every tensor is dequantised to float32 with `gguf.quants.dequantize`
    (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, the K-quants, ...);
  * dimension order: GGUF lists shapes fastest-first; the numpy array is the reverse;
  * the Q/K row permutation of Llama-architecture files (`LlamaModel.permute`, which turns HF's
    rotate-half RoPE layout into llama.cpp's interleaved one): see `permute_qk` / `unpermute_qk`;
  * tensor names (`blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, ...);
  * hyper-parameters (`llama.embedding_length` → `hidden_size`, ...), and tied embeddings when the
    file has no `output.weight`;
  * Gemma 2 / 3 (`Gemma2Model` / `Gemma3Model` there): every norm weight is stored as 1 + w
    (llama.cpp's RMSNorm multiplies by the weight; transformers' Gemma norms by 1 + w), so 1 is
    subtracted again (`GEMMA_NORM_SHIFT`; in float32 w comes back within an ulp of 1); the
    pre-feedforward norm is `ffn_norm`; what the file does not store is llama.cpp's own rule:
    query_pre_attn_scalar = head_dim (hidden / heads for the 27B models), sliding windows on
    every 2nd (Gemma 2) / 5 of 6 (Gemma 3) layers, Gemma 3's local RoPE base 10k, Gemma 2's
    soft-caps 50 / 30 when absent.

The tokenizer is rebuilt for byte-level BPE vocabularies only (`rljax.models.gguf_tokenizer`);
most Gemma files carry a SentencePiece one (`tokenizer.ggml.model == "llama"`), which is refused
with its name: use the model's Hugging Face tokenizer with the converted weights.

The `gguf` package is an optional dependency: `pip install 'rljax[gguf]'`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
# GGUF architecture → (HF model_type, HF architectures entry).
_HF_MODEL = {
  "llama": ("llama", "LlamaForCausalLM"),
  "qwen2": ("qwen2", "Qwen2ForCausalLM"),
  "qwen3": ("qwen3", "Qwen3ForCausalLM"),
  "gemma2": ("gemma2", "Gemma2ForCausalLM"),
  "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# llama.cpp stores a Gemma norm weight w of x̂·(1 + w) as 1 + w (convert_hf_to_gguf.py).
GEMMA_NORM_SHIFT = 1.0
# Gemma's layer pattern in llama.cpp (`set_swa_pattern`): layer i is local iff i % n < n - 1.
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
# Layer counts of the 27B models, whose query_pre_attn_scalar llama.cpp takes as hidden / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Architectures whose q/k rows llama.cpp permutes (convert_hf_to_gguf.py, LlamaModel.modify_tensors).
_PERMUTED_ARCHITECTURES = ("llama",)
DTYPES = ("float32", "bfloat16")

_TOP_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.bias": "self_attn.o_proj.bias",
  "attn_q_norm.weight": "self_attn.q_norm.weight",
  "attn_k_norm.weight": "self_attn.k_norm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
  "ffn_gate.bias": "mlp.gate_proj.bias",
  "ffn_up.bias": "mlp.up_proj.bias",
  "ffn_down.bias": "mlp.down_proj.bias",
}
# Gemma's four per-layer norms (`attn_norm` as llama's): ffn_norm is the pre-feedforward one.
_GEMMA_LAYER_NAMES = {
  **_LAYER_NAMES,
  "post_attention_norm.weight": "post_attention_layernorm.weight",
  "ffn_norm.weight": "pre_feedforward_layernorm.weight",
  "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def import_gguf_package() -> Any:
  """The `gguf` module, or an ImportError that says how to install it (the `[gguf]` extra)."""
  try:
    import gguf  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
      "GGUF import needs the `gguf` package: pip install 'rljax[gguf]' (or pip install gguf)"
    ) from e
  return gguf


# ----------------------------------------------------------------------------------------------
# llama.cpp's Q/K permutation.
# ----------------------------------------------------------------------------------------------


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's forward Q/K row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py).

  Rows [n_head * head_dim, ...] are viewed as (n_head, 2, head_dim / 2, ...) and the two middle
  axes swapped: within each head, the rotate-half pairs (i, i + head_dim/2) of transformers become
  adjacent rows (2i, 2i + 1), llama.cpp's interleaved RoPE layout. Pass `n_head = num_kv_heads`
  for K (llama.cpp does). Works on weights [rows, D] and on biases [rows].
  """
  rows = weights.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"weights has {rows} rows, not a multiple of 2 * n_head = {2 * n_head}")
  return (
    weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    .swapaxes(1, 2)
    .reshape(weights.shape)
  )


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `permute_qk`: llama.cpp's interleaved Q/K rows → transformers' rotate-half rows.

  Rows are viewed as (n_head, head_dim / 2, 2, ...) and the two middle axes swapped back.
  """
  rows = weights.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"weights has {rows} rows, not a multiple of 2 * n_head = {2 * n_head}")
  return (
    weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
    .swapaxes(1, 2)
    .reshape(weights.shape)
  )


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike) -> Any:
  """A `gguf.GGUFReader` on `path` (memory-mapped; tensors are read lazily); a damaged or
  truncated file (bad magic or version, a header or tensor table past its end) raises a
  ValueError naming it."""
  gguf = import_gguf_package()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {os.fspath(path)!r}")
  try:
    return gguf.GGUFReader(os.fspath(path))
  except (ValueError, IndexError, OSError) as e:
    raise ValueError(f"{os.fspath(path)}: not a readable GGUF file ({e}); the download or copy "
                     "may be incomplete.") from e


def read_metadata(reader: Any) -> dict[str, Any]:
  """{key: python value} of all metadata fields (arrays as lists, strings decoded)."""
  out: dict[str, Any] = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


def dequantized(tensor: Any) -> np.ndarray:
  """One `gguf.ReaderTensor` → float32 numpy array in numpy (slowest-first) dimension order."""
  gguf = import_gguf_package()
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  try:
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(
      f"tensor {tensor.name!r}: cannot dequantise type {tensor.tensor_type.name} ({e})"
    ) from e
  return np.asarray(values, dtype=np.float32).reshape(shape)


def _architecture(metadata: dict[str, Any]) -> str:
  arch = metadata.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
      f"unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )
  return arch


def _required(metadata: dict[str, Any], key: str) -> Any:
  if key not in metadata:
    raise ValueError(f"GGUF metadata has no {key!r}")
  return metadata[key]


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------


def hf_config_from_gguf(
  metadata: dict[str, Any], tensor_names: list[str], *, dtype: str = "float32"
) -> dict[str, Any]:
  """The transformers `config.json` dict described by a GGUF file's metadata and tensor names.

  Reads `{arch}.context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count(_kv), attention.key_length (head_dim; default D / H), rope.freq_base,
  rope.scaling.type/factor (linear only), attention.layer_norm_rms_epsilon, vocab_size` (default:
  the number of tokens, else the embedding rows) and the tokenizer's bos/eos/padding ids.
  Embeddings are tied when the file has no `output.weight`; biases exist when their tensors do.

  Raises:
    ValueError: an unsupported architecture (named), missing metadata, partial rotary, or a
      rope scaling rljax does not implement (llama3 `rope_freqs`, yarn, ...).
  """
  arch = _architecture(metadata)
  a = f"{arch}."
  names = set(tensor_names)
  hidden = int(_required(metadata, a + "embedding_length"))
  heads = int(_required(metadata, a + "attention.head_count"))
  head_dim = int(metadata.get(a + "attention.key_length", hidden // heads))
  rope_dim = metadata.get(a + "rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise ValueError(f"partial rotary (rope.dimension_count={rope_dim} != head_dim={head_dim})")
  if "rope_freqs.weight" in names:
    raise ValueError("tensor 'rope_freqs.weight' (llama3-style rope scaling) is not supported")
  vocab = metadata.get(a + "vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
  model_type, hf_arch = _HF_MODEL[arch]
  if arch == "gemma3":  # llama.cpp's default for Gemma 3's (global) RoPE base
    metadata = {a + "rope.freq_base": 1_000_000.0, **metadata}
  config: dict[str, Any] = {
    "architectures": [hf_arch],
    "model_type": model_type,
    "vocab_size": int(vocab) if vocab else None,
    "hidden_size": hidden,
    "intermediate_size": int(_required(metadata, a + "feed_forward_length")),
    "num_hidden_layers": int(_required(metadata, a + "block_count")),
    "num_attention_heads": heads,
    "num_key_value_heads": int(metadata.get(a + "attention.head_count_kv", heads)),
    "head_dim": head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": int(metadata.get(a + "context_length", 2048)),
    "rms_norm_eps": float(metadata.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
    "rope_theta": float(metadata.get(a + "rope.freq_base", 10000.0)),
    "rope_scaling": _rope_scaling(metadata, a),
    "tie_word_embeddings": "output.weight" not in names,
    "dtype": dtype,
    "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
    "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
  }
  if model_type == "llama":
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config["mlp_bias"] = "blk.0.ffn_gate.bias" in names
  if model_type == "qwen3":
    config["attention_bias"] = "blk.0.attn_q.bias" in names
  if model_type in ("qwen2", "qwen3"):
    config["use_sliding_window"] = False
  if arch in GEMMA_ARCHITECTURES:
    config.update(_gemma_config(metadata, arch, config))
  return config


def _gemma_config(metadata: dict[str, Any], arch: str, config: dict[str, Any]) -> dict[str, Any]:
  """The Gemma keys of a config.json from a GGUF file's metadata and llama.cpp's rules for what
  it does not store (see the module docstring)."""
  a = f"{arch}."
  layers, pattern = config["num_hidden_layers"], _GEMMA_SWA_PATTERN[arch]
  stored = metadata.get(a + "attention.sliding_window_pattern")
  if isinstance(stored, (list, tuple)):
    local = [bool(x) for x in stored]
  else:
    pattern = int(stored) if stored else pattern
    local = [i % pattern < pattern - 1 for i in range(layers)]
  if len(local) != layers:
    raise ValueError(f"{a}attention.sliding_window_pattern has {len(local)} entries for "
                     f"{layers} layers")
  heads, head_dim = config["num_attention_heads"], config["head_dim"]
  is_27b = layers == _GEMMA_27B_LAYERS[arch]
  out: dict[str, Any] = {
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
    "query_pre_attn_scalar": config["hidden_size"] // heads if is_27b else head_dim,
    "sliding_window": int(_required(metadata, a + "attention.sliding_window")),
    "layer_types": ["sliding_attention" if x else "full_attention" for x in local],
    "final_logit_softcapping": metadata.get(a + "final_logit_softcapping",
                                            30.0 if arch == "gemma2" else None),
    "attn_logit_softcapping": metadata.get(a + "attn_logit_softcapping",
                                           50.0 if arch == "gemma2" else None),
  }
  if arch == "gemma3":
    out["rope_local_base_freq"] = 10000.0
    out["attn_logit_softcapping"] = None
  return out


def _rope_scaling(metadata: dict[str, Any], a: str) -> dict[str, Any] | None:
  kind = metadata.get(a + "rope.scaling.type", "none")
  if kind in ("none", None):
    return None
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(metadata[a + "rope.scaling.factor"])}
  raise ValueError(f"rope.scaling.type {kind!r} is not supported (supported: none, linear)")


# ----------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
  """GGUF tensor name → HF name (`blk.3.ffn_up.weight` → `model.layers.3.mlp.up_proj.weight`;
  Gemma's `blk.3.ffn_norm.weight` → `model.layers.3.pre_feedforward_layernorm.weight`).

  Raises:
    ValueError: a tensor name this converter does not know (named).
  """
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  names = _GEMMA_LAYER_NAMES if arch in GEMMA_ARCHITECTURES else _LAYER_NAMES
  match = _LAYER_RE.match(gguf_name)
  if match and match.group(2) in names:
    return f"model.layers.{match.group(1)}.{names[match.group(2)]}"
  raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def expected_gguf_tensors(config: dict[str, Any]) -> list[str]:
  """GGUF tensor names a model with this HF config must have."""
  names = ["token_embd.weight", "output_norm.weight"]
  if not config["tie_word_embeddings"]:
    names.append("output.weight")
  per_layer = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
  per_layer += ["ffn_gate", "ffn_up", "ffn_down"]
  if config["model_type"] in ("gemma2", "gemma3_text"):
    per_layer += ["post_attention_norm", "post_ffw_norm"]
  if config["model_type"] in ("qwen3", "gemma3_text"):
    per_layer += ["attn_q_norm", "attn_k_norm"]
  for layer in range(config["num_hidden_layers"]):
    names.extend(f"blk.{layer}.{n}.weight" for n in per_layer)
  if config["model_type"] == "qwen2":
    for layer in range(config["num_hidden_layers"]):
      names.extend(f"blk.{layer}.attn_{n}.bias" for n in "qkv")
  return names


def hf_state_dict_from_gguf(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
  """{HF name: float32 array} of all tensors, dequantised, with llama's Q/K permutation and
  Gemma's norm shift (`GEMMA_NORM_SHIFT`) undone.

  Raises:
    ValueError: a missing tensor or an unknown one (the message names it).
  """
  tensors = {t.name: t for t in reader.tensors}
  missing = [n for n in expected_gguf_tensors(config) if n not in tensors]
  if missing:
    raise ValueError(f"missing GGUF tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  permuted = config["model_type"] in _PERMUTED_ARCHITECTURES
  arch = next(k for k, (model_type, _) in _HF_MODEL.items() if model_type == config["model_type"])
  out: dict[str, np.ndarray] = {}
  for name, tensor in tensors.items():
    hf_name = hf_tensor_name(name, arch)
    value = dequantized(tensor)
    if arch in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
      value = value - np.float32(GEMMA_NORM_SHIFT)
    shape = _expected_shape(hf_name, config)
    if shape is not None and tuple(value.shape) != shape:
      raise ValueError(
        f"GGUF tensor {name!r} ({hf_name}) has shape {tuple(value.shape)}, expected {shape}"
      )
    if permuted and ".attn_q." in name:
      value = unpermute_qk(value, config["num_attention_heads"])
    elif permuted and ".attn_k." in name:
      value = unpermute_qk(value, config["num_key_value_heads"])
    out[hf_name] = value
  return out


def _expected_shape(hf_name: str, config: dict[str, Any]) -> tuple[int, ...] | None:
  c = config
  d, f, dh = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  q, kv = c["num_attention_heads"] * dh, c["num_key_value_heads"] * dh
  shapes = {
    "embed_tokens.weight": (c["vocab_size"], d),
    "lm_head.weight": (c["vocab_size"], d),
    "q_proj.weight": (q, d),
    "k_proj.weight": (kv, d),
    "v_proj.weight": (kv, d),
    "o_proj.weight": (d, q),
    "gate_proj.weight": (f, d),
    "up_proj.weight": (f, d),
    "down_proj.weight": (d, f),
  }
  for suffix, shape in shapes.items():
    if hf_name.endswith(suffix):
      return None if shape[0] is None else shape
  return None



# ----------------------------------------------------------------------------------------------
# The whole conversion.
# ----------------------------------------------------------------------------------------------


def _cast(value: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes  # noqa: PLC0415  (a jax dependency)

    return np.ascontiguousarray(value.astype(ml_dtypes.bfloat16))
  return np.ascontiguousarray(value.astype(np.float32))


def convert_gguf(
  gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32"
) -> str:
  """Converts a GGUF file into a Hugging Face directory; returns `out_dir`.

  Writes `config.json`, `model.safetensors` (`dtype`: "float32" (default, exact for F32 files and
  exact dequantised values for quantised ones) or "bfloat16") and the tokenizer files
  (`tokenizer.json`, `tokenizer_config.json`, chat template). The result loads with
  `rljax.models.hf_weights.load_hf_state_dict`, `transformers.AutoConfig`/`AutoTokenizer`, and
  `transformers.AutoModelForCausalLM`.

  Raises:
    ValueError: unknown architecture, unsupported tokenizer, missing or unknown tensors, a bad
      `dtype` (each message names the culprit).
    ImportError: the `gguf` package is not installed (`pip install 'rljax[gguf]'`).
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  from rljax.models.gguf_tokenizer import hf_tokenizer_from_gguf  # noqa: PLC0415

  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
  reader = open_gguf(gguf_path)
  metadata = read_metadata(reader)
  tensor_names = [t.name for t in reader.tensors]
  config = hf_config_from_gguf(metadata, tensor_names, dtype=dtype)
  tokenizer = hf_tokenizer_from_gguf(metadata)
  state = hf_state_dict_from_gguf(reader, config)
  if config["vocab_size"] is None:
    config["vocab_size"] = int(state["model.embed_tokens.weight"].shape[0])
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(
    {name: _cast(value, dtype) for name, value in state.items()},
    os.path.join(out_dir, "model.safetensors"),
    metadata={"format": "pt"},
  )
  tokenizer.save_pretrained(out_dir)
  return os.fspath(out_dir)
