"""LoRA adapters in PEFT's format: `save_adapter` / `load_adapter` (a merged Hugging Face
checkpoint is `rljax.models.io.save_pretrained` of the adapted model).

A PEFT adapter directory holds

  adapter_config.json          peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
                               lora_dropout, use_rslora, target_modules, bias "none",
                               base_model_name_or_path, ...
  adapter_model.safetensors    per layer i and target t (self_attn.{q,k,v,o}_proj,
                               mlp.{gate,up,down}_proj):
    base_model.model.model.layers.{i}.<t>.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.<t>.lora_B.weight   [out, r]

(`nn.Linear` layouts, [out, in]). rljax's adapters are stacked along the layers axis in the head
layouts of their projection (`rljax.models.lora`: A [L, *in, r], B [L, r, *out]), so one layer's
lora_A.weight is A[i] flattened to [in, r] and transposed, lora_B.weight is B[i] flattened to
[r, out] and transposed: q/k/v's out and o's in are (heads, head_dim) in that order, as the
base weights' (`rljax.models.hf_weights`).

PEFT's `target_modules` may be "all-linear", module names ("q_proj") or full module paths
("model.layers.0.self_attn.q_proj", what recent PEFT versions write); an adapter must cover every
layer of each target it names. Options rljax does not implement (DoRA, per-layer rank or alpha
patterns, bias training, layer subsets, extra trained modules) are refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from rljax.models.lora import ALL_LINEAR, LoRAConfig, add_lora, lora_layers
from rljax.models.transformer import PROJECTIONS, Transformer

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# rljax projection → its module inside `model.layers.{i}.`
MODULE_OF = {name: ("self_attn." if name[0] in "qkvo" else "mlp.") + name for name in PROJECTIONS}
# PEFT options that change what an adapter computes, with the value rljax implements.
_PLAIN = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {},
          "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
          "layer_replication": None, "lora_bias": False, "target_parameters": None,
          "trainable_token_indices": None}


def peft_name(name: str, layer: int, matrix: str) -> str:
  """PEFT's tensor name of projection `name`'s lora_{A,B} (`matrix` "A" or "B") in `layer`."""
  return f"{PEFT_PREFIX}model.layers.{layer}.{MODULE_OF[name]}.lora_{matrix}.weight"


def adapter_config_dict(lora: LoRAConfig, base_model_name_or_path: str | None = None
                        ) -> dict[str, Any]:
  """The adapter_config.json of `lora` (the keys PEFT needs to load it)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
          "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
          "target_modules": list(lora.target_modules), "base_model_name_or_path":
          base_model_name_or_path, "inference_mode": True, "init_lora_weights": True, **_PLAIN}


def lora_config_from_peft(config: dict[str, Any], num_layers: int) -> LoRAConfig:
  """The `LoRAConfig` of an adapter_config.json dict; ValueError naming an unsupported option."""
  if config.get("peft_type") != "LORA":
    raise ValueError(f"not a LoRA adapter: peft_type {config.get('peft_type')!r}.")
  for key, plain in _PLAIN.items():
    value = config.get(key, plain)
    if value != plain and not (plain in ({}, None) and not value):
      raise ValueError(f"unsupported adapter option {key}={value!r} (rljax implements "
                       f"{key}={plain!r}).")
  return LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                    dropout=float(config.get("lora_dropout", 0.0)),
                    use_rslora=bool(config.get("use_rslora", False)),
                    target_modules=_targets(config.get("target_modules"), num_layers))


def _targets(targets: Any, num_layers: int) -> str | tuple[str, ...]:
  """PEFT's target_modules → rljax names; full paths must cover every layer of a target."""
  if targets == ALL_LINEAR:
    return ALL_LINEAR
  if isinstance(targets, str):
    targets = [targets]
  if not isinstance(targets, (list, tuple)):
    raise ValueError(f"unsupported target_modules {targets!r} (a regex is not supported).")
  layers: dict[str, set[int]] = {}
  for target in targets:
    parts = target.split(".")
    name = parts[-1]
    if len(parts) > 1:
      layer = parts[parts.index("layers") + 1] if "layers" in parts else None
      if layer is None or not layer.isdigit():
        raise ValueError(f"unsupported target module path {target!r}.")
      layers.setdefault(name, set()).add(int(layer))
    else:
      layers.setdefault(name, set()).update(range(num_layers))
  partial = {n: sorted(ls) for n, ls in layers.items() if ls != set(range(num_layers))}
  if partial:
    raise ValueError(f"the adapter targets only some layers ({partial}); rljax's adapters "
                     f"cover all {num_layers}.")
  return tuple(layers)


