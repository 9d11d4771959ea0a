"""PPO trainer: first-iteration ratio 1, KL 0 at step 0, critic/KL-controller state, penalty and
ptx modes, no recompilation, and a short run whose reward rises."""

from __future__ import annotations


import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.heads import ValueModel
from rljax.models.transformer import Transformer
from rljax.rollout.sampling import SamplingConfig
from rljax.train.compiles import count_compiles
from rljax.train.onpolicy import UpdateConfig
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.ppo import PPOConfig, PPOTrainer, split_critic
from rljax.train.state import create_train_state

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer


TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}
N = 6
OPTIMIZER = make_optimizer(OptimizerConfig(1e-2))
CRITIC_OPTIMIZER = make_optimizer(OptimizerConfig(1e-2))
REQUIRED = {"reward_mean", "reward_std", "response_length", "truncation_rate", "entropy", "kl",
            "clipfrac", "grad_norm", "learning_rate", "tokens_per_second", "loss", "value_loss",
            "vf_clipfrac", "critic_grad_norm", "kl_coef", "approx_kl", "ratio_mean"}


def prompt_batch(texts=("what is 2 + 3 ?", "hello world ?"), p=6):
  return tiny_prompt_batch(TOKENIZER, texts, length=p)

def five_reward(prompts, completions, **fields):
  """Fraction of the N completion slots holding the word "5"."""
  return np.array([c.split().count("5") / N for c in completions], np.float32)


def make(config, seed=0):
  policy = Transformer(CONFIG, rngs=nnx.Rngs(seed))
  critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(seed + 1))
  critic_graphdef, _, _ = split_critic(critic)
  graphdef = nnx.split(policy, nnx.Param, ...)[0]
  trainer = PPOTrainer(graphdef, critic_graphdef, OPTIMIZER, CRITIC_OPTIMIZER, config,
                       five_reward, TOKENIZER, stop_tokens=[EOS], pad_id=EOS,
                       compiler_options=FAST)
  graphdef, state = create_train_state(policy, OPTIMIZER, rng=seed)
  return trainer, trainer.init_state(state, critic=critic)


def base_config(update=None, **kw):
  update = UpdateConfig(**{"chunk_size": 8, "num_epochs": 2, "num_minibatches": 2,
                           "agg": "token-mean", **(update or {})})
  return PPOConfig(**{"sampling": SamplingConfig(num_samples=4, max_new_tokens=N),
                      "update": update, "kl_coef": 0.01, **kw})


SHARED = base_config()


def test_step_ratio_one_kl_zero_state_and_no_recompilation():
  trainer, state = make(SHARED)
  critic_before = jax.tree.map(np.asarray, state.extras["critic"].params)
  prompts = prompt_batch()
  state, m = trainer.step(state, prompts, jax.random.key(0))
  assert REQUIRED <= set(m), REQUIRED - set(m)
  assert all(np.isfinite(v) for v in m.values())
  assert abs(m["first_ratio_mean"] - 1.0) < 1e-6 and m["first_clipfrac"] == 0.0
  assert m["kl"] == 0.0 and m["sequence_kl"] == 0.0  # reference == initial policy
  assert int(state.step) == 4  # 2 epochs x 2 minibatches
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                       state.extras["critic"].params, critic_before)
  assert max(jax.tree.leaves(moved)) > 0  # the critic was trained
  assert float(state.extras["kl_ctl"].coef) == pytest.approx(0.01)  # fixed controller
  # Experience shapes; advantages whitened over the valid tokens.
  scored = trainer.rollout(state, prompts, jax.random.key(1))
  _, batch, _ = trainer.prepare(state, scored)
  cm = np.asarray(batch.loss_mask)
  assert batch.advantages.shape == batch.values.shape == batch.rewards.shape == (8, N)
  adv = np.asarray(batch.advantages)[cm]
  assert abs(adv.mean()) < 1e-5 and abs(adv.std(ddof=1) - 1) < 1e-3
  # No recompilation.
  state, m = trainer.step(state, prompts, jax.random.key(2))
  with count_compiles() as compiles:
    state, m = trainer.step(state, prompts, jax.random.key(3))
  assert compiles.count == 0 and m["kl"] != 0.0


