"""Packed batches (`rljax.data.packing`) through every supervised objective: the loss and its
gradient equal those of the same sequences one per row (within 1e-5), the reference log-probs
and rewards equal the unpacked ones, microbatched packed steps equal the full packed step, and
bad packed batches fail with errors naming what is wrong."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.data.batching import collate_kto, collate_preference, collate_sft
from rljax.data.packing import add_kl_completions, collate_packed
from rljax.models.config import ModelConfig
from rljax.models.heads import RewardModel
from rljax.models.transformer import Transformer
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.preference import (
  cpo_objective,
  example_count,
  kto_objective,
  orpo_objective,
  reference_logps,
  simpo_objective,
)
from rljax.train.reward_modeling import pair_accuracy, reward_pair_objective
from rljax.train.step import make_grad_fn

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=2, num_kv_heads=1)
FAST = {"xla_backend_optimization_level": 0}
B, SLOTS = 5, 6  # records, record slots (one empty slot: padding sequences are dropped)
ROWS, ROW = 4, 32  # packed rows of 32 tokens


def _tokens(rng, low, high):
  return [int(t) for t in rng.integers(1, CONFIG.vocab_size, rng.integers(low, high + 1))]


def records(kind: str, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(B):
    r = {"prompt_ids": _tokens(rng, 1, 4)}
    if kind == "sft":
      r["response_ids"] = _tokens(rng, 1, 6)
    elif kind == "preference":
      r["chosen_ids"], r["rejected_ids"] = _tokens(rng, 1, 5), _tokens(rng, 1, 5)
    else:
      r["completion_ids"], r["label"] = _tokens(rng, 1, 5), bool(i % 2)
    out.append(r)
  return add_kl_completions(out) if kind == "kto" else out


def batches(kind: str, *, kl_pairs: bool = True):
  """(unpacked, packed) batches of the same records."""
  recs = records(kind)
  unpacked = {"sft": collate_sft, "preference": collate_preference,
              "kto": functools.partial(collate_kto, kl_pairs=kl_pairs)}[kind](recs, pad_id=0)
  packed = collate_packed(kind, recs, row_length=ROW, num_rows=ROWS, max_records=SLOTS,
                          pad_id=0, kl_pairs=kl_pairs)
  assert packed["input_ids"].shape[0] < len(recs) * (1 + (kind != "sft"))  # really packed
  return unpacked, packed


@functools.lru_cache(maxsize=None)
def policy(seed: int = 0):
  return nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(seed)))


@functools.lru_cache(maxsize=None)
def reward_model():
  return nnx.split(RewardModel(CONFIG, rngs=nnx.Rngs(0)))


def with_reference(batch):
  """The batch plus the reference model's log-probs (a different model than the policy)."""
  graphdef, state = policy(1)
  return {**batch, **{k: np.asarray(v) for k, v in reference_logps(graphdef, state, batch).items()}}


def loss_and_grad(objective, model, batch, *, count_fn=None):
  graphdef, state = model

  def f(state, batch):
    normalizer = None if count_fn is None else count_fn(batch)
    return objective(nnx.merge(graphdef, state), batch, normalizer=normalizer)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True),
                                   compiler_options=FAST)(state, batch)
  return loss, metrics, grads


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


CASES = {
  "sft": ("sft", sft_loss, sft_token_count, policy),
  "dpo": ("preference", dpo_objective, pair_count, policy),
  "rpo_ipo_norm": ("preference", functools.partial(dpo_objective, variant="ipo",
                                                   length_normalize=True, nll_coef=0.5),
                   pair_count, policy),
  "dpo_sigmoid_norm": ("preference", functools.partial(dpo_objective, variant="sigmoid_norm"),
                       pair_count, policy),
  "orpo": ("preference", orpo_objective, pair_count, policy),
  "simpo": ("preference", simpo_objective, pair_count, policy),
  "cpo": ("preference", cpo_objective, pair_count, policy),
  "kto": ("kto", kto_objective, example_count, policy),
  "reward_pair": ("preference", functools.partial(reward_pair_objective, center_coef=0.01),
                  pair_count, reward_model),
}


@pytest.mark.parametrize("name", list(CASES))
def test_packed_loss_and_gradient_equal_unpacked(name):
  kind, objective, count_fn, model = CASES[name]
  unpacked, packed = batches(kind)
  if objective is not sft_loss and model is policy:
    unpacked, packed = with_reference(unpacked), with_reference(packed)
  np.testing.assert_allclose(float(count_fn(packed)), float(count_fn(unpacked)))
  loss_u, metrics_u, grads_u = loss_and_grad(objective, model(), unpacked, count_fn=count_fn)
  loss_p, metrics_p, grads_p = loss_and_grad(objective, model(), packed, count_fn=count_fn)
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5, atol=1e-6)
  assert_trees_close(grads_p, grads_u)
  assert sorted(metrics_p) == sorted(metrics_u)
  assert_trees_close(metrics_p, metrics_u)


