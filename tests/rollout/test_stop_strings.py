"""Stop strings: the engine (host check between device calls, slot cancelled on the device), the
static path of `collect_rollout` and the trainers against a plain reference — `generate`, then
each row cut on the host at the first token whose decoded completion holds a stop string."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
import rljax.rollout.engine as engine_module
from rljax.rollout.engine import EngineConfig, engine_generate
from rljax.rollout.generate import generate
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.scoring import collect_rollout
from rljax.train.state import create_train_state

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
P, N, G = 6, 12, 3
PROMPTS = tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?", "the answer is",
                                        "5 + 5 ?"), length=P)
# "+ " ends at the token after "+" (neither token's text holds it; "+ ?" decodes to "+?"),
# "wor" inside the word "world", "the answer" across two words.
STOP_STRINGS = ("+ ", "wor", "the answer")
SAMPLING = SamplingConfig(max_new_tokens=N, num_samples=G, temperature=1.0)
ENGINE = EngineConfig(num_slots=3, block_size=4, blocks_per_step=2, sync_every=2)
KEY = 0


@pytest.fixture(scope="module")
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


def _text(ids) -> str:
  return TOKENIZER.decode([int(i) for i in ids], skip_special_tokens=True)


def reference(rollout, budgets=None):
  """`generate`'s rollout (numpy) cut at `budgets` (a row reaching its budget without a stop
  token is truncated), then at the first token whose decoded completion so far holds one of
  `STOP_STRINGS` (finished; later tokens pad, log-prob 0, mask 0)."""
  tokens, logprobs = rollout.tokens.copy(), rollout.logprobs.copy()
  lengths, finished = rollout.lengths.copy(), rollout.finished.copy()
  if budgets is not None:
    finished &= lengths <= budgets
    lengths = np.minimum(lengths, budgets)
  for row in range(len(lengths)):
    completion = tokens[row, P:]
    for t in range(lengths[row]):
      if any(s in _text(completion[: t + 1]) for s in STOP_STRINGS):
        lengths[row], finished[row] = t + 1, True
        break
  mask = np.arange(N)[None] < lengths[:, None]
  tokens[:, P:] = np.where(mask, tokens[:, P:], PAD)
  return rollout._replace(tokens=tokens, completion_mask=mask, lengths=lengths,
                          finished=finished, logprobs=np.where(mask, logprobs, 0.0))


def _run(fn, model, **kw):
  with jax.default_matmul_precision("highest"):
    return jax.device_get(fn(model, PROMPTS.tokens, PROMPTS.mask, jax.random.key(KEY), SAMPLING,
                             stop_tokens=[EOS], pad_id=PAD, **kw))


def _assert_same(out, ref, atol=1e-5):
  for field in ("tokens", "prompt_mask", "completion_mask", "lengths", "finished"):
    np.testing.assert_array_equal(getattr(out, field), getattr(ref, field), err_msg=field)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def generated(model):
  return _run(generate, model)


def test_the_reference_holds_every_kind_of_ending(generated):
  """The case is not vacuous: stop strings (one across two tokens), the stop id and the
  length limit all end rows."""
  ref = reference(generated)
  by_string = ref.lengths < generated.lengths
  assert by_string.sum() >= 2 and (generated.finished & ~by_string).any()
  assert (~ref.finished).any()
  last = ref.tokens[np.arange(len(ref.lengths)), P + ref.lengths - 1]
  assert any(not any(s in _text([tok]) for s in STOP_STRINGS)
             for tok in last[by_string])  # a string completed by a token that lacks it


def test_engine_stops_at_stop_strings_and_rewinds_the_slots(model, generated, monkeypatch):
  calls = []

  def recorded(*args):
    result = decode(*args)
    calls.append((np.asarray(args[-2][0]), np.asarray(args[-1]), np.asarray(result[1].active)))
    return result

  decode = engine_module._decode
  monkeypatch.setattr(engine_module, "_decode", recorded)
  out = _run(engine_generate, model, engine=ENGINE, stop_strings=STOP_STRINGS,
             tokenizer=TOKENIZER)
  _assert_same(out, reference(generated))
  # A cut request's slot is inactive after the next call unless a new request took it.
  assert any((rewind >= 0).any() for _, rewind, _ in calls)
  for admit, rewind, active in calls:
    assert not ((rewind >= 0) & ~admit & active).any()


def test_engine_stop_strings_with_budgets(model, generated):
  budgets = np.random.default_rng(0).integers(1, N + 1, size=G * len(PROMPTS.texts))
  out = _run(engine_generate, model, engine=ENGINE, stop_strings=STOP_STRINGS,
             tokenizer=TOKENIZER, budgets=budgets)
  _assert_same(out, reference(generated, budgets))


def _collect(model, engine, stop_strings=STOP_STRINGS, tokenizer=TOKENIZER):
  graphdef, params = nnx.split(model)
  with jax.default_matmul_precision("highest"):
    return collect_rollout(graphdef, params, PROMPTS, jax.random.key(KEY), SAMPLING,
                           reward_fn=lambda p, c: np.zeros(len(c), np.float32),
                           tokenizer=tokenizer, stop_tokens=[EOS], pad_id=PAD, engine=engine,
                           stop_strings=stop_strings)


def test_collect_rollout_cuts_both_paths_alike(model, generated):
  ref = reference(generated)
  static = _collect(model, None)
  _assert_same(static.rollout, ref, atol=0)  # the same tokens cut on the host: exact
  _assert_same(_collect(model, ENGINE).rollout, ref)
  assert static.completions == [_text(row[P:P + k]) for row, k in zip(ref.tokens, ref.lengths)]


def test_trainers_pass_their_stop_strings(model, generated):
  optimizer = make_optimizer(OptimizerConfig(1e-2))
  graphdef, state = create_train_state(model, optimizer, rng=0)
  config = GRPOConfig(sampling=SAMPLING, engine=ENGINE)
  trainer = GRPOTrainer(graphdef, optimizer, config, lambda p, c: np.zeros(len(c), np.float32),
                        TOKENIZER, stop_tokens=[EOS], pad_id=PAD, stop_strings=STOP_STRINGS)
  assert trainer.stop_strings == STOP_STRINGS
  with jax.default_matmul_precision("highest"):
    scored = trainer.rollout(state, PROMPTS, jax.random.key(KEY))
  _assert_same(scored.rollout, reference(generated))
  with pytest.raises(ValueError, match="tokenizer"):
    GRPOTrainer(graphdef, optimizer, config, lambda p, c: c, None, stop_tokens=[EOS],
                pad_id=PAD, stop_strings=["5"])


@pytest.mark.parametrize("stop_strings,tokenizer,match", [
  ([""], TOKENIZER, "stop_strings"),
  (["5", 7], TOKENIZER, "stop_strings"),
  (3, TOKENIZER, "stop_strings"),
  (["5"], None, "tokenizer"),
])
def test_bad_stop_strings_are_named(model, stop_strings, tokenizer, match):
  with pytest.raises(ValueError, match=match):
    _run(engine_generate, model, engine=ENGINE, stop_strings=stop_strings, tokenizer=tokenizer)
  with pytest.raises(ValueError, match=match):
    _collect(model, None, stop_strings, tokenizer)
