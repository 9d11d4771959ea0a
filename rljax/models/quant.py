"""Block-wise quantised base weights for QLoRA (Dettmers et al. 2023): NF4 and int8, with one
float32 absmax scale per block of 64 consecutive values (bitsandbytes' block size; no double
quantisation of the scales), dequantised on use.

  quantise:    per block b of a layer's flattened weight, s_b = max |w_i|, and
                 nf4:  q_i = argmin_k |w_i / s_b − NF4[k]|   (4 bits; two codes per byte, the
                       first in the high nibble, as bitsandbytes packs them)
                 int8: q_i = round(127 · w_i / s_b)
  dequantise:  w_i ≈ NF4[q_i] · s_b,  or  q_i / 127 · s_b

NF4 is bitsandbytes' table of the 16 quantiles of N(0, 1) scaled to [−1, 1], with an exact 0.

A `QuantizedArray` (a pytree: codes, scales; the dequantised shape and dtype static) stands in
for a projection's weight in the layers' stacked parameters. Its leaves keep the layers axis in
front, so `lax.scan` slices one layer's codes and scales like any weight, and `dense` — which
reads `w.shape` and `w.astype(x.dtype)` — dequantises one layer's weight right before its
matmul: the model's code is unchanged, and only one layer's weight exists in full precision at
a time. `quantize_base(model, "nf4")` replaces, in place, the target projections of every
decoder layer by `QuantizedParam`s (an `nnx.Variable`, not a `Param`: never trained); the LoRA
adapters, embeddings and norms stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.transformer import PROJECTIONS, DecoderLayers
from rljax.ops._checks import check_choice

Array = jax.Array

BLOCK = 64
MODES = ("nf4", "int8")
NF4 = np.array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0], np.float32)
NF4_PAIRS = np.stack([NF4[np.arange(256) >> 4], NF4[np.arange(256) & 15]], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """Codes [..., blocks, 32 (nf4: packed pairs) | 64 (int8)] and scales [..., blocks] of a
  block-wise quantised array of trailing shape `inner_shape`; leading dims (the layers axis)
  are the leaves' own, so the array can be scanned."""

  codes: Array
  scales: Array
  inner_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  mode: str = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.scales.shape[:-1], *self.inner_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def astype(self, dtype: Any) -> Array:
    """The dequantised array in `dtype` (what `dense` multiplies with)."""
    return dequantize(self).astype(dtype)

  def __getitem__(self, key: Any) -> QuantizedArray:
    """[...] (itself) or an int / slice of the leading (layers) axis."""
    if key is Ellipsis:
      return self
    if isinstance(key, (int, slice)) and len(self.shape) > len(self.inner_shape):
      return dataclasses.replace(self, codes=self.codes[key], scales=self.scales[key])
    raise TypeError(f"a QuantizedArray is indexed by [...] or along its layers axis; got {key!r}.")


class QuantizedParam(nnx.Variable):
  """A frozen, quantised base weight (its value a `QuantizedArray`)."""


def _blocks(x: Array) -> tuple[Array, int]:
  """x [*lead, *inner] → [*lead, blocks, 64] (zero padded) and the inner size."""
  lead, n = x.shape[:1], math.prod(x.shape[1:])
  flat = x.reshape(*lead, n)
  pad = -n % BLOCK
  flat = jnp.pad(flat, [(0, 0), (0, pad)])
  return flat.reshape(*lead, -1, BLOCK), n


@functools.partial(jax.jit, static_argnames=("mode",))
def _quantize(w: Array, mode: str) -> tuple[Array, Array]:
  blocks, _ = _blocks(w.astype(jnp.float32))
  scales = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(scales > 0, scales, 1.0)[..., None]
  if mode == "int8":
    return jnp.round(127.0 * normed).astype(jnp.int8), scales
  codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4)), axis=-1).astype(jnp.uint8)
  return (codes[..., 0::2] << 4) | codes[..., 1::2], scales


def quantize(w: Array, mode: str = "nf4") -> QuantizedArray:
  """Block-wise quantisation of a stacked weight w [L, *inner] (blocks within each layer)."""
  check_choice("quantization mode", mode, MODES)
  codes, scales = _quantize(w, mode)
  return QuantizedArray(codes, scales, tuple(w.shape[1:]), mode, jnp.dtype(w.dtype))


def dequantize(q: QuantizedArray) -> Array:
  """The array a `QuantizedArray` stands for, float32 (module doc); any leading dims."""
  if q.mode == "int8":
    values = q.codes.astype(jnp.float32) / 127.0
  else:  # one lookup per byte in the 256 × 2 table of (high, low) nibble values
    values = jnp.asarray(NF4_PAIRS)[q.codes.astype(jnp.int32)].reshape(
      *q.codes.shape[:-1], BLOCK)
  values = values * q.scales[..., None]
  lead = q.scales.shape[:-1]
  n = math.prod(q.inner_shape)
  return values.reshape(*lead, -1)[..., :n].reshape(*lead, *q.inner_shape)


def quantize_base(model: nnx.Module, mode: str = "nf4",
                  targets: tuple[str, ...] = PROJECTIONS) -> nnx.Module:
  """`model` with the projections `targets` of every decoder layer stored quantised (in place;
  returned for chaining). Add LoRA adapters before or after; the adapters stay float32."""
  check_choice("quantization mode", mode, MODES)
  found = False
  for _, module in nnx.iter_graph(model):
    if isinstance(module, DecoderLayers):
      found = True
      for name in targets:
        var = getattr(module, name)
        if not isinstance(var, QuantizedParam):
          setattr(module, name, QuantizedParam(quantize(var[...], mode)))
  if not found:
    raise ValueError(f"{type(model).__name__} has no decoder layers to quantise.")
  return model


def is_quantized(model: nnx.Module) -> bool:
  """Whether some weight of `model` is a `QuantizedParam`."""
  return any(isinstance(v, QuantizedParam) for _, v in nnx.iter_graph(model))


def quantized_bytes(model: nnx.Module) -> int:
  """Bytes of every array of `model` (codes and scales for quantised weights)."""
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


__all__ = ["BLOCK", "MODES", "NF4", "QuantizedArray", "QuantizedParam", "dequantize",
           "is_quantized", "quantize", "quantize_base", "quantized_bytes"]