def _layers_of(model: nnx.Module):
  layers = lora_layers(model)
  if not isinstance(model, Transformer) or len(layers) != 1:
    raise ValueError("PEFT adapters are read and written for a `Transformer` with LoRA "
                     f"adapters (add_lora); got {type(model).__name__} with {len(layers)}.")
  return layers[0]


def adapter_state_dict(model: Transformer) -> dict[str, np.ndarray]:
  """{PEFT name: float32 array} of a model's adapters (inverse of `load_adapter_state_dict`)."""
  layers = _layers_of(model)
  out = {}
  for name in layers.lora.target_modules:
    a = np.asarray(getattr(layers, f"{name}_lora_a")[...], np.float32)
    b = np.asarray(getattr(layers, f"{name}_lora_b")[...], np.float32)
    n, r = a.shape[0], a.shape[-1]
    for i in range(n):
      out[peft_name(name, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      out[peft_name(name, i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  return out


def load_adapter_state_dict(model: Transformer, tensors: dict[str, np.ndarray]) -> None:
  """Copies PEFT-named adapter tensors into a model's adapters in place (shapes checked; every
  tensor must be used)."""
  layers = _layers_of(model)
  used = set()
  for name in layers.lora.target_modules:
    for matrix in "AB":
      var = getattr(layers, f"{name}_lora_{matrix.lower()}")
      n, r = var.shape[0], layers.lora.rank
      per_layer = []
      for i in range(n):
        key = peft_name(name, i, matrix)
        if key not in tensors:
          raise ValueError(f"missing adapter tensor {key!r}.")
        t = np.asarray(tensors[key])
        want = (r, int(np.prod(var.shape[1:-1]))) if matrix == "A" else (
          int(np.prod(var.shape[2:])), r)
        if t.shape != want:
          raise ValueError(f"adapter tensor {key!r} has shape {t.shape}, expected {want}.")
        per_layer.append(t.T.reshape(var.shape[1:]))
        used.add(key)
      var[...] = jnp.asarray(np.stack(per_layer), var.dtype)
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    raise ValueError(f"unexpected adapter tensors: {unexpected[:8]}")


def save_adapter(model: Transformer, path: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> None:
  """Writes the adapters of `model` as a PEFT adapter directory (module doc)."""
  layers = _layers_of(model)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(adapter_config_dict(layers.lora, base_model_name_or_path), f, indent=2)
  save_file(adapter_state_dict(model), os.path.join(path, ADAPTER_WEIGHTS_FILE),
            metadata={"format": "pt"})


def read_adapter_config(path: str | os.PathLike, num_layers: int) -> LoRAConfig:
  """The `LoRAConfig` of a PEFT adapter directory."""
  file = os.path.join(path, ADAPTER_CONFIG_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"no {ADAPTER_CONFIG_FILE} in {os.fspath(path)!r}.")
  with open(file, encoding="utf-8") as f:
    return lora_config_from_peft(json.load(f), num_layers)


def load_adapter(model: Transformer, path: str | os.PathLike) -> Transformer:
  """`model` with the PEFT adapter of directory `path` (in place): adapters are added with its
  config when the model has none (`add_lora`), else its config must equal theirs.

  Example:
    >>> policy, tokenizer = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> policy = load_adapter(policy, "sft-adapter/")     # PEFT's save_pretrained output
  """
  lora = read_adapter_config(path, model.config.num_layers)
  layers = lora_layers(model)
  if not layers:
    add_lora(model, lora, rngs=nnx.Rngs(0))  # every value is overwritten below
  elif layers[0].lora != lora:
    raise ValueError(f"the model's adapters ({layers[0].lora}) differ from the adapter's "
                     f"({lora}).")
  load_adapter_state_dict(model, load_file(os.path.join(path, ADAPTER_WEIGHTS_FILE)))
  return model


__all__ = [
  "adapter_config_dict",
  "adapter_state_dict",
  "load_adapter",
  "load_adapter_state_dict",
  "lora_config_from_peft",
  "peft_name",
  "read_adapter_config",
  "save_adapter",
]
