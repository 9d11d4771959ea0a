"""Collation of tokenized records into fixed-shape numpy batches, padded to a few bucket lengths.

A batch's length T is the smallest bucket >= its longest row, so a jitted step compiles once per
bucket instead of once per batch (`bucket_sizes`: powers of two capped at max_length).

  prompt-response (SFT, RM scoring)  right-padded  {input_ids, attention_mask, loss_mask} [B, T]
  prompts for generation             LEFT-padded   PromptBatch(tokens, mask [B, P], texts, fields)
  preference pairs                   right-padded  {chosen_*, rejected_*} [B, T] (one T for both,
                                                   so the DPO objective can run one [2B, T] pass)
  KTO                                right-padded  {input_ids, attention_mask, loss_mask} [B, T],
                                                   label [B] bool, and the KL pairs kl_* [B, T]
  ranked lists (listwise RM)         right-padded  {input_ids, attention_mask, loss_mask} [B, K, T]

`loss_mask` is 1 on the response tokens (EOS included), 0 on prompt and padding; masks are int32
0/1 (PromptBatch.mask is bool, as `rljax.rollout.generate` takes it). Key names match
`rljax.train.objectives` (`sft_loss`, `dpo_objective`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class PromptBatch(NamedTuple):
  """Prompts for generation.

  Attributes:
    tokens: [B, P] int32 prompt ids, LEFT-padded with pad_id to the bucket length P.
    mask: [B, P] bool, True on real prompt tokens.
    texts: B prompt strings (the rendered chat template for chat prompts), for reward functions.
    fields: {column: list of B values}: the extra dataset columns (e.g. "answer"); a column that
      a row lacks holds None there.
  """

  tokens: np.ndarray
  mask: np.ndarray
  texts: list[str]
  fields: dict[str, list]


def bucket_sizes(max_length: int, *, min_size: int = 16) -> list[int]:
  """[min_size, 2·min_size, 4·min_size, ...] below max_length, then max_length itself.

  Example:
    >>> bucket_sizes(100, min_size=16)
    [16, 32, 64, 100]
  """
  if not isinstance(max_length, int) or max_length < 1:
    raise ValueError(f"`max_length` must be an int >= 1; got {max_length!r}.")
  if not isinstance(min_size, int) or min_size < 1:
    raise ValueError(f"`min_size` must be an int >= 1; got {min_size!r}.")
  sizes, size = [], min_size
  while size < max_length:
    sizes.append(size)
    size *= 2
  return sizes + [max_length]


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket >= length (buckets=None: exactly `length`).

  Raises:
    ValueError: length exceeds the largest bucket (tokenize with max_length to truncate/drop).
  """
  if buckets is None:
    return max(int(length), 1)
  fitting = [b for b in buckets if b >= length]
  if not fitting:
    raise ValueError(
      f"a row of {length} tokens exceeds the largest bucket ({max(buckets)}); tokenize with "
      "`max_length` to truncate or drop long examples."
    )
  return min(fitting)


