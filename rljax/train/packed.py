"""The packed path of the supervised objectives: per-sequence statistics read by segment.

A packed batch (`rljax.data.packing` builds them; the format is documented there) holds rows
[R, T] with several sequences each, `segment_ids` [R, T] (the sequence index n ∈ [0, N) of every
token in the batch's unpacked order, N for padding), `positions` [R, T] (restarting at 0 in
each segment) and `sequence_mask` [N] (1 for a real sequence slot). Its presence of
"segment_ids" selects the packed path of every objective of `rljax.train`:

  * next-token log-probs run on the rows with the segment ids and positions (attention never
    crosses a segment), and the loss mask drops each segment's first token
    (`same_segment_as_previous`): it is never predicted from the sequence before it, as position
    0 of an unpacked row is never predicted;
  * per-sequence sums and counts are [N] arrays by `rljax.ops.segments.segment_sum`, in the
    unpacked order (pairs: chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}, N = 2P), so
    DPO pairs, margins and sequence-level losses read them exactly as they read the unpacked
    [B] arrays;
  * a sequence is *present* in a batch (or in a microbatch: `split_microbatches` splits the
    rows and gives every microbatch the per-sequence arrays whole) when its slot is real and
    it has a token in those rows. Pair and example losses are the mean of their per-example
    terms over the present examples (`example_mean`), with count = the number present, so
    `rescale_to_normalizer` with the global count (`pair_count` etc. of the full batch) stays
    exact: Σ_microbatches Σ_present ℓ / N_global = the full-batch mean. The packers keep each
    record's sequences in one row, so a pair is never split across microbatches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rljax.ops._checks import where_valid
from rljax.ops.masking import masked_mean
from rljax.ops.segments import same_segment_as_previous, segment_sum

SEGMENT_IDS = "segment_ids"
POSITIONS = "positions"
SEQUENCE_MASK = "sequence_mask"
PACKED_KEYS = ("input_ids", "attention_mask", "loss_mask", POSITIONS, SEGMENT_IDS, SEQUENCE_MASK)


def is_packed(batch: Any) -> bool:
  """True for a packed batch: a mapping with "segment_ids"."""
  return isinstance(batch, Mapping) and SEGMENT_IDS in batch


def check_packed(batch: Mapping, what: str) -> None:
  """ValueError naming the missing packed keys, or a bad `sequence_mask` / `segment_ids`."""
  missing = [k for k in PACKED_KEYS if k not in batch]
  if missing:
    raise ValueError(f"{what} on a packed batch needs keys {missing}; it has {sorted(batch)}.")
  ids = batch[SEGMENT_IDS]
  if jnp.ndim(ids) != 2 or jnp.ndim(batch[SEQUENCE_MASK]) != 1:
    raise ValueError(f"a packed batch has `segment_ids` [R, T] and `sequence_mask` [N]; got "
                     f"shapes {jnp.shape(ids)} and {jnp.shape(batch[SEQUENCE_MASK])}.")
  for key in ("input_ids", "attention_mask", "loss_mask", POSITIONS):
    if jnp.shape(batch[key]) != jnp.shape(ids):
      raise ValueError(f"`{key}` has shape {jnp.shape(batch[key])} but `segment_ids` has shape "
                       f"{jnp.shape(ids)}; they must match.")


def num_sequences(batch: Mapping) -> int:
  """N, the static number of sequence slots of a packed batch."""
  return int(jnp.shape(batch[SEQUENCE_MASK])[0])


def model_inputs(batch: Mapping) -> tuple[jax.Array, ...]:
  """(input_ids, attention_mask, positions, segment_ids) of a packed batch, for the model."""
  return tuple(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", POSITIONS,
                                               SEGMENT_IDS))


def response_mask(batch: Mapping) -> jax.Array:
  """[R, T-1] mask of the predicted tokens: loss_mask[:, 1:] and, packed, only where token t+1
  is in token t's segment (module doc). Unpacked batches get loss_mask[:, 1:] unchanged."""
  mask = jnp.asarray(batch["loss_mask"])[:, 1:]
  if not is_packed(batch):
    return mask
  return mask * same_segment_as_previous(batch[SEGMENT_IDS]).astype(mask.dtype)


