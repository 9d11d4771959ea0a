"""Optimizer factory: schedules vs a numpy transcription, decay mask by path, clipping, trainable filter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.train.objectives import sft_loss, sft_token_count
from rljax.train.optim import (
  OptimizerConfig,
  current_learning_rate,
  decay_mask,
  make_optimizer,
  make_schedule,
  path_names,
)
from rljax.train.state import create_train_state, trainable_paths
from rljax.train.step import make_train_step


def numpy_schedule(n, *, lr, warmup, kind, total, floor):
  """Reference: linear warmup from 0, then constant / linear / cosine decay to lr * floor."""
  if warmup > 0 and n < warmup:
    return lr * n / warmup
  if kind == "constant":
    return lr
  progress = min(max((n - warmup) / (total - warmup), 0.0), 1.0)
  if kind == "linear":
    shape = 1.0 - progress
  else:
    shape = 0.5 * (1.0 + math.cos(math.pi * progress))
  return lr * (floor + (1.0 - floor) * shape)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, floor", [(0, 0.0), (5, 0.0), (5, 0.1)])
def test_schedule_matches_numpy_transcription(kind, warmup, floor):
  config = OptimizerConfig(3e-4, warmup_steps=warmup, schedule=kind, total_steps=20,
                           min_lr_ratio=floor)
  schedule = jax.jit(make_schedule(config))
  counts = np.arange(0, 26)
  got = np.array([float(schedule(n)) for n in counts])
  want = [numpy_schedule(int(n), lr=3e-4, warmup=warmup, kind=kind, total=20, floor=floor)
          for n in counts]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=3e-4 * 1e-6)
  if warmup:
    assert got[0] == 0.0 and got[warmup] == pytest.approx(3e-4)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 200))
def test_cosine_schedule_is_bounded_and_monotone_after_warmup(n):
  config = OptimizerConfig(1.0, warmup_steps=10, schedule="cosine", total_steps=100,
                           min_lr_ratio=0.1)
  schedule = make_schedule(config)
  lr, nxt = float(schedule(n)), float(schedule(n + 1))
  assert 0.0 <= lr <= 1.0 + 1e-6
  if n >= 10:
    assert 0.1 - 1e-6 <= lr and nxt <= lr + 1e-6


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"schedule": "exp"}, "schedule"),
    ({"schedule": "cosine"}, "total_steps"),
    ({"schedule": "linear", "total_steps": 5, "warmup_steps": 5}, "total_steps"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"weight_decay": -0.1}, "weight_decay"),
  ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    OptimizerConfig(1e-3, **kwargs)
  with pytest.raises(ValueError, match="learning_rate"):
    OptimizerConfig(0.0)


def test_decay_mask_by_path_on_the_stacked_transformer():
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, attention_bias=True, qk_norm=True)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
  mask = decay_mask(params)
  flat = {"/".join(path_names(p)): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  shapes = {"/".join(path_names(p)): v.shape
            for p, v in jax.tree_util.tree_leaves_with_path(params)}
  assert shapes["layers/attn_norm"] == (2, 32)  # stacked norms are 2-D: ndim alone is wrong
  no_decay = {"final_norm", "layers/attn_norm", "layers/mlp_norm", "layers/q_norm",
              "layers/k_norm", "layers/q_bias", "layers/k_bias", "layers/v_bias"}
  assert {k for k, v in flat.items() if not v} == no_decay
  assert flat["layers/q_proj"] and flat["embed"] and flat["lm_head"] and flat["layers/down_proj"]


def test_weight_decay_skips_norms_and_biases():
  params = {"w": jnp.full((2, 3), 2.0), "final_norm": jnp.full((3,), 2.0),
            "layers": {"attn_norm": jnp.full((2, 3), 2.0), "q_bias": jnp.full((2, 3), 2.0)}}
  optimizer = make_optimizer(OptimizerConfig(0.1, weight_decay=0.5, max_grad_norm=None))
  state = optimizer.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)  # AdamW: p − η·λ·p
  for leaf in (new["final_norm"], new["layers"]["attn_norm"], new["layers"]["q_bias"]):
    np.testing.assert_array_equal(leaf, 2.0)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_global_norm_clipping_precedes_adam(max_grad_norm):
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  grads = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.full((2, 2), 6.0)}  # global norm 13
  optimizer = make_optimizer(OptimizerConfig(1e-3, max_grad_norm=max_grad_norm))
  _, state = optimizer.update(grads, optimizer.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")
  scale = 1.0 / 13.0 if max_grad_norm else 1.0
  for name in ("a", "b"):  # first Adam moment after one update: (1 − b1) · g_clipped
    np.testing.assert_allclose(mu[name], 0.1 * scale * np.asarray(grads[name]), rtol=1e-6)
  assert float(current_learning_rate(state)) == pytest.approx(1e-3)


def test_trainable_filter_leaves_frozen_params_bit_identical_and_stateless():
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2)
  optimizer = make_optimizer(OptimizerConfig(1e-2, weight_decay=0.1))
  head = trainable_paths(lambda path: path.startswith(("lm_head", "final_norm")))
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, state = create_train_state(model, optimizer, rng=0, trainable=head)
  assert set(state.params.keys()) == {"lm_head", "final_norm"}
  assert "layers" in state.frozen and "embed" in state.frozen
  frozen_before = jax.tree.map(np.array, state.frozen)
  params_before = jax.tree.map(np.array, state.params)
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  assert set(mu.keys()) == {"lm_head", "final_norm"}  # no optimizer state for frozen params

  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, 64, (2, 6)).astype(np.int32),
           "attention_mask": np.ones((2, 6), np.int32), "loss_mask": np.ones((2, 6), np.int32)}
  step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count, donate=False,
                         compiler_options={"xla_backend_optimization_level": 0})
  new_state, metrics = step(state, batch)
  assert int(metrics["skipped"]) == 0
  for got, want in zip(jax.tree.leaves(new_state.frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(got, want)
  changed = [not np.array_equal(g, w) for g, w in
             zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params_before))]
  assert all(changed)
