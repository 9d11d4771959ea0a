"""Orbax checkpoints: save policy, keep-N, metadata, re-sharding, corruption fallback, SIGKILL."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import rljax
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.rules import FSDP_TP_RULES, MESH_AXES, mesh_and_rules
from rljax.train.checkpoint import Checkpointer, CheckpointRestoreError, tree_fingerprints

WORKER = pathlib.Path(__file__).with_name("checkpoint_worker.py")


def _state(i: int) -> dict:
  """A small state with a float matrix, a typed PRNG key, an int step and a bf16 vector."""
  return {
    "w": jnp.arange(48.0, dtype=jnp.float32).reshape(6, 8) * 0.5 + i,
    "rng": jax.random.fold_in(jax.random.key(7), i),
    "step": jnp.int32(i),
    "half": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.bfloat16) * i,
  }


def _assert_trees_equal(a, b) -> None:
  def same(x, y):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(same, a, b)


def _fill(tmp_path, steps, *, save_every=1, keep=2, **kw) -> Checkpointer:
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=save_every, keep=keep, **kw)
  for i in steps:
    ckpt.save(i, _state(i), data_state={"position": 10 * i})
  ckpt.wait()
  return ckpt


# Save policy, keep-N, metadata.


def test_roundtrip_state_key_data_state_and_metadata(tmp_path):
  config = {"lr": 1e-5, "model": "tiny", "layers": [1, 2]}
  with Checkpointer(tmp_path / "c", save_every=1, metadata=config) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert ckpt.save(3, _state(3), data_state={"position": 30, "epoch": 1})
    state, data_state, meta = ckpt.restore(_state(0))
  _assert_trees_equal(state, _state(3))
  assert data_state == {"position": 30, "epoch": 1}
  assert meta["step"] == 3 and meta["config"] == config
  assert meta["rljax_version"] == rljax.__version__
  assert isinstance(meta["time"], float) and abs(meta["time"] - time.time()) < 600
  # The restored key is a working key: it draws what the original draws.
  np.testing.assert_array_equal(jax.random.normal(state["rng"], (3,)),
                                jax.random.normal(_state(3)["rng"], (3,)))


def test_save_every_force_and_already_saved_steps(tmp_path):
  with Checkpointer(tmp_path / "c", save_every=5, keep=10, async_save=False) as ckpt:
    saved = [i for i in range(1, 13) if ckpt.save(i, _state(i))]
    assert saved == [5, 10]
    assert ckpt.save(12, _state(12), force=True)
    assert not ckpt.save(12, _state(12), force=True)  # already saved: skipped, not an error
    assert not ckpt.save(10, _state(10))
    assert ckpt.all_steps() == [5, 10, 12] and ckpt.latest_step() == 12


def test_keep_n_keeps_the_newest(tmp_path):
  with _fill(tmp_path, range(1, 7), keep=3) as ckpt:
    assert ckpt.all_steps() == [4, 5, 6]
    state, data_state, meta = ckpt.restore(_state(0), step=4)
  _assert_trees_equal(state, _state(4))
  assert data_state == {"position": 40} and meta["step"] == 4


def test_data_state_none_and_reopen_directory(tmp_path):
  with Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, _state(1))
  with Checkpointer(tmp_path / "c") as reopened:  # a new process would do this
    assert reopened.all_steps() == [1]
    state, data_state, _ = reopened.restore(_state(0))
  assert data_state is None
  _assert_trees_equal(state, _state(1))


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep"):
    Checkpointer(tmp_path / "a", keep=1)
  with pytest.raises(ValueError, match="save_every"):
    Checkpointer(tmp_path / "b", save_every=0)
  with Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(_state(0))
    ckpt.save(1, _state(1))
    with pytest.raises(FileNotFoundError, match="step 7"):
      ckpt.restore(_state(0), step=7)


def test_fingerprints_depend_on_every_bit_and_position():
  base = tree_fingerprints(_state(1))
  assert set(base) == {"['w']", "['rng']", "['step']", "['half']"}
  assert base == tree_fingerprints(_state(1))
  flipped = _state(1)
  bits = jax.lax.bitcast_convert_type(flipped["w"], jnp.uint32).at[2, 3].add(1)
  flipped["w"] = jax.lax.bitcast_convert_type(bits, jnp.float32)  # one ulp
  assert tree_fingerprints(flipped)["['w']"] != base["['w']"]
  swapped = _state(1)
  swapped["w"] = swapped["w"][:, ::-1]  # same multiset of values, other positions
  assert tree_fingerprints(swapped)["['w']"] != base["['w']"]
  assert tree_fingerprints(_state(2))["['rng']"] != base["['rng']"]


# Restore onto another mesh.

TINY = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=4)


def _mesh(shape):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _sharded_train_state(mesh, rules) -> dict:
  """{params, opt_state, rng, step} of a tiny Transformer, params and Adam moments on `mesh`."""
  with mesh_and_rules(mesh, rules):
    model = Transformer(TINY, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  opt = optax.adamw(1e-3)

  @jax.jit
  def one_step(params):  # non-trivial moments, so that a mix-up of leaves would show
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = one_step(params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return {"params": params, "opt_state": opt_state,
          "rng": jax.device_put(jax.random.key(5), replicated),
          "step": jax.device_put(jnp.int32(1), replicated)}


def _other_values(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key(99)
  return jnp.zeros_like(x)


def _respec(spec: PartitionSpec, mesh) -> PartitionSpec:
  """`spec` with the mesh axes that have size 1 on `mesh` dropped (e.g. fsdp×tensor → fsdp)."""
  def keep(axes):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if mesh.shape[a] > 1)
    return None if not kept else kept[0] if len(kept) == 1 else kept
  return PartitionSpec(*(keep(axes) for axes in spec))


def test_restore_onto_a_different_mesh_shape(tmp_path):
  saved = _sharded_train_state(_mesh((1, 4, 2)), FSDP_TP_RULES)
  # The source really is split over both axes (not replicated).
  embed = saved["params"]["embed"]
  assert set(embed.sharding.spec) - {None} and len(embed.addressable_shards) == 8
  assert embed.addressable_shards[0].data.shape != embed.shape
  with Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, saved, data_state={"position": 1})
    ckpt.wait()
    # 8×1 data parallel (all replicated) as an abstract target; 1×8 fsdp as a concrete one.
    data_mesh, fsdp_mesh = _mesh((8, 1, 1)), _mesh((1, 8, 1))
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=NamedSharding(data_mesh, PartitionSpec())), saved)
    concrete = jax.device_put(jax.tree.map(_other_values, saved), jax.tree.map(
      lambda x: NamedSharding(fsdp_mesh, _respec(x.sharding.spec, fsdp_mesh)), saved))
    assert concrete["params"]["embed"].sharding.spec == PartitionSpec(None, "fsdp")
    for target in (abstract, concrete):
      restored, data_state, _ = ckpt.restore(target)
      _assert_trees_equal(restored, saved)
      assert data_state == {"position": 1}
      for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert r.sharding == t.sharding, (r.sharding, t.sharding)


# Corruption: orbax does not notice; rljax falls back to the previous checkpoint with a warning.


def _item_files(ckpt: Checkpointer, step: int, item: str = "state") -> list[pathlib.Path]:
  root = pathlib.Path(ckpt.directory, str(step), item)
  files = sorted(p for p in root.rglob("*") if p.is_file())
  assert files, root
  return files


def _truncate_all(files):
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_array_data(files):
  for f in files:
    if f.parent.name == "d":  # OCDBT data files
      f.unlink()


def _flip_bits_in_largest(files):
  largest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 3] ^= 0x08  # inside the array chunk: orbax decodes it without complaint
  largest.write_bytes(bytes(data))


def _tamper_fingerprint(ckpt, step):
  meta_file = pathlib.Path(ckpt.directory, str(step), "meta", "metadata")
  meta = json.loads(meta_file.read_text())
  meta["fingerprints"]["['w']"] ^= 1
  meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["truncate", "delete_data", "flip_bits", "fingerprint"])
def test_damaged_latest_falls_back_to_previous_with_warning(tmp_path, damage):
  with _fill(tmp_path, [1, 2, 3], keep=3) as ckpt:
    if damage == "truncate":
      _truncate_all(_item_files(ckpt, 3))
    elif damage == "delete_data":
      _delete_array_data(_item_files(ckpt, 3))
    elif damage == "flip_bits":
      _flip_bits_in_largest(_item_files(ckpt, 3))
    else:
      _tamper_fingerprint(ckpt, 3)
    with pytest.warns(UserWarning, match=r"step 3 .*failed") as record:
      state, data_state, meta = ckpt.restore(_state(0))
    assert len([w for w in record if "step 3" in str(w.message)]) == 1
    _assert_trees_equal(state, _state(2))
    assert data_state == {"position": 20} and meta["step"] == 2
    # The damaged step is set aside under damaged/, so the keep-N rotation cannot keep it over
    # good ones, and training from step 2 can save step 3 again.
    assert ckpt.all_steps() == [1, 2]
    assert [n.split("-")[0] for n in os.listdir(os.path.join(ckpt.directory, "damaged"))] == ["3"]
    assert ckpt.save(3, _state(3))
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      _assert_trees_equal(ckpt.restore(_state(0))[0], _state(3))


def test_explicit_step_does_not_fall_back(tmp_path):
  with _fill(tmp_path, [1, 2]) as ckpt:
    _truncate_all(_item_files(ckpt, 2))
    with pytest.raises(CheckpointRestoreError, match="step 2"):
      ckpt.restore(_state(0), step=2)
    assert ckpt.all_steps() == [1, 2]


def test_all_damaged_raises_naming_every_step(tmp_path):
  with _fill(tmp_path, [1, 2]) as ckpt:
    _truncate_all(_item_files(ckpt, 1) + _item_files(ckpt, 2))
    with pytest.warns(UserWarning), pytest.raises(CheckpointRestoreError,
                                                  match=r"step 2: .*step 1: "):
      ckpt.restore(_state(0))


def test_damaged_metadata_item_falls_back(tmp_path):
  with _fill(tmp_path, [1, 2]) as ckpt:
    _truncate_all(_item_files(ckpt, 2, "meta"))
    with pytest.warns(UserWarning, match="step 2"):
      _, data_state, _ = ckpt.restore(_state(0))
  assert data_state == {"position": 10}


# Fault tests: SIGKILL mid-training, resume, bitwise-identical parameters.


def _worker_env(cache_dir: pathlib.Path) -> dict[str, str]:
  """One CPU device; XLA optimisation level 0 and a compilation cache shared by the workers (the
  runs after the first two load their executables instead of compiling them again)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _spawn(tmp_path, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)],
                          env=_worker_env(tmp_path / "xla_cache"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"worker timed out: {err[-2000:]}")
  return proc.returncode, out + "\n" + err


