"""Multi-turn rollouts (`rljax.agents.multi_turn_rollout`) against what the environment saw.

The environment records every action's token ids it receives; the reference trajectory of a row
is then the concatenation, turn by turn, of those ids and the observation ids the chat template
gives (`ChatTurns`): the rollout must hold exactly these ids (nothing decoded and re-encoded),
its loss mask exactly the action ids, and its policy log-probs the teacher-forced ones over the
whole trajectory. The rows cover the turn-boundary cases: done after the first turn, an empty
observation, a stop id inside an observation, an observation that does not fit the budget, an
environment that raises, one that times out, and rows that run out of turns.
"""

from __future__ import annotations

import collections
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.agents import ChatTurns, Observation, RowEnvironment, RowStep
from rljax.agents.rollout import MultiTurnConfig, multi_turn_rollout
from rljax.losses.policy import ppo_clip_loss
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.logprobs import token_logprobs
from rljax.rollout.engine import EngineConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.experience import experience_from_rollout
from rljax.train.scoring import collect_trajectories

from tiny_tokenizer import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
CHAT = ChatTurns(TOKENIZER)
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
N, G, TIMEOUT = 48, 2, 0.5
KINDS = ("chat", "first", "empty", "stop inside", "long", "error", "slow", "turns", "tool error")
ENGINE = EngineConfig(num_slots=6, block_size=4, blocks_per_step=2, sync_every=4)
TOOL_ERROR = {"role": "tool", "name": "calculator",
              "content": "Error: calculator raised ValueError: not an arithmetic expression"}
MULTI_TURN = MultiTurnConfig(max_turns=3, turn_tokens=8, env_timeout_s=TIMEOUT, prompt_length=16)


class Scripted(RowEnvironment):
  """A row environment by kind; records the action ids it is given per (row id, turn)."""

  def __init__(self):
    self.seen = collections.defaultdict(list)  # row -> the action ids of each of its turns
    self.lock = threading.Lock()
    self.rows = 0

  def reset_row(self, example, rng):
    self.rows += 1  # rows are reset in order: this is row self.rows - 1
    return [{"role": "user", "content": "what is 2 + 3 ?"}], (example["kind"], self.rows - 1, 0)

  def step_row(self, action, action_tokens, state):
    kind, row, turn = state
    turn += 1
    with self.lock:
      self.seen[row].append(list(action_tokens))
    reply = Observation(messages=({"role": "user", "content": "the answer is"},))
    if kind == "error":
      raise RuntimeError("the environment broke")
    if kind == "slow":
      time.sleep(4 * TIMEOUT)
    if kind == "empty":
      reply = Observation()
    if kind == "stop inside":
      reply = Observation(tokens=(EOS, 9, EOS))
    if kind == "long":
      reply = Observation(messages=({"role": "user", "content": "hello world " * 30},))
    if kind == "tool error":  # a failed tool call: its error is the observation, a tool message
      reply = Observation(messages=(TOOL_ERROR,))
    done = {"first": turn == 1, "chat": turn == 2, "stop inside": turn == 2,
            "empty": turn == 3, "tool error": turn == 2}.get(kind, False)
    return RowStep(reply, reward=float(turn), done=done, state=(kind, row, turn))


def _examples():
  return [{"kind": kind} for kind in KINDS]


def _model():
  graphdef, state = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, state))


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def rolled(model):
  env = Scripted()
  with jax.default_matmul_precision("highest"):
    out, metrics = multi_turn_rollout(
      model, env, _examples(), jax.random.key(0), SamplingConfig(max_new_tokens=N, num_samples=G),
      chat=CHAT, stop_tokens=(EOS,), pad_id=0, config=MULTI_TURN, engine=ENGINE)
  return jax.device_get(out), metrics, env


def _observation(kind):
  return {"empty": CHAT.observation_tokens(Observation()), "stop inside": [EOS, 9, EOS],
          "tool error": CHAT.observation_tokens([TOOL_ERROR])}.get(
    kind, CHAT.observation_tokens([{"role": "user", "content": "the answer is"}]))


