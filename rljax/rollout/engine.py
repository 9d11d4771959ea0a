"""The rollout engine: continuous batching over a fixed number of decode slots with a paged,
prefix-shared KV cache.

`engine_generate` returns the `Rollout` of `generate` for the same arguments (the same tokens
for the same key: token t of request r is drawn with fold_in(fold_in(key, r), t) by both), but
it never decodes a finished row. R = B·G requests (prompt i, sample j → request i·G + j) are
served by `num_slots` decode slots; when a request stops (a stop token or its budget), its slot
takes the next pending request. The host runs the schedule between device calls (`EngineRun`:
`engine_generate` advances one until every request is done), jitted programs with static shapes
(compiled once per shape and options):

  prefill   `prefill_rows` prompts (padding stripped, right-aligned to a multiple of the block
            size) through the model, their keys / values written into blocks of the pool and
            the last hidden state kept per prompt;
  decode    first the admission: new requests take free slots, the first token sampled from
            the prompt's last hidden state, the slot's block table naming the prompt's full
            blocks (shared by the G samples, never written again) and blocks of its own (a copy
            of the prompt's partial last block, then fresh ones); then up to `sync_every` steps
            of every slot (`rljax.models.paged_kv.decode_hidden`: attention over a slot's blocks
            only) in a `lax.while_loop` that returns to the host as soon as `refill_slots` slots
            are free and requests wait. Its prologue first rewinds the slots whose requests the
            host cut at a stop string (`rewind`), before admitting new ones;
  extend    (extensible slots, `EngineRun(hold=True)`) paused slots fed a chunk of token ids
            at their own positions — the slot's cached keys gathered from its blocks, the chunk
            attending causally, its keys written back — and their next token sampled.

Stop strings (`stop_strings=`, `rljax.rollout.stops`): between device calls the host decodes the
new tokens of each request's current turn (every prefix once) and ends it at the first token
whose text completes a stop string; the next device call rewinds the slot to the cut (the
keys cached past it are ignored, then overwritten), so a held request can continue from there,
and the tokens sampled past the cut are dropped from the `Rollout`.

Extensible slots (`hold=True`): a request whose turn ends keeps its slot and blocks, paused;
the host `extend`s it (a multi-turn environment's observation) or `finish`es it. Held requests
(`held=`) wait until `release`d: dynamic sampling's resamples enter free slots of the same run
(`rljax.train.dynamic_sampling.stream_informative`).

On a mesh both run per data shard (`mesh=`): each device group of the data axes holds its own
slots, pool and share of the prompts.

Requests are admitted longest budget first (the order of the requests among equal budgets, so
without per-request budgets first come, first served): the longest ones do not start last and
run alone at the end. Blocks are reserved at admission for the request's whole budget (prompt +
max new tokens), so a running request never waits for or loses a block; a request that does not
fit waits until enough blocks are free. The pool is sized by the tokens in flight
(`EngineConfig.num_blocks`), not by R · (P + N).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rljax.models.config import ModelConfig
from rljax.models.kv_cache import KVCache, hidden_states_with_cache, init_kv_cache
from rljax.models.paged_kernels import DECODE_ATTENTION
from rljax.models.paged_kv import (
  NULL_BLOCK,
  PagedKV,
  copy_blocks,
  decode_hidden,
  unstacked_layers,
  write_blocks,
  write_recent,
)
from rljax.models.transformer import config_of
from rljax.ops._checks import check_choice, check_int
from rljax.parallel.rules import DATA, FSDP
from rljax.rollout.generate import (
  Rollout,
  _check_key,
  _check_prompts,
  _is_stop,
  _split_model,
  check_token_ids,
  sampling_from_arguments,
)
from rljax.rollout.sampling import SamplingConfig, request_keys, sample_next_token
from rljax.rollout.stops import check_stop_strings, stop_length

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Sizes of the rollout engine (`engine_generate`); every field None takes a default from the
  call (R requests, P prompt slots, N = max_new_tokens, G samples per prompt).

  Attributes:
    num_slots: decode rows run at once (None: min(R, 32)).
    block_size: tokens per KV block (16).
    num_blocks: blocks in the pool, the null block included (None: enough for every slot to
      hold a request of P + N tokens besides the prompts of ⌈num_slots / G⌉ + 1 groups).
    sync_every: decode steps per device call at most (32): how often the host looks at the
      slots when none frees up.
    refill_slots: slots freed since the last admission that send the decode loop back to the
      host to admit waiting requests (None: max(1, num_slots // 8)).
    prefill_rows: prompts per prefill call (None: ⌈num_slots / G⌉).
    min_slots: once no request waits, the slots are halved while the live requests fit (the
      live slots compacted into a smaller program, one more compile per size), down to this
      many (None: ⌈num_slots / 4⌉; num_slots: never) — the drain at the end costs what its
      live rows cost, not what every slot does.
    blocks_per_step: KV blocks of one slot per chunk of the decode attention's work list (4: 64
      keys of 16-token blocks; on CPU as fast as 8 at equal lengths and faster on ragged ones,
      `benchmarks/rollout_engine.py`; the Pallas kernel's pages per compute block).
    attention: the decode step's attention over the pool (`rljax.models.paged_kernels`): "auto"
      (the backend's kernel where it supports the model, else "blockwise"), "blockwise" (the
      pure-JAX loop over blocks), "pallas" (JAX's Pallas GPU paged-attention kernel) or
      "ragged" (TPU, unsupported: says why); a named kernel that cannot run raises.
  """

  num_slots: int | None = None
  block_size: int = 16
  num_blocks: int | None = None
  sync_every: int = 32
  refill_slots: int | None = None
  prefill_rows: int | None = None
  min_slots: int | None = None
  blocks_per_step: int = 4
  attention: str = "auto"

  def __post_init__(self) -> None:
    check_choice("attention", self.attention, DECODE_ATTENTION)
    if None not in (self.num_slots, self.min_slots) and self.min_slots > self.num_slots:
      raise ValueError(f"`min_slots` ({self.min_slots}) must be at most `num_slots` "
                       f"({self.num_slots}).")
    for name in ("num_slots", "num_blocks", "refill_slots", "prefill_rows", "min_slots"):
      check_int(name, getattr(self, name), 2 if name == "num_blocks" else 1, optional=True)
    for name in ("block_size", "sync_every", "blocks_per_step"):
      check_int(name, getattr(self, name), 1)


class _Options(NamedTuple):
  """Static (hashable) options of the compiled programs."""

  temperature: float
  top_k: int | None
  top_p: float | None
  stop_tokens: tuple[int, ...]
  blocks_per_step: int
  attention: str


class _Slots(NamedTuple):
  """Device state of the decode slots ([S] each; `table` [S, MB])."""

  tokens: Array  # the token each slot feeds next (its last sampled one)
  lengths: Array  # cached tokens = the position of `tokens`
  steps: Array  # completion tokens sampled so far
  budgets: Array  # the request's max new tokens
  requests: Array  # request id (R when idle)
  active: Array  # bool
  table: Array  # block table


