"""Packed on-policy experience: `pack_experience`'s layout against a plain-Python reference, the
GRPO objective on packed rows == on the unpacked batch (loss and gradients, every surrogate and
aggregation, microbatched), and whole GRPO and PPO steps with `update.packing` == without."""

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
from rljax.rollout.sampling import SamplingConfig
from rljax.train.experience import Experience, check_experience, pack_experience
from rljax.train.grpo import GRPOConfig, GRPOTrainer, grpo_objective
from rljax.train.onpolicy import UpdateConfig
from rljax.train.ppo import PPOConfig, PPOTrainer, split_critic
from rljax.train.state import create_train_state
from rljax.train.step import make_grad_fn
from rljax.train.normalizers import agg_count

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

B, P, N = 8, 6, 10
MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)


def _batch(seed=0) -> Experience:
  """Left-padded prompts of 2..4 tokens, right-padded completions of 1..5 and one of N (the
  long tail of RL completion lengths)."""
  rng = np.random.default_rng(seed)
  prompt = np.arange(P)[None] >= P - rng.integers(2, 5, B)[:, None]
  completion = np.arange(N)[None] < np.r_[N, rng.integers(1, 6, B - 1)][:, None]
  noise = lambda scale, shift=0.0: jnp.asarray(  # noqa: E731
    (rng.normal(size=(B, N)) * scale + shift) * completion, jnp.float32)
  return Experience(
    tokens=jnp.asarray(rng.integers(1, 64, (B, P + N)), jnp.int32),
    attention_mask=jnp.asarray(np.concatenate([prompt, completion], axis=1)),
    loss_mask=jnp.asarray(completion), advantages=noise(1.0), old_logp=noise(0.3, -2.0),
    ref_logp=noise(0.3, -2.0), rollout_logp=noise(0.3, -2.0),
  )


def test_pack_experience_lays_every_sequence_once_with_its_values():
  batch = _batch()
  packed = pack_experience(batch)
  assert packed.num_rows < B and packed.prompt_length == 1 and packed.num_sequences == B
  check_experience(packed)
  tokens, seg, pos, attn = (np.asarray(x) for x in (packed.tokens, packed.segment_ids,
                                                     packed.positions, packed.attention_mask))
  mask = np.asarray(batch.attention_mask)
  for i in range(B):  # the reference: sequence i's real tokens and completion values, in order
    where = seg == i
    assert where.sum() == mask[i].sum()
    np.testing.assert_array_equal(tokens[where], np.asarray(batch.tokens)[i][mask[i]])
    np.testing.assert_array_equal(pos[where], np.arange(mask[i].sum()))
    loss_cols = where[:, 1:] & np.asarray(packed.loss_mask)
    for name in ("loss_mask", "advantages", "old_logp", "ref_logp", "rollout_logp"):
      unpacked = np.asarray(getattr(batch, name))[i][np.asarray(batch.loss_mask)[i]]
      np.testing.assert_array_equal(np.asarray(getattr(packed, name))[loss_cols], unpacked)
  assert np.all(seg[~attn] == B) and not np.any(np.asarray(packed.loss_mask)[~attn[:, 1:]])


@pytest.mark.parametrize("loss, agg", [("gspo", "seq-mean-token-mean"), ("cispo", "token-mean")])
def test_grpo_objective_on_packed_rows_equals_the_unpacked_batch(loss, agg):
  """Loss and gradients ≤ 1e-5 (old_logp ≠ logp: ratios and GSPO's sequence ratios differ from
  1; the KL term on), and the packed batch microbatched in two == whole."""
  batch = _batch(1)
  packed = pack_experience(batch, row_multiple=2)
  config = GRPOConfig(loss=loss, sampling=SamplingConfig(num_samples=2, max_new_tokens=N),
                      update=UpdateConfig(agg=agg), kl_coef=0.04)
  graphdef, state = create_train_state(Transformer(MODEL, rngs=nnx.Rngs(0)), optax.sgd(0.1), rng=0)

  def grads(b, microbatches):
    fn = make_grad_fn(lambda m, x, normalizer=None: grpo_objective(
      m, x, normalizer=normalizer, config=config), graphdef,
      count_fn=lambda x: agg_count(x.loss_mask, agg, **x.segments),
      num_microbatches=microbatches)
    args = (state.params, state.frozen, b)
    fast = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return fast(*args)[:2]

  want = grads(batch, 1)
  for got in (grads(packed, 1), grads(packed, 2)):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_packing_errors_name_the_problem():
  batch = _batch()
  with pytest.raises(ValueError, match="one contiguous run"):
    pack_experience(batch.replace(attention_mask=batch.attention_mask.at[0, P + 0].set(False)
                                  .at[0, P - 1].set(True).at[0, P - 2].set(False)))
  packed = pack_experience(batch)
  with pytest.raises(ValueError, match="already packed"):
    pack_experience(packed)
  with pytest.raises(ValueError, match="num_sequences"):
    check_experience(packed.replace(num_sequences=None))
  with pytest.raises(ValueError, match="no per-row `scores`"):
    check_experience(packed.replace(scores=jnp.zeros(packed.num_rows)))
  with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
    GRPOConfig.dr_grpo(update=UpdateConfig(packing=True))


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_step_with_packing_equals_the_step_without(algorithm):
  """Same key, same rollout (varied lengths: stop tokens): the packed step's updates give the
  same parameters (the critic's too; SGD, so parameter differences are gradient differences, not
  Adam's normalised noise) and loss. PPO: two epochs (ratios off 1 in the second),
  seq-mean-token-mean, KL-shaped rewards; GAE runs before packing."""
  tokenizer = tiny_tokenizer()
  eos = tokenizer.eos_token_id
  config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2)
  prompts = tiny_prompt_batch(tokenizer, ("what is 2 + 3 ?", "hi ?"), length=6,
                              fields={"answer": ["5", "hi"]})
  reward = lambda prompts, completions, **kw: np.array(  # noqa: E731
    [len(c) % 3 for c in completions], np.float32)
  sampling = SamplingConfig(num_samples=4, max_new_tokens=8)
  results = []
  for packing in (False, True):
    policy = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state = create_train_state(policy, optax.sgd(0.1), rng=0)
    common = dict(stop_tokens=[eos], pad_id=eos,
                  compiler_options={"xla_backend_optimization_level": 0})
    if algorithm == "grpo":
      grpo = GRPOConfig(sampling=sampling, kl_coef=0.04,
                        update=UpdateConfig(chunk_size=8, packing=packing))
      trainer = GRPOTrainer(graphdef, optax.sgd(0.1), grpo, reward, tokenizer, **common)
      state = trainer.init_state(state)
    else:
      critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
      ppo = PPOConfig(sampling=sampling, kl_coef=0.01, update=UpdateConfig(
        chunk_size=8, num_epochs=2, agg="seq-mean-token-mean", packing=packing))
      trainer = PPOTrainer(nnx.split(policy, nnx.Param, ...)[0], split_critic(critic)[0],
                           optax.sgd(0.1), optax.sgd(0.1), ppo, reward, tokenizer, **common)
      state = trainer.init_state(state, critic=critic)
    state, metrics = trainer.step(state, prompts, jax.random.key(3))
    critic = state.extras.get("critic")
    results.append((state.params, None if critic is None else critic.params, metrics))
  (p0, c0, m0), (p1, c1, m1) = results
  assert m0["response_length"] == m1["response_length"] and m0["response_length"] < 8
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves((p1, c1)), jax.tree.leaves((p0, c0))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
