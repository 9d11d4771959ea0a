"""The NNX causal LM: scanned layers, padding, positions, remat, dtypes and sharded construction."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer, positions_from_mask
from rljax.parallel.rules import MESH_AXES, logical_axis_rules

CONFIG = ModelConfig(
  vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
  num_kv_heads=2, head_dim=16, attention_bias=True, qk_norm=True,
  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
)


@pytest.fixture(scope="module")
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(m, ids, mask=None, positions=None):
  return m(ids, mask, positions)


def _ids(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 1, CONFIG.vocab_size)


def _hlo_op_stats(num_layers: int) -> tuple[int, int, list[str]]:
  config = CONFIG.replace(num_layers=num_layers, scan_unroll=1)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  forward = jax.jit(lambda s, ids, m: nnx.merge(graphdef, s)(ids, m))
  ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  text = forward.lower(state, ids, ids).as_text()
  ops = re.findall(r"=\s*\"?(stablehlo\.[a-z_]+|func\.call|call)", text)
  return text.count("stablehlo.while"), len(ops), sorted(ops)


def test_unrolled_layer_scan_equals_the_rolled_one(model):
  """`scan_unroll` changes the program, not the function: values and gradients agree with one
  layer per iteration; None unrolls every layer on CPU without remat (measured faster there)
  and keeps one per iteration with remat and on accelerators."""
  from rljax.models.transformer import layer_unroll

  ids, mask = _ids((2, 8)), jnp.ones((2, 8), bool).at[0, :3].set(False)
  graphdef, state = nnx.split(model)

  def loss(s, unroll):
    m = nnx.merge(graphdef, s)
    m.layers.config = CONFIG.replace(scan_unroll=unroll)  # what the layer scan reads
    return jnp.sum(jnp.where(mask[..., None], m(ids, mask), 0.0) ** 2) * 1e-3

  one = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, 1)
  every = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, 2)
  np.testing.assert_allclose(every[0], one[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), every[1], one[1])
  assert layer_unroll(CONFIG) == (2 if jax.default_backend() == "cpu" else 1)
  assert layer_unroll(CONFIG.replace(remat=True)) == 1  # unrolled remat is slower on CPU too
  assert layer_unroll(CONFIG.replace(scan_unroll=1)) == 1
  with pytest.raises(ValueError, match="scan_unroll"):
    CONFIG.replace(scan_unroll=0)


def test_unrolled_layer_params_are_exactly_the_slices():
  """`layer_params` selects norms and biases by a one-hot contraction (one kernel for all
  layers, see its doc) and slices the matmul weights: bitwise the slice, value and gradient."""
  from rljax.models.transformer import layer_params

  rng = np.random.default_rng(0)
  stacked = {"attn_norm": rng.normal(size=(3, 8)), "q_bias": rng.normal(size=(3, 2, 4)),
             "q_proj": rng.normal(size=(3, 8, 2, 4))}
  stacked = {k: jnp.asarray(v, jnp.float32) for k, v in stacked.items()}
  weights = {k: jnp.asarray(rng.normal(size=v.shape[1:]), jnp.float32) for k, v in stacked.items()}
  for i in range(3):
    got = layer_params(stacked, i, 3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, {k: v[i] for k, v in
                                                                          stacked.items()})

    def total(s, select):
      return sum(jnp.sum(w * p) for w, p in zip(weights.values(), select(s).values()))

    grad = jax.grad(total)(stacked, lambda s: layer_params(s, i, 3))
    want = jax.grad(total)(stacked, lambda s: {k: v[i] for k, v in s.items()})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grad, want)


def test_hlo_structure_does_not_grow_with_depth():
  whiles_2, count_2, ops_2 = _hlo_op_stats(2)
  whiles_8, count_8, ops_8 = _hlo_op_stats(8)
  assert whiles_2 == whiles_8 == 1
  assert count_2 == count_8 and ops_2 == ops_8
  assert count_2 > 50  # the regex really found the program's ops


def test_logits_shape_dtype_and_hidden_unembedding_split(model):
  ids = _ids((2, 6))
  logits = model(ids)
  assert logits.shape == (2, 6, CONFIG.vocab_size) and logits.dtype == jnp.float32
  hidden = model.hidden_states(ids)
  assert hidden.shape == (2, 6, CONFIG.hidden_size)
  assert model.unembedding.shape == (CONFIG.vocab_size, CONFIG.hidden_size)
  np.testing.assert_allclose(model.logits_from_hidden(hidden), logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(model.unembedding, model.lm_head[...])


def test_tied_unembedding_is_the_embedding_table():
  tied = Transformer(CONFIG.replace(tie_word_embeddings=True), rngs=nnx.Rngs(1))
  assert not hasattr(tied, "lm_head")
  np.testing.assert_array_equal(tied.unembedding, tied.embed[...])


def test_left_padding_matches_unpadded_row(model):
  ids = np.asarray(_ids((1, 5)))
  pad = 3
  padded = np.concatenate([np.zeros((1, pad), ids.dtype), ids], axis=1)
  mask = np.concatenate([np.zeros((1, pad), np.int32), np.ones((1, 5), np.int32)], axis=1)
  with jax.default_matmul_precision("highest"):
    ref = _forward(model, ids)
    out = _forward(model, padded, mask)
  np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # padded query rows are finite too
  # Changing the pad tokens changes nothing at valid positions.
  with jax.default_matmul_precision("highest"):
    out2 = _forward(model, np.where(mask == 1, padded, 7), mask)
  np.testing.assert_allclose(out2[:, pad:], out[:, pad:], atol=1e-6)


def test_positions_default_and_explicit(model):
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  ids = _ids((2, 5))
  np.testing.assert_array_equal(_forward(model, ids, mask), _forward(model, ids, mask, positions_from_mask(mask)))
  shifted = _forward(model, ids, None, jnp.arange(5)[None].repeat(2, 0) + 3)
  assert not np.allclose(shifted, _forward(model, ids))  # RoPE sees the positions


def test_causal(model):
  ids = np.asarray(_ids((1, 6)))
  changed = ids.copy()
  changed[0, 4] = (ids[0, 4] + 1) % CONFIG.vocab_size
  a, b = _forward(model, ids), _forward(model, changed)
  np.testing.assert_array_equal(a[:, :4], b[:, :4])
  assert not np.allclose(a[:, 4:], b[:, 4:])


def test_jit_matches_eager(model):
  """Also the two layer paths of `scan_layers` on CPU: traced, a loop over the unrolled
  layers; eager, the one scan program."""
  ids, mask = _ids((2, 6)), jnp.array([[0, 1, 1, 1, 1, 1]] * 2)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, mask))(state)
  np.testing.assert_allclose(jitted, model(ids, mask), atol=1e-5, rtol=1e-5)


def test_remat_same_values_and_gradients():
  """Remat changes what the backward recomputes, not the function (both policies, the default
  layer path); the "dots" policy keeps the projections' matmul outputs, so its backward
  recomputes fewer matmuls than "nothing"'s (counted in the lowered gradient, the layers in a
  scan as on accelerators: lowering only, nothing compiled)."""
  plain = Transformer(CONFIG, rngs=nnx.Rngs(3))
  ids = _ids((2, 6))

  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

  grad_fn = nnx.jit(nnx.value_and_grad(loss))
  l1, g1 = grad_fn(plain)
  for policy in ("nothing", "dots"):
    remat = Transformer(CONFIG.replace(remat=True, remat_policy=policy), rngs=nnx.Rngs(3))
    l2, g2 = grad_fn(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g1))

  def dots(**changes):  # dot_general ops in the lowered gradient
    graphdef, state = nnx.split(Transformer(CONFIG.replace(scan_unroll=1, **changes),
                                            rngs=nnx.Rngs(3)))
    grad = jax.jit(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))
    return grad.lower(state).as_text().count("dot_general")

  recomputed = {policy: dots(remat=True, remat_policy=policy) - dots()
                for policy in ("nothing", "dots")}
  assert recomputed["nothing"] > recomputed["dots"] >= 0, recomputed


def test_bfloat16_compute_is_finite_and_close(model):
  bf16 = Transformer(CONFIG.replace(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  ids = _ids((2, 6))
  out = _forward(bf16, ids)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  assert bf16.hidden_states(ids).dtype == jnp.bfloat16
  np.testing.assert_allclose(out, _forward(model, ids), atol=5e-2)


def test_bad_inputs(model):
  with pytest.raises(ValueError, match="input_ids"):
    model(jnp.zeros((6,), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask"):
    model(jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 5), jnp.int32))


def test_constructs_without_mesh_on_one_device(model):
  assert len(model.layers.q_proj[...].sharding.device_set) == 1


def _mesh(shape):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize(
  "rules, shape, q_spec, embed_spec, q_shard",
  [
    ("data", (8, 1, 1), (None, None, None, None), (None, None), (2, 64, 4, 16)),
    ("fsdp", (1, 8, 1), (None, "fsdp", None, None), (None, "fsdp"), (2, 8, 4, 16)),
    ("fsdp_tp", (1, 4, 2), (None, "fsdp", "tensor", None), ("tensor", "fsdp"), (2, 16, 2, 16)),
  ],
)
def test_constructs_sharded_under_mesh_and_rules(model, rules, shape, q_spec, embed_spec, q_shard):
  mesh = _mesh(shape)
  with jax.set_mesh(mesh), logical_axis_rules(rules):
    sharded = Transformer(CONFIG, rngs=nnx.Rngs(0))
  q = sharded.layers.q_proj[...]
  assert tuple(q.sharding.spec) == q_spec
  assert tuple(sharded.embed[...].sharding.spec) == embed_spec
  assert len(q.sharding.device_set) == 8
  assert {s.data.shape for s in q.addressable_shards} == {q_shard}
  if rules == "data":
    assert q.sharding.is_fully_replicated
  else:
    assert not q.sharding.is_fully_replicated
  # Same initial values as the unsharded model, and the same forward pass under the mesh.
  np.testing.assert_array_equal(q, model.layers.q_proj[...])
  graphdef, state = nnx.split(sharded)
  ids = _ids((8, 4))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state)
  np.testing.assert_allclose(out, _forward(model, ids), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the Gemma family's details

GEMMA3 = ModelConfig.from_hf({
  "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "query_pre_attn_scalar": 12, "sliding_window": 3, "sliding_window_pattern": 2,
  "final_logit_softcapping": 5.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})


def test_gemma_norm_is_x_hat_times_one_plus_w_in_float32():
  from rljax.models.transformer import rms_norm

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 16)), jnp.bfloat16)
  w = jnp.asarray(0.1 * rng.standard_normal(16), jnp.float32)
  x32 = np.asarray(x, np.float32)
  x_hat = x32 / np.sqrt(np.mean(x32**2, -1, keepdims=True) + 1e-6)
  out = rms_norm(x, w, 1e-6, plus_one=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(jnp.asarray(x_hat * (1 + np.asarray(w)), jnp.bfloat16),
                                           np.float32))


def test_gemma_embeddings_are_scaled_by_the_root_width_in_the_activation_dtype():
  from rljax.models.transformer import input_embeddings

  config = GEMMA3.replace(hidden_size=3072, dtype=jnp.bfloat16)
  table = jnp.ones((4, 3072), jnp.float32)
  out = input_embeddings(table, jnp.asarray([[1, 2]]), config)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), 55.5)  # bf16(√3072 = 55.43)
  unscaled = input_embeddings(table, jnp.asarray([[1]]), config.replace(scale_embeddings=False))
  np.testing.assert_array_equal(np.asarray(unscaled, np.float32), 1.0)


def test_geglu_is_the_tanh_approximation_of_gelu():
  from rljax.models.transformer import mlp_activation

  x = np.linspace(-4, 4, 33)
  tanh_gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  np.testing.assert_allclose(mlp_activation(jnp.asarray(x), GEMMA3), tanh_gelu, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(mlp_activation(jnp.asarray(x), CONFIG), x / (1 + np.exp(-x)),
                             rtol=1e-6)


def test_gemma3_rope_tables_local_unscaled_and_global_scaled():
  from rljax.models.transformer import layer_rope_index, rope_tables

  positions = jnp.arange(6)[None]
  cos, sin = rope_tables(positions, GEMMA3)
  assert cos.shape == (2, 1, 6, 8)
  dims = np.arange(0, 8, 2) / 8
  for row, inv_freq in ((0, 1e6**-dims / 8), (1, 1e4**-dims)):  # global ×8 linear; local
    angles = np.arange(6)[:, None] * np.concatenate([inv_freq, inv_freq])
    np.testing.assert_allclose(cos[row, 0], np.cos(angles), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sin[row, 0], np.sin(angles), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(layer_rope_index(GEMMA3), [1, 0, 1, 0])
  assert layer_rope_index(CONFIG) is None and rope_tables(positions, CONFIG)[0].shape[0] == 1


def test_gemma_hlo_structure_does_not_grow_with_depth():
  """Per-layer windows and RoPE rows are scanned inputs: one while loop at any depth."""
  def stats(layers):
    config = GEMMA3.replace(num_layers=layers, scan_unroll=1,
                            sliding_window=tuple(3 if i % 2 == 0 else None for i in range(layers)))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    text = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).as_text()
    return text.count("stablehlo.while"), sorted(re.findall(r"=\s*\"?(stablehlo\.[a-z_]+)", text))

  assert stats(2) == stats(8) and stats(2)[0] == 1


@pytest.mark.slow  # two value_and_grad compiles (~10 s on CPU)
def test_remat_group_checkpoints_every_gth_layer_and_changes_nothing_else():
  """`remat_group=2` saves the residual stream of every other layer ([L / 2, B, T, D] instead
  of [L, B, T, D]) and gives the same values and gradients, for a plain model and for LoRA
  adapters on an NF4 base (stacked adapters and quantised leaves regrouped alike); a group size
  that does not divide the layers is refused."""
  from jax._src.ad_checkpoint import saved_residuals

  from rljax.models.lora import LoRAConfig, add_lora, lora_trainable
  from rljax.models.quant import quantize_base

  config = CONFIG.replace(num_layers=4, remat=True, scan_unroll=1)
  ids = _ids((2, 6))

  def build(g, qlora):
    m = Transformer(config.replace(remat_group=g), rngs=nnx.Rngs(3))
    if qlora:
      add_lora(quantize_base(m, "nf4"), LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(4))
      m.layers.up_proj_lora_b[...] = 0.1 * jnp.ones(m.layers.up_proj_lora_b.shape)
    graphdef, params, frozen = nnx.split(m, lora_trainable if qlora else nnx.Param, ...)
    return params, lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, frozen)(ids))[..., 0])

  for qlora in (False, True):
    (p1, loss1), (p2, loss2) = build(1, qlora), build(2, qlora)
    (l1, g1), (l2, g2) = jax.jit(jax.value_and_grad(loss1))(p1), jax.jit(jax.value_and_grad(loss2))(p2)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g2, g1)
  stream = lambda layers: (layers, 2, 6, CONFIG.hidden_size)  # noqa: E731
  shapes = {g: {tuple(a.shape) for a, _ in saved_residuals(loss, p)}
            for g, (p, loss) in ((1, build(1, False)), (2, build(2, False)))}
  assert stream(4) in shapes[1] and stream(2) in shapes[2] and stream(4) not in shapes[2]
  for bad in (dict(remat_group=3), dict(remat=False, remat_group=2)):
    with pytest.raises(ValueError, match="remat_group"):
      config.replace(**bad)


def test_gemma_training_gradients_blockwise_remat_equal_naive():
  """The training forward of a Gemma 3 model (windows shorter than T, two RoPE tables, final
  soft-cap): fused log-probs and their gradients agree on the naive and the blockwise + remat
  paths, and the fused log-probs equal the log-softmax of the model's (soft-capped) logits."""
  from rljax.train.objectives import next_token_logprobs

  config = GEMMA3.replace(num_layers=2, sliding_window=(3, None), scan_unroll=1)
  ids = _ids((2, 12), seed=3) % config.vocab_size
  mask = jnp.ones((2, 12), bool).at[1, :4].set(False)
  valid = mask[:, 1:] & mask[:, :-1]  # a real token predicted from a real one
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(1)))
  state = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x + 0.3, state)

  def loss(s, config):
    m = nnx.merge(graphdef, s)
    m.config = m.layers.config = config
    logp = next_token_logprobs(m, ids, mask, chunk_size=5)
    return jnp.sum(jnp.where(valid, logp, 0.0)), logp

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (naive, logp), g_naive = grad(state, config.replace(attention="naive"))
  (blockwise, _), g_block = grad(state, config.replace(attention="blockwise", attention_block=4,
                                                       remat=True))
  np.testing.assert_allclose(blockwise, naive, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_block,
               g_naive)
  logits = nnx.merge(graphdef, state)(ids, mask)
  assert np.abs(np.asarray(logits)).max() < config.final_logit_softcap  # capped
  reference = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.where(valid, logp, 0), np.where(valid, reference, 0), atol=1e-5)
