"""A deterministic, resumable batch iterator."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The visiting order of n examples in epoch `epoch`: numpy's `default_rng((seed, epoch))`
  permutation, or 0..n-1 without shuffling (shared by `BatchIterator` and the packed one)."""
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, epoch]).permutation(n)


class BatchIterator:
  """Batches of `examples` in a seeded order; its position can be saved and restored exactly.

  Epoch e visits the examples in the order `permutation(seed, e)` (numpy's `default_rng` seeded
  with the pair (seed, epoch); the identity order when shuffle=False) and cuts it into batches of
  `batch_size`; with drop_last the incomplete tail of an epoch is skipped (so every batch has the
  same shape). The iterator is infinite unless `num_epochs` is given. `state_dict()` records
  (epoch, position, seed); after `load_state_dict` the iterator yields exactly the batches that
  would have followed (the order is a pure function of seed and epoch, nothing else is stored).

  Args:
    examples: the dataset (e.g. tokenized records); indexed, never copied.
    batch_size: rows per batch (int >= 1).
    seed: the shuffling seed (keyword-only, required).
    shuffle: reshuffle every epoch (default True).
    drop_last: skip the last incomplete batch of an epoch (default True).
    collate: `fn(list_of_examples) -> batch` (e.g. `rljax.data.batching.collator(...)`); default
      returns the list.
    num_epochs: stop after this many epochs; None (default) runs forever.

  Example:
    >>> it = BatchIterator(records, 8, seed=0, collate=collator("sft", pad_id=0, buckets=[64]))
    >>> batch = next(it); saved = it.state_dict()     # store with the checkpoint
    >>> it2 = BatchIterator(records, 8, seed=0, collate=...); it2.load_state_dict(saved)
  """

  def __init__(
    self,
    examples: Sequence[Any],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    collate: Callable[[list], Any] | None = None,
    num_epochs: int | None = None,
  ):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size!r}.")
    if len(examples) == 0:
      raise ValueError("`examples` is empty.")
    if drop_last and len(examples) < batch_size:
      raise ValueError(
        f"`batch_size` ({batch_size}) exceeds the number of examples ({len(examples)}) with "
        "drop_last=True: no batch would ever be produced."
      )
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
      raise ValueError(f"`num_epochs` must be an int >= 1 or None; got {num_epochs!r}.")
    self.examples = examples
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_last = drop_last
    self.collate = collate if collate is not None else list
    self.num_epochs = num_epochs
    self.epoch = 0
    self.position = 0  # index into this epoch's order of the next example
    self._order_epoch: int | None = None
    self._order: np.ndarray | None = None

  def order(self, epoch: int) -> np.ndarray:
    """The visiting order of epoch `epoch` (int64 indices)."""
    return epoch_order(len(self.examples), seed=self.seed, epoch=epoch, shuffle=self.shuffle)

  @property
  def batches_per_epoch(self) -> int:
    n, b = len(self.examples), self.batch_size
    return n // b if self.drop_last else -(-n // b)

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      self._order, self._order_epoch = self.order(self.epoch), self.epoch
    return self._order  # type: ignore[return-value]

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    n = len(self.examples)
    remaining = n - self.position
    if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
      self.epoch, self.position = self.epoch + 1, 0
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    indices = self._epoch_order()[self.position:self.position + self.batch_size]
    self.position += len(indices)
    return self.collate([self.examples[int(i)] for i in indices])

  def state_dict(self) -> dict[str, int]:
    """{"epoch", "position", "seed"}: plain ints (JSON / orbax friendly)."""
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores a `state_dict()`; the following batches are those the saved iterator would give.

    Raises:
      ValueError: missing keys, or a position outside [0, len(examples)].
    """
    missing = {"epoch", "position", "seed"} - set(state)
    if missing:
      raise ValueError(f"`state` lacks {sorted(missing)}; expected keys epoch, position, seed.")
    position = int(state["position"])
    if not 0 <= position <= len(self.examples):
      raise ValueError(
        f"`state['position']` ({position}) is outside [0, {len(self.examples)}] for this dataset."
      )
    self.epoch, self.position, self.seed = int(state["epoch"]), position, int(state["seed"])
    self._order_epoch = None
