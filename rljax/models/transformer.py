"""A Flax NNX decoder-only causal LM (Llama / Mistral / Qwen2 / Qwen3 / SmolLM / Gemma 2 / 3).

Embedding (× √D for Gemma) → N decoder layers (RMSNorm, RoPE, grouped-query attention with
optional q/k/v bias and optional q/k RMSNorm, a gated MLP: SwiGLU or GeGLU; Gemma adds a norm on
each sub-layer's output) → final RMSNorm → unembedding (tied or untied) → optional logit soft-cap.

The N layers' parameters are stacked along a leading `layers` axis and applied with
`jax.lax.scan`, so the lowered program (and compile time) does not grow with depth; with
`config.remat` the layer body is wrapped in `jax.checkpoint`.

Every parameter carries logical axis names (`out_sharding` metadata, see `rljax.parallel.rules`),
and the activations are annotated with theirs (`rljax.parallel.constrain`: hidden states
(batch, sequence, act_embed), q / k / v per head, the MLP's hidden layer); under `use_mesh(mesh,
rules)` these pin the layouts GSPMD would otherwise guess, and with no mesh they do nothing.
Constructed with no mesh, parameters are plain single-device arrays. Constructed under
`jax.set_mesh(mesh)` *and* logical axis rules (`rljax.parallel.logical_axis_rules(rules)`), they
are created already sharded (placed by `rljax.parallel.rules.logical_to_mesh_spec`; Flax's own
eager sharding is switched off so that construction with no mesh never fails).

The numerics follow transformers' PyTorch implementation (RMSNorm in float32 then cast back,
rotate-half RoPE, softmax in float32, scaling head_dim ** -0.5 unless `attention_scale`); logits
are float32. What varies per layer is a scanned input of the layer scan: the sliding window and,
with `local_rope_theta` (Gemma 3), which RoPE table the layer reads (`layer_rope_index`).
"""

from __future__ import annotations

import functools
import math

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np
from flax import nnx

from rljax.models.attention import Attend, layer_windows, self_attention
from rljax.models.config import ModelConfig
from rljax.ops._checks import check_integer_ids
from rljax.parallel.context import context_shards
from rljax.parallel.mesh import constrain
from rljax.parallel.rules import place_by_logical_axes

Array = jax.Array

# Logical axis names of every parameter (leading "layers" for stacked layer parameters).
EMBED_AXES = ("vocab", "embed")
LM_HEAD_AXES = ("vocab", "embed")
FINAL_NORM_AXES = ("norm",)
LAYER_AXES: dict[str, tuple[str, ...]] = {
  "attn_norm": ("layers", "norm"),
  "q_proj": ("layers", "embed", "heads", "head_dim"),
  "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
  "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
  "o_proj": ("layers", "heads", "head_dim", "embed"),
  "q_bias": ("layers", "heads", "head_dim"),
  "k_bias": ("layers", "kv_heads", "head_dim"),
  "v_bias": ("layers", "kv_heads", "head_dim"),
  "o_bias": ("layers", "norm"),
  "q_norm": ("layers", "head_dim"),
  "k_norm": ("layers", "head_dim"),
  "mlp_norm": ("layers", "norm"),
  "post_attn_norm": ("layers", "norm"),
  "post_mlp_norm": ("layers", "norm"),
  "gate_proj": ("layers", "embed", "mlp"),
  "up_proj": ("layers", "embed", "mlp"),
  "down_proj": ("layers", "mlp", "embed"),
  "gate_bias": ("layers", "mlp"),
  "up_bias": ("layers", "mlp"),
  "down_bias": ("layers", "norm"),
}

# The linear projections of a layer (the targets LoRA can adapt: `rljax.models.lora`).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Logical axis names of activations (`constrain`; MaxText-style annotations).
HIDDEN_AXES = ("batch", "sequence", "act_embed")
Q_AXES = ("batch", "sequence", "act_heads", None)
KV_AXES = ("batch", "sequence", "act_kv_heads", None)
MLP_AXES = ("batch", "sequence", "act_mlp")

