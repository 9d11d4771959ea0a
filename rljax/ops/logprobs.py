"""Token log-probabilities, entropy and sequence log-probabilities from logits.

Alignment (the contract of `rljax.ops`): `logits[..., t, :]` is the distribution that produced
`tokens[..., t]`; the caller has already shifted by one. `shift_for_next_token` does that shift
for the common case of a causal language model run on `input_ids`.

Reductions over the vocabulary (log-softmax, logsumexp, entropy) run in
`promote_types(logits.dtype, float32)`: bf16 is promoted, float64 stays float64. They are
written in the max-shifted (logsumexp) form, so logits of ±1e4 give finite values and gradients.
For the same computation without materialising `[B, T, V]` logits, see
`rljax.ops.fused_logprobs.logprobs_from_hidden`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_ndim, check_positive, check_same_shape, compute_dtype
from rljax.ops.masking import masked_mean, masked_sum


def check_tokens(
    tokens, expected_shape: tuple[int, ...], *, against: str = "logits.shape[:-1]"
) -> None:
  """Raises `ValueError` unless `tokens` is an integer array of `expected_shape`."""
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"`tokens` must be an integer array; got dtype {jnp.result_type(tokens)}.")
  if tuple(jnp.shape(tokens)) != tuple(expected_shape):
    raise ValueError(
        f"`tokens` has shape {jnp.shape(tokens)} but must equal `{against}` = "
        f"{tuple(expected_shape)}."
    )


def clip_tokens(tokens, vocab_size: int) -> jax.Array:
  """Token ids clipped into [0, vocab_size) (padding ids such as -100 become valid indices)."""
  return jnp.clip(jnp.asarray(tokens), 0, vocab_size - 1)


def scaled_logits(logits, temperature: float) -> jax.Array:
  """logits / temperature in the compute dtype (at least float32)."""
  check_positive("temperature", temperature)
  z = jnp.asarray(logits).astype(compute_dtype(logits))
  return z if temperature == 1.0 else z / temperature


def token_logprobs(logits, tokens, *, temperature: float = 1.0) -> jax.Array:
  """Log-probability of each token under softmax(logits / temperature).

    z = logits / temperature
    logp[b, t] = z[b, t, tokens[b, t]] - logsumexp_v z[b, t, v]

  computed in `promote_types(logits.dtype, float32)`. The logsumexp is max-shifted, so logits of
  ±1e4 give finite values and gradients. Dividing by the sampling temperature before the softmax
  is the convention of verl and TRL (the log-probs a sampler with that temperature reports).

  Args:
    logits: [B, T, V] (any leading dims `[..., V]` with at least one before V); `logits[b, t]`
      is the distribution that produced `tokens[b, t]` (already shifted, see
      `shift_for_next_token`).
    tokens: [B, T] integer ids, shape `logits.shape[:-1]`. Ids outside [0, V) (e.g. a -100
      padding id) are clipped into range, giving finite but meaningless values: mask them.
    temperature: > 0, default 1.0.

  Returns:
    [B, T] log-probs in the compute dtype (float32 for bf16/float32 logits, float64 for float64).

  Example:
    >>> logits = model(input_ids)                        # [B, T, V]
    >>> logits, targets, mask = shift_for_next_token(logits, input_ids, mask)
    >>> logp = token_logprobs(logits, targets, temperature=0.7)  # [B, T-1]
  """
  check_ndim("logits", logits, range(2, 33))
  check_tokens(tokens, jnp.shape(logits)[:-1])
  z = scaled_logits(logits, temperature)
  idx = clip_tokens(tokens, z.shape[-1])
  picked = jnp.take_along_axis(z, idx[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits, *, temperature: float = 1.0) -> jax.Array:
  """Entropy of softmax(logits / temperature) at every position.

    z = logits / temperature,  log p = z - logsumexp(z),  H = -Σ_v p_v · log p_v

  computed in `promote_types(logits.dtype, float32)` as -Σ p·(z - lse) (not lse - Σ p·z, which
  cancels catastrophically for logits of ±1e4). Terms with p_v = 0 contribute 0 (no 0·log 0 NaN,
  also for -inf logits of a masked vocabulary entry), and gradients stay finite. The result lies
  in [0, log V].

  Args:
    logits: [B, T, V] (any leading dims `[..., V]` with at least one before V).
    temperature: > 0, default 1.0.

  Returns:
    [B, T] entropies (nats) in the compute dtype.

  Example:
    >>> ent = entropy_from_logits(logits)                # [B, T]
    >>> bonus = aggregate(ent, mask, "token-mean")       # entropy bonus / metric
  """
  check_ndim("logits", logits, range(2, 33))
  z = scaled_logits(logits, temperature)
  logp = jax.nn.log_softmax(z, axis=-1)
  p = jnp.exp(logp)
  safe_logp = jnp.where(p > 0, logp, 0)
  return -jnp.sum(p * safe_logp, axis=-1)


def sequence_logprobs(token_logps, mask, *, average: bool = False) -> jax.Array:
  """Log-probability of each sequence: the masked sum (or mean) of its token log-probs.

    average=False:  Σ_t mask[b, t] · logp[b, t]                  (DPO, KTO, reward of a sequence)
    average=True:   Σ_t mask[b, t] · logp[b, t] / Σ_t mask[b, t] (SimPO, ORPO, IPO length-norm)

  Masked positions never leak into the result (a -inf or NaN log-prob under mask 0 is ignored).
  A row whose mask is all zero gives 0 (with zero gradient), not NaN.

  Args:
    token_logps: [B, T] per-token log-probs (any leading dims; T is the last axis).
    mask: [B, T] bool or float weights, same shape.
    average: divide by the number of valid tokens (length-normalised), default False.

  Returns:
    [B] sequence log-probs in `promote_types(token_logps.dtype, float32)`.

  Example:
    >>> chosen = sequence_logprobs(token_logprobs(logits, tokens), mask)   # [B]
  """
  check_ndim("token_logps", token_logps, range(1, 33))
  check_same_shape(token_logps=token_logps, mask=mask)
  if average:
    return masked_mean(token_logps, mask, axis=-1)
  return masked_sum(token_logps, mask, axis=-1)


def shift_for_next_token(logits, input_ids, mask=None):
  """Aligns a causal LM's logits with the tokens they predict.

  The logits at position t predict input_ids[t + 1], so the standard shift drops the last
  logit and the first id:

    (logits[..., :-1, :], input_ids[..., 1:], mask[..., 1:])

  The mask is shifted like the ids, so it still marks the target tokens that count (e.g. the
  response tokens of a prompt + response row). After the shift `logits[..., t, :]` is the
  distribution that produced `tokens[..., t]`, the alignment every `rljax.ops` function expects.

  Args:
    logits: [B, T, V] (any leading dims) from running the model on `input_ids`; T >= 2.
    input_ids: [B, T] integer ids, shape `logits.shape[:-1]`.
    mask: optional [B, T] mask over `input_ids` (bool or float).

  Returns:
    A 3-tuple `(logits [B, T-1, V], targets [B, T-1], mask [B, T-1] or None)`; the third
    element is None when `mask` is None, so the arity never changes.

  Example:
    >>> logits, targets, mask = shift_for_next_token(model(input_ids), input_ids, attn_mask)
    >>> logp = token_logprobs(logits, targets)
  """
  check_ndim("logits", logits, range(2, 33))
  if jnp.shape(logits)[-2] < 2:
    raise ValueError(f"`logits` needs T >= 2 positions to shift; got shape {jnp.shape(logits)}.")
  if tuple(jnp.shape(input_ids)) != tuple(jnp.shape(logits)[:-1]):
    raise ValueError(
        f"`input_ids` has shape {jnp.shape(input_ids)} but must equal `logits.shape[:-1]` = "
        f"{tuple(jnp.shape(logits)[:-1])}."
    )
  check_same_shape(input_ids=input_ids, mask=mask)
  shifted_mask = None if mask is None else mask[..., 1:]
  return logits[..., :-1, :], input_ids[..., 1:], shifted_mask
