"""GRPO process supervision in the trainer: the advantages it trains with equal a numpy
transcription of process supervision on the reward fn's StepRewards; steps run without
recompiling; dynamic sampling and the overlong penalty with step rewards; reward-kind errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.rewards import StepRewards, process_reward
from rljax.rollout.generate import Rollout
from rljax.rollout.sampling import SamplingConfig
from rljax.train.compiles import count_compiles
from rljax.train.dynamic_sampling import informative_groups
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.onpolicy import UpdateConfig
from rljax.train.scoring import Scored, call_reward_fn
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import create_train_state

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer


TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
FIVE = TOKENIZER.convert_tokens_to_ids("5")
DELIMS = TOKENIZER.convert_tokens_to_ids(["2", "3", "+", "?", "the", "is"])
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}
N, P, G = 6, 6, 4
OPTIMIZER = make_optimizer(OptimizerConfig(1e-2))


def prompt_batch(texts=("what is 2 + 3 ?", "hello world ?")):
  return tiny_prompt_batch(TOKENIZER, texts, length=P, fields={"answer": ["5", "world"]})

def five_steps(prompt, steps, **fields):
  """Token-id steps: +1 per "5", −0.1 per token (varies across steps and rows)."""
  return [s.count(FIVE) - 0.1 * len(s) for s in steps]


class Recording:
  """Wraps a reward fn and keeps its last output (what the trainer was given)."""

  def __init__(self, fn):
    self.fn, self.last = fn, None

  def __call__(self, prompts, completions, **fields):
    self.last = self.fn(prompts, completions, **fields)
    return self.last


def make(config, reward_fn):
  graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPTIMIZER, rng=0)
  trainer = GRPOTrainer(graphdef, OPTIMIZER, config, reward_fn, None, stop_tokens=[EOS],
                        pad_id=EOS, compiler_options=FAST)
  return trainer, trainer.init_state(state)


def process_config(**kw):
  return GRPOConfig(**{"sampling": SamplingConfig(num_samples=G, max_new_tokens=N),
                       "update": UpdateConfig(chunk_size=8), "advantage": "process", **kw})


def np_process_advantages(step_rewards, step_mask, mask, group_size, eps=1e-6):
  """Shao et al. 2024 §4.1.3, written out: normalise every step reward of a group by the mean
  and (unbiased) std of the group's step rewards; a token's advantage is the sum of the
  normalised rewards of its row's steps that end at or after it. Constant groups give 0."""
  r = np.asarray(step_rewards, np.float64)
  ends = np.asarray(step_mask, bool)
  batch, length = r.shape
  out = np.zeros((batch, length))
  for g in range(batch // group_size):
    rows = range(g * group_size, (g + 1) * group_size)
    values = [r[b, t] for b in rows for t in range(length) if ends[b, t]]
    if len(values) < 2 or max(values) == min(values):
      continue
    mean = sum(values) / len(values)
    std = np.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    for b in rows:
      total = 0.0
      for t in reversed(range(length)):
        if ends[b, t]:
          total += (r[b, t] - mean) / (std + eps)
        out[b, t] = total if mask[b, t] else 0.0
  return out


def test_process_advantages_tis_training_and_no_recompilation():
  reward = Recording(process_reward(five_steps, delimiter_ids=DELIMS))
  trainer, state = make(process_config(use_rollout_logprobs=True, tis_cap=2.0, kl_coef=0.0),
                        reward)
  prompts = prompt_batch()
  scored, metrics = trainer.collect(state, prompts, jax.random.key(0))
  returned = reward.last
  assert isinstance(returned, StepRewards) and returned.step_mask.sum() > 2 * G
  np.testing.assert_array_equal(scored.step_rewards, returned.rewards)
  np.testing.assert_array_equal(scored.step_mask, returned.step_mask)
  sums = np.where(returned.step_mask, returned.rewards.astype(np.float64), 0).sum(axis=1)
  np.testing.assert_allclose(scored.scores, sums, rtol=1e-6)  # a row's score = Σ step rewards
  np.testing.assert_allclose(metrics["reward_mean"], sums.mean(), rtol=1e-5)

  # Truncated importance sampling still scales the advantages: w = min(exp(old − rollout), C).
  # The sampler's log-probs are shifted by up to ±1 so that w differs from 1 (and hits C = 2).
  mask = scored.rollout.completion_mask
  shift = np.random.default_rng(0).uniform(-1, 1, mask.shape).astype(np.float32) * mask
  scored = scored._replace(rollout=scored.rollout._replace(
    logprobs=scored.rollout.logprobs + shift))
  _, batch, extra = trainer.prepare(state, scored)
  want = np_process_advantages(returned.rewards, returned.step_mask, mask, G)
  assert np.abs(want).max() > 0.1
  weight = np.minimum(np.exp(np.asarray(batch.old_logp, np.float64)
                             - scored.rollout.logprobs), 2.0)
  assert (weight[mask] == 2.0).any() and np.abs(weight[mask] - 1).max() > 0.5
  np.testing.assert_allclose(np.asarray(batch.advantages), want * weight, atol=1e-5)
  np.testing.assert_allclose(float(extra["tis_weight_mean"]), weight[mask].mean(), rtol=1e-5)

  before = jax.device_get(state.params)
  state, m = trainer.step(state, prompts, jax.random.key(1))
  assert all(np.isfinite(v) for v in m.values()) and m["grad_norm"] > 0
  after = jax.device_get(state.params)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(after)))
  state, m = trainer.step(state, prompts, jax.random.key(2))
  with count_compiles() as compiles:
    state, m = trainer.step(state, prompts, jax.random.key(3))
  assert compiles.count == 0  # process mode: no new compilation after the first steps
  assert np.isfinite(m["loss"])


