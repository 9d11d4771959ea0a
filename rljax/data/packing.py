"""Sequence packing: several tokenized records per row of a static length, for SFT, reward-model
and DPO-family batches (first-fit decreasing into static shapes).

The packed format. A packed batch has R rows of T slots and N sequence slots (all static, so a
jitted step compiles once):

  input_ids, attention_mask, loss_mask  [R, T] int32   the sequences laid end to end in rows;
                                                       loss_mask 1 on response tokens
  positions                             [R, T] int32   offset in the sequence (restarts at 0)
  segment_ids                           [R, T] int32   index n ∈ [0, N) of the token's sequence in
                                                       the batch's UNPACKED order; N on padding
  sequence_mask                         [N] int32      1 for a real sequence, 0 for an empty slot
  label (KTO)                           [P] bool       per record, False on empty slots

The unpacked order: the batch's b ≤ P records are numbered j = 0..b-1 in data order, P =
`max_records` is the static number of record slots, and member m of record j is sequence
n = m·P + j:

  sft         N = P    response j                          (m = 0)
  preference  N = 2P   chosen j at j, rejected j at P + j  (the [2B] order of `dpo_objective`'s
                                                            single pass)
  kto         N = 2P   completion j at j, its KL completion at P + j (kl_pairs=True; N = P
                       without): prompt j with the completion of the record before it in data
                       order, `add_kl_completions`

Padding ids are N, not −1: `jax.ops.segment_sum` drops every id outside [0, N), but `x.at[-1]`
wraps to the last sequence while `x.at[N]` drops too, and N keeps a row's ids ascending (within a
row sequences are laid out by increasing id). Masks keep padding out regardless. All sequences of
a record share one row, so splitting the rows into microbatches never splits a pair. The
objectives of `rljax.train` read this format by segment (`rljax.train.packed`).

Packing. `first_fit_decreasing` places records (longest first, ties in data order) into the
first of R rows with room, up to P records. `plan_batches` runs it over a stream in data order
with a window: each batch is packed from the next `window` records not yet placed, the oldest of
them first (so no record waits longer than the window takes to drain); what does not fit waits
for the next batch. A record longer than T is an error naming it (tokenize with `max_length` to
truncate or drop long examples). `PackedBatchIterator` is `BatchIterator`'s packed analogue:
epochs in the same seeded order, planned once per epoch, resumable by (epoch, batch).
`padding_fraction(batch)` is the share of slots that hold no token (the runner logs it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.data.iterator import epoch_order
from rljax.ops._checks import check_choice, check_int

KINDS = ("sft", "preference", "kto")
# The response fields of a record's sequences (member m), per kind; each is joined to the prompt.
MEMBERS = {"sft": ("response_ids",), "preference": ("chosen_ids", "rejected_ids"),
           "kto": ("completion_ids", "kl_completion_ids")}


def _members(kind: str, kl_pairs: bool) -> tuple[str, ...]:
  check_choice("packing kind `kind`", kind, KINDS)
  return MEMBERS[kind][:1] if kind == "kto" and not kl_pairs else MEMBERS[kind]


def record_length(record: dict, kind: str, *, kl_pairs: bool = True) -> int:
  """Tokens a record takes in a packed row: Σ over its sequences of len(prompt) + len(response)."""
  prompt = len(record["prompt_ids"])
  return sum(prompt + len(record[field]) for field in _members(kind, kl_pairs))


def add_kl_completions(records: Sequence[dict], *, max_length: int | None = None) -> list[dict]:
  """KTO records with "kl_completion_ids": the completion of the record before (cyclically), the
  mismatched pairs TRL's KL dataset makes by shifting completions (`collate_kto` shifts within a
  batch; packing needs each record's KL length up front, so the shift is over the records).

  With `max_length` a KL completion is cut to max_length − len(prompt) tokens (at least one), so
  prompt + KL completion fits in max_length like the record itself (`fit_length`'s rule)."""
  if max_length is not None:
    check_int("max_length", max_length, 2)
  out = []
  for i, r in enumerate(records):
    completion = list(records[i - 1]["completion_ids"])
    if max_length is not None:
      completion = completion[:max(max_length - len(r["prompt_ids"]), 1)]
    out.append({**r, "kl_completion_ids": completion})
  return out


def _check_fits(lengths: Sequence[int], row_length: int, names: Sequence[Any] | None = None):
  for i, n in enumerate(lengths):
    if n > row_length:
      name = i if names is None else names[i]
      raise ValueError(
        f"record {name} needs {n} tokens but a packed row holds `row_length` = {row_length}; "
        "tokenize with `max_length` to truncate or drop long examples, or raise `row_length`.")


def first_fit_decreasing(
  lengths: Sequence[int],
  *,
  row_length: int,
  num_rows: int,
  max_items: int | None = None,
  first: int | None = None,
) -> tuple[list[list[int]], list[int]]:
  """Packs items into `num_rows` rows of `row_length` by first-fit decreasing.

  Items are visited longest first (ties by index; item `first`, if given, before all others)
  and each goes into the first row with room; at most `max_items` are placed.

  Returns:
    (rows, rest): for each row the indices of its items (ascending), and the unplaced indices
    (ascending).

  Raises:
    ValueError: an item longer than `row_length` (named by index).
  """
  check_int("row_length", row_length, 1)
  check_int("num_rows", num_rows, 1)
  if max_items is not None:
    check_int("max_items", max_items, 1)
  _check_fits(lengths, row_length)
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  if first is not None:
    order.remove(first)
    order.insert(0, first)
  free, rows, placed = [row_length] * num_rows, [[] for _ in range(num_rows)], set()
  for i in order:
    if max_items is not None and len(placed) >= max_items:
      break
    for r in range(num_rows):
      if lengths[i] <= free[r]:
        rows[r].append(i)
        free[r] -= lengths[i]
        placed.add(i)
        break
  rest = [i for i in range(len(lengths)) if i not in placed]
  return [sorted(row) for row in rows], rest


def plan_batches(
  lengths: Sequence[int],
  *,
  row_length: int,
  num_rows: int,
  max_records: int,
  window: int,
) -> list[list[list[int]]]:
  """Packed batches of a stream of items in data order (module doc): a list of batches, each
  `num_rows` lists of item indices. Every item is placed exactly once; the batch that holds
  item i is never earlier than the one holding an item > i + window."""
  check_int("window", window, 1)
  check_int("max_records", max_records, 1)
  _check_fits(lengths, row_length)
  batches, buffer, upcoming = [], [], 0
  while upcoming < len(lengths) or buffer:
    take = min(window - len(buffer), len(lengths) - upcoming)
    buffer += range(upcoming, upcoming + max(take, 0))
    upcoming += max(take, 0)
    rows, rest = first_fit_decreasing([lengths[i] for i in buffer], row_length=row_length,
                                      num_rows=num_rows, max_items=max_records, first=0)
    batches.append([[buffer[k] for k in row] for row in rows])
    buffer = [buffer[k] for k in rest]
  return batches


def pack_records(
  kind: str,
  records: Sequence[dict],
  rows: Sequence[Sequence[int]],
  *,
  row_length: int,
  max_records: int,
  pad_id: int,
  kl_pairs: bool = True,
) -> dict[str, np.ndarray]:
  """The packed batch (module doc) of `records` laid out by `rows` (indices into `records`,
  which are the batch's records in data order: record j is sequence j, P + j, ...)."""
  members = _members(kind, kl_pairs)
  check_int("max_records", max_records, 1)
  if len(records) > max_records:
    raise ValueError(f"{len(records)} records exceed `max_records` ({max_records}) slots.")
  p, num_rows = max_records, len(rows)
  n = p * len(members)
  ids = np.full((num_rows, row_length), pad_id, np.int32)
  attention, loss, positions = (np.zeros((num_rows, row_length), np.int32) for _ in range(3))
  segments = np.full((num_rows, row_length), n, np.int32)
  sequence_mask = np.zeros((n,), np.int32)
  for r, row in enumerate(rows):
    t = 0
    for m, field in enumerate(members):  # member-major: ids ascend along the row
      for j in sorted(row):
        prompt, response = records[j]["prompt_ids"], records[j][field]
        size = len(prompt) + len(response)
        if t + size > row_length:
          raise ValueError(f"row {r} overflows `row_length` ({row_length}) at record {j}.")
        ids[r, t:t + size] = list(prompt) + list(response)
        attention[r, t:t + size] = 1
        loss[r, t + len(prompt):t + size] = 1
        positions[r, t:t + size] = np.arange(size)
        segments[r, t:t + size] = m * p + j
        sequence_mask[m * p + j] = 1
        t += size
  batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
           "positions": positions, "segment_ids": segments, "sequence_mask": sequence_mask}
  if kind == "kto":
    label = np.zeros((p,), bool)
    label[:len(records)] = [bool(rec["label"]) for rec in records]
    batch["label"] = label
  return batch


