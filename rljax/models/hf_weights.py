"""Name and layout mapping between Hugging Face (transformers) tensors and `Transformer` parameters.

transformers stores `nn.Linear` weights as [out, in]; rljax stores projections as [in, ...out]
with heads split out (q_proj [D, H, Dh], o_proj [H, Dh, D]) and the per-layer tensors stacked
along a leading `layers` axis. This module is the single source of truth for that mapping; the
loaders (`load_pretrained` / `save_pretrained`, GGUF import) build on it.

  model.embed_tokens.weight                   [V, D]      → embed             [V, D]
  model.norm.weight                           [D]         → final_norm        [D]
  lm_head.weight                              [V, D]      → lm_head           [V, D] (untied only)
  model.layers.{i}.input_layernorm.weight     [D]         → layers.attn_norm  [L, D]
  model.layers.{i}.post_attention_layernorm.weight        → layers.mlp_norm   [L, D]
  model.layers.{i}.self_attn.{q,k,v}_proj.weight [n*Dh, D] → layers.{q,k,v}_proj [L, D, n, Dh]
  model.layers.{i}.self_attn.{q,k,v}_proj.bias   [n*Dh]    → layers.{q,k,v}_bias  [L, n, Dh]
  model.layers.{i}.self_attn.o_proj.weight    [D, H*Dh]   → layers.o_proj     [L, H, Dh, D]
  model.layers.{i}.self_attn.o_proj.bias      [D]         → layers.o_bias     [L, D]
  model.layers.{i}.self_attn.{q,k}_norm.weight [Dh]       → layers.{q,k}_norm [L, Dh]
  model.layers.{i}.mlp.{gate,up}_proj.weight  [F, D]      → layers.{gate,up}_proj [L, D, F]
  model.layers.{i}.mlp.down_proj.weight       [D, F]      → layers.down_proj  [L, F, D]
  model.layers.{i}.mlp.{gate,up,down}_proj.bias           → layers.{gate,up,down}_bias

Gemma 2 / 3 (`post_norms`) name their four norms differently: input_layernorm → attn_norm,
post_attention_layernorm → post_attn_norm (the attention output's norm),
pre_feedforward_layernorm → mlp_norm, post_feedforward_layernorm → post_mlp_norm. Their norm
weights are stored as w of x̂·(1 + w), as rljax stores them (`norm_plus_one`).

A Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration) holds the text model under a
prefix: `language_model.model.` (the Hub's files) or `model.language_model.` (transformers 5's
saves), and `language_model.lm_head.` for an untied head; `text_weight_names` maps those names to
the ones above and drops the vision tower's.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.config import ModelConfig

# rljax layer parameter name → HF name inside `model.layers.{i}.`
LAYER_NAME_TO_HF: dict[str, str] = {
  "attn_norm": "input_layernorm.weight",
  "mlp_norm": "post_attention_layernorm.weight",
  "q_proj": "self_attn.q_proj.weight",
  "k_proj": "self_attn.k_proj.weight",
  "v_proj": "self_attn.v_proj.weight",
  "o_proj": "self_attn.o_proj.weight",
  "q_bias": "self_attn.q_proj.bias",
  "k_bias": "self_attn.k_proj.bias",
  "v_bias": "self_attn.v_proj.bias",
  "o_bias": "self_attn.o_proj.bias",
  "q_norm": "self_attn.q_norm.weight",
  "k_norm": "self_attn.k_norm.weight",
  "gate_proj": "mlp.gate_proj.weight",
  "up_proj": "mlp.up_proj.weight",
  "down_proj": "mlp.down_proj.weight",
  "gate_bias": "mlp.gate_proj.bias",
  "up_bias": "mlp.up_proj.bias",
  "down_bias": "mlp.down_proj.bias",
}
# Gemma's (`post_norms`) names of its four per-layer norms.
POST_NORM_NAMES_TO_HF: dict[str, str] = {
  "attn_norm": "input_layernorm.weight",
  "post_attn_norm": "post_attention_layernorm.weight",
  "mlp_norm": "pre_feedforward_layernorm.weight",
  "post_mlp_norm": "post_feedforward_layernorm.weight",
}
TOP_NAME_TO_HF: dict[str, str] = {
  "embed": "model.embed_tokens.weight",
  "final_norm": "model.norm.weight",
  "lm_head": "lm_head.weight",
}


def hf_layer_name(name: str, layer: int, config: ModelConfig | None = None) -> str:
  """HF tensor name of rljax layer parameter `name` in layer `layer` (Gemma's norm names when
  `config.post_norms`; a norm's name needs the config)."""
  if name.endswith("norm") and name not in ("q_norm", "k_norm"):
    if config is None:
      raise ValueError(f"the HF name of {name!r} depends on the family: pass the config")
    if config.post_norms:
      return f"model.layers.{layer}.{POST_NORM_NAMES_TO_HF[name]}"
  return f"model.layers.{layer}.{LAYER_NAME_TO_HF[name]}"


# Prefixes of a multimodal checkpoint's text model → the causal LM's names.
_TEXT_PREFIXES = (
  ("language_model.model.", "model."),
  ("model.language_model.", "model."),
  ("language_model.lm_head.", "lm_head."),
)
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                      "model.multi_modal_projector.")


