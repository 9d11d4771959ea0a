"""Tokenization: prompt and response tokenized separately and concatenated as ids."""

from __future__ import annotations

import pytest

from greedy_tokenizer import GreedyTokenizer
from tiny_tokenizer import tiny_gemma_tokenizer

from rljax.data.formats import PreferenceExample, SFTExample
from rljax.data.tokenize import (
  encode_prompt,
  fold_system_turn,
  encode_response,
  fit_length,
  prompt_text,
  tokenize_dataset,
  tokenize_preference,
  tokenize_sft,
)

EOS = 2


def words(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_prompt_uses_template_with_generation_prompt(tok):
  chat = [{"role": "user", "content": "what is 2 + 3 ?"}]
  # template: <s> user : <content> </s> assistant :
  want = [1] + words(tok, "user : what is 2 + 3 ?") + [EOS] + words(tok, "assistant :")
  assert encode_prompt(tok, chat) == want
  assert encode_prompt(tok, "what is 2 + 3 ?", chat=True) == want
  assert encode_prompt(tok, "what is 2 + 3 ?") == words(tok, "what is 2 + 3 ?")
  assert prompt_text(tok, chat).endswith("assistant : ")
  with pytest.raises(ValueError, match="chat=False"):
    encode_prompt(tok, chat, chat=False)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn():
  gemma = tiny_gemma_tokenizer()
  chat = [{"role": "system", "content": "the answer is 5"}, {"role": "user", "content": "what is 2 + 3 ?"}]
  folded = [{"role": "user", "content": "the answer is 5\n\nwhat is 2 + 3 ?"}]
  assert fold_system_turn(chat) == folded and fold_system_turn(folded) is folded
  assert fold_system_turn(chat[:1]) == [{"role": "user", "content": "the answer is 5"}]
  ids = encode_prompt(gemma, chat)
  assert ids == encode_prompt(gemma, folded)
  assert gemma.convert_ids_to_tokens(ids) == (
    "<bos> <start_of_turn> user the answer is 5 what is 2 + 3 ? <end_of_turn> <start_of_turn> "
    "model").split()
  assert prompt_text(gemma, chat) == prompt_text(gemma, folded)
  with pytest.raises(Exception, match="alternate"):  # other template errors still raise
    encode_prompt(gemma, [{"role": "assistant", "content": "hello"}])


def test_a_template_with_a_system_role_keeps_the_system_turn(tok):
  chat = [{"role": "system", "content": "hello"}, {"role": "user", "content": "world"}]
  assert encode_prompt(tok, chat) == [1] + words(tok, "system : hello") + [EOS] + words(
    tok, "user : world") + [EOS] + words(tok, "assistant :")


def test_response_gets_eos(tok):
  assert encode_response(tok, "the answer is 5") == words(tok, "the answer is 5") + [EOS]
  assert encode_response(tok, "5", add_eos=False) == words(tok, "5")
  assert encode_response(tok, "5", eos_id=17) == words(tok, "5") + [17]


def test_ids_are_separate_tokenizations_concatenated(tok):
  """Record ids equal the two separate encodings concatenated."""
  ex = SFTExample([{"role": "user", "content": "hello"}], "world")
  rec = tokenize_sft(tok, ex)
  assert rec["prompt_ids"] == tok.apply_chat_template(
    ex.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
  assert rec["response_ids"] == words(tok, "world") + [EOS]
  assert not rec["truncated"]


def test_never_merges_across_the_boundary_or_decodes():
  """With a tokenizer that merges "a"+"b" into "ab", the joint encoding of prompt + response
  differs from the separate ones; the pipeline must produce the separate ones (and never decode)."""
  gt = GreedyTokenizer()
  assert gt.encode_text("cab") == [5, 6]            # joint: "c", "ab"
  records, _ = tokenize_dataset(gt, [{"prompt": "ca", "response": "b"},
                                     {"prompt": [{"role": "user", "content": "ca"}],
                                      "response": "bc"}], "sft")
  assert records[0]["prompt_ids"] == [1, 5, 3]     # <s> c a
  assert records[0]["response_ids"] == [4, 2]      # b </s>
  assert records[1]["prompt_ids"] == [1, 9, 5, 3, 10]  # <s> [U] c a [A]
  assert records[1]["response_ids"] == [7, 2]      # bc </s>
  assert gt.calls == ["ca", "b", "bc"]             # each text encoded once, separately


def test_fit_length_keeps_prompt_end_and_response_start():
  p, r = list(range(10, 16)), list(range(20, 25))
  assert fit_length(p, r, 11) == (p, r, False)
  assert fit_length(p, r, 8) == (p, [20, 21], True)
  assert fit_length(p, r, 4) == ([13, 14, 15], [20], True)  # at least one response token


def test_preference_shares_one_prompt_cut(tok):
  ex = PreferenceExample("what is 2 + 3 ?", "5", "the answer is 3")
  rec = tokenize_preference(tok, ex, max_length=8)
  assert rec["truncated"]
  assert len(rec["prompt_ids"]) + max(len(rec["chosen_ids"]), len(rec["rejected_ids"])) <= 8
  assert rec["chosen_ids"] == words(tok, "5") + [EOS]


def test_tokenize_dataset_overflow_modes(tok):
  rows = [{"prompt": "hello", "response": "world"},
          {"prompt": "what is 2 + 3 ? what is 2 + 3 ?", "response": "5"}]
  records, stats = tokenize_dataset(tok, rows, "sft", max_length=6)
  assert stats == {"num_examples": 2, "truncated": 1, "dropped": 0}
  assert [r["truncated"] for r in records] == [False, True]
  assert len(records[1]["prompt_ids"]) + len(records[1]["response_ids"]) == 6
  records, stats = tokenize_dataset(tok, rows, "sft", max_length=6, overflow="drop")
  assert stats["dropped"] == 1 and len(records) == 1
  with pytest.raises(ValueError, match="example 1 is longer than `max_length`"):
    tokenize_dataset(tok, rows, "sft", max_length=6, overflow="error")
  with pytest.raises(ValueError, match="Unknown overflow 'cut'"):
    tokenize_dataset(tok, rows, "sft", overflow="cut")
  with pytest.raises(ValueError, match="max_length"):
    tokenize_dataset(tok, rows, "sft", max_length=1)


def test_tokenize_dataset_prompts_keep_fields(tok):
  records, _ = tokenize_dataset(tok, [{"prompt": "what is 2 + 3 ?", "answer": "5"}], "prompt",
                                chat=True)
  assert records[0]["fields"] == {"answer": "5"}
  assert records[0]["prompt_ids"] == encode_prompt(tok, "what is 2 + 3 ?", chat=True)
