"""`ModelConfig`: the hyper-parameters of a decoder-only transformer, readable from Hugging Face.

Supported `model_type`s of a transformers `config.json`: llama (Llama 2/3/3.x, SmolLM/SmolLM2),
mistral, qwen2 (Qwen2/2.5: q/k/v bias), qwen3 (q/k RMSNorm), gemma2 and gemma3_text (Gemma 3's
text model; a `gemma3` multimodal config is read through its `text_config`). Reading a config
never executes remote code: it parses `config.json` (or a `transformers.PretrainedConfig` built by
the caller).

The Gemma family in these fields (transformers' `modeling_gemma2.py` / `modeling_gemma3.py`):
`norm_plus_one` (RMSNorm x̂·(1 + w) in float32), `post_norms` (four norms per layer),
`mlp_activation="gelu_tanh"` (GeGLU), `scale_embeddings` (× √hidden_size), `attention_scale =
query_pre_attn_scalar ** -0.5`, per-layer `sliding_window` from `layer_types`, Gemma 2's soft-caps
(`attention_softcap`, `final_logit_softcap`) and Gemma 3's q/k norms and `local_rope_theta`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from rljax.models.attention import ATTENTION_IMPLEMENTATIONS
from rljax.ops._checks import check_bool, check_choice, check_int, check_number

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
REMAT_POLICIES = ("nothing", "dots")
# transformers' `hidden_act` / `hidden_activation` names of each `mlp_activation`.
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

_DTYPES = {
  "float32": jnp.float32,
  "float16": jnp.float16,
  "bfloat16": jnp.bfloat16,
  "float64": jnp.float64,
}


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def _freeze(value: Any) -> Any:
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


# The parameters each rope type needs (transformers' `rope_config_validation`), all > 0.
ROPE_PARAMETERS = {
  "default": (),
  "linear": ("factor",),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
  """ValueError unless `rope_scaling` is None or a dict with a supported "rope_type" and that
  type's parameters, each a number > 0 (llama3: high_freq_factor > low_freq_factor)."""
  if rope_scaling is None:
    return
  if not isinstance(rope_scaling, dict):
    raise ValueError(f"`rope_scaling` must be None or a dict; got {rope_scaling!r}.")
  rope_type = rope_scaling.get("rope_type", "default")
  check_choice("`rope_scaling` rope_type", rope_type, SUPPORTED_ROPE_TYPES)
  for key in ROPE_PARAMETERS[rope_type]:
    if key not in rope_scaling:
      raise ValueError(f"`rope_scaling` of rope_type {rope_type!r} needs {key!r}; got "
                       f"{rope_scaling!r}.")
    check_number(f"rope_scaling[{key!r}]", rope_scaling[key], low_open=True)
  high, low = rope_scaling.get("high_freq_factor"), rope_scaling.get("low_freq_factor")
  if rope_type == "llama3" and not high > low:
    raise ValueError(f"`rope_scaling` of rope_type 'llama3' needs high_freq_factor > "
                     f"low_freq_factor; got {rope_scaling!r}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a Llama-family decoder-only causal LM.

  Attributes:
    vocab_size: V.
    hidden_size: model width D.
    intermediate_size: SwiGLU hidden width F.
    num_layers: number of decoder layers (stacked and scanned).
    num_heads: query heads H.
    num_kv_heads: key/value heads (grouped-query attention; H must be a multiple).
    head_dim: per-head width (default D // H).
    rope_theta: RoPE base.
    rope_scaling: None or a dict with "rope_type" in ("default", "llama3", "linear") and that
      type's parameters (llama3: factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings; linear: factor) — the transformers convention.
    rms_norm_eps: RMSNorm epsilon.
    norm_plus_one: every RMSNorm scales by (1 + w), the product taken in float32 before the cast
      back (Gemma; its norm weights are stored as w, zero at init); False: w · cast(x̂) (Llama).
    post_norms: RMSNorm on the attention and the MLP outputs before each residual add, so four
      norms per layer (Gemma 2 / 3: input, post-attention, pre-feedforward, post-feedforward).
    mlp_activation: the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU with the
      tanh approximation of GELU, Gemma's gelu_pytorch_tanh).
    scale_embeddings: embeddings × √hidden_size, the factor cast to the activation dtype (Gemma).
    tie_word_embeddings: unembedding is the embedding table (SmolLM, Qwen small models).
    attention_bias: q/k/v projections have biases (Qwen2 always; Llama/Qwen3 `attention_bias`).
    attention_out_bias: the output projection has a bias (Llama/Qwen3 `attention_bias`).
    mlp_bias: gate/up/down projections have biases (Llama `mlp_bias`).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
    sliding_window: None, the attention window of every layer (Mistral; keys with
      q_pos - k_pos >= window are masked), or a tuple of one window (or None: full attention)
      per layer (Gemma 2 / 3 alternate local and global layers).
    attention_scale: the score scale; None is head_dim ** -0.5 (Gemma: query_pre_attn_scalar
      ** -0.5).
    attention_softcap: None, or c > 0: scores c · tanh(s / c) (Gemma 2's
      attn_logit_softcapping).
    final_logit_softcap: None, or c > 0: logits c · tanh(z / c) (Gemma 2's
      final_logit_softcapping), in `logits_from_hidden`, the sampler and the fused log-probs.
    local_rope_theta: None (one RoPE for every layer), or the RoPE base of the sliding-window
      layers (Gemma 3's rope_local_base_freq, unscaled); `rope_theta` and `rope_scaling` are then
      those of the full-attention layers only.
    max_position_embeddings: informational (RoPE needs no table).
    dtype: computation dtype of activations.
    param_dtype: dtype of parameters.
    remat: rematerialise (jax.checkpoint) each layer in the backward pass.
    remat_policy: what a rematerialised layer keeps for its backward: "nothing" (recompute the
      whole layer: the least memory), "dots" (keep the outputs of the projections' matmuls —
      `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, and the merged LoRA
      projections' outputs, named `lora_matmul` — and recompute the rest: the forward's matmuls
      are not run twice, at their outputs' memory). Read only with `remat`.
    remat_group: layers per checkpoint of the residual stream under `remat` (Megatron's uniform
      recompute): the layer scan keeps the input of every g-th layer only — L / g checkpoints
      [B, T, D] instead of L — and the backward recomputes each group's forward, its layers
      checkpointed inside it as with g = 1: one more forward per layer for 1/g of the
      checkpoints (default 1; must divide `num_layers`; above 1 only with `remat`).
    attention: the self-attention of full-sequence passes (training, log-probs, prefill;
      `rljax.models.attention.self_attention`): "blockwise" is the flash core (memory linear in
      T, block skipping), "naive" the dense reference (materialises [B, H, T, T] scores),
      "cudnn" / "splash" the GPU / TPU kernels (`rljax.models.kernels`; an error where they
      cannot run), "auto" (default) the backend's kernel where it supports the call, else naive
      up to 2 * attention_block slots and blockwise beyond.
    attention_block: query / key block size of the blockwise core (`benchmarks/attention.py`).
    scan_unroll: layers per iteration of the layer scan (`lax.scan(unroll=...)`); None (default)
      chooses when the model is traced: all layers on CPU without remat (XLA:CPU runs the
      unrolled program faster: `benchmarks/grpo_step.py`; with remat it runs it slower), else 1
      (compile time independent of depth). The parameters stay stacked either way.
    model_type: the Hugging Face family name (used by `to_hf_dict`).
    bos_token_id, eos_token_id, pad_token_id: copied from the HF config when present.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  rms_norm_eps: float = 1e-6
  norm_plus_one: bool = False
  post_norms: bool = False
  mlp_activation: str = "silu"
  scale_embeddings: bool = False
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | tuple[int | None, ...] | None = None
  attention_scale: float | None = None
  attention_softcap: float | None = None
  final_logit_softcap: float | None = None
  local_rope_theta: float | None = None
  max_position_embeddings: int = 2048
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing"
  remat_group: int = 1
  attention: str = "auto"
  attention_block: int = 128
  scan_unroll: int | None = None
  model_type: str = "llama"
  bos_token_id: int | list[int] | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None

  def __hash__(self) -> int:
    """Hashable despite dict / list fields, so a config (and a GraphDef holding it) can be a
    static `jax.jit` argument."""
    return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

  def __post_init__(self) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "max_position_embeddings", "attention_block"):
      check_int(name, getattr(self, name), 1)
    for name in ("num_kv_heads", "head_dim", "scan_unroll"):
      check_int(name, getattr(self, name), 1, optional=True)
    check_int("remat_group", self.remat_group, 1)
    if self.num_layers % self.remat_group:
      raise ValueError(f"`remat_group` ({self.remat_group}) must divide `num_layers` "
                       f"({self.num_layers}).")
    if self.remat_group > 1 and not self.remat:
      raise ValueError(f"`remat_group` ({self.remat_group}) groups rematerialised layers: set "
                       "`remat=True` too.")
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_heads` "
                         f"({self.num_heads}) unless `head_dim` is given.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"`num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` "
                       f"({self.num_kv_heads}).")
    for name in ("rope_theta", "rms_norm_eps"):
      check_number(name, getattr(self, name), low_open=True)
    for name in ("attention_scale", "attention_softcap", "final_logit_softcap",
                 "local_rope_theta"):
      check_number(name, getattr(self, name), low_open=True, optional=True)
    for name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias",
                 "qk_norm", "remat", "norm_plus_one", "post_norms", "scale_embeddings"):
      check_bool(name, getattr(self, name))
    check_choice("`mlp_activation`", self.mlp_activation, MLP_ACTIVATIONS)
    check_choice("`remat_policy`", self.remat_policy, REMAT_POLICIES)
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if isinstance(value, str):
        check_choice(f"`{name}`", value, _DTYPES)
        object.__setattr__(self, name, _DTYPES[value])
    check_choice("`attention`", self.attention, ATTENTION_IMPLEMENTATIONS)
    check_choice("`model_type`", self.model_type, SUPPORTED_MODEL_TYPES)
    if isinstance(self.sliding_window, list):
      object.__setattr__(self, "sliding_window", tuple(self.sliding_window))
    windows = (self.sliding_window if isinstance(self.sliding_window, tuple)
               else (self.sliding_window,))
    if isinstance(self.sliding_window, tuple) and len(windows) != self.num_layers:
      raise ValueError(f"`sliding_window` has {len(windows)} per-layer entries for "
                       f"{self.num_layers} layers.")
    for window in windows:
      check_int("sliding_window", window, 1, optional=True)
    check_rope_scaling(self.rope_scaling)
    if self.local_rope_theta is not None and self.layer_windows is None:
      raise ValueError(f"`local_rope_theta` ({self.local_rope_theta}) is the RoPE base of the "
                       "sliding-window layers, but no layer has a `sliding_window`.")

  @property
  def layer_windows(self) -> tuple[int | None, ...] | None:
    """One sliding window (None: full attention) per layer, or None when no layer has one."""
    if isinstance(self.sliding_window, tuple):
      windows = self.sliding_window
    else:
      windows = (self.sliding_window,) * self.num_layers
    return None if all(w is None for w in windows) else windows

  @property
  def layer_local_rope(self) -> tuple[bool, ...] | None:
    """Per layer, whether it uses the local RoPE (`local_rope_theta`: the sliding-window
    layers), or None when every layer uses the same one."""
    if self.local_rope_theta is None:
      return None
    return tuple(w is not None for w in self.layer_windows)

  def replace(self, **changes: Any) -> ModelConfig:
    """A copy with some fields changed (e.g. `config.replace(remat=True, dtype=jnp.bfloat16)`)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> ModelConfig:
    """Builds a config from a transformers config object, a dict, a config.json or its directory.

    Args:
      hf_config: a `transformers.PretrainedConfig`, a `dict` (the content of config.json), a path
        to config.json, or a directory containing it.
      **overrides: fields to set on the result (e.g. `dtype=jnp.bfloat16`, `remat=True`).

    Raises:
      ValueError: unknown `model_type` (the message names it and the supported ones), or a
        rope scaling type this model does not implement.
    """
    d = _as_dict(hf_config)
    if d.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration: its text model
      d = _gemma3_text_config(d)
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
      )
    gemma: dict[str, Any] = {}
    if model_type in GEMMA_MODEL_TYPES:
      d, gemma = _gemma_config(d)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope = dict(rope)
    default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
    rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", default_theta)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    rope["rope_type"] = rope_type
    rope_scaling = None if rope_type == "default" else rope
    if model_type == "qwen2":
      attention_bias, out_bias = True, False
    else:
      attention_bias = out_bias = bool(d.get("attention_bias", False))
    sliding_window = None
    if model_type == "mistral":
      sliding_window = d.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
      raise ValueError(f"use_sliding_window=True is not supported for {model_type}")
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim") or hidden // num_heads
    dtype_name = d.get("dtype") or d.get("torch_dtype")
    activation = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if activation not in _HF_ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(_HF_ACTIVATIONS)}, got {activation!r}")
    fields: dict[str, Any] = dict(
      vocab_size=int(d["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(d["intermediate_size"]),
      num_layers=int(d["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      mlp_activation=_HF_ACTIVATIONS[activation],
      tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type in GEMMA_MODEL_TYPES)),
      attention_bias=attention_bias,
      attention_out_bias=out_bias,
      mlp_bias=bool(d.get("mlp_bias", False)),
      qk_norm=model_type in ("qwen3", "gemma3_text"),
      sliding_window=None if sliding_window is None else int(sliding_window),
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      model_type=model_type,
      bos_token_id=d.get("bos_token_id"),
      eos_token_id=d.get("eos_token_id"),
      pad_token_id=d.get("pad_token_id"),
    )
    fields.update(gemma)
    if isinstance(dtype_name, str) and dtype_name in _DTYPES:
      fields["param_dtype"] = _DTYPES[dtype_name]
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers config.json dict of this model (readable by `transformers.AutoConfig`).

    Raises:
      ValueError: a field this `model_type`'s config.json cannot express (named), e.g. a
        Llama with `post_norms`, or a Gemma without its norms.
    """
    gemma = self.model_type in GEMMA_MODEL_TYPES
    for name, value in _family_fields(self.model_type).items():
      if getattr(self, name) != value:
        raise ValueError(f"a {self.model_type} config.json has no field for {name}="
                         f"{getattr(self, name)!r} (the family implies {value!r})")
    if not gemma:
      for name in ("attention_scale", "attention_softcap", "final_logit_softcap"):
        if getattr(self, name) is not None:
          raise ValueError(f"{name} has no field in a {self.model_type} config.json")
      if isinstance(self.sliding_window, tuple):
        raise ValueError(f"per-layer sliding windows have no field in a {self.model_type} "
                         "config.json")
    rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
    d: dict[str, Any] = {
      "architectures": [f"{arch[self.model_type]}ForCausalLM"],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": self.max_position_embeddings,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": self.tie_word_embeddings,
      "dtype": _dtype_name(self.param_dtype),
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
    }
    if self.rope_scaling:
      d["rope_scaling"] = dict(rope_parameters)
    if self.model_type in ("llama", "qwen3", "gemma2", "gemma3_text"):
      d["attention_bias"] = self.attention_bias
    if self.model_type == "llama":
      d["mlp_bias"] = self.mlp_bias
    if self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window
    if self.model_type in ("qwen2", "qwen3"):
      d["use_sliding_window"] = False
    if gemma:
      d.update(self._gemma_hf_fields())
    return d

  def _gemma_hf_fields(self) -> dict[str, Any]:
    """The Gemma keys of `to_hf_dict`: activation, query_pre_attn_scalar, soft-caps,
    layer_types + sliding_window, and Gemma 3's RoPE per layer type."""
    if self.attention_scale is None:
      raise ValueError(f"a {self.model_type} config needs `attention_scale` "
                       "(query_pre_attn_scalar ** -0.5)")
    scalar = self.attention_scale ** -2.0
    scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar
    windows = self.sliding_window if isinstance(self.sliding_window, tuple) else (
      (self.sliding_window,) * self.num_layers)
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
      raise ValueError(f"a {self.model_type} config.json has one sliding_window; the layers "
                       f"have {sizes}")
    d: dict[str, Any] = {
      "hidden_activation": "gelu_pytorch_tanh",
      "hidden_act": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": scalar,
      "final_logit_softcapping": self.final_logit_softcap,
      "attn_logit_softcapping": self.attention_softcap,
      "sliding_window": sizes[0] if sizes else None,
      "layer_types": [_LAYER_TYPES[w is None] for w in windows],
    }
    if self.model_type == "gemma3_text":
      full = dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta)
      local = {"rope_type": "default",
               "rope_theta": self.local_rope_theta or self.rope_theta}
      d["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
      d["rope_theta"], d["rope_local_base_freq"] = self.rope_theta, local["rope_theta"]
    return d


def _family_fields(model_type: str) -> dict[str, Any]:
  """The field values a `model_type`'s config.json implies (it has no key for them)."""
  gemma = model_type in GEMMA_MODEL_TYPES
  fields: dict[str, Any] = dict(norm_plus_one=gemma, post_norms=gemma, scale_embeddings=gemma,
                                mlp_activation="gelu_tanh" if gemma else "silu")
  if gemma:
    fields.update(qk_norm=model_type == "gemma3_text", attention_bias=False,
                  attention_out_bias=False, mlp_bias=False)
  if model_type != "gemma3_text":
    fields["local_rope_theta"] = None
  if model_type == "gemma3_text":
    fields["attention_softcap"] = None
  return fields


def _as_dict(hf_config: Any) -> dict[str, Any]:
  if isinstance(hf_config, dict):
    return dict(hf_config)
  if isinstance(hf_config, (str, os.PathLike)):
    path = os.fspath(hf_config)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  if hasattr(hf_config, "to_dict"):
    return hf_config.to_dict()
  raise ValueError(
    "hf_config must be a transformers config, a dict, or a path to config.json, got "
    f"{type(hf_config).__name__}"
  )


# transformers' defaults (Gemma2Config, Gemma3TextConfig) of the fields a config.json may omit
# (Gemma 3's multimodal text_config states only what differs from them).
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
  "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                 rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                 tie_word_embeddings=True, rope_theta=10000.0, query_pre_attn_scalar=256,
                 sliding_window=4096, final_logit_softcapping=30.0,
                 attn_logit_softcapping=50.0),
  "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                      num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, hidden_activation="gelu_pytorch_tanh",
                      max_position_embeddings=131072, rms_norm_eps=1e-6, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                      rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                      query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                      final_logit_softcapping=None, attn_logit_softcapping=None),
}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma3_text_config(d: dict[str, Any]) -> dict[str, Any]:
  """The text model's config of a `gemma3` (Gemma3ForConditionalGeneration) config.json: its
  `text_config`, with the token ids / dtype / tying of the outer config where it has none."""
  text = d.get("text_config")
  if not isinstance(text, dict):
    raise ValueError("a model_type 'gemma3' config needs a `text_config` dict (the text model)")
  text = {**text, "model_type": "gemma3_text"}
  for key in ("dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id",
              "tie_word_embeddings"):
    if key not in text and key in d:
      text[key] = d[key]
  return text