_INIT_STD = 0.02  # transformers' default `initializer_range`.


def logical_param(value: Array, axes: tuple[str, ...], kind: type[nnx.Param] = nnx.Param
                  ) -> nnx.Param:
  """An `nnx.Param` (or the subclass `kind`, e.g. `nnx.LoRAParam`) carrying its logical axis
  names (`out_sharding` metadata), placed on the current mesh by
  `rljax.parallel.rules.place_by_logical_axes` (unchanged with no mesh/rules)."""
  return kind(place_by_logical_axes(value, axes), out_sharding=axes, eager_sharding=False)


def _layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shapes (without the leading layers axis) of the per-layer parameters this config uses."""
  d, h, kv, hd, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  shapes = {
    "attn_norm": (d,),
    "q_proj": (d, h, hd),
    "k_proj": (d, kv, hd),
    "v_proj": (d, kv, hd),
    "o_proj": (h, hd, d),
    "mlp_norm": (d,),
    "gate_proj": (d, f),
    "up_proj": (d, f),
    "down_proj": (f, d),
  }
  if c.attention_bias:
    shapes.update(q_bias=(h, hd), k_bias=(kv, hd), v_bias=(kv, hd))
  if c.attention_out_bias:
    shapes.update(o_bias=(d,))
  if c.qk_norm:
    shapes.update(q_norm=(hd,), k_norm=(hd,))
  if c.mlp_bias:
    shapes.update(gate_bias=(f,), up_bias=(f,), down_bias=(d,))
  if c.post_norms:
    shapes.update(post_attn_norm=(d,), post_mlp_norm=(d,))
  return shapes


def _init_values(shapes: dict[str, tuple[int, ...]], key: Array, dtype: Any,
                 norm_value: float = 1.0) -> dict[str, Array]:
  """Initial values: matrices ~ N(0, 0.02²) (HF `initializer_range`), norms `norm_value` (1; 0
  for the (1 + w) norms of `norm_plus_one`), biases 0.

  All normal draws come from ONE `jax.random.normal` call sliced on the host, so eager
  construction compiles one program instead of one per parameter shape; under a trace
  (`nnx.eval_shape`, `jax.jit`) the slicing is traced instead.
  """
  matrices = [n for n in sorted(shapes) if not n.endswith(("norm", "bias"))]
  sizes = [int(np.prod(shapes[n])) for n in matrices]
  flat = _INIT_STD * jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32)
  xp = jnp if isinstance(flat, jax.core.Tracer) else np
  flat = flat if xp is jnp else np.asarray(flat)
  out: dict[str, Array] = {}
  offset = 0
  for name, size in zip(matrices, sizes):
    out[name] = jnp.asarray(xp.reshape(flat[offset : offset + size], shapes[name]), dtype)
    offset += size
  for name in shapes:
    if name.endswith("norm"):
      out[name] = jnp.asarray(np.full(shapes[name], norm_value), dtype)
    elif name.endswith("bias"):
      out[name] = jnp.asarray(np.zeros(shapes[name]), dtype)
  return out


# ----------------------------------------------------------------------------------------------
# Pure building blocks (reusable by a KV-cache decoder).
# ----------------------------------------------------------------------------------------------


def rms_norm(x: Array, weight: Array, eps: float, *, plus_one: bool = False) -> Array:
  """x̂ = x / sqrt(mean(x², -1) + eps) in float32; then weight · cast(x̂) (Llama), or with
  `plus_one` cast(x̂ · (1 + weight)) with the product in float32 (Gemma), as transformers."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if plus_one:
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def norm(x: Array, weight: Array, config: ModelConfig) -> Array:
  """The config's RMSNorm (`rms_norm_eps`, `norm_plus_one`) of x with `weight`."""
  return rms_norm(x, weight, config.rms_norm_eps, plus_one=config.norm_plus_one)


