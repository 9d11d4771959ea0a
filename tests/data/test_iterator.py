"""BatchIterator: determinism, epoch reshuffle, drop_last, and exact resumption."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.data.iterator import BatchIterator

DATA = list(range(10))


def take(it, n):
  return list(itertools.islice(it, n))


def test_epochs_cover_data_and_reshuffle():
  it = BatchIterator(DATA, 3, seed=0)
  assert it.batches_per_epoch == 3
  batches = take(it, 6)
  epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
  assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # drop_last skips one example per epoch
  assert epoch0 != epoch1                                  # reshuffled by (seed, epoch)
  assert take(BatchIterator(DATA, 3, seed=0), 6) == batches  # deterministic
  assert take(BatchIterator(DATA, 3, seed=1), 3) != batches[:3]


def test_no_shuffle_no_drop_last_and_num_epochs():
  it = BatchIterator(DATA, 4, seed=0, shuffle=False, drop_last=False, num_epochs=2)
  assert list(it) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2


def test_collate_applied():
  it = BatchIterator(DATA, 2, seed=0, shuffle=False, collate=lambda xs: sum(xs))
  assert take(it, 2) == [1, 5]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 12), st.booleans())
def test_resume_gives_identical_batches(seed, stop, drop_last):
  reference = take(BatchIterator(DATA, 3, seed=seed, drop_last=drop_last), stop + 8)
  it = BatchIterator(DATA, 3, seed=seed, drop_last=drop_last)
  assert take(it, stop) == reference[:stop]
  state = json.loads(json.dumps(it.state_dict()))          # survives serialisation
  fresh = BatchIterator(DATA, 3, seed=12345, drop_last=drop_last)  # seed comes from the state
  fresh.load_state_dict(state)
  assert take(fresh, 8) == reference[stop:]


def test_errors():
  with pytest.raises(ValueError, match="batch_size"):
    BatchIterator(DATA, 0, seed=0)
  with pytest.raises(ValueError, match="batch_size.*exceeds"):
    BatchIterator(DATA, 11, seed=0)
  with pytest.raises(ValueError, match="examples"):
    BatchIterator([], 1, seed=0)
  it = BatchIterator(DATA, 2, seed=0)
  with pytest.raises(ValueError, match="lacks"):
    it.load_state_dict({"epoch": 0})
  with pytest.raises(ValueError, match="position"):
    it.load_state_dict({"epoch": 0, "position": 11, "seed": 0})
