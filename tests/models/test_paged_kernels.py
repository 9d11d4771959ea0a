"""The decode kernels of `rljax.models.paged_kernels` against the pure-JAX `paged_attention`
(itself tested against naive attention in test_paged_kv.py).

On CPU the Pallas GPU kernel runs in Pallas's interpreter (`interpret=True`, chosen off a GPU)
with the backend seam `kernels._backend` set to "gpu": the very kernel body, grid and block
specs, executed by XLA:CPU. Shapes are tiny and cases few (the interpreter compiles slowly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models import kernels as K
from rljax.models import paged_kernels as PK
from rljax.models.config import ModelConfig
from rljax.models.paged_kv import PagedKV, decode_hidden, paged_attention
from rljax.models.transformer import Transformer
from rljax.rollout.engine import EngineConfig, engine_generate
from rljax.rollout.generate import generate
from rljax.rollout.sampling import SamplingConfig

L, S, H, KV, DH, BS, PER_STEP, MB, M = 2, 6, 8, 2, 16, 4, 4, 16, 3
# Idle; partial block; exactly one table partition (16 tokens); one past it; several
# partitions; the whole table. Slots 4 and 5 share their first 8 blocks (a prompt's).
LENGTHS = np.array([0, 3, 16, 17, 40, 64], np.int32)
RECENT = np.array([0, 1, 3, 2, 0, 3], np.int32)


def _case(seed: int):
  rng = np.random.default_rng(seed)
  nb = 1 + S * MB
  blocks = rng.permutation(np.arange(1, nb))[: S * MB].reshape(S, MB).astype(np.int32)
  blocks[5, :8] = blocks[4, :8]
  for s, n in enumerate(LENGTHS):  # null blocks past each slot's length, as the engine's tables
    blocks[s, -(-n // BS):] = 0
  k = rng.normal(size=(L, KV, nb, BS, DH)).astype(np.float32)
  live = {int(b) for s, n in enumerate(LENGTHS) for b in blocks[s, : -(-n // BS)]}
  for block in set(range(nb)) - live:  # keys the kernel must never see (masked by a select)
    k[:, :, block] = np.nan
  for s, n in enumerate(LENGTHS):  # and the tail of a partial last block
    if n % BS:
      k[:, :, blocks[s, n // BS], n % BS:] = np.nan
  pool = PagedKV(k=jnp.asarray(k), v=jnp.asarray(rng.normal(size=k.shape), jnp.float32))
  arrays = [rng.normal(size=shape).astype(np.float32) for shape in
            ((S, H, DH), (S, KV, DH), (S, KV, DH), (S, M, KV, DH), (S, M, KV, DH))]
  return pool, jnp.asarray(blocks), jnp.asarray(LENGTHS), *map(jnp.asarray, arrays)


@pytest.fixture
def on_gpu(monkeypatch):
  """The backend seam set to "gpu": the kernel is chosen and runs in Pallas's interpreter."""
  monkeypatch.setattr(K, "_backend", lambda: "gpu")


