"""Preference objectives (KTO, ORPO, SimPO, CPO) and reference log-probs against numpy, exact
microbatch accumulation, bad inputs, and short runs: DPO raises the held-out implicit reward
accuracy; one KTO / SimPO step lowers its loss."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.train.objectives import dpo_objective
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.preference import (
  add_reference_logps,
  cpo_objective,
  example_count,
  kto_objective,
  orpo_objective,
  pair_count,
  precompute_reference_logps,
  reference_logps,
  simpo_objective,
)
from rljax.train.state import create_train_state
from rljax.train.step import make_grad_fn, make_train_step

CONFIG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time
PROMPT, RESPONSE = 3, 5
T = PROMPT + RESPONSE
B = 16
PREFERRED = 5  # the synthetic preference: responses containing token 5 are better
CHUNK = 8


def responses(rng, n, *, with_preferred):
  """Response token lists of lengths 3..5 over the vocabulary without 0 (pad) and 5."""
  others = [t for t in range(1, CONFIG.vocab_size) if t != PREFERRED]
  out = []
  for length in rng.integers(3, RESPONSE + 1, n):
    response = rng.choice(others, length)
    if with_preferred[len(out)] if np.ndim(with_preferred) else with_preferred:
      response[rng.integers(length)] = PREFERRED
    out.append(response)
  return out


def rows(prompts, completions, prefix=""):
  """Right-padded prompt + completion rows with the loss mask on the completion tokens."""
  n = len(prompts)
  ids, attention, loss = (np.zeros((n, T), np.int32) for _ in range(3))
  for b, (prompt, completion) in enumerate(zip(prompts, completions)):
    end = PROMPT + len(completion)
    ids[b, :PROMPT], ids[b, PROMPT:end] = prompt, completion
    attention[b, :end], loss[b, PROMPT:end] = 1, 1
  return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention,
          f"{prefix}loss_mask": loss}


def pair_batch(seed, n=B):
  rng = np.random.default_rng(seed)
  prompts = rng.integers(6, CONFIG.vocab_size, (n, PROMPT))
  return {**rows(prompts, responses(rng, n, with_preferred=True), "chosen_"),
          **rows(prompts, responses(rng, n, with_preferred=False), "rejected_")}


def kto_batch(seed, n=B):
  """Unpaired completions labelled desirable iff they contain token 5, and TRL's KL rows:
  prompt i with the completion of example i + 1."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(6, CONFIG.vocab_size, (n, PROMPT))
  label = rng.random(n) < 0.5
  completions = responses(rng, n, with_preferred=label)
  mismatched = completions[1:] + completions[:1]
  return {**rows(prompts, completions), **rows(prompts, mismatched, "kl_"), "label": label}


@pytest.fixture(scope="module")
def parts():
  return nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)


@functools.lru_cache(maxsize=None)
def _logits(graphdef):
  return jax.jit(lambda p, f, ids, mask: nnx.merge(graphdef, p, f)(ids, mask),
                 compiler_options=FAST_COMPILE)


