"""Context parallelism: self-attention of rows split along T over a mesh axis (MaxText style).

Every rule set maps the `sequence` logical axis (the token axis T of activations) to the
`context` mesh axis, which `make_mesh` builds when `MeshConfig.context` = n > 1. The
Transformer's activations are then split along T: device r holds slots r·T/n .. (r+1)·T/n − 1
of every row. Everything but attention is per token; attention runs in `jax.shard_map`, each
device on its own queries (`context_parallel`):

    K, V = all_gather_T(K_r), all_gather_T(V_r)        (per layer, over the sequence's mesh axes)
    O_r  = attend(Q_r, K, V; query_offset = r · T/n)   (the blockwise core at the queries' slots)

The backward runs per shard too: each shard's custom VJP gives dQ_r and its contributions to
the dK, dV of every slot, and the all-gather's transpose (a reduce-scatter) sums them onto the
shards that own those slots. A layer keeps O(T/n) activations per device for its backward, plus
the gathered K, V (2·B·T·KV·Dh elements; XLA keeps the forward's gather rather than gathering
again; `ModelConfig.remat` recomputes the layer instead). The [B, T] key mask, positions and
segment ids are replicated along T once per forward (before the layer scan), not per layer.

Not implemented: a load-balanced token order (causal attention gives the last shard the most
key blocks and the first the fewest) and ring (permute-based) attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from rljax.parallel.mesh import _divisible_spec
from rljax.parallel.rules import (
  ACT_HEADS,
  ACT_KV_HEADS,
  BATCH,
  SEQUENCE,
  _as_tuple,
  current_rules,
  logical_to_mesh_spec,
)

Array = jax.Array
# How `context_parallel` splits its inputs: q [B, T, H, Dh], k / v [B, T, KV, Dh].
QUERY_AXES = (BATCH, SEQUENCE, ACT_HEADS, None)
KEY_AXES = (BATCH, SEQUENCE, ACT_KV_HEADS, None)
# attend(q_r, k, v, query_offset, key_inputs, window) -> o_r on one shard (see context_parallel).
ShardAttend = Callable[..., Array]


def sequence_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) the current rules split the `sequence` axis over on the current
  mesh; () with no mesh, no rules, or no split."""
  rules, mesh = current_rules(), jax.sharding.get_abstract_mesh()
  if mesh.empty or not rules:
    return ()
  axes = _as_tuple(logical_to_mesh_spec((BATCH, SEQUENCE), rules, mesh)[1])  # as in QUERY_AXES
  return tuple(a for a in axes if mesh.shape[a] > 1)


def context_shards() -> int:
  """n, the number of pieces the current mesh and rules split activations into along T (1:
  no context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in sequence_axes())


def _specs(q: Array, k: Array) -> tuple[PartitionSpec, PartitionSpec]:
  """The shard_map specs of q and k / v by their logical axes (a dimension its mesh axes do not
  divide is left whole, as `constrain` does); heads are split only if both q's and k's are, so
  each shard keeps whole groups of query heads with their key / value head."""
  rules, mesh = current_rules(), jax.sharding.get_abstract_mesh()
  q_spec, kv_spec = (_divisible_spec(logical_to_mesh_spec(axes, rules, mesh), x.shape, mesh)
                     for axes, x in ((QUERY_AXES, q), (KEY_AXES, k)))
  if q_spec[2] != kv_spec[2]:
    q_spec, kv_spec = (PartitionSpec(*spec[:2], None, None) for spec in (q_spec, kv_spec))
  return q_spec, kv_spec


def context_parallel(
  attend: ShardAttend, key_inputs: Sequence[Array | None]
) -> Callable[[Array, Array, Array, Array | None], Array]:
  """`attention(q, k, v, window)` of rows split along T, computed per shard (module doc).

  Call it once per forward, outside the layer scan, under the mesh and rules that split the
  `sequence` axis (`context_shards() > 1`).

  Args:
    attend: `attend(q_r, k, v, query_offset, key_inputs, window) -> o_r`, the attention of one
      shard: q_r [B', T/n, H', Dh] its queries, k, v [B', T, KV', Dh] every slot's keys and
      values, query_offset the (traced) slot of q_r's first query, key_inputs the [B', T]
      arrays below (None kept), window as given; B', H', KV' are the batch and heads of a
      shard when the rules split those too.
    key_inputs: [B, T] arrays of the slots (key mask, positions, segment ids; None allowed).

  Returns:
    `attention(q, k, v, window)`: q [B, T, H, Dh], k, v [B, T, KV, Dh] split along T by the
    rules (logical axes `QUERY_AXES`, `KEY_AXES`), window None or a scalar; returns [B, T, H, Dh]
    split like q.

  Raises:
    ValueError: no split along T, or T not divisible by the number of shards.
  """
  n = context_shards()
  length = next(x for x in key_inputs if x is not None).shape[1]
  if n == 1:
    raise ValueError("context_parallel: the current mesh and rules do not split `sequence`")
  if length % n:
    raise ValueError(
      f"context parallelism splits T = {length} tokens over {n} devices (mesh axes "
      f"{sequence_axes()}); T must be a multiple of {n} (pad the rows or change "
      f"MeshConfig.context)"
    )
  mesh = jax.sharding.get_abstract_mesh()
  present = [i for i, x in enumerate(key_inputs) if x is not None]
  batch = _divisible_spec(logical_to_mesh_spec((BATCH,), current_rules(), mesh),
                          key_inputs[present[0]].shape[:1], mesh)[0]
  key_spec = PartitionSpec(batch, None)  # every slot on every shard of a row
  replicated = [jax.lax.with_sharding_constraint(key_inputs[i], NamedSharding(mesh, key_spec))
                for i in present]

  def attention(q: Array, k: Array, v: Array, window: Array | None = None) -> Array:
    q_spec, kv_spec = _specs(q, k)
    axes = q_spec[1]  # the sequence's mesh axes

    def shard(q, k, v, inputs, *window):
      k, v = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v))
      full = [None] * len(key_inputs)
      for i, x in zip(present, inputs):
        full[i] = x
      offset = jax.lax.axis_index(axes) * q.shape[1]
      return attend(q, k, v, offset, tuple(full), *window or (None,))

    windows = () if window is None else (window,)
    specs = (q_spec, kv_spec, kv_spec, [key_spec] * len(replicated),
             *[PartitionSpec()] * len(windows))
    # check_vma=False: the blockwise core's loop carries start replicated (zeros) and become
    # per-shard values, which the varying-axes check rejects; the gradients are checked against
    # one device's in tests/parallel/test_context_parallel.py.
    return jax.shard_map(shard, in_specs=specs, out_specs=q_spec, check_vma=False)(
      q, k, v, replicated, *windows)

  return attention
