"""Optimizer construction over optax: global-norm clipping → AdamW with a warmup schedule.

The optimizer of every rljax step is

    clip_by_global_norm(max_grad_norm) → AdamW(lr = schedule(count), b1, b2, eps,
                                               weight_decay, mask = decay_mask)

with the learning rate injected as a hyperparameter (`optax.inject_hyperparams`), so the value
used by the latest update is readable from the optimizer state (`current_learning_rate`) and
reported by the train step.

Weight decay is applied to matrices only: a parameter whose path contains a name with "norm" or
"bias" in it (RMSNorm / LayerNorm scales, q/k norms, projection biases) is not decayed. The mask
is decided from parameter *paths*, not ranks: the scanned transformer stacks its layer norms into
`[layers, D]` arrays, so "ndim < 2" would wrongly decay them. This is the convention of
Hugging Face `Trainer` (`get_decay_parameter_names`: no decay on biases and LayerNorm weights)
and nanoGPT / MaxText (decay only the matrices of the model).

Which parameters are optimised at all is a separate choice, the `trainable` filter of
`rljax.train.state.create_train_state`: the optimizer only ever sees the trainable parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rljax.ops._checks import check_choice, check_int, check_number

SCHEDULES = ("constant", "linear", "cosine")
NO_DECAY_NAMES = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Hyper-parameters of the AdamW optimizer and its learning-rate schedule.

  Attributes:
    learning_rate: peak learning rate (> 0).
    warmup_steps: linear warmup from 0 to `learning_rate` over this many updates (default 0).
    schedule: "constant", "linear" (decay to `min_lr_ratio * learning_rate` at `total_steps`) or
      "cosine" (half-cosine decay to the same floor); default "constant".
    total_steps: number of updates of the run; required by "linear" and "cosine".
    min_lr_ratio: final learning rate as a fraction of the peak (default 0.0, as Hugging Face's
      `get_cosine_schedule_with_warmup`; 0.1 is the LLaMA papers' choice).
    weight_decay: decoupled weight decay of AdamW (default 0.0, Hugging Face `TrainingArguments`).
    b1, b2, eps: Adam's moment decay rates, in [0, 1), and epsilon (>= 0); defaults 0.9, 0.999,
      1e-8 (PyTorch / optax / Hugging Face; LLaMA and most LLM pre-training use b2 = 0.95).
    max_grad_norm: clip gradients to this global L2 norm before Adam (default 1.0, Hugging Face
      `TrainingArguments`); None disables clipping.
    no_decay_names: a parameter whose path has a component containing one of these substrings
      (case-insensitive) gets no weight decay; default ("norm", "bias").
  """

  learning_rate: float
  warmup_steps: int = 0
  schedule: str = "constant"
  total_steps: int | None = None
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  no_decay_names: tuple[str, ...] = NO_DECAY_NAMES

  def __post_init__(self) -> None:
    check_choice("`schedule`", self.schedule, SCHEDULES)
    check_number("learning_rate", self.learning_rate, low_open=True)
    check_int("warmup_steps", self.warmup_steps, 0)
    check_int("total_steps", self.total_steps, 1, optional=True)
    if self.schedule != "constant":
      if self.total_steps is None:
        raise ValueError(f"`total_steps` is required by schedule {self.schedule!r}.")
      if self.total_steps <= self.warmup_steps:
        raise ValueError(
          f"`total_steps` ({self.total_steps}) must exceed `warmup_steps` ({self.warmup_steps})."
        )
    check_number("min_lr_ratio", self.min_lr_ratio, high=1.0, high_open=False)
    check_number("weight_decay", self.weight_decay)
    for name in ("b1", "b2"):
      check_number(name, getattr(self, name), high=1.0)
    check_number("eps", self.eps)
    check_number("max_grad_norm", self.max_grad_norm, low_open=True, optional=True)
    if isinstance(self.no_decay_names, str) or not all(
        isinstance(n, str) for n in self.no_decay_names):
      raise ValueError(f"`no_decay_names` must be a tuple of strings; got "
                       f"{self.no_decay_names!r}.")


def make_schedule(config: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the update count n (0 for the first update).

  With peak η, warmup W, total N, floor r = min_lr_ratio and p = (n − W) / (N − W) clipped to
  [0, 1]:
    n < W        η · n / W                         (so the first update has lr 0 when W > 0,
                                                    as Hugging Face and optax's warmup schedules)
    constant     η
    linear       η · (r + (1 − r) · (1 − p))
    cosine       η · (r + (1 − r) · ½ (1 + cos(π p)))
  After N updates "linear" and "cosine" stay at η · r.

  Example:
    >>> lr = make_schedule(OptimizerConfig(3e-4, warmup_steps=10, schedule="cosine",
    ...                                    total_steps=100))
    >>> float(lr(10))   # 3e-4
  """
  peak, warmup, floor = config.learning_rate, config.warmup_steps, config.min_lr_ratio
  kind, total = config.schedule, config.total_steps

  def schedule(count: jax.Array) -> jax.Array:
    n = jnp.asarray(count, jnp.float32)
    if kind == "constant":
      decayed = jnp.ones_like(n)
    else:
      progress = jnp.clip((n - warmup) / (total - warmup), 0.0, 1.0)
      if kind == "linear":
        shape = 1.0 - progress
      else:
        shape = 0.5 * (1.0 + jnp.cos(math.pi * progress))
      decayed = floor + (1.0 - floor) * shape
    if warmup > 0:
      decayed = jnp.where(n < warmup, n / warmup, decayed)
    return peak * decayed

  return schedule


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names along a pytree key path (dict keys, attribute names, indices), without the
  trailing `.value` of an `nnx.Variable`."""
  names = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    names.append(str(name))
  if names and names[-1] == "value":
    names = names[:-1]
  return tuple(names)


def decay_mask(params: Any, no_decay_names: Sequence[str] = NO_DECAY_NAMES) -> Any:
  """Boolean tree like `params`: True where weight decay applies.

  A leaf is excluded (False) when any component of its path contains one of `no_decay_names`
  (case-insensitive substring), e.g. "final_norm", "layers/attn_norm", "layers/q_bias".
  """
  lowered = tuple(n.lower() for n in no_decay_names)

  def decays(path, _):
    return not any(word in name.lower() for name in path_names(path) for word in lowered)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(max_grad_norm) → AdamW(schedule, weight decay masked by path).

  The AdamW part is wrapped in `optax.inject_hyperparams`, so the optimizer state records the
  learning rate of the latest update (see `current_learning_rate`).

  Example:
    >>> optimizer = make_optimizer(OptimizerConfig(1e-4, warmup_steps=100, schedule="cosine",
    ...                                            total_steps=10_000, weight_decay=0.1))
    >>> opt_state = optimizer.init(params)
  """
  schedule = make_schedule(config)
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype", "nesterov"))(
    learning_rate=schedule,
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
    weight_decay=config.weight_decay,
    mask=lambda params: decay_mask(params, config.no_decay_names),
  )
  if config.max_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def current_learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate recorded by `inject_hyperparams` in `opt_state` (the one used by the
  latest update; the schedule's first value before any), or None if the optimizer has none."""
  kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
    if isinstance(node, kinds) and "learning_rate" in node.hyperparams:
      return node.hyperparams["learning_rate"]
  return None
