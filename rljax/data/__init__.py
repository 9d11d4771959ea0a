"""Datasets, tokenization and static-shape batching.

  read_jsonl / load_dataset        rows (list of dicts)
  formats.parse_rows               rows → PromptExample / SFTExample / PreferenceExample /
                                   KTOExample / RankedExample (TRL conventions)
  tokenize.tokenize_dataset        examples → token-id records (prompt and response separately)
  batching.collator / collate_*    records → fixed-shape numpy batches padded to buckets
  packing.PackedBatchIterator      records → packed batches (several sequences per row, FFD)
  iterator.BatchIterator           deterministic, resumable batches
"""

from rljax.data.batching import (
  PromptBatch,
  bucket_length,
  bucket_sizes,
  collate_kto,
  collate_listwise,
  collate_preference,
  collate_prompts,
  collate_sft,
  collator,
)
from rljax.data.formats import (
  KTOExample,
  PreferenceExample,
  PromptExample,
  RankedExample,
  SFTExample,
  parse_rows,
)
from rljax.data.iterator import BatchIterator
from rljax.data.jsonl import load_dataset, read_jsonl, write_jsonl
from rljax.data.packing import PackedBatchIterator, collate_packed, padding_fraction
from rljax.data.tokenize import (
  encode_prompt,
  encode_response,
  tokenize_dataset,
)

__all__ = [
  "BatchIterator",
  "KTOExample",
  "PackedBatchIterator",
  "PreferenceExample",
  "PromptBatch",
  "PromptExample",
  "RankedExample",
  "SFTExample",
  "bucket_length",
  "bucket_sizes",
  "collate_kto",
  "collate_listwise",
  "collate_packed",
  "collate_preference",
  "collate_prompts",
  "collate_sft",
  "collator",
  "encode_prompt",
  "encode_response",
  "load_dataset",
  "padding_fraction",
  "parse_rows",
  "read_jsonl",
  "tokenize_dataset",
  "write_jsonl",
]
