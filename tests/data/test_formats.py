"""Row formats: prompt, SFT, preference (explicit and implicit prompt), KTO, ranked."""

from __future__ import annotations

import pytest

from rljax.data.formats import (
  PreferenceExample,
  common_prefix_prompt,
  parse_kto,
  parse_preference,
  parse_prompt,
  parse_ranked,
  parse_rows,
  parse_sft,
)

USER = {"role": "user", "content": "2 + 3 ?"}


def test_prompt_keeps_extra_fields():
  ex = parse_prompt({"prompt": "2 + 3 ?", "answer": "5", "id": 7})
  assert ex.prompt == "2 + 3 ?" and ex.fields == {"answer": "5", "id": 7}
  chat = parse_prompt({"messages": [USER], "answer": "5"})
  assert chat.prompt == [USER] and chat.fields == {"answer": "5"}


def test_sft_forms():
  assert parse_sft({"prompt": "p", "response": "r"}).response == "r"
  assert parse_sft({"prompt": "p", "completion": "r"}).response == "r"
  ex = parse_sft({"messages": [USER, {"role": "assistant", "content": "5"}]})
  assert ex.prompt == [USER] and ex.response == "5"
  with pytest.raises(ValueError, match="`messages`.*ending with an assistant"):
    parse_sft({"messages": [USER]})
  with pytest.raises(ValueError, match=r"missing field `response` \(row 3\)"):
    parse_sft({"prompt": "p"}, 3)


def test_preference_explicit_and_chat_responses():
  ex = parse_preference({"prompt": [USER], "chosen": [{"role": "assistant", "content": "5"}],
                         "rejected": "6"})
  assert ex == PreferenceExample([USER], "5", "6")


def test_preference_implicit_prompt_chat():
  chosen = [USER, {"role": "assistant", "content": "5"}]
  rejected = [USER, {"role": "assistant", "content": "6"}]
  assert parse_preference({"chosen": chosen, "rejected": rejected}) == PreferenceExample(
    [USER], "5", "6")


def test_preference_implicit_prompt_string_follows_trl():
  # TRL's extract_prompt: common character prefix; a space before the difference goes to the
  # responses.
  assert common_prefix_prompt("Q: sky? A: blue", "Q: sky? A: green") == (
    "Q: sky? A:", " blue", " green")
  assert common_prefix_prompt("ab1", "ab2") == ("ab", "1", "2")
  with pytest.raises(ValueError, match="share no prompt prefix"):
    parse_preference({"chosen": "x", "rejected": "y"})


def test_kto_and_ranked():
  ex = parse_kto({"prompt": "p", "completion": "c", "label": False})
  assert (ex.prompt, ex.completion, ex.label) == ("p", "c", False)
  with pytest.raises(ValueError, match="`label`.*bool"):
    parse_kto({"prompt": "p", "completion": "c", "label": 1})
  assert parse_ranked({"prompt": "p", "responses": ["a", "b", "c"]}).responses == ("a", "b", "c")
  with pytest.raises(ValueError, match="`responses`.*>= 2"):
    parse_ranked({"prompt": "p", "responses": ["a"]})


def test_errors_name_field_and_row():
  with pytest.raises(ValueError, match=r"missing field `rejected` \(row 1\)"):
    parse_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
               "preference")
  with pytest.raises(ValueError, match=r"field `prompt` \(row 0\) must be a string"):
    parse_rows([{"prompt": 3}], "prompt")
  with pytest.raises(ValueError, match="only assistant messages"):
    parse_preference({"prompt": "p", "chosen": [USER], "rejected": "r"})
  with pytest.raises(ValueError, match="Unknown kind 'dpo'; valid choices"):
    parse_rows([], "dpo")
