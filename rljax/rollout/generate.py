"""`generate`: jitted prefill + `lax.while_loop` decode over a static-shape KV cache.

One compiled program per (model structure, input shapes, options): the hyper-parameters are
static, the parameters, prompts, masks and key are traced, and the jitted function is defined
once at module level, so calling `generate` again with the same shapes and options never
recompiles.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.kv_cache import KVCache, hidden_states_with_cache, init_kv_cache
from rljax.models.transformer import Transformer, config_of
from rljax.ops._checks import check_integer_ids
from rljax.rollout.sampling import SamplingConfig, request_keys, sample_next_token

Array = jax.Array


class Rollout(NamedTuple):
  """Sampled completions (a pytree). B = num_prompts * num_samples, P prompt length, N new tokens.

  Attributes:
    tokens: [B, P+N] int32: the (left-padded) prompt, then the completion; after a row's stop
      token (and after an early exit of the loop) the completion is `pad_id`.
    prompt_mask: [B, P] bool, the prompt mask repeated like the rows.
    completion_mask: [B, N] bool, `t < lengths` (built from lengths, never from the token ids, so
      pad_id may equal the EOS id; the stop token itself is inside the mask).
    logprobs: [B, N] float32, log_softmax(logits / temperature) of each sampled token without
      top-k/top-p truncation (temperature 1 when greedy); 0 outside `completion_mask`.
    lengths: [B] int32, completion lengths including the stop token, in [1, N].
    finished: [B] bool, True when the row emitted a stop token; False = truncated at N.
  """

  tokens: Array
  prompt_mask: Array
  completion_mask: Array
  logprobs: Array
  lengths: Array
  finished: Array

  @property
  def attention_mask(self) -> Array:
    """[B, P+N] bool: the prompt mask then the completion mask (input mask for a trainer)."""
    return jnp.concatenate([self.prompt_mask, self.completion_mask], axis=1)


class _Options(NamedTuple):
  """Static (hashable) hyper-parameters of one compiled program."""

  max_new_tokens: int
  temperature: float
  top_k: int | None
  top_p: float | None
  stop_tokens: tuple[int, ...]
  pad_id: int
  num_samples: int


class _DecodeState(NamedTuple):
  step: Array  # index of the next completion token to sample
  cache: KVCache
  tokens: Array  # [B, N]
  logprobs: Array  # [B, N]
  lengths: Array  # [B]
  finished: Array  # [B]


def _is_stop(tokens: Array, stop_tokens: tuple[int, ...]) -> Array:
  if not stop_tokens:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


def _sample(logits: Array, key: Array, step: Array | int, o: _Options) -> tuple[Array, Array]:
  """Token `step` of every row r (the request id) with key fold_in(fold_in(key, r), step)."""
  keys = request_keys(key, jnp.arange(logits.shape[0]), step)
  return sample_next_token(logits, keys, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)


def _decode_step(model: Transformer, key: Array, prompt_len: int, o: _Options):
  """The while-loop body: feed the previous token through the cache, sample the next one."""

  def body(s: _DecodeState) -> _DecodeState:
    previous = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1)  # [B, 1]
    hidden, cache = hidden_states_with_cache(model, previous, s.cache, prompt_len + s.step - 1)
    logits = model.logits_from_hidden(hidden)[:, 0]
    token, logp = _sample(logits, key, s.step, o)
    done = s.finished
    token = jnp.where(done, o.pad_id, token)
    logp = jnp.where(done, 0.0, logp)
    return _DecodeState(
      step=s.step + 1,
      cache=cache,
      tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, token, s.step, axis=1),
      logprobs=jax.lax.dynamic_update_index_in_dim(s.logprobs, logp, s.step, axis=1),
      lengths=s.lengths + (~done).astype(jnp.int32),
      finished=done | _is_stop(token, o.stop_tokens),
    )

  return body


def _generate_traced(
  model: Transformer, prompt_tokens: Array, prompt_mask: Array, key: Array, o: _Options
) -> Rollout:
  if not isinstance(model, Transformer):
    raise ValueError(f"`model` must be a rljax Transformer; got {type(model).__name__}.")
  b, p = prompt_tokens.shape
  n, steps = o.num_samples, o.max_new_tokens
  # Prefill once per prompt, then repeat the cache for the samples (rows i*n .. i*n+n-1).
  cache = init_kv_cache(model.config, b, p + steps)
  hidden, cache = hidden_states_with_cache(model, prompt_tokens, cache, 0, prompt_mask)
  logits = jnp.repeat(model.logits_from_hidden(hidden[:, -1:])[:, 0], n, axis=0)
  cache = cache.repeat(n)
  token, logp = _sample(logits, key, 0, o)
  rows = b * n
  state = _DecodeState(
    step=jnp.asarray(1, jnp.int32),
    cache=cache,
    tokens=jnp.full((rows, steps), o.pad_id, jnp.int32).at[:, 0].set(token),
    logprobs=jnp.zeros((rows, steps), logp.dtype).at[:, 0].set(logp),
    lengths=jnp.ones((rows,), jnp.int32),
    finished=_is_stop(token, o.stop_tokens),
  )
  state = jax.lax.while_loop(
    lambda s: (s.step < steps) & ~jnp.all(s.finished), _decode_step(model, key, p, o), state
  )
  prompt_tokens = jnp.repeat(prompt_tokens, n, axis=0)
  completion_mask = jnp.arange(steps)[None, :] < state.lengths[:, None]
  return Rollout(
    tokens=jnp.concatenate([prompt_tokens, state.tokens], axis=1),
    prompt_mask=jnp.repeat(prompt_mask, n, axis=0),
    completion_mask=completion_mask,
    logprobs=jnp.where(completion_mask, state.logprobs, 0.0),
    lengths=state.lengths,
    finished=state.finished,
  )


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate_jit(
  graphdef: Any, state: Any, prompt_tokens: Array, prompt_mask: Array, key: Array, o: _Options
) -> Rollout:
  return _generate_traced(nnx.merge(graphdef, state), prompt_tokens, prompt_mask, key, o)


def _split_model(model: Any) -> tuple[Any, Any]:
  if isinstance(model, nnx.Module):
    return nnx.split(model)
  if isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
    return model[0], model[1]
  raise ValueError(
    f"`model` must be an NNX module or a (graphdef, state) pair; got {type(model).__name__}."
  )


def _id_range(vocab_size: int | None) -> str:
  return "[0, inf)" if vocab_size is None else f"[0, {vocab_size}) (the model's vocab_size)"


def _is_token_id(value: Any, vocab_size: int | None) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
          and (vocab_size is None or value < vocab_size))


def _vocab_size(model: Any) -> int | None:
  """V of a module or graphdef (`config_of`), None when it has no `ModelConfig`."""
  config = config_of(model)
  return None if config is None else config.vocab_size


def check_token_ids(model: Any, *, pad_id: Any, stop_tokens: Any) -> tuple[int, ...]:
  """Checks `pad_id` and `stop_tokens` (an id or a sequence of ids) as token ids in [0, V), V
  the vocab_size of `model` (a module or its graphdef; only >= 0 when it has no
  `ModelConfig`), and returns the stop tokens as a tuple of ints; a ValueError names the
  argument, the value and the range. `generate` and the on-policy trainers (at construction)
  call it.

  Example:
    >>> check_token_ids(graphdef, pad_id=eos, stop_tokens=[eos])  # (eos,)
  """
  vocab_size = _vocab_size(model)
  if not _is_token_id(pad_id, vocab_size):
    raise ValueError(f"`pad_id` must be a token id in {_id_range(vocab_size)}; got {pad_id!r}.")
  one = isinstance(stop_tokens, (numbers.Number, str, bytes)) or not hasattr(stop_tokens,
                                                                              "__iter__")
  values = (stop_tokens,) if one else tuple(stop_tokens)
  bad = [t for t in values if not _is_token_id(t, vocab_size)]
  if bad:
    raise ValueError(f"`stop_tokens` must be a token id or a sequence of token ids in "
                     f"{_id_range(vocab_size)}; got {stop_tokens!r} ({bad[0]!r} is not).")
  return tuple(int(t) for t in values)


def _check_prompt_ids(prompt_tokens: Any, prompt_mask: Any, vocab_size: int | None) -> None:
  """ValueError unless every real prompt token (`prompt_mask` 1) of the [B, P] arrays is an id
  in [0, vocab_size). Padding slots may hold any id: they are never attended to, and their
  (clipped) embedding is finite. Traced prompts (a caller's `jit`) are not checked."""
  if vocab_size is None or any(isinstance(x, jax.core.Tracer) for x in (prompt_tokens,
                                                                         prompt_mask)):
    return
  ids = prompt_tokens  # numpy or device arrays (a device array is checked on its device)
  bad = (prompt_mask != 0) & ((ids < 0) | (ids >= vocab_size))
  count = int(bad.sum())
  if count:
    row, column = divmod(int(bad.reshape(-1).argmax()), ids.shape[1])
    raise ValueError(f"`prompt_tokens` must hold token ids in {_id_range(vocab_size)} where "
                     f"`prompt_mask` is 1; got {int(ids[row, column])} at row {row}, column "
                     f"{column} ({count} such ids).")


def _check_prompts(prompt_tokens: Any, prompt_mask: Any, vocab_size: int | None
                   ) -> tuple[Array, Array]:
  prompt_tokens, prompt_mask = (x if isinstance(x, jax.Array) else np.asarray(x)
                                for x in (prompt_tokens, prompt_mask))
  tokens, mask = jnp.shape(prompt_tokens), jnp.shape(prompt_mask)
  if len(tokens) != 2 or tokens[1] < 1:
    raise ValueError(f"`prompt_tokens` must be [B, P] with P >= 1; got shape {tokens}.")
  check_integer_ids("prompt_tokens", prompt_tokens)
  if mask != tokens:
    raise ValueError(f"`prompt_mask` has shape {mask} but `prompt_tokens` has shape {tokens}.")
  _check_prompt_ids(prompt_tokens, prompt_mask, vocab_size)
  return jnp.asarray(prompt_tokens).astype(jnp.int32), jnp.asarray(prompt_mask).astype(bool)


def _check_key(key: Any) -> None:
  typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  raw = jnp.shape(key) == (2,) and jnp.result_type(key) == jnp.uint32
  if not (typed and key.ndim == 0) and not raw:
    raise ValueError(
      "`key` must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); got "
      f"shape {jnp.shape(key)} dtype {jnp.result_type(key)}."
    )


_SAMPLING_KEYWORDS = ("max_new_tokens", "temperature", "top_k", "top_p", "num_samples")


def sampling_from_arguments(sampling: SamplingConfig | None, keywords: dict[str, Any]
                            ) -> SamplingConfig:
  """The `SamplingConfig` of a sampler call: `sampling`, or one built (and validated) from the
  keyword options that are not None; a ValueError when both or neither are given."""
  unknown = sorted(set(keywords) - set(_SAMPLING_KEYWORDS))
  if unknown:
    raise ValueError(f"unknown sampling options {unknown}; expected {list(_SAMPLING_KEYWORDS)}.")
  given = {k: v for k, v in keywords.items() if v is not None}
  if sampling is None:
    if "max_new_tokens" not in given:
      raise ValueError("`max_new_tokens` is required (or pass a `sampling=SamplingConfig(...)`).")
    return SamplingConfig(**given)  # validates every option, naming it
  if given:
    raise ValueError(f"give the sampling options either in `sampling` or as keywords, not "
                     f"both (got `sampling` and {sorted(given)}).")
  if not isinstance(sampling, SamplingConfig):
    raise ValueError(f"`sampling` must be a SamplingConfig; got {type(sampling).__name__}.")
  return sampling


def generate(
  model: Any,
  prompt_tokens: Array,
  prompt_mask: Array,
  key: Array,
  sampling: SamplingConfig | None = None,
  *,
  max_new_tokens: int | None = None,
  temperature: float | None = None,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_tokens: int | Sequence[int],
  pad_id: int,
  num_samples: int | None = None,
) -> Rollout:
  """Samples `num_samples` completions of each left-padded prompt with a KV cache.

  Prefill runs the prompts once (positions from `prompt_mask`, padded slots never attended to),
  the cache (P + max_new_tokens slots) is repeated `num_samples` times, then a
  `lax.while_loop` decodes one token per step for all rows. Step t draws
    token ~ softmax(logits / temperature) restricted by top_k / top_p   (argmax if temperature 0)
  with key `fold_in(fold_in(key, r), t)` for row r (`request_keys`: the continuous-batching
  engine draws the same tokens), and records logp = log_softmax(logits / temperature)[token]
  (untruncated; temperature 1 when greedy), which equals
  `token_logprobs(model(rollout.tokens, rollout.attention_mask)[:, P-1:-1], completion,
  temperature=T)` — the log-probs a trainer recomputes (verl / TRL convention). A row that emits
  one of `stop_tokens` is finished: it then emits `pad_id` with log-prob 0; the loop exits as
  soon as every row is finished.

  Args:
    model: a `rljax.models.transformer.Transformer`, or its `(graphdef, state)` pair from
      `nnx.split` (e.g. with re-sharded parameters).
    prompt_tokens: [B0, P] int token ids, left-padded to a common length P; the real ones
      (`prompt_mask` 1) in [0, V), V the model's vocab_size (padding slots may hold any id).
    prompt_mask: [B0, P] bool/0-1, 1 marks a real prompt token. Every row needs at least one
      (an all-padding row gives finite but meaningless samples).
    key: a PRNG key; the result is a deterministic function of it.
    sampling: a `SamplingConfig` holding max_new_tokens, temperature, top_k, top_p and
      num_samples (the trainers pass theirs); or give those options as keywords instead (not
      both). `rollout_dtype` is the caller's business (cast the parameters before).
    max_new_tokens: N >= 1 (static).
    temperature: >= 0 (static), default 1.0; 0 is greedy decoding.
    top_k: None or an int >= 1 (static): sample among the k most likely tokens.
    top_p: None or a float in (0, 1] (static): sample from the smallest set of most likely
      tokens (after top-k) whose probability reaches top_p; the top token is always kept.
    stop_tokens: an id or a sequence of ids in [0, V) (e.g. EOS and end-of-turn); may be
      empty.
    pad_id: the id in [0, V) written after a row's stop token; it may equal a stop token
      (masks come from lengths).
    num_samples: completions per prompt (static), default 1; those of prompt i are the
      contiguous rows i * num_samples + j.

  Returns:
    A `Rollout` with B = B0 * num_samples rows (see its fields).

  Raises:
    ValueError: a bad argument (named in the message): shapes, dtypes, option ranges, token
      ids outside [0, V) (`check_token_ids`, the real prompt tokens), model.

  Example:
    >>> out = generate(model, prompts, prompt_mask, jax.random.key(0), max_new_tokens=64,
    ...                temperature=0.7, top_p=0.95, stop_tokens=[eos_id], pad_id=eos_id,
    ...                num_samples=4)
    >>> logits = model(out.tokens, out.attention_mask)[:, P - 1 : -1]
    >>> logp = token_logprobs(logits, out.tokens[:, P:], temperature=0.7)  # == out.logprobs
  """
  sampling = sampling_from_arguments(sampling, {
    "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
    "top_p": top_p, "num_samples": num_samples})
  graphdef, state = _split_model(model)
  tokens, mask = _check_prompts(prompt_tokens, prompt_mask, _vocab_size(graphdef))
  _check_key(key)
  stop_tokens = check_token_ids(graphdef, pad_id=pad_id, stop_tokens=stop_tokens)
  options = _Options(
    max_new_tokens=sampling.max_new_tokens,
    temperature=float(sampling.temperature),
    top_k=sampling.top_k,
    top_p=None if sampling.top_p is None else float(sampling.top_p),
    stop_tokens=stop_tokens,
    pad_id=int(pad_id),
    num_samples=sampling.num_samples,
  )
  return _generate_jit(graphdef, state, tokens, mask, key, options)