def numpy_sequence_logps(parts, batch, prefix=""):
  """(sums, means) over the loss tokens of float64 log-softmax log-probs of full logits."""
  graphdef, params, frozen = parts
  ids = batch[f"{prefix}input_ids"]
  logits = np.asarray(_logits(graphdef)(params, frozen, ids, batch[f"{prefix}attention_mask"]),
                      np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  token = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
  mask = batch[f"{prefix}loss_mask"][:, 1:]
  sums = (token * mask).sum(-1)
  return sums, sums / np.maximum(mask.sum(-1), 1)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------------
# Reference log-probs.
# ------------------------------------------------------------------------------------------------


def test_reference_logps_match_numpy_for_pairs_kto_and_kl_rows(parts):
  graphdef, params, frozen = parts
  batch = {**pair_batch(0), **kto_batch(1)}
  refs = reference_logps(graphdef, (params, frozen), batch, chunk_size=CHUNK)
  assert set(refs) == {"ref_chosen", "ref_rejected", "ref_logps", "ref_kl_logps"}
  for name, prefix in (("ref_chosen", "chosen_"), ("ref_rejected", "rejected_"),
                       ("ref_logps", ""), ("ref_kl_logps", "kl_")):
    want, _ = numpy_sequence_logps(parts, batch, prefix)
    np.testing.assert_allclose(refs[name], want, rtol=1e-5, atol=1e-5)
    assert refs[name].dtype == np.float32 and refs[name].shape == (B,)
  # For a dataset: host arrays added to copies of the batches, same values.
  other = {**pair_batch(2), **kto_batch(3)}
  dataset = precompute_reference_logps((graphdef, params, frozen), [batch, other],
                                       chunk_size=CHUNK)
  assert isinstance(dataset[0]["ref_chosen"], np.ndarray) and "ref_chosen" not in batch
  np.testing.assert_allclose(dataset[0]["ref_chosen"], refs["ref_chosen"], rtol=1e-6)
  np.testing.assert_allclose(dataset[1]["ref_rejected"],
                             numpy_sequence_logps(parts, other, "rejected_")[0], rtol=1e-5,
                             atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Objectives against numpy.
# ------------------------------------------------------------------------------------------------

KTO = dict(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
ORPO = dict(beta=0.25)
SIMPO = dict(beta=2.5, gamma=0.3)
CPO = dict(beta=0.2, alpha=0.5)


@functools.lru_cache(maxsize=None)
def all_objectives(graphdef):
  """One jit evaluating every objective (one compile for the whole comparison)."""

  def run(params, frozen, pairs, kto):
    model = nnx.merge(graphdef, params, frozen)
    no_kl = {k: v for k, v in kto.items() if not k.startswith(("kl_", "ref_kl"))}
    return {
      "kto": kto_objective(model, kto, chunk_size=CHUNK, **KTO),
      "kto_no_kl": kto_objective(model, no_kl, chunk_size=CHUNK, **KTO),
      "orpo": orpo_objective(model, pairs, chunk_size=CHUNK, **ORPO),
      "simpo": simpo_objective(model, pairs, chunk_size=CHUNK, **SIMPO),
      "cpo": cpo_objective(model, pairs, chunk_size=CHUNK, normalizer=2.0 * B, **CPO),
    }

  return jax.jit(run, compiler_options=FAST_COMPILE)


def numpy_kto(policy, ref, label, z, *, beta, desirable_weight, undesirable_weight):
  losses = []
  for logp, ref_logp, good in zip(policy, ref, label):
    r = logp - ref_logp
    if good:
      losses.append(desirable_weight * (1.0 - sigmoid(beta * (r - z))))
    else:
      losses.append(undesirable_weight * (1.0 - sigmoid(beta * (z - r))))
  return np.mean(losses)


def test_objectives_match_numpy(parts):
  rng = np.random.default_rng(7)
  pairs, kto = pair_batch(4), kto_batch(5)
  policy, _ = numpy_sequence_logps(parts, kto)
  policy_kl, _ = numpy_sequence_logps(parts, kto, "kl_")
  kto["ref_logps"] = (policy + rng.normal(size=B)).astype(np.float32)
  kto["ref_kl_logps"] = (policy_kl - 0.5 + 0.1 * rng.normal(size=B)).astype(np.float32)
  out = jax.device_get(all_objectives(parts[0])(parts[1], parts[2], pairs, kto))

  z = max(np.mean(policy_kl - kto["ref_kl_logps"]), 0.0)
  assert z > 0.3  # the reference point matters in this check
  loss, metrics = out["kto"]
  np.testing.assert_allclose(loss, numpy_kto(policy, kto["ref_logps"], kto["label"], z, **KTO),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], z, rtol=1e-4)
  r = policy - kto["ref_logps"]
  np.testing.assert_allclose(metrics["reward_accuracy"],
                             np.mean(np.where(kto["label"], r > z, r < z)))
  np.testing.assert_allclose(
    out["kto_no_kl"][0], numpy_kto(policy, kto["ref_logps"], kto["label"], 0.0, **KTO), rtol=1e-5)

  c_sum, c_avg = numpy_sequence_logps(parts, pairs, "chosen_")
  r_sum, r_avg = numpy_sequence_logps(parts, pairs, "rejected_")
  log_odds = (c_avg - r_avg) - (np.log(-np.expm1(c_avg)) - np.log(-np.expm1(r_avg)))
  want_orpo = np.mean(-c_avg) - ORPO["beta"] * np.mean(log_sigmoid(log_odds))
  np.testing.assert_allclose(out["orpo"][0], want_orpo, rtol=1e-5)
  np.testing.assert_allclose(out["orpo"][1]["nll"], np.mean(-c_avg), rtol=1e-5)
  want_simpo = np.mean(-log_sigmoid(SIMPO["beta"] * (c_avg - r_avg) - SIMPO["gamma"]))
  np.testing.assert_allclose(out["simpo"][0], want_simpo, rtol=1e-5)
  np.testing.assert_allclose(out["simpo"][1]["reward_accuracy"], np.mean(c_avg > r_avg))
  want_cpo = (np.mean(-log_sigmoid(CPO["beta"] * (c_sum - r_sum)))
              + CPO["alpha"] * np.mean(-c_avg))
  np.testing.assert_allclose(out["cpo"][0], want_cpo / 2, rtol=1e-5)  # normalizer 2B: Σ / 2B
  np.testing.assert_allclose(out["cpo"][1]["reward_margin"],
                             CPO["beta"] * np.mean(c_sum - r_sum), rtol=1e-4)


def test_orpo_microbatch_accumulation_is_exact_and_empty_rows_are_finite(parts):
  graphdef, params, frozen = parts
  batch = pair_batch(6)
  batch["chosen_loss_mask"][3] = 0  # an empty response: avg log-prob 0, finite by log1mexp
  lengths = batch["chosen_loss_mask"].sum(-1)
  assert len({int(lengths[i::2].sum()) for i in range(2)}) == 2  # microbatch token counts differ
  loss_fn = functools.partial(orpo_objective, chunk_size=CHUNK)
  results = {k: jax.jit(make_grad_fn(loss_fn, graphdef, count_fn=pair_count, num_microbatches=k),
                        compiler_options=FAST_COMPILE)(params, frozen, batch) for k in (1, 2)}
  (loss1, grads1, _), (loss2, grads2, _) = results[1], results[2]
  assert np.isfinite(float(loss1))
  np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads1)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1)) > 0