def collate_packed(
  kind: str,
  records: Sequence[dict],
  *,
  row_length: int,
  num_rows: int,
  max_records: int | None = None,
  pad_id: int,
  kl_pairs: bool = True,
) -> dict[str, np.ndarray]:
  """All of `records` packed into one batch of `num_rows` × `row_length` by first-fit decreasing
  (`max_records` slots, default len(records)). KTO records need "kl_completion_ids" when
  kl_pairs (`add_kl_completions`).

  Raises:
    ValueError: a record longer than `row_length`, or the records do not fit in the rows.

  Example:
    >>> batch = collate_packed("sft", records, row_length=512, num_rows=4, pad_id=0)
  """
  if len(records) == 0:
    raise ValueError("`records` is empty; a batch needs at least one record.")
  lengths = [record_length(r, kind, kl_pairs=kl_pairs) for r in records]
  slots = len(records) if max_records is None else max_records
  rows, rest = first_fit_decreasing(lengths, row_length=row_length, num_rows=num_rows,
                                    max_items=slots)
  if rest:
    raise ValueError(f"{len(rest)} of {len(records)} records ({sum(lengths)} tokens) do not fit "
                     f"in `num_rows` = {num_rows} rows of `row_length` = {row_length} with "
                     f"`max_records` = {slots}; use more rows or `plan_batches`.")
  return pack_records(kind, records, rows, row_length=row_length, max_records=slots,
                      pad_id=pad_id, kl_pairs=kl_pairs)