def output_norm(p: dict[str, Array], name: str, y: Array, config: ModelConfig) -> Array:
  """A sub-layer's output `y` through its norm `p[name]` when the config has `post_norms`
  (Gemma's post-attention / post-feedforward norms), else y."""
  return norm(y, p[name], config) if config.post_norms else y


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
  """RoPE inverse frequencies [head_dim // 2], with "llama3" / "linear" scaling (as transformers);
  `local`: those of the sliding-window layers (`local_rope_theta`, unscaled)."""
  dim = config.head_dim
  theta = config.local_rope_theta if local else config.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = {} if local else config.rope_scaling or {}
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / float(scaling["factor"])
  elif rope_type == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_cos_sin(positions: Array, config: ModelConfig, *, local: bool = False
                 ) -> tuple[Array, Array]:
  """cos, sin of shape [B, T, head_dim] for integer `positions` [B, T] (float32); `local`: the
  sliding-window layers' RoPE (`rope_inv_freq`)."""
  inv_freq = jnp.asarray(rope_inv_freq(config, local=local))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rope_tables(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
  """cos, sin [R, B, T, head_dim]: the RoPE of every layer (R = 1), or with `local_rope_theta`
  the full-attention layers' then the sliding-window layers' (R = 2; `layer_rope_index`)."""
  tables = [rope_cos_sin(positions, config)]
  if config.local_rope_theta is not None:
    tables.append(rope_cos_sin(positions, config, local=True))
  return jnp.stack([t[0] for t in tables]), jnp.stack([t[1] for t in tables])


def layer_rope_index(config: ModelConfig) -> Array | None:
  """[L] int32: the `rope_tables` row each layer reads (1: local), the scanned per-layer input;
  None when every layer reads row 0."""
  local = config.layer_local_rope
  return None if local is None else jnp.asarray(local, jnp.int32)


def layer_cos_sin(cos: Array, sin: Array, index: Array | None) -> tuple[Array, Array]:
  """One layer's cos, sin [B, T, head_dim] from the `rope_tables` by its `layer_rope_index`."""
  if index is None:
    return cos[0], sin[0]
  return (jax.lax.dynamic_index_in_dim(cos, index, keepdims=False),
          jax.lax.dynamic_index_in_dim(sin, index, keepdims=False))


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotate-half RoPE on x [B, T, heads, head_dim] with cos/sin [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def config_of(model: Any) -> ModelConfig | None:
  """The `ModelConfig` of a module (its `config`) or of its graphdef, where NNX keeps it as a
  static attribute (the root's, or a backbone's); None when there is none."""
  if isinstance(model, nnx.Module):
    config = getattr(model, "config", None)
    return config if isinstance(config, ModelConfig) else None
  for key, attribute in getattr(model, "attributes", ()):
    value = getattr(attribute, "value", None)
    if key == "config" and isinstance(value, ModelConfig):
      return value
  return None


def logit_softcap_of(model: Any) -> float | None:
  """The final logit soft-cap of a model (its config's `final_logit_softcap`), the `softcap` of
  `logprobs_from_hidden`; None for a model without a config."""
  config = config_of(model)
  return None if config is None else config.final_logit_softcap


def embed_tokens(table: Array, input_ids: Array, dtype: Any) -> Array:
  """Rows of the [V, D] embedding `table` for `input_ids` [B, T], in `dtype`.

  Ids outside [0, V) are clipped into range (`mode="clip"`). Such ids can only stand at padding
  (the entry points check real ones), where any finite row does: no real token attends to a
  padding slot, and a loss that selects its valid positions sends a gradient of exactly 0 there.
  `jnp.take`'s default for out-of-range ids is a NaN row instead, and one NaN activation makes
  every weight gradient NaN (xᵀg is NaN where g = 0).
  """
  return jnp.take(table, input_ids, axis=0, mode="clip").astype(dtype)


def input_embeddings(table: Array, input_ids: Array, config: ModelConfig) -> Array:
  """`embed_tokens` in `config.dtype`, × √hidden_size with `scale_embeddings` (Gemma; the factor
  is cast to the activation dtype first, as transformers casts it to the weights')."""
  x = embed_tokens(table, input_ids, config.dtype)
  if config.scale_embeddings:
    x = x * jnp.asarray(config.hidden_size**0.5, config.dtype)
  return x


def soft_cap(x: Array, cap: float | None) -> Array:
  """cap · tanh(x / cap), or x when cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def mlp_activation(gate: Array, config: ModelConfig) -> Array:
  """The gated MLP's activation: silu (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma)."""
  if config.mlp_activation == "gelu_tanh":
    return jax.nn.gelu(gate, approximate=True)
  return jax.nn.silu(gate)


def positions_from_mask(attention_mask: Array) -> Array:
  """Position ids for (left-)padded rows: cumsum(mask) - 1, clipped at 0. [B, T] int32."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Array) -> Array:
  """Position ids for packed rows: t - (first slot of t's segment), so every segment starts at
  0 (a segment is a run of equal ids). [B, T] int32."""
  t = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1
  )
  return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids.ndim - 1)


def dense(x: Array, w: Array, contract: int = 1) -> Array:
  """x [..., *in] @ w [*in, *out] over the last `contract` dims of x (the first of w), as ONE
  2D matmul [rows, in] @ [in, out] (the reshapes are free). XLA:CPU runs a 2D dot's backward
  without the layout copies a batched einsum needs (the SwiGLU MLP's forward + backward: 1.7x
  faster); on accelerators both are the same program. With the rows split along T (context
  parallelism) the [B·T] rows would not be a tiling of the devices (GSPMD would all-gather
  them), so the lead dimensions are kept: one `tensordot`."""
  if context_shards() > 1:
    return jnp.tensordot(x, w.astype(x.dtype), contract)
  return _on_rows(jnp.matmul, x, w, contract)


def _on_rows(fn, x: Array, w: Array, contract: int, *lora: Array) -> Array:
  """fn(rows [N, in], W [in, out], *lora) reshaped to [..., *out], for x [..., *in], W
  [*in, *out] and LoRA adapters (A [*in, r], B [r, *out]) flattened to [in, r], [r, out], all
  in x's dtype (a `QuantizedArray` dequantises)."""
  lead, inner, outer = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
  n_in, n_out = math.prod(inner), math.prod(outer)
  w, *lora = (v.astype(x.dtype) for v in (w, *lora))
  lora = [v.reshape(shape) for v, shape in zip(lora, ((n_in, -1), (-1, n_out)))]
  return fn(x.reshape(-1, n_in), w.reshape(n_in, n_out), *lora).reshape(*lead, *outer)


def project(p: dict[str, Array], name: str, x: Array, contract: int = 1) -> Array:
  """The projection `name` of x: `dense(x, p[name])`, plus its LoRA update when `p` holds the
  adapters `{name}_lora_a` [*in, r] and `{name}_lora_b` [r, *out] (`rljax.models.lora`; B comes
  scaled by alpha / r): x W + (dropout(x) A) B, the dropout applied when `p` holds this layer's
  `lora_dropout_key` (and `lora_dropout_rate`), with a mask of its own per projection. Without
  dropout, in float32 (or wider) and without context parallelism it is one matmul with the
  merged weight, x (W + A B) (`_lora_matmul`: its custom VJP never forms dW for a frozen W),
  which took the SmolLM2-135M-shaped LoRA step at B=8, T=512 (remat "dots") from 27.3 to
  23.1 s on CPU (BENCHMARKS.md, LoRA)."""
  a = p.get(name + "_lora_a")
  if a is None:
    return dense(x, p[name], contract)
  b = p[name + "_lora_b"]
  x_adapter = x
  if "lora_dropout_key" in p:
    key = jax.random.fold_in(p["lora_dropout_key"], PROJECTIONS.index(name))
    keep = 1.0 - p["lora_dropout_rate"]
    x_adapter = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep.astype(x.dtype), 0)
  elif _merges_exactly(x) and context_shards() == 1:
    # Named: the "dots" remat policy keeps it as it keeps the plain projections' dot outputs.
    return checkpoint_name(_on_rows(_lora_matmul, x, p[name], contract, a, b), _LORA_MATMUL)
  return dense(x, p[name], contract) + dense(dense(x_adapter, a, contract), b)


_LORA_MATMUL = "lora_matmul"  # the checkpoint name of a merged LoRA projection's output


def _merges_exactly(x: Array) -> bool:
  """Whether W + A B may be formed in x's dtype: in float32 (or wider) the sum keeps the
  adapter's update to its own precision; in bfloat16 it would round it at W's scale."""
  return jnp.finfo(x.dtype).bits >= 32


@jax.custom_vjp
def _lora_matmul(x: Array, w: Array, a: Array, b: Array) -> Array:
  """x (W + A B) for x [N, in], W [in, out], A [in, r], B [r, out] (= x W + (x A) B): one
  matmul with the merged weight, whose backward never forms the [in, out] dW unless W trains:

    dx = g (W + A B)ᵀ,  dA = xᵀ (g Bᵀ),  dB = (x A)ᵀ g,  dW = xᵀ g

  (autodiff of the merged form would build dW to get dA = dW Bᵀ). Against the unmerged form
  it drops the forward's [N, r] @ [r, out] product and its add, and the backward's
  (g Bᵀ) Aᵀ and its add: memory-bound passes over [N, in] / [N, out] rows."""
  return x @ (w + a @ b)


def _lora_matmul_fwd(x, w, a, b):
  return _lora_matmul(x, w, a, b), (x, w, a, b)


def _lora_matmul_bwd(residuals, g):
  x, w, a, b = residuals
  g_u = g @ b.T
  return g @ (w + a @ b).T, x.T @ g, x.T @ g_u, (x @ a).T @ g


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def project_qkv(
  p: dict[str, Array], x: Array, cos: Array, sin: Array, config: ModelConfig
) -> tuple[Array, Array, Array]:
  """Normed input x [B, T, D] → q [B, T, H, Dh], k, v [B, T, KV, Dh] (biases, q/k norm, RoPE)."""
  q, k, v = (project(p, name, x) for name in ("q_proj", "k_proj", "v_proj"))
  if config.attention_bias:
    q = q + p["q_bias"].astype(x.dtype)
    k = k + p["k_bias"].astype(x.dtype)
    v = v + p["v_bias"].astype(x.dtype)
  if config.qk_norm:
    q = norm(q, p["q_norm"], config)
    k = norm(k, p["k_norm"], config)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  return constrain(q, Q_AXES), constrain(k, KV_AXES), constrain(v, KV_AXES)


def attention_output(p: dict[str, Array], attn: Array, config: ModelConfig) -> Array:
  """[B, T, H, Dh] → [B, T, D] through o_proj (and its bias)."""
  out = project(p, "o_proj", attn, contract=2)
  if config.attention_out_bias:
    out = out + p["o_bias"].astype(out.dtype)
  return out


def swiglu_mlp(p: dict[str, Array], x: Array, config: ModelConfig) -> Array:
  """down(act(gate(x)) * up(x)) on [B, T, D], act by `mlp_activation` (silu: SwiGLU)."""
  gate, up = project(p, "gate_proj", x), project(p, "up_proj", x)
  if config.mlp_bias:
    gate, up = gate + p["gate_bias"].astype(x.dtype), up + p["up_bias"].astype(x.dtype)
  out = project(p, "down_proj", constrain(mlp_activation(gate, config) * up, MLP_AXES))
  if config.mlp_bias:
    out = out + p["down_bias"].astype(x.dtype)
  return out


def decoder_layer(
  p: dict[str, Array], x: Array, cos: Array, sin: Array, attend: Attend, config: ModelConfig,
  window: Array | None = None,
) -> Array:
  """One pre-norm decoder layer (with `post_norms` each sub-layer's output normed too, Gemma) on
  x [B, T, D] with this layer's (unstacked) parameters `p`;
  `attend(q, k, v, window)` is the rows' self-attention
  (`rljax.models.attention.self_attention`), `window` this layer's sliding window."""
  h = norm(x, p["attn_norm"], config)
  q, k, v = project_qkv(p, h, cos, sin, config)
  return constrain(layer_residuals(p, x, attend(q, k, v, window), config), HIDDEN_AXES)


def layer_residuals(p: dict[str, Array], x: Array, attn: Array, config: ModelConfig) -> Array:
  """The rest of a decoder layer once its attention `attn` [B, T, H, Dh] is known:
  x + post_norm(o_proj(attn)), then that + post_norm(mlp(norm(that))) (the post norms only with
  `post_norms`). Shared by the training forward, the KV cache and the paged decode."""
  x = x + output_norm(p, "post_attn_norm", attention_output(p, attn, config), config)
  h = norm(x, p["mlp_norm"], config)
  return x + output_norm(p, "post_mlp_norm", swiglu_mlp(p, h, config), config)


def scan_layers(
  stacked: dict[str, Array], x: Array, cos: Array, sin: Array, attend: Attend, config: ModelConfig
) -> Array:
  """Applies all layers with `jax.lax.scan` over the stacked parameters and the per-layer
  inputs: sliding windows (`layer_windows`) and RoPE rows (`layer_rope_index`) of the
  `rope_tables` cos, sin [R, B, T, Dh]; remat (with `remat_policy`) if configured. With every
  layer unrolled (`layer_unroll` = L, the CPU default) and traced, it is the same body in a
  Python loop over `layer_params` (the program XLA sees is the same unrolled chain, with fewer
  distinct kernels); called eagerly it stays one scan program (a loop would dispatch, and
  compile, every op of every layer on its own: `tests/models/test_attention.py` 48 -> 36 s)."""

  def body(carry: Array, xs) -> tuple[Array, None]:
    p, window, rope = xs
    layer_cos, layer_sin = layer_cos_sin(cos, sin, rope)
    return decoder_layer(p, carry, layer_cos, layer_sin, attend, config, window), None

  if config.remat:
    body = jax.checkpoint(body, prevent_cse=False, policy=_REMAT_POLICIES[config.remat_policy])
  windows, rope = layer_windows(config), layer_rope_index(config)
  if config.remat and config.remat_group > 1:
    return _scan_groups(body, x, (stacked, windows, rope), config)
  # Every layer unrolled (the CPU default) and traced; eagerly one scan program beats op-by-op.
  if layer_unroll(config) == config.num_layers and isinstance(x, jax.core.Tracer):
    for i in range(config.num_layers):
      layer_xs = (layer_params(stacked, i, config.num_layers),
                  None if windows is None else windows[i], None if rope is None else rope[i])
      x, _ = body(x, layer_xs)
    return x
  x, _ = jax.lax.scan(body, x, (stacked, windows, rope), unroll=layer_unroll(config))
  return x


def _scan_groups(body, x: Array, xs, config: ModelConfig) -> Array:
  """The layer scan of `body` (one checkpointed layer) as a scan over L / g groups of
  g = `remat_group` layers, each group a checkpointed inner scan: the outer scan saves only each
  group's input, and the backward recomputes a group's forward (saving its layers' inputs)
  before the layers' own recomputation."""
  g = config.remat_group
  grouped = jax.tree.map(lambda a: a.reshape(a.shape[0] // g, g, *a.shape[1:]), xs)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def group(carry: Array, group_xs) -> tuple[Array, None]:
    return jax.lax.scan(body, carry, group_xs)[0], None

  return jax.lax.scan(group, x, grouped)[0]


# `ModelConfig.remat_policy` -> what `jax.checkpoint` saves (None: nothing).
_REMAT_POLICIES = {"nothing": None,
                   "dots": jax.checkpoint_policies.save_from_both_policies(
                     jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                     jax.checkpoint_policies.save_only_these_names(_LORA_MATMUL))}


# Per-layer parameters used elementwise (not as a matmul operand).
_ELEMENTWISE_SUFFIXES = ("_norm", "_bias")


def layer_params(stacked: dict[str, Array], i: int, num_layers: int) -> dict[str, Array]:
  """Layer `i`'s parameters from the stacked [L, ...] ones, for the unrolled layers.

  Matmul weights are sliced. The elementwise ones (norm scales, biases) are selected by a
  contraction with the one-hot row e_i (HIGHEST precision: exactly the slice for finite
  values; a non-finite entry of any layer would reach every layer as 0·inf = NaN). The reason
  is compile time: XLA:CPU fuses a slice into each consumer kernel with the layer's offset as a
  constant, so the L copies of every norm / bias kernel (forward and backward) differ and are
  compiled L times; a contraction's result is an operand, so the L copies are one program,
  compiled once (the GRPO update of `benchmarks/grpo_step.py`: 218 -> 186 distinct kernels,
  ~30 % less XLA compile time; runtime unchanged)."""
  onehot = np.arange(num_layers) == i

  def take(name: str, a: Array) -> Array:
    if (name.endswith(_ELEMENTWISE_SUFFIXES) and isinstance(a, jax.Array)
        and jnp.issubdtype(a.dtype, jnp.floating)):
      return jnp.tensordot(jnp.asarray(onehot, a.dtype), a, axes=1,
                           precision=jax.lax.Precision.HIGHEST)
    return a[i]

  return {name: take(name, a) for name, a in stacked.items()}


def layer_unroll(config: ModelConfig) -> int:
  """`config.scan_unroll`, or by backend: every layer on CPU without remat, else one per
  iteration (XLA:CPU runs the unrolled layers 4–5 % faster without remat and 13–50 % slower
  with it: BENCHMARKS.md, LoRA)."""
  if config.scan_unroll is not None:
    return min(config.scan_unroll, config.num_layers)
  return config.num_layers if jax.default_backend() == "cpu" and not config.remat else 1


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


class DecoderLayers(nnx.Module):
  """The N decoder layers' parameters, each stacked along a leading `layers` axis."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    shapes = {n: (config.num_layers, *s) for n, s in _layer_shapes(config).items()}
    self.names = tuple(sorted(shapes))
    values = _init_values(shapes, rngs.params(), config.param_dtype,
                          norm_value=0.0 if config.norm_plus_one else 1.0)
    for name in self.names:
      setattr(self, name, logical_param(values[name], LAYER_AXES[name]))

  def stacked(self) -> dict[str, Array]:
    """{name: [L, ...] array} of all layer parameters."""
    return {name: getattr(self, name)[...] for name in self.names}

  def __call__(self, x: Array, cos: Array, sin: Array, attend: Attend) -> Array:
    return scan_layers(self.stacked(), x, cos, sin, attend, self.config)


class Transformer(nnx.Module):
  """Decoder-only causal LM.

  Example:
    >>> config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                      num_layers=2, num_heads=4, num_kv_heads=2)
    >>> model = Transformer(config, rngs=nnx.Rngs(0))
    >>> logits = model(input_ids, attention_mask)                    # [B, T, V] float32
    >>> hidden = model.hidden_states(input_ids, attention_mask)      # [B, T, D]
    >>> logp = logprobs_from_hidden(hidden, model.unembedding, tokens, chunk_size=...)
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    shapes = {"embed": (c.vocab_size, c.hidden_size), "final_norm": (c.hidden_size,)}
    if not c.tie_word_embeddings:
      shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    values = _init_values(shapes, rngs.params(), c.param_dtype,
                          norm_value=0.0 if c.norm_plus_one else 1.0)
    self.embed = logical_param(values["embed"], EMBED_AXES)
    self.layers = DecoderLayers(config, rngs=rngs)
    self.final_norm = logical_param(values["final_norm"], FINAL_NORM_AXES)
    if not c.tie_word_embeddings:
      self.lm_head = logical_param(values["lm_head"], LM_HEAD_AXES)

  @property
  def unembedding(self) -> Array:
    """[V, D] unembedding: the embedding table if tied, else lm_head (HF `lm_head.weight` layout)."""
    if self.config.tie_word_embeddings:
      return self.embed[...]
    return self.lm_head[...]

  def hidden_states(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
  ) -> Array:
    """Final (normed) hidden states [B, T, D] in `config.dtype`.

    Args:
      input_ids: [B, T] int token ids.
      attention_mask: [B, T] (bool or 0/1), 1 marks a real token; default all ones. Padding
        may be on the left (prompts) or right; masked keys are never attended to.
      positions: [B, T] int position ids; default cumsum(attention_mask) - 1 clipped at 0
        (so a left-padded row gets the same positions as its unpadded version), or with
        `segment_ids` the offset in the segment (`positions_from_segments`).
      segment_ids: [B, T] int ids of packed sequences (`rljax.data.packing`), or None (one
        sequence per row): a token attends only to earlier tokens with its own id.
    """
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    check_integer_ids("input_ids", input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(
        f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
      )
    if segment_ids is not None and segment_ids.shape != input_ids.shape:
      raise ValueError(
        f"segment_ids shape {segment_ids.shape} != input_ids shape {input_ids.shape}"
      )
    if positions is None:
      positions = (positions_from_mask(attention_mask) if segment_ids is None
                   else positions_from_segments(segment_ids))
    x = constrain(input_embeddings(self.embed[...], input_ids, c), HIDDEN_AXES)
    cos, sin = rope_tables(positions, c)
    x = self.layers(x, cos, sin, self_attention(c, attention_mask, positions, segment_ids))
    return norm(x, self.final_norm[...], c)

  def logits_from_hidden(self, hidden: Array) -> Array:
    """[B, T, D] hidden states → [B, T, V] float32 logits, soft-capped by
    `final_logit_softcap` (Gemma 2); the sampler's and the KV-cache passes' logits too."""
    logits = jnp.einsum(
      "btd,vd->btv",
      hidden.astype(jnp.float32),
      self.unembedding.astype(jnp.float32),
      preferred_element_type=jnp.float32,
    )
    return soft_cap(logits, self.config.final_logit_softcap)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
  ) -> Array:
    """Logits [B, T, V] (float32); see `hidden_states` for the arguments."""
    return self.logits_from_hidden(
      self.hidden_states(input_ids, attention_mask, positions, segment_ids)
    )

  def init_cache(self, batch_size: int, max_length: int):
    """An empty `KVCache` for `batch_size` rows and `max_length` slots (see rljax.models.kv_cache)."""
    from rljax.models.kv_cache import init_kv_cache  # kv_cache builds on this module

    return init_kv_cache(self.config, batch_size, max_length)

  def forward_with_cache(self, input_ids, cache, index, attention_mask=None, positions=None):
    """(logits [B, T, V] of new tokens at slots index.., updated cache); see `forward_with_cache`."""
    from rljax.models.kv_cache import forward_with_cache

    return forward_with_cache(self, input_ids, cache, index, attention_mask, positions)
