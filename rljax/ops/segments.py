"""Per-sequence reductions over packed rows: token arrays [R, T] → sequence arrays [N].

A packed row holds several sequences (segments); `segment_ids[r, t]` is the index n ∈ [0, N) of
the sequence token (r, t) belongs to, and any id outside [0, N) (the packers use N itself for
padding) belongs to no sequence. Then

    segment_sum(x, segment_ids, N, mask=m)[n] = Σ_{(r,t): segment_ids[r,t] = n} m[r,t]·x[r,t]

so a per-sequence quantity (a sequence log-prob, a token count) comes out as an [N] array in the
sequences' own order, whatever rows they were packed into; a sequence with no token in the given
rows gets 0. Out-of-range ids are dropped (as `jax.ops.segment_sum` drops them; note that
`x.at[-1]` would wrap instead, which is why padding is N, not −1), and masked tokens are never
read, so a NaN or inf under mask 0 stays out. Sums run in `promote_types(x.dtype, float32)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_int, check_ndim, check_same_shape, compute_dtype, where_valid


def segment_sum(x, segment_ids, num_segments: int, *, mask=None) -> jax.Array:
  """[N] sums over the tokens of each segment: Σ_{t ∈ n} mask·x (module doc).

  Args:
    x: [R, T] per-token values (any rank, same shape as `segment_ids`).
    segment_ids: [R, T] int sequence index of each token; ids outside [0, N) are dropped.
    num_segments: N, a static int >= 1.
    mask: optional [R, T] bool / weights; 0 drops a token (its value is never read).

  Returns:
    [N] in `promote_types(x.dtype, float32)`; 0 for a segment with no (unmasked) token.

  Example:
    >>> segment_sum(jnp.ones((1, 4)), jnp.array([[0, 0, 1, 2]]), 2)   # [2., 1.]: id 2 dropped
  """
  check_int("num_segments", num_segments, 1)
  check_same_shape(x=x, segment_ids=segment_ids, mask=mask)
  dtype = compute_dtype(x)
  x = jnp.asarray(x).astype(dtype)
  if mask is not None:
    m = jnp.asarray(mask).astype(dtype)
    x = where_valid(x, m) * m
  ids = jnp.asarray(segment_ids).astype(jnp.int32)
  return jax.ops.segment_sum(x.reshape(-1), ids.reshape(-1), num_segments=num_segments)


def segment_ends(segment_ids, mask) -> jax.Array:
  """[R, T] bool: True at the last valid token of each run of equal ids in a row.

  A token (r, t) is a segment's last when it is valid (`mask` != 0) and the next slot of its row
  is the end of the row, invalid, or in another segment. With every segment one contiguous run
  of a row (as the packers lay them out), each segment has exactly one end, so
  `segment_sum(x, ids, N, mask=segment_ends(ids, mask))` reads x at each segment's last token
  (a reward model's score).
  """
  check_ndim("segment_ids", segment_ids, 2)
  check_same_shape(segment_ids=segment_ids, mask=mask)
  ids = jnp.asarray(segment_ids)
  valid = jnp.asarray(mask) != 0
  same_next = jnp.concatenate([(ids[:, 1:] == ids[:, :-1]) & valid[:, 1:],
                               jnp.zeros_like(valid[:, :1])], axis=1)
  return valid & ~same_next


def same_segment_as_previous(segment_ids) -> jax.Array:
  """[R, T-1] bool: token t+1 is in the segment of token t (it is predicted from its own
  sequence). Next-token losses of packed rows multiply their `loss_mask[:, 1:]` by it, so the
  first token of a sequence is never predicted from the end of the one before it."""
  check_ndim("segment_ids", segment_ids, 2)
  ids = jnp.asarray(segment_ids)
  return ids[:, 1:] == ids[:, :-1]


__all__ = ["same_segment_as_previous", "segment_ends", "segment_sum"]
