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
from rljax.losses.dpo import dpo_loss
from rljax.models.config import ModelConfig
from rljax.models.heads import RewardModel
from rljax.models.transformer import Transformer
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.packed import example_mean
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


def losses_and_grads(objectives, model, batch):
  """{name: (loss, metrics, grads)} of each (objective, count_fn), in one jitted program."""
  graphdef, state = model

  def f(state, batch):
    out = {}
    for name, (objective, count_fn) in objectives.items():
      def loss(s, objective=objective, count_fn=count_fn):
        return objective(nnx.merge(graphdef, s), batch, normalizer=count_fn(batch))
      (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state)
      out[name] = (value, metrics, grads)
    return out

  return jax.jit(f, compiler_options=FAST)(state, batch)


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


PAIR_OBJECTIVES = {
  "dpo": dpo_objective,
  "rpo_ipo_norm": functools.partial(dpo_objective, variant="ipo", length_normalize=True,
                                    nll_coef=0.5),
  "orpo": orpo_objective,
  "simpo": simpo_objective,
  "cpo": cpo_objective,
}
GROUPS = {  # kind → ({name: (objective, count_fn)}, model); one compile per group and batch
  "sft": ("sft", {"sft": (sft_loss, sft_token_count)}, policy),
  "pairs": ("preference", {k: (v, pair_count) for k, v in PAIR_OBJECTIVES.items()}, policy),
  "kto": ("kto", {"kto": (kto_objective, example_count)}, policy),
  "reward_pair": ("preference", {"reward_pair": (
    functools.partial(reward_pair_objective, center_coef=0.01), pair_count)}, reward_model),
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_packed_loss_and_gradient_equal_unpacked(group):
  kind, objectives, model = GROUPS[group]
  unpacked, packed = batches(kind)
  if group in ("pairs", "kto"):
    unpacked, packed = with_reference(unpacked), with_reference(packed)
  unpacked_out = losses_and_grads(objectives, model(), unpacked)
  packed_out = losses_and_grads(objectives, model(), packed)
  for name, (_, count_fn) in objectives.items():
    np.testing.assert_allclose(float(count_fn(packed)), float(count_fn(unpacked)))
    loss_u, metrics_u, grads_u = unpacked_out[name]
    loss_p, metrics_p, grads_p = packed_out[name]
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5, atol=1e-6, err_msg=name)
    assert_trees_close(grads_p, grads_u)
    assert sorted(metrics_p) == sorted(metrics_u)
    assert_trees_close(metrics_p, metrics_u)


def test_kto_without_kl_pairs_equals_unpacked():
  unpacked, packed = (with_reference(b) for b in batches("kto", kl_pairs=False))
  assert packed["sequence_mask"].shape == (SLOTS,) and "ref_kl_logps" not in packed
  both = jax.jit(lambda model, u, p: (kto_objective(model, u), kto_objective(model, p)))
  (loss_u, metrics_u), (loss_p, metrics_p) = both(nnx.merge(*policy()), unpacked, packed)
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
  assert_trees_close(metrics_p, metrics_u)


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

  @jax.jit
  def rewards(model, unpacked, packed):
    chosen = model(unpacked["chosen_input_ids"], unpacked["chosen_attention_mask"])
    inputs = (packed[k] for k in ("input_ids", "attention_mask", "positions", "segment_ids"))
    return chosen, model(*inputs, num_segments=2 * SLOTS)

  chosen, per_sequence = rewards(nnx.merge(*reward_model()), unpacked, packed)
  np.testing.assert_allclose(per_sequence[:B], chosen, rtol=1e-5, atol=1e-6)
  assert float(per_sequence[B]) == 0.0  # an empty slot
  assert pair_accuracy(reward_model(), packed) == pair_accuracy(reward_model(), unpacked)


@pytest.mark.parametrize("group", ["sft", "pairs"])
def test_microbatched_packed_equals_full_packed(group):
  kind, objectives, model = GROUPS[group]
  objective, count_fn = next(iter(objectives.values()))
  _, packed = batches(kind)
  if group == "pairs":
    packed = with_reference(packed)
  graphdef, state = model()
  grad_fns = [make_grad_fn(objective, graphdef, count_fn=count_fn, num_microbatches=k)
              for k in (1, 2)]
  both = jax.jit(lambda s, b: [g(s, nnx.State({}), b)[:2] for g in grad_fns],
                 compiler_options=FAST)
  (loss_1, grads_1), (loss_2, grads_2) = both(state, packed)
  np.testing.assert_allclose(float(loss_2), float(loss_1), rtol=1e-5)
  assert_trees_close(grads_2, grads_1)


def test_example_mean_jit_equals_eager_and_drops_zero_weights():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(4))
  weights = jnp.array([1.0, 0.0, 1.0, 1.0])
  loss_fn = functools.partial(dpo_loss, beta=0.1)
  eager = example_mean(loss_fn, weights, pc, pr, rc, rr)
  jitted = jax.jit(lambda *a: example_mean(loss_fn, weights, *a))(pc, pr, rc, rr)
  keep = np.array([0, 2, 3])
  direct = loss_fn(pc[keep], pr[keep], rc[keep], rr[keep])
  assert_trees_close(eager, direct, atol=1e-6)
  assert_trees_close(jitted, eager, atol=1e-6)


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
