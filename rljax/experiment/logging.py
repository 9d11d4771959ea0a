"""Metric logging: one JSON line per logged step (`metrics.jsonl`) and, optionally, TensorBoard.

`MetricsLogger(out_dir, resume_step=None, tensorboard=True)` writes `{"step", "time",
**metrics}` lines to `out_dir/metrics.jsonl` ("time" is the run's wall time in seconds,
continued across resumes). On resume the file is first cut back to the lines with
`step <= resume_step` (lines logged after the restored checkpoint, by the interrupted run, would
otherwise appear twice), then appended to, so the curve continues.

TensorBoard events go to `out_dir/tensorboard/` through `tensorboardX` when it is installed
(`flax.metrics.tensorboard` would pull TensorFlow); without it they are skipped with one
message.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (or of `path/metrics.jsonl` for a run directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _jsonable(value: Any) -> Any:
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricsLogger:
  """Appends metric records to JSONL (and TensorBoard); see the module docstring."""

  def __init__(self, out_dir: str, *, resume_step: int | None = None, tensorboard: bool = True):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, METRICS_FILE)
    if resume_step is None:
      open(self.path, "w").close()
    else:
      kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._file = open(self.path, "a")
    self._writer = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        print("rljax: tensorboardX is not installed; TensorBoard logging is off "
              "(pip install tensorboardX).", file=sys.stderr)
      else:
        self._writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

  def log(self, step: int, metrics: dict[str, Any], *, time: float) -> dict[str, Any]:
    """Writes one record; returns it."""
    record = {"step": int(step), "time": round(float(time), 4)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._writer is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, float):
          self._writer.add_scalar(k, v, int(step))
      self._writer.flush()
    return record

  def close(self) -> None:
    self._file.close()
    if self._writer is not None:
      self._writer.close()

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
