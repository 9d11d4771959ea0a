"""A daemon worker pool and a runner with a per-call time limit, shared by the tools and the
per-row environments.

Python cannot stop a thread. A call past its limit is reported as a timeout and its result is
dropped when it comes, but the call keeps its worker until it returns. The workers are daemon
threads so that such a call never holds the process at exit: `concurrent.futures`'
ThreadPoolExecutor joins every worker at interpreter exit, so one tool that never returns would
hang a finished training run. `WorkerPool.submit` returns a `concurrent.futures.Future`, as the
executor's does.

`run_limited(pool, fns, timeout_s)` runs the calls concurrently and returns one `Outcome` per
call, in order: its value, the exception it raised, or a timeout when it has run more than
`timeout_s` seconds — or has not started `timeout_s` seconds after submission, every worker
being busy (e.g. with calls that never return) — so it returns within about 2·timeout_s.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any


def check_timeout(timeout_s: float | None, name: str = "timeout_s") -> float | None:
  """`timeout_s` (None: no limit) as a float > 0; a ValueError names `name` otherwise."""
  if timeout_s is None:
    return None
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
    raise ValueError(f"`{name}` must be a number of seconds > 0 or None; got {timeout_s!r}.")
  return float(timeout_s)


class WorkerPool:
  """At most `max_workers` daemon threads running submitted calls, started as needed."""

  def __init__(self, max_workers: int, name: str = "rljax-agents"):
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
      raise ValueError(f"`max_workers` must be an int >= 1; got {max_workers!r}.")
    self.max_workers, self._name = max_workers, name
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._idle = threading.Semaphore(0)
    self._lock = threading.Lock()
    self._threads: list[threading.Thread] = []

  def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
    """Queues fn(*args); its `Future` holds the value or the exception."""
    future: Future = Future()
    self._queue.put((future, fn, args))
    if not self._idle.acquire(blocking=False):  # no idle worker: start one, up to max_workers
      with self._lock:
        if len(self._threads) < self.max_workers:
          thread = threading.Thread(target=self._work, daemon=True,
                                    name=f"{self._name}-{len(self._threads)}")
          self._threads.append(thread)
          thread.start()
    return future

  def _work(self) -> None:
    while True:
      future, fn, args = self._queue.get()
      if future.set_running_or_notify_cancel():
        try:
          future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 — reported to the caller through the future
          future.set_exception(e)
      del future, fn, args
      self._idle.release()


@dataclass(frozen=True)
class Outcome:
  """One call's result: `value` when `ok`, else `error` (the exception) or `timed_out`."""
  value: Any = None
  error: BaseException | None = None
  timed_out: bool = False
  started: bool = True  # False: timed out before a worker was free

  @property
  def ok(self) -> bool:
    return self.error is None and not self.timed_out


def run_limited(pool: WorkerPool, fns: Sequence[Callable[[], Any]],
                timeout_s: float | None) -> list[Outcome]:
  """Runs every fn() on `pool`; one `Outcome` per fn, in order (see the module docstring)."""
  timeout_s = check_timeout(timeout_s)
  starts: list[float | None] = [None] * len(fns)

  def timed(i: int) -> Any:
    starts[i] = time.monotonic()
    return fns[i]()

  submitted = time.monotonic()
  futures = [pool.submit(timed, i) for i in range(len(fns))]
  outcomes: list[Outcome | None] = [None] * len(fns)
  pending = set(range(len(fns)))
  while pending:
    now, deadlines = time.monotonic(), []
    for i in sorted(pending):
      future = futures[i]
      if future.done():
        error = future.exception()
        outcomes[i] = Outcome(error=error) if error is not None else Outcome(future.result())
        pending.discard(i)
        continue
      if timeout_s is None:
        continue
      start = starts[i]
      deadline = (submitted if start is None else start) + timeout_s
      if now < deadline:
        deadlines.append(deadline)
      elif start is not None:  # running past its limit: left to finish, its result dropped
        outcomes[i] = Outcome(timed_out=True)
        pending.discard(i)
      elif future.cancel():  # still queued: it never runs
        outcomes[i] = Outcome(timed_out=True, started=False)
        pending.discard(i)
      else:  # it started just now: its own limit counts from here
        deadlines.append(now)
    if pending:
      wait([futures[i] for i in pending], return_when=FIRST_COMPLETED,
           timeout=None if not deadlines else max(min(deadlines) - now, 0.0) + 1e-3)
  return outcomes  # type: ignore[return-value]
