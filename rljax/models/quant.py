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

Layout and sharding. A layer's weight [*inner] is split as inner = (*kept, *rest) with `rest`
the shortest tail whose size is a multiple of 64 (q/k/v [D, H, Dh]: rest = (Dh,) for Dh = 64,
128; gate/up [D, F]: (F,); o [H, Dh, D]: (D,); down [F, D]: (D,)): codes [L, *kept, blocks,
32 | 64] and scales [L, *kept, blocks], blocks = size(rest) / 64 — the same blocks, in the same
order, as blocking the flattened layer, since no block crosses a `kept` index. (No such tail:
kept = (), the flattened layer zero padded to whole blocks.) A `QuantizedParam` carries its
weight's logical axes; codes and scales take those of `kept` (the layers axis in front, the
block dims replicated: `leaf_axes`), so they shard on every rule set along the weight's leading
axes (q/k/v over embed and heads, o over heads, gate/up over embed, down over mlp) and the
dequantised weight is born in (a part of) its sharding. Quantise under `mesh_and_rules` to
create them sharded; `rljax.train.state.variable_shardings` (so `create_train_state` and the
sampler's inference layout) places them.
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

from rljax.models.transformer import LAYER_AXES, PROJECTIONS, DecoderLayers
from rljax.ops._checks import check_choice
from rljax.parallel.rules import place_by_logical_axes

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
  """Codes [..., *kept, blocks, 32 (nf4: packed pairs) | 64 (int8)] and scales [..., *kept,
  blocks] of a block-wise quantised array of trailing shape `inner_shape` = (*kept, *rest),
  `kept` its first `num_kept` dims (module doc); leading dims (the layers axis) are the leaves'
  own, so the array can be scanned."""

  codes: Array
  scales: Array
  inner_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  mode: str = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  num_kept: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def lead_shape(self) -> tuple[int, ...]:
    """The leading (layers) dims."""
    return self.scales.shape[:self.scales.ndim - 1 - self.num_kept]

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.lead_shape, *self.inner_shape)

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

  def leaf_axes(self, axes: tuple[str | None, ...]) -> tuple[tuple, tuple]:
    """Logical axes (codes', scales') from the dequantised array's `axes`: the leading and
    `kept` dims keep theirs, the block dims are replicated (None)."""
    if len(axes) != self.ndim:
      raise ValueError(f"logical axes {axes} do not match the quantised shape {self.shape}.")
    kept = tuple(axes[:len(self.lead_shape) + self.num_kept])
    return (*kept, None, None), (*kept, None)

  def map_leaf_axes(self, axes: tuple[str | None, ...], fn: Any) -> QuantizedArray:
    """This array with fn(leaf's logical axes) in place of codes and scales (e.g. their
    shardings: `rljax.parallel.rules.value_shardings`); `axes` are the dequantised array's."""
    codes_axes, scales_axes = self.leaf_axes(axes)
    return dataclasses.replace(self, codes=fn(codes_axes), scales=fn(scales_axes))


class QuantizedParam(nnx.Variable):
  """A frozen, quantised base weight (its value a `QuantizedArray`)."""


def num_kept(inner_shape: tuple[int, ...]) -> int:
  """The number of leading dims of `inner_shape` kept whole: the largest k whose tail
  inner_shape[k:] holds a multiple of 64 values (0 when none does)."""
  for k in range(len(inner_shape) - 1, 0, -1):
    if math.prod(inner_shape[k:]) % BLOCK == 0:
      return k
  return 0


def _blocks(x: Array, kept: int) -> Array:
  """x [L, *inner] → [L, *inner[:kept], blocks, 64] (zero padded when kept = 0)."""
  head = x.shape[:1 + kept]
  flat = x.reshape(*head, -1)
  pad = -flat.shape[-1] % BLOCK
  flat = jnp.pad(flat, [(0, 0)] * len(head) + [(0, pad)])
  return flat.reshape(*head, -1, BLOCK)