def test_bad_inputs_name_the_keys(parts):
  graphdef, params, frozen = parts
  model = nnx.merge(graphdef, params, frozen)
  with pytest.raises(ValueError, match="chosen_input_ids"):
    reference_logps(graphdef, (params, frozen), {"label": np.ones(2, bool)})
  kto = kto_batch(0, n=2)
  with pytest.raises(ValueError, match="ref_logps"):
    kto_objective(model, kto)
  with pytest.raises(ValueError, match="ref_kl_logps"):
    kto_objective(model, dict(kto, ref_logps=np.zeros(2, np.float32)))
  pairs = pair_batch(0, n=2)
  with pytest.raises(ValueError, match="rejected_loss_mask"):
    simpo_objective(model, {k: v for k, v in pairs.items() if k != "rejected_loss_mask"})
  with pytest.raises(ValueError, match="chosen_loss_mask"):
    orpo_objective(model, dict(pairs, chosen_loss_mask=pairs["chosen_loss_mask"][:, 1:]))
  with pytest.raises(ValueError, match="model"):
    precompute_reference_logps(model.embed, [pairs])


# ------------------------------------------------------------------------------------------------
# Learning.
# ------------------------------------------------------------------------------------------------


def test_dpo_raises_held_out_implicit_reward_accuracy_and_margin():
  """Chosen responses contain token 5; reference log-probs precomputed once for the dataset."""
  optimizer = make_optimizer(OptimizerConfig(1e-3))
  policy = Transformer(CONFIG, rngs=nnx.Rngs(1))
  reference = nnx.split(policy)
  graphdef, state = create_train_state(policy, optimizer, rng=0)
  loss_fn = functools.partial(dpo_objective, beta=0.1, chunk_size=CHUNK)
  step = make_train_step(loss_fn, graphdef, optimizer, count_fn=pair_count,
                         compiler_options=FAST_COMPILE)
  evaluate = jax.jit(lambda p, f, b: loss_fn(nnx.merge(graphdef, p, f), b)[1],
                     compiler_options=FAST_COMPILE)
  train = precompute_reference_logps(reference, [pair_batch(i) for i in range(4)],
                                     chunk_size=CHUNK)
  [held_out] = precompute_reference_logps(reference, [pair_batch(1000)], chunk_size=CHUNK)
  before = evaluate(state.params, state.frozen, held_out)
  for i in range(15):
    state, metrics = step(state, train[i % 4])
  after = evaluate(state.params, state.frozen, held_out)
  # policy == reference at the start: rewards ~0 (up to float noise), so accuracy ~0 (ties).
  assert abs(float(before["reward_margin"])) < 1e-3
  assert float(after["reward_accuracy"]) > 0.8, (before, after)
  assert float(after["reward_margin"]) > 0.02
  assert float(after["rewards_rejected"]) < 0 and int(state.skipped_steps) == 0


@pytest.mark.parametrize("name", ["kto", "simpo"])
def test_one_step_lowers_the_loss(name):
  optimizer = make_optimizer(OptimizerConfig(1e-3))
  policy = Transformer(CONFIG, rngs=nnx.Rngs(2))
  ref_graphdef, ref_state = nnx.split(policy)
  graphdef, state = create_train_state(policy, optimizer, rng=0)
  if name == "kto":
    loss_fn, count_fn = functools.partial(kto_objective, chunk_size=CHUNK), example_count
    batch = add_reference_logps(ref_graphdef, ref_state, kto_batch(8), chunk_size=CHUNK)
  else:
    loss_fn, count_fn = functools.partial(simpo_objective, chunk_size=CHUNK), pair_count
    batch = pair_batch(8)
  step = make_train_step(loss_fn, graphdef, optimizer, count_fn=count_fn,
                         compiler_options=FAST_COMPILE)
  state, first = step(state, batch)
  state, second = step(state, batch)  # its loss is that of the updated parameters
  assert float(second["loss"]) < float(first["loss"]), (first["loss"], second["loss"])
  assert int(state.skipped_steps) == 0