def test_the_trajectory_is_the_sampled_turns_and_the_template_observations(rolled):
  """Row r, rebuilt from its environment's inputs: action 1, close_turn + observation, action
  2, ... (the last action is followed by nothing); the loss mask is exactly the actions."""
  out, _, env = rolled
  p = out.rollout.prompt_mask.shape[1]
  for r in range(len(out.num_turns)):
    kind, actions = KINDS[r // G], env.seen[r]
    ids, policy = [], []
    for turn, action in enumerate(actions):
      ids += action
      policy += [True] * len(action)
      if turn + 1 < len(actions):
        stopped = "stop_token" if action[-1] == EOS else "length"
        observation = CHAT.close_turn(action, stopped) + _observation(kind)
        ids += observation
        policy += [False] * len(observation)
    length = out.rollout.lengths[r]
    if len(actions) < out.num_turns[r]:  # its last turn ran out of tokens: no step
      tail = out.rollout.tokens[r, p + len(ids):p + length].tolist()
      ids += tail
      policy += [True] * len(tail)
    assert out.rollout.tokens[r, p:p + length].tolist() == ids, (r, kind)
    np.testing.assert_array_equal(out.policy_mask[r, :length], policy, err_msg=f"{r} {kind}")
    assert not out.policy_mask[r, length:].any()


def test_turn_boundary_cases(rolled):
  out, metrics, _ = rolled
  turns = out.num_turns.reshape(-1, G)
  truncated = out.truncated.reshape(-1, G)
  case = {kind: i for i, kind in enumerate(KINDS)}
  assert (turns[case["first"]] == 1).all() and not truncated[case["first"]].any()
  assert (turns[case["chat"]] <= 2).all() and (turns[case["tool error"]] <= 2).all()
  assert (turns[case["turns"]] == 3).all() and truncated[case["turns"]].all()  # out of turns
  assert truncated[case["long"]].all() and (turns[case["long"]] == 1).all()  # did not fit
  for kind in ("error", "slow"):  # the failure became an observation and ended the row
    assert (turns[case[kind]] == 1).all() and not truncated[case[kind]].any()
  assert metrics["env_errors"] == G and metrics["env_timeouts"] == G
  # Rewards at the turns' last tokens: the turn number (0 for a failed step).
  rewards = out.rewards.reshape(-1, G)
  np.testing.assert_array_equal(rewards[case["first"]], 1.0)
  np.testing.assert_array_equal(rewards[case["error"]], 0.0)
  ends = np.flatnonzero(out.turn_mask[case["turns"] * G])
  np.testing.assert_array_equal(out.turn_rewards[case["turns"] * G, ends], [1.0, 2.0, 3.0])
  assert out.policy_mask[np.arange(len(out.num_turns))[:, None], ends[None, :]][case["turns"] * G].all()


def test_policy_logprobs_equal_teacher_forced_over_the_trajectory(model, rolled):
  out, _, _ = rolled
  r = out.rollout
  p = r.prompt_mask.shape[1]
  with jax.default_matmul_precision("highest"):
    logits = model(r.tokens, r.attention_mask)[:, p - 1:-1]
  expected = np.asarray(token_logprobs(logits, r.tokens[:, p:]))
  np.testing.assert_allclose(r.logprobs[out.policy_mask], expected[out.policy_mask], atol=1e-5,
                             rtol=0)
  assert (r.logprobs[~out.policy_mask] == 0).all()


def test_observation_tokens_get_zero_gradient(model, rolled):
  """Through the trainers' `collect_trajectories` (the same rollout as `rolled`, the same
  programs): the experience's loss mask is the policy mask and observations get no gradient."""
  with jax.default_matmul_precision("highest"):
    scored = collect_trajectories(*nnx.split(model), _examples(), jax.random.key(0),
                                  SamplingConfig(max_new_tokens=N, num_samples=G), env=Scripted(),
                                  chat=CHAT, stop_tokens=(EOS,), pad_id=0, config=MULTI_TURN,
                                  engine=ENGINE)
  np.testing.assert_array_equal(scored.rollout.tokens, rolled[0].rollout.tokens)
  batch = experience_from_rollout(scored)
  np.testing.assert_array_equal(batch.loss_mask, scored.policy_mask & scored.rollout.completion_mask)
  observed = np.asarray(batch.attention_mask[:, -N:]) & ~np.asarray(batch.loss_mask)
  assert observed.any()

  def loss(logp):
    return ppo_clip_loss(logp, batch.rollout_logp, jnp.ones_like(logp), batch.loss_mask)[0]

  grad = jax.grad(loss)(jnp.asarray(batch.rollout_logp) + 0.1)
  assert (np.asarray(grad)[observed] == 0).all() and (np.asarray(grad)[np.asarray(batch.loss_mask)] != 0).any()
  assert scored.metrics["turns_mean"] > 1
