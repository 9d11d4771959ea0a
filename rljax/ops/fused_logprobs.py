"""Token log-probs (and entropy) straight from hidden states, without `[B, T, V]` logits.

`logprobs_from_hidden(hidden, unembedding, tokens)` equals
`token_logprobs(hidden @ unembedding.T, tokens)` but scans over chunks of the time axis: each
step forms the `[B, c, V]` logits of one chunk, reduces them to `[B, c]` statistics and drops
them. A `jax.custom_vjp` keeps the backward pass chunked too: it saves only the inputs and the
`[B, T]` logsumexp (and entropy), recomputes each chunk's logits, and accumulates the `[V, D]`
gradient of the unembedding across chunks in at least float32. Peak memory is O(B·c·V + V·D + B·T·D)
instead of O(B·T·V), which is what makes vocabularies of 100k+ affordable (see
`benchmarks/logprob_memory.py`). Chunking is along T only, so a data sharding of B is untouched.
When the unembedding is not differentiated (a frozen LoRA base's tied table) and the entropy has
no gradient, the forward also forms each position's d log p / d hidden (a [B, T, D] residual)
and the backward only scales it by the cotangent: no recomputed logits.

The gradient formulas, with a = hidden @ Wᵀ, the logits ℓ = a or, soft-capped (Gemma 2's
final_logit_softcapping), ℓ = c · tanh(a / c), z = ℓ / temperature, p = softmax(z),
log p = z - lse and H = -Σ p log p:
  d log p_y / d z_j = 1[j = y] - p_j
  d H / d z_j       = -p_j (log p_j + H)
  d ℓ / d a         = 1 - tanh²(a / c)   (1 without a cap)
and d/d a = (d/d z) / temperature · dℓ/da; then d/d hidden = g_a @ W, d/d W = g_aᵀ hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_ndim, check_positive, compute_dtype
from rljax.ops.logprobs import check_tokens, clip_tokens

DEFAULT_CHUNK_SIZE = 64


def _chunk_logits(h_chunk, unembedding, temperature: float, softcap: float | None, out_dtype
                  ) -> tuple[jax.Array, jax.Array | None]:
  """[B, c, D] x [V, D] -> (z = ℓ / temperature [B, c, V] with the logits ℓ soft-capped by
  `softcap` when given, accumulated in `out_dtype`; dℓ/da = 1 - tanh²(a / c), None uncapped)."""
  operand_dtype = jnp.result_type(h_chunk, unembedding)
  z = jax.lax.dot_general(
      h_chunk.astype(operand_dtype),
      unembedding.astype(operand_dtype),
      (((2,), (1,)), ((), ())),
      preferred_element_type=out_dtype,
  )
  slope = None
  if softcap is not None:
    t = jnp.tanh(z / softcap)
    z, slope = softcap * t, 1.0 - t * t
  return (z if temperature == 1.0 else z / temperature), slope


def _chunk_stats(z, idx, with_entropy: bool):
  """Per-position (log p of the token, lse, entropy or None) from chunk logits z [B, c, V]."""
  lse = jax.nn.logsumexp(z, axis=-1)
  logp_all = z - lse[..., None]
  logp = jnp.take_along_axis(logp_all, idx[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1) if with_entropy else None
  return logp, lse, entropy


def _slice_chunk(x, i, chunk: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def _fused_forward(hidden, unembedding, tokens, temperature, chunk, with_entropy, softcap,
                   with_grad: bool = False):
  """Scans the T-chunks; returns [B, T] (logp, lse, entropy or None) and, `with_grad`, the
  [B, T, D] gradient of each position's log-prob w.r.t. its hidden state (else None):

    u[b, t] = d logp[b, t] / d hidden[b, t] = Σ_v (1[v = y] − p_v) / temperature · dℓ_v/da_v · W_v

  what the backward of a frozen unembedding needs: d/d hidden = g_logp · u."""
  dtype = compute_dtype(hidden, unembedding)
  operand_dtype = jnp.result_type(hidden, unembedding)
  vocab = unembedding.shape[0]
  idx = clip_tokens(tokens, vocab)
  num_chunks = hidden.shape[1] // chunk

  def step(_, i):
    z, slope = _chunk_logits(_slice_chunk(hidden, i, chunk), unembedding, temperature, softcap,
                             dtype)
    idx_c = _slice_chunk(idx, i, chunk)
    logp, lse, entropy = _chunk_stats(z, idx_c, with_entropy)
    outs = (logp, lse) if entropy is None else (logp, lse, entropy)
    if with_grad:
      g_logits = _logit_slope(_logprob_grad(jnp.exp(z - lse[..., None]), idx_c, dtype), slope,
                              temperature)
      outs += (_hidden_grad(g_logits.astype(operand_dtype), unembedding, dtype),)
    return None, outs

  _, outs = jax.lax.scan(step, None, jnp.arange(num_chunks))
  # [n, B, c, ...] -> [B, n * c, ...]
  outs = [jnp.swapaxes(o, 0, 1).reshape(*hidden.shape[:2], *o.shape[3:]) for o in outs]
  entropy = outs[2] if with_entropy else None
  return outs[0], outs[1], entropy, (outs[-1] if with_grad else None)


def _logprob_grad(p, idx_c, dtype):
  """d log p_y / d z = 1[v = y] − p_v for chunk probabilities p [B, c, V], tokens y = idx_c."""
  return (jnp.arange(p.shape[-1]) == idx_c[..., None]).astype(dtype) - p


def _logit_slope(g_z, slope, temperature: float):
  """d/d a from d/d z (z = cap(a) / temperature): / temperature, · dℓ/da when capped."""
  g_logits = g_z if temperature == 1.0 else g_z / temperature
  return g_logits if slope is None else g_logits * slope


def _hidden_grad(g_logits, unembedding, dtype):
  """[B, c, V] gradients of the logits → [B, c, D] of the hidden states: g @ W."""
  return jnp.einsum("bcv,vd->bcd", g_logits, unembedding.astype(g_logits.dtype),
                    preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _fused(hidden, unembedding, tokens, temperature, chunk, with_entropy, entropy_grad, softcap):
  logp, _, entropy, _ = _fused_forward(hidden, unembedding, tokens, temperature, chunk,
                                       with_entropy, softcap)
  return (logp, entropy) if with_entropy else (logp,)


def _fused_fwd(hidden, unembedding, tokens, temperature, chunk, with_entropy, entropy_grad,
               softcap):
  """With a frozen unembedding (not differentiated: a LoRA base's tied table) and no entropy
  gradient, the forward also forms u = d logp / d hidden (`_fused_forward`), and the backward is
  g_logp · u: two passes over the vocabulary (the logits, then u) instead of three (the logits,
  and in the backward the logits again and the hidden gradient). Otherwise the backward
  recomputes each chunk's logits (`_fused_bwd`)."""
  frozen = not unembedding.perturbed and not (with_entropy and entropy_grad)
  hidden, unembedding, tokens = hidden.value, unembedding.value, tokens.value
  logp, lse, entropy, grad = _fused_forward(hidden, unembedding, tokens, temperature, chunk,
                                            with_entropy, softcap, with_grad=frozen)
  outputs = (logp, entropy) if with_entropy else (logp,)
  if frozen:  # and an empty array carrying hidden's dtype, that of its gradient
    return outputs, (grad, jnp.zeros((0,), hidden.dtype))
  return outputs, (hidden, unembedding, tokens, lse, entropy)


def _fused_bwd(temperature, chunk, with_entropy, entropy_grad, softcap, residuals, cotangents):
  if len(residuals) == 2:  # a frozen unembedding: d/d hidden = g_logp · u, nothing else
    grad, hidden_like = residuals
    g_logp = _instantiate(cotangents[0], grad.shape[:2], grad.dtype)
    return (g_logp[..., None] * grad).astype(hidden_like.dtype), None, None
  hidden, unembedding, tokens, lse, entropy = residuals
  cotangents = [_instantiate(c, lse.shape, lse.dtype) for c in cotangents]
  with_entropy = with_entropy and entropy_grad  # a metric-only entropy adds no backward work
  dtype = compute_dtype(hidden, unembedding)
  operand_dtype = jnp.result_type(hidden, unembedding)
  vocab = unembedding.shape[0]
  idx = clip_tokens(tokens, vocab)
  g_logp = cotangents[0].astype(dtype)
  g_ent = cotangents[1].astype(dtype) if with_entropy else None
  num_chunks = hidden.shape[1] // chunk

  def step(carry, i):
    grad_h, grad_w = carry
    h_c = _slice_chunk(hidden, i, chunk)
    z, slope = _chunk_logits(h_c, unembedding, temperature, softcap, dtype)
    logp_all = z - _slice_chunk(lse, i, chunk)[..., None]
    p = jnp.exp(logp_all)
    g_z = _slice_chunk(g_logp, i, chunk)[..., None] * _logprob_grad(
        p, _slice_chunk(idx, i, chunk), dtype)
    if with_entropy:
      h_ent = _slice_chunk(entropy, i, chunk)[..., None]
      g_z = g_z - _slice_chunk(g_ent, i, chunk)[..., None] * p * (logp_all + h_ent)
    g_logits = _logit_slope(g_z, slope, temperature).astype(operand_dtype)
    g_h = _hidden_grad(g_logits, unembedding, dtype)
    # The [V, D] gradient as one 2D matmul over the B·c rows (a contraction over two dims makes
    # XLA:CPU copy both operands into another layout first).
    rows = g_logits.shape[0] * g_logits.shape[1]
    grad_w = grad_w + jnp.einsum("nv,nd->vd", g_logits.reshape(rows, vocab),
                                 h_c.astype(operand_dtype).reshape(rows, -1),
                                 preferred_element_type=dtype)
    grad_h = jax.lax.dynamic_update_slice_in_dim(
        grad_h, g_h.astype(hidden.dtype), i * chunk, axis=1
    )
    return (grad_h, grad_w), None

  init = (jnp.zeros_like(hidden), jnp.zeros(unembedding.shape, dtype))
  (grad_h, grad_w), _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
  return grad_h, grad_w.astype(unembedding.dtype), None


def _instantiate(cotangent, shape, dtype):
  """A cotangent as an array: zeros for a symbolic zero (an output nothing differentiates)."""
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(shape, dtype)
  return cotangent


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _check_inputs(hidden, unembedding, tokens, temperature, chunk_size, softcap) -> None:
  check_ndim("hidden", hidden, 3)
  check_ndim("unembedding", unembedding, 2)
  if jnp.shape(hidden)[-1] != jnp.shape(unembedding)[-1]:
    raise ValueError(
        f"`hidden` has shape {jnp.shape(hidden)} and `unembedding` has shape "
        f"{jnp.shape(unembedding)}; the "
        "last dims (the model width D) must match (`unembedding` is [V, D])."
    )
  check_tokens(tokens, jnp.shape(hidden)[:2], against="hidden.shape[:2]")
  check_positive("temperature", temperature)
  if softcap is not None:
    check_positive("softcap", softcap)
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"`chunk_size` must be an int >= 1; got {chunk_size!r}.")


