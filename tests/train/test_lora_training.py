"""Training with LoRA: only the adapters get gradients and optimizer state, the base never moves,
dropout draws per step, a mesh equals one device, and GRPO's reference is the base (no copy of
it), its sampler merged, dropout refused, and a short run learns."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rljax.models.config import ModelConfig
from rljax.models.heads import ValueModel
from rljax.models.lora import (
  LoRAConfig, add_lora, lora_layers, lora_param_count, lora_trainable, merged)
from rljax.models.transformer import Transformer
from rljax.parallel.mesh import use_mesh
from rljax.parallel.rules import MESH_AXES
from rljax.rollout.sampling import SamplingConfig
from rljax.train.compiles import count_compiles
from rljax.train.forward import policy_logprobs
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.objectives import sft_loss, sft_token_count
from rljax.train.onpolicy import UpdateConfig
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.ppo import PPOConfig, PPOTrainer, split_critic
from rljax.train.state import create_train_state, variable_shardings
from rljax.train.step import default_batch_sharding, make_grad_fn, make_train_step

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
LORA = LoRAConfig(rank=4, alpha=8.0)
FAST = {"xla_backend_optimization_level": 0}
OPTIMIZER = make_optimizer(OptimizerConfig(1e-2))


def policy(lora=LORA, seed=0, config=CONFIG):
  return add_lora(Transformer(config, rngs=nnx.Rngs(seed)), lora, rngs=nnx.Rngs(seed + 1))


def sft_batch(rows=8, t=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(0, CONFIG.vocab_size, (rows, t)).astype(np.int32),
          "attention_mask": np.ones((rows, t), np.int32),
          "loss_mask": (np.arange(t)[None] >= 2).repeat(rows, 0).astype(np.int32)}


def _names(state):
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def test_only_adapters_train_and_have_optimizer_state():
  graphdef, state = create_train_state(policy(), OPTIMIZER, rng=0, trainable=lora_trainable)
  assert all(n.startswith("layers/") and "_lora_" in n for n in _names(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.params)) == lora_param_count(CONFIG, LORA)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * lora_param_count(CONFIG, LORA)  # Adam's mu, nu
  assert "layers/q_proj" in _names(state.frozen) and "embed" in _names(state.frozen)
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  params_before = jax.tree.map(np.asarray, state.params)
  step = make_train_step(functools.partial(sft_loss, chunk_size=8), graphdef, OPTIMIZER,
                         count_fn=sft_token_count, compiler_options=FAST)
  batch = sft_batch()
  state, m = step(state, batch)
  state, m2 = step(state, batch)
  assert m2["loss"] < m["loss"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen),
               frozen_before)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                       params_before)
  assert all(v > 0 for v in jax.tree.leaves(moved))  # A and B of every target move


def test_dropout_masks_differ_per_step_and_are_off_outside_the_step():
  """With lora dropout 0.5 the train step's loss at the same parameters depends on the step's
  key (fold_in(rng, step)); `make_grad_fn` without a key is deterministic."""
  model = policy(LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
  for layers in [model.layers]:
    for name in layers.lora.target_modules:
      b = getattr(layers, f"{name}_lora_b")
      b[...] = 0.3 * jax.random.normal(jax.random.key(7), b.shape)
  graphdef, params, frozen = nnx.split(model, lora_trainable, ...)
  grad_fn = make_grad_fn(functools.partial(sft_loss, chunk_size=8), graphdef,
                         count_fn=sft_token_count, num_microbatches=2)
  loss = jax.jit(lambda *args: grad_fn(*args)[0], compiler_options=FAST)  # no backward: DCE'd
  batch = sft_batch()
  plain = float(loss(params, frozen, batch))
  with_key = [float(loss(params, frozen, batch, jax.random.key(k))) for k in (0, 0, 1)]
  assert with_key[0] == with_key[1] and with_key[0] != with_key[2]
  assert abs(with_key[0] - plain) > 1e-4
  np.testing.assert_allclose(plain, float(sft_loss(merged(model), batch, chunk_size=8)[0]),
                             rtol=1e-5)


def test_adapter_gradients_are_the_chain_rule_of_the_merged_weight_s():
  """W' = W + s A B, so dL/dB = s Aᵀ dL/dW' and dL/dA = s dL/dW' Bᵀ (per layer, over W's head
  dims): the LoRA gradients against the full model's, in numpy."""
  model = policy()
  for i, name in enumerate(model.layers.lora.target_modules):
    b = getattr(model.layers, f"{name}_lora_b")
    b[...] = 0.1 * jax.random.normal(jax.random.key(i), b.shape)
  loss = functools.partial(sft_loss, chunk_size=8)
  graphdef, params, frozen = nnx.split(model, lora_trainable, ...)
  _, got, _ = jax.jit(make_grad_fn(loss, graphdef, count_fn=sft_token_count),
                      compiler_options=FAST)(params, frozen, sft_batch())
  full_graphdef, full = nnx.split(merged(model), nnx.Param)
  _, full_grads, _ = jax.jit(make_grad_fn(loss, full_graphdef, count_fn=sft_token_count),
                             compiler_options=FAST)(full, nnx.State({}), sft_batch())
  s = model.layers.lora.scale
  for name in model.layers.lora.target_modules:
    a = np.asarray(getattr(model.layers, f"{name}_lora_a")[...], np.float64)
    b = np.asarray(getattr(model.layers, f"{name}_lora_b")[...], np.float64)
    n, r = a.shape[0], a.shape[-1]
    a2, b2 = a.reshape(n, -1, r), b.reshape(n, r, -1)
    g = np.asarray(full_grads["layers"][name][...], np.float64).reshape(n, a2.shape[1], -1)
    want_b, want_a = s * np.einsum("lir,lio->lro", a2, g), s * np.einsum("lio,lro->lir", g, b2)
    for want, got_leaf in ((want_a, got["layers"][f"{name}_lora_a"]),
                           (want_b, got["layers"][f"{name}_lora_b"])):
      np.testing.assert_allclose(np.asarray(got_leaf[...]).reshape(want.shape), want,
                                 rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("shape, rules", [((2, 2, 2), "fsdp_tp")])
def test_lora_gradients_on_a_mesh_equal_one_device(shape, rules):
  model = policy(config=CONFIG.replace(vocab_size=32))  # V divisible by the tensor axis
  for name in model.layers.lora.target_modules:  # nonzero B: every adapter gets a gradient
    b = getattr(model.layers, f"{name}_lora_b")
    b[...] = 0.1 * jax.random.normal(jax.random.key(3), b.shape)
  graphdef, params, frozen = nnx.split(model, lora_trainable, ...)
  batch = sft_batch(rows=16)
  grad = make_grad_fn(functools.partial(sft_loss, chunk_size=8), graphdef,
                      count_fn=sft_token_count)
  with jax.default_matmul_precision("highest"):
    want_loss, want, _ = jax.jit(grad, compiler_options=FAST)(params, frozen, batch)
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  p_sh, f_sh = variable_shardings(params, mesh, rules), variable_shardings(frozen, mesh, rules)
  b_sh = default_batch_sharding(mesh)
  sharded = jax.device_put(params, p_sh)
  a = sharded["layers"]["q_proj_lora_a"][...]
  assert a.addressable_shards[0].data.size < a.size  # the adapters really are split (fsdp)
  fn = jax.jit(grad, in_shardings=(p_sh, f_sh, b_sh), out_shardings=(None, p_sh, None),
               compiler_options=FAST)
  with jax.default_matmul_precision("highest"), use_mesh(mesh, rules):
    loss, got, _ = fn(sharded, jax.device_put(frozen, f_sh), batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    assert np.abs(w).max() > 1e-7
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_qlora_training_step_on_a_mesh_equals_one_device():
  """An NF4 base with adapters on an 8-device fsdp_tp mesh: the codes and scales are split by
  the weight's leading axes, and one SFT step (loss, adapters after AdamW) equals one device's."""
  from rljax.models.quant import quantize_base
  from rljax.train.state import state_shardings

  config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=2, num_kv_heads=2, head_dim=64)  # blocks of 64 inside a row
  model = add_lora(quantize_base(Transformer(config, rngs=nnx.Rngs(0)), "nf4"), LORA,
                   rngs=nnx.Rngs(1))
  for name in model.layers.lora.target_modules:  # nonzero B: every adapter gets a gradient
    b = getattr(model.layers, f"{name}_lora_b")
    b[...] = 0.1 * jax.random.normal(jax.random.key(3), b.shape)
  loss = functools.partial(sft_loss, chunk_size=8)
  batch = {k: v % 32 if k == "input_ids" else v for k, v in sft_batch(rows=16).items()}
  graphdef, state = create_train_state(model, OPTIMIZER, rng=0, trainable=lora_trainable)
  step = make_train_step(loss, graphdef, OPTIMIZER, count_fn=sft_token_count, donate=False,
                         compiler_options=FAST)
  with jax.default_matmul_precision("highest"):
    want, want_metrics = step(state, batch)
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, sharded = create_train_state(model, OPTIMIZER, rng=0, mesh=mesh, rules="fsdp_tp",
                                         trainable=lora_trainable)
  codes = sharded.frozen["layers"]["q_proj"].get_value().codes  # [L, D, H, 1, 32]
  assert codes.sharding.spec == P(None, "fsdp", "tensor", None, None)
  assert codes.addressable_shards[0].data.shape == (2, 32, 1, 1, 32)
  scales = sharded.frozen["layers"]["down_proj"].get_value().scales  # [L, F, 1]: F over tensor
  assert scales.addressable_shards[0].data.shape == (2, 64, 1)
  step = make_train_step(loss, graphdef, OPTIMIZER, count_fn=sft_token_count, donate=False,
                         shardings=state_shardings(graphdef, sharded, mesh, "fsdp_tp"),
                         compiler_options=FAST)
  with jax.default_matmul_precision("highest"), use_mesh(mesh, "fsdp_tp"):
    got, got_metrics = step(sharded, batch)
  np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-4)
  for g, w, w0 in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params),
                      jax.tree.leaves(state.params)):
    w, w0 = np.asarray(w), np.asarray(w0)
    step_size = np.abs(w - w0).max()
    assert step_size > 1e-3  # the step moved it (lr 1e-2)
    # Adam's first step is lr · g / (|g| + eps): a gradient entry near 0 turns rounding-level
    # differences into a visible fraction of a step, hence the tolerance relative to the step.
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-3 * step_size)
  for g, w in zip(jax.tree.leaves(got.frozen), jax.tree.leaves(want.frozen)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # the base never moves


# -- on-policy ---------------------------------------------------------------------------------

N = 6
SAMPLING = SamplingConfig(num_samples=4, max_new_tokens=N)
GRPO = GRPOConfig(sampling=SAMPLING, update=UpdateConfig(chunk_size=8), kl_coef=0.04)


def five_reward(prompts, completions, **fields):
  return np.array([c.split().count("5") / N for c in completions], np.float32)


def prompts():
  return tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?"), length=6,
                           fields={"answer": ["5", "world"]})


