"""The experience batch: what an on-policy update trains on (`Experience`), and its minibatches.

A row is `tokens = [prompt (P, left-padded) | completion (N)]`. The attention mask covers the
whole row; the loss mask covers the completion positions and marks the tokens the policy is
trained on. They differ once observation tokens (tool output, an environment's reply) sit inside
a completion: those are attended to but not trained on. Every array is batch-major, so any
subset of rows (`take_rows`) is again an `Experience`.

`Experience` is also the public input of `trainer.update(state, batch)`: bring your own rollouts
and advantages by filling its fields (see `rljax.train.onpolicy`).

Packed experience (`pack_experience`). The B sequences of a batch (each row's real tokens, one
contiguous run: the prompt's left padding and the completion's right padding dropped) are laid
end to end into R <= B rows of the same length by first-fit decreasing, so the forward passes
and the update stop computing padding. A packed batch is an `Experience` with P = 1: its
per-token arrays are [R, L − 1], aligned to the packed columns 1..L−1 (column j predicted from
j − 1, as a completion column is), `segment_ids` [R, L] holds each token's sequence index
(B on padding), `positions` restart at 0 per sequence, and `num_sequences` = B (static). The
loss mask is 0 on every prompt token, so no sequence is trained on a prediction from the one
before it; every per-sequence quantity (the seq-mean aggregations, GSPO's ratio, the exact
normalizers) is taken by segment.
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
    segment_ids: [B, P+N] int32 sequence index of each token of a packed batch
      (`pack_experience`; ids outside [0, num_sequences) are padding); None is one sequence per
      row.
    rewards: [B, N] float32 per-token rewards (PPO's KL-shaped rewards; None otherwise).
    scores: [B] float32 sequence rewards (after any overlong penalty).
    values: [B, N] critic values at sampling time (PPO).
    returns: [B, N] value targets (PPO).
    num_sequences: the number of sequences of a packed batch (static); None when unpacked.
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
  num_sequences: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def prompt_length(self) -> int:
    """P, the static number of prompt columns."""
    return self.tokens.shape[1] - self.loss_mask.shape[1]

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def segments(self) -> dict[str, Any]:
    """{"segment_ids", "num_segments"} of the loss columns of a packed batch (the keywords of
    `aggregate`, the policy losses and `agg_count`); {} when unpacked."""
    if self.segment_ids is None:
      return {}
    return {"segment_ids": self.segment_ids[:, self.prompt_length:],
            "num_segments": self.num_sequences}


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
  if (batch.segment_ids is None) != (batch.num_sequences is None):
    raise ValueError("a packed `Experience` has both `segment_ids` and `num_sequences` "
                     "(`pack_experience`); got only one.")
  if batch.segment_ids is not None and batch.scores is not None:
    raise ValueError("a packed `Experience` carries no per-row `scores` (its rows are not "
                     "sequences); pack after the advantages are computed.")


def experience_from_rollout(scored: Any) -> Experience:
  """The `Experience` fields a scored rollout (`rljax.train.scoring.Scored`) determines: tokens,
  masks (the loss mask: the completion's tokens the policy sampled), the sampler's log-probs
  and the scores (device arrays)."""
  r = scored.rollout
  completion = jnp.asarray(r.completion_mask, bool)
  policy = getattr(scored, "policy_mask", None)
  return Experience(
    tokens=jnp.asarray(r.tokens, jnp.int32),
    attention_mask=jnp.concatenate([jnp.asarray(r.prompt_mask, bool), completion], axis=1),
    loss_mask=completion if policy is None else completion & jnp.asarray(policy, bool),
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


def _row_buckets(rows: int, multiple: int) -> list[int]:
  """Row counts a packed batch of `rows` sequences may take: multiple × (1, 2, 3, 4, 6, 8, 12,
  ...) below `rows`, then `rows` itself (always enough: one sequence per row)."""
  sizes, k = set(), 1
  while k * multiple < rows:
    sizes.update((k, k + k // 2))  # 1, 2, 3, 4, 6, 8, 12, ...
    k *= 2
  return sorted(s * multiple for s in sizes if s * multiple < rows) + [rows]


def pack_experience(batch: Experience, *, row_multiple: int = 1) -> Experience:
  """`batch`'s sequences packed end to end into fewer rows of the same length (module doc).

  Each row's real tokens must be one contiguous run (left-padded prompt, right-padded
  completion: every rollout). The rows are placed by first-fit decreasing
  (`rljax.data.packing.first_fit_decreasing`) into the fewest rows that hold them, rounded up
  to a bucket (`_row_buckets`: 1, 2, 3, 4, 6, 8, 12, ... times `row_multiple`, so a trainer
  compiles its update for a few row counts, each divisible by its data-parallel devices and
  microbatches, and wastes at most a third of a bucket) and at most B. The
  per-token arrays move with their tokens; `scores` stay behind (sequence-level).

  Raises:
    ValueError: a row's mask is not one contiguous run, or `batch` is already packed.
  """
  from rljax.data.packing import first_fit_decreasing

  if batch.segment_ids is not None:
    raise ValueError("`batch` is already packed.")
  b, t = batch.tokens.shape
  p, n = batch.prompt_length, batch.loss_mask.shape[1]
  mask = np.asarray(jax.device_get(batch.attention_mask), bool)
  lengths = mask.sum(axis=1)
  starts = mask.argmax(axis=1)
  runs = np.arange(t)[None, :] - starts[:, None]
  if not np.array_equal(mask, (runs >= 0) & (runs < lengths[:, None])):
    raise ValueError("pack_experience needs each row's attention_mask to be one contiguous run "
                     "of real tokens (left / right padding only).")
  for num_rows in _row_buckets(b, row_multiple):
    rows, rest = first_fit_decreasing(lengths.tolist(), row_length=t, num_rows=num_rows)
    if not rest:
      break
  # src[r, j]: the flat index b·t + column of the token in packed slot (r, j); -1 on padding.
  src = np.full((num_rows, t), -1, np.int64)
  segment_ids = np.full((num_rows, t), b, np.int32)
  positions = np.zeros((num_rows, t), np.int32)
  for r, members in enumerate(rows):
    j = 0
    for i in members:
      length = int(lengths[i])
      src[r, j : j + length] = i * t + starts[i] + np.arange(length)
      segment_ids[r, j : j + length] = i
      positions[r, j : j + length] = np.arange(length)
      j += length
  # Loss columns: packed column j >= 1 carries the completion value of its token, when that
  # token is a completion token (column >= P) of the same sequence as column j - 1.
  column = src % t
  completion = (src >= 0) & (column >= p)
  completion[:, 0] = False
  completion[:, 1:] &= segment_ids[:, 1:] == segment_ids[:, :-1]
  loss_src = np.where(completion, (src // t) * n + column - p, -1)[:, 1:]

  def gather(x, index, fill):
    flat = jnp.reshape(x, (-1,))
    out = jnp.take(flat, jnp.asarray(np.maximum(index, 0)), axis=0)
    return jnp.where(jnp.asarray(index >= 0), out, jnp.asarray(fill, out.dtype))

  token_fields = ("loss_mask", "advantages", "old_logp", "ref_logp", "rollout_logp", "rewards",
                  "values", "returns")
  moved = {name: None if getattr(batch, name) is None else
           gather(getattr(batch, name), loss_src, False if name == "loss_mask" else 0)
           for name in token_fields}
  return Experience(
    tokens=gather(batch.tokens, src, 0),
    attention_mask=jnp.asarray(src >= 0),
    positions=jnp.asarray(positions),
    segment_ids=jnp.asarray(segment_ids),
    num_sequences=b,
    **moved,
  )