def constant_for_hello(prompts, completions, *, completion_tokens, completion_lengths, **fields):
  """Step rewards all 1 for "hello" rows (row sums still differ with the step count: a group
  with no advantage), varied otherwise."""
  out = process_reward(lambda p, steps, **f: [float(sum(s)) for s in steps],
                       delimiter_ids=DELIMS)(prompts, completions,
                                             completion_tokens=completion_tokens,
                                             completion_lengths=completion_lengths)
  hello = np.array([p.startswith("hello") for p in prompts])[:, None]
  return StepRewards(np.where(hello & out.step_mask, 1.0, out.rewards).astype(np.float32),
                     out.step_mask)


def test_dynamic_sampling_with_step_rewards_keeps_the_batch_shape():
  trainer, state = make(process_config(dynamic_sampling=True, max_resample=3),
                        constant_for_hello)
  scored, m = trainer.collect(state, prompt_batch(), jax.random.key(0))
  assert m["zero_variance_groups"] == 0.5 and m["resamples"] == 1.0
  assert m["filled_zero_variance_groups"] == 0.0
  assert scored.rollout.tokens.shape == (2 * G, P + N)
  assert scored.step_rewards.shape == scored.step_mask.shape == (2 * G, N)
  assert set(scored.prompt_index.tolist()) == {0}  # only the informative prompt survives
  sums = np.where(scored.step_mask, scored.step_rewards.astype(np.float64), 0).sum(axis=1)
  np.testing.assert_allclose(scored.scores, sums, rtol=1e-6)  # rows carried together
  _, batch, _ = trainer.prepare(state, scored)
  assert batch.advantages.shape == (2 * G, N)


def test_informative_groups_use_step_rewards_not_row_sums():
  # Group 0: every step reward is 1 but rows have 1 or 2 steps (sums differ): advantage 0.
  # Group 1: every row sums to 1 but the step rewards differ: a real signal.
  # Group 2: no step at all.
  rewards = np.zeros((6, 3), np.float32)
  mask = np.zeros((6, 3), bool)
  rewards[0, [0, 2]], mask[0, [0, 2]] = 1, True
  rewards[1, 2], mask[1, 2] = 1, True
  rewards[2, [0, 2]], mask[2, [0, 2]] = (0.25, 0.75), True
  rewards[3, 2], mask[3, 2] = 1, True
  sums = rewards.sum(axis=1)
  scored = Scored(None, sums, sums, np.repeat(np.arange(3), 2), [], 0.0, rewards, mask)
  np.testing.assert_array_equal(informative_groups(scored, 2), [False, True, False])
  outcome = scored._replace(step_rewards=None, step_mask=None)
  np.testing.assert_array_equal(informative_groups(outcome, 2), [True, False, False])


