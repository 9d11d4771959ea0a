"""Context parallelism on 8 emulated devices: rows split along T over the `context` mesh axis
equal one device (loss and gradients), the program really shards, memory falls with the axis
(compile-only). Every program is compiled at XLA's lowest optimisation level (fast on CPU)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.parallel.context import context_shards, sequence_axes
from rljax.parallel.mesh import MeshConfig, make_mesh, use_mesh

FAST = {"xla_backend_optimization_level": 0}
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, attention_block=8)
B, T = 4, 32


def _loss_fn(graphdef):
  def loss(state, ids, mask, segment_ids):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, mask, segment_ids=segment_ids)
    logp = logprobs_from_hidden(hidden, model.unembedding, jnp.roll(ids, -1, axis=1),
                                chunk_size=16)
    weights = mask * (jnp.arange(T) < T - 1)
    return jnp.sum(logp * weights) / jnp.sum(weights)

  return jax.value_and_grad(loss)


def _batch(packed: bool):
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (B, T)), jnp.int32)
  if packed:  # up to four sequences per row; rows 1, 2, 3 end in 3, 6, 9 padding slots
    bounds = np.sort(rng.integers(1, T, (B, 3)), axis=1)
    segments = (np.arange(T)[None, :, None] >= bounds[:, None, :]).sum(-1)
    mask = np.arange(T)[None] < T - np.arange(B)[:, None] * 3
    return ids, jnp.asarray(mask, jnp.int32), jnp.asarray(segments, jnp.int32)
  mask = np.arange(T)[None] >= np.array([0, 5, 13, 26])[:, None]  # left padding
  return ids, jnp.asarray(mask, jnp.int32), None


def _compile(grad_fn, state, batch, mesh=None, rules="data"):
  if mesh is None:
    return jax.jit(grad_fn, compiler_options=FAST).lower(state, *batch).compile()
  with use_mesh(mesh, rules):
    assert context_shards() == mesh.shape.get("context", 1)
    return jax.jit(grad_fn, compiler_options=FAST).lower(state, *batch).compile()


def _assert_equal_to_one_device(config, mesh_config, packed, rules="data"):
  """Loss and gradients on the mesh == one device's (1e-5); returns both compiled programs and
  the (function, state, batch) they were compiled for."""
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  batch, grad_fn = _batch(packed), _loss_fn(graphdef)
  one = _compile(grad_fn, state, batch)
  sharded = _compile(grad_fn, state, batch, make_mesh(mesh_config), rules)
  (loss1, grads1), (loss, grads) = one(state, *batch), sharded(state, *batch)
  np.testing.assert_allclose(loss, loss1, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  return one, sharded, (grad_fn, state, batch)


def test_context_8_equals_one_device_gathers_keys_per_layer_and_saves_memory():
  """Left-padded rows, every device one eighth of T: keys / values all-gathered along T once per
  layer in the forward, their gradients reduce-scattered once per layer in the backward; the
  per-device temp memory falls from one device to context 2 to context 8 (compile-only)."""
  one, eight, program = _assert_equal_to_one_device(CONFIG, MeshConfig(data=1, context=8),
                                                    packed=False)
  hlo = eight.as_text()
  kv_gathers = re.findall(rf"f32\[{B},{T},2,8\][^ ]* all-gather(?:-start)?\(", hlo)
  kv_scatters = re.findall(rf"f32\[{B},{T // 8},2,8\][^ ]* reduce-scatter(?:-start)?\(", hlo)
  assert len(kv_gathers) == 2 * CONFIG.num_layers, len(kv_gathers)
  assert len(kv_scatters) == 2 * CONFIG.num_layers, len(kv_scatters)
  two = _compile(*program, make_mesh(MeshConfig(data=1, context=2), devices=jax.devices()[:2]))
  temp = [c.memory_analysis().temp_size_in_bytes for c in (one, two, eight)]
  assert temp[1] < 0.7 * temp[0] and temp[2] < 0.7 * temp[1], temp


def test_data_context_tensor_mesh_packed_rows_with_windows_equal_one_device():
  """Packed rows (segment ids) on a data 2 × context 2 × tensor 2 mesh under "fsdp_tp" (each
  shard holds half the heads: whole query groups with their key / value head), one
  sliding-window layer and one full: segments, window, batch and head splits all pass through
  the per-shard attention."""
  config = CONFIG.replace(sliding_window=(5, None))
  _assert_equal_to_one_device(config, MeshConfig(data=2, context=2, tensor=2), packed=True,
                              rules="fsdp_tp")


def test_mesh_config_context_axis():
  assert MeshConfig(data=2, context=4).shape(8) == (2, 1, 4, 1)
  assert MeshConfig(data=2, context=4).axis_names(8) == ("data", "fsdp", "context", "tensor")
  assert MeshConfig(data=1, context=-1, tensor=2).shape(8) == (1, 1, 4, 2)
  assert MeshConfig(data=-1, context=1).axis_names(8) == ("data", "fsdp", "tensor")  # no axis
  mesh = make_mesh(MeshConfig(data=2, context=4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
  with pytest.raises(ValueError, match=r"data=2, fsdp=1, context=3, tensor=1\) multiplies to 6"):
    make_mesh(MeshConfig(data=2, context=3))
  with pytest.raises(ValueError, match="MeshConfig.context must be a positive int or -1"):
    MeshConfig(context=0)
  with use_mesh(make_mesh(MeshConfig()), "data"):  # no context axis: nothing split along T
    assert context_shards() == 1 and sequence_axes() == ()


def test_entry_checks():
  graphdef, state = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
  ids = jnp.ones((2, 12), jnp.int32)
  with use_mesh(make_mesh(MeshConfig(data=1, context=8)), "data"):
    with pytest.raises(ValueError, match=r"splits T = 12 tokens over 8 devices .*multiple of 8"):
      jax.eval_shape(lambda s: nnx.merge(graphdef, s).hidden_states(ids), state)
    naive = nnx.split(Transformer(CONFIG.replace(attention="naive"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r'needs the blockwise core; .*"naive"'):
      jax.eval_shape(lambda s: nnx.merge(naive[0], s).hidden_states(ids[:, :8]), naive[1])
