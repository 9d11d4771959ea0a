"""Dynamic sampling as a stream on the engine (`collect_streamed`): the resampled groups are held
requests of the same engine run, released as groups turn out uninformative. Reference: the engine
run on every copy of the batch at once, then `sample_informative`'s selection on the host — the
informative groups of copy 0, then the first needed ones of copy 1, 2, …, filled with copy 0's
uninformative groups. The stream must give exactly those rows, sample fewer groups, and release
resamples while copy 0 is still decoding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.data.batching import PromptBatch
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.rollout.engine import EngineConfig, EngineRun, engine_generate
from rljax.rollout.generate import Rollout
from rljax.rollout.sampling import SamplingConfig
from rljax.train.dynamic_sampling import collect_streamed, informative_groups
from rljax.train.scoring import score_rollout

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
G, N, RESAMPLE = 4, 6, 2
SAMPLING = SamplingConfig(num_samples=G, max_new_tokens=N)
ENGINE = EngineConfig(num_slots=4, block_size=4, blocks_per_step=2, sync_every=2)
PROMPTS = tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?", "2 + 3 ?",
                                        "hello ?", "the answer is"), length=6)


def reward(prompts, completions, *, completion_tokens, completion_mask, **fields):
  """Constant on "hello" prompts (never informative); elsewhere the parity of the sampled ids'
  sum (a group of 4 agrees with probability 1/8)."""
  parity = np.where(completion_mask, completion_tokens, 0).sum(-1) % 2
  return np.where([p.startswith("hello") for p in prompts], 1.0, parity).astype(np.float32)


def _reference(graphdef, params, key):
  copies = 1 + RESAMPLE
  b = len(PROMPTS.texts)
  tiled = PromptBatch(np.tile(PROMPTS.tokens, (copies, 1)), np.tile(PROMPTS.mask, (copies, 1)),
                      list(PROMPTS.texts) * copies, {})
  out = Rollout(*jax.device_get(tuple(engine_generate(
    (graphdef, params), tiled.tokens, tiled.mask, key, SAMPLING, stop_tokens=[EOS], pad_id=EOS,
    engine=ENGINE))))
  scored = score_rollout(out, tiled, 0.0, reward_fn=reward, tokenizer=TOKENIZER, num_samples=G,
                         max_new_tokens=N)
  good = informative_groups(scored, G)
  need, picks = b - good[:b].sum(), list(np.flatnonzero(good[:b]))
  for k in range(1, copies):
    if need == 0:
      break
    found = [c for c in range(k * b, (k + 1) * b) if good[c]][:need]
    picks += found
    need -= len(found)
  picks += list(np.flatnonzero(~good[:b]))[:need]
  rows = np.concatenate([np.arange(c * G, (c + 1) * G) for c in picks])
  return scored, rows


def test_the_stream_selects_what_the_whole_resampled_batch_would(monkeypatch):
  graphdef, params = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  key = jax.random.key(7)
  released_while_decoding = []
  release = EngineRun.release

  def recorded(run, requests):
    released_while_decoding.append(int((~run.finished[:len(PROMPTS.texts) * G]).sum()))
    return release(run, requests)

  monkeypatch.setattr(EngineRun, "release", recorded)
  with jax.default_matmul_precision("highest"):
    stream, metrics = collect_streamed(graphdef, params, PROMPTS, key, SAMPLING,
                                       max_resample=RESAMPLE, stop_tokens=[EOS], pad_id=EOS,
                                       engine=ENGINE, tokenizer=TOKENIZER, reward_fn=reward)
    scored, rows = _reference(graphdef, params, key)
  for field in ("tokens", "completion_mask", "lengths", "finished"):
    np.testing.assert_array_equal(getattr(stream.rollout, field),
                                  getattr(scored.rollout, field)[rows], err_msg=field)
  np.testing.assert_allclose(stream.rollout.logprobs, scored.rollout.logprobs[rows], atol=1e-5)
  np.testing.assert_array_equal(stream.scores, scored.scores[rows])
  np.testing.assert_array_equal(stream.prompt_index, (rows // G) % len(PROMPTS.texts))
  # Uninformative prompts were resampled, the batch refilled where it could be.
  assert metrics["zero_variance_groups"] >= 0.4 and metrics["resamples"] >= 1
  assert metrics["filled_zero_variance_groups"] < metrics["zero_variance_groups"]
  # A stream: resamples entered while requests of the first batch were still running, and
  # fewer groups than the whole copies were sampled.
  assert released_while_decoding and max(released_while_decoding) > 0
  assert len(released_while_decoding) < RESAMPLE * len(PROMPTS.texts)


def test_held_requests_wait_for_release():
  graphdef, params = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  run = EngineRun((graphdef, params), PROMPTS.tokens, PROMPTS.mask, jax.random.key(0), SAMPLING,
                  stop_tokens=[EOS], pad_id=EOS, engine=ENGINE, held=range(G, 2 * G))
  while not run.done:
    run.advance()
  assert not run.finished[G:2 * G].any() and run.finished[:G].all()
  with pytest.raises(ValueError, match="not finished"):
    run.rollout(range(G, 2 * G))
  run.release(range(G, 2 * G))
  while not run.done:
    run.advance()
  assert run.finished.all()
  with pytest.raises(ValueError, match="held"):
    run.release([0])
  with pytest.raises(ValueError, match="distinct request ids"):
    EngineRun((graphdef, params), PROMPTS.tokens, PROMPTS.mask, jax.random.key(0), SAMPLING,
              stop_tokens=[EOS], pad_id=EOS, engine=ENGINE, held=[10_000])
