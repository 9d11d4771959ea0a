"""LoRA adapters on the projections of the scanned decoder layers (Hu et al. 2021; PEFT's).

A target projection W [*in, *out] (q/k/v: [D, H, Dh], o: [H, Dh, D], gate/up: [D, F], down:
[F, D]) gets two adapter matrices, stacked along the layers axis like W and scanned with it:

  A [L, *in, r]   Kaiming-uniform, bound 1 / sqrt(fan_in) (PEFT: kaiming_uniform_(a=sqrt(5))
                  on its [r, in] weight)
  B [L, r, *out]  zeros, so a fresh adapter leaves the model unchanged

  y = x W + s · (dropout(x) A) B,    s = alpha / r,  or alpha / sqrt(r) with rsLoRA

Adapters are `nnx.LoRAParam`s (a subclass of `nnx.Param`) with logical axes ("layers", <W's in
axes>, "lora_rank") / ("layers", "lora_rank", <W's out axes>): they shard like their W on every
rule set, the rank replicated. `lora_trainable` is the nnx filter of what trains under LoRA (the
adapters, plus the scalar heads of `ValueModel` / `RewardModel` in full, PEFT's
`modules_to_save`); everything else stays in `TrainState.frozen`, with no gradient and no
optimizer state.

Enabling LoRA. `add_lora(model, LoRAConfig(...), rngs=...)` replaces, in place, every
`DecoderLayers` of a model (a `Transformer`, or the backbone of a value / reward model) by a
`LoRALayers` holding the same base variables (no copy) and the adapters. The LoRA options are a
static attribute of that module (so of the graphdef), not a `ModelConfig` field: the model's
config, its Hugging Face round trip and every consumer of it are unchanged, a pretrained model is
adapted after `load_pretrained` as it is, and a critic can have adapters of its own or none.

Adapters off (`adapters_disabled(model)`, a context) is the base model exactly: the layers' static
switch makes `stacked()` leave the adapters out, so no adapter op runs. `merged(model)` is the
model with W + s · A B in place of W and the adapters off (the sampler's copy, the merged
export). Dropout is on only in a training step (`rljax.train.step`: `model.train()` and
`nnx.reseed(model, dropout=key)` per microbatch); elsewhere (evaluation, log-prob passes,
sampling) the layers are deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import (
  LAYER_AXES,
  PROJECTIONS,
  DecoderLayers,
  _layer_shapes,
  logical_param,
  scan_layers,
)
from rljax.ops._checks import check_bool, check_choice, check_int, check_number
from rljax.parallel.rules import LORA_RANK

Array = jax.Array

ALL_LINEAR = "all-linear"
# Dimensions of a projection's input that its matmul contracts (the rest are its output's).
CONTRACT = {name: 2 if name == "o_proj" else 1 for name in PROJECTIONS}


def _target_name(name: Any) -> str:
  """"q" / "q_proj" → "q_proj"; anything else a ValueError naming `target_modules`."""
  full = name if isinstance(name, str) and name.endswith("_proj") else f"{name}_proj"
  valid = [p.removesuffix("_proj") for p in PROJECTIONS] + list(PROJECTIONS) + [ALL_LINEAR]
  check_choice("`target_modules` entry", full if full in PROJECTIONS else name, valid)
  return full


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """The options of LoRA adapters (PEFT's `LoraConfig` names in brackets).

  Attributes:
    rank: r >= 1 [r].
    alpha: the scale's numerator, > 0 [lora_alpha].
    dropout: dropout rate in [0, 1) on the adapters' input, in training steps only
      [lora_dropout]; on-policy trainers need 0.
    use_rslora: scale alpha / sqrt(r) instead of alpha / r [use_rslora].
    target_modules: "all-linear" or projection names among q, k, v, o, gate, up, down (PEFT's
      q_proj, ... too) [target_modules]; stored as the full names in layer order.
  """

  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  use_rslora: bool = False
  target_modules: str | tuple[str, ...] = ALL_LINEAR

  def __post_init__(self) -> None:
    check_int("rank", self.rank, 1)
    check_number("alpha", self.alpha, low_open=True)
    check_number("dropout", self.dropout, high=1.0)
    check_bool("use_rslora", self.use_rslora)
    targets = self.target_modules
    if targets == ALL_LINEAR:
      targets = PROJECTIONS
    elif isinstance(targets, str):
      targets = (targets,)
    if not isinstance(targets, (tuple, list)) or not targets:
      raise ValueError(f"`target_modules` must be {ALL_LINEAR!r} or a non-empty list of "
                       f"projection names; got {self.target_modules!r}.")
    names = {_target_name(t) for t in targets}
    object.__setattr__(self, "target_modules", tuple(p for p in PROJECTIONS if p in names))

  @property
  def scale(self) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def replace(self, **changes: Any) -> LoRAConfig:
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Shapes, axes, counts.
# ----------------------------------------------------------------------------------------------


def adapter_shapes(config: ModelConfig, name: str, rank: int
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Stacked shapes ([L, *in, r], [L, r, *out]) of projection `name`'s adapters."""
  shape = _layer_shapes(config)[name]
  k = CONTRACT[name]
  return (config.num_layers, *shape[:k], rank), (config.num_layers, rank, *shape[k:])


def adapter_axes(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Logical axes of projection `name`'s A and B (W's in / out axes around "lora_rank")."""
  axes = LAYER_AXES[name]
  k = CONTRACT[name] + 1  # the layers axis, then the contracted ones
  return (*axes[:k], LORA_RANK), (axes[0], LORA_RANK, *axes[k:])


def lora_param_count(config: ModelConfig, lora: LoRAConfig) -> int:
  """Σ over targets and layers of r · (in + out): the number of adapter parameters."""
  total = 0
  for name in lora.target_modules:
    a, b = adapter_shapes(config, name, lora.rank)
    total += math.prod(a) + math.prod(b)
  return total


# ----------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------


class LoRALayers(DecoderLayers):
  """`DecoderLayers` (the same base variables) with LoRA adapters on `lora.target_modules`.

  Attributes (static): `lora` (the `LoRAConfig`), `enabled` (False: the base model exactly),
  `deterministic` (True outside training steps: no dropout).
  """

  def __init__(self, base: DecoderLayers, lora: LoRAConfig, *, rngs: nnx.Rngs):
    if isinstance(base, LoRALayers):
      raise ValueError("these layers already have LoRA adapters.")
    self.config, self.names = base.config, base.names
    for name in base.names:
      setattr(self, name, getattr(base, name))  # the base's Variables themselves: no copy
    self.lora, self.enabled, self.deterministic = lora, True, True
    key = rngs.params()
    for i, name in enumerate(lora.target_modules):
      a_shape, b_shape = adapter_shapes(self.config, name, lora.rank)
      a_axes, b_axes = adapter_axes(name)
      bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
      a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
      setattr(self, f"{name}_lora_a", logical_param(a, a_axes, nnx.LoRAParam))
      setattr(self, f"{name}_lora_b",
              logical_param(jnp.zeros(b_shape, jnp.float32), b_axes, nnx.LoRAParam))
    if lora.dropout > 0:
      self.dropout_rngs = nnx.Rngs(dropout=rngs.params())

  def adapters(self) -> dict[str, Array]:
    """{"{name}_lora_a": A, "{name}_lora_b": B} of every target (B unscaled)."""
    return {f"{name}_lora_{ab}": getattr(self, f"{name}_lora_{ab}")[...]
            for name in self.lora.target_modules for ab in "ab"}

  def stacked(self) -> dict[str, Array]:
    """The base parameters, plus (when enabled) the adapters with B scaled by s: the inputs of
    `rljax.models.transformer.project`."""
    stacked = super().stacked()
    if self.enabled:
      scale = self.lora.scale
      for name, value in self.adapters().items():
        stacked[name] = value * scale if name.endswith("_b") else value
    return stacked

  def __call__(self, x: Array, cos: Array, sin: Array, attend: Any) -> Array:
    stacked = self.stacked()
    if self.enabled and not self.deterministic and self.lora.dropout > 0:
      n = self.config.num_layers
      stacked["lora_dropout_key"] = jax.random.split(self.dropout_rngs.dropout(), n)
      stacked["lora_dropout_rate"] = jnp.full((n,), self.lora.dropout, jnp.float32)
    return scan_layers(stacked, x, cos, sin, attend, self.config)


def _owners(model: nnx.Module) -> Iterator[tuple[nnx.Module, str, DecoderLayers]]:
  """(parent module, attribute, layers) of every `DecoderLayers` in `model`."""
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Module):
      for attribute, value in list(vars(module).items()):
        if isinstance(value, DecoderLayers):
          yield module, attribute, value


def lora_layers(model: nnx.Module) -> list[LoRALayers]:
  """Every `LoRALayers` of `model` (none when it has no adapters)."""
  return [layers for _, _, layers in _owners(model) if isinstance(layers, LoRALayers)]


def add_lora(model: nnx.Module, lora: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """`model` with LoRA adapters on every `DecoderLayers` (in place; returned for chaining).

  The base variables are kept as they are (same arrays, shardings and dtypes); the adapters are
  float32 (PEFT's default for half-precision bases) and created sharded under a mesh and rules,
  like the base.

  Example:
    >>> policy, tokenizer = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> policy = add_lora(policy, LoRAConfig(rank=16, alpha=32), rngs=nnx.Rngs(0))
    >>> graphdef, state = create_train_state(policy, optimizer, rng=0, trainable=lora_trainable)
  """
  if not isinstance(lora, LoRAConfig):
    raise ValueError(f"`lora` must be a LoRAConfig; got {type(lora).__name__}.")
  owners = list(_owners(model))
  if not owners:
    raise ValueError(f"{type(model).__name__} has no decoder layers to adapt.")
  for parent, attribute, layers in owners:
    setattr(parent, attribute, LoRALayers(layers, lora, rngs=rngs))
  return model


def lora_config_of(model: Any) -> LoRAConfig | None:
  """The `LoRAConfig` of a module or a graphdef (its first adapted layers'); None without."""
  if isinstance(model, nnx.Module):
    layers = lora_layers(model)
    return layers[0].lora if layers else None
  for key, attribute in getattr(model, "attributes", ()):
    value = getattr(attribute, "value", None)
    if key == "lora" and isinstance(value, LoRAConfig):
      return value
  return None


def check_no_dropout(graphdef: Any, what: str) -> None:
  """ValueError when the model of `graphdef` has LoRA dropout > 0 (named for `what`)."""
  lora = lora_config_of(graphdef)
  if lora is not None and lora.dropout > 0:
    raise ValueError(f"{what} needs LoRA dropout 0 (got lora dropout {lora.dropout}): dropout "
                     "would make the policy's log-probs differ from those it sampled with (the "
                     "ratio of one and the recomputed old log-probs).")


def lora_trainable(path: tuple, variable: Any) -> bool:
  """The nnx filter of what trains under LoRA: the adapters, and the value / reward heads."""
  if isinstance(variable, nnx.LoRAParam):
    return True
  return isinstance(variable, nnx.Param) and str(path[-1]) in ("head_weight", "head_bias")


def trainable_filter(model: nnx.Module) -> Any:
  """`lora_trainable` when `model` has LoRA adapters, else `nnx.Param` (everything trains)."""
  return lora_trainable if lora_layers(model) else nnx.Param


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """A context in which `model` is its base model exactly (no adapter op runs)."""
  layers = lora_layers(model)
  states = [m.enabled for m in layers]
  for m in layers:
    m.enabled = False
  try:
    yield model
  finally:
    for m, enabled in zip(layers, states):
      m.enabled = enabled


# ----------------------------------------------------------------------------------------------
# Merging.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("scale",))
def merge_weight(w: Array, a: Array, b: Array, *, scale: float) -> Array:
  """Stacked W [L, *in, *out] + s · A B (A [L, *in, r], B [L, r, *out]), in float32, cast to
  W's dtype."""
  n, r = a.shape[0], a.shape[-1]
  delta = jnp.einsum("lir,lro->lio", a.reshape(n, -1, r).astype(jnp.float32),
                     b.reshape(n, r, -1).astype(jnp.float32))
  return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def merged(model: nnx.Module) -> nnx.Module:
  """A model whose target projections are W + s · A B, adapters off (a new module; only the
  merged projections are new arrays, every other one is shared with `model`). Without adapters,
  `model` itself. A quantised W (`rljax.models.quant`) is dequantised first: the merged
  projections are full precision (the merged export of a QLoRA model)."""
  if not lora_layers(model):
    return model
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables, same arrays
  for layers in lora_layers(out):
    for name in layers.lora.target_modules:
      w = getattr(layers, name)
      setattr(layers, name, w.replace(merge_weight(
        w[...], getattr(layers, f"{name}_lora_a")[...], getattr(layers, f"{name}_lora_b")[...],
        scale=layers.lora.scale)))
    for name in layers.names:  # quantised projections without adapters: dequantised too
      w = getattr(layers, name)
      if hasattr(w.get_value(), "codes"):
        setattr(layers, name, w.replace(w[...].astype(w[...].dtype)))
    layers.enabled = False
  return out


__all__ = [
  "ALL_LINEAR",
  "LoRAConfig",
  "LoRALayers",
  "adapter_axes",
  "adapter_shapes",
  "adapters_disabled",
  "add_lora",
  "check_no_dropout",
  "lora_config_of",
  "lora_layers",
  "lora_param_count",
  "lora_trainable",
  "merge_weight",
  "merged",
  "trainable_filter",
]
