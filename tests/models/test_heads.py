"""Value and reward heads: shapes, last-valid-token reads, copies from a policy, gradients, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from rljax.models.config import ModelConfig
from rljax.models.heads import RewardModel, ValueModel, last_valid_index
from rljax.models.transformer import Transformer
from rljax.parallel.rules import MESH_AXES, mesh_and_rules, named_shardings

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
B, T = 3, 7


@pytest.fixture(scope="module")
def policy():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def critic(policy):
  return ValueModel.from_policy(policy, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def rm(policy):
  return RewardModel.from_policy(policy, rngs=nnx.Rngs(2))


@nnx.jit
def _call(m, ids, mask):
  return m(ids, mask)


@nnx.jit
def _hidden(m, ids, mask):
  return m.hidden_states(ids, mask)


def _ids(seed=0, shape=(B, T)):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 1, CONFIG.vocab_size))


def _np_last_valid(mask):
  out = []
  for row in np.asarray(mask):
    valid = [t for t in range(len(row)) if row[t]]
    out.append(valid[-1] if valid else len(row) - 1)
  return np.array(out)


def test_value_model_is_hidden_states_dot_head(critic, policy):
  ids, mask = _ids(), np.ones((B, T), np.int32)
  mask[0, :2] = 0  # left padding
  with jax.default_matmul_precision("highest"):
    values = _call(critic, ids, mask)
    hidden = np.asarray(_hidden(policy, ids, mask), np.float64)
  assert values.shape == (B, T) and values.dtype == jnp.float32
  w = np.asarray(critic.head_weight[...], np.float64)
  expected = hidden @ w + float(critic.head_bias[...])
  np.testing.assert_allclose(values, expected, atol=1e-5, rtol=1e-5)
  assert np.abs(expected).max() > 1e-2  # the head is not trivially zero


def test_backbone_has_no_lm_head_and_config_is_the_policy_config(critic):
  assert critic.config == CONFIG
  assert not hasattr(critic.backbone, "lm_head")
  assert critic.head_weight.get_metadata()["out_sharding"] == ("embed",)
  assert critic.head_bias.get_metadata()["out_sharding"] == ()
  std = np.asarray(critic.head_weight[...]).std()
  assert 0.3 / np.sqrt(33) < std < 3 / np.sqrt(33)  # default N(0, 1/(D+1))


def test_from_policy_copies_backbone_exactly(policy, critic, rm):
  for model in (critic, rm):
    for name in ("embed", "final_norm"):
      a, b = getattr(policy, name)[...], getattr(model.backbone, name)[...]
      assert a is not b and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    for name in policy.layers.names:
      a, b = getattr(policy.layers, name)[...], getattr(model.backbone.layers, name)[...]
      assert a is not b and np.asarray(a).tobytes() == np.asarray(b).tobytes(), name


def test_reward_is_read_at_last_valid_token_left_or_right_padded(rm, policy):
  seq, pad = _ids(4, (4,)), 0
  ids = np.array([[*seq, pad, pad, pad], [pad, pad, pad, *seq], [pad, *seq, pad, pad]])
  mask = np.array([[1] * 4 + [0] * 3, [0] * 3 + [1] * 4, [0] + [1] * 4 + [0] * 2])
  with jax.default_matmul_precision("highest"):
    # Reference: the (causal) hidden state of the 4th token of the right-padded row.
    hidden = np.asarray(_hidden(policy, ids, mask), np.float64)[0, 3]
    expected = hidden @ np.asarray(rm.head_weight[...], np.float64) + float(rm.head_bias[...])
    got = _call(rm, ids, mask)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, [expected] * B, atol=1e-5, rtol=1e-5)
    # Pad tokens' ids do not matter.
    np.testing.assert_allclose(_call(rm, np.where(mask == 1, ids, 9), mask), got, atol=1e-6)


def test_reward_batch_rows_are_independent(rm):
  ids = _ids(5)
  mask = np.array([[1] * 7, [1] * 3 + [0] * 4, [0] * 5 + [1] * 2])
  got = np.asarray(_call(rm, ids, mask))
  order = [2, 0, 1]
  np.testing.assert_allclose(_call(rm, ids[order], mask[order]), got[order], atol=1e-5)
  changed = ids.copy()
  changed[1] = (changed[1] + 1) % CONFIG.vocab_size
  other = np.asarray(_call(rm, changed, mask))
  np.testing.assert_array_equal(other[[0, 2]], got[[0, 2]])
  assert other[1] != got[1]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B))
def test_last_valid_index_matches_numpy(rows):
  mask = np.array(rows)
  np.testing.assert_array_equal(last_valid_index(jnp.asarray(mask)), _np_last_valid(mask))


def test_all_padding_row_is_finite(rm, critic):
  mask = np.zeros((B, T), np.int32)
  mask[1] = 1
  assert np.isfinite(np.asarray(_call(rm, _ids(), mask))).all()
  assert np.isfinite(np.asarray(_call(critic, _ids(), mask))).all()
  assert int(last_valid_index(jnp.asarray(mask))[0]) == T - 1


def test_gradients_reach_head_and_backbone(policy):
  critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(7))
  rm = RewardModel.from_policy(policy, rngs=nnx.Rngs(8))
  ids = _ids(6)
  mask = np.ones((B, T), np.int32)
  mask[2, 5:] = 0

  def loss(critic, rm):
    return jnp.mean(critic(ids, mask)) + jnp.mean(rm(ids, mask))

  grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(critic, rm)
  hidden = np.asarray(_hidden(policy, ids, mask), np.float64)
  read = {"critic": hidden.reshape(-1, CONFIG.hidden_size), "rm": hidden[np.arange(B), _np_last_valid(mask)]}
  for name, g in zip(("critic", "rm"), grads):
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}
    assert all(np.isfinite(x).all() for x in flat.values())
    assert np.abs(flat[("backbone", "layers", "q_proj")]).max() > 0, name
    # d mean(out) / d c = 1 and d / d w = the mean of the hidden states that were read.
    np.testing.assert_allclose(flat[("head_bias",)], 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat[("head_weight",)], read[name].mean(0), atol=1e-5, rtol=1e-4)


def test_jit_matches_eager(rm):
  # The reward model runs every step of the value model (backbone, head) plus the gather.
  ids = _ids(9)
  mask = np.ones((B, T), np.int32)
  mask[0, :3] = 0
  np.testing.assert_allclose(_call(rm, ids, mask), rm(ids, mask), atol=1e-5, rtol=1e-5)


def test_zero_head_bfloat16_and_bad_std():
  config = CONFIG.replace(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  zero = RewardModel(config, rngs=nnx.Rngs(0), head_std=0.0)
  assert zero.head_weight[...].dtype == jnp.bfloat16
  rewards = _call(zero, _ids(), np.ones((B, T), np.int32))
  assert rewards.dtype == jnp.float32 and rewards.shape == (B,) and not np.asarray(rewards).any()
  with pytest.raises(ValueError, match="head_std"):
    ValueModel(CONFIG, rngs=nnx.Rngs(0), head_std=-1.0)


def test_sharded_construction_and_from_sharded_policy():
  mesh = jax.make_mesh((1, 8, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with mesh_and_rules(mesh, "fsdp"):
    policy = Transformer(CONFIG, rngs=nnx.Rngs(0))
    critic = ValueModel(CONFIG, rngs=nnx.Rngs(1))
  assert critic.head_weight[...].sharding.spec == P("fsdp")
  assert {s.data.shape for s in critic.head_weight[...].addressable_shards} == {(4,)}
  assert critic.backbone.layers.q_proj[...].sharding.spec == P(None, "fsdp", None, None)
  rm = RewardModel.from_policy(policy, rngs=nnx.Rngs(2))  # outside the mesh context
  q, q_rm = policy.layers.q_proj[...], rm.backbone.layers.q_proj[...]
  assert q_rm.sharding == q.sharding and np.asarray(q_rm).tobytes() == np.asarray(q).tobytes()
  # The head's logical axes give a train state its shardings.
  shardings = named_shardings(nnx.state(critic), mesh, "fsdp")
  assert shardings["head_weight"].get_value().spec == P("fsdp")
  assert shardings["head_bias"].get_value().spec == P()


def test_from_policy_accepts_host_parameters(policy):
  """A policy whose parameters are numpy arrays (e.g. assembled on the host) is copied too."""
  graphdef, state = nnx.split(policy)
  host = nnx.merge(graphdef, jax.tree.map(np.asarray, state))
  critic = ValueModel.from_policy(host, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(critic.backbone.embed[...], np.asarray(policy.embed[...]))
