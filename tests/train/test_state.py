"""Train state: created directly sharded (params AND optimizer moments split), dtypes, shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.rules import MESH_AXES
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import (
  TrainState,
  abstract_train_state,
  create_train_state,
  state_shardings,
)

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
OPTIMIZER = make_optimizer(OptimizerConfig(1e-3, weight_decay=0.1))


def _mesh(shape):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _build():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sharded():
  mesh = _mesh((1, 4, 2))
  graphdef, state = create_train_state(_build, OPTIMIZER, rng=1, mesh=mesh, rules="fsdp_tp",
                                       extras={"data_position": jnp.zeros((), jnp.int32)})
  return mesh, graphdef, state


def test_params_are_created_split_across_devices(sharded):
  mesh, _, state = sharded
  q = state.params["layers"]["q_proj"][...]  # [L, D, H, Dh] = [2, 32, 4, 8]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8
  assert {s.data.shape for s in q.addressable_shards} == {(2, 8, 2, 8)}
  embed = state.params["embed"][...]  # [V, D] = [64, 32]: vocab over tensor, embed over fsdp
  assert embed.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in embed.addressable_shards} == {(32, 8)}
  norm = state.params["layers"]["attn_norm"][...]
  assert norm.sharding.is_fully_replicated
  assert state.step.sharding.is_fully_replicated and state.rng.sharding.is_fully_replicated
  assert state.extras["data_position"].sharding.is_fully_replicated


def test_optimizer_moments_are_sharded_like_their_params(sharded):
  _, _, state = sharded
  for moment in ("mu", "nu"):
    tree = optax.tree_utils.tree_get(state.opt_state, moment)
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(tree),
                            jax.tree.leaves(state.params)):
      assert m.sharding == p.sharding, path
      assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape
  q_mu = optax.tree_utils.tree_get(state.opt_state, "mu")["layers"]["q_proj"][...]
  assert {s.data.shape for s in q_mu.addressable_shards} == {(2, 8, 2, 8)}


def test_sharded_state_equals_unsharded_and_state_shardings_match(sharded):
  mesh, graphdef, state = sharded
  _, plain = create_train_state(_build, OPTIMIZER, rng=1,
                                extras={"data_position": jnp.zeros((), jnp.int32)})
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(plain.rng))
  assert int(state.step) == 0 and int(state.skipped_steps) == 0
  shardings = state_shardings(graphdef, jax.eval_shape(lambda: state), mesh, "fsdp_tp")
  assert isinstance(shardings, TrainState)
  for declared, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)):
    assert leaf.sharding.is_equivalent_to(declared, leaf.ndim)


def test_from_a_module_with_fp32_master_weights():
  model = Transformer(CONFIG.replace(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
                      rngs=nnx.Rngs(0))
  graphdef, state = create_train_state(model, OPTIMIZER, rng=jax.random.key(3),
                                       param_dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, "mu"))} \
    == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(state.params["embed"][...],
                                model.embed[...].astype(jnp.float32))
  rebuilt = state.model(graphdef)
  assert isinstance(rebuilt, Transformer) and rebuilt.embed[...].dtype == jnp.float32
  assert state.extras == {} and state.frozen == nnx.State({})


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="rules"):
    create_train_state(_build, OPTIMIZER, rng=0, mesh=_mesh((8, 1, 1)))
  with pytest.raises(ValueError, match="model"):
    create_train_state(42, OPTIMIZER, rng=0)


def test_abstract_train_state_matches_the_created_state(sharded):
  """The restore target: same structure, shapes, dtypes and shardings, nothing allocated."""
  mesh, _, state = sharded
  _, target = abstract_train_state(_build, OPTIMIZER, rng=1, mesh=mesh, rules="fsdp_tp",
                                   extras={"data_position": jnp.zeros((), jnp.int32)})
  real, abstract = jax.tree.leaves(state), jax.tree.leaves(target)
  assert len(real) == len(abstract)
  for x, a in zip(real, abstract):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (x.shape, x.dtype) == (a.shape, a.dtype)
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim)
