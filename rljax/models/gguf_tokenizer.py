"""The tokenizer a GGUF file describes, rebuilt as a `transformers` fast tokenizer.

A GGUF has no `tokenizer.json`: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), the BPE
merges, each token's type (1 normal, 3 control, 4 user-defined, ...), the special token ids, the
add-BOS/EOS flags and the chat template as metadata. For byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, Llama 3, Qwen2, ...) this module rebuilds the
tokenizer with the `tokenizers` library the way transformers' own GGUF path does
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`: `byte_level_tokenizer`,
`add_gguf_special_tokens`, `set_split_regex`) without importing that path:

  * model: BPE(vocab, merges), no dropout, no continuing-subword prefix, `fuse_unk=False`;
    a token outside the byte alphabet is re-spelled byte by byte (as transformers does);
  * pre-tokenizer from `tokenizer.ggml.pre` (llama.cpp's names): GPT-2's regex (`ByteLevel`) by
    default; "smollm" also splits every digit (`Digits(individual_digits=True)`, as SmolLM's own
    tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM); "llama-bpe"/"llama3"/... and
    "qwen2"/... use their split regexes; an unknown name falls back to GPT-2's with a warning;
  * decoder: ByteLevel;
  * control tokens become special added tokens, user-defined ones plain added tokens (matched
    whole); bos/eos/unk/pad tokens, `add_bos_token` / `add_eos_token` and the chat template go
    into the transformers wrapper (which builds the BOS/EOS post-processor).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {
  "llama3": _LLAMA3_SPLIT,
  "llama-v3": _LLAMA3_SPLIT,
  "llama-bpe": _LLAMA3_SPLIT,
  "smaug-bpe": _LLAMA3_SPLIT,
  "qwen2": _QWEN2_SPLIT,
  "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_GPT2_PRE = ("gpt2", "gpt-2", "default", None)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte → printable character table (the alphabet of byte-level BPE vocabularies)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  printable += list(range(ord("®"), ord("ÿ") + 1))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in chars)))


def _byte_level_spelling(token: str) -> str:
  table = bytes_to_unicode()
  alphabet = set(table.values())
  if set(token) <= alphabet:
    return token
  return "".join(table[b] for b in token.encode("utf-8"))


def byte_level_pre_tokenizer(pre: str | None, *, add_prefix_space: bool = False) -> Any:
  """The pre-tokenizer of llama.cpp's pre-tokenizer type `pre` (see the module docstring)."""
  if pre == "smollm":
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
      ]
    )
  if pre in _SPLIT_REGEXES:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
      ]
    )
  if pre not in _GPT2_PRE:
    warnings.warn(
      f"GGUF tokenizer.ggml.pre={pre!r} is not known to rljax; using GPT-2's pre-tokenizer "
      f"(known: {sorted(_SPLIT_REGEXES) + ['smollm', 'gpt2', 'default']})",
      stacklevel=2,
    )
  return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)


def byte_level_bpe(
  tokens: list[str],
  merges: list[str],
  token_types: list[int] | None = None,
  *,
  pre: str | None = None,
  add_prefix_space: bool = False,
) -> Tokenizer:
  """A `tokenizers.Tokenizer`: byte-level BPE over `tokens` (id = index) and `merges` ("a b")."""
  vocab = {_byte_level_spelling(token): index for index, token in enumerate(tokens)}
  pairs = [tuple(merge.split(" ", 1)) for merge in merges]
  tokenizer = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=pairs,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
    )
  )
  tokenizer.pre_tokenizer = byte_level_pre_tokenizer(pre, add_prefix_space=add_prefix_space)
  tokenizer.decoder = decoders.ByteLevel()
  alphabet = set(bytes_to_unicode().values())
  types = list(token_types or ())
  control = [
    AddedToken(t, normalized=False, special=True)
    for t, kind in zip(tokens, types)
    if kind == _CONTROL and set(t) <= alphabet  # otherwise a llama.cpp mislabel (transformers)
  ]
  user = [
    AddedToken(t, normalized=False, special=False)
    for t, kind in zip(tokens, types)
    if kind == _USER_DEFINED and t in vocab
  ]
  if control:
    tokenizer.add_special_tokens(control)
  if user:
    tokenizer.add_tokens(user)
  return tokenizer


def hf_tokenizer_from_gguf(metadata: dict[str, Any]) -> Any:
  """A `transformers.PreTrainedTokenizerFast` from GGUF metadata (see the module docstring).

  Raises:
    ValueError: a tokenizer model other than "gpt2" (byte-level BPE), or no tokens/merges.
  """
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
      f"unsupported GGUF tokenizer.ggml.model {kind!r}; supported: ['gpt2'] (byte-level BPE)"
    )
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if not metadata.get(key):
      raise ValueError(f"GGUF metadata has no {key!r}")
  tokens = list(metadata["tokenizer.ggml.tokens"])
  backend = byte_level_bpe(
    tokens,
    list(metadata["tokenizer.ggml.merges"]),
    metadata.get("tokenizer.ggml.token_type"),
    pre=metadata.get("tokenizer.ggml.pre"),
    add_prefix_space=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
  )
  special = {}
  for name, key in (
    ("bos_token", "bos_token_id"),
    ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"),
    ("pad_token", "padding_token_id"),
  ):
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    special[name] = None if token_id is None else tokens[int(token_id)]
  kwargs: dict[str, Any] = {
    "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
    "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
  }
  if metadata.get("tokenizer.chat_template"):
    kwargs["chat_template"] = metadata["tokenizer.chat_template"]
  return PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs)
