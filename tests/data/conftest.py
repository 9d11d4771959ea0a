"""The tiny word-level tokenizer of tests/tiny_tokenizer.py (ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4.. words)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
  return tiny_tokenizer()
