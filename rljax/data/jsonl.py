"""Reading datasets: JSON Lines files, and Hugging Face `datasets` when it is installed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a JSON Lines file (one JSON object per line; blank lines skipped).

  Raises:
    ValueError: a line that is not UTF-8 or not a JSON object; the message names the file and
      line number.
    FileNotFoundError: no such file.

  Example:
    >>> rows = read_jsonl("data/train.jsonl")        # [{"prompt": ..., "answer": ...}, ...]
  """
  rows = []
  with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as err:
        raise ValueError(f"{path}: line {lineno} is not valid UTF-8 (byte {err.start} of the "
                         f"line, {raw[err.start:err.start + 1]!r}).") from err
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {lineno} is not valid JSON: {err.msg}") from err
      if not isinstance(row, dict):
        raise ValueError(f"{path}: line {lineno} must be a JSON object; got {type(row).__name__}.")
      rows.append(row)
  return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
  """Writes one JSON object per line (UTF-8)."""
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")


def load_dataset(path_or_name: str | os.PathLike, *, split: str = "train", **kwargs: Any):
  """Rows (a list of dicts) of a local .jsonl file, or of a Hugging Face dataset.

  A path ending in ".jsonl" is read with `read_jsonl` (no extra dependency). Anything else is
  passed to `datasets.load_dataset(path_or_name, split=split, **kwargs)`, which needs the optional
  `datasets` package.

  Raises:
    ImportError: a non-JSONL source and `datasets` is not installed.
  """
  if str(path_or_name).endswith(".jsonl"):
    return read_jsonl(path_or_name)
  try:
    import datasets  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ImportError(
      f"loading {str(path_or_name)!r} needs the Hugging Face `datasets` package "
      "(pip install datasets); JSONL files (*.jsonl) load without it."
    ) from err
  return [dict(row) for row in datasets.load_dataset(str(path_or_name), split=split, **kwargs)]
