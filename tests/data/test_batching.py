"""Collation: padding sides, masks, bucket shapes and batch keys."""

from __future__ import annotations

import numpy as np
import pytest

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
from rljax.data.tokenize import tokenize_dataset


def test_buckets():
  assert bucket_sizes(100, min_size=16) == [16, 32, 64, 100]
  assert bucket_sizes(64, min_size=16) == [16, 32, 64]
  assert [bucket_length(n, [16, 32, 100]) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 100, 100]
  assert bucket_length(5, None) == 5
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    bucket_length(101, [16, 32, 100])


def test_sft_right_padded_with_loss_mask_on_response():
  recs = [{"prompt_ids": [5, 6], "response_ids": [7, 2]},
          {"prompt_ids": [8], "response_ids": [9, 10, 2]}]
  b = collate_sft(recs, pad_id=0, buckets=[3, 8])  # longest row 4 → bucket 8
  np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 2, 0, 0, 0, 0],
                                                 [8, 9, 10, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1, 0, 0, 0, 0],
                                                 [0, 1, 1, 1, 0, 0, 0, 0]])
  assert all(v.dtype == np.int32 for v in b.values())


def test_prompts_left_padded():
  recs = [{"prompt_ids": [5, 6, 7], "text": "a", "fields": {"answer": "1"}},
          {"prompt_ids": [8], "text": "b", "fields": {"answer": "2", "id": 3}}]
  pb = collate_prompts(recs, pad_id=2, buckets=[4])
  assert isinstance(pb, PromptBatch)
  np.testing.assert_array_equal(pb.tokens, [[2, 5, 6, 7], [2, 2, 2, 8]])
  np.testing.assert_array_equal(pb.mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert pb.tokens.dtype == np.int32 and pb.mask.dtype == bool
  assert pb.texts == ["a", "b"] and pb.fields == {"answer": ["1", "2"], "id": [None, 3]}


def test_preference_keys_and_common_length():
  recs = [{"prompt_ids": [5], "chosen_ids": [6, 2], "rejected_ids": [7, 7, 7, 2]}]
  b = collate_preference(recs, pad_id=0, buckets=[4, 8])
  assert set(b) == {f"{s}_{k}" for s in ("chosen", "rejected")
                    for k in ("input_ids", "attention_mask", "loss_mask")}
  assert {v.shape for v in b.values()} == {(1, 8)}
  np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(b["rejected_input_ids"][0], [5, 7, 7, 7, 2, 0, 0, 0])


def test_kto_labels_and_kl_pairs():
  recs = [{"prompt_ids": [5], "completion_ids": [6, 2], "label": True},
          {"prompt_ids": [7, 8], "completion_ids": [9, 2], "label": False}]
  b = collate_kto(recs, pad_id=0, buckets=[4])
  np.testing.assert_array_equal(b["label"], [True, False])
  np.testing.assert_array_equal(b["input_ids"], [[5, 6, 2, 0], [7, 8, 9, 2]])
  # KL pairs: prompt i with completion i - 1 (mod B), TRL's KL dataset
  np.testing.assert_array_equal(b["kl_input_ids"], [[5, 9, 2, 0], [7, 8, 6, 2]])
  np.testing.assert_array_equal(b["kl_loss_mask"], [[0, 1, 1, 0], [0, 0, 1, 1]])
  assert "kl_input_ids" not in collate_kto(recs, pad_id=0, kl_pairs=False)


def test_listwise_shape_and_errors():
  recs = [{"prompt_ids": [5], "response_ids": [[6, 2], [7, 2], [8, 8, 2]]},
          {"prompt_ids": [9, 9], "response_ids": [[2], [6, 2], [7, 2]]}]
  b = collate_listwise(recs, pad_id=0, buckets=[4, 8])
  assert b["input_ids"].shape == (2, 3, 4)
  np.testing.assert_array_equal(b["input_ids"][0, 2], [5, 8, 8, 2])
  np.testing.assert_array_equal(b["loss_mask"][1, 0], [0, 0, 1, 0])
  with pytest.raises(ValueError, match=r"`records\[1\]` has 2 responses"):
    collate_listwise([recs[0], {"prompt_ids": [5], "response_ids": [[6], [7]]}], pad_id=0)
  with pytest.raises(ValueError, match="`records` is empty"):
    collate_sft([], pad_id=0)


def test_collator_end_to_end_bucket_shapes(tok):
  rows = [{"prompt": "what is 2 + 3 ?", "response": "5"}, {"prompt": "hello", "response": "world"},
          {"prompt": "what is the answer ? " * 4, "response": "the answer is 5"}]
  records, stats = tokenize_dataset(tok, rows, "sft", chat=True, max_length=24)
  assert stats["truncated"] == 1
  collate = collator("sft", pad_id=tok.pad_token_id, buckets=bucket_sizes(24, min_size=8))
  shapes = {collate([r])["input_ids"].shape for r in records}
  assert shapes <= {(1, 8), (1, 16), (1, 24)}
  assert collate(records)["input_ids"].shape == (3, 24)
  with pytest.raises(ValueError, match="Unknown kind"):
    collator("rlhf", pad_id=0)
