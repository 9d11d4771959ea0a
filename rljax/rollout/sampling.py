"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

The log-prob reported for a sampled token is always the *untruncated* one,
log_softmax(logits / temperature)[token] (temperature 1 when greedy), computed by
`rljax.ops.logprobs.token_logprobs` in float32: the quantity a trainer recomputes with
`token_logprobs(model(tokens), tokens, temperature=T)`, as in verl and TRL. Top-k / top-p only
restrict which token may be drawn.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_int, check_number
from rljax.ops.logprobs import token_logprobs

Array = jax.Array


def check_sampling_options(
  *, temperature: float, top_k: int | None, top_p: float | None
) -> None:
  """Raises `ValueError` naming the option unless 0 <= temperature < inf, top_k is None or
  >= 1, and top_p is None or in (0, 1]."""
  check_number("temperature", temperature)
  check_int("top_k", top_k, 1, optional=True)
  check_number("top_p", top_p, low_open=True, high=1.0, high_open=False, optional=True)


def check_dtype_name(name: str, value: str | None) -> None:
  """ValueError naming `name` unless `value` is None or a floating dtype name ("bfloat16")."""
  if value is None:
    return
  try:
    floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"`{name}` must be None or a floating dtype name such as 'bfloat16'; "
                     f"got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How completions are sampled: the one place these options live (`generate`, the on-policy
  trainers' rollouts and their evaluation all read them from here).

  Attributes:
    max_new_tokens: completion length N (static shape; 32).
    temperature: softmax temperature (1.0); 0 is greedy decoding. The trainers' log-probs use
      the same temperature, so training needs temperature > 0.
    top_k: None, or sample among the k most likely tokens.
    top_p: None, or nucleus sampling with mass top_p in (0, 1] (after top_k).
    num_samples: completions per prompt (1); GRPO's group size G (then >= 2).
    rollout_dtype: None samples in the training dtype; e.g. "bfloat16" casts the parameters
      handed to the sampler (the trainers still compute log-probs in the training dtype).
  """

  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  num_samples: int = 1
  rollout_dtype: str | None = None

  def __post_init__(self) -> None:
    for name in ("max_new_tokens", "num_samples"):
      check_int(name, getattr(self, name), 1)
    check_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
    check_dtype_name("rollout_dtype", self.rollout_dtype)


def top_p_keep(sorted_logits: Array, top_p: float) -> Array:
  """Nucleus of logits sorted in decreasing order: the smallest prefix with cumulative prob >= p.

  Token i (in sorted order) is kept iff the probability mass strictly before it is < top_p, so
  the most likely token is always kept and the kept set is the smallest whose mass reaches
  top_p (Holtzman et al. 2020; the convention of transformers' `TopPLogitsWarper`, which
  applies top-p after top-k on the renormalised top-k distribution, as here).

  Args:
    sorted_logits: [..., K] logits (already divided by the temperature) in decreasing order.
    top_p: in (0, 1].

  Returns:
    [..., K] bool.
  """
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  return keep.at[..., 0].set(True)


def request_keys(key: Array, requests: Array, steps: Array) -> Array:
  """[B] keys fold_in(fold_in(key, r), t) for request ids r [B] and token indices t [B] (or a
  scalar t): the draw of token t of request r depends on nothing else, so a static batch
  (`generate`) and the continuous-batching engine, which serve requests in different rows and
  at different times, sample the same tokens."""
  steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), jnp.shape(requests))
  return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(
    jnp.asarray(requests, jnp.int32), steps)


def _is_batch_of_keys(key: Array, rows: int) -> bool:
  """True for [rows] typed keys or [rows, 2] raw uint32 keys (one per row)."""
  typed = jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
  return jnp.ndim(key) == (1 if typed else 2) and jnp.shape(key)[0] == rows


def _uniform(key: Array, rows: int) -> Array:
  """[rows] uniforms in [0, 1): one draw of the batch key, or one per row from [rows] keys."""
  if _is_batch_of_keys(key, rows):
    return jax.vmap(lambda k: jax.random.uniform(k, ()))(key)
  return jax.random.uniform(key, (rows,))


def _first_true(x: Array) -> Array:
  """Index of the first True along the last axis ([..., K] bool; K where none): a max and a
  min (XLA:CPU runs `argmax`'s variadic (value, index) reduction ~3x slower)."""
  k = x.shape[-1]
  return jnp.min(jnp.where(x, jnp.arange(k, dtype=jnp.int32), k), axis=-1)


def _argmax(x: Array) -> Array:
  """`jnp.argmax(x, -1)` (the first maximal index) as two plain reductions."""
  return _first_true(x == jnp.max(x, axis=-1, keepdims=True))


_CDF_BLOCK = 128  # tokens per block of the two-level inverse CDF


def _categorical(key: Array, logits: Array) -> Array:
  """One draw per row from softmax(logits [B, K]) (−inf entries are never drawn) by inverting
  the CDF at one uniform u per row: the first token whose cumulative probability exceeds
  u·Σp, p = exp(logits − max). The cumulative sums are two-level — over blocks of 128 tokens,
  then inside the chosen block — so a step makes one pass over the logits and draws one random
  number per row (`jax.random.categorical`'s Gumbel-max draws K, which dominated a CPU decode
  step). The key is one key for the batch or one per row (`request_keys`)."""
  rows, k = logits.shape
  block = min(_CDF_BLOCK, k)
  padded = -(-k // block) * block
  p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.pad(p, ((0, 0), (0, padded - k))).reshape(rows, padded // block, block)
  sums = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)  # [B, blocks]
  target = _uniform(key, rows) * sums[:, -1]
  last_block = _first_true(sums >= sums[:, -1:])  # the last block holding any mass
  b = jnp.minimum(jnp.sum(sums <= target[:, None], axis=-1), last_block)
  before = jnp.where(b > 0, jnp.take_along_axis(sums, jnp.maximum(b - 1, 0)[:, None], 1)[:, 0], 0)
  inside = jnp.take_along_axis(p, b[:, None, None], axis=1)[:, 0]  # [B, block]
  cumulative = before[:, None] + jnp.cumsum(inside, axis=-1)
  last = block - 1 - _first_true(inside[:, ::-1] > 0)  # the block's last token with mass
  i = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1), last)
  return b * block + i