def _gemma_config(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(d with transformers' defaults filled in and Gemma 3's per-layer-type RoPE reduced to the
  full-attention layers', the Gemma fields of `ModelConfig`)."""
  model_type = d["model_type"]
  d = {**_GEMMA_DEFAULTS[model_type], **d}
  if d.get("use_bidirectional_attention"):
    raise ValueError(f"use_bidirectional_attention=True is not supported for {model_type}")
  layers = int(d["num_hidden_layers"])
  types = d.get("layer_types")
  if types is None:  # the pattern transformers derives: every `pattern`-th layer is global
    pattern = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern") or 6)
    types = [_LAYER_TYPES[(i + 1) % pattern == 0] for i in range(layers)]
  if len(types) != layers or any(t not in _LAYER_TYPES for t in types):
    raise ValueError(f"`layer_types` must list {layers} of {list(_LAYER_TYPES)}; got {types!r}")
  windows = tuple(int(d["sliding_window"]) if t == "sliding_attention" else None for t in types)
  scalar = d["query_pre_attn_scalar"]
  fields: dict[str, Any] = dict(
    norm_plus_one=True, post_norms=True, scale_embeddings=True, sliding_window=windows,
    attention_scale=float(scalar) ** -0.5,
    final_logit_softcap=d.get("final_logit_softcapping"),
  )
  if model_type == "gemma2":  # Gemma 3's attention ignores attn_logit_softcapping (transformers)
    fields["attention_softcap"] = d.get("attn_logit_softcapping")
    return d, fields
  rope = d.get("rope_parameters")
  if isinstance(rope, dict) and set(rope) & set(_LAYER_TYPES):
    full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
  else:  # the older flat form: rope_theta / rope_scaling (global), rope_local_base_freq
    full = dict(rope or d.get("rope_scaling") or {})
    local = {"rope_theta": d.get("rope_local_base_freq")}
  full.setdefault("rope_theta", d.get("rope_theta"))
  if local.get("rope_type", local.get("type", "default")) != "default":
    raise ValueError(f"sliding_attention layers with rope_type {local.get('rope_type')!r} are "
                     "not supported (rljax scales the full-attention layers' RoPE only)")
  d = {**d, "rope_parameters": full}
  d.pop("rope_scaling", None)
  if any(w is not None for w in windows):
    fields["local_rope_theta"] = float(local.get("rope_theta") or 10000.0)
  return d, fields