def logprobs_from_hidden(
    hidden,
    unembedding,
    tokens,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    softcap: float | None = None,
):
  """Token log-probs (and optionally entropy) of `softmax(cap(hidden @ unembedding.T) / temperature)`.

    z[b, t] = cap(hidden[b, t] @ unembedding.T) / temperature       (never stored for all t)
    cap(a) = softcap · tanh(a / softcap), or a when softcap is None
    logp[b, t] = z[b, t, tokens[b, t]] - logsumexp_v z[b, t, v]
    entropy[b, t] = -Σ_v p log p,  p = softmax(z[b, t])

  Equal to `token_logprobs(hidden @ unembedding.T, tokens, temperature=...)` (and
  `entropy_from_logits`) up to float rounding, but computed by a `lax.scan` over chunks of
  `chunk_size` positions along T with a custom VJP, so neither the forward nor the backward pass
  materialises the [B, T, V] logits: the extra memory is one to three float32
  [B, chunk_size, V] buffers plus the [V, D] gradient accumulator (compiled temp memory of
  value_and_grad at B=8, T=1024, D=1024, V=131072: about 1/10 of the naive computation, see
  `benchmarks/logprob_memory.py`). T is padded internally to a multiple of the chunk size (the
  padded positions cost compute, not correctness). Only T is chunked, so a sharding of B (data
  parallelism) passes through unchanged; the [V, D] gradient is all-reduced once.

  Numerics: the matmul operands stay in `result_type(hidden, unembedding)` (bf16 stays bf16 on
  the MXU / tensor cores) with accumulation, logsumexp and entropy in
  `promote_types(that, float32)`; float64 stays float64. The unembedding gradient is accumulated
  across chunks in that dtype; gradients are returned in the input dtypes. `tokens` gets no
  gradient; `temperature` is a static Python float. Max-shifted logsumexp keeps logits of ±1e4
  finite, with finite gradients.

  Args:
    hidden: [B, T, D] final hidden states (after the final norm); position t produced
      `tokens[b, t]` (already shifted, see `shift_for_next_token`).
    unembedding: [V, D], the layout of an embedding table (tied weights) or a Hugging Face
      `lm_head.weight`.
    tokens: [B, T] integer ids; ids outside [0, V) are clipped into range (mask them).
    temperature: > 0, default 1.0; logits are divided by it (verl / TRL convention).
    chunk_size: positions per scan step, default 64: per chunk the logits take
      B·chunk_size·V floats (B per device), and each matmul has B·chunk_size rows. Lower it for
      large per-device batches or vocabularies; raise it when the per-device batch is small
      (matmuls of a few hundred rows or more use accelerators well). Clamped to T.
    return_entropy: also return the [B, T] entropy (same pass).
    entropy_grad: the entropy is differentiable (default, e.g. for an entropy bonus); False
      returns it as a metric under `stop_gradient`, and the backward pass skips its term (one
      elementwise pass over every chunk's [B, c, V] probabilities less).
    softcap: None, or c > 0: the logits are c · tanh(logits / c) before the temperature (Gemma
      2's final_logit_softcapping, `ModelConfig.final_logit_softcap`), in every chunk and in the
      custom VJP (a static Python float).

  Returns:
    [B, T] log-probs in the compute dtype, or `(logprobs, entropy)` when `return_entropy`.

  Example:
    >>> hidden = model.hidden_states(input_ids)[:, :-1]          # [B, T-1, D]
    >>> logp, ent = logprobs_from_hidden(hidden, params["embed"], input_ids[:, 1:],
    ...                                  temperature=1.0, chunk_size=256, return_entropy=True)
  """
  _check_inputs(hidden, unembedding, tokens, temperature, chunk_size, softcap)
  hidden, unembedding, tokens = jnp.asarray(hidden), jnp.asarray(unembedding), jnp.asarray(tokens)
  length = hidden.shape[1]
  chunk = max(1, min(chunk_size, length))
  padded = -(-length // chunk) * chunk
  if padded != length:
    hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
    tokens = jnp.pad(tokens, ((0, 0), (0, padded - length)))
  outputs = _fused(hidden, unembedding, tokens, float(temperature), chunk, bool(return_entropy),
                   bool(entropy_grad), None if softcap is None else float(softcap))
  outputs = tuple(o[:, :length] for o in outputs)
  if not return_entropy:
    return outputs[0]
  return outputs[0], outputs[1] if entropy_grad else jax.lax.stop_gradient(outputs[1])
