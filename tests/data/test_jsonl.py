"""JSONL reading/writing and the optional Hugging Face loader."""

from __future__ import annotations

import importlib.util

import pytest

from rljax.data.jsonl import load_dataset, read_jsonl, write_jsonl


def test_roundtrip(tmp_path):
  rows = [{"prompt": "2 + 3 ?", "answer": "5"}, {"prompt": "é", "messages": [{"role": "user"}]}]
  path = tmp_path / "d.jsonl"
  write_jsonl(path, rows)
  assert read_jsonl(path) == rows
  assert load_dataset(str(path)) == rows


def test_blank_lines_skipped_and_errors_name_the_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2\n')
  with pytest.raises(ValueError, match="line 3 is not valid JSON"):
    read_jsonl(path)
  path.write_text('{"a": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match="line 2 must be a JSON object"):
    read_jsonl(path)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hf_loader_needs_datasets():
  with pytest.raises(ImportError, match="datasets"):
    load_dataset("openai/gsm8k", split="train")