def test_penalty_mode_adaptive_kl_and_ptx():
  config = base_config({"num_epochs": 1, "num_minibatches": 1, "peak_flops": 1e12},
                       mode="penalty",
                       adaptive_kl=True, kl_target=0.001, kl_horizon=100.0, ptx_coef=0.5,
                       entropy_coef=0.01)
  trainer, state = make(config)
  rng = np.random.default_rng(0)
  ptx = {"input_ids": rng.integers(0, CONFIG.vocab_size, (2, 8)).astype(np.int32),
         "attention_mask": np.ones((2, 8), np.int32), "loss_mask": np.ones((2, 8), np.int32)}
  state, m = trainer.step(state, prompt_batch(), jax.random.key(0), ptx_batch=ptx)
  assert "ptx_nll" in m and m["ptx_nll"] > 0 and np.isfinite(m["loss"])
  # mfu counts the policy's and the critic's update (same backbone here: 2 layers each).
  from rljax.train.flops import update_flops, value_update_flops
  flops = update_flops(CONFIG, 8, 6, N) + value_update_flops(CONFIG, 8, 6, N)
  assert m["mfu"] == pytest.approx(flops / m["update_seconds"] / 1e12, rel=1e-6)
  assert abs(m["first_ratio_mean"] - 1.0) < 1e-6
  # One update away from the old policy: KL(old||new) > 0; the observed reference KL was 0 at
  # step 0, below target, so the adaptive β shrank: 0.01 * (1 - 0.2 * 8 / 100).
  assert m["penalty_kl_coef"] in (0.5, 1.0, 2.0)
  assert float(state.extras["kl_ctl"].coef) == pytest.approx(0.01 * (1 - 0.2 * 8 / 100))


def test_config_validation():
  with pytest.raises(ValueError, match="mode"):
    PPOConfig(mode="trpo")
  with pytest.raises(ValueError, match="kl_kind"):
    PPOConfig(kl_kind="k4")
  with pytest.raises(ValueError, match="temperature"):
    PPOConfig(sampling=SamplingConfig(temperature=0.0))
  with pytest.raises(ValueError, match="lam"):
    PPOConfig(lam=1.5)
  with pytest.raises(ValueError, match="kl_target"):
    PPOConfig(kl_target=0.0)
  with pytest.raises(ValueError, match="clip_ratio_c"):
    PPOConfig(clip_ratio_c=1.0)
  with pytest.raises(ValueError, match="num_epochs"):
    UpdateConfig(num_epochs=0)
  # A section's unset fields take the algorithm's defaults, whatever else it sets.
  update = PPOConfig(update=UpdateConfig(num_minibatches=2)).update
  assert (update.num_epochs, update.agg, update.num_minibatches) == (4, "token-mean", 2)


def test_ppo_learns_to_say_five():
  """20 steps of PPO (2 prompts x 4 samples): the mean reward rises clearly."""
  trainer, state = make(SHARED, seed=1)
  prompts = prompt_batch()
  rewards = []
  for i in range(20):
    state, m = trainer.step(state, prompts, jax.random.key(100 + i))
    rewards.append(m["reward_mean"])
  early, late = np.mean(rewards[:4]), np.mean(rewards[-4:])
  print(f"PPO reward first 4 steps {early:.3f} -> last 4 steps {late:.3f}")
  assert late > early + 0.3, rewards
  # the runner's evaluation path: greedy reward of the trained policy, and pass@k
  greedy = trainer.evaluate(state, prompts, jax.random.key(0))
  assert greedy["reward_mean"] > early and 0 <= greedy["accuracy"] <= 1
  sampled = trainer.evaluate(state, prompts, jax.random.key(1), k=2)
  assert sampled["pass@2"] >= sampled["accuracy"]
