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
# A program loaded from JAX's persistent compilation cache instead of compiled.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCount:
  """The number of programs XLA built while its `count_compiles` block runs: backend
  compilations plus loads from the persistent compilation cache (a cache hit is still a new
  program for this process: a shape that should have settled did not)."""

  def __init__(self) -> None:
    self.count = 0

  def __call__(self, event: str, *_: Any, **__: Any) -> None:
    if event in (COMPILE_EVENT, CACHE_HIT_EVENT):
      self.count += 1


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
  """Counts the XLA programs built (compiled or loaded from the persistent compilation cache)
  for any jitted function inside the block."""
  counter = CompileCount()
  jax.monitoring.register_event_duration_secs_listener(counter)
  jax.monitoring.register_event_listener(counter)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(counter)
    jax.monitoring.unregister_event_listener(counter)
