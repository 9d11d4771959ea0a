"""Reward-model scoring as a reward function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.data.batching import bucket_length, pad_left, pad_right
from rljax.data.tokenize import encode_prompt, encode_response
from rljax.rewards.base import batch_size


def _leading_pad_mask(prompt_tokens: np.ndarray, pad_id: int) -> np.ndarray:
  """Mask of a left-padded prompt: False on the leading run of pad_id, True from the first other
  id on (robust when pad_id = EOS appears inside the prompt, e.g. after each chat turn)."""
  return np.cumsum(prompt_tokens != pad_id, axis=1) > 0


def _completion_mask(completion_tokens: np.ndarray, completion_mask: Any,
                     completion_lengths: Any) -> np.ndarray:
  if completion_mask is not None:
    return np.asarray(completion_mask, bool)
  if completion_lengths is None:
    raise ValueError(
      "`reward_model_reward` needs `completion_mask=` or `completion_lengths=` with "
      "`completion_tokens=`."
    )
  lengths = np.asarray(completion_lengths)
  return np.arange(completion_tokens.shape[1])[None, :] < lengths[:, None]


def _check_2d(name: str, x: np.ndarray, b: int) -> None:
  if x.ndim != 2 or x.shape[0] != b:
    raise ValueError(f"`{name}` must have shape [{b}, ?]; got {x.shape}.")


def reward_model_reward(
  reward_model: Any,
  tokenizer: Any = None,
  *,
  pad_id: int | None = None,
  chat: bool | None = None,
  add_eos: bool = True,
  buckets: Sequence[int] | None = None,
):
  """A reward function returning the scalar score of a `RewardModel` for each completion.

    r_b = RM(prompt_b ⊕ completion_b)   read at the last valid token (the EOS of a finished
                                        completion, as in reward-model training)

  Token path (the rljax trainers): when the fields `prompt_tokens` [B, P] (left-padded) and
  `completion_tokens` [B, N] are given, the model scores exactly those ids — no re-tokenization.
  The masks come from `prompt_mask` [B, P] (or, if absent, everything after the leading run of
  `pad_id`) and `completion_mask` [B, N] (or `t < completion_lengths`). Shapes are the
  trainer's static shapes, so the jitted scorer compiles once.

  Text path (no token fields): each prompt is encoded with `encode_prompt(tokenizer, p,
  chat=chat)` and each completion with `encode_response(tokenizer, c, add_eos=add_eos)`
  separately (as `rljax.data` tokenizes reward-model training data), left-/right-padded to
  `bucket_length` of `buckets` (default: the batch's own longest lengths).

  Args:
    reward_model: a `rljax.models.heads.RewardModel` (or its `(graphdef, state)` from
      `nnx.split`); it is split once and its forward pass is `jax.jit`-ed.
    tokenizer: needed for the text path only.
    pad_id: the padding id written into padded slots (masked anyway); default the tokenizer's
      pad_token_id, else 0.
    chat, add_eos: text path only, as in `rljax.data.tokenize`.
    buckets: text path only, the allowed padded lengths of the prompt and completion parts.

  Returns:
    `fn(prompts, completions, **fields) -> float32 [B]`.

  Raises:
    ValueError: missing masks / tokenizer, or token fields whose leading dimension is not B.

  Example:
    >>> rm_reward = reward_model_reward(reward_model, tokenizer)
    >>> rm_reward(prompts, completions, prompt_tokens=pt, prompt_mask=pm,
    ...           completion_tokens=ct, completion_mask=cm)
  """
  if isinstance(reward_model, tuple):
    graphdef, state = reward_model
  else:
    graphdef, state = nnx.split(reward_model)
  if pad_id is None:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)

  @jax.jit
  def score(state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask).astype(jnp.float32)

  def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = score(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return np.asarray(jax.device_get(out), np.float32)

  def from_tokens(b, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                  completion_lengths):
    pt, ct = np.asarray(prompt_tokens), np.asarray(completion_tokens)
    _check_2d("prompt_tokens", pt, b)
    _check_2d("completion_tokens", ct, b)
    pm = _leading_pad_mask(pt, pad_id) if prompt_mask is None else np.asarray(prompt_mask, bool)
    cm = _completion_mask(ct, completion_mask, completion_lengths)
    if pm.shape != pt.shape:
      raise ValueError(f"`prompt_mask` has shape {pm.shape} but `prompt_tokens` has {pt.shape}.")
    if cm.shape != ct.shape:
      raise ValueError(
        f"`completion_mask` has shape {cm.shape} but `completion_tokens` has {ct.shape}."
      )
    return run(np.concatenate([pt, ct], 1), np.concatenate([pm, cm], 1))

  def from_text(prompts, completions):
    if tokenizer is None:
      raise ValueError(
        "`reward_model_reward` got no `prompt_tokens`/`completion_tokens` fields and has no "
        "`tokenizer` to encode the text."
      )
    if prompts is None:
      raise ValueError("`prompts` is None; the text path needs the prompt strings.")
    p_ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    c_ids = [encode_response(tokenizer, c, add_eos=add_eos) for c in completions]
    p_len = bucket_length(max(map(len, p_ids)), buckets)
    c_len = bucket_length(max(map(len, c_ids)), buckets)
    ids = np.concatenate([pad_left(p_ids, p_len, pad_id), pad_right(c_ids, c_len, pad_id)], 1)
    mask = np.concatenate([pad_left([[1] * len(p) for p in p_ids], p_len, 0),
                           pad_right([[1] * len(c) for c in c_ids], c_len, 0)], 1)
    return run(ids, mask)

  def reward(
    prompts: Sequence[str] | None,
    completions: Sequence[str],
    *,
    prompt_tokens: Any = None,
    prompt_mask: Any = None,
    completion_tokens: Any = None,
    completion_mask: Any = None,
    completion_lengths: Any = None,
    **fields: Any,
  ) -> np.ndarray:
    b = batch_size(prompts, completions, completion_lengths=completion_lengths)
    if b == 0:
      return np.zeros((0,), np.float32)
    if (prompt_tokens is None) != (completion_tokens is None):
      raise ValueError("pass both `prompt_tokens` and `completion_tokens`, or neither.")
    if completion_tokens is not None:
      return from_tokens(b, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                         completion_lengths)
    return from_text(prompts, completions)

  reward.__name__ = "reward_model_reward"
  return reward