def _load(path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_sigkill_and_resume_gives_bitwise_identical_params(tmp_path):
  """A tiny Transformer trained by `make_train_step` with a `Checkpointer` (see
  checkpoint_worker.py), SIGKILLed and resumed, ends with the parameters of an uninterrupted run."""
  steps, every = 20, 4
  common = ("--steps", steps, "--every", every)
  # Started together (2 cores): a sync run killed between checkpoints and an async run killed
  # right after starting the save of step 12. Then, together, the uninterrupted reference run
  # and the two resumed runs (which find the first two runs' executables in the cache).
  between = _spawn(tmp_path, "--dir", tmp_path / "between", *common, "--sync", "--kill-at", 10)
  mid = _spawn(tmp_path, "--dir", tmp_path / "mid", *common, "--kill-mid-save", 12)
  killed = {name: _finish(p) for name, p in (("between", between), ("mid", mid))}
  for name, (code, log) in killed.items():
    assert code == -9 and "DONE" not in log, (name, code, log[-3000:])

  ref = _spawn(tmp_path, "--dir", tmp_path / "ref", *common, "--out", tmp_path / "ref.npz")
  resumes = {name: _spawn(tmp_path, "--dir", tmp_path / name, *common, "--resume",
                          "--out", tmp_path / f"{name}.npz") for name in ("between", "mid")}
  code, log = _finish(ref)
  assert code == 0 and "DONE" in log and "RESUMED" not in log, log[-3000:]
  expected = _load(tmp_path / "ref.npz")
  assert len(expected) > 5  # every parameter of the model (embed, lm_head, norms, layers)
  for name, proc in resumes.items():
    code, log = _finish(proc)
    assert code == 0 and "DONE" in log, (name, log[-3000:])
    resumed_from = int(log.split("RESUMED ")[1].split()[0])
    if name == "between":  # sync saves: 4 and 8 committed before the kill at 10
      assert resumed_from == 8
    else:  # the save of 12 was killed in flight unless it had already committed
      assert resumed_from == (8 if "MIDSAVE" in killed["mid"][1] else 12), log[-2000:]
    got = _load(tmp_path / f"{name}.npz")
    assert got.keys() == expected.keys()
    for key in expected:
      assert np.array_equal(got[key], expected[key]), (name, key)