@pytest.mark.parametrize("softcap, scale, max_splits", [(None, None, 16), (5.0, 0.3, 3)])
def test_pallas_kernel_equals_paged_attention(on_gpu, monkeypatch, softcap, scale, max_splits):
  """GQA (4 query heads per KV head), table partitions (4 of 4 blocks; or 3 of 8, the table
  padded with null blocks), an idle slot, shared blocks, recent keys, a traced layer index, NaN
  keys outside every slot's length: within 1e-5."""
  monkeypatch.setattr(PK, "_MAX_SPLITS", max_splits)
  pool, table, lengths, q, k_self, v_self, recent_k, recent_v = _case(0)

  @jax.jit
  def both(pool, layer):
    args = (q, k_self, v_self, pool, layer, table, lengths)
    options = dict(scale=scale, softcap=softcap, blocks_per_step=PER_STEP, recent_k=recent_k,
                   recent_v=recent_v, recent_count=jnp.asarray(RECENT))
    return paged_attention(*args, kernel="pallas", **options), paged_attention(*args, **options)

  for layer in (0, 1):
    out, want = both(pool, layer)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_pallas_partials_cover_each_partition():
  """The kernel's per-partition residuals: a partition past a slot's length is empty (m the
  float32 minimum, l = 0), a full one holds its 16 keys' softmax sum (1 <= l <= 16)."""
  pool, table, lengths, q, *_ = _case(1)
  m, l, o = PK.pallas_partials(q, pool.k, pool.v, 0, table, lengths, scale=DH**-0.5,
                               softcap=None, blocks_per_step=PER_STEP)
  assert m.shape == l.shape == (KV, S, H // KV, MB // PER_STEP) and o.shape == (*m.shape, DH)
  filled = (np.arange(MB // PER_STEP)[None, :] * PER_STEP * BS) < LENGTHS[:, None]  # [S, n]
  m, l = (np.moveaxis(np.asarray(x), 1, 2) for x in (m, l))  # [KV, G, S, n]
  assert (l[:, :, ~filled] == 0).all() and (m[:, :, ~filled] == np.finfo(np.float32).min).all()
  assert (l[:, :, filled] >= 1).all() and (l[:, :, filled] <= PER_STEP * BS).all()


def _model(windows):
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=DH, sliding_window=windows)
  return Transformer(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("windows", [(6, None), 6])
def test_decode_hidden_through_the_kernel_equals_blockwise(on_gpu, monkeypatch, windows):
  """A decode step of a model with per-layer windows (the windowed layer takes the pure-JAX loop
  by `lax.cond`; windows of 6 < most lengths, so the kernel there would differ) and with a
  window everywhere (the kernel is never traced). No window: the engine test below."""
  model = _model(windows)
  pool, table, lengths, *_ = _case(2)
  traced = []
  original = PK.pallas_partials
  monkeypatch.setattr(PK, "pallas_partials", lambda *a, **kw: traced.append(1) or original(
    *a, **kw))
  tokens = jnp.arange(S, dtype=jnp.int32) + 5
  pool = PagedKV(*(jnp.nan_to_num(x[:, :, :, :, :DH]) for x in pool))

  def step(attention):
    return jax.jit(lambda pool: decode_hidden(model, tokens, pool, table, lengths,
                                              blocks_per_step=PER_STEP, attention=attention))(pool)

  for got, want in zip(step("pallas"), step("blockwise")):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  assert bool(traced) == (windows != 6)


@pytest.mark.slow
def test_the_engine_through_the_kernel_samples_generates_rollout(on_gpu):
  """`engine_generate` with attention="pallas" (3 slots refilled, decode calls of 5 steps with
  recent keys): the sampled tokens of `generate` for the same key, log-probs within 1e-5."""
  graphdef, state = nnx.split(_model(None))
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, state))
  prompts = np.array([[0, 0, 5, 9, 17, 30], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 22, 40]], np.int32)
  sampling = SamplingConfig(max_new_tokens=12, num_samples=2, temperature=1.0)
  engine = EngineConfig(num_slots=3, block_size=4, blocks_per_step=4, sync_every=5,
                        attention="pallas")
  with jax.default_matmul_precision("highest"):
    out, ref = (fn(model, prompts, prompts != 0, jax.random.key(0), sampling, stop_tokens=(1, 2),
                   pad_id=0, **kw) for fn, kw in ((engine_generate, dict(engine=engine)),
                                                  (generate, {})))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_auto_picks_the_kernel_only_where_it_can_run(monkeypatch):
  features = dict(dtype=jnp.bfloat16, pool_dtype=jnp.bfloat16, head_dim=128, block_size=16,
                  blocks_per_step=8)
  assert PK.decode_kernel("auto", **features) is None  # CPU: the pure-JAX path
  assert PK.decode_kernel("blockwise", **features) is None
  with pytest.raises(ValueError, match="decode attention 'pallas': .* needs a GPU"):
    PK.decode_kernel("pallas", **features)
  monkeypatch.setattr(K, "_backend", lambda: "gpu")
  assert PK.decode_kernel("auto", **features) == "pallas"
  assert PK.decode_kernel("auto", **{**features, "head_dim": 96}) is None
  with pytest.raises(ValueError, match="head_dim a power of two"):
    PK.decode_kernel("pallas", **{**features, "head_dim": 96})
  monkeypatch.setattr(K, "_backend", lambda: "tpu")
  assert PK.decode_kernel("auto", **features) is None  # ragged: the pool layout differs
  with pytest.raises(ValueError, match="decode attention must be one of"):
    PK.kernel_for("flash")
  with pytest.raises(ValueError, match="Unknown attention 'flash'"):
    EngineConfig(attention="flash")


def test_unsupported_names_the_missing_feature(monkeypatch):
  call = dict(dtype=jnp.float32, pool_dtype=jnp.float32, head_dim=64, block_size=16,
              blocks_per_step=8)
  assert "needs a GPU" in PK.unsupported("pallas", **call)
  assert "its own layout" in PK.unsupported("ragged", **call)
  monkeypatch.setattr(K, "_backend", lambda: "gpu")
  assert PK.unsupported("pallas", **call) is None
  for change, reason in ((dict(dtype=jnp.float64, pool_dtype=jnp.float64), "one dtype among"),
                         (dict(pool_dtype=jnp.bfloat16), "one dtype among"),
                         (dict(head_dim=8), "power of two >= 16"),
                         (dict(head_dim=80), "power of two >= 16"),
                         (dict(block_size=12), "powers of two"),
                         (dict(blocks_per_step=3), "powers of two"),
                         (dict(block_size=2, blocks_per_step=4), ">= 16")):
    assert reason in PK.unsupported("pallas", **{**call, **change}), change
  with pytest.raises(ValueError, match="kernel must be one of"):
    PK.unsupported("flash", **call)
