"""Counting XLA compilations: a context manager over `jax.monitoring` (no global listener).

  >>> with count_compiles() as compiles:
  ...   state, metrics = trainer.step(state, prompts)
  >>> compiles.count        # 0 once the shapes have settled
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCount:
  """The number of XLA backend compilations seen while its `count_compiles` block runs."""

  def __init__(self) -> None:
    self.count = 0

  def __call__(self, event: str, *_: Any, **__: Any) -> None:
    if event == COMPILE_EVENT:
      self.count += 1


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
  """Counts the XLA compilations (of any jitted function) inside the block."""
  counter = CompileCount()
  jax.monitoring.register_event_duration_secs_listener(counter)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(counter)
