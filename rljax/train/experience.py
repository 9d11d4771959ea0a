"""The experience batch: what an on-policy update trains on (`Experience`), and its minibatches.

A row is `tokens = [prompt (P, left-padded) | completion (N)]`. The attention mask covers the
whole row; the loss mask covers the completion positions and marks the tokens the policy is
trained on. They differ once observation tokens (tool output, an environment's reply) sit inside
a completion: those are attended to but not trained on. Every array is batch-major, so any
subset of rows (`take_rows`) is again an `Experience`.

`Experience` is also the public input of `trainer.update(state, batch)`: bring your own rollouts
and advantages by filling its fields (see `rljax.train.onpolicy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Experience(flax.struct.PyTreeNode):
  """One batch of on-policy experience (a pytree; B rows, P prompt and N completion positions).

  Attributes:
    tokens: [B, P+N] int32, prompt then completion ids (pad after the stop token).
    attention_mask: [B, P+N] bool, the tokens that are attended to (prompt and completion).
    loss_mask: [B, N] bool, the completion tokens the policy is trained on (stop token
      included; observation tokens of a multi-turn trajectory excluded).
    advantages: [B, N] float32 token advantages (no gradient; 0 outside the loss mask).
    old_logp: [B, N] log-probs at the sampling parameters (the PPO ratio's denominator);
      None when the update is the only pass over the batch at unchanged parameters: it is then
      `stop_gradient(logp)` inside the update (ratio exactly 1, no separate forward pass).
    ref_logp: [B, N] log-probs under the reference policy; None without a KL term.
    rollout_logp: [B, N] log-probs the sampler recorded (truncated importance sampling).
    positions: [B, P+N] int32 position ids; None derives them from `attention_mask`.
    segment_ids: [B, P+N] int32 ids of packed sequences; None is one sequence per row (the
      Transformer does not consume packed rows yet, so a value is rejected by the forward).
    rewards: [B, N] float32 per-token rewards (PPO's KL-shaped rewards; None otherwise).
    scores: [B] float32 sequence rewards (after any overlong penalty).
    values: [B, N] critic values at sampling time (PPO).
    returns: [B, N] value targets (PPO).
  """

  tokens: Array
  attention_mask: Array
  loss_mask: Array
  advantages: Array | None = None
  old_logp: Array | None = None
  ref_logp: Array | None = None
  rollout_logp: Array | None = None
  positions: Array | None = None
  segment_ids: Array | None = None
  rewards: Array | None = None
  scores: Array | None = None
  values: Array | None = None
  returns: Array | None = None

  @property
  def prompt_length(self) -> int:
    """P, the static number of prompt columns."""
    return self.tokens.shape[1] - self.loss_mask.shape[1]

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def check_experience(batch: Any, *, required: Sequence[str] = ("advantages",)) -> None:
  """ValueError naming the field unless `batch` is an `Experience` with consistent shapes and
  the `required` fields present (trace time, before any compute)."""
  if not isinstance(batch, Experience):
    raise ValueError(f"`batch` must be an `rljax.train.Experience`; got {type(batch).__name__}.")
  if batch.tokens.ndim != 2 or not jnp.issubdtype(batch.tokens.dtype, jnp.integer):
    raise ValueError(f"`batch.tokens` must be [B, P+N] integer ids; got shape "
                     f"{batch.tokens.shape} dtype {batch.tokens.dtype}.")
  b, t = batch.tokens.shape
  if batch.loss_mask.ndim != 2 or batch.loss_mask.shape[0] != b or \
      not 0 < batch.loss_mask.shape[1] < t:
    raise ValueError(f"`batch.loss_mask` must be [B, N] with 0 < N < P+N = {t} and B = {b}; "
                     f"got {batch.loss_mask.shape}.")
  shapes = {"attention_mask": (b, t), "positions": (b, t), "segment_ids": (b, t),
            "scores": (b,)}
  for name in ("advantages", "old_logp", "ref_logp", "rollout_logp", "rewards", "values",
               "returns"):
    shapes[name] = batch.loss_mask.shape
  for name, shape in shapes.items():
    value = getattr(batch, name)
    if value is None:
      if name in required:
        raise ValueError(f"`batch.{name}` is required by this update; got None.")
      continue
    if tuple(value.shape) != shape:
      raise ValueError(f"`batch.{name}` must have shape {shape}; got {tuple(value.shape)}.")
  if batch.segment_ids is not None:
    raise ValueError("`batch.segment_ids` (packed sequences) is not supported by the "
                     "Transformer yet; give one sequence per row (segment_ids=None).")


def experience_from_rollout(scored: Any) -> Experience:
  """The `Experience` fields a scored rollout (`rljax.train.scoring.Scored`) determines: tokens,
  masks, the sampler's log-probs and the scores (device arrays)."""
  r = scored.rollout
  return Experience(
    tokens=jnp.asarray(r.tokens, jnp.int32),
    attention_mask=jnp.concatenate(
      [jnp.asarray(r.prompt_mask, bool), jnp.asarray(r.completion_mask, bool)], axis=1),
    loss_mask=jnp.asarray(r.completion_mask, bool),
    rollout_logp=jnp.asarray(r.logprobs, jnp.float32),
    scores=jnp.asarray(scored.scores, jnp.float32),
  )


def minibatch_indices(batch: int, num_minibatches: int, rng: np.random.Generator) -> list:
  """A random permutation of the rows split into `num_minibatches` equal, sorted index arrays."""
  if batch % num_minibatches:
    raise ValueError(
      f"the batch of {batch} rows is not divisible by `num_minibatches` ({num_minibatches})."
    )
  return [np.sort(rows) for rows in np.split(rng.permutation(batch), num_minibatches)]


def take_rows(tree: Any, rows: np.ndarray) -> Any:
  """The rows `rows` of every [B, ...] leaf of `tree`."""
  idx = jnp.asarray(rows)
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def mean_metrics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Means over updates of each metric (device scalars fetched once)."""
  fetched = jax.device_get(list(history))
  keys = fetched[0].keys() if fetched else ()
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in fetched])) for k in keys}