def padding_fraction(batch: dict[str, Any]) -> float:
  """Share of a batch's token slots that hold no token: 1 − Σ attention masks / their size
  (every "*attention_mask" key, so padded pair batches count both sides)."""
  masks = [np.asarray(v) for k, v in batch.items() if k.endswith("attention_mask")]
  if not masks:
    raise ValueError(f"the batch has no attention mask; keys {sorted(batch)}.")
  return 1.0 - sum(float(m.sum()) for m in masks) / sum(m.size for m in masks)


class PackedBatchIterator:
  """Packed batches of `records` in a seeded order, resumable (the packed `BatchIterator`).

  Epoch e visits the records in `epoch_order(seed, e)` (BatchIterator's order) and packs that
  stream by `plan_batches`; the last batches of an epoch hold what is left. `state_dict()` is
  (epoch, batch, seed): the plan is a pure function of the order and the lengths, so a restored
  iterator replans the epoch and yields exactly the batches that would have followed.

  Args:
    records: tokenized records of `kind` ("sft", "preference", "kto"; KTO records need
      "kl_completion_ids" with kl_pairs, `add_kl_completions`).
    kind: the record format.
    row_length: T, tokens per row; every record must fit in one row (for pairs: prompt twice
      plus both responses).
    num_rows: R, rows per batch.
    max_records: P, record slots per batch (default: as many as could ever fit, R·T over the
      shortest record, rounded up to a multiple of 8 so slots shard over up to 8 devices).
    pad_id: the padding token.
    seed: the shuffling seed (keyword-only, required).
    shuffle: reshuffle every epoch (default True).
    window: records of lookahead (default: two batches' worth of tokens at the mean record
      length, at least 2 · R).
    kl_pairs: KTO: pack each record's KL completion too (default True).
    num_epochs: stop after this many epochs; None runs forever.
  """

  def __init__(self, records: Sequence[dict], *, kind: str, row_length: int, num_rows: int,
               pad_id: int, seed: int, max_records: int | None = None, shuffle: bool = True,
               window: int | None = None, kl_pairs: bool = True, num_epochs: int | None = None):
    check_int("row_length", row_length, 1)
    check_int("num_rows", num_rows, 1)
    if len(records) == 0:
      raise ValueError("`records` is empty.")
    self.lengths = [record_length(r, kind, kl_pairs=kl_pairs) for r in records]
    _check_fits(self.lengths, row_length)
    capacity = num_rows * row_length
    if max_records is None:
      max_records = 8 * math.ceil(capacity // max(min(self.lengths), 1) / 8)
    if window is None:
      window = max(2 * num_rows, math.ceil(2 * capacity / np.mean(self.lengths)))
    check_int("max_records", max_records, 1)
    check_int("window", window, 1)
    if num_epochs is not None:
      check_int("num_epochs", num_epochs, 1)
    self.records, self.kind, self.kl_pairs = records, kind, kl_pairs
    self.row_length, self.num_rows, self.max_records = row_length, num_rows, max_records
    self.pad_id, self.seed, self.shuffle, self.window = pad_id, int(seed), shuffle, window
    self.num_epochs, self.epoch, self.batch = num_epochs, 0, 0
    self._plan_epoch: int | None = None
    self._order, self._plan = np.arange(0), []

  def plan(self, epoch: int) -> tuple[np.ndarray, list[list[list[int]]]]:
    """(order, batches) of epoch `epoch`: the visiting order and, per batch and row, the
    positions in that order of its records."""
    order = epoch_order(len(self.records), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
    plan = plan_batches([self.lengths[i] for i in order], row_length=self.row_length,
                        num_rows=self.num_rows, max_records=self.max_records, window=self.window)
    return order, plan

  def _epoch_plan(self) -> list[list[list[int]]]:
    if self._plan_epoch != self.epoch:
      (self._order, self._plan), self._plan_epoch = self.plan(self.epoch), self.epoch
    return self._plan

  def __iter__(self) -> PackedBatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.batch >= len(self._epoch_plan()):
      self.epoch, self.batch = self.epoch + 1, 0
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    rows = self._epoch_plan()[self.batch]
    self.batch += 1
    members = sorted(k for row in rows for k in row)  # positions in the epoch: data order
    local = {k: j for j, k in enumerate(members)}
    return pack_records(self.kind, [self.records[int(self._order[k])] for k in members],
                        [[local[i] for i in row] for row in rows], row_length=self.row_length,
                        max_records=self.max_records, pad_id=self.pad_id, kl_pairs=self.kl_pairs)

  def state_dict(self) -> dict[str, int]:
    """{"epoch", "batch", "seed"}: plain ints."""
    return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores a `state_dict()` (ValueError on missing keys or a negative batch)."""
    missing = {"epoch", "batch", "seed"} - set(state)
    if missing:
      raise ValueError(f"`state` lacks {sorted(missing)}; expected keys epoch, batch, seed.")
    if int(state["batch"]) < 0:
      raise ValueError(f"`state['batch']` must be >= 0; got {state['batch']}.")
    self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])
    self._plan_epoch = None


__all__ = [
  "PackedBatchIterator",
  "add_kl_completions",
  "collate_packed",
  "first_fit_decreasing",
  "pack_records",
  "padding_fraction",
  "plan_batches",
  "record_length",
]
