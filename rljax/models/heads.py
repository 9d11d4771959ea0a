"""Scalar heads on the transformer backbone: `ValueModel` (critic) and `RewardModel`.

Both are the decoder backbone (embedding, scanned layers, final RMSNorm) followed by a linear map
D → 1 applied to the final hidden states, computed in float32:

  value[b, t]  = h[b, t] · w + c                       ValueModel, [B, T]
  reward[b]    = h[b, last(b)] · w + c                 RewardModel, [B]

where `last(b)` is the last position with `attention_mask[b] == 1` (right padding, left
padding, or both). On packed rows (`segment_ids`, `rljax.data.packing`) the reward model returns
one reward per sequence, [N], read at the last valid token of each segment. The head is `w` [D] (logical axis "embed") and `c` [] (no axes).

The backbone is built without an unembedding (a scalar head never needs the [V, D] `lm_head`:
for an untied 7B model that is ~0.5B parameters of optimizer state saved); it is a
`Transformer` whose config has `tie_word_embeddings=True`, used only through `hidden_states`.
`config` on the head module is the caller's (policy) config unchanged.

Initialisation: `w ~ N(0, head_std²)` with `head_std = 1 / sqrt(D + 1)` by default (OpenAI's
lm-human-preferences reward head and OpenRLHF's critic), `c = 0`. `head_std=0.0` gives a zero
head (all values/rewards 0 at the start; note the backbone then gets no gradient until `w`
moves). `from_policy` copies the backbone weights of a policy (e.g. an SFT checkpoint from
`load_pretrained`) exactly, with their shardings.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.quant import QuantizedArray, QuantizedParam
from rljax.models.transformer import Transformer, logical_param
from rljax.ops._checks import check_int
from rljax.ops.segments import segment_ends, segment_sum

Array = jax.Array

HEAD_WEIGHT_AXES = ("embed",)
HEAD_BIAS_AXES: tuple[str, ...] = ()


def _backbone_config(config: ModelConfig) -> ModelConfig:
  """The policy config without an unembedding (see the module docstring)."""
  return config.replace(tie_word_embeddings=True)


def _copy_backbone(policy: Transformer) -> Transformer:
  """A backbone whose embedding, layers and final norm are copies of `policy`'s (no random init).

  The module is built abstractly (`nnx.eval_shape`) and filled with a copy of each policy
  parameter (`jax.device_put(..., may_alias=False)`: same dtype and sharding, new buffers, no
  compilation), so donating one model's buffers in a train step never invalidates the other's.
  A quantised policy weight (QLoRA, `rljax.models.quant`) is copied dequantised.
  """
  config = _backbone_config(policy.config)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  source = dict(nnx.to_flat_state(nnx.state(policy, (nnx.Param, QuantizedParam))))
  for path, var in nnx.to_flat_state(state):
    value = source[path].get_value()
    if isinstance(value, QuantizedArray):
      value = value.astype(value.dtype)
    sharding = getattr(value, "sharding", None)  # host (numpy) parameters go to the default device
    var.set_value(jax.device_put(value, sharding, may_alias=False))
  return nnx.merge(graphdef, state)


class _ScalarHeadModel(nnx.Module):
  """Backbone + linear D → 1 head (shared by `ValueModel` and `RewardModel`)."""

  def __init__(
    self,
    config: ModelConfig,
    *,
    rngs: nnx.Rngs,
    head_std: float | None = None,
    backbone: Transformer | None = None,
  ):
    self.config = config
    self.backbone = (
      Transformer(_backbone_config(config), rngs=rngs) if backbone is None else backbone
    )
    std = 1.0 / math.sqrt(config.hidden_size + 1) if head_std is None else float(head_std)
    if std < 0:
      raise ValueError(f"head_std must be >= 0, got {head_std}")
    weight = std * jax.random.normal(rngs.params(), (config.hidden_size,), jnp.float32)
    self.head_weight = logical_param(weight.astype(config.param_dtype), HEAD_WEIGHT_AXES)
    self.head_bias = logical_param(jnp.zeros((), config.param_dtype), HEAD_BIAS_AXES)

  @classmethod
  def from_policy(
    cls, policy: Transformer, *, rngs: nnx.Rngs, head_std: float | None = None
  ) -> Any:
    """A head model whose backbone is a copy of `policy`'s (its lm_head is not copied).

    Args:
      policy: a `Transformer` (e.g. from `load_pretrained` of an SFT checkpoint).
      rngs: key source for the head's initial weight.
      head_std: std of the head weight; default 1 / sqrt(D + 1), 0.0 for a zero head.
    """
    return cls(policy.config, rngs=rngs, head_std=head_std, backbone=_copy_backbone(policy))

  def _head(self, hidden: Array) -> Array:
    """[..., D] hidden states → [...] float32 scalars h · w + c."""
    w = self.head_weight[...].astype(jnp.float32)
    return hidden.astype(jnp.float32) @ w + self.head_bias[...].astype(jnp.float32)


class ValueModel(_ScalarHeadModel):
  """Per-token value estimates V(s_t) [B, T]: a scalar head on every hidden state.

  `values[b, t]` is the value of the state after reading tokens[b, :t+1] (the convention of
  TRL / OpenRLHF critics); align it with your rewards before `rljax.gae`.

  Example:
    >>> critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(0))
    >>> values = critic(tokens, attention_mask)           # [B, T] float32
  """

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
  ) -> Array:
    """Values [B, T] (float32); arguments as `Transformer.hidden_states`."""
    return self._head(
      self.backbone.hidden_states(input_ids, attention_mask, positions, segment_ids)
    )


def last_valid_index(attention_mask: Array) -> Array:
  """[B] index of the last position with mask 1 in each row (any padding side).

  A row with no valid token gets T - 1 (a finite, documented answer: the last position).
  """
  mask = attention_mask.astype(bool)
  t = mask.shape[-1]
  return (t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


class RewardModel(_ScalarHeadModel):
  """Sequence rewards [B]: the scalar head read at the last valid token of each row.

  Works with right padding (responses), left padding (prompts) or both: the reward is read at
  `last_valid_index(attention_mask)`, as TRL's / OpenRLHF's reward models read the last
  non-pad token. A row with an all-zero mask reads the last position (finite).

  Example:
    >>> rm = RewardModel.from_policy(sft_model, rngs=nnx.Rngs(0))
    >>> rewards = rm(tokens, attention_mask)              # [B] float32
  """

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    *,
    num_segments: int | None = None,
  ) -> Array:
    """Rewards [B] (float32); arguments as `Transformer.hidden_states` (mask default all ones).

    With `segment_ids` (packed rows) the rewards are [num_segments]: sequence n's reward is
    the head at its segment's last valid token (`segment_ends`); a sequence with no token in
    these rows gets 0. `num_segments` (N, static) is then required.
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if segment_ids is not None:
      check_int("num_segments", num_segments, 1)
    hidden = self.backbone.hidden_states(input_ids, attention_mask, positions, segment_ids)
    if segment_ids is not None:
      ends = segment_ends(segment_ids, attention_mask)
      return segment_sum(self._head(hidden), segment_ids, num_segments, mask=ends)
    last = last_valid_index(attention_mask)
    return self._head(hidden[jnp.arange(hidden.shape[0]), last])


__all__ = ["RewardModel", "ValueModel", "last_valid_index"]