def present(batch: Mapping) -> jax.Array:
  """[N] bool: the slot is a real sequence with at least one token in these rows."""
  tokens = segment_sum(batch["attention_mask"], batch[SEGMENT_IDS], num_sequences(batch))
  return (jnp.asarray(batch[SEQUENCE_MASK]) != 0) & (tokens > 0)


def halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """An [N = 2P] per-sequence array as (x[:P], x[P:]): chosen / rejected, or KTO's completions
  and KL completions."""
  p = x.shape[0] // 2
  return x[:p], x[p:]


def pair_weights(batch: Mapping) -> jax.Array:
  """[P] float32: 1 for a pair whose chosen and rejected sequences are both present."""
  chosen, rejected = halves(present(batch))
  return (chosen & rejected).astype(jnp.float32)


def example_mean(loss_fn: Callable[..., tuple[jax.Array, dict]], weights: jax.Array | None,
                 *arrays: jax.Array, **per_example: jax.Array) -> tuple[jax.Array, dict]:
  """`loss_fn(*arrays, **per_example)` of a loss that is a batch mean of per-example terms,
  over the examples with weight 1 only:

      loss = Σ_b w_b·ℓ_b / Σ_b w_b,   ℓ_b = loss_fn(arrays[b:b+1], ...)[0]   (0 when Σ w = 0)

  and each metric likewise the weighted mean of its per-example values. ℓ_b is the loss's own
  value on the one-example batch (a `jax.vmap` over singletons), so for every loss that is a
  mean of per-example terms (the DPO variants, ORPO, SimPO, CPO, Bradley–Terry, KTO with a
  given reference point) this equals the loss of the batch of the weighted examples alone.
  The inputs of weight-0 examples are set to 0 first (`where_valid`), so whatever an absent
  slot holds never reaches the loss or its gradient. `weights=None` calls `loss_fn` on the
  whole batch unchanged (the unpacked path).

  Args:
    loss_fn: `(arrays..., **per_example) -> (loss, metrics)` over [B] arrays.
    weights: [B] 0/1 (or None).
    *arrays, **per_example: [B] arrays (positional / keyword), mapped over B.
  """
  if weights is None:
    return loss_fn(*arrays, **per_example)

  def one(*xs, **kw):
    return loss_fn(*(x[None] for x in xs), **{k: v[None] for k, v in kw.items()})

  w = jnp.asarray(weights, jnp.float32)
  arrays = [where_valid(x, w) for x in arrays]
  per_example = {k: where_valid(v, w) for k, v in per_example.items()}
  losses, metrics = jax.vmap(one)(*arrays, **per_example)
  return masked_mean(losses, w), {k: masked_mean(v, w) for k, v in metrics.items()}


def sequence_sums(token_values: jax.Array, mask: jax.Array, batch: Mapping
                  ) -> tuple[jax.Array, jax.Array]:
  """([N] Σ mask·x, [N] Σ mask) over each sequence of next-token values x [R, T-1] (the token
  predicted at t + 1 belongs to segment_ids[:, 1:])."""
  ids, n = jnp.asarray(batch[SEGMENT_IDS])[:, 1:], num_sequences(batch)
  return (segment_sum(token_values, ids, n, mask=mask),
          segment_sum(jnp.ones(mask.shape, jnp.float32), ids, n, mask=mask))


def mean_over(x: jax.Array, weights: jax.Array | None) -> jax.Array:
  """mean(x) unpacked (weights None), the weighted mean Σ w·x / Σ w packed."""
  return jnp.mean(x) if weights is None else masked_mean(x, weights)


def count_of(x: jax.Array, weights: jax.Array | None) -> jax.Array | int:
  """The number of examples a mean over x averaged: B unpacked, Σ w packed."""
  return x.shape[0] if weights is None else jnp.sum(weights)


__all__ = [
  "PACKED_KEYS",
  "count_of",
  "mean_over",
  "sequence_sums",
  "check_packed",
  "example_mean",
  "halves",
  "is_packed",
  "model_inputs",
  "num_sequences",
  "pair_weights",
  "present",
  "response_mask",
]