def grpo(model, config=GRPO, optimizer=OPTIMIZER):
  graphdef, state = create_train_state(model, optimizer, rng=0, trainable=lora_trainable)
  trainer = GRPOTrainer(graphdef, optimizer, config, five_reward, TOKENIZER, stop_tokens=[EOS],
                        pad_id=EOS, compiler_options=FAST)
  return trainer, trainer.init_state(state)


def test_on_policy_trainers_refuse_lora_dropout():
  graphdef, _ = nnx.split(policy(LoRAConfig(rank=2, dropout=0.1)))
  with pytest.raises(ValueError, match="dropout"):
    GRPOTrainer(graphdef, OPTIMIZER, GRPO, five_reward, TOKENIZER, stop_tokens=[EOS], pad_id=EOS)
  critic = add_lora(ValueModel(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(rank=2, dropout=0.1),
                    rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="critic needs LoRA dropout 0"):
    PPOTrainer(nnx.split(policy())[0], split_critic(critic)[0], OPTIMIZER, OPTIMIZER,
               PPOConfig(sampling=SAMPLING), five_reward, TOKENIZER, stop_tokens=[EOS],
               pad_id=EOS)


@pytest.mark.slow
def test_grpo_with_lora_reference_is_the_base_sampler_merged_and_it_learns():
  """The reference holds the initial adapters only (the base stays in `state.frozen`, once) and
  its log-probs are the base model's exactly; the sampler's copy is merged with the adapters
  off; 8 steps of GRPO on the adapters alone raise the reward. (The base's lm_head is scaled
  up, like a trained model's: at init scale, std 0.02, no hidden state reachable by the
  adapters gives the token "5" a high probability, while full fine-tuning moves the head.)"""
  base = Transformer(CONFIG, rngs=nnx.Rngs(1))
  base.lm_head[...] = 10 * base.lm_head[...]
  graphdef0, base_state = nnx.split(base)
  trainer, state = grpo(add_lora(nnx.merge(graphdef0, base_state), LoRAConfig(rank=8, alpha=16),
                                 rngs=nnx.Rngs(2)), optimizer=make_optimizer(OptimizerConfig(3e-2)))
  ref = state.extras["reference"]
  assert set(ref) == {"params"} and _names(ref["params"]) == _names(state.params)
  batch_prompts = prompts()
  rewards = []
  for i in range(8):
    with count_compiles() as compiles:
      state, m = trainer.step(state, batch_prompts, jax.random.key(100 + i))
    rewards.append(m["reward_mean"])
    if i == 0:
      assert abs(m["first_kl"]) < 1e-6
    if i >= 2:
      assert compiles.count == 0  # merging for the sampler compiles nothing new
  early, late = np.mean(rewards[:2]), np.mean(rewards[-3:])
  print(f"GRPO-LoRA reward first 2 steps {early:.3f} -> last 3 steps {late:.3f}")
  assert late > early + 0.5, rewards
  # The reference log-probs are the base model's (adapters B = 0 at the start), bit for bit.
  scored, _ = trainer.collect(state, batch_prompts, jax.random.key(0))
  _, batch, _ = trainer.prepare(state, scored)
  want = policy_logprobs(graphdef0, base_state, nnx.State({}), batch, chunk_size=8)
  np.testing.assert_array_equal(np.asarray(trainer.reference_logprobs(state, batch)),
                                np.asarray(want))
  # The sampler's copy: merged weights, adapters off; its log-probs match the trained policy's.
  sampler = nnx.merge(trainer.sampler_graphdef, trainer.sampler_params(state))
  assert not lora_layers(sampler)[0].enabled
  mask = np.asarray(batch.loss_mask, bool)
  policy_logp = np.asarray(trainer.logprobs(state.params, state.frozen, batch))
  np.testing.assert_allclose(policy_logp[mask], scored.rollout.logprobs[mask], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(state.frozen["layers"]["q_proj"][...]),
                                np.asarray(base_state["layers"]["q_proj"][...]))  # base unmoved


def test_checkpoints_hold_the_adapters_and_the_base_s_fingerprints_only(tmp_path):
  """`frozen_base`: the base weights are not written; restore takes them from the target and
  refuses a different base."""
  from rljax.train.checkpoint import Checkpointer

  _, state = create_train_state(policy(), OPTIMIZER, rng=0, trainable=lora_trainable)
  state = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params))
  with Checkpointer(tmp_path / "ckpt", frozen_base="base/dir", async_save=False) as ckpt:
    ckpt.save(1, state, force=True)
  _, fresh = create_train_state(policy(), OPTIMIZER, rng=0, trainable=lora_trainable)
  with Checkpointer(tmp_path / "ckpt", frozen_base="base/dir") as ckpt:
    restored, _, meta = ckpt.restore(fresh)
    assert meta["frozen_base"]["path"] == "base/dir"
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.params),
                 jax.tree.map(np.asarray, state.params))
    assert restored.frozen is fresh.frozen
    _, other = create_train_state(policy(seed=5), OPTIMIZER, rng=0, trainable=lora_trainable)
    with pytest.raises(ValueError, match="frozen base of the target differs"):
      ckpt.restore(other)
  with open(tmp_path / "ckpt" / "1" / "state" / "_METADATA") as f:
    saved = list(json.load(f)["tree_metadata"])  # orbax's list of the leaves it wrote
  assert any("q_proj_lora_a" in k for k in saved) and "('frozen',)" in saved
  assert not any(k.startswith("('frozen', ") for k in saved)  # no leaf under frozen


def test_grpo_with_qlora_samples_unmerged_from_the_quantized_base():
  """QLoRA (NF4 base): the sampler gets the quantised weights and the adapters as they are (no
  full-precision merged copy), and its log-probs are the trainer's."""
  from rljax.models.quant import QuantizedParam, quantize_base

  model = add_lora(quantize_base(Transformer(CONFIG, rngs=nnx.Rngs(1)), "nf4"), LORA,
                   rngs=nnx.Rngs(2))
  trainer, state = grpo(model)
  state, m = trainer.step(state, prompts(), jax.random.key(0))
  assert abs(m["first_ratio_mean"] - 1.0) < 1e-6 and np.isfinite(m["loss"])
  assert trainer.sampler_graphdef is trainer.graphdef
  sampler = nnx.merge(trainer.sampler_graphdef, trainer.sampler_params(state))
  assert isinstance(sampler.layers.q_proj, QuantizedParam) and sampler.layers.enabled
