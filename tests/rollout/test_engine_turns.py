"""Extensible slots (`EngineRun(hold=True)`): requests pause at turn ends, the host appends a
chunk of tokens at each slot's own positions, decoding resumes from the cached keys.

The reference is the model run teacher-forced over each whole trajectory (prompt, then every
turn's sampled tokens and every appended chunk): a policy token's sampled log-prob must equal its
teacher-forced log-prob within 1e-5, and under greedy sampling every policy token must be the
teacher-forced argmax — which holds only if the extension wrote the right keys at the right
positions and a rewound stop-string cut left no stale key visible. (1e-5 absolute plus 2e-6
relative: the scaled-up weights give log-probs down to about −10, where float32 rounding of two
differently ordered computations reaches 1e-5; a wrong key moves them by far more.)
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.logprobs import token_logprobs
from rljax.rollout.engine import EngineConfig, EngineRun
from rljax.rollout.sampling import SamplingConfig

from test_engine import CONFIG, _model  # the same tiny model (scaled-up weights)
from tiny_tokenizer import tiny_tokenizer

P, N, G = 6, 40, 2
PROMPTS = np.array([[0, 0, 5, 9, 17, 30], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 22, 40]], np.int32)
STOPS = (1, 2, 3)
ENGINE = EngineConfig(num_slots=3, block_size=4, blocks_per_step=2, sync_every=4)
SAMPLED = SamplingConfig(max_new_tokens=N, num_samples=G, temperature=1.0)
GREEDY = SamplingConfig(max_new_tokens=N, num_samples=G, temperature=0.0)


@pytest.fixture(scope="module")
def model():
  return _model()


def _chunk(request: int, turn: int) -> list[int]:
  """The tokens appended after turn `turn` of `request`: 0 to 6 ids, none of them a stop id
  (a chunk of length 0 resumes the turn as it is)."""
  rng = np.random.default_rng(100 * request + turn)
  return rng.integers(4, CONFIG.vocab_size, size=(request + turn) % 7).tolist()


def _drive(model, sampling, *, turns=3, key=0, **kw):
  """Runs every request for up to `turns` extensions (fewer when a chunk does not fit);
  returns (rollout, observation mask, [(request, completion at the pause)])."""
  with jax.default_matmul_precision("highest"):
    run = EngineRun(model, PROMPTS, PROMPTS != 0, jax.random.key(key), sampling,
                    stop_tokens=STOPS, pad_id=0, engine=ENGINE, hold=True, **kw)
    done = collections.Counter()
    pauses = []
    while not run.done:
      paused = run.advance()
      for r, completion in zip(paused, run.completion(paused)):
        pauses.append((r, completion))
        chunk = _chunk(r, done[r])
        if done[r] < turns and len(chunk) <= run.room(r):
          run.extend(r, chunk)
          done[r] += 1
        else:
          run.finish(r)
    return jax.device_get(run.rollout()), run.observation_mask(), pauses


def _teacher_forced(model, out):
  with jax.default_matmul_precision("highest"):
    logits = model(out.tokens, out.attention_mask)[:, P - 1: -1]
  return np.asarray(logits)


@pytest.fixture(scope="module")
def sampled(model):
  return _drive(model, SAMPLED)


def test_policy_logprobs_equal_teacher_forced_over_the_whole_trajectory(model, sampled):
  out, observed, pauses = sampled
  assert observed.any() and (out.lengths > max(len(_chunk(r, 0)) for r in range(6)) + 2).any()
  expected = np.asarray(token_logprobs(_teacher_forced(model, out), out.tokens[:, P:]))
  policy = out.completion_mask & ~observed
  np.testing.assert_allclose(out.logprobs[policy], expected[policy], atol=1e-5, rtol=2e-6)
  assert (out.logprobs[observed] == 0).all()


def test_the_chunks_are_in_the_completion_where_the_turns_ended(sampled):
  out, observed, pauses = sampled
  turns = collections.Counter()
  for r, completion in pauses:
    start = len(completion)
    chunk = _chunk(r, turns[r])
    if (out.lengths[r] > start) and turns[r] < 3:  # extended
      np.testing.assert_array_equal(out.tokens[r, P + start: P + start + len(chunk)], chunk)
      assert observed[r, start: start + len(chunk)].all()
      turns[r] += 1
    # a turn ends at a stop id or at the request's budget
    assert completion[-1] in STOPS or start == N
  assert observed.sum() == sum(len(_chunk(r, t)) for r in turns for t in range(turns[r]))
  assert not (observed & ~out.completion_mask).any()


def test_greedy_policy_tokens_are_the_teacher_forced_argmax(model):
  out, observed, _ = _drive(model, GREEDY)
  argmax = _teacher_forced(model, out).argmax(-1)
  policy = out.completion_mask & ~observed
  np.testing.assert_array_equal(out.tokens[:, P:][policy], argmax[policy])


def test_same_key_same_trajectories_and_turn_budgets(model, sampled):
  again = _drive(model, SAMPLED)
  for a, b in zip(sampled[0], again[0]):
    np.testing.assert_array_equal(a, b)
  _, _, pauses = _drive(model, SAMPLED, turn_tokens=3, key=1)
  start, turns = collections.Counter(), collections.Counter()
  for r, completion in pauses:  # no turn samples more than its budget
    assert 1 <= len(completion) - start[r] <= 3
    start[r] = len(completion) + len(_chunk(r, turns[r]))
    turns[r] += 1
  assert any(c[-1] not in STOPS and len(c) < N for _, c in pauses)  # a turn cut by its budget


def test_stop_string_turn_ends_rewind_the_slot():
  tokenizer = tiny_tokenizer()
  config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  model = Transformer(config, rngs=nnx.Rngs(0))
  prompts = np.array([[0, 1, 6, 7, 8, 9], [0, 0, 0, 1, 4, 5]], np.int32)
  strings = ("+ ", "wor")

  with jax.default_matmul_precision("highest"):
    run = EngineRun(model, prompts, prompts != 0, jax.random.key(3), SAMPLED,
                    stop_tokens=(tokenizer.eos_token_id,), pad_id=0, engine=ENGINE, hold=True,
                    stop_strings=strings, tokenizer=tokenizer)
    turns, cut = collections.Counter(), 0
    while not run.done:
      paused = run.advance()
      for r, completion in zip(paused, run.completion(paused)):
        text = tokenizer.decode(completion[run.spans[r][-1][0] + run.spans[r][-1][1]:]
                                if run.spans[r] else completion, skip_special_tokens=True)
        cut += any(s in text for s in strings)
        if turns[r] < 3 and run.room(r) >= 2:
          run.extend(r, [4, 5])  # "what is"
          turns[r] += 1
        else:
          run.finish(r)
    out = jax.device_get(run.rollout())
  assert cut >= 2
  observed = run.observation_mask()
  with jax.default_matmul_precision("highest"):
    logits = model(out.tokens, out.attention_mask)[:, P - 1: -1]
  expected = np.asarray(token_logprobs(logits, out.tokens[:, P:]))
  policy = out.completion_mask & ~observed
  np.testing.assert_allclose(out.logprobs[policy], expected[policy], atol=1e-5, rtol=2e-6)


def test_bad_extensions_are_refused(model):
  run = EngineRun(model, PROMPTS, PROMPTS != 0, jax.random.key(0), SAMPLED, stop_tokens=STOPS,
                  pad_id=0, engine=ENGINE, hold=True)
  with pytest.raises(ValueError, match="not paused"):
    run.extend(0, [5])
  paused = []
  while not paused:
    paused = run.advance()
  r = paused[0]
  with pytest.raises(ValueError, match="do not fit"):
    run.extend(r, [5] * (run.room(r) + 1))
  with pytest.raises(ValueError, match=r"ids in \[0, 64\)"):
    run.extend(r, [64])
  run.finish(r)
  with pytest.raises(ValueError, match="not paused"):
    run.finish(r)
  with pytest.raises(ValueError, match="turn_tokens"):
    EngineRun(model, PROMPTS, PROMPTS != 0, jax.random.key(0), SAMPLED, stop_tokens=STOPS,
              pad_id=0, turn_tokens=4)
