"""LoRA adapters: config validation, PEFT's init, the update y = x W + s (x A) B against numpy,
adapters off = the base exactly, merged = unmerged, counts, the KV-cache path, dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.heads import ValueModel
from rljax.models.lora import (
  LoRAConfig,
  adapter_axes,
  adapters_disabled,
  add_lora,
  lora_config_of,
  lora_layers,
  lora_param_count,
  lora_trainable,
  merged,
  trainable_filter,
)
from rljax.models.transformer import PROJECTIONS, Transformer, _lora_matmul, project

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True)
LORA = LoRAConfig(rank=4, alpha=8.0)


def _ids(shape=(2, 7), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, CONFIG.vocab_size)


@nnx.jit
def _forward(model, ids):
  return model(ids)


def _randomize_b(model, seed=1, std=0.1):
  """Nonzero B (a fresh adapter's is 0): an adapter that changes the model."""
  for i, layers in enumerate(lora_layers(model)):
    for j, name in enumerate(layers.lora.target_modules):
      b = getattr(layers, f"{name}_lora_b")
      b[...] = std * jax.random.normal(jax.random.key(seed * 100 + 10 * i + j), b.shape)
  return model


@pytest.fixture(scope="module")
def base():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


def _adapted(base, lora=LORA):
  graphdef, state = nnx.split(base)
  return add_lora(nnx.merge(graphdef, state), lora, rngs=nnx.Rngs(1))


# -- config ------------------------------------------------------------------------------------


def test_config_names_targets_and_scale():
  assert LoRAConfig(target_modules="all-linear").target_modules == PROJECTIONS
  assert LoRAConfig(target_modules=["v_proj", "q"]).target_modules == ("q_proj", "v_proj")
  assert LoRAConfig(target_modules="down").target_modules == ("down_proj",)
  assert LoRAConfig(rank=16, alpha=32).scale == 2.0
  assert LoRAConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0
  hash(LoRAConfig(target_modules=["q", "k"]))  # a static attribute of the graphdef


@pytest.mark.parametrize("kwargs, match", [
  ({"rank": 0}, "`rank`"), ({"rank": 2.0}, "`rank`"), ({"alpha": 0.0}, "`alpha`"),
  ({"dropout": 1.0}, "`dropout`"), ({"dropout": -0.1}, "`dropout`"),
  ({"use_rslora": 1}, "`use_rslora`"), ({"target_modules": ["q", "lm_head"]}, "target_modules"),
  ({"target_modules": []}, "target_modules"), ({"target_modules": 3}, "target_modules"),
])
def test_config_rejects_bad_values_naming_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoRAConfig(**kwargs)


# -- init, shapes, axes, counts ----------------------------------------------------------------


def test_init_is_peft_s_and_shapes_axes_counts(base):
  """A ~ U(±1/sqrt(fan_in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B = 0; stacked [L, *in, r] /
  [L, r, *out] in W's head layout; trainable = Σ r·(in + out) exactly."""
  model = _adapted(base, LoRAConfig(rank=16, alpha=16))
  layers = model.layers
  c, r, L = CONFIG, 16, CONFIG.num_layers
  d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
  dims = {"q_proj": (d, c.num_heads * hd), "k_proj": (d, c.num_kv_heads * hd),
          "v_proj": (d, c.num_kv_heads * hd), "o_proj": (c.num_heads * hd, d),
          "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  for name, (fan_in, fan_out) in dims.items():
    a, b = getattr(layers, f"{name}_lora_a"), getattr(layers, f"{name}_lora_b")
    w = getattr(layers, name)
    k = 2 if name == "o_proj" else 1
    assert a.shape == (L, *w.shape[1:1 + k], r) and b.shape == (L, r, *w.shape[1 + k:])
    assert isinstance(a, nnx.LoRAParam) and isinstance(b, nnx.LoRAParam)
    assert a.out_sharding == adapter_axes(name)[0] and b.out_sharding == adapter_axes(name)[1]
    assert a.out_sharding[-1] == "lora_rank" and b.out_sharding[:2] == ("layers", "lora_rank")
    values = np.asarray(a[...])
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
    assert abs(values.std() - bound / math.sqrt(3)) < 0.15 * bound  # uniform's std
    assert not np.any(np.asarray(b[...]))
  _, params, _ = nnx.split(model, lora_trainable, ...)
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == L * r * sum(i + o for i, o in dims.values()) == lora_param_count(c, layers.lora)


def test_adding_lora_twice_or_to_no_layers_is_refused(base):
  model = _adapted(base)
  with pytest.raises(ValueError, match="already"):
    add_lora(model, LORA, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="LoRAConfig"):
    add_lora(base, {"rank": 4}, rngs=nnx.Rngs(0))


# -- the function ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q_proj", "o_proj", "down_proj"])
def test_project_is_xw_plus_scaled_xab_against_numpy(name):
  """project(p, name, x) = x W + (x A)(s B), over W's contracted (head) dims."""
  rng = np.random.default_rng(0)
  k = 2 if name == "o_proj" else 1
  in_shape, out_shape = ((4, 3), (5,)) if k == 2 else ((6,), (2, 3))
  x = rng.normal(size=(2, 3, *in_shape)).astype(np.float32)
  w = rng.normal(size=(*in_shape, *out_shape)).astype(np.float32)
  a = rng.normal(size=(*in_shape, 2)).astype(np.float32)
  b = rng.normal(size=(2, *out_shape)).astype(np.float32)
  got = project({name: w, f"{name}_lora_a": a, f"{name}_lora_b": 0.5 * b}, name, x, k)
  x2 = x.reshape(6, -1).astype(np.float64)
  want = x2 @ w.reshape(x2.shape[1], -1) + 0.5 * (x2 @ a.reshape(x2.shape[1], 2)) @ b.reshape(2, -1)
  np.testing.assert_allclose(np.asarray(got).reshape(6, -1), want, rtol=1e-5, atol=1e-5)


def _unmerged(x, w, a, b):
  return x @ w + (x @ a) @ b


def test_merged_matmul_equals_the_unmerged_form_values_and_gradients():
  """The float32 fast path x (W + A B) with its custom VJP equals autodiff of x W + (x A) B in
  value and in all four gradients, jitted and eagerly; with W frozen (as under LoRA) its
  compiled backward drops dW = xᵀ g (XLA removes the unused output)."""
  rng = np.random.default_rng(0)
  x, w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
                for s in ((12, 6), (6, 10), (6, 3), (3, 10)))
  probe = jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)

  def loss(fn):
    return lambda *args: jnp.sum(jnp.tanh(fn(*args)) * probe)

  want = jax.value_and_grad(loss(_unmerged), argnums=(0, 1, 2, 3))(x, w, a, b)
  for wrap in (lambda f: f, jax.jit):
    got = wrap(jax.value_and_grad(loss(_lora_matmul), argnums=(0, 1, 2, 3)))(x, w, a, b)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)

  def flops(argnums):
    grad = jax.jit(jax.grad(loss(_lora_matmul), argnums=argnums))
    cost = grad.lower(x, w, a, b).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  assert flops((0, 1, 2, 3)) - flops((0, 2, 3)) >= 2 * 12 * 6 * 10  # dW = xᵀ g only with W