def test_kto_without_kl_pairs_equals_unpacked():
  unpacked, packed = (with_reference(b) for b in batches("kto", kl_pairs=False))
  assert packed["sequence_mask"].shape == (SLOTS,) and "ref_kl_logps" not in packed
  loss_u, _, grads_u = loss_and_grad(kto_objective, policy(), unpacked)
  loss_p, _, grads_p = loss_and_grad(kto_objective, policy(), packed)
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
  assert_trees_close(grads_p, grads_u)


@pytest.mark.parametrize("kind", ["preference", "kto"])
def test_reference_logps_of_packed_batch_equal_unpacked(kind):
  unpacked, packed = batches(kind)
  ref_u, ref_p = with_reference(unpacked), with_reference(packed)
  names = ("ref_chosen", "ref_rejected") if kind == "preference" else ("ref_logps",
                                                                         "ref_kl_logps")
  for name in names:
    assert ref_p[name].shape == (SLOTS,)
    np.testing.assert_allclose(ref_p[name][:B], ref_u[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ref_p[name][B:], 0.0)  # the empty slot


def test_reward_model_reads_the_last_token_of_each_segment():
  unpacked, packed = batches("preference")
  model = nnx.merge(*reward_model())
  chosen = model(jnp.asarray(unpacked["chosen_input_ids"]),
                 jnp.asarray(unpacked["chosen_attention_mask"]))
  rewards = model(*(jnp.asarray(packed[k]) for k in ("input_ids", "attention_mask", "positions",
                                                      "segment_ids")), num_segments=2 * SLOTS)
  np.testing.assert_allclose(rewards[:B], chosen, rtol=1e-5, atol=1e-6)
  assert float(rewards[B]) == 0.0  # an empty slot
  assert pair_accuracy(reward_model(), packed) == pair_accuracy(reward_model(), unpacked)


@pytest.mark.parametrize("name", ["sft", "dpo", "reward_pair"])
def test_microbatched_packed_equals_full_packed(name):
  kind, objective, count_fn, model = CASES[name]
  _, packed = batches(kind)
  if model is policy and objective is not sft_loss:
    packed = with_reference(packed)
  graphdef, state = model()
  results = []
  for k in (1, 2):
    grad_fn = make_grad_fn(objective, graphdef, count_fn=count_fn, num_microbatches=k)
    loss, grads, _ = jax.jit(grad_fn, compiler_options=FAST)(state, nnx.State({}), packed)
    results.append((loss, grads))
  np.testing.assert_allclose(float(results[1][0]), float(results[0][0]), rtol=1e-5)
  assert_trees_close(results[1][1], results[0][1])


def test_packed_sft_jit_equals_eager():
  _, packed = batches("sft")
  model = nnx.merge(*policy())
  eager, _ = sft_loss(model, packed)
  jitted, _ = jax.jit(lambda b: sft_loss(nnx.merge(*policy()), b))(packed)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


def test_first_token_of_a_segment_is_never_predicted():
  """A record without a prompt: its first response token has loss mask 1 in the packed row but
  is not predicted from the sequence before it (as position 0 of an unpacked row)."""
  recs = [{"prompt_ids": [], "response_ids": [3, 4, 5]}, {"prompt_ids": [], "response_ids": [6, 7]}]
  packed = collate_packed("sft", recs, row_length=8, num_rows=1, pad_id=0)
  assert packed["loss_mask"][0, :5].tolist() == [1, 1, 1, 1, 1]
  assert float(sft_token_count(packed)) == 3.0  # 2 + 1 predicted tokens
  unpacked = collate_sft(recs, pad_id=0)
  assert float(sft_token_count(unpacked)) == 3.0


def test_bad_packed_batches_raise():
  _, packed = batches("preference")
  model = nnx.merge(*policy())
  with pytest.raises(ValueError, match="positions"):
    sft_loss(model, {k: v for k, v in packed.items() if k != "positions"})
  odd = {**packed, "sequence_mask": packed["sequence_mask"][:-1]}
  with pytest.raises(ValueError, match="even number"):
    dpo_objective(model, {**odd, "ref_chosen": np.zeros(SLOTS), "ref_rejected": np.zeros(SLOTS)})
  with pytest.raises(ValueError, match="segment_ids"):
    sft_loss(model, {**packed, "segment_ids": packed["segment_ids"][:, :-1]})
  with pytest.raises(ValueError, match="num_segments"):
    nnx.merge(*reward_model())(jnp.asarray(packed["input_ids"]), None, None,
                               jnp.asarray(packed["segment_ids"]))
