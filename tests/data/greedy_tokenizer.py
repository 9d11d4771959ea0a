"""A duck-typed greedy longest-match tokenizer whose merges cross word boundaries ("ab" is one
token), so joint tokenization of prompt + response differs from separate tokenizations. `decode`
raises: the data pipeline must never decode."""

from __future__ import annotations

VOCAB = ["<pad>", "<s>", "</s>", "a", "b", "c", "ab", "bc", " ", "[U]", "[A]"]


class GreedyTokenizer:
  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

  def __init__(self):
    self.ids = {t: i for i, t in enumerate(VOCAB)}
    self.calls: list[str] = []

  def encode_text(self, text: str) -> list[int]:
    out, i = [], 0
    while i < len(text):
      for n in (2, 1):
        piece = text[i:i + n]
        if len(piece) == n and piece in self.ids:
          out.append(self.ids[piece])
          i += n
          break
      else:
        raise ValueError(f"cannot tokenize {text[i]!r}")
    return out

  def __call__(self, text: str, add_special_tokens: bool = True):
    self.calls.append(text)
    ids = self.encode_text(text)
    return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

  def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True,
                          return_dict=False):
    ids = [self.bos_token_id]
    for m in messages:
      ids += [self.ids["[U]" if m["role"] == "user" else "[A]"]] + self.encode_text(m["content"])
    if add_generation_prompt:
      ids.append(self.ids["[A]"])
    if tokenize:
      return ids
    return "".join(VOCAB[i] for i in ids)

  def decode(self, *args, **kwargs):
    raise AssertionError("the data pipeline must never decode")