@functools.partial(jax.jit, static_argnames=("mode", "kept"))
def _quantize(w: Array, mode: str, kept: int) -> tuple[Array, Array]:
  blocks = _blocks(w.astype(jnp.float32), kept)
  scales = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(scales > 0, scales, 1.0)[..., None]
  if mode == "int8":
    return jnp.round(127.0 * normed).astype(jnp.int8), scales
  codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4)), axis=-1).astype(jnp.uint8)
  return (codes[..., 0::2] << 4) | codes[..., 1::2], scales


def quantize(w: Array, mode: str = "nf4") -> QuantizedArray:
  """Block-wise quantisation of a stacked weight w [L, *inner] (blocks within each layer)."""
  check_choice("quantization mode", mode, MODES)
  inner = tuple(w.shape[1:])
  kept = num_kept(inner)
  codes, scales = _quantize(w, mode, kept)
  return QuantizedArray(codes, scales, inner, mode, jnp.dtype(w.dtype), kept)


def dequantize(q: QuantizedArray) -> Array:
  """The array a `QuantizedArray` stands for, float32 (module doc); any leading dims."""
  if q.mode == "int8":
    values = q.codes.astype(jnp.float32) / 127.0
  else:  # one lookup per byte in the 256 × 2 table of (high, low) nibble values
    values = jnp.asarray(NF4_PAIRS)[q.codes.astype(jnp.int32)].reshape(
      *q.codes.shape[:-1], BLOCK)
  values = values * q.scales[..., None]
  head = q.scales.shape[:-1]  # the leading and kept dims
  n = math.prod(q.inner_shape[q.num_kept:])
  return values.reshape(*head, -1)[..., :n].reshape(*q.lead_shape, *q.inner_shape)


def quantize_base(model: nnx.Module, mode: str = "nf4",
                  targets: tuple[str, ...] = PROJECTIONS) -> nnx.Module:
  """`model` with the projections `targets` of every decoder layer stored quantised (in place;
  returned for chaining). Add LoRA adapters before or after; the adapters stay float32. Each
  `QuantizedParam` carries its weight's logical axes; under a mesh and logical-axis rules
  (`mesh_and_rules`) its codes and scales are placed by them (module doc)."""
  check_choice("quantization mode", mode, MODES)
  found = False
  for _, module in nnx.iter_graph(model):
    if isinstance(module, DecoderLayers):
      found = True
      for name in targets:
        var = getattr(module, name)
        if not isinstance(var, QuantizedParam):
          setattr(module, name, quantized_param(quantize(var[...], mode), LAYER_AXES[name]))
  if not found:
    raise ValueError(f"{type(model).__name__} has no decoder layers to quantise.")
  return model


def quantized_param(q: QuantizedArray, axes: tuple[str, ...]) -> QuantizedParam:
  """A `QuantizedParam` of `q` with the weight's logical `axes`, its codes and scales placed by
  theirs (`place_by_logical_axes`: unchanged without a mesh and rules)."""
  codes_axes, scales_axes = q.leaf_axes(axes)
  q = dataclasses.replace(q, codes=place_by_logical_axes(q.codes, codes_axes),
                          scales=place_by_logical_axes(q.scales, scales_axes))
  return QuantizedParam(q, out_sharding=tuple(axes), eager_sharding=False)


def is_quantized(model: nnx.Module) -> bool:
  """Whether some weight of `model` is a `QuantizedParam`."""
  return any(isinstance(v, QuantizedParam) for _, v in nnx.iter_graph(model))


def quantized_bytes(model: nnx.Module) -> int:
  """Bytes of every array of `model` (codes and scales for quantised weights)."""
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


__all__ = ["BLOCK", "MODES", "NF4", "QuantizedArray", "QuantizedParam", "dequantize",
           "is_quantized", "num_kept", "quantize", "quantize_base", "quantized_bytes",
           "quantized_param"]