def pad_right(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> np.ndarray:
  """[B, length] int32, each row followed by pad_id."""
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def pad_left(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> np.ndarray:
  """[B, length] int32, each row preceded by pad_id."""
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    if len(row):
      out[i, length - len(row):] = row
  return out


def _check_rows(records: Sequence[Any], name: str = "records") -> None:
  if len(records) == 0:
    raise ValueError(f"`{name}` is empty; a batch needs at least one record.")


def prompt_response_arrays(
  prompts: Sequence[Sequence[int]],
  responses: Sequence[Sequence[int]],
  *,
  pad_id: int,
  length: int,
) -> dict[str, np.ndarray]:
  """Right-padded {input_ids, attention_mask, loss_mask} [B, length] of prompt + response ids."""
  ids, attention, loss = [], [], []
  for p, r in zip(prompts, responses):
    ids.append(list(p) + list(r))
    attention.append([1] * (len(p) + len(r)))
    loss.append([0] * len(p) + [1] * len(r))
  return {
    "input_ids": pad_right(ids, length, pad_id),
    "attention_mask": pad_right(attention, length, 0),
    "loss_mask": pad_right(loss, length, 0),
  }


def collate_sft(
  records: Sequence[dict], *, pad_id: int, buckets: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
  """SFT / scoring batch from `tokenize_sft` records: {input_ids, attention_mask, loss_mask}."""
  _check_rows(records)
  longest = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in records)
  return prompt_response_arrays(
    [r["prompt_ids"] for r in records], [r["response_ids"] for r in records],
    pad_id=pad_id, length=bucket_length(longest, buckets),
  )


def collate_prompts(
  records: Sequence[dict], *, pad_id: int, buckets: Sequence[int] | None = None
) -> PromptBatch:
  """Left-padded `PromptBatch` from `tokenize_prompt` records."""
  _check_rows(records)
  ids = [r["prompt_ids"] for r in records]
  length = bucket_length(max(len(i) for i in ids), buckets)
  tokens = pad_left(ids, length, pad_id)
  mask = pad_left([[1] * len(i) for i in ids], length, 0).astype(bool)
  keys: list[str] = []
  for r in records:
    keys += [k for k in r.get("fields", {}) if k not in keys]
  fields = {k: [r.get("fields", {}).get(k) for r in records] for k in keys}
  return PromptBatch(tokens, mask, [r.get("text", "") for r in records], fields)


def collate_preference(
  records: Sequence[dict], *, pad_id: int, buckets: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
  """{chosen_input_ids, chosen_attention_mask, chosen_loss_mask, rejected_*} [B, T], one T."""
  _check_rows(records)
  prompts = [r["prompt_ids"] for r in records]
  longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                for r in records)
  length = bucket_length(longest, buckets)
  batch = {}
  for side in ("chosen", "rejected"):
    arrays = prompt_response_arrays(prompts, [r[f"{side}_ids"] for r in records],
                                    pad_id=pad_id, length=length)
    batch.update({f"{side}_{k}": v for k, v in arrays.items()})
  return batch


def collate_kto(
  records: Sequence[dict],
  *,
  pad_id: int,
  buckets: Sequence[int] | None = None,
  kl_pairs: bool = True,
) -> dict[str, np.ndarray]:
  """KTO batch: {input_ids, attention_mask, loss_mask} [B, T], label [B] bool, and with
  kl_pairs the mismatched pairs kl_input_ids / kl_attention_mask / kl_loss_mask [B, T] (prompt i
  with completion i − 1 mod B: TRL's KL dataset, used to estimate the KL reference point z0)."""
  _check_rows(records)
  prompts = [r["prompt_ids"] for r in records]
  completions = [r["completion_ids"] for r in records]
  shifted = completions[-1:] + completions[:-1]
  longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
  if kl_pairs:
    longest = max(longest, max(len(p) + len(c) for p, c in zip(prompts, shifted)))
  length = bucket_length(longest, buckets)
  batch = prompt_response_arrays(prompts, completions, pad_id=pad_id, length=length)
  batch["label"] = np.asarray([r["label"] for r in records], bool)
  if kl_pairs:
    kl = prompt_response_arrays(prompts, shifted, pad_id=pad_id, length=length)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
  return batch


def collate_listwise(
  records: Sequence[dict], *, pad_id: int, buckets: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
  """Listwise batch {input_ids, attention_mask, loss_mask} [B, K, T], responses best first.

  Every record needs the same K (ValueError naming the record otherwise).
  """
  _check_rows(records)
  k = len(records[0]["response_ids"])
  for i, r in enumerate(records):
    if len(r["response_ids"]) != k:
      raise ValueError(
        f"`records[{i}]` has {len(r['response_ids'])} responses but `records[0]` has {k}; "
        "a listwise batch needs the same K for every prompt."
      )
  longest = max(len(r["prompt_ids"]) + max(map(len, r["response_ids"])) for r in records)
  length = bucket_length(longest, buckets)
  flat = prompt_response_arrays(
    [r["prompt_ids"] for r in records for _ in range(k)],
    [resp for r in records for resp in r["response_ids"]],
    pad_id=pad_id, length=length,
  )
  return {key: v.reshape(len(records), k, length) for key, v in flat.items()}


COLLATORS = {
  "prompt": collate_prompts,
  "sft": collate_sft,
  "preference": collate_preference,
  "kto": collate_kto,
  "ranked": collate_listwise,
}


def collator(kind: str, *, pad_id: int, buckets: Sequence[int] | None = None, **kwargs: Any):
  """`collate(records) -> batch` for `BatchIterator`, for kind "prompt", "sft", "preference",
  "kto" or "ranked" (the kinds of `tokenize_dataset`)."""
  if kind not in COLLATORS:
    raise ValueError(f"Unknown kind {kind!r}; valid choices: {', '.join(map(repr, COLLATORS))}.")
  fn = COLLATORS[kind]
  buckets = None if buckets is None else sorted(int(b) for b in buckets)

  def collate(records: Sequence[dict]):
    return fn(records, pad_id=pad_id, buckets=buckets, **kwargs)

  return collate