def text_weight_names(names: list[str] | set[str]) -> dict[str, str]:
  """{causal-LM name: stored name} of a checkpoint's text-model tensors: a multimodal one's
  (`_TEXT_PREFIXES`; the vision tower and projector are left out) or a causal LM's as they are.

  Raises:
    ValueError: two stored tensors map to the same name, or a tensor of none of these parts.
  """
  out: dict[str, str] = {}
  for stored in sorted(names):
    if stored.startswith(_NON_TEXT_PREFIXES):
      continue
    name = stored
    for prefix, replacement in _TEXT_PREFIXES:
      if stored.startswith(prefix):
        name = replacement + stored[len(prefix):]
        break
    if name in out:
      raise ValueError(f"tensors {out[name]!r} and {stored!r} are both the text model's {name!r}")
    out[name] = stored
  return out


def hf_to_rljax_layout(name: str, tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
  """One HF tensor (of one layer) → the rljax layout of parameter `name` (without layers axis)."""
  c = config
  heads = {"q": c.num_heads, "k": c.num_kv_heads, "v": c.num_kv_heads}
  if name in ("q_proj", "k_proj", "v_proj"):
    return tensor.T.reshape(c.hidden_size, heads[name[0]], c.head_dim)
  if name in ("q_bias", "k_bias", "v_bias"):
    return tensor.reshape(heads[name[0]], c.head_dim)
  if name == "o_proj":
    return tensor.T.reshape(c.num_heads, c.head_dim, c.hidden_size)
  if name in ("gate_proj", "up_proj", "down_proj"):
    return tensor.T
  return tensor


def rljax_to_hf_layout(name: str, value: np.ndarray, config: ModelConfig) -> np.ndarray:
  """Inverse of `hf_to_rljax_layout`."""
  if name in ("q_proj", "k_proj", "v_proj"):
    return value.reshape(value.shape[0], -1).T
  if name in ("q_bias", "k_bias", "v_bias"):
    return value.reshape(-1)
  if name == "o_proj":
    return value.reshape(-1, value.shape[-1]).T
  if name in ("gate_proj", "up_proj", "down_proj"):
    return value.T
  return value


def expected_hf_names(model: nnx.Module) -> list[str]:
  """All HF tensor names a `Transformer` with this config reads / writes."""
  names = [TOP_NAME_TO_HF["embed"], TOP_NAME_TO_HF["final_norm"]]
  if not model.config.tie_word_embeddings:
    names.append(TOP_NAME_TO_HF["lm_head"])
  for layer in range(model.config.num_layers):
    names.extend(hf_layer_name(name, layer, model.config) for name in model.layers.names)
  return names


def _checked(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
  return array


def load_hf_state_dict(
  model: nnx.Module, tensors: Mapping[str, np.ndarray], *, strict: bool = True
) -> None:
  """Copies HF-named tensors into a `Transformer` in place (values cast to `param_dtype`).

  Args:
    model: an `rljax.models.transformer.Transformer`.
    tensors: {HF name: array} (e.g. from `safetensors.numpy.load_file`); a multimodal
      checkpoint's text model is read by its names (`text_weight_names`).
    strict: raise on tensors the model does not use (a tied model ignores `lm_head.weight`).

  Raises:
    ValueError: a missing tensor, an unexpected tensor (strict), or a shape mismatch; the
      message names the tensor.
  """
  c: ModelConfig = model.config
  tensors = {name: tensors[stored] for name, stored in text_weight_names(set(tensors)).items()}
  missing = [n for n in expected_hf_names(model) if n not in tensors]
  if missing:
    raise ValueError(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if strict:
    known = set(expected_hf_names(model)) | {TOP_NAME_TO_HF["lm_head"]}
    unexpected = sorted(n for n in tensors if n not in known)
    if unexpected:
      raise ValueError(f"unexpected tensors: {unexpected[:8]}")
  for attr in ("embed", "final_norm") + (() if c.tie_word_embeddings else ("lm_head",)):
    var = getattr(model, attr)
    hf_name = TOP_NAME_TO_HF[attr]
    var[...] = jnp.asarray(_checked(hf_name, np.asarray(tensors[hf_name]), var.shape), var.dtype)
  for name in model.layers.names:
    var = getattr(model.layers, name)
    per_layer = []
    for layer in range(c.num_layers):
      hf_name = hf_layer_name(name, layer, c)
      value = hf_to_rljax_layout(name, np.asarray(tensors[hf_name]), c)
      per_layer.append(_checked(hf_name, value, var.shape[1:]))
    var[...] = jnp.asarray(np.stack(per_layer), var.dtype)


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """{HF name: numpy array} of a `Transformer` (inverse of `load_hf_state_dict`)."""
  c: ModelConfig = model.config
  out: dict[str, np.ndarray] = {}
  for attr in ("embed", "final_norm") + (() if c.tie_word_embeddings else ("lm_head",)):
    out[TOP_NAME_TO_HF[attr]] = np.asarray(getattr(model, attr)[...])
  for name in model.layers.names:
    stacked = np.asarray(getattr(model.layers, name)[...])
    for layer in range(c.num_layers):
      out[hf_layer_name(name, layer, c)] = np.ascontiguousarray(
        rljax_to_hf_layout(name, stacked[layer], c)
      )
  return out
