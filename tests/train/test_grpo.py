"""GRPO trainer: first-iteration ratio 1, metrics, KL 0 at step 0, dynamic sampling, variants,
no recompilation, and a short run whose reward rises."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.advantages import grpo_advantages
from rljax.ops.masking import aggregate
from rljax.ops.overlong import soft_overlong_penalty
from rljax.rollout.generate import Rollout
from rljax.rollout.sampling import SamplingConfig
from rljax.train.compiles import count_compiles
from rljax.train.dynamic_sampling import group_has_variance, select_rows
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.normalizers import agg_count, rescale_to_normalizer
from rljax.train.onpolicy import UpdateConfig
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.scoring import Scored, drop_rows, rollout_metrics
from rljax.train.state import create_train_state

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer


TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
FIVE = TOKENIZER.convert_tokens_to_ids("5")
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}
REQUIRED = {"reward_mean", "reward_std", "response_length", "truncation_rate", "entropy", "kl",
            "clipfrac", "zero_variance_groups", "grad_norm", "learning_rate", "tokens_per_second",
            "loss", "ratio_mean", "approx_kl"}
N = 6


def prompt_batch(texts=("what is 2 + 3 ?", "hello world ?"), p=6):
  return tiny_prompt_batch(TOKENIZER, texts, length=p, fields={"answer": ["5", "world"]})

def five_reward(prompts, completions, **fields):
  """Fraction of the N completion slots holding the word "5" (a verifiable toy reward)."""
  assert len(fields["answer"]) == len(completions) == len(prompts)
  return np.array([c.split().count("5") / N for c in completions], np.float32)


OPTIMIZER = make_optimizer(OptimizerConfig(1e-2))  # shared: trainers share compiled updates


def make(config, reward_fn=five_reward, seed=0):
  optimizer = OPTIMIZER
  graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(seed)), optimizer,
                                       rng=seed)
  trainer = GRPOTrainer(graphdef, optimizer, config, reward_fn, TOKENIZER, stop_tokens=[EOS],
                        pad_id=EOS, compiler_options=FAST)
  return trainer, trainer.init_state(state)


SAMPLING = SamplingConfig(num_samples=4, max_new_tokens=N)


def base_config(update=None, **kw):
  update = UpdateConfig(chunk_size=8, **(update or {}))
  return GRPOConfig(**{"sampling": SAMPLING, "update": update, **kw})


# The shared configuration (one compiled update for several tests).
SHARED = base_config({"num_epochs": 2, "num_minibatches": 2}, kl_coef=0.04)


def test_steps_ratio_one_kl_zero_metrics_and_no_recompilation():
  trainer, state = make(SHARED)
  prompts = prompt_batch()
  state, m = trainer.step(state, prompts, jax.random.key(0))
  assert REQUIRED <= set(m), REQUIRED - set(m)
  assert all(np.isfinite(v) for v in m.values())
  assert abs(m["first_ratio_mean"] - 1.0) < 1e-6 and m["first_clipfrac"] == 0.0
  assert abs(m["first_kl"]) < 1e-6  # the reference is the initial policy
  assert m["tis_weight_mean"] == 1.0  # not applied, reported as 1
  assert int(state.step) == 4  # 2 iterations x 2 minibatches
  # The trainer's own forward pass agrees with the sampler's log-probs.
  scored, _ = trainer.collect(state, prompts, jax.random.key(1))
  _, batch, _ = trainer.prepare(state, scored)
  cm = np.asarray(batch.loss_mask)
  np.testing.assert_allclose(np.asarray(batch.old_logp)[cm], scored.rollout.logprobs[cm],
                             atol=2e-5)
  assert batch.tokens.shape == (8, 6 + N) and batch.advantages.shape == (8, N)
  # No recompilation: a second and a third step compile nothing new.
  state, m = trainer.step(state, prompts, jax.random.key(2))
  with count_compiles() as compiles:
    state, m = trainer.step(state, prompts, jax.random.key(3))
  assert compiles.count == 0
  assert abs(m["first_ratio_mean"] - 1.0) < 1e-6 and m["first_clipfrac"] == 0.0
  # Evaluation: greedy accuracy, and pass@k (k = G reuses the sampling program).
  ev = trainer.evaluate(state, prompts, jax.random.key(4))
  assert set(ev) == {"accuracy", "reward_mean", "pass@1"} and 0 <= ev["accuracy"] <= 1
  ev = trainer.evaluate(state, prompts, jax.random.key(4), k=4)
  assert 0 <= ev["accuracy"] <= ev["pass@4"] <= 1


def prompt_dependent_reward(prompts, completions, *, completion_tokens, completion_mask,
                            **fields):
  """Constant for the "hello" prompt (zero-variance group), varied otherwise."""
  varied = (np.where(completion_mask, completion_tokens, 0).sum(-1) % 7).astype(np.float32)
  return np.where([p.startswith("hello") for p in prompts], 1.0, varied).astype(np.float32)


def test_dynamic_sampling_drops_and_refills_zero_variance_groups():
  prompts = prompt_batch()
  trainer, state = make(base_config(dynamic_sampling=True, max_resample=3),
                        reward_fn=prompt_dependent_reward)
  scored, m = trainer.collect(state, prompts, jax.random.key(0))
  assert m["zero_variance_groups"] == 0.5
  assert m["resamples"] == 1.0 and m["filled_zero_variance_groups"] == 0.0
  assert scored.rollout.tokens.shape == (8, 6 + N)  # refilled to the requested size
  assert group_has_variance(scored.scores, 4).all()
  assert set(scored.prompt_index.tolist()) == {0}  # only the informative prompt survives
  # Without dynamic sampling the groups are kept and reported.
  trainer.config = base_config(dynamic_sampling=False)
  scored, m = trainer.collect(state, prompts, jax.random.key(0))
  assert m["zero_variance_groups"] == 0.5 and m["resamples"] == 0.0
  assert not group_has_variance(scored.scores, 4)[1]


def test_dynamic_sampling_fills_with_zero_variance_when_it_cannot_refill():
  trainer, state = make(base_config(dynamic_sampling=True, max_resample=2),
                        reward_fn=lambda p, c, **f: np.ones(len(c), np.float32))
  scored, m = trainer.collect(state, prompt_batch(), jax.random.key(0))
  assert m["zero_variance_groups"] == 1.0 and m["resamples"] == 2.0
  assert scored.rollout.tokens.shape == (8, 6 + N)


def nan_in_row_one(prompts, completions, **fields):
  rewards = five_reward(prompts, completions, **fields)
  rewards[1] = np.nan
  return rewards


def test_nonfinite_reward_raises_naming_rows_or_drops_its_group():
  prompts = prompt_batch()
  trainer, state = make(base_config(), reward_fn=nan_in_row_one)
  with pytest.raises(ValueError, match=r"non-finite rewards for rows \[1\].*nonfinite_rewards"):
    trainer.collect(state, prompts, jax.random.key(0))
  trainer, state = make(base_config(nonfinite_rewards="drop"), reward_fn=nan_in_row_one)
  scored, m = trainer.collect(state, prompts, jax.random.key(0))
  np.testing.assert_array_equal(scored.dropped, [True] * 4 + [False] * 4)  # the whole group
  kept = np.array([c.split().count("5") / N for c in scored.completions[4:]], np.float32)
  assert m["dropped_rows"] == 4 and m["reward_mean"] == pytest.approx(kept.mean())
  _, batch, _ = trainer.prepare(state, scored)
  mask, adv = np.asarray(batch.loss_mask), np.asarray(batch.advantages)
  assert not mask[:4].any() and not adv[:4].any()
  assert (mask[4:].sum(axis=1) == scored.rollout.lengths[4:]).all()
  want = np.asarray(grpo_advantages(jnp.asarray(kept), group_size=4))  # the kept group alone
  np.testing.assert_allclose(adv[4:], want[:, None] * mask[4:], atol=1e-6)


def test_drop_rows_keeps_the_shape_and_dynamic_sampling_carries_it():
  rows = 4
  rollout = Rollout(np.zeros((rows, 3), np.int32), np.ones((rows, 1), bool),
                    np.ones((rows, 2), bool), np.zeros((rows, 2), np.float32),
                    np.full(rows, 2), np.ones(rows, bool))
  scores = np.array([1.0, np.inf, 0.5, 0.0], np.float32)
  scored = Scored(rollout, scores, scores, np.arange(rows), ["a"] * rows, 1.0)
  dropped = drop_rows(scored, ~np.isfinite(scores))  # PPO: the row alone
  np.testing.assert_array_equal(dropped.dropped, [False, True, False, False])
  np.testing.assert_array_equal(dropped.rollout.completion_mask.any(axis=1), [1, 0, 1, 1])
  assert dropped.scores[1] == 0 and rollout_metrics(dropped)["reward_mean"] == 0.5
  grouped = drop_rows(scored, ~np.isfinite(scores), group_size=2)  # GRPO: its group
  np.testing.assert_array_equal(grouped.dropped, [True, True, False, False])
  both = select_rows([grouped, scored], [(0, np.array([0, 2])), (1, np.array([1]))])
  np.testing.assert_array_equal(both.dropped, [True, False, False])


@pytest.mark.parametrize("config", [
  GRPOConfig.dr_grpo(sampling=SAMPLING, update=UpdateConfig(chunk_size=8)),
  GRPOConfig.dapo(sampling=SAMPLING, update=UpdateConfig(chunk_size=8)),
  GRPOConfig.gspo(sampling=SAMPLING, update=UpdateConfig(chunk_size=8), advantage="rloo"),
  base_config({"num_microbatches": 2}, loss="cispo", advantage="reinforce_pp", kl_coef=0.01),
  dataclasses.replace(SHARED, advantage="reinforce_pp_baseline", use_rollout_logprobs=True),
], ids=["dr_grpo", "dapo", "gspo_rloo", "cispo_reinforce_pp_micro", "rpp_baseline_tis"])
def test_variants_run_one_step(config):
  trainer, state = make(config)
  state, m = trainer.step(state, prompt_batch(), jax.random.key(3))
  required = REQUIRED if config.kl_coef > 0 else REQUIRED - {"kl"}  # β = 0: no reference pass
  assert required <= set(m) and all(np.isfinite(v) for v in m.values())
  assert abs(m["first_ratio_mean"] - 1.0) < 1e-6 and m["first_clipfrac"] == 0.0
  assert m["skipped"] == 0.0 and m["grad_norm"] > 0
  if config.use_rollout_logprobs:
    assert abs(m["tis_weight_mean"] - 1.0) < 1e-4  # trainer == sampler here


def test_presets_and_validation():
  assert GRPOConfig.dr_grpo().update.agg == "seq-mean-token-sum-norm"
  update = GRPOConfig(update=UpdateConfig(num_minibatches=2)).update
  assert (update.num_epochs, update.agg) == (1, "seq-mean-token-mean")
  dapo = GRPOConfig.dapo(sampling=SamplingConfig(num_samples=8, max_new_tokens=16))
  assert dapo.dynamic_sampling and dapo.clip_range == (0.2, 0.28) and dapo.overlong_cache == 4
  assert GRPOConfig.gspo().loss == "gspo"
  with pytest.raises(ValueError, match="advantage"):
    GRPOConfig(advantage="ppo")
  with pytest.raises(ValueError, match="loss"):
    GRPOConfig(loss="dpo")
  with pytest.raises(ValueError, match="num_samples"):
    GRPOConfig(sampling=SamplingConfig(num_samples=1))
  with pytest.raises(ValueError, match="temperature"):
    GRPOConfig(sampling=SamplingConfig(temperature=0.0, num_samples=4))
  with pytest.raises(ValueError, match="kl_coef"):
    GRPOConfig(kl_coef=float("nan"))
  with pytest.raises(ValueError, match="clip_ratio_c"):
    GRPOConfig(loss="gspo", clip_ratio_c=3.0)
  with pytest.raises(ValueError, match="clip_ratio_c"):
    GRPOConfig(clip_ratio_c=0.5)


def test_each_loss_gets_its_own_clip_pair():
  """Choosing a loss (also by replacing it, as `--set grpo.loss=gspo` does) gives that loss's
  clip range, never a mix of two losses' bounds."""
  assert GRPOConfig().clip_range == (0.2, 0.2)
  assert dataclasses.replace(GRPOConfig(), loss="gspo").clip_range == (3e-4, 4e-4)
  assert GRPOConfig(loss="cispo").clip_range == (0.2, 0.28)
  assert GRPOConfig(loss="gspo", clip_eps=1e-3).clip_range == (1e-3, 1e-3)
  assert GRPOConfig(clip_eps_high=0.28).clip_range == (0.2, 0.28)


