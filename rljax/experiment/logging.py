"""Metric logging: JSONL (`metrics.jsonl`, `samples.jsonl`), TensorBoard and Weights & Biases.

`MetricsLogger(out_dir, resume_step=None, tensorboard=True, wandb=None, config=None)` writes

  metrics.jsonl   one `{"step", "time", **metrics}` line per logged step ("time": the run's wall
                  time in seconds, continued across resumes);
  samples.jsonl   `{"step", "prompt", "completion", "reward", ...}` lines: sample completions of
                  an evaluation (`log_samples`);
  tensorboard/    the same scalars, and the samples as text, through `tensorboardX` (pulls no
                  TensorFlow); skipped with one message when it is not installed;
  W&B             with `wandb` = a project name: the scalars and a samples table, in the W&B run
                  whose id is kept in `out_dir/wandb_run_id` (a resumed run continues it; the
                  `WANDB_*` variables apply, e.g. WANDB_MODE=offline).

A fresh logger (`resume_step=None`) starts these files anew. A resumed one first cuts every
file back to the records of steps <= `resume_step` (the steps of the restored checkpoint;
whatever the interrupted run logged after it would otherwise appear twice) — the TensorBoard
event files included, so each step is in the logs exactly once — and then appends.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (or of `path/metrics.jsonl` for a run directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  return _read_jsonl(path)


def read_samples(path: str) -> list[dict[str, Any]]:
  """The records of a samples.jsonl file (or of `path/samples.jsonl` for a run directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, SAMPLES_FILE)
  return _read_jsonl(path)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _cut_jsonl(path: str, last_step: int | None) -> None:
  """Keeps the lines of steps <= last_step (None: none)."""
  kept = [] if last_step is None else [r for r in _read_jsonl(path) if r["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)


def _jsonable(value: Any) -> Any:
  value = float(value)
  return value if math.isfinite(value) else str(value)


# ----------------------------------------------------------------------------------------------
# TensorBoard event files (TFRecord framing: length u64, crc u32, data, crc u32).
# ----------------------------------------------------------------------------------------------


def _event_records(path: str) -> Iterator[bytes]:
  """The serialized `Event`s of one event file; a record cut short (a killed writer) ends it."""
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(data):
      return
    yield data[offset:end]
    offset = end


def _parse_event(record: bytes) -> Any:
  from tensorboardX.proto import event_pb2

  event = event_pb2.Event()
  event.ParseFromString(record[12:-4])
  return event


def _event_files(directory: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))


def _cut_events(directory: str, last_step: int) -> None:
  """Rewrites every event file of `directory` without the events of steps > last_step."""
  for path in _event_files(directory):
    records = list(_event_records(path))
    kept = [r for r in records if _parse_event(r).step <= last_step]
    with open(path, "wb") as f:
      f.writelines(kept)


def read_tensorboard(path: str) -> list[tuple[int, str, Any]]:
  """`(step, tag, value)` of every summary in the event files of `path` (a run directory or its
  tensorboard/ folder), in file then write order: scalars as floats, text as strings."""
  directory = os.path.join(path, TENSORBOARD_DIR) if os.path.isdir(
    os.path.join(path, TENSORBOARD_DIR)) else path
  out = []
  for file in _event_files(directory):
    for record in _event_records(file):
      event = _parse_event(record)
      for value in event.summary.value:
        if value.HasField("tensor"):
          text = b"".join(value.tensor.string_val).decode()
          out.append((event.step, value.tag.removesuffix("/text_summary"), text))
        else:
          out.append((event.step, value.tag, value.simple_value))
  return out


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
  """Samples as markdown for TensorBoard's text panel: one block per sample."""
  blocks = []
  for s in samples:
    extra = "".join(f"  \n**{k}**: {v}" for k, v in s.items()
                    if k not in ("prompt", "completion", "reward"))
    blocks.append(f"**reward** {s.get('reward')}{extra}\n\n```\n{s['prompt']}\n```\n\n"
                  f"```\n{s['completion']}\n```")
  return "\n\n---\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------
# Weights & Biases.
# ----------------------------------------------------------------------------------------------


def _wandb_run(out_dir: str, project: str, config: Any, resume: bool) -> Any:
  """The W&B run of this run directory: a new one, or (resuming) the one whose id it kept."""
  import wandb

  id_path = os.path.join(out_dir, WANDB_ID_FILE)
  if resume and os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
    with open(id_path, "w") as f:
      f.write(run_id)
  return wandb.init(project=project, id=run_id, resume="allow", dir=out_dir, config=config,
                    name=os.path.basename(os.path.normpath(out_dir)))


class MetricsLogger:
  """Appends metric records and samples to JSONL, TensorBoard and W&B; see the module doc."""

  def __init__(self, out_dir: str, *, resume_step: int | None = None, tensorboard: bool = True,
               wandb: str | None = None, config: Any = None):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, METRICS_FILE)
    self.samples_path = os.path.join(out_dir, SAMPLES_FILE)
    for path in (self.path, self.samples_path):
      _cut_jsonl(path, resume_step)
    self._file = open(self.path, "a")
    self._samples = open(self.samples_path, "a")
    tb_dir = os.path.join(out_dir, TENSORBOARD_DIR)
    if resume_step is None:
      shutil.rmtree(tb_dir, ignore_errors=True)
    else:
      _cut_events(tb_dir, resume_step)
    self._writer = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        print("rljax: tensorboardX is not installed; TensorBoard logging is off "
              "(pip install tensorboardX).", file=sys.stderr)
      else:
        self._writer = SummaryWriter(tb_dir)
    # the W&B run (None without `wandb`): `wandb_run.log(...)` adds to it
    self.wandb_run = None if wandb is None else _wandb_run(out_dir, wandb, config,
                                                           resume_step is not None)

  def log(self, step: int, metrics: dict[str, Any], *, time: float) -> dict[str, Any]:
    """Writes one record; returns it."""
    record = {"step": int(step), "time": round(float(time), 4)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}
    if self._writer is not None:
      for k, v in scalars.items():
        self._writer.add_scalar(k, v, int(step))
      self._writer.flush()
    if self.wandb_run is not None:
      self.wandb_run.log(scalars, step=int(step))
    return record

  def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
    """Writes sample completions (`{"prompt", "completion", "reward", ...}` each) of `step`."""
    if not samples:
      return
    self._samples.writelines(json.dumps({"step": int(step), **s}) + "\n" for s in samples)
    self._samples.flush()
    if self._writer is not None:
      self._writer.add_text("samples", _samples_markdown(samples), int(step))
      self._writer.flush()
    if self.wandb_run is not None:
      import wandb

      columns = list(dict.fromkeys(k for s in samples for k in s))
      table = wandb.Table(columns=columns, data=[[s.get(k) for k in columns] for s in samples])
      self.wandb_run.log({"samples": table}, step=int(step))

  def close(self) -> None:
    self._file.close()
    self._samples.close()
    if self._writer is not None:
      self._writer.close()
    if self.wandb_run is not None:
      self.wandb_run.finish()

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