def sample_next_token(
  logits: Array,
  key: Array,
  *,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> tuple[Array, Array]:
  """Samples one token per row and returns it with its untruncated log-prob.

    temperature == 0:  token = argmax(logits),  logp = log_softmax(logits)[token]
    temperature  > 0:  z = logits / temperature
                       token ~ softmax(z restricted to top-k, then to the top-p nucleus)
                       logp  = log_softmax(z)[token]          (no truncation)

  Args:
    logits: [B, V] next-token logits (any float dtype; computed in at least float32).
    key: a PRNG key for the batch, or [B] keys, one per row (`request_keys`); unused when
      greedy.
    temperature: >= 0; 0 means greedy. Default 1.0.
    top_k: None (off) or keep the k most likely tokens (exactly k: ties at the k-th value are
      broken by index, as `jax.lax.top_k`). A k >= V is off.
    top_p: None (off) or keep the smallest set of most likely tokens whose probability reaches
      top_p (see `top_p_keep`); 1.0 is off.

  Returns:
    (tokens [B] int32, logprobs [B] float32 — float64 for float64 logits).

  Example:
    >>> tok, logp = sample_next_token(logits[:, -1], key, temperature=0.7, top_p=0.9)
  """
  check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p)
  vocab = logits.shape[-1]
  if temperature == 0:
    tokens = _argmax(logits).astype(jnp.int32)
    return tokens, token_logprobs(logits[:, None, :], tokens[:, None])[:, 0]
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
  k = vocab if top_k is None else min(top_k, vocab)
  nucleus = top_p is not None and top_p < 1.0
  if k < vocab or nucleus:
    values, indices = jax.lax.top_k(z, k)  # decreasing order
    if nucleus:
      values = jnp.where(top_p_keep(values, top_p), values, -jnp.inf)
    choice = _categorical(key, values)
    tokens = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
  else:
    tokens = _categorical(key, z)
  tokens = tokens.astype(jnp.int32)
  return tokens, token_logprobs(logits[:, None, :], tokens[:, None], temperature=temperature)[:, 0]