def test_project_merges_in_float32_only():
  """float32 takes the merged fast path; bfloat16 keeps x W + (x A) B, where W + A B would
  round the adapter's update at W's scale. Both equal the unmerged form."""
  rng = np.random.default_rng(1)
  p = {"up_proj": rng.normal(size=(6, 10)), "up_proj_lora_a": rng.normal(size=(6, 3)),
       "up_proj_lora_b": 0.1 * rng.normal(size=(3, 10))}
  x = rng.normal(size=(2, 4, 6))
  for dtype, merges in ((jnp.float32, True), (jnp.bfloat16, False)):
    args = ({k: jnp.asarray(v, dtype) for k, v in p.items()}, jnp.asarray(x, dtype))
    jaxpr = str(jax.make_jaxpr(lambda p, x: project(p, "up_proj", x))(*args))
    assert ("custom_vjp_call" in jaxpr) == merges, dtype
    want = _unmerged(*(np.asarray(v, np.float64) for v in
                       (args[1], args[0]["up_proj"], args[0]["up_proj_lora_a"],
                        args[0]["up_proj_lora_b"])))
    tol = 1e-5 if merges else 5e-2
    got = np.asarray(project(args[0], "up_proj", args[1]), np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_merged_projections_under_remat_same_gradients_and_dots_keeps_them():
  """The adapters' gradients are the same with and without remat (both policies), and the
  "dots" policy keeps the merged projections' outputs (named for it) as it keeps plain dots:
  its lowered backward recomputes fewer matmuls than "nothing"'s (layers in a scan)."""
  ids = _ids((2, 6))

  def gradient(**changes):
    model = _randomize_b(add_lora(Transformer(CONFIG.replace(**changes), rngs=nnx.Rngs(0)),
                                  LORA, rngs=nnx.Rngs(1)))
    graphdef, params, frozen = nnx.split(model, lora_trainable, ...)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, frozen)(ids))[..., 0])
    return jax.jit(jax.grad(loss)), params

  grad, params = gradient(scan_unroll=1)
  want = grad(params)
  count = {}
  for policy in ("nothing", "dots"):
    grad, params = gradient(remat=True, remat_policy=policy, scan_unroll=1)
    count[policy] = grad.lower(params).as_text().count("dot_general")
    for g, r in zip(jax.tree.leaves(grad(params)), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
  assert count["nothing"] > count["dots"], count


def test_fresh_adapters_and_adapters_off_are_the_base_exactly(base):
  ids = _ids()
  want = np.asarray(_forward(base, ids))
  model = _adapted(base)
  np.testing.assert_array_equal(np.asarray(_forward(model, ids)), want)  # B = 0
  _randomize_b(model)
  assert np.abs(np.asarray(_forward(model, ids)) - want).max() > 1e-2
  with adapters_disabled(model):
    np.testing.assert_array_equal(np.asarray(_forward(model, ids)), want)
  assert model.layers.enabled
  assert np.abs(np.asarray(_forward(model, ids)) - want).max() > 1e-2


def test_merged_equals_unmerged_and_leaves_the_model_unchanged(base):
  model = _randomize_b(_adapted(base, LoRAConfig(rank=4, alpha=4, use_rslora=True)))
  ids = _ids()
  want = np.asarray(model(ids))
  one = merged(model)
  assert not one.layers.enabled and model.layers.enabled
  np.testing.assert_allclose(np.asarray(one(ids)), want, rtol=1e-5, atol=1e-5)
  layers, s = model.layers, model.layers.lora.scale
  w, a, b = (np.asarray(getattr(layers, n)[...], np.float64)
             for n in ("o_proj", "o_proj_lora_a", "o_proj_lora_b"))
  ref = w + s * np.einsum("lhdr,lro->lhdo", a, b)
  np.testing.assert_allclose(np.asarray(one.layers.o_proj[...]), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(model(ids)), want)  # the original is untouched
  assert one.embed[...] is model.embed[...]  # only the merged projections are new arrays


def test_kv_cache_decoding_sees_the_adapters(base):
  """The cached decoder reads `layers.stacked()`: a cached pass equals the full forward."""
  model = _randomize_b(_adapted(base, LoRAConfig(rank=2, alpha=4, target_modules=["v", "up"])))
  ids = _ids()
  cached = nnx.jit(lambda m, ids: m.forward_with_cache(ids, m.init_cache(2, 7), 0)[0])
  np.testing.assert_allclose(np.asarray(cached(model, ids)), np.asarray(_forward(model, ids)),
                             rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_mode_and_reseedable(base):
  model = _randomize_b(_adapted(base, LoRAConfig(rank=4, alpha=8, dropout=0.5)))
  ids = _ids()
  graphdef, state = nnx.split(model)
  no_dropout = np.asarray(merged(model)(ids))

  @jax.jit
  def forward(state, key):
    m = nnx.merge(graphdef, state)
    if key is not None:
      m.train()
      nnx.reseed(m, dropout=key)
    return m(ids)

  np.testing.assert_allclose(np.asarray(forward(state, None)), no_dropout, rtol=1e-5, atol=1e-5)
  one, again, other = (np.asarray(forward(state, jax.random.key(k))) for k in (0, 0, 1))
  np.testing.assert_array_equal(one, again)
  assert np.abs(one - other).max() > 1e-3 and np.abs(one - no_dropout).max() > 1e-3


def test_value_model_adapters_and_the_trainable_filter(base):
  """A critic gets adapters on its backbone; adapters and the head train, the base does not."""
  critic = ValueModel.from_policy(base, rngs=nnx.Rngs(2))
  assert trainable_filter(critic) is nnx.Param
  add_lora(critic, LoRAConfig(rank=2, alpha=2, target_modules=["q", "v"]), rngs=nnx.Rngs(3))
  assert lora_config_of(critic).target_modules == ("q_proj", "v_proj")
  _, params, frozen = nnx.split(critic, trainable_filter(critic), ...)
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert names == {"head_weight", "head_bias"} | {
    f"backbone/layers/{n}_proj_lora_{ab}" for n in "qv" for ab in "ab"}
  assert "backbone/layers/q_proj" in {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
  assert lora_config_of(nnx.split(critic)[0]) == lora_config_of(critic)
