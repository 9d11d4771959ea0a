"""Multi-turn GRPO and PPO steps: the trainers with an `environment` on a (data 2 × fsdp 4) mesh
equal one device (the same trajectories, the same update), and the loss mask of the batch they
train on is the policy's tokens only."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rljax.agents import Observation, RowEnvironment, RowStep
from rljax.agents.rollout import MultiTurnConfig
from rljax.models.config import ModelConfig
from rljax.ops.kl_control import fixed_kl_controller
from rljax.models.heads import ValueModel
from rljax.models.transformer import Transformer
from rljax.parallel.rules import FSDP_RULES, MESH_AXES, mesh_and_rules
from rljax.rollout.engine import EngineConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.onpolicy import UpdateConfig
from rljax.train.ppo import PPOConfig, PPOTrainer, ppo_advantages, split_critic
from rljax.train.state import create_train_state

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}
SGD, CRITIC_SGD = optax.sgd(0.1), optax.sgd(0.05)  # SGD: rounding is not amplified, as by Adam
TOL = 2e-5

SAMPLING = SamplingConfig(num_samples=4, max_new_tokens=20)
ENGINE = EngineConfig(num_slots=4, block_size=4, blocks_per_step=2, sync_every=4)
TURNS = MultiTurnConfig(max_turns=2, turn_tokens=5, prompt_length=16)


def auto_mesh(shape):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def prompt_batch():
  return tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?", "2 + 3 ?",
                                       "what is hello ?"))


def params_close(a, b, tol=TOL):
  worst = max(jax.tree.leaves(jax.tree.map(
    lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))
  assert worst < tol, worst


class Fives(RowEnvironment):
  """Two turns; each turn's reward is the fraction of "5"s among its words."""

  def reset_row(self, example, rng):
    return [{"role": "user", "content": example["prompt"]}], 0

  def step_row(self, action, action_tokens, state):
    words = action.split()
    return RowStep(Observation(messages=({"role": "user", "content": "what is 5 ?"},)),
                   reward=words.count("5") / max(len(words), 1), done=state + 1 >= 2,
                   state=state + 1)


def grpo(mesh=None, rules=None):
  config = GRPOConfig(sampling=SAMPLING, engine=ENGINE, multi_turn=TURNS,
                      update=UpdateConfig(chunk_size=8), kl_coef=0.04)
  graphdef, state = create_train_state(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0)), SGD, rng=0,
                                       mesh=mesh, rules=rules)
  trainer = GRPOTrainer(graphdef, SGD, config, None, TOKENIZER, stop_tokens=[EOS], pad_id=EOS,
                        mesh=mesh, rules=rules, compiler_options=FAST, environment=Fives())
  return trainer, trainer.init_state(state)


def ppo(mesh=None, rules=None, kl_coef=0.05):
  config = PPOConfig(sampling=SAMPLING, engine=ENGINE, multi_turn=TURNS,
                     update=UpdateConfig(chunk_size=8, agg="token-mean"), kl_coef=kl_coef)
  with mesh_and_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
    policy = Transformer(CONFIG, rngs=nnx.Rngs(0))
    critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
  critic_graphdef, _, _ = split_critic(critic)
  graphdef = nnx.split(policy, nnx.Param, ...)[0]
  trainer = PPOTrainer(graphdef, critic_graphdef, SGD, CRITIC_SGD, config, None, TOKENIZER,
                       stop_tokens=[EOS], pad_id=EOS, mesh=mesh, rules=rules,
                       compiler_options=FAST, environment=Fives())
  graphdef, state = create_train_state(policy, SGD, rng=0, mesh=mesh, rules=rules)
  return trainer, trainer.init_state(state, critic=critic)


@pytest.mark.parametrize("make,names", [
  (grpo, ("loss", "kl", "grad_norm")),
  (functools.partial(ppo, kl_coef=0.0), ("loss", "value_loss", "grad_norm", "critic_grad_norm")),
])
def test_multi_turn_step_on_a_mesh_equals_one_device(make, names):
  prompts, key = prompt_batch(), jax.random.key(3)
  trainer, state = make()
  scored = trainer.rollout(state, prompts, key)
  policy = scored.policy_mask & scored.rollout.completion_mask
  assert (scored.rollout.completion_mask & ~policy).any()  # observations are in the rows
  assert scored.metrics["turns_mean"] > 1
  if isinstance(trainer, PPOTrainer):  # each turn's reward where the turn ends (β = 0)
    assert (scored.step_mask.sum(axis=1) >= 2).any()
    _, batch, _ = trainer.prepare(state, scored)
    np.testing.assert_array_equal(np.asarray(batch.rewards),
                                  np.where(np.asarray(batch.loss_mask), scored.step_rewards, 0))
  state, metrics = trainer.step(state, prompts, key)

  sharded_trainer, sharded = make(auto_mesh((2, 4, 1)), FSDP_RULES)
  sharded, sharded_metrics = sharded_trainer.step(sharded, prompts, key)
  assert metrics["reward_mean"] == sharded_metrics["reward_mean"]  # the same trajectories
  assert metrics["turns_mean"] == sharded_metrics["turns_mean"]
  for name in names:
    assert sharded_metrics[name] == pytest.approx(metrics[name], abs=TOL), name
  params_close(state.params, sharded.params)


def test_multi_turn_trainer_arguments_are_checked():
  graphdef, _ = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  config = GRPOConfig(sampling=SAMPLING, engine=ENGINE, multi_turn=TURNS)
  kw = dict(stop_tokens=[EOS], pad_id=EOS, compiler_options=FAST)
  with pytest.raises(ValueError, match="reward_fn` must be None"):
    GRPOTrainer(graphdef, SGD, config, lambda *a, **k: 0, TOKENIZER, environment=Fives(), **kw)
  with pytest.raises(ValueError, match="engine"):
    GRPOTrainer(graphdef, SGD, dataclasses.replace(config, engine=None), None, TOKENIZER,
                environment=Fives(), **kw)
  with pytest.raises(ValueError, match="Environment"):
    GRPOTrainer(graphdef, SGD, config, None, TOKENIZER, environment=object(), **kw)
  with pytest.raises(ValueError, match="multi_turn"):
    GRPOConfig(multi_turn={"max_turns": 2})
  with pytest.raises(ValueError, match="max_turns"):
    MultiTurnConfig(max_turns=0)


def test_process_rewards_at_the_last_token_give_the_outcome_path():
  """ppo_advantages with step rewards that hold each row's score at its last token equals the
  outcome path (`token_level_rewards`)."""
  rng = np.random.default_rng(0)
  lengths = np.array([5, 1, 8, 3])
  mask = np.arange(8)[None, :] < lengths[:, None]
  scores = rng.normal(size=4).astype(np.float32)
  last = np.zeros(mask.shape, np.float32)
  last[np.arange(4), lengths - 1] = scores
  values = jnp.asarray(rng.normal(size=mask.shape).astype(np.float32))
  kw = dict(kl_kind="k1", gamma=1.0, lam=0.95, whiten=False, adaptive=False, kl_target=6.0,
            kl_horizon=1e4)
  state = fixed_kl_controller(0.1).init()  # no reference: no KL shaping
  outcome = ppo_advantages(jnp.asarray(scores), jnp.asarray(mask), None, None, values, state, **kw)
  stepped = ppo_advantages(jnp.asarray(scores), jnp.asarray(mask), None, None, values, state,
                           step_rewards=jnp.asarray(last), **kw)
  for a, b in zip(outcome[:3], stepped[:3]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
