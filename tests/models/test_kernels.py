"""The accelerator kernels behind the attention adapter, on CPU: cuDNN's argument layout through
`jax.nn.dot_product_attention`'s XLA implementation, splash through the Pallas interpreter, the
data checks that send a batch to the pure-JAX path, and the adapter's choice (the backend seam
`kernels._backend` set to "gpu" / "tpu")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models import attention as A
from rljax.models import kernels as K
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer, positions_from_mask

B, H, KV, DH = 3, 4, 2, 16


def _rows(t, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, w = (jax.random.normal(ks[i], (B, t, H, DH), dtype) for i in (0, 3))
  k, v = (jax.random.normal(ks[i], (B, t, KV, DH), dtype) for i in (1, 2))
  mask = np.ones((B, t), bool)
  mask[0, t - t // 4 :] = False  # right padding
  mask[1, : t // 3] = False  # left padding
  mask[2, :5], mask[2, t - 7 :] = False, False  # both
  mask = jnp.asarray(mask)
  return q, k, v, w, mask, positions_from_mask(mask)


def _check_against_naive(kernel, t, *, window=None, segments=None, softcap=None, atol=1e-5,
                         dtype=jnp.float32):
  """Values and gradients of sum(out · w) over real queries: kernel vs the float32 reference."""
  q, k, v, w, mask, positions = _rows(t, dtype=dtype)
  dense = A.causal_attention_mask(mask, positions, positions, sliding_window=window,
                                  segment_ids=segments)
  real = mask[:, :, None, None]

  def loss(f):
    def value(q, k, v):
      out = f(q, k, v)
      return jnp.sum(jnp.where(real, out.astype(jnp.float32) * w, 0.0)), out
    return jax.jit(jax.grad(value, (0, 1, 2), has_aux=True))

  grads, out = loss(kernel)(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_grads, ref = loss(lambda q, k, v: A.naive_attention(q, k, v, dense, softcap=softcap))(*f32)
  np.testing.assert_allclose(jnp.where(real, out.astype(jnp.float32), 0.0),
                             jnp.where(real, ref, 0.0), atol=atol, rtol=atol)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), r, atol=atol, rtol=atol)


@pytest.mark.parametrize("window", [None, 9])
def test_cudnn_layout_equals_naive_on_left_right_and_both_padded_rows(window):
  """Rolling rows to right padding, lengths and local_window_size=(w - 1, 0): the arguments
  cuDNN gets, run by dot_product_attention's XLA implementation."""
  _check_against_naive(lambda q, k, v: K.cudnn_attention(
    q, k, v, _rows(48)[4], window=window, scale=DH**-0.5, implementation="xla"), 48,
    window=window)


def test_splash_equals_naive_with_segments_window_and_softcap():
  """The Pallas splash kernel (interpreted on CPU): padding as its own segment, packed
  segments, a local window and the soft-cap, on grouped-query heads."""
  t = 256
  segments = jnp.asarray(np.arange(t)[None] // 100 + np.zeros((B, 1), int))
  mask = _rows(t)[4]
  _check_against_naive(lambda q, k, v: K.splash_attention(
    q, k, v, mask, segments, window=30, scale=DH**-0.5, softcap=2.0), t, window=30,
    segments=segments, softcap=2.0)


def test_data_checks_send_rows_with_holes_or_gapped_positions_to_the_fallback():
  rows = np.ones((2, 8), bool)
  assert bool(K._one_run(jnp.asarray(rows)))
  rows[0, :2] = rows[1, 6:] = False  # left / right padding: still one run each
  assert bool(K._one_run(jnp.asarray(rows)))
  holed = rows.copy()
  holed[0, 4] = False
  assert not bool(K._one_run(jnp.asarray(holed)))
  mask = jnp.asarray(rows)
  assert bool(K._window_in_slots(mask, positions_from_mask(mask), None))
  gapped = positions_from_mask(mask).at[1, 3].add(5)
  assert not bool(K._window_in_slots(mask, gapped, None))
  holed = jnp.asarray(holed)
  assert not bool(K._window_in_slots(holed, positions_from_mask(holed), None))
  # Two packed segments with their own positions, padding at the end: windows are exact.
  segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 2, 2]] * 2)
  packed = jnp.asarray([[1] * 6 + [0] * 2] * 2, bool)
  positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 0, 0]] * 2)
  assert bool(K._window_in_slots(packed, positions, segments))


