"""Stop strings: a completion ends at the first token whose decoded text completes a stop string.

The text after completion token t is decode(ids[:t+1]) (the tokenizer's `decode`, special tokens
skipped: the text a reward function sees). With stop strings S a row ends at

  length = min{t + 1 : some s ∈ S occurs in decode(ids[:t+1])}

(`finished` True, its later tokens dropped: `pad_id`, log-prob 0, mask 0), or keeps its length
when no prefix holds one. The engine checks each new token of a request between device calls and
frees its slot (`engine_generate(stop_strings=)`); the static `generate` is cut after the fact
(`cut_at_stop_strings`); both give the same `Rollout`. Every prefix is decoded once (exact for any
tokenizer, whose decoded prefixes need not extend one another): O(N²) characters per row.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax.rollout.generate import Rollout


def check_stop_strings(stop_strings: str | Sequence[str] | None, tokenizer: Any
                       ) -> tuple[str, ...]:
  """`stop_strings` (None, a string, or a sequence of non-empty strings) as a tuple; a
  ValueError names `stop_strings`, or `tokenizer` when strings are given without one that can
  `decode`."""
  if stop_strings is None:
    return ()
  values = (stop_strings,) if isinstance(stop_strings, str) else stop_strings
  if not hasattr(values, "__iter__"):
    raise ValueError(f"`stop_strings` must be a sequence of non-empty strings; got "
                     f"{stop_strings!r}.")
  values = tuple(values)
  bad = [s for s in values if not isinstance(s, str) or not s]
  if bad:
    raise ValueError(f"`stop_strings` must be a sequence of non-empty strings; got "
                     f"{stop_strings!r} ({bad[0]!r} is not).")
  if values and not callable(getattr(tokenizer, "decode", None)):
    raise ValueError(f"`stop_strings` need a `tokenizer` with a `decode` method to read the "
                     f"completions; got {type(tokenizer).__name__}.")
  return values


def stop_length(tokenizer: Any, ids: Sequence[int], stop_strings: Sequence[str],
                start: int = 0) -> int:
  """min{t + 1 : t ≥ start, some stop string occurs in decode(ids[:t+1])}, 0 when none does
  (`start`: the prefixes of up to `start` tokens are known to hold none)."""
  ids = [int(i) for i in ids]
  for t in range(start, len(ids)):
    text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
    if any(s in text for s in stop_strings):
      return t + 1
  return 0


def cut_rollout(rollout: Rollout, cut: Any, *, pad_id: int) -> Rollout:
  """`rollout` with row b ended after cut[b] completion tokens where cut[b] > 0 (at most its
  length): `lengths` = cut, `finished` True, later tokens `pad_id` with log-prob 0 and mask 0;
  rows with cut[b] = 0 unchanged."""
  cut = jnp.asarray(cut, jnp.int32)
  p, n = rollout.prompt_mask.shape[1], rollout.completion_mask.shape[1]
  lengths = jnp.where(cut > 0, cut, rollout.lengths)
  mask = jnp.arange(n)[None, :] < lengths[:, None]
  completion = jnp.where(mask, rollout.tokens[:, p:], pad_id).astype(rollout.tokens.dtype)
  return rollout._replace(
    tokens=jnp.concatenate([rollout.tokens[:, :p], completion], axis=1), completion_mask=mask,
    logprobs=jnp.where(mask, rollout.logprobs, 0.0), lengths=lengths,
    finished=rollout.finished | (cut > 0))


def cut_at_stop_strings(rollout: Rollout, tokenizer: Any, stop_strings: Sequence[str], *,
                        pad_id: int) -> Rollout:
  """`rollout` (e.g. `generate`'s) with every row cut at its first stop string (`stop_length`
  on the host, then `cut_rollout`); unchanged when `stop_strings` is empty."""
  if not stop_strings:
    return rollout
  tokens, lengths = jax.device_get((rollout.tokens, rollout.lengths))
  p = rollout.prompt_mask.shape[1]
  cut = np.array([stop_length(tokenizer, row[p:p + int(k)], stop_strings)
                  for row, k in zip(tokens, lengths)], np.int32)
  return cut_rollout(rollout, cut, pad_id=pad_id)
