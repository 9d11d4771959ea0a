"""The same SFT and DPO steps on 1 device and on 8-device meshes give the same loss and gradients.

Meshes (data, fsdp, tensor): 8×1×1 with pure data parallelism, 1×8×1 with FSDP, 1×4×2 with FSDP +
tensor parallelism, 2×2×2 with all three. Gradients (not post-Adam parameters, which amplify
rounding) must agree with the single-device ones within 1e-5. The SFT gradient on the meshes is
also accumulated over 2 microbatches, so sharding and accumulation are checked together, and the
meshed programs are traced under `use_mesh`, so the model's activation constraints are active.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.mesh import use_mesh
from rljax.parallel.rules import MESH_AXES
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.state import variable_shardings
from rljax.train.step import default_batch_sharding, make_grad_fn

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, attention_bias=True)
B, T = 16, 8  # 16 SFT rows (2 microbatches of 8 on 8 devices); 8 DPO pairs
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TOL = 1e-5


def _sft_batch():
  rng = np.random.default_rng(0)
  lengths = 1 + (np.arange(B) * 3) % (T - 1)
  return {
    "input_ids": rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32),
    "attention_mask": np.ones((B, T), np.int32),
    "loss_mask": (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int32),
  }


def _dpo_batch():
  rng = np.random.default_rng(1)
  pairs = B // 2
  out = {}
  for side in ("chosen", "rejected"):
    lengths = rng.integers(1, T, pairs)
    mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int32)
    attention = np.ones((pairs, T), np.int32)
    attention[0, :2] = 0  # a left-padded prompt
    out[f"{side}_input_ids"] = rng.integers(0, CONFIG.vocab_size, (pairs, T)).astype(np.int32)
    out[f"{side}_attention_mask"] = attention
    out[f"{side}_loss_mask"] = mask
    out[f"ref_{side}"] = (-4.2 * mask[:, 1:].sum(-1) + rng.normal(size=pairs)).astype(np.float32)
  return out


def _both_grads(graphdef, sft_microbatches, sft_sharding=None, dpo_sharding=None):
  """One function computing (loss, grads) of the SFT and the DPO objective: one compile."""
  sft_grad = make_grad_fn(functools.partial(sft_loss, chunk_size=8), graphdef,
                          count_fn=sft_token_count, num_microbatches=sft_microbatches,
                          batch_sharding=sft_sharding)
  dpo_grad = make_grad_fn(functools.partial(dpo_objective, beta=0.1, chunk_size=8), graphdef,
                          count_fn=pair_count, batch_sharding=dpo_sharding)

  def both(params, frozen, sft_batch, dpo_batch):
    sft_l, sft_g, _ = sft_grad(params, frozen, sft_batch)
    dpo_l, dpo_g, _ = dpo_grad(params, frozen, dpo_batch)
    return sft_l, sft_g, dpo_l, dpo_g

  return both


@pytest.fixture(scope="module")
def reference():
  graphdef, params, frozen = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)
  batches = (_sft_batch(), _dpo_batch())
  with jax.default_matmul_precision("highest"):
    out = jax.jit(_both_grads(graphdef, 1), compiler_options=FAST_COMPILE)(
      params, frozen, *batches)
  return graphdef, params, frozen, batches, out


@pytest.mark.parametrize(
  "shape, rules",
  [((8, 1, 1), "data"), ((1, 8, 1), "fsdp"), ((1, 4, 2), "fsdp_tp"), ((2, 2, 2), "fsdp_tp")],
)
def test_sft_and_dpo_loss_and_grads_equal_single_device(reference, shape, rules):
  graphdef, params, frozen, batches, (sft_l, sft_g, dpo_l, dpo_g) = reference
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  param_shardings = variable_shardings(params, mesh, rules)
  frozen_shardings = variable_shardings(frozen, mesh, rules)
  batch_sharding = default_batch_sharding(mesh)
  sharded_params = jax.device_put(params, param_shardings)
  if rules != "data":  # the parameters really are split, not replicated
    q = sharded_params["layers"]["q_proj"][...]
    assert not q.sharding.is_fully_replicated
    assert q.addressable_shards[0].data.size < q.size
  fn = jax.jit(
    _both_grads(graphdef, 2, batch_sharding, batch_sharding),
    in_shardings=(param_shardings, frozen_shardings, batch_sharding, batch_sharding),
    out_shardings=(None, param_shardings, None, param_shardings),
    compiler_options=FAST_COMPILE,
  )
  with jax.default_matmul_precision("highest"), use_mesh(mesh, rules):  # activations constrained
    got_sft_l, got_sft_g, got_dpo_l, got_dpo_g = fn(sharded_params, frozen, *batches)

  np.testing.assert_allclose(got_sft_l, sft_l, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got_dpo_l, dpo_l, rtol=TOL, atol=TOL)
  for got_tree, want_tree in ((got_sft_g, sft_g), (got_dpo_g, dpo_g)):
    for (path, got), want, declared in zip(jax.tree_util.tree_leaves_with_path(got_tree),
                                           jax.tree.leaves(want_tree),
                                           jax.tree.leaves(param_shardings)):
      assert got.sharding.is_equivalent_to(declared, got.ndim), path  # grads sharded like params
      want = np.asarray(want)
      scale = max(float(np.max(np.abs(want))), 1e-30)
      assert scale > 1e-6, path  # no trivially zero gradient
      # Within 1e-5, relative to the leaf's largest entry (DPO grads of q_proj are ~1e-4).
      np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * min(scale, 1.0),
                                 err_msg=jax.tree_util.keystr(path))
