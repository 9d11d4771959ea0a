"""Logical-axis rules: the mapping to mesh specs and NamedShardings for a model's state."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.rules import (
  MESH_AXES,
  PARAM_AXES,
  RULE_SETS,
  get_rules,
  logical_axis_rules,
  logical_partition_specs,
  logical_to_mesh_spec,
  mesh_and_rules,
  named_shardings,
  shard_state,
)

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, attention_bias=True, qk_norm=True)


def _mesh(shape, names=MESH_AXES):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@pytest.fixture(scope="module")
def abstract_state():
  return nnx.state(nnx.eval_shape(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))))


BATCH_SEQUENCE = P(("data", "fsdp"), "context")  # rows over data × fsdp, T over context


@pytest.mark.parametrize(
  "rules, expected",
  [
    ("data", {"q": P(None, None, None, None), "embed": P(None, None)}),
    ("fsdp", {"q": P(None, "fsdp", None, None), "embed": P(None, "fsdp")}),
    ("fsdp_tp", {"q": P(None, "fsdp", "tensor", None), "embed": P("tensor", "fsdp")}),
  ],
)
def test_default_rule_sets(rules, expected):
  assert logical_to_mesh_spec(("layers", "embed", "heads", "head_dim"), rules) == expected["q"]
  assert logical_to_mesh_spec(("vocab", "embed"), rules) == expected["embed"]
  assert logical_to_mesh_spec(("batch", "sequence"), rules) == BATCH_SEQUENCE
  # on a mesh without a context axis (no context parallelism) T is not split
  assert logical_to_mesh_spec(("batch", "sequence"), rules, _mesh((2, 2, 2))) == P(
    ("data", "fsdp"), None)
  assert logical_to_mesh_spec(("layers", "norm"), rules) == P(None, None)


def test_every_parameter_axis_has_a_rule_in_every_set():
  for name, rules in RULE_SETS.items():
    assert set(PARAM_AXES) <= set(dict(rules)), name


def test_missing_mesh_axes_dropped_and_repeats_replicated():
  mesh = _mesh((8,), ("fsdp",))
  assert logical_to_mesh_spec(("vocab", "embed"), "fsdp_tp", mesh) == P(None, "fsdp")
  assert logical_to_mesh_spec(("batch",), "fsdp_tp", mesh) == P("fsdp")
  assert logical_to_mesh_spec(("embed", "embed"), "fsdp") == P("fsdp", None)
  assert logical_to_mesh_spec(None, "fsdp") == P()
  assert logical_to_mesh_spec(("unknown", None), "fsdp") == P(None, None)


def test_unknown_rule_set_name():
  with pytest.raises(ValueError, match=r"rules must be one of .*fsdp_tp"):
    get_rules("zero3")


def test_named_shardings_agree_with_flax_partition_specs(abstract_state):
  mesh = _mesh((1, 4, 2))
  for name in RULE_SETS:
    ours = named_shardings(abstract_state, mesh, name)
    with nnx.logical_axis_rules(get_rules(name)):
      flax_specs = nnx.get_partition_spec(abstract_state)
    ours_flat = dict(nnx.to_flat_state(ours))
    for path, spec in nnx.to_flat_state(flax_specs):
      got = ours_flat[path].get_value()
      assert got.mesh == mesh
      assert got.spec == spec.get_value(), (name, path)


def test_logical_partition_specs_name_every_parameter(abstract_state):
  specs = dict(nnx.to_flat_state(logical_partition_specs(abstract_state)))
  assert specs[("layers", "q_proj")] == ("layers", "embed", "heads", "head_dim")
  assert specs[("embed",)] == ("vocab", "embed")
  for path, axes in specs.items():
    assert axes is not None and set(axes) <= set(PARAM_AXES), path


def test_shard_state_places_an_unsharded_model():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  mesh = _mesh((2, 2, 2))
  state = shard_state(nnx.state(model), mesh, "fsdp_tp")
  q = state["layers"]["q_proj"][...]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 8)}
  np.testing.assert_array_equal(q, model.layers.q_proj[...])


def test_abstract_construction_under_mesh_carries_shardings():
  mesh = _mesh((1, 8, 1))
  with mesh_and_rules(mesh, "fsdp"):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))))
    shardings = named_shardings(state, mesh, "fsdp")
    init = jax.jit(
      lambda: nnx.state(Transformer(CONFIG, rngs=nnx.Rngs(0))),
      out_shardings=shardings,
    )
    real = init()
  assert real["layers"]["gate_proj"][...].sharding.spec == P(None, "fsdp", None)
  assert real["layers"]["gate_proj"][...].shape == (2, 32, 64)


def test_logical_axis_rules_context_restores():
  from flax.core import spmd as core_spmd

  before = core_spmd.get_logical_axis_rules()
  with logical_axis_rules("fsdp"):
    assert dict(core_spmd.get_logical_axis_rules())["embed"] == "fsdp"
  assert core_spmd.get_logical_axis_rules() == before
