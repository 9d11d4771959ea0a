"""A tiny word-level tokenizer for tests: built with `tokenizers`, no downloads.

Wrapped in `transformers.PreTrainedTokenizerFast` with bos/eos/pad/unk tokens and a chat template,
so it saves and reloads like a real Hugging Face tokenizer (`AutoTokenizer.from_pretrained`).
"""

from __future__ import annotations

import pathlib

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rljax.data import PromptBatch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["hello", "world", "what", "is", "2", "3", "5", "+", "?", "the", "answer", "user",
         "assistant", "system", ":"]
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} "
  "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
  """A 19-token word-level tokenizer: ids 0..3 are <pad> <s> </s> <unk>, then `WORDS`."""
  vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
    chat_template=CHAT_TEMPLATE,
  )


def tiny_prompt_batch(tokenizer, texts=("what is 2 + 3 ?", "hello world ?"), *, length=6,
                      fields=None) -> PromptBatch:
  """Word-split `texts` left-padded to `length` tokens (a rollout's prompt batch)."""
  rows = [tokenizer.convert_tokens_to_ids(t.split()) for t in texts]
  tokens, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):], mask[i, length - len(r):] = r, True
  return PromptBatch(tokens, mask, list(texts), dict(fields or {}))


GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Gemma 2's chat template (its tokenizer_config.json, with spaces for newlines so that the words
# split): no system role, "model" for the assistant, every turn closed by <end_of_turn>.
GEMMA_CHAT_TEMPLATE = (
  "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
  "{{ raise_exception('System role not supported') }}{% endif %}"
  "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
  "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
  "{% else %}{% set role = message['role'] %}{% endif %}"
  "{{ '<start_of_turn> ' + role + ' ' + message['content'] | trim + ' <end_of_turn> ' }}"
  "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn> model '}}{% endif %}"
)


def tiny_gemma_tokenizer() -> PreTrainedTokenizerFast:
  """A word-level tokenizer with Gemma's special tokens (ids 0..5: <pad> <eos> <bos> <unk>
  <start_of_turn> <end_of_turn>), then `WORDS` and "model", and Gemma 2's chat template."""
  vocab = {token: i for i, token in enumerate(GEMMA_SPECIAL + WORDS + ["model"])}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece(prefix="##")
  return PreTrainedTokenizerFast(
    tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
    unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    chat_template=GEMMA_CHAT_TEMPLATE,
  )


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
QWEN_CHAT_TEMPLATE_FILE = (pathlib.Path(__file__).parent / "agents" / "fixtures"
                           / "qwen2_5_chat_template.jinja")
# A few byte-pair merges, so that ids are not just bytes.
QWEN_MERGES = [("t", "o"), ("o", "l"), ("to", "ol"), ("4", "2"), ("Ġ", "4"), ("Ġ", "t")]


def tiny_qwen_tokenizer(*, rstrip: tuple[str, ...] = (), lstrip: tuple[str, ...] = ()
                        ) -> PreTrainedTokenizerFast:
  """A byte-level BPE tokenizer (the 256 byte symbols, then the merges of `QWEN_MERGES`) with
  Qwen2.5's special tokens <|endoftext|> <|im_start|> <|im_end|> <tool_call> </tool_call> (ids
  262..266, all special) and Qwen2.5-Instruct's chat template (`tests/agents/fixtures`).
  `rstrip` / `lstrip`: special tokens that absorb the whitespace on their right / left."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  for a, b in QWEN_MERGES:
    vocab[a + b] = len(vocab)
  backend = Tokenizer(models.BPE(vocab=vocab, merges=QWEN_MERGES))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in rstrip,
                                         lstrip=t in lstrip) for t in QWEN_SPECIAL])
  return PreTrainedTokenizerFast(
    tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    chat_template=QWEN_CHAT_TEMPLATE_FILE.read_text())
