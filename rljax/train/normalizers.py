"""Exact normalizers for losses accumulated over microbatches: one rule for every objective.

A loss that is a mean over its batch, ℓ = S / n (S a sum over rows or tokens, n their count), is
accumulated exactly over microbatches (or data-parallel shards) by giving each microbatch the
GLOBAL count N of the full batch, computed once by the train step's `count_fn`:

    share(ℓ_i) = ℓ_i · n_i / N = S_i / N,        Σ_i share(ℓ_i) = S / N = ℓ        (N > 0)

and 0 when N = 0 (an empty batch trains on nothing). `rescale_to_normalizer` is that rule; every
objective in `rljax.train` (GRPO, PPO's policy and critic, DPO, the preference family and the
reward models) applies it to its batch-mean loss, and `agg_count` gives n and N for the
aggregation modes of `rljax.ops.aggregate` (whose own `normalizer=` argument is the same rule
applied inside one aggregation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops.masking import sequence_sums

Array = jax.Array

TOKEN_AGGS = ("token-mean",)
SEQ_AGGS = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def agg_count(mask: Array, agg: str, *, segment_ids: Array | None = None,
              num_segments: int | None = None) -> Array:
  """The outer denominator `aggregate(·, mask, agg)` divides by: Σ mask for "token-mean", the
  number of rows (packed: sequences, by `segment_ids`) with a valid token for the seq-mean modes
  (float32 scalar)."""
  m = jnp.asarray(mask).astype(jnp.float32)
  if agg in TOKEN_AGGS:
    return jnp.sum(m)
  if agg in SEQ_AGGS:
    counts = sequence_sums(m, m, segment_ids, num_segments)[1]
    return jnp.sum((counts != 0).astype(jnp.float32))
  raise ValueError(f"`agg` {agg!r} has no normalizer; valid: {TOKEN_AGGS + SEQ_AGGS}.")


def rescale_to_normalizer(loss: Array, count: Array | int, normalizer: Array | None) -> Array:
  """loss · count / normalizer (this microbatch's share of the full-batch loss, module doc);
  `normalizer=None` returns `loss` unchanged, a zero normalizer gives 0."""
  if normalizer is None:
    return loss
  norm = jnp.asarray(normalizer, jnp.float32)
  return jnp.where(norm > 0, loss * count / jnp.where(norm > 0, norm, 1.0), 0.0)
