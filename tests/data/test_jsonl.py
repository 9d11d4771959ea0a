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


def test_non_utf8_line_names_file_and_line_and_a_bom_is_accepted(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes('{"a": 1}\n{"a": "café"}\n'.encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1\.jsonl: line 2 is not valid UTF-8 "
                                       r"\(byte 10 of the line, b'\\xe9'\)"):
    read_jsonl(path)
  path.write_bytes('\ufeff{"a": "é"}\r\n{"b": 2}\r\n'.encode("utf-8"))
  assert read_jsonl(path) == [{"a": "é"}, {"b": 2}]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hf_loader_needs_datasets():
  with pytest.raises(ImportError, match="datasets"):
    load_dataset("openai/gsm8k", split="train")
