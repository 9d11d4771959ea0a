"""Reward-model scoring: token path (trainer fields) and text path (separate tokenization)."""

from __future__ import annotations


import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.heads import RewardModel
from rljax.rewards.model import reward_model_reward

from tiny_tokenizer import tiny_tokenizer

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                     num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def rm():
  return RewardModel(CONFIG, rngs=nnx.Rngs(0), head_std=1.0)


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def direct(rm, rows):
  """The reference: the rows right-padded only (a different layout from the left-padded prompt +
  right-padded completion the scorer builds), scored by one `nnx.jit` call (eager is slow)."""
  t = max(map(len, rows))
  ids = np.array([r + [3] * (t - len(r)) for r in rows], np.int32)
  mask = np.array([[1] * len(r) + [0] * (t - len(r)) for r in rows], np.int32)
  return np.asarray(nnx.jit(lambda model, i, m: model(i, m))(rm, ids, mask), np.float32)


def test_token_path_matches_unpadded_rows(rm):
  # left-padded prompts (pad 0), right-padded completions; row 1's prompt contains id 0 inside.
  prompt_tokens = np.array([[0, 0, 5, 6], [7, 0, 8, 9]], np.int32)
  prompt_mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
  completion_tokens = np.array([[10, 2, 0], [11, 12, 2]], np.int32)
  lengths = np.array([2, 3])
  fn = reward_model_reward(rm, pad_id=0)
  want = direct(rm, [[5, 6, 10, 2], [7, 0, 8, 9, 11, 12, 2]])
  got = fn(["a", "b"], ["x", "y"], prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
           completion_tokens=completion_tokens, completion_lengths=lengths)
  assert got.dtype == np.float32 and got.shape == (2,)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # completion_mask instead of lengths, and the leading-pad fallback for the prompt mask
  # (the pad id inside row 1's prompt is kept because it follows a real token).
  mask = np.arange(3)[None] < lengths[:, None]
  got2 = fn(["a", "b"], ["x", "y"], prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, completion_mask=mask)
  np.testing.assert_allclose(got2, want, atol=1e-5)


def test_text_path_tokenizes_separately(rm, tok):
  fn = reward_model_reward(rm, tok, chat=True, buckets=[4, 16])
  got = fn(["what is 2 + 3 ?", "hello"], ["5", "the answer is 5"])
  rows = []
  for p, c in [("what is 2 + 3 ?", "5"), ("hello", "the answer is 5")]:
    prompt = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    rows.append(list(prompt) + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
  np.testing.assert_allclose(got, direct(rm, rows), atol=1e-5)


def test_errors(rm):
  fn = reward_model_reward(rm)
  with pytest.raises(ValueError, match="tokenizer"):
    fn(["a"], ["b"])
  with pytest.raises(ValueError, match="both `prompt_tokens` and `completion_tokens`"):
    fn(["a"], ["b"], prompt_tokens=np.zeros((1, 2), np.int32))
  with pytest.raises(ValueError, match="completion_mask"):
    fn(["a"], ["b"], prompt_tokens=np.ones((1, 2)), completion_tokens=np.ones((1, 2)))
  with pytest.raises(ValueError, match="`completion_tokens` must have shape"):
    fn(["a"], ["b"], prompt_tokens=np.ones((1, 2)), completion_tokens=np.ones((2, 2)),
       completion_mask=np.ones((2, 2)))
  with pytest.raises(ValueError, match="`completion_lengths` has length 2"):
    fn(["a"], ["b"], completion_lengths=[1, 2])
