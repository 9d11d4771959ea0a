"""QLoRA's quantised base: NF4 / int8 block-wise absmax (block 64) against a numpy reference, the
dequantise-on-use matmul against the dequantised weight, and a quantised model with adapters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.lora import LoRAConfig, add_lora, lora_param_count, lora_trainable, merged
from rljax.models.quant import (
  NF4, QuantizedParam, dequantize, is_quantized, num_kept, quantize, quantize_base,
  quantized_bytes)
from rljax.models.transformer import Transformer, dense

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


def numpy_quantize(w: np.ndarray, mode: str) -> np.ndarray:
  """The dequantised values of block-wise absmax quantisation, one layer at a time."""
  out = np.empty(w.shape, np.float64)
  for layer in range(w.shape[0]):
    flat = w[layer].astype(np.float64).ravel()
    values = np.empty_like(flat)
    for start in range(0, flat.size, 64):
      block = flat[start:start + 64]
      scale = np.abs(block).max()
      normed = block / scale if scale > 0 else block
      if mode == "int8":
        values[start:start + 64] = np.round(127 * normed) / 127 * scale
      else:
        values[start:start + 64] = NF4[np.abs(normed[:, None] - NF4).argmin(-1)] * scale
    out[layer] = values.reshape(w.shape[1:])
  return out


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("shape, kept", [((2, 32, 4, 8), 0), ((2, 48, 32), 0), ((1, 5, 7), 0),
                                         ((2, 8, 2, 64), 2), ((2, 3, 128), 1)])  # 7·5: partial
def test_quantize_matches_numpy_and_its_error_bound(mode, shape, kept):
  """Blocks of the flattened layer (numpy), whatever dims the layout keeps whole."""
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w[0].flat[:64] = 0.0  # an all-zero block
  q = quantize(w, mode)
  assert q.shape == shape and q.codes.dtype == (np.uint8 if mode == "nf4" else np.int8)
  assert q.num_kept == kept and q.scales.shape[:1 + kept] == shape[:1 + kept]
  got = np.asarray(dequantize(q))
  np.testing.assert_allclose(got, numpy_quantize(w, mode), rtol=1e-6, atol=1e-6)
  scale = np.abs(w).max()
  assert np.abs(got - w).max() <= (0.5 / 127 if mode == "int8" else 0.15) * scale
  bits = 8 * (q.codes.nbytes + q.scales.nbytes) / w.size
  assert bits < (4.6 if mode == "nf4" else 8.6) + 32 * 64 / w.size  # 4 or 8 bits + 0.5 of scales


def test_a_qlora_model_exports_merged_in_full_precision(tmp_path):
  """`save_pretrained` of a QLoRA model (adapters on q, v; every projection quantised) writes a
  plain checkpoint with the dequantised + merged weights."""
  from rljax.models.io import load_pretrained, save_pretrained

  model = add_lora(quantize_base(Transformer(CONFIG, rngs=nnx.Rngs(0)), "int8"),
                   LoRAConfig(rank=2, alpha=4, target_modules=["q", "v"]), rngs=nnx.Rngs(1))
  model.layers.v_proj_lora_b[...] = 0.1 * jax.random.normal(jax.random.key(0),
                                                            model.layers.v_proj_lora_b.shape)
  save_pretrained(model, None, tmp_path)
  back, _ = load_pretrained(tmp_path)
  ids = jax.random.randint(jax.random.key(1), (2, 5), 0, CONFIG.vocab_size)
  forward = nnx.jit(lambda m, ids: m(ids))
  np.testing.assert_allclose(np.asarray(forward(back, ids)), np.asarray(forward(model, ids)),
                             rtol=1e-5, atol=1e-5)


def test_leaf_axes_keep_the_weight_s_leading_axes():
  q = quantize(np.zeros((2, 16, 4, 64), np.float32))  # q_proj-like [L, D, H, Dh]: kept (D, H)
  assert num_kept((16, 4, 64)) == 2 and num_kept((64, 48)) == 0 and num_kept((3, 5, 128)) == 2
  axes = ("layers", "embed", "heads", "head_dim")
  assert q.leaf_axes(axes) == (("layers", "embed", "heads", None, None),
                               ("layers", "embed", "heads", None))
  with pytest.raises(ValueError, match="do not match"):
    q.leaf_axes(axes[:3])
  model = quantize_base(Transformer(CONFIG, rngs=nnx.Rngs(0)), "nf4")
  assert model.layers.q_proj.get_metadata()["out_sharding"] == ("layers", "embed", "heads",
                                                                "head_dim")


def test_dense_dequantizes_on_use_exactly():
  w = np.random.default_rng(1).normal(size=(1, 32, 4, 8)).astype(np.float32)
  q = quantize(w, "nf4")
  x = np.random.default_rng(2).normal(size=(2, 3, 32)).astype(np.float32)
  layer = jax.tree.map(lambda leaf: leaf[0], q)  # what the layer scan slices
  np.testing.assert_array_equal(np.asarray(jax.jit(dense)(x, layer)),
                                np.asarray(dense(x, dequantize(q)[0])))


def test_qlora_model_is_the_dequantized_model_and_trains_adapters_only():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  before = quantized_bytes(model)
  add_lora(quantize_base(model, "nf4"), LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(1))
  assert is_quantized(model) and isinstance(model.layers.q_proj, QuantizedParam)
  for name in model.layers.lora.target_modules:
    b = getattr(model.layers, f"{name}_lora_b")
    b[...] = 0.1 * jax.random.normal(jax.random.key(3), b.shape)
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, CONFIG.vocab_size)
  forward = nnx.jit(lambda m, ids: m(ids))
  reference = Transformer(CONFIG, rngs=nnx.Rngs(0))  # the dequantised weights, plain arrays
  add_lora(reference, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(1))
  nnx.update(reference, jax.tree.map(
    lambda v: dequantize(v) if hasattr(v, "codes") else v, nnx.state(model),
    is_leaf=lambda v: hasattr(v, "codes")))
  np.testing.assert_allclose(np.asarray(forward(model, ids)), np.asarray(forward(reference, ids)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(forward(merged(model), ids)),
                             np.asarray(forward(reference, ids)), rtol=1e-5, atol=1e-5)
  graphdef, params, frozen = nnx.split(model, lora_trainable, ...)
  assert all("_lora_" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(params))

  def loss(params):
    return nnx.merge(graphdef, params, frozen)(ids).mean()

  grads = jax.jit(jax.grad(loss))(params)
  assert all(float(abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  projections = sum(getattr(reference.layers, n)[...].nbytes for n in model.layers.lora.target_modules)
  stored = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, QuantizedParam)))
  assert stored <= 4.5 / 32 * projections  # 4 bits + a float32 scale per 64 values, not 32 bits
  adapters = 4 * lora_param_count(CONFIG, model.layers.lora)
  assert quantized_bytes(model) == before - projections + stored + adapters
