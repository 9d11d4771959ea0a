"""The on-policy trainers at scale: on a mesh, with gradient accumulation, and with the sampler's
parameters cast / re-sharded for inference once per rollout.

A trainer step on a (data 2 × fsdp 4) mesh with 2 microbatches must equal the single-device,
single-microbatch step (same rollout, same update) — with plain SGD, so parameter differences
are learning-rate × gradient differences and Adam does not amplify rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.heads import ValueModel
from rljax.models.transformer import Transformer
from rljax.parallel.rules import (
  FSDP_RULES,
  FSDP_TP_RULES,
  MESH_AXES,
  inference_rules,
  mesh_and_rules,
)
import dataclasses

from rljax.rollout.generate import _generate_jit, _Options
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.onpolicy import UpdateConfig
from rljax.train.ppo import PPOConfig, PPOTrainer, split_critic
from rljax.train.state import create_train_state, variable_shardings

from bench_utils import loop_collectives
from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}
N = 6
SGD = optax.sgd(0.1)
CRITIC_SGD = optax.sgd(0.05)
TOL = 2e-5


def auto_mesh(shape):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def prompt_batch():
  texts = ("what is 2 + 3 ?", "hello world ?", "2 + 3 ?", "what is hello ?")
  return tiny_prompt_batch(TOKENIZER, texts)

def five_reward(prompts, completions, **fields):
  return np.array([c.split().count("5") / N for c in completions], np.float32)


def params_close(a, b, tol=TOL):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  worst = max(jax.tree.leaves(diffs))
  assert worst < tol, worst


def specs_of(tree):
  return {tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)}


# ----------------------------------------------------------------------------------------------
# The inference layout.
# ----------------------------------------------------------------------------------------------


def test_inference_rules_drop_fsdp_from_parameters_only():
  rules = dict(inference_rules(FSDP_TP_RULES))
  assert rules["embed"] is None  # was "fsdp"
  assert rules["vocab"] == rules["heads"] == rules["mlp"] == "tensor"  # TP kept
  assert rules["batch"] == ("data", "fsdp")  # the batch is still split over data × fsdp
  assert dict(inference_rules("fsdp"))["embed"] is None
  assert inference_rules("data") == inference_rules(inference_rules("data"))


def _decode_loop_collectives(state) -> tuple[int, int]:
  """(collectives inside while-loop bodies, collectives anywhere) of the compiled `generate`."""
  graphdef, _ = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  options = _Options(max_new_tokens=4, temperature=1.0, top_k=None, top_p=None,
                     stop_tokens=(EOS,), pad_id=EOS, num_samples=1)
  tokens, mask = jnp.zeros((8, 6), jnp.int32), jnp.ones((8, 6), bool)
  return loop_collectives(_generate_jit.lower(graphdef, state, tokens, mask, jax.random.key(0),
                                              options).compile().as_text())


def test_inference_layout_removes_collectives_from_the_decode_loop():
  """Under FSDP every decode step all-reduces partial products of the sharded weights; in the
  inference layout (fsdp gathered once) the loops run without any collective."""
  mesh = auto_mesh((2, 4, 1))
  with mesh_and_rules(mesh, FSDP_RULES):
    state = nnx.state(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  fsdp_inside, _ = _decode_loop_collectives(state)
  resharded = jax.device_put(state, variable_shardings(state, mesh, inference_rules("fsdp")))
  inference_inside, inference_total = _decode_loop_collectives(resharded)
  assert fsdp_inside > 0
  assert inference_inside == inference_total == 0


# ----------------------------------------------------------------------------------------------
# GRPO.
# ----------------------------------------------------------------------------------------------


def grpo(config, mesh=None, rules=None):
  model = lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, state = create_train_state(model, SGD, rng=0, mesh=mesh, rules=rules)
  trainer = GRPOTrainer(graphdef, SGD, config, five_reward, TOKENIZER, stop_tokens=[EOS],
                        pad_id=EOS, mesh=mesh, rules=rules, compiler_options=FAST)
  return trainer, trainer.init_state(state)


SAMPLING = SamplingConfig(num_samples=4, max_new_tokens=N)


def with_microbatches(config, k):
  return dataclasses.replace(config, update=dataclasses.replace(config.update,
                                                                num_microbatches=k))


def test_grpo_on_a_mesh_with_microbatches_equals_one_device():
  config = GRPOConfig(sampling=SAMPLING, update=UpdateConfig(chunk_size=8), kl_coef=0.04)
  prompts, key = prompt_batch(), jax.random.key(3)
  trainer, state = grpo(config)
  state, metrics = trainer.step(state, prompts, key)

  mesh = auto_mesh((2, 4, 1))
  sharded_config = with_microbatches(config, 2)
  sharded_trainer, sharded = grpo(sharded_config, mesh, FSDP_RULES)
  sampler = sharded_trainer.sampler_params(sharded)
  assert all("fsdp" not in str(s) for s in specs_of(sampler))  # inference layout
  sharded, sharded_metrics = sharded_trainer.step(sharded, prompts, key)

  assert metrics["reward_mean"] == sharded_metrics["reward_mean"]  # the same rollout
  for name in ("loss", "kl", "grad_norm", "entropy"):
    assert sharded_metrics[name] == pytest.approx(metrics[name], abs=TOL), name
  params_close(state.params, sharded.params)
  embedding = jax.tree.leaves(sharded.params)[0]
  assert any("fsdp" in str(s) for s in specs_of(sharded.params)), specs_of(sharded.params)
  assert len(embedding.sharding.device_set) == 8  # still sharded after the step


def test_rollout_dtype_casts_the_sampler_only():
  config = GRPOConfig(sampling=dataclasses.replace(SAMPLING, rollout_dtype="bfloat16"),
                      update=UpdateConfig(chunk_size=8), kl_coef=0.0, use_rollout_logprobs=True)
  trainer, state = grpo(config)
  sampler = trainer.sampler_params(state)
  floating = [x for x in jax.tree.leaves(sampler) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floating and all(x.dtype == jnp.bfloat16 for x in floating)
  state, metrics = trainer.step(state, prompt_batch(), jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert metrics["first_ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # old_logp recomputed
  # bf16 sampling vs f32 recomputation: the TIS weights differ from 1, but only slightly.
  assert metrics["tis_weight_mean"] != 1.0
  assert abs(metrics["tis_weight_mean"] - 1.0) < 0.1
  with pytest.raises(ValueError, match="rollout_dtype"):
    SamplingConfig(rollout_dtype="int32")
  with pytest.raises(ValueError, match="rollout_dtype"):
    SamplingConfig(rollout_dtype="no-such-dtype")
  with pytest.raises(ValueError, match="`mesh` and `rules`"):
    GRPOTrainer(trainer.graphdef, SGD, config, five_reward, stop_tokens=EOS, pad_id=EOS,
                mesh=auto_mesh((8, 1, 1)))


# ----------------------------------------------------------------------------------------------
# PPO.
# ----------------------------------------------------------------------------------------------


def ppo(config, mesh=None, rules=None):
  if mesh is None:
    policy = Transformer(CONFIG, rngs=nnx.Rngs(0))
    critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
  else:
    with mesh_and_rules(mesh, rules):
      policy = Transformer(CONFIG, rngs=nnx.Rngs(0))
      critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
  critic_graphdef, _, _ = split_critic(critic)
  graphdef = nnx.split(policy, nnx.Param, ...)[0]
  trainer = PPOTrainer(graphdef, critic_graphdef, SGD, CRITIC_SGD, config, five_reward,
                       TOKENIZER, stop_tokens=[EOS], pad_id=EOS, mesh=mesh, rules=rules,
                       compiler_options=FAST)
  graphdef, state = create_train_state(policy, SGD, rng=0, mesh=mesh, rules=rules)
  return trainer, trainer.init_state(state, critic=critic)


def ptx_batch(rows=16, length=8):
  rng = np.random.default_rng(0)
  lengths = 2 + np.arange(rows) % (length - 2)  # uneven: microbatch means would be biased
  return {"input_ids": rng.integers(3, len(TOKENIZER), (rows, length)).astype(np.int32),
          "attention_mask": np.ones((rows, length), bool),
          "loss_mask": np.arange(length)[None, :] < lengths[:, None]}


def test_ppo_on_a_mesh_with_microbatches_equals_one_device():
  """Policy + critic + PPO-ptx: 2 microbatches on a data × fsdp mesh == 1 batch on 1 device."""
  config = PPOConfig(sampling=SAMPLING, update=UpdateConfig(chunk_size=8, num_epochs=1,
                                                           agg="token-mean"),
                     kl_coef=0.05, ptx_coef=0.5, entropy_coef=0.01)
  prompts, key, ptx = prompt_batch(), jax.random.key(5), ptx_batch()
  trainer, state = ppo(config)
  state, metrics = trainer.step(state, prompts, key, ptx_batch=ptx)

  mesh = auto_mesh((2, 4, 1))
  sharded_config = with_microbatches(config, 2)
  sharded_trainer, sharded = ppo(sharded_config, mesh, FSDP_RULES)
  sharded, sharded_metrics = sharded_trainer.step(sharded, prompts, key, ptx_batch=ptx)

  assert metrics["reward_mean"] == sharded_metrics["reward_mean"]
  # The loss includes ptx_coef · NLL over uneven ptx rows: exact only with the ptx normalizer.
  # (The `ptx_nll` metric is a mean of microbatch means, like every averaged metric.)
  for name in ("loss", "value_loss", "grad_norm", "critic_grad_norm"):
    assert sharded_metrics[name] == pytest.approx(metrics[name], abs=TOL), name
  params_close(state.params, sharded.params)
  params_close(state.extras["critic"].params, sharded.extras["critic"].params)
  critic_specs = specs_of(sharded.extras["critic"].params)
  assert any("fsdp" in str(s) for s in critic_specs), critic_specs
