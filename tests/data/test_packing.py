"""Sequence packing against plain-Python references: first-fit decreasing, the windowed planner
(every record exactly once, no row over T), the packed layout, the padding fraction, the
resumable iterator and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rljax.data.packing import (
  PackedBatchIterator,
  add_kl_completions,
  collate_packed,
  first_fit_decreasing,
  padding_fraction,
  plan_batches,
  record_length,
)


def reference_ffd(lengths, capacity, rows, max_items):
  """First-fit decreasing, transcribed: longest first (ties by index), first row with room."""
  bins, free, placed = [[] for _ in range(rows)], [capacity] * rows, 0
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if placed == max_items:
      break
    for b in range(rows):
      if free[b] >= lengths[i]:
        bins[b].append(i)
        free[b] -= lengths[i]
        placed += 1
        break
  return [sorted(b) for b in bins]


@given(st.lists(st.integers(1, 16), min_size=1, max_size=30), st.integers(1, 5),
       st.integers(1, 40))
def test_first_fit_decreasing_matches_the_reference(lengths, rows, max_items):
  packed, rest = first_fit_decreasing(lengths, row_length=16, num_rows=rows, max_items=max_items)
  assert packed == reference_ffd(lengths, 16, rows, max_items)
  assert sorted([i for row in packed for i in row] + rest) == list(range(len(lengths)))
  assert rest == sorted(rest)
  assert all(sum(lengths[i] for i in row) <= 16 for row in packed)


@given(st.lists(st.integers(1, 16), min_size=1, max_size=60), st.integers(1, 4),
       st.integers(1, 8), st.integers(1, 12))
def test_plan_places_every_record_exactly_once(lengths, rows, max_records, window):
  plan = plan_batches(lengths, row_length=16, num_rows=rows, max_records=max_records,
                      window=window)
  placed = [i for batch in plan for row in batch for i in row]
  assert sorted(placed) == list(range(len(lengths)))  # exactly once
  done: set[int] = set()
  for batch in plan:
    assert len(batch) == rows and sum(map(len, batch)) <= max_records
    assert all(sum(lengths[i] for i in row) <= 16 for row in batch)
    items = {i for row in batch for i in row}
    # the oldest record not yet placed is in every batch (so none waits more than `window`
    # batches), and nothing beyond the window of unplaced records is taken
    waiting = [i for i in range(len(lengths)) if i not in done]
    assert min(waiting) in items and items <= set(waiting[:window])
    done |= items


def test_window_keeps_data_order_and_fills_rows():
  """The oldest record of the window goes first, then the longest that fit (FFD); a record that
  fits nowhere waits for the next batch."""
  plan = plan_batches([10, 10, 6, 4, 6], row_length=16, num_rows=1, max_records=8, window=3)
  assert plan == [[[0, 2]], [[1, 4]], [[3]]]


def sft_records():
  return [{"prompt_ids": [1, 2], "response_ids": [3, 4, 5]},
          {"prompt_ids": [6], "response_ids": [7]},
          {"prompt_ids": [8, 9, 10], "response_ids": [11, 12, 13, 14]}]


def test_packed_layout_and_padding_fraction():
  batch = collate_packed("sft", sft_records(), row_length=8, num_rows=2, max_records=4, pad_id=0)
  # FFD: record 2 (7 tokens) fills row 0 with nothing else; records 0 (5) and 1 (2) share row 1.
  assert batch["input_ids"].tolist() == [[8, 9, 10, 11, 12, 13, 14, 0], [1, 2, 3, 4, 5, 6, 7, 0]]
  assert batch["segment_ids"].tolist() == [[2] * 7 + [4], [0] * 5 + [1] * 2 + [4]]  # pad: N
  assert batch["positions"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 4, 0, 1, 0]]
  assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 1, 0]]
  assert batch["attention_mask"].sum() == 14 and batch["sequence_mask"].tolist() == [1, 1, 1, 0]
  assert padding_fraction(batch) == pytest.approx(2 / 16)
  padded = {"chosen_attention_mask": np.array([[1, 1, 0, 0]]),
            "rejected_attention_mask": np.array([[1, 0, 0, 0]])}
  assert padding_fraction(padded) == pytest.approx(5 / 8)


def test_pairs_and_kto_order_their_sequences():
  pairs = [{"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4]},
           {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}]
  assert [record_length(p, "preference") for p in pairs] == [5, 7]
  batch = collate_packed("preference", pairs, row_length=8, num_rows=2, max_records=3, pad_id=0)
  ids, segs = batch["input_ids"], batch["segment_ids"]
  for j, p in enumerate(pairs):  # chosen j is sequence j, rejected j is sequence P + j
    assert ids[segs == j].tolist() == p["prompt_ids"] + p["chosen_ids"]
    assert ids[segs == 3 + j].tolist() == p["prompt_ids"] + p["rejected_ids"]
    assert len(set(np.nonzero(segs == j)[0]) | set(np.nonzero(segs == 3 + j)[0])) == 1  # one row
  assert batch["sequence_mask"].tolist() == [1, 1, 0, 1, 1, 0]
  kto = add_kl_completions([{"prompt_ids": [1], "completion_ids": [2], "label": True},
                            {"prompt_ids": [3], "completion_ids": [4, 5], "label": False}])
  assert [r["kl_completion_ids"] for r in kto] == [[4, 5], [2]]
  cut = add_kl_completions(kto, max_length=2)  # prompt (1) + KL completion <= 2 tokens
  assert [r["kl_completion_ids"] for r in cut] == [[4], [2]]
  batch = collate_packed("kto", kto, row_length=10, num_rows=1, max_records=3, pad_id=0)
  assert batch["label"].tolist() == [True, False, False]
  assert batch["input_ids"][batch["segment_ids"] == 3].tolist() == [1, 4, 5]  # KL of record 0
  assert batch["segment_ids"].shape == (1, 10) and batch["sequence_mask"].shape == (6,)


def test_iterator_covers_each_epoch_and_resumes_exactly():
  rng = np.random.default_rng(0)
  records = [{"prompt_ids": [1] * int(rng.integers(1, 4)),
              "response_ids": [2] * int(rng.integers(1, 9))} for _ in range(40)]
  it = PackedBatchIterator(records, kind="sft", row_length=16, num_rows=3, pad_id=0, seed=3)
  order, plan = it.plan(0)
  assert sorted(order[k] for batch in plan for row in batch for k in row) == list(range(40))
  first = [next(it) for _ in range(len(plan) + 2)]  # into epoch 1
  assert it.epoch == 1
  resumed = PackedBatchIterator(records, kind="sft", row_length=16, num_rows=3, pad_id=0, seed=3)
  resumed.load_state_dict({"epoch": 0, "batch": 2, "seed": 3})
  for expected in first[2:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
  shapes = {tuple(v.shape for v in b.values()) for b in first}
  assert len(shapes) == 1  # static shapes: one compile
  total = sum(int(b["sequence_mask"].sum()) for b in first[:len(plan)])
  assert total == 40


def test_bad_input():
  long = [{"prompt_ids": [1] * 5, "response_ids": [2] * 5}]
  with pytest.raises(ValueError, match="record 0 needs 10 tokens.*row_length"):
    collate_packed("sft", long, row_length=8, num_rows=1, pad_id=0)
  with pytest.raises(ValueError, match="do not fit"):
    collate_packed("sft", sft_records(), row_length=8, num_rows=1, pad_id=0)
  with pytest.raises(ValueError, match="kind"):
    collate_packed("ranked", sft_records(), row_length=8, num_rows=1, pad_id=0)
  with pytest.raises(ValueError, match="num_rows"):
    PackedBatchIterator(sft_records(), kind="sft", row_length=8, num_rows=0, pad_id=0, seed=0)
  with pytest.raises(ValueError, match="lacks"):
    PackedBatchIterator(sft_records(), kind="sft", row_length=8, num_rows=1, pad_id=0,
                        seed=0).load_state_dict({"epoch": 0})