class _Outputs(NamedTuple):
  """Per-request results: tokens, logprobs [R, N]; lengths, finished [R]."""

  tokens: Array
  logprobs: Array
  lengths: Array
  finished: Array


def _sample(model, hidden: Array, key: Array, requests: Array, steps: Array, o: _Options):
  logits = model.logits_from_hidden(hidden[:, None])[:, 0]
  return sample_next_token(logits, request_keys(key, requests, steps),
                           temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)


def _record(out: _Outputs, requests: Array, steps: Array, token: Array, logp: Array,
            write: Array, done: Array, stopped: Array) -> _Outputs:
  """`out` with token `steps` of each writing slot's request recorded, and the lengths /
  finished flags of the requests that are done (rows of other slots are dropped)."""
  rows = out.tokens.shape[0]
  at = jnp.where(write, requests, rows)
  end = jnp.where(done, requests, rows)
  return _Outputs(
    tokens=out.tokens.at[at, steps].set(token, mode="drop"),
    logprobs=out.logprobs.at[at, steps].set(logp.astype(out.logprobs.dtype), mode="drop"),
    lengths=out.lengths.at[end].set(steps + 1, mode="drop"),
    finished=out.finished.at[end].set(stopped, mode="drop"),
  )


class _Shards(NamedTuple):
  """Where the engine runs: one shard without a mesh, else one per device group of the mesh's
  data axes, each with its own slots, pool and requests (hashable: a static argument)."""

  mesh: Any  # None or a jax.sharding.Mesh
  axes: tuple[str, ...]  # the data axes (data, fsdp) present in the mesh

  @property
  def count(self) -> int:
    return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.axes)

  @property
  def spec(self) -> PartitionSpec:
    return PartitionSpec(self.axes or None)

  @property
  def lockstep(self) -> bool:
    """Whether the model is split inside a shard (e.g. `tensor` > 1): its collectives in the
    decode loop need every device at every step, so the shards' loops step together."""
    return self.mesh is not None and any(
      size > 1 for axis, size in self.mesh.shape.items() if axis not in self.axes)


def _shards(mesh: Any) -> _Shards:
  return _Shards(None, ()) if mesh is None else _Shards(
    mesh, tuple(a for a in (DATA, FSDP) if a in mesh.axis_names))


def _each_shard(shards: _Shards, fn, shared: Any, *data: Any):
  """fn(shared, *one shard's data) for every shard: the leaves of `data` carry a leading shard
  axis [D, ...], those of `shared` (parameters, key) none. On a mesh each shard's slice runs
  on its own devices in a `shard_map` over the data axes (manual there, the others automatic):
  the shards never communicate, so the decode loop holds no collective."""

  def one(shared, *data):
    out = fn(shared, *jax.tree.map(lambda x: x[0], data))
    return jax.tree.map(lambda x: x[None], out)

  if shards.mesh is None:
    return one(shared, *data)
  return jax.shard_map(one, mesh=shards.mesh, in_specs=(PartitionSpec(),) + (shards.spec,) *
                       len(data), out_specs=shards.spec, axis_names=frozenset(shards.axes),
                       check_vma=False)(shared, *data)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _initial_state(shards: _Shards, config: ModelConfig, layout: _Layout, prompts: int,
                   requests: int, max_new_tokens: int, pad_id: int):
  """(pool, last hidden states [D, prompts, D_model], idle slots, outputs of `requests` rows)
  of every shard, made on the shards' devices (never whole on one)."""
  d, s, n, rd = shards.count, layout.slots, max_new_tokens, requests

  def full(shape, fill, dtype):
    x = jnp.full((d, *shape), fill, dtype)
    return x if shards.mesh is None else jax.lax.with_sharding_constraint(
      x, NamedSharding(shards.mesh, shards.spec))

  c = config
  pool_shape = (c.num_layers, c.num_kv_heads, layout.num_blocks, layout.block_size, c.head_dim)
  pool = PagedKV(k=full(pool_shape, 0, c.dtype), v=full(pool_shape, 0, c.dtype))
  slots = _Slots(tokens=full((s,), 0, jnp.int32), lengths=full((s,), 0, jnp.int32),
                 steps=full((s,), 0, jnp.int32), budgets=full((s,), 1, jnp.int32),
                 requests=full((s,), rd, jnp.int32), active=full((s,), False, jnp.bool_),
                 table=full((s, layout.table_width), NULL_BLOCK, jnp.int32))
  out = _Outputs(tokens=full((rd, n), pad_id, jnp.int32), logprobs=full((rd, n), 0, jnp.float32),
                 lengths=full((rd,), 0, jnp.int32), finished=full((rd,), False, jnp.bool_))
  return pool, full((prompts, c.hidden_size), 0, c.dtype), slots, out


@functools.partial(jax.jit, static_argnums=(0,))
def _compact(shards: _Shards, slots: _Slots, index: Array) -> _Slots:
  """Per shard: the slots `index` [S'] of `slots`, in that order (S' < S)."""
  return _each_shard(shards, lambda _, slots, index: jax.tree.map(lambda x: x[index], slots),
                     (), slots, index)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _prefill(shards: _Shards, graphdef, params, pool: PagedKV, last_hidden: Array,
             tokens: Array, lengths: Array, blocks: Array, prompts: Array):
  """Per shard: prompts [R, Pb] (right-padded; `lengths` real tokens) into the pool's `blocks`
  [R, Pb/bs] and their last hidden state into `last_hidden[prompts]` (rows with prompt id out
  of range are dropped)."""

  def prefill(params, pool, last_hidden, tokens, lengths, blocks, prompts):
    model = nnx.merge(graphdef, params)
    rows, length = tokens.shape
    mask = jnp.arange(length)[None, :] < lengths[:, None]
    cache = init_kv_cache(model.config, rows, length, dtype=pool.k.dtype)
    hidden, cache = hidden_states_with_cache(model, tokens, cache, 0, mask)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    pool = write_blocks(pool, cache.k, cache.v, blocks)
    return pool, last_hidden.at[prompts].set(last.astype(last_hidden.dtype), mode="drop")

  return _each_shard(shards, prefill, params, pool, last_hidden, tokens, lengths, blocks,
                     prompts)


def _admit(model, o: _Options, pool: PagedKV, slots: _Slots, out: _Outputs,
           last_hidden: Array, key: Array, first: Array, admit: Array, requests: Array,
           prompts: Array, budgets: Array, lengths: Array, table: Array, copy_source: Array,
           copy_target: Array):
  """New requests into the slots where `admit` [S]: copy their private blocks, sample token 0
  from the prompt's last hidden state, set the slot state. `first` is the global id of the
  shard's request 0 (its keys are the requests' global ones)."""
  pool = copy_blocks(pool, copy_source, copy_target)
  zero = jnp.zeros_like(requests)
  token, logp = _sample(model, last_hidden[prompts], key, first + requests, zero, o)
  stopped = _is_stop(token, o.stop_tokens)
  done = admit & (stopped | (budgets <= 1))
  out = _record(out, requests, zero, token, logp, admit, done, stopped)

  def pick(new, old):
    return jnp.where(admit.reshape(admit.shape + (1,) * (new.ndim - 1)), new, old)

  slots = _Slots(tokens=pick(token, slots.tokens), lengths=pick(lengths, slots.lengths),
                 steps=pick(jnp.ones_like(zero), slots.steps), budgets=pick(budgets, slots.budgets),
                 requests=pick(requests, slots.requests), active=pick(~done, slots.active),
                 table=pick(table, slots.table))
  return pool, slots, out