def test_overlong_penalty_matches_dapo_formula():
  lengths = np.array([1, 12, 13, 14, 16])
  got = soft_overlong_penalty(lengths, max_length=16, cache=4, factor=0.5)
  want = [0.0, 0.0, 0.5 * (12 - 13) / 4, 0.5 * (12 - 14) / 4, 0.5 * (12 - 16) / 4]
  np.testing.assert_allclose(got, want, atol=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_normalizer_makes_microbatch_losses_sum_to_full_batch(agg):
  rng = np.random.default_rng(0)
  loss_mat = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  mask = jnp.asarray(rng.random((6, 5)) < 0.6).at[2].set(False)
  full = aggregate(loss_mat, mask, agg)
  norm = agg_count(mask, agg)
  parts = [rescale_to_normalizer(aggregate(loss_mat[s], mask[s], agg), agg_count(mask[s], agg),
                                 norm) for s in (slice(0, 2), slice(2, 6))]
  np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6)


def test_grpo_learns_to_say_five():
  """20 steps of GRPO (2 prompts x 4 samples): the mean reward rises clearly."""
  trainer, state = make(SHARED, seed=1)
  prompts = prompt_batch()
  rewards = []
  for i in range(20):
    state, m = trainer.step(state, prompts, jax.random.key(100 + i))
    rewards.append(m["reward_mean"])
  early, late = np.mean(rewards[:4]), np.mean(rewards[-4:])
  print(f"GRPO reward first 4 steps {early:.3f} -> last 4 steps {late:.3f}")
  assert late > early + 0.3, rewards