def test_overlong_penalty_lands_on_the_last_token_as_a_step():
  def first_token_step(prompts, completions, *, completion_lengths, **fields):
    return StepRewards.from_steps([[(0, 1.0)] for _ in completions], num_tokens=N)

  trainer, state = make(process_config(overlong_cache=N, overlong_factor=0.5),
                        first_token_step)
  scored, _ = trainer.collect(state, prompt_batch(), jax.random.key(5))
  lengths = scored.rollout.lengths
  want_r, want_m = np.zeros((2 * G, N)), np.zeros((2 * G, N), bool)
  for b, length in enumerate(lengths):
    penalty = 0.5 * (0 - length) / N  # DAPO eq. 13 with L_max − L_cache = 0: every row pays
    want_r[b, 0], want_m[b, 0] = 1.0, True
    want_r[b, length - 1] += penalty
    want_m[b, length - 1] = True
  assert (lengths > 1).any()
  np.testing.assert_allclose(scored.step_rewards, want_r, atol=1e-6)
  np.testing.assert_array_equal(scored.step_mask, want_m)
  np.testing.assert_allclose(scored.raw_scores, 1.0)
  np.testing.assert_allclose(scored.scores, want_r.sum(axis=1), atol=1e-6)


def test_reward_kind_mismatches_raise_clear_errors():
  outcome = lambda p, c, **f: np.ones(len(c), np.float32)  # noqa: E731
  trainer, state = make(process_config(), outcome)
  with pytest.raises(ValueError, match='advantage="process"\\) needs a `reward_fn` that returns'):
    trainer.collect(state, prompt_batch(), jax.random.key(0))
  trainer = GRPOTrainer(trainer.graphdef, OPTIMIZER, process_config(advantage="grpo"),
                        process_reward(five_steps, delimiter_ids=DELIMS), None,
                        stop_tokens=[EOS], pad_id=EOS, compiler_options=FAST)
  with pytest.raises(ValueError, match="returned StepRewards; use GRPOConfig"):
    trainer.collect(state, prompt_batch(), jax.random.key(0))


def test_call_reward_fn_checks_step_rewards():
  lengths = np.array([2, 3])
  rollout = Rollout(np.zeros((2, 2 + 4), np.int32), np.ones((2, 2), bool),
                    np.arange(4)[None] < lengths[:, None], np.zeros((2, 4), np.float32), lengths,
                    np.ones(2, bool))
  step = StepRewards.from_steps([[(1, 1.0)], [(2, 0.0)]], num_tokens=4)
  call = lambda fn, **kw: call_reward_fn(fn, ["a", "b"], ["x", "y"], {}, rollout, **kw)  # noqa
  rewards, mask = call(lambda p, c, **f: step, process=True)
  np.testing.assert_array_equal(mask, step.step_mask)
  assert call(lambda p, c, **f: step, process=None)[0] is not None
  with pytest.raises(ValueError, match="returned per-step rewards"):
    call(lambda p, c, **f: step)
  with pytest.raises(ValueError, match="needs a `reward_fn` that returns StepRewards"):
    call(lambda p, c, **f: np.ones(2), process=True)
  outside = StepRewards.from_steps([[(2, 1.0)], []], num_tokens=4)  # row 0 has 2 tokens
  with pytest.raises(ValueError, match=r"outside the completion in rows \[0\]"):
    call(lambda p, c, **f: outside, process=True)
  short = StepRewards.from_steps([[], []], num_tokens=3)
  with pytest.raises(ValueError, match=r"StepRewards.rewards has shape \(2, 3\); expected"):
    call(lambda p, c, **f: short, process=True)