def _rewound(slots: _Slots, out: _Outputs, rewind: Array) -> tuple[_Slots, _Outputs]:
  """The slots where `rewind` [S] ≥ 0 (requests the host cut at a stop string) set back to
  that many completion tokens and deactivated: their last kept token becomes the one they feed
  next, the keys cached past it are ignored (positions ≥ `lengths`) and later overwritten; the
  request's length is the cut, `finished` True."""
  cut = rewind >= 0
  rows = out.tokens.shape[0]
  request = jnp.minimum(slots.requests, rows - 1)
  kept = out.tokens[request, jnp.maximum(rewind - 1, 0)]
  end = jnp.where(cut, slots.requests, rows)
  slots = slots._replace(tokens=jnp.where(cut, kept, slots.tokens),
                         lengths=slots.lengths - jnp.where(cut, slots.steps - rewind, 0),
                         steps=jnp.where(cut, rewind, slots.steps), active=slots.active & ~cut)
  out = out._replace(lengths=out.lengths.at[end].set(rewind, mode="drop"),
                     finished=out.finished.at[end].set(True, mode="drop"))
  return slots, out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6, 7))
def _decode(shards: _Shards, graphdef, o: _Options, max_steps: int, params, pool: PagedKV,
            slots: _Slots, out: _Outputs, last_hidden: Array, key: Array, first: Array,
            want_free: Array, admission: tuple[Array, ...], rewind: Array):
  """Per shard: the slots `rewind` [S] cuts (`_rewound`), the `admission` (`_admit`'s
  arguments from `admit` on: none where its mask is all False), then decode steps of every
  active slot until `max_steps` steps, no active slot, or at least `want_free` free slots. The
  new tokens' keys and values are kept in a [L, S, max_steps, KV, Dh] buffer and written into
  the pool once at the end: the pool is an invariant of the loop (written inside it, XLA
  copied it at every step)."""

  def decode(shared, pool, slots, out, last_hidden, first, want_free, admission, rewind):
    params, key = shared
    model = nnx.merge(graphdef, params)
    slots, out = _rewound(slots, out, rewind)
    pool, slots, out = _admit(model, o, pool, slots, out, last_hidden, key, first, *admission)
    c = model.config
    layers = unstacked_layers(model)  # sliced once, outside the loop (None: scanned layers)
    start = jnp.where(slots.active, slots.lengths, 0)  # the tokens in the pool
    shape = (c.num_layers, slots.tokens.shape[0], max_steps, c.num_kv_heads, c.head_dim)
    recent = PagedKV(k=jnp.zeros(shape, pool.k.dtype), v=jnp.zeros(shape, pool.v.dtype))

    def running(carry):
      i, _, s, _ = carry
      return (i < max_steps) & jnp.any(s.active) & (jnp.sum(~s.active) < want_free)

    def step(carry):
      i, recent, s, out = carry
      # In lockstep a shard that is done idles (it stays done: `running` is monotone).
      live = s.active & running(carry) if shards.lockstep else s.active
      count = jnp.where(live, s.lengths - start, 0)
      hidden, k_new, v_new = decode_hidden(model, s.tokens, pool, s.table, start,
                                           blocks_per_step=o.blocks_per_step, layers=layers,
                                           recent=recent, recent_count=count,
                                           attention=o.attention)
      recent = PagedKV(*(jax.lax.dynamic_update_index_in_dim(r, new, i, axis=2)
                         for r, new in zip(recent, (k_new, v_new))))
      token, logp = _sample(model, hidden, key, first + s.requests, s.steps, o)
      stopped = _is_stop(token, o.stop_tokens)
      done = live & (stopped | (s.steps + 1 >= s.budgets))
      out = _record(out, s.requests, s.steps, token, logp, live, done, stopped)
      grow = live.astype(jnp.int32)
      s = s._replace(tokens=jnp.where(live, token, s.tokens), lengths=s.lengths + grow,
                     steps=s.steps + grow, active=s.active & ~done)
      return i + 1, recent, s, out

    def any_running(carry):
      go = running(carry)
      return jax.lax.pmax(go.astype(jnp.int32), shards.axes) > 0 if shards.lockstep else go

    active = slots.active
    _, recent, slots, out = jax.lax.while_loop(any_running, step, (jnp.zeros((), jnp.int32),
                                                                   recent, slots, out))
    count = jnp.where(active, slots.lengths - start, 0)
    return write_recent(pool, recent, slots.table, start, count), slots, out

  return _each_shard(shards, decode, (params, key), pool, slots, out, last_hidden, first,
                     want_free, admission, rewind)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4, 5, 6))
