"""Masked values never matter.

Every masked function of `rljax.ops` / `rljax.losses` and every trainer objective is run twice
through one compiled value-and-gradient: with zeros at the masked positions of its inputs, and
with garbage there (NaN, +inf, -inf, 1e30, -1e30 in turn). For the objectives the token ids at
padded positions are garbage too (>= V, negative, the int32 extremes) against a valid pad id 0,
and their masked experience fields (old / reference log-probs, advantages, values, returns) and
absent per-sequence slots (packed batches) likewise. The outputs, metrics and gradients must be
identical (bitwise) and finite.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax import losses, ops
from rljax.data.batching import collate_kto, collate_listwise, collate_preference, collate_sft
from rljax.data.packing import add_kl_completions, collate_packed
from rljax.models.config import ModelConfig
from rljax.models.heads import RewardModel, ValueModel
from rljax.models.transformer import Transformer
from rljax.ops.masking import sequence_sums
from rljax.rollout.sampling import SamplingConfig
from rljax.train import grpo, ppo, packed
from rljax.train.experience import Experience, pack_experience
from rljax.train.objectives import dpo_objective, sft_loss
from rljax.train.onpolicy import UpdateConfig
from rljax.train.preference import cpo_objective, kto_objective, orpo_objective, simpo_objective
from rljax.train.reward_modeling import listwise_reward_objective, reward_pair_objective

GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], np.float32)
FAST = {"xla_backend_optimization_level": 0}


def corrupt(x, valid, garbage: bool) -> np.ndarray:
  """x with its entries where `valid` is 0 replaced by GARBAGE in turn (or by 0)."""
  x = np.array(x, np.float32)
  idx = np.flatnonzero(np.broadcast_to(np.asarray(valid), x.shape) == 0)
  x.flat[idx] = GARBAGE[np.arange(idx.size) % GARBAGE.size] if garbage else 0.0
  return x


def assert_identical_and_finite(garbage, zeros) -> None:
  for g, z in zip(jax.tree.leaves(garbage), jax.tree.leaves(zeros), strict=True):
    g, z = np.asarray(g), np.asarray(z)
    assert np.all(np.isfinite(z)), z
    np.testing.assert_array_equal(g, z)


def total(out) -> jax.Array:
  """The sum of every output leaf: its gradient reaches every input an output depends on."""
  return sum(jnp.sum(jnp.asarray(leaf, jnp.float32)) for leaf in jax.tree.leaves(out))


# ----------------------------------------------------------------------------------------------
# The functional core: one [B, T] layout (an empty row, right and left padding, holes).
# ----------------------------------------------------------------------------------------------

B, T = 4, 6
MASK = np.ones((B, T), np.float32)
MASK[0] = 0
MASK[1, 3:] = 0
MASK[2, :2] = 0
MASK[3, [1, 4]] = 0
WEIGHTS = MASK * np.array([1.0, 0.5, 2.0, 1.5], np.float32)[:, None]
SEGMENTS = np.array([[0, 0, 1, 1, 1, 3]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2, np.int32)  # 3: padding
STEP_ENDS = np.zeros((B, T), np.float32)
STEP_ENDS[1, [0, 2]] = STEP_ENDS[2, [3, 5]] = STEP_ENDS[3, [0, 5]] = 1

_rng = np.random.default_rng(0)
LOGP, OLD, REF, PTX = (-np.abs(_rng.normal(size=(B, T))).astype(np.float32) for _ in range(4))
ADV, VALUES, OLD_VALUES, RETURNS, REWARDS, KL = (
  _rng.normal(size=(B, T)).astype(np.float32) for _ in range(6))
SCORES = _rng.normal(size=(B,)).astype(np.float32)
SEQ = {"segment_ids": SEGMENTS, "num_segments": 3}


@dataclasses.dataclass(frozen=True)
class Case:
  """fn(**inputs), each input corrupted where its mask (`masks[name]`) is 0."""

  fn: Callable[..., Any]
  inputs: dict[str, np.ndarray]
  masks: dict[str, np.ndarray]


def _case(fn, mask=MASK, **inputs) -> Case:
  """fn(**inputs, mask=mask), every input corrupted where `mask` is 0."""
  return Case(functools.partial(fn, mask=mask), inputs, {k: mask for k in inputs})


CASES = {
  "masked_sum": _case(lambda x, mask: ops.masked_sum(x, mask, axis=-1), x=ADV),
  "masked_mean": _case(lambda x, mask: ops.masked_mean(x, mask), mask=WEIGHTS, x=ADV),
  "masked_var": _case(lambda x, mask: ops.masked_var(x, mask, axis=-1), x=ADV),
  "masked_var_biased": _case(lambda x, mask: ops.masked_var(x, mask, unbiased=False), x=ADV),
  "masked_whiten": _case(ops.masked_whiten, x=ADV),
  "masked_whiten_keep_mean": _case(functools.partial(ops.masked_whiten, shift_mean=False), x=ADV),
  **{f"aggregate_{mode}": _case(functools.partial(ops.aggregate, mode=mode), mask=WEIGHTS,
                                loss_mat=ADV) for mode in ops.masking.AGG_MODES},
  "aggregate_packed": _case(functools.partial(ops.aggregate, mode="seq-mean-token-mean", **SEQ),
                            loss_mat=ADV),
  "sequence_sums_packed": _case(lambda x, mask: sequence_sums(x, mask, SEGMENTS, 3), x=ADV),
  "segment_sum": _case(lambda x, mask: ops.segment_sum(x, SEGMENTS, 3, mask=mask), x=ADV),
  "sequence_logprobs": _case(ops.sequence_logprobs, token_logps=LOGP),
  "sequence_logprobs_average": _case(functools.partial(ops.sequence_logprobs, average=True),
                                     token_logps=LOGP),
  "discounted_returns": _case(functools.partial(ops.discounted_returns, gamma=0.9),
                              rewards=REWARDS),
  "gae": _case(functools.partial(ops.gae, gamma=0.9, lam=0.8, whiten=True), rewards=REWARDS,
               values=VALUES),
  "reinforce_pp_advantages": _case(functools.partial(ops.reinforce_pp_advantages, gamma=1.0),
                                   token_rewards=REWARDS),
  "remax_advantages": _case(lambda token_rewards, mask: ops.remax_advantages(
    token_rewards, SCORES, mask), token_rewards=REWARDS),
  "token_level_rewards": _case(lambda kl, mask: ops.token_level_rewards(SCORES, mask, kl=kl,
                                                                        beta=0.1), kl=KL),
  "grpo_process_advantages": Case(
    lambda step_rewards: ops.grpo_process_advantages(step_rewards, STEP_ENDS, MASK,
                                                     group_size=2),
    {"step_rewards": REWARDS}, {"step_rewards": STEP_ENDS}),
  "policy_gradient_loss": _case(losses.policy_gradient_loss, logp=LOGP, advantages=ADV),
  "ppo_clip_loss_dual_clip": _case(functools.partial(losses.ppo_clip_loss, clip_ratio_c=3.0),
                                   logp=LOGP, old_logp=OLD, advantages=ADV),
  "ppo_clip_loss_packed": _case(functools.partial(losses.ppo_clip_loss, agg="seq-mean-token-sum",
                                                  **SEQ), logp=LOGP, old_logp=OLD, advantages=ADV),
  "ppo_penalty_loss": _case(functools.partial(losses.ppo_penalty_loss, beta=0.3, kl_kind="k3"),
                            logp=LOGP, old_logp=OLD, advantages=ADV),
  "grpo_loss": _case(losses.grpo_loss, logp=LOGP, old_logp=OLD, ref_logp=REF, advantages=ADV),
  "grpo_loss_k2_token_mean": _case(functools.partial(losses.grpo_loss, kl_kind="k2",
                                                     agg="token-mean"),
                                   logp=LOGP, old_logp=OLD, ref_logp=REF, advantages=ADV),
  "gspo_loss": _case(losses.gspo_loss, logp=LOGP, old_logp=OLD, advantages=ADV),
  "gspo_loss_packed": _case(functools.partial(losses.gspo_loss, **SEQ), logp=LOGP, old_logp=OLD,
                            advantages=ADV),
  "cispo_loss": _case(losses.cispo_loss, logp=LOGP, old_logp=OLD, advantages=ADV),
  "ppo_ptx_loss": _case(lambda logp, old_logp, advantages, ptx_logp, mask: losses.ppo_ptx_loss(
    losses.ppo_clip_loss(logp, old_logp, advantages, mask), ptx_logp, mask, ptx_coef=0.5),
    logp=LOGP, old_logp=OLD, advantages=ADV, ptx_logp=PTX),
  "value_loss_clipped": _case(functools.partial(losses.value_loss, clip_eps=0.2), values=VALUES,
                              old_values=OLD_VALUES, returns=RETURNS),
  "value_loss_packed": _case(functools.partial(losses.value_loss, agg="seq-mean-token-mean",
                                               **SEQ), values=VALUES, old_values=OLD_VALUES,
                             returns=RETURNS),
  "grpo_tis_weighted": _case(lambda advantages, old_logp, rollout_logp, mask: grpo.tis_weighted(
    advantages, mask != 0, old_logp, rollout_logp, cap=2.0), advantages=ADV, old_logp=OLD,
    rollout_logp=REF),
  "ppo_advantages": _case(lambda old_logp, ref_logp, values, mask: ppo.ppo_advantages(
    SCORES, mask != 0, old_logp, ref_logp, values, ops.adaptive_kl_controller(
      0.1, target=1.0, horizon=100.0).init(), kl_kind="k1", gamma=1.0, lam=0.95, whiten=True,
    adaptive=True, kl_target=1.0, kl_horizon=100.0), old_logp=OLD, ref_logp=REF, values=VALUES),
  "example_mean_packed": _case(
    lambda policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask: packed.example_mean(
      losses.dpo_loss, mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected),
    mask=MASK[:, 2], policy_chosen=LOGP[:, 0], policy_rejected=LOGP[:, 1], ref_chosen=REF[:, 0],
    ref_rejected=REF[:, 1]),
}


def assert_all_identical_and_finite(garbage: dict, zeros: dict) -> None:
  """Per named case; the message lists every case whose results differ or are not finite."""
  failures = {}
  for name in garbage:
    try:
      assert_identical_and_finite(garbage[name], zeros[name])
    except AssertionError as e:
      failures[name] = str(e).strip().splitlines()[:4]
  assert not failures, f"{sorted(failures)}: {failures}"


def test_masked_functions_never_read_masked_positions():
  """Every case in one compiled program (value and gradient of the sum of all outputs)."""

  def value(inputs):
    out = {name: case.fn(**inputs[name]) for name, case in CASES.items()}
    return total(out), out

  run = jax.jit(jax.value_and_grad(value, has_aux=True), compiler_options=FAST)
  garbage, zeros = (
    run({name: {k: corrupt(x, case.masks[k], g) for k, x in case.inputs.items()}
         for name, case in CASES.items()}) for g in (True, False))
  (_, garbage_out), garbage_grads = garbage
  (_, zeros_out), zeros_grads = zeros
  assert_all_identical_and_finite(
    {name: (garbage_out[name], garbage_grads[name]) for name in CASES},
    {name: (zeros_out[name], zeros_grads[name]) for name in CASES})


# ----------------------------------------------------------------------------------------------
# Trainer objectives on a tiny model: garbage token ids at padding, garbage masked fields.
# ----------------------------------------------------------------------------------------------

V = 32
CONFIG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=2, num_kv_heads=1)
GARBAGE_IDS = np.array([V, V + 7, -1, -V - 1, 2**31 - 1, -(2**31)], np.int64)


def corrupt_ids(ids, valid, garbage: bool) -> np.ndarray:
  """Token ids with those at padding (`valid` 0) set to GARBAGE_IDS in turn (or to pad id 0)."""
  ids = np.array(ids, np.int64)
  idx = np.flatnonzero(np.asarray(valid) == 0)
  ids.flat[idx] = GARBAGE_IDS[np.arange(idx.size) % GARBAGE_IDS.size] if garbage else 0
  return ids.astype(np.int32)


@functools.lru_cache(maxsize=None)
def model(kind: str = "policy", attention: str = "auto"):
  """(graphdef, params, rest) of a tiny policy / RewardModel / ValueModel."""
  config = dataclasses.replace(CONFIG, attention=attention,
                               attention_block=4 if attention == "blockwise" else 128)
  cls = {"policy": Transformer, "reward": RewardModel, "value": ValueModel}[kind]
  return nnx.split(cls(config, rngs=nnx.Rngs(0)), nnx.Param, ...)


def experience(garbage: bool, *, packed_rows: bool = False) -> Experience:
  """A GRPO / PPO batch: 4 rows of [left-padded prompt (3) | completion (5)], groups of 2."""
  rng = np.random.default_rng(1)
  prompt = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]], bool)
  completion = np.arange(5)[None, :] < np.array([5, 2, 3, 1])[:, None]
  attention = np.concatenate([prompt, completion], axis=1)
  fields = {k: -np.abs(rng.normal(size=completion.shape)) for k in ("old_logp", "ref_logp")}
  fields.update({k: rng.normal(size=completion.shape) for k in ("advantages", "values", "returns")})
  tokens = rng.integers(1, V, attention.shape)
  if packed_rows:  # pack the valid batch, then corrupt the packed padding
    batch = pack_experience(Experience(
      tokens=jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(attention),
      loss_mask=jnp.asarray(completion), **{k: jnp.asarray(v, jnp.float32)
                                            for k, v in fields.items()}))
    attention, completion = np.asarray(batch.attention_mask), np.asarray(batch.loss_mask)
    tokens = np.asarray(batch.tokens)
    fields = {k: np.asarray(getattr(batch, k)) for k in fields}
    extra = {"positions": batch.positions, "segment_ids": batch.segment_ids,
             "num_sequences": batch.num_sequences}
  else:
    extra = {}
  return Experience(
    tokens=jnp.asarray(corrupt_ids(tokens, attention, garbage)),
    attention_mask=jnp.asarray(attention), loss_mask=jnp.asarray(completion),
    **{k: jnp.asarray(corrupt(v, completion, garbage)) for k, v in fields.items()}, **extra)


def _records(kind: str) -> list[dict]:
  rng = np.random.default_rng(2)

  def ids(n):
    return [int(t) for t in rng.integers(1, V, n)]

  if kind == "sft":
    return [{"prompt_ids": ids(2), "response_ids": ids(n)} for n in (1, 3, 5)]
  if kind == "preference":
    return [{"prompt_ids": ids(2), "chosen_ids": ids(c), "rejected_ids": ids(r)}
            for c, r in ((1, 4), (3, 2), (2, 2))]
  if kind == "kto":
    return add_kl_completions([{"prompt_ids": ids(2), "completion_ids": ids(n), "label": n > 2}
                               for n in (1, 3, 4)])
  return [{"prompt_ids": ids(2), "response_ids": [ids(1), ids(3), ids(2)]} for _ in range(2)]


def token_batch(kind: str, garbage: bool, *, packed_rows: bool = False) -> dict:
  """A collated (or packed) batch with garbage ids where its attention masks are 0; packed,
  the per-sequence arrays of absent slots are garbage too."""
  recs = _records(kind)
  if packed_rows:
    batch = collate_packed(kind, recs, row_length=16, num_rows=3, max_records=4, pad_id=0)
  else:
    collate = {"sft": collate_sft, "preference": collate_preference, "kto": collate_kto,
               "ranked": collate_listwise}[kind]
    batch = collate(recs, pad_id=0)
  rng = np.random.default_rng(3)
  pairs = packed.num_sequences(batch) // 2 if packed_rows else len(recs)
  if kind == "preference":
    batch.update(ref_chosen=-rng.random(pairs), ref_rejected=-rng.random(pairs),
                 margin=rng.random(pairs))
  if kind == "kto":
    batch.update(ref_logps=-rng.random(pairs), ref_kl_logps=-rng.random(pairs))
  for key in [k for k in batch if k.endswith("input_ids")]:
    batch[key] = corrupt_ids(batch[key], batch[key.replace("input_ids", "attention_mask")],
                             garbage)
  if packed_rows:
    present = np.asarray(batch["sequence_mask"])[:pairs]
    for key in ("ref_chosen", "ref_rejected", "margin", "ref_logps", "ref_kl_logps"):
      if key in batch:
        batch[key] = corrupt(batch[key], present, garbage)
  return {k: jnp.asarray(v) for k, v in batch.items()}


GRPO_SAMPLING = SamplingConfig(num_samples=2, max_new_tokens=5)


def _grpo(**kw):
  config = grpo.GRPOConfig(sampling=GRPO_SAMPLING, update=UpdateConfig(chunk_size=4), **kw)
  return functools.partial(grpo.grpo_objective, config=config)


def _ppo(objective, **kw):
  config = ppo.PPOConfig(sampling=GRPO_SAMPLING, update=UpdateConfig(chunk_size=4), **kw)
  return functools.partial(objective, config=config)


def _ppo_batch(garbage: bool) -> dict:
  """PPO's policy batch: the experience, a ptx batch and PPO-penalty's β per row."""
  return {"exp": experience(garbage), "ptx": token_batch("sft", garbage),
          "penalty_kl_coef": jnp.full((4,), 0.5)}


# name → (objective, model (kind, attention), batch(garbage)).
POLICY, BLOCKWISE = ("policy", "auto"), ("policy", "blockwise")  # naive / blockwise attention
CRITIC, REWARD = ("value", "auto"), ("reward", "auto")
OBJECTIVES = {
  "grpo_kl_dual_clip": (_grpo(kl_coef=0.04, clip_ratio_c=3.0), POLICY, experience),
  "grpo_blockwise": (_grpo(kl_coef=0.04, kl_kind="k2"), BLOCKWISE, experience),
  "gspo_packed": (_grpo(loss="gspo", kl_coef=0.04), POLICY,
                  functools.partial(experience, packed_rows=True)),
  "ppo_policy_penalty_entropy_ptx": (_ppo(ppo.ppo_policy_objective, mode="penalty",
                                          entropy_coef=0.01, ptx_coef=0.5), POLICY, _ppo_batch),
  "ppo_critic": (_ppo(ppo.ppo_critic_objective), CRITIC,
                 lambda garbage: {"exp": experience(garbage)}),
  "sft": (sft_loss, POLICY, functools.partial(token_batch, "sft")),
  "dpo_rpo": (functools.partial(dpo_objective, nll_coef=0.5), POLICY,
              functools.partial(token_batch, "preference")),
  "dpo_packed": (dpo_objective, POLICY,
                 functools.partial(token_batch, "preference", packed_rows=True)),
  "orpo": (orpo_objective, POLICY, functools.partial(token_batch, "preference")),
  "simpo": (simpo_objective, POLICY, functools.partial(token_batch, "preference")),
  "cpo": (cpo_objective, POLICY, functools.partial(token_batch, "preference")),
  "kto_packed": (kto_objective, POLICY, functools.partial(token_batch, "kto", packed_rows=True)),
  "reward_pair": (reward_pair_objective, REWARD, functools.partial(token_batch, "preference")),
  "reward_pair_packed": (reward_pair_objective, REWARD,
                         functools.partial(token_batch, "preference", packed_rows=True)),
  "reward_listwise": (listwise_reward_objective, REWARD, functools.partial(token_batch, "ranked")),
}
# One compiled program per group (compiling dominates the time).
GROUPS = {
  "on_policy": ("grpo_kl_dual_clip", "grpo_blockwise", "gspo_packed",
                "ppo_policy_penalty_entropy_ptx", "ppo_critic"),
  "supervised": ("sft", "dpo_rpo", "dpo_packed", "orpo", "simpo", "cpo", "kto_packed"),
  "reward_model": ("reward_pair", "reward_pair_packed", "reward_listwise"),
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_objectives_ignore_padding_ids_and_masked_fields(group):
  """Loss, metrics and parameter gradients of each objective of the group (left-padded prompts
  give fully masked attention rows, in the naive and the blockwise core)."""
  names = GROUPS[group]
  models = {OBJECTIVES[n][1] for n in names}
  split = {key: model(*key) for key in models}

  def objectives(params, batches):
    out = {}
    for name in names:
      objective, key, _ = OBJECTIVES[name]
      graphdef, _, rest = split[key]
      out[name] = jax.value_and_grad(
        lambda p, b: objective(nnx.merge(graphdef, p, rest), b), has_aux=True
      )(params[key], batches[name])
    return out

  run = jax.jit(objectives, compiler_options=FAST)
  params = {key: s[1] for key, s in split.items()}
  garbage, zeros = (run(params, {n: OBJECTIVES[n][2](g) for n in names}) for g in (True, False))
  assert_all_identical_and_finite(garbage, zeros)
