"""MeshConfig / make_mesh (Auto axes) / use_mesh / constrain on 8 emulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.mesh import MeshConfig, constrain, make_mesh, use_mesh
from rljax.parallel.rules import FSDP_TP_RULES, current_rules, logical_axis_rules

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize(
  "config, shape",
  [
    (MeshConfig(), (8, 1, 1)),
    (MeshConfig(data=1, fsdp=-1), (1, 8, 1)),
    (MeshConfig(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
    (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    (MeshConfig(data=2, fsdp=4, tensor=1), (2, 4, 1)),
  ],
)
def test_mesh_config_fills_the_remaining_devices(config, shape):
  assert config.shape(8) == shape
  mesh = make_mesh(config)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_jax_make_mesh_default_is_explicit_and_ours_is_auto():
  # The reason make_mesh passes axis_types: JAX's default would make constraints assertions.
  assert jax.make_mesh((8,), ("x",)).axis_types == (AxisType.Explicit,)
  assert make_mesh().axis_types == (AxisType.Auto,) * 3


def test_make_mesh_on_a_subset_of_devices():
  devices = jax.devices()[4:]
  mesh = make_mesh(MeshConfig(data=-1, tensor=2), devices=devices)
  assert tuple(mesh.shape.values()) == (2, 1, 2)
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.parametrize(
  "config, match",
  [
    (MeshConfig(data=2, fsdp=2, tensor=1), r"data=2, fsdp=2, tensor=1\) multiplies to 4 .* 8"),
    (MeshConfig(data=-1, fsdp=3), r"fixed axes multiply to 3, which does not divide the 8"),
    (MeshConfig(data=1, fsdp=16), r"multiplies to 16 devices but there are 8"),
  ],
)
def test_mesh_config_that_does_not_fit_the_devices(config, match):
  with pytest.raises(ValueError, match=match):
    make_mesh(config)


def test_mesh_config_bad_sizes():
  with pytest.raises(ValueError, match=r"at most one MeshConfig axis may be -1.*'data', 'fsdp'"):
    MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="MeshConfig.tensor must be a positive int or -1"):
    MeshConfig(tensor=0)
  with pytest.raises(ValueError, match="MeshConfig.fsdp must be a positive int or -1"):
    MeshConfig(fsdp=2.0)


def test_use_mesh_sets_mesh_and_rules_and_restores():
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2))
  before = current_rules()
  with use_mesh(mesh, "fsdp_tp"):
    assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
    assert current_rules() == FSDP_TP_RULES
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  assert current_rules() == before and jax.sharding.get_abstract_mesh().empty
  gate = model.layers.gate_proj[...]
  assert gate.sharding.spec == P(None, "fsdp", "tensor")
  assert {s.data.shape for s in gate.addressable_shards} == {(2, 8, 32)}  # really split


@pytest.mark.parametrize(
  "rules, axes, expected",
  [
    ("data", ("batch", "sequence", "act_embed"), P(("data", "fsdp"), None, None)),
    ("fsdp", ("batch", "sequence", "act_embed"), P(("data", "fsdp"), None, None)),
    ("fsdp_tp", ("batch", "sequence", "act_mlp"), P(("data", "fsdp"), None, "tensor")),
    ("fsdp_tp", (None, "act_vocab", None), P(None, "tensor", None)),
  ],
)
def test_constrain_under_jit_sets_the_sharding(rules, axes, expected):
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)  # unsharded input

  def f(x):
    y = constrain(jnp.sin(x), axes)
    return y * 2.0  # the constraint propagates to what follows

  with use_mesh(mesh, rules):
    lowered = jax.jit(f).lower(x)
    out = jax.jit(f)(x)
  assert "sharding_constraint" in lowered.as_text()
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, expected), out.ndim)
  np.testing.assert_allclose(out, 2.0 * np.sin(np.asarray(x)), rtol=1e-6)


def test_constrain_on_a_model_activation():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  ids = jnp.zeros((8, 4), jnp.int32)
  with use_mesh(mesh, "fsdp"):
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def hidden(state, ids):
      h = nnx.merge(graphdef, state).hidden_states(ids)
      return constrain(h, ("batch", "sequence", "act_embed"))

    out = hidden(state, ids)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
  assert {s.data.shape for s in out.addressable_shards} == {(1, 4, 32)}


def test_the_model_constrains_its_activations():
  """Under use_mesh the model pins hidden states, q/k/v and the MLP layer by their logical axes;
  the output is then batch-sharded without any constraint of the caller's."""
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  ids = jnp.zeros((8, 4), jnp.int32)
  with use_mesh(mesh, "fsdp_tp"):
    graphdef, state = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    hidden = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_states(ids))
    text = hidden.lower(state, ids).as_text()
    out = hidden(state, ids)
  # embedding + one per layer (scanned: once) + q, k, v + the MLP layer
  assert text.count("sharding_constraint") >= 6, text.count("sharding_constraint")
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
  unconstrained = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_states(ids))
  np.testing.assert_allclose(unconstrained(state, ids), out, rtol=1e-5, atol=1e-5)


def test_constrain_leaves_an_indivisible_dimension_unsplit():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  with use_mesh(mesh, "fsdp"):
    out = jax.jit(lambda v: constrain(v * 1.0, ("batch", None)))(jnp.ones((6, 3)))  # 6 % 8
    even = jax.jit(lambda v: constrain(v * 1.0, ("batch", None)))(jnp.ones((8, 3)))
  assert out.sharding.is_fully_replicated
  np.testing.assert_array_equal(out, np.ones((6, 3)))
  assert even.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)


def test_constrain_is_a_noop_without_mesh_or_rules():
  x = jnp.ones((4, 3))
  assert constrain(x, ("batch", "act_embed")) is x
  with logical_axis_rules("fsdp"):  # rules but no mesh
    assert constrain(x, ("batch", "act_embed")) is x
  with jax.set_mesh(make_mesh()):  # mesh but no rules
    assert constrain(x, ("batch", "act_embed")) is x
    assert jax.jit(lambda v: constrain(v, ("batch", None)))(x).shape == (4, 3)


def test_constrain_on_an_explicit_mesh_reshards():
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Explicit,) * 3)
  with jax.set_mesh(mesh), logical_axis_rules("fsdp"):
    out = jax.jit(lambda v: constrain(v * 1.0, ("batch", None)))(jnp.ones((8, 3)))
  assert out.sharding.spec == P(("data", "fsdp"), None)


def test_constrain_rank_mismatch():
  with pytest.raises(ValueError, match=r"logical_axes \('batch',\) has 1 names but x has shape"):
    constrain(jnp.ones((4, 3)), ("batch",))