def _extend(shards: _Shards, graphdef, o: _Options, params, pool: PagedKV, slots: _Slots,
            out: _Outputs, key: Array, first: Array, rewind: Array, rows: Array, chunk: Array,
            chunk_lengths: Array, budgets: Array):
  """Per shard: the cuts `rewind` (`_rewound`), then each paused slot `rows` [E] (S: padding)
  extended by its first `chunk_lengths` [E] tokens of `chunk` [E, K] at its own positions, and
  its next token sampled; `budgets` [E] its new max completion tokens.

  The slot feeds its pending token (the last it sampled) and the chunk, n = 1 + chunk_length
  tokens at positions lengths … lengths + n − 1, attending to its cached keys (gathered from
  its blocks) and causally to each other; their keys go into its blocks, the chunk into the
  request's completion at steps … steps + chunk_length − 1 (log-prob 0: not the policy's),
  and the token sampled from the last one's hidden state is completion token
  steps + chunk_length (its key fold_in(fold_in(key, r), that index), as every token's)."""

  def extend(shared, pool, slots, out, first, rewind, rows, chunk, chunk_lengths, budgets):
    params, key = shared
    model = nnx.merge(graphdef, params)
    slots, out = _rewound(slots, out, rewind)
    c = model.config
    e, k = chunk.shape
    valid = rows < slots.tokens.shape[0]
    row = jnp.minimum(rows, slots.tokens.shape[0] - 1)
    table, length, steps = slots.table[row], slots.lengths[row], slots.steps[row]
    tokens = jnp.concatenate([slots.tokens[row][:, None], chunk], axis=1)  # [E, 1 + K]
    count = jnp.where(valid, chunk_lengths + 1, 0)
    width = table.shape[1] * pool.block_size

    def cached(x):  # [L, KV, NB, bs, Dh] -> [L, E, MB·bs + 1 + K, KV, Dh], new slots zero
      x = jnp.moveaxis(x[:, :, table].reshape(c.num_layers, c.num_kv_heads, e, width, -1), 1, 3)
      return jnp.pad(x, ((0, 0), (0, 0), (0, 1 + k), (0, 0), (0, 0)))

    new = jnp.arange(1 + k)[None, :]
    cache = KVCache(k=cached(pool.k), v=cached(pool.v),
                    mask=jnp.pad(jnp.arange(width)[None, :] < length[:, None], ((0, 0), (0, 1 + k))),
                    positions=jnp.pad(jnp.broadcast_to(jnp.arange(width), (e, width)),
                                      ((0, 0), (0, 1 + k))))
    hidden, cache = hidden_states_with_cache(model, tokens, cache, width, new < count[:, None],
                                             length[:, None] + new)
    written = PagedKV(k=cache.k[:, :, width:], v=cache.v[:, :, width:])
    pool = write_recent(pool, written, table, length, count)
    last = jnp.take_along_axis(hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    at = jnp.where(valid, slots.requests[row], out.tokens.shape[0])
    index = steps[:, None] + jnp.arange(k)[None, :]
    index = jnp.where(jnp.arange(k)[None, :] < chunk_lengths[:, None], index, out.tokens.shape[1])
    out = out._replace(tokens=out.tokens.at[at[:, None], index].set(chunk, mode="drop"),
                       logprobs=out.logprobs.at[at[:, None], index].set(0.0, mode="drop"))
    position = steps + chunk_lengths  # the new token's completion index
    token, logp = _sample(model, last, key, first + slots.requests[row], position, o)
    stopped = _is_stop(token, o.stop_tokens)
    done = valid & (stopped | (position + 1 >= budgets))
    out = _record(out, slots.requests[row], position, token, logp, valid, done, stopped)
    target = jnp.where(valid, rows, slots.tokens.shape[0])

    def put(x, value):
      return x.at[target].set(value, mode="drop")

    slots = slots._replace(tokens=put(slots.tokens, token), lengths=put(slots.lengths, length + count),
                           steps=put(slots.steps, position + 1), budgets=put(slots.budgets, budgets),
                           active=put(slots.active, ~done))
    return pool, slots, out

  return _each_shard(shards, extend, (params, key), pool, slots, out, first, rewind, rows, chunk,
                     chunk_lengths, budgets)


# ----------------------------------------------------------------------------------------------
# The host side: block allocation and the schedule.
# ----------------------------------------------------------------------------------------------


def _blocks(tokens: int, block_size: int) -> int:
  return -(-tokens // block_size)


class _Layout(NamedTuple):
  """The static sizes of one `engine_generate` call."""

  slots: int
  block_size: int
  num_blocks: int
  table_width: int  # MB: blocks per slot, a multiple of blocks_per_step
  blocks_per_step: int  # at most the blocks one request can hold
  prompt_width: int  # Pb: prompt tokens per prefill row, a multiple of block_size
  prefill_rows: int
  refill_slots: int
  sync_every: int
  min_slots: int


def engine_layout(engine: EngineConfig, *, requests: int, prompt_length: int,
                  max_new_tokens: int, num_samples: int) -> _Layout:
  """The engine's sizes for R = `requests` requests of prompts padded to `prompt_length` with
  up to `max_new_tokens` new tokens (defaults of `EngineConfig` filled in); raises ValueError
  when the pool cannot hold one request."""
  bs = engine.block_size
  slots = engine.num_slots or min(requests, 32)
  per_request = _blocks(prompt_length + max_new_tokens - 1, bs) + 1  # + a partial-block copy
  groups = _blocks(slots, num_samples) + 1
  num_blocks = engine.num_blocks or 1 + slots * _blocks(max_new_tokens - 1 + bs, bs) + (
    groups * _blocks(prompt_length, bs))
  if num_blocks - 1 < per_request:
    raise ValueError(f"EngineConfig.num_blocks={num_blocks} cannot hold one request of "
                     f"{prompt_length} + {max_new_tokens} tokens in blocks of {bs} (it needs "
                     f"{per_request} besides the null block).")
  width = _blocks(prompt_length + max_new_tokens, bs)
  step_blocks = min(engine.blocks_per_step, width)  # reads past a request's blocks are waste
  return _Layout(
    slots=slots, block_size=bs, num_blocks=num_blocks,
    table_width=_blocks(width, step_blocks) * step_blocks, blocks_per_step=step_blocks,
    prompt_width=_blocks(prompt_length, bs) * bs,
    prefill_rows=engine.prefill_rows or _blocks(slots, num_samples),
    refill_slots=engine.refill_slots or max(1, slots // 8),
    sync_every=min(engine.sync_every, max_new_tokens),  # no slot decodes more in one call
    min_slots=min(engine.min_slots or _blocks(slots, 4), slots))


class _Prompt:
  """Host bookkeeping of one prompt: its tokens, its blocks once prefilled, and the samples
  still holding them."""

  def __init__(self, tokens: np.ndarray, samples: int):
    self.tokens = tokens
    self.blocks: list[int] | None = None
    self.live = samples  # samples not yet finished

  @property
  def length(self) -> int:
    return len(self.tokens)


class _Schedule:
  """Admission of requests into slots — longest budget first, then request order — and of
  their blocks into the pool; the device state stays on the device, the host keeps what the
  schedule needs."""

  def __init__(self, layout: _Layout, prompts: list[_Prompt], budgets: np.ndarray,
               num_samples: int, held: frozenset[int] = frozenset()):
    self.layout, self.prompts, self.budgets, self.g = layout, prompts, budgets, num_samples
    # Longest budget first (stable: request order among equal budgets), so that the longest
    # requests do not start last and run alone at the end; with equal budgets, first come.
    self.pending = collections.deque(r for r in np.argsort(-budgets, kind="stable").tolist()
                                     if r not in held)
    self.free_blocks = list(range(layout.num_blocks - 1, NULL_BLOCK, -1))
    self.slot_request = [-1] * layout.slots
    self.slot_blocks: list[list[int]] = [[] for _ in range(layout.slots)]
    self.paused: set[int] = set()  # requests held in their slots between turns

  def _take(self, count: int) -> list[int]:
    split = len(self.free_blocks) - count
    taken, self.free_blocks = self.free_blocks[split:], self.free_blocks[:split]
    return taken

  def need(self, request: int) -> int:
    """Blocks request `request` takes at admission (its prompt's too if not yet prefilled)."""
    prompt = self.prompts[request // self.g]
    bs = self.layout.block_size
    own = _blocks(prompt.length + int(self.budgets[request]) - 1, bs) - prompt.length // bs
    return own + (_blocks(prompt.length, bs) if prompt.blocks is None else 0)

  def admissions(self) -> tuple[list[tuple[int, int, list[int], int]], list[int]]:
    """[(slot, request, table, copy source)] for the waiting requests that fit now, and the
    prompts among them to prefill first."""
    bs = self.layout.block_size
    admitted, to_prefill = [], []
    free_slots = [s for s, r in enumerate(self.slot_request) if r < 0]
    while self.pending and free_slots and self.need(self.pending[0]) <= len(self.free_blocks):
      request, slot = self.pending.popleft(), free_slots.pop(0)
      index = request // self.g
      prompt = self.prompts[index]
      if prompt.blocks is None:
        prompt.blocks = self._take(_blocks(prompt.length, bs))
        to_prefill.append(index)
      shared = prompt.blocks[: prompt.length // bs]
      own = self._take(_blocks(prompt.length + int(self.budgets[request]) - 1, bs) - len(shared))
      partial = prompt.length % bs != 0
      source = prompt.blocks[-1] if partial else NULL_BLOCK
      self.slot_request[slot], self.slot_blocks[slot] = request, own
      admitted.append((slot, request, shared + own, source))
    return admitted, to_prefill

  def admit_later(self, requests: Sequence[int]) -> None:
    """Held requests join the waiting ones (longest budget first among themselves)."""
    order = sorted(requests, key=lambda r: -int(self.budgets[r]))
    self.pending.extend(order)

  def release(self, active: np.ndarray, *, hold: bool = False) -> list[int]:
    """The requests whose slots the device deactivated (`active` [S]) since the last call:
    freed, slot and blocks, or with `hold` kept in their slots as paused (a turn ended: the host
    extends or finishes them); returns them."""
    ended = []
    for slot, request in enumerate(self.slot_request):
      if request >= 0 and not active[slot] and request not in self.paused:
        if hold:
          self.paused.add(request)
        else:
          self.free(request)
        ended.append(request)
    return ended

  def free(self, request: int) -> None:
    """Frees the slot and blocks of `request` (and its prompt's once no sample holds them)."""
    slot = self.slot_request.index(request)
    self.paused.discard(request)
    self.free_blocks.extend(self.slot_blocks[slot])
    self.slot_request[slot], self.slot_blocks[slot] = -1, []
    prompt = self.prompts[request // self.g]
    prompt.live -= 1
    if prompt.live == 0:
      self.free_blocks.extend(prompt.blocks)
      prompt.blocks = []

  def compact(self, slots: int) -> list[int]:
    """The old indices of `slots` new slots (< the old count): the live ones, then idle ones;
    the schedule renumbered to match."""
    order = sorted(range(len(self.slot_request)), key=lambda i: self.slot_request[i] < 0)
    index = order[:slots]
    self.slot_request = [self.slot_request[i] for i in index]
    self.slot_blocks = [self.slot_blocks[i] for i in index]
    return index

  @property
  def occupied(self) -> int:
    return sum(r >= 0 for r in self.slot_request)

  @property
  def running(self) -> int:
    """Slots decoding (occupied, not paused)."""
    return self.occupied - len(self.paused)

  @property
  def busy(self) -> bool:
    return self.occupied > 0


class _StopCheck:
  """Host check of one shard's requests for stop strings (`rljax.rollout.stops.stop_length`)
  over each request's current turn, completion tokens `start[r]` on (0 before any extension):
  no prefix of its first `checked[r]` tokens holds one; `cut[r]` > 0 ends it there (0: not
  cut)."""

  def __init__(self, requests: int, tokenizer: Any, stop_strings: tuple[str, ...]):
    self.tokenizer, self.stop_strings = tokenizer, stop_strings
    self.start = np.zeros((requests,), np.int64)
    self.checked = np.zeros((requests,), np.int64)
    self.cut = np.zeros((requests,), np.int64)

  def rewind(self, tokens: np.ndarray, steps: np.ndarray, held: list[int]) -> np.ndarray:
    """Checks the tokens sampled since the last call (`tokens` [R, N]; `steps` [S] the slots'
    completion counts, `held` [S] their requests, -1 when free) and returns the [S] cuts of
    the slots whose request it cuts now (-1 elsewhere: `_rewound`'s argument)."""
    rewind = np.full((len(held),), -1, np.int32)
    for slot, r in enumerate(held):
      if r < 0 or self.cut[r] or steps[slot] <= self.checked[r]:
        continue
      start = int(self.start[r])
      cut = stop_length(self.tokenizer, tokens[r, start:steps[slot]], self.stop_strings,
                        start=int(self.checked[r]) - start)
      self.checked[r] = steps[slot]
      if cut:
        self.cut[r] = rewind[slot] = start + cut
    return rewind

  def new_turn(self, request: int, start: int) -> None:
    """Request `request` continues at completion token `start` (after an extension)."""
    self.start[request] = self.checked[request] = start
    self.cut[request] = 0


def _check_requests(name: str, requests: Any, count: int) -> list[int]:
  """`requests` as a list of distinct request ids in [0, count); a ValueError names `name`."""
  values = np.asarray(list(requests), np.int64 if not len(requests) else None)
  if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or (
      len(values) and (values.min() < 0 or values.max() >= count)) or \
      len(set(values.tolist())) != len(values):
    raise ValueError(f"`{name}` must be distinct request ids in [0, {count}); got {requests!r}.")
  return values.tolist()


def _check_budgets(budgets: Any, requests: int, max_new_tokens: int) -> np.ndarray:
  if budgets is None:
    return np.full((requests,), max_new_tokens, np.int64)
  values = np.asarray(budgets)
  if values.shape != (requests,) or not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"`budgets` must be [{requests}] ints (one per request, B * num_samples); "
                     f"got shape {values.shape} dtype {values.dtype}.")
  if values.min() < 1 or values.max() > max_new_tokens:
    raise ValueError(f"`budgets` must lie in [1, {max_new_tokens}] (max_new_tokens); got "
                     f"values in [{values.min()}, {values.max()}].")
  return values.astype(np.int64)


class EngineRun:
  """One engine call, driven from the host: `advance` runs one round (extensions, admissions and
  their prefills, one decode call); `engine_generate` advances until every request is done.

  With `hold=True` a request whose turn ends (a stop token, a stop string, its turn budget or
  its total budget) keeps its slot and blocks, paused: `advance` returns it, and the host
  either `extend`s it with a chunk of tokens (an environment's observation, appended at the
  slot's own positions from its cached keys, no re-prefill; decoding then resumes) or
  `finish`es it. Every request's total budget (`budgets`, default max_new_tokens) counts all
  its completion tokens, the chunks' too: its blocks are reserved for it at admission, so an
  extension never waits for a block.

  Args:
    as `engine_generate`, plus
    hold: pause requests at turn ends instead of finishing them.
    turn_tokens: None, or the most tokens a request samples in one turn (hold only).
    held: requests not admitted until `release`d (e.g. the resamples of dynamic sampling,
      released as the groups before them turn out uninformative: they enter free slots while
      the batch runs).
  """

  def __init__(self, model: Any, prompt_tokens: Array, prompt_mask: Array, key: Array,
               sampling: SamplingConfig | None = None, *, stop_tokens: int | Sequence[int],
               pad_id: int, engine: EngineConfig | None = None, budgets: Any = None,
               mesh: Any = None, stop_strings: str | Sequence[str] | None = None,
               tokenizer: Any = None, hold: bool = False, turn_tokens: int | None = None,
               held: Sequence[int] = (), **sampling_options: Any):
    sampling = sampling_from_arguments(sampling, sampling_options)
    engine = EngineConfig() if engine is None else engine
    if not isinstance(engine, EngineConfig):
      raise ValueError(f"`engine` must be an EngineConfig; got {type(engine).__name__}.")
    check_int("turn_tokens", turn_tokens, 1, optional=True)
    if turn_tokens is not None and not hold:
      raise ValueError("`turn_tokens` limits a turn: it needs `hold=True`.")
    graphdef, params = _split_model(model)
    config = config_of(graphdef)
    if config is None:
      raise ValueError("`model` must be a rljax Transformer (its graphdef has no ModelConfig).")
    tokens, mask = _check_prompts(prompt_tokens, prompt_mask, config.vocab_size)
    _check_key(key)
    stops = check_token_ids(graphdef, pad_id=pad_id, stop_tokens=stop_tokens)
    g, n = sampling.num_samples, sampling.max_new_tokens
    b, p = tokens.shape
    self.budgets = _check_budgets(budgets, b * g, n)
    strings = check_stop_strings(stop_strings, tokenizer)
    host_tokens, host_mask = np.asarray(tokens), np.asarray(mask)
    prompts = [_Prompt(host_tokens[i][host_mask[i]], g) for i in range(b)]
    if any(prompt.length == 0 for prompt in prompts):
      raise ValueError("every prompt needs at least one real token (`prompt_mask` 1).")

    # Shard d serves prompts d·Bd … (d + 1)·Bd − 1, i.e. requests d·Rd … (d + 1)·Rd − 1.
    self.shards = shards = _shards(mesh)
    d = shards.count
    bd = -(-b // d)
    self.bd, self.rd = bd, bd * g
    rd = self.rd
    self.layout = layout = engine_layout(engine, requests=rd, prompt_length=p, max_new_tokens=n,
                                         num_samples=g)
    self.options = _Options(temperature=float(sampling.temperature), top_k=sampling.top_k,
                            top_p=None if sampling.top_p is None else float(sampling.top_p),
                            stop_tokens=stops, blocks_per_step=layout.blocks_per_step,
                            attention=engine.attention)
    turn = n if turn_tokens is None else turn_tokens
    held = _check_requests("held", held, b * g)
    self.schedules = [_Schedule(layout, prompts[i * bd:(i + 1) * bd],
                                self.budgets[i * rd:(i + 1) * rd], g,
                                frozenset(int(r) - i * rd for r in held if r // rd == i))
                      for i in range(d)]
    self.held = set(int(r) for r in held)
    self.first = np.arange(d, dtype=np.int32) * rd
    self.checks = [_StopCheck(rd, tokenizer, strings) for _ in range(d)] if strings else []
    self.graphdef, self.params, self.key = graphdef, params, key
    self.hold, self.turn_tokens, self.pad_id = hold, turn, pad_id
    self.prompt_tokens, self.prompt_mask, self.num_samples, self.requests = tokens, mask, g, b * g
    self.slots_count = layout.slots
    self.pool, self.last_hidden, self.slots, self.out = _initial_state(
      shards, config, layout, bd, rd, n, pad_id)
    self.rewind = np.full((d, layout.slots), -1, np.int32)
    self.steps = np.zeros((b * g,), np.int64)  # completion tokens of each request so far
    self.chunks: dict[int, np.ndarray] = {}  # extensions waiting for the next round
    self.spans: list[list[tuple[int, int]]] = [[] for _ in range(b * g)]  # (start, length)
    self.finished = np.zeros((b * g,), bool)  # requests done (slot and blocks freed)

  @property
  def done(self) -> bool:
    """Whether every request is finished."""
    return not any(sched.pending or sched.busy for sched in self.schedules)

  @property
  def decoding(self) -> bool:
    """Whether a round would do anything: requests wait, slots decode, or chunks wait."""
    return bool(self.chunks) or any(sched.pending or sched.running for sched in self.schedules)

  def _where(self, request: int) -> tuple[int, int]:
    shard, local = divmod(request, self.rd)
    return shard, local

  def paused(self) -> list[int]:
    """The paused requests (global ids), waiting for `extend` or `finish`."""
    return sorted(d * self.rd + r for d, sched in enumerate(self.schedules) for r in sched.paused)

  def _check_paused(self, name: str, request: int) -> tuple[int, int]:
    if not isinstance(request, (int, np.integer)) or not 0 <= request < self.requests:
      raise ValueError(f"`{name}`'s request must be an int in [0, {self.requests}); got "
                       f"{request!r}.")
    shard, local = self._where(int(request))
    if local not in self.schedules[shard].paused or request in self.chunks:
      raise ValueError(f"`{name}`: request {request} is not paused (only requests `advance` "
                       f"returned, not yet extended or finished, are).")
    return shard, local

  def room(self, request: int) -> int:
    """The most tokens `extend` can append to paused `request`: its budget less its tokens,
    less one for the token sampled after them."""
    return int(self.budgets[request] - self.steps[request] - 1)

  def extend(self, request: int, tokens: Sequence[int]) -> None:
    """Appends `tokens` (at most `room(request)` ids; none: the turn resumes as it is) to
    paused `request`; the next `advance` feeds them and resumes its decoding (a new turn)."""
    self._check_paused("extend", request)
    chunk = np.asarray(tokens, np.int64 if len(tokens) == 0 else None)
    if chunk.ndim != 1 or not np.issubdtype(chunk.dtype, np.integer):
      raise ValueError(f"`tokens` must be a sequence of token ids; got {tokens!r}.")
    vocab = config_of(self.graphdef).vocab_size
    if len(chunk) and (chunk.min() < 0 or chunk.max() >= vocab):
      raise ValueError(f"`tokens` must be ids in [0, {vocab}); got values in "
                       f"[{chunk.min()}, {chunk.max()}].")
    if len(chunk) > self.room(request):
      raise ValueError(f"`tokens` ({len(chunk)}) do not fit request {request}'s budget: "
                       f"room for {self.room(request)} (`room`).")
    self.chunks[int(request)] = chunk.astype(np.int32)

  def finish(self, request: int) -> None:
    """Ends paused `request`: its slot and blocks are freed."""
    shard, local = self._check_paused("finish", request)
    self.schedules[shard].free(local)
    self.finished[request] = True

  def release(self, requests: Sequence[int]) -> None:
    """Held `requests` join the waiting ones (the next `advance` may admit them)."""
    requests = _check_requests("requests", requests, self.requests)
    if not set(requests) <= self.held:
      raise ValueError(f"`requests` must be held and not yet released; "
                       f"{sorted(set(requests) - self.held)} are not.")
    self.held -= set(requests)
    for d, sched in enumerate(self.schedules):
      sched.admit_later([r - d * self.rd for r in requests if r // self.rd == d])

  def completion(self, requests: Sequence[int]) -> list[np.ndarray]:
    """The completion tokens so far (the chunks included) of each of `requests`."""
    if not len(requests):
      return []
    # The whole [R, N] buffer to the host and indexed there: indexing on the device with a
    # varying number of rows compiled a gather per count.
    tokens = np.asarray(jax.device_get(self.out.tokens)).reshape(-1, self.out.tokens.shape[-1])
    return [tokens[r, :self.steps[r]] for r in requests]

  def ended(self, requests: Sequence[int]) -> list[str]:
    """How the current turn of each of `requests` (paused) ended: "stop_token", "stop_string"
    or "length" (its turn's or its total budget ran out)."""
    finished = jax.device_get(self.out.finished.reshape(-1))
    reasons = []
    for r in requests:
      shard, local = self._where(int(r))
      if self.checks and self.checks[shard].cut[local]:
        reasons.append("stop_string")
      else:
        reasons.append("stop_token" if finished[r] else "length")
    return reasons

  def advance(self) -> list[int]:
    """One round: the waiting extensions, admissions (prefilling new prompts), one decode
    call, the stop-string check, the finished slots freed (or, with `hold`, paused) and the
    drain's compaction. Returns the requests that ended in this round (global ids): finished,
    or with `hold` paused."""
    if not self.decoding:
      return []
    layout, shards, s = self.layout, self.shards, self.slots_count
    if self.chunks:
      self._extend_chunks()
    plans = [sched.admissions() for sched in self.schedules]
    if any(sched.pending and not admitted and not sched.busy
           for sched, (admitted, _) in zip(self.schedules, plans)):  # engine_layout rules it out
      raise RuntimeError("the rollout engine's pool cannot admit the next request.")
    rows = layout.prefill_rows
    for start in range(0, max(len(to_prefill) for _, to_prefill in plans), rows):
      self.pool, self.last_hidden = _prefill(
        shards, self.graphdef, self.params, self.pool, self.last_hidden, *_stacked(
          _prefill_inputs(sched.prompts, to_prefill[start:start + rows], layout, self.bd)
          for sched, (_, to_prefill) in zip(self.schedules, plans)))
    admission = _stacked(_admit_inputs(admitted, sched.prompts,
                                       np.minimum(sched.budgets, self.turn_tokens), layout, s,
                                       self.num_samples, self.rd)
                         for sched, (admitted, _) in zip(self.schedules, plans))
    # Back to the host once `refill_slots` more slots stop than now, where requests wait or
    # (with `hold`) the paused ones do; else never.
    want_free = np.array([s - sched.running + layout.refill_slots
                          if sched.pending or self.hold else s + 1
                          for sched in self.schedules], np.int32)
    self.pool, self.slots, self.out = _decode(
      shards, self.graphdef, self.options, layout.sync_every, self.params, self.pool,
      self.slots, self.out, self.last_hidden, self.key, self.first, want_free, admission,
      self.rewind)
    return self._after_call()

  def _after_call(self) -> list[int]:
    """The host's look at the slots after a device call: steps, stop strings, releases,
    compaction; returns the requests that ended (paused with `hold`, else finished)."""
    host = jax.device_get(self.slots)
    active = host.active
    for d, sched in enumerate(self.schedules):
      for slot, r in enumerate(sched.slot_request):
        if r >= 0:
          self.steps[d * self.rd + r] = host.steps[d, slot]
    self.rewind = np.full_like(self.rewind, -1)
    if self.checks:  # requests cut at a stop string: rewound by the next call
      sampled = jax.device_get(self.out.tokens)
      self.rewind = np.stack([check.rewind(sampled[d], host.steps[d], sched.slot_request)
                              for d, (check, sched) in enumerate(zip(self.checks,
                                                                     self.schedules))])
      active = active & (self.rewind < 0)
      for d, check in enumerate(self.checks):
        cut = check.cut > 0
        self.steps[d * self.rd:(d + 1) * self.rd][cut] = check.cut[cut]
    ended = [d * self.rd + r for d, (sched, shard_active) in enumerate(zip(self.schedules, active))
             for r in sched.release(shard_active, hold=self.hold)]
    if not self.hold:
      self.finished[ended] = True
    smaller = _fewer_slots(self.schedules, self.slots_count, self.layout.min_slots)
    if smaller < self.slots_count:
      index = np.stack([sched.compact(smaller) for sched in self.schedules])
      self.slots, self.slots_count = _compact(self.shards, self.slots, index), smaller
      self.rewind = np.take_along_axis(self.rewind, index, axis=1)
    return ended

  def _extend_chunks(self) -> None:
    """Runs `_extend` on the waiting chunks, E rows per call (a power of two ≥ 8, ≤ the
    slots), their width K padded to a power of two ≥ 8: a compile per (E, K) bucket. The
    floor keeps the buckets few (a compile costs ~1 s on CPU, more on accelerators; the
    calculator example's GRPO: 14 buckets → 8), and below 8 rows a call costs its per-op
    overhead, not its rows."""
    d, s = self.shards.count, self.slots_count
    per_shard = [[] for _ in range(d)]
    for request, chunk in sorted(self.chunks.items()):
      shard, local = self._where(request)
      per_shard[shard].append((local, chunk))
    self.chunks = {}
    e = min(max(8, _power_of_two(max(len(x) for x in per_shard))), s)
    k = max(8, _power_of_two(max(len(c) for x in per_shard for _, c in x)))
    for start in range(0, max(len(x) for x in per_shard), e):
      rows = np.full((d, e), s, np.int32)
      chunk = np.zeros((d, e, k), np.int32)
      lengths = np.zeros((d, e), np.int32)
      budgets = np.ones((d, e), np.int32)
      for shard, items in enumerate(per_shard):
        sched = self.schedules[shard]
        for i, (local, tokens) in enumerate(items[start:start + e]):
          request = shard * self.rd + local
          steps = int(self.steps[request])
          rows[shard, i] = sched.slot_request.index(local)
          chunk[shard, i, :len(tokens)] = tokens
          lengths[shard, i] = len(tokens)
          budgets[shard, i] = min(int(self.budgets[request]),
                                  steps + len(tokens) + self.turn_tokens)
          sched.paused.discard(local)
          self.spans[request].append((steps, len(tokens)))
          if self.checks:
            self.checks[shard].new_turn(local, steps + len(tokens))
      self.pool, self.slots, self.out = _extend(
        self.shards, self.graphdef, self.options, self.params, self.pool, self.slots, self.out,
        self.key, self.first, self.rewind, rows, chunk, lengths, budgets)
      self.rewind = np.full_like(self.rewind, -1)

  def observation_mask(self) -> np.ndarray:
    """[R, N] bool: True at the completion tokens appended by `extend` (not the policy's)."""
    mask = np.zeros((self.requests, self.out.tokens.shape[-1]), bool)
    for r, spans in enumerate(self.spans):
      for start, length in spans:
        mask[r, start:start + length] = True
    return mask

  def rollout(self, requests: Sequence[int] | None = None) -> Rollout:
    """The `Rollout` of every request (once `done`), or of the finished `requests` in that
    order: the completion is everything after the prompt, the extensions included
    (`observation_mask` marks them; log-prob 0)."""
    if requests is None:
      if not self.done:
        raise RuntimeError("`rollout` needs every request finished (`done`).")
      rows = np.arange(self.requests)
    else:
      rows = np.asarray(_check_requests("requests", requests, self.requests), np.int64)
      if not self.finished[rows].all():
        raise ValueError(f"`rollout`: requests {rows[~self.finished[rows]].tolist()} are not "
                         "finished.")
    n = self.out.tokens.shape[-1]
    out = _Outputs(*(x.reshape(-1, *x.shape[2:])[rows] for x in self.out))
    if self.checks:  # a cut applied after the last device call has not reached the device
      cut = np.concatenate([check.cut for check in self.checks])[rows]
      out = out._replace(lengths=jnp.where(cut > 0, cut, out.lengths),
                         finished=out.finished | (cut > 0))
    completion_mask = jnp.arange(n)[None, :] < out.lengths[:, None]
    prompts = rows // self.num_samples
    return Rollout(
      tokens=jnp.concatenate([self.prompt_tokens[prompts],
                              jnp.where(completion_mask, out.tokens, self.pad_id)], axis=1),
      prompt_mask=self.prompt_mask[prompts], completion_mask=completion_mask,
      logprobs=jnp.where(completion_mask, out.logprobs, 0.0), lengths=out.lengths,
      finished=out.finished)


def _power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def engine_generate(
  model: Any,
  prompt_tokens: Array,
  prompt_mask: Array,
  key: Array,
  sampling: SamplingConfig | None = None,
  *,
  stop_tokens: int | Sequence[int],
  pad_id: int,
  engine: EngineConfig | None = None,
  budgets: Any = None,
  mesh: Any = None,
  stop_strings: str | Sequence[str] | None = None,
  tokenizer: Any = None,
  **sampling_options: Any,
) -> Rollout:
  """`generate` by continuous batching (see the module docstring): the same arguments, the same
  `Rollout` (greedy and sampled tokens equal for the same key, up to float rounding of the
  logits), plus `engine` (an `EngineConfig`) and per-request budgets.

  Args:
    model, prompt_tokens, prompt_mask, key, sampling, stop_tokens, pad_id: as `generate` (the
      sampling options may be keywords instead of `sampling`).
    engine: the engine's sizes (default `EngineConfig()`).
    budgets: None, or [B * num_samples] ints in [1, max_new_tokens]: request r's own
      max_new_tokens (a row that reaches it without a stop token is truncated:
      `finished` False).
    mesh: None, or a mesh whose data axes (`data`, `fsdp`) split the prompts into contiguous
      shards, D = their devices: each shard runs its own `num_slots` slots and pool on its
      devices, with no communication between shards (the other axes, e.g. `tensor`, split
      the model as the parameters' shardings say).
    stop_strings: None or non-empty strings: a request also ends at the first token whose
      decoded completion holds one (`rljax.rollout.stops`; `finished` True), whichever of a
      stop token, a stop string or its budget comes first.
    tokenizer: the Hugging Face tokenizer that decodes the completions (with `stop_strings`).

  Returns:
    A `Rollout` with B * num_samples rows, samples of prompt i in rows i·G … i·G + G − 1.

  Example:
    >>> out = engine_generate(model, prompts, mask, key, SamplingConfig(max_new_tokens=512,
    ...                       num_samples=8), stop_tokens=[eos], pad_id=eos,
    ...                       engine=EngineConfig(num_slots=32))
  """
  run = EngineRun(model, prompt_tokens, prompt_mask, key, sampling, stop_tokens=stop_tokens,
                  pad_id=pad_id, engine=engine, budgets=budgets, mesh=mesh,
                  stop_strings=stop_strings, tokenizer=tokenizer, **sampling_options)
  while not run.done:
    run.advance()
  return run.rollout()


def _fewer_slots(schedules: list[_Schedule], slots: int, min_slots: int) -> int:
  """The slot count to decode on: halved while no request waits and every shard's live
  requests fit, not below `min_slots`."""
  if any(schedule.pending for schedule in schedules):
    return slots
  live = max(schedule.occupied for schedule in schedules)
  while live and slots // 2 >= max(live, min_slots):
    slots //= 2
  return slots


def _stacked(per_shard) -> tuple[np.ndarray, ...]:
  """The shards' argument tuples stacked along a leading shard axis."""
  return tuple(np.stack(parts) for parts in zip(*per_shard))


def _prefill_inputs(prompts: list[_Prompt], indices: list[int], layout: _Layout, b: int):
  """(tokens [rows, Pb], lengths, blocks [rows, Pb/bs], prompt ids) of one prefill call; the
  rows past `indices` are padding (null blocks, prompt id b: dropped)."""
  rows, width, bs = layout.prefill_rows, layout.prompt_width, layout.block_size
  tokens = np.zeros((rows, width), np.int32)
  lengths = np.zeros((rows,), np.int32)
  blocks = np.full((rows, width // bs), NULL_BLOCK, np.int32)
  ids = np.full((rows,), b, np.int32)
  for row, index in enumerate(indices):
    prompt = prompts[index]
    tokens[row, : prompt.length] = prompt.tokens
    lengths[row] = prompt.length
    blocks[row, : len(prompt.blocks)] = prompt.blocks
    ids[row] = index
  return tokens, lengths, blocks, ids


def _admit_inputs(admitted, prompts: list[_Prompt], budgets: np.ndarray, layout: _Layout,
                  s: int, g: int, requests: int):
  """The [S]-shaped arguments of `_admit` for `admitted` [(slot, request, table, source)]
  (none admitted: an all-False mask)."""
  mb = layout.table_width
  admit = np.zeros((s,), bool)
  ids = np.full((s,), requests, np.int32)
  prompt_ids = np.zeros((s,), np.int32)
  budget = np.ones((s,), np.int32)
  lengths = np.zeros((s,), np.int32)
  table = np.full((s, mb), NULL_BLOCK, np.int32)
  source = np.full((s,), NULL_BLOCK, np.int32)
  target = np.full((s,), NULL_BLOCK, np.int32)
  bs = layout.block_size
  for slot, request, blocks, copy_from in admitted:
    prompt = prompts[request // g]
    admit[slot], ids[slot], prompt_ids[slot] = True, request, request // g
    budget[slot], lengths[slot] = budgets[request], prompt.length
    table[slot, : len(blocks)] = blocks
    if copy_from != NULL_BLOCK:
      source[slot], target[slot] = copy_from, blocks[prompt.length // bs]
  return admit, ids, prompt_ids, budget, lengths, table, source, target