def test_unsupported_names_the_missing_feature(monkeypatch):
  call = dict(dtype=jnp.bfloat16, head_dim=64, num_queries=256, num_keys=256,
              self_attention=True, segments=False, softcap=None)
  assert "needs a GPU" in K.unsupported("cudnn", **call)
  monkeypatch.setattr(K, "_backend", lambda: "gpu")
  assert K.unsupported("cudnn", **call) is None
  for change, reason in ((dict(dtype=jnp.float32), "bfloat16 or float16"),
                         (dict(head_dim=60), "multiple of 8"), (dict(head_dim=512), "<= 128"),
                         (dict(segments=True), "segment ids"), (dict(softcap=5.0), "soft-cap"),
                         (dict(num_queries=1, self_attention=False), "self-attention only")):
    assert reason in K.unsupported("cudnn", **{**call, **change})
  monkeypatch.setattr(K, "_backend", lambda: "tpu")
  assert K.unsupported("splash", **{**call, "dtype": jnp.float32, "segments": True}) is None
  assert "multiple of 128" in K.unsupported("splash", **{**call, "num_queries": 200,
                                                          "num_keys": 200})
  with pytest.raises(ValueError, match="kernel must be one of"):
    K.unsupported("flash", **call)


def _config(**changes):
  base = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, sliding_window=(40, None))
  return ModelConfig(**{**base, **changes})


@pytest.mark.parametrize("backend, kernel, dtype, atol", [("tpu", "splash", jnp.float32, 1e-5),
                                                          ("gpu", "cudnn", jnp.bfloat16, 3e-2)])
def test_auto_runs_the_backends_kernel_and_equals_the_pure_jax_model(monkeypatch, backend,
                                                                     kernel, dtype, atol):
  """attention="auto" with the backend seam set: the kernel runs (per-layer windows through
  lax.switch) and the model's logits equal the naive model's; a row with a hole in its mask
  takes the fallback in the program and still agrees."""
  model = Transformer(_config(dtype=dtype), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 128), 1, 64)
  mask = jnp.ones((2, 128), bool).at[1, :20].set(False)
  monkeypatch.setattr(K, "_backend", lambda: backend)
  calls = []
  original = getattr(K, f"{kernel}_attention")
  monkeypatch.setattr(K, f"{kernel}_attention", lambda *a, **kw: calls.append(1) or original(
    *a, **kw))

  def logits(attention, mask):
    model.config = model.layers.config = _config(dtype=dtype, attention=attention)
    return jnp.where(mask[..., None], model(ids, mask), 0.0)

  want = logits("naive", mask)
  np.testing.assert_allclose(logits("auto", mask), want, atol=atol, rtol=atol)
  assert calls  # the kernel was traced (two distinct windows: one kernel each)
  holed = mask.at[0, 64].set(False)
  np.testing.assert_allclose(logits("auto", holed), logits("naive", holed), atol=atol,
                             rtol=atol)


def test_an_explicit_kernel_that_cannot_run_is_an_error():
  model = Transformer(_config(attention="cudnn"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention='cudnn': cuDNN attention needs a GPU"):
    model(jnp.ones((1, 8), jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")
@pytest.mark.parametrize("window", [None, 100])
def test_cudnn_on_a_gpu_is_within_2e_2_of_the_float32_reference(window):
  """bfloat16 cuDNN flash attention vs the float32 naive reference (issue 11's GPU parity)."""
  _check_against_naive(lambda q, k, v: K.cudnn_attention(
    q, k, v, _rows(512)[4], window=window, scale=DH**-0.5), 512, window=window, atol=2e-2,
    dtype=jnp.bfloat16)
