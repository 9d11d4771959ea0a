"""Checkpoints: a thin wrapper over `orbax.checkpoint.CheckpointManager`.

One checkpoint (a directory named by its step) holds three orbax items:

  state   the train state, any pytree of `jax.Array`s (typed PRNG keys included; orbax 0.12
          stores them natively), written by `StandardSave` — sharded, one file set per process;
  data    `{"data_state": ...}`, a JSON-able value such as the data iterator's position;
  meta    `{"step", "time", "rljax_version", "config", "fingerprints"}` as JSON.

Saves are asynchronous by default (the device-to-host copy blocks, the write does not), atomic
(orbax writes into a temporary directory and renames it on commit, so a process killed mid-save
leaves no half-written step behind), taken every `save_every` steps, and rotated to the newest
`keep` (at least 2, so there is always an older checkpoint to fall back on).

Orbax does not detect truncated or corrupted files: a damaged chunk may fail to decode, or may
decode to wrong numbers. Each checkpoint therefore stores a fingerprint per leaf — a position-
mixed uint32 sum of the leaf's raw bits, computed on device under any sharding, so it is the same on
every mesh — and `restore` recomputes it on the restored values. When the newest checkpoint fails
to restore (an error, or a fingerprint mismatch), `restore` warns, moves that checkpoint to
`<directory>/damaged/` (a damaged newest checkpoint would otherwise survive the keep-N rotation
and evict good ones) and restores the previous one; it raises only when no checkpoint restores.

Constant sub-states are written once. A `TrainState`'s `extras[k]` for `k` in `once` (default
`("reference",)`: the on-policy trainers' frozen reference policy, as large as the policy itself)
never changes during a run, so `save` writes it once, to `<directory>/once/<k>` (with its own
fingerprints), and each step's checkpoint holds the rest of the state; `restore` reads both and
puts it back, so a resumed run trains against the same reference without every checkpoint
doubling in size. `save_value` / `restore_value` are that write-once storage for any pytree
(the runner caches an experiment's expensive preamble with them, `rljax.experiment.stage`).

A frozen base is not written at all. With `frozen_base` (e.g. the directory a LoRA run's base
model is loaded from), a `TrainState`'s `frozen` — the base weights, which never change and are
loaded again at start — is left out of every checkpoint, which records the base's path and its
fingerprints instead (`meta["frozen_base"]`); `restore` takes `frozen` from the target (which must
hold the loaded base, concrete) and refuses one whose fingerprints differ. A LoRA checkpoint is
then the adapters, their optimizer state and the counters: a few MB for a 1B model.

Restoring onto a different mesh is a property of the target: `restore(target)` takes an abstract
pytree (`jax.ShapeDtypeStruct`s with `.sharding`, e.g. from `jax.eval_shape` plus the shardings of
the new mesh) or a concrete one whose shardings are used, and orbax reads each array directly into
those shardings — a state saved on a 4×2 (fsdp × tensor) mesh restores onto 8×1 (data).

Example:
  >>> with Checkpointer("/ckpt", save_every=100, metadata={"lr": 1e-5}) as ckpt:
  ...   if ckpt.latest_step() is not None:
  ...     state, data_state, meta = ckpt.restore(abstract_state)
  ...     position = data_state["position"]
  ...   for step in range(start, num_steps + 1):
  ...     state = train_step(state, batch(position))
  ...     ckpt.save(step, state, data_state={"position": step})
  ...   ckpt.save(num_steps, state, data_state={"position": num_steps}, force=True)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

__all__ = ["Checkpointer", "CheckpointRestoreError", "abstract_target", "restore_value", "save_value",
           "tree_fingerprints", "value_saved"]

_STATE, _DATA, _META = "state", "data", "meta"
_ONCE = "once"

# Multiplicative hashing constants (Knuth's golden ratio and MurmurHash3's fmix32).
_GOLDEN = 0x9E3779B1
_MIX_1 = 0x85EBCA6B
_MIX_2 = 0xC2B2AE35


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the directory could be restored (each step's error is in the message)."""


def _as_uint32_words(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 words (one per element, two per 8-byte element)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.stack([_as_uint32_words(jnp.real(x)), _as_uint32_words(jnp.imag(x))], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)  # shape [..., 2]
  raise TypeError(f"cannot fingerprint dtype {x.dtype}")


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element index (mod 2**32) built from iotas, so it shards like the array."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    iota = lax.broadcasted_iota(jnp.uint32, shape, dim)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 hash of a leaf's bits and their positions: sum_i fmix(word_i * G + i * M1)."""
  words = _as_uint32_words(x)
  mixed = words * jnp.uint32(_GOLDEN) + _linear_index(words.shape) * jnp.uint32(_MIX_1)
  mixed = mixed ^ (mixed >> 15)
  mixed = mixed * jnp.uint32(_MIX_2)
  mixed = mixed ^ (mixed >> 13)
  return jnp.sum(mixed, dtype=jnp.uint32)


_jitted_leaf_fingerprint = jax.jit(_leaf_fingerprint)


def tree_fingerprints(tree: Any) -> dict[str, int]:
  """Per-leaf uint32 fingerprints of a pytree of arrays, keyed by the leaf's path.

  Integer (wrap-around) sums are exact and order-free, so the fingerprint of an array does not
  depend on its sharding: a checkpoint saved on one mesh verifies on another. Computed on device,
  one small program per leaf shape, dtype and sharding (compiled once, shared by every tree with
  such leaves: the policy, its reference copy, the optimizer moments); only the scalars are
  fetched.
  """
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [jax.tree_util.keystr(path) for path, _ in paths_and_leaves]
  values = jax.device_get([
    _jitted_leaf_fingerprint(leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf))
    for _, leaf in paths_and_leaves])
  return dict(zip(paths, map(int, values)))


def _default_sharding() -> jax.sharding.Sharding:
  if jax.process_count() > 1:
    raise ValueError("restore target leaves need a .sharding on more than one process")
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
  """A `ShapeDtypeStruct` with a sharding for one target leaf (abstract or concrete)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding if x.sharding is not None else _default_sharding()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  value = np.asarray(x)
  return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=_default_sharding())


def abstract_target(target: Any) -> Any:
  """The restore target as `ShapeDtypeStruct`s with shardings (concrete leaves give theirs)."""
  return jax.tree.map(_abstract_leaf, target)


def _rljax_version() -> str:
  import rljax  # the package root; imported lazily to keep this module light to import

  return str(getattr(rljax, "__version__", "unknown"))


_FINGERPRINTS_FILE = "fingerprints.json"


def value_saved(path: str | os.PathLike) -> bool:
  """Whether `save_value` finished writing a value to `path`."""
  return (epath.Path(path) / _FINGERPRINTS_FILE).exists()


def save_value(path: str | os.PathLike, value: Any) -> None:
  """Writes a pytree of arrays to the directory `path` (synchronously, overwriting) with its
  per-leaf fingerprints; the fingerprints file is written last, so it marks a complete value."""
  path = epath.Path(path)
  with ocp.StandardCheckpointer() as writer:
    writer.save(path / "value", value, force=True)
    writer.wait_until_finished()
  if jax.process_index() == 0:
    (path / _FINGERPRINTS_FILE).write_text(json.dumps(tree_fingerprints(value)))


def restore_value(path: str | os.PathLike, target: Any) -> Any:
  """The value `save_value` wrote to `path`, restored onto `target` (abstract or concrete, see
  `Checkpointer.restore`) and verified against its fingerprints.

  Raises:
    FileNotFoundError: nothing (complete) was saved at `path`.
    CheckpointRestoreError: a leaf's fingerprint does not match (a damaged file).
  """
  path = epath.Path(path)
  if not value_saved(path):
    raise FileNotFoundError(f"no value saved at {path}")
  with ocp.StandardCheckpointer() as reader:
    value = reader.restore(path / "value", abstract_target(target))
  expected = json.loads((path / _FINGERPRINTS_FILE).read_text())
  actual = tree_fingerprints(value)
  bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
  if bad:
    raise CheckpointRestoreError(f"checksum mismatch in {path} for leaves {bad[:5]}")
  return value


class Checkpointer:
  """Asynchronous, atomic, keep-N checkpoints of a train state, its data position and metadata.

  Args:
    directory: where step directories are written (created if missing). Local path or any path
      orbax/etils understands (e.g. `gs://...`).
    save_every: `save` writes when `step % save_every == 0` (or `force=True`). Default 1.
    keep: how many of the newest checkpoints to keep; at least 2 so that a damaged newest
      checkpoint leaves an older one to restore. Default 2.
    async_save: write in a background thread (orbax's `AsyncCheckpointer`); `save` returns after
      the device-to-host copy, so the state may be donated to the next step at once. Default True.
    metadata: JSON-able user config stored with every checkpoint (returned by `restore`).
    once: keys of a `TrainState`'s `extras` that are constant over the run and written once
      (module doc); default ("reference",).
    frozen_base: where a `TrainState`'s constant `frozen` variables come from (a path or a
      description); when given they are not written, only their fingerprints (module doc).

  Call on every process (multi-host): orbax synchronises processes and writes each process's
  shards. Use as a context manager, or call `close()`, so pending writes are committed.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_every: int = 1,
    keep: int = 2,
    async_save: bool = True,
    metadata: dict[str, Any] | None = None,
    once: tuple[str, ...] = ("reference",),
    frozen_base: str | None = None,
  ):
    if not isinstance(save_every, int) or save_every < 1:
      raise ValueError(f"save_every must be an integer >= 1, got {save_every!r}")
    if not isinstance(keep, int) or keep < 2:
      raise ValueError(f"keep must be an integer >= 2 (a fallback checkpoint), got {keep!r}")
    directory = os.fspath(directory)
    # orbax's tensorstore backend needs absolute local paths; URLs (gs://...) pass through.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.save_every = save_every
    self.keep = keep
    self.metadata = dict(metadata) if metadata is not None else {}
    self.once = tuple(once)
    self.frozen_base = frozen_base
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # leftovers of a process killed mid-save
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_STATE, _DATA, _META)
    )

  # Saving.

  def should_save(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would write (interval reached, step not yet saved)."""
    if step in self.all_steps():
      return False
    return force or step % self.save_every == 0

  def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
    """Saves `state` and `data_state` as checkpoint `step` when due; returns whether it saved.

    Args:
      step: the training step (a Python int; names the checkpoint).
      state: any pytree of arrays (params, optimizer state, RNG keys, step counter, ...).
      data_state: JSON-able value restored alongside (e.g. `{"position": 1234}`).
      force: save even if `step` is not a multiple of `save_every` (e.g. the final step).

    Returns:
      True when a checkpoint was started; False when the step is not due or already saved.
      With `async_save` the write finishes in the background (see `wait`).
    """
    step = int(step)
    if not self.should_save(step, force=force):
      return False
    state, constants = self._split_once(state)
    for key, value in constants.items():
      self._save_once(key, value)
    state, base = self._split_frozen(state)
    meta = {
      "step": step,
      "time": time.time(),
      "rljax_version": _rljax_version(),
      "config": self.metadata,
      "fingerprints": tree_fingerprints(state),
      **({} if base is None else {"frozen_base": base}),
    }
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave({"data_state": data_state}),
        _META: ocp.args.JsonSave(meta),
      }
    )
    return bool(self._manager.save(step, args=args, force=True))

  # Constant sub-states, written once.

  def _split_once(self, state: Any) -> tuple[Any, dict[str, Any]]:
    """(state without the `once` extras, {key: extras[key]}) — only for states with `extras`."""
    extras = getattr(state, "extras", None)
    if not isinstance(extras, dict) or not any(k in extras for k in self.once):
      return state, {}
    constants = {k: extras[k] for k in self.once if k in extras}
    rest = {k: v for k, v in extras.items() if k not in constants}
    return state.replace(extras=rest), constants

  def _split_frozen(self, state: Any) -> tuple[Any, dict[str, Any] | None]:
    """(state without `frozen`, {"path", "fingerprints"} of it) with `frozen_base`, else
    (state, None)."""
    if self.frozen_base is None or not hasattr(state, "frozen"):
      return state, None
    base = {"path": self.frozen_base, "fingerprints": tree_fingerprints(state.frozen)}
    return state.replace(frozen=None), base

  def _once_path(self, key: str) -> epath.Path:
    return epath.Path(self.directory) / _ONCE / key

  def _save_once(self, key: str, value: Any) -> None:
    path = self._once_path(key)
    if not value_saved(path):  # else written by an earlier save of this run (or the resumed one)
      save_value(path, value)

  def _restore_once(self, key: str, abstract: Any) -> Any:
    path = self._once_path(key)
    if not value_saved(path):
      raise FileNotFoundError(f"the restore target holds extras[{key!r}], but {path} (written "
                              "once per run by `save`) does not exist")
    return restore_value(path, abstract)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # Listing.

  def all_steps(self) -> list[int]:
    """Steps of the committed checkpoints, ascending (in-progress saves are not listed)."""
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None when the directory holds no checkpoint."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # Restoring.

  def _restore_step(self, step: int, abstract: Any) -> tuple[Any, Any, dict[str, Any]]:
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardRestore(abstract),
        _DATA: ocp.args.JsonRestore(),
        _META: ocp.args.JsonRestore(),
      }
    )
    restored = self._manager.restore(step, args=args)
    state, data, meta = restored[_STATE], restored[_DATA], restored[_META]
    if meta is None or data is None:
      raise ValueError(f"checkpoint {step} lacks its '{_META}' or '{_DATA}' item")
    expected = meta.get("fingerprints")
    if expected is not None:
      actual = tree_fingerprints(state)
      bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
      if bad:
        raise ValueError(f"checksum mismatch in checkpoint {step} for leaves {bad[:5]}")
    metadata = {k: v for k, v in meta.items() if k != "fingerprints"}
    return state, data.get("data_state"), metadata

  def restore(self, target: Any, *, step: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Restores a checkpoint onto the shardings of `target`.

    Args:
      target: pytree with the structure of the saved state: `jax.ShapeDtypeStruct`s carrying the
        desired `.sharding` (any mesh; not necessarily the one saved from), or concrete arrays
        whose shardings are used. On one process a missing sharding means the first device.
      step: the step to restore; None (default) restores the newest one that restores cleanly.

    Returns:
      `(state, data_state, metadata)`; `metadata` holds `step`, `time` (seconds since the epoch),
      `rljax_version` and `config` (the `metadata` given at save time).

    Raises:
      FileNotFoundError: no checkpoint in the directory (or `step` not among them).
      CheckpointRestoreError: with `step=None`, no checkpoint restores; with an explicit `step`,
        that one does not. When the newest fails and an older one restores, a `UserWarning` names
        the failed step and its error, and the failed step is moved to `<directory>/damaged/`.
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
    target, constants = self._split_once(target)
    full_target = target
    target, base = self._split_frozen(target)
    abstract = abstract_target(target)
    constants = {k: self._restore_once(k, abstract_target(v)) for k, v in constants.items()}
    candidates = [step] if step is not None else steps[::-1]
    failures: list[tuple[int, Exception]] = []
    for candidate in candidates:
      try:
        result = self._restore_step(candidate, abstract)
      except Exception as error:  # noqa: BLE001 -- any failure means "try the previous one"
        failures.append((candidate, error))
        if step is None:
          warnings.warn(
            f"rljax: restoring checkpoint step {candidate} from {self.directory} failed "
            f"({type(error).__name__}: {error}); trying an older checkpoint",
            stacklevel=2,
          )
        continue
      self._delete_failed([s for s, _ in failures])
      if base is not None:
        result = self._with_frozen(result, full_target.frozen, base)
      if constants:
        state, data_state, metadata = result
        result = (state.replace(extras={**state.extras, **constants}), data_state, metadata)
      return result
    report = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
    raise CheckpointRestoreError(
      f"no checkpoint in {self.directory} could be restored ({report})"
    ) from failures[-1][1]

  def _with_frozen(self, result: tuple, frozen: Any, base: dict[str, Any]) -> tuple:
    """The restored state with the target's `frozen`, after checking it is the saved base."""
    state, data_state, metadata = result
    saved = metadata.get("frozen_base")
    if saved is None:
      raise ValueError(f"checkpoint {metadata['step']} holds its frozen variables; restore it "
                       "with a Checkpointer without `frozen_base`.")
    if saved["fingerprints"] != base["fingerprints"]:
      bad = sorted(k for k in set(saved["fingerprints"]) | set(base["fingerprints"])
                   if saved["fingerprints"].get(k) != base["fingerprints"].get(k))
      raise ValueError(f"the frozen base of the target differs from the one checkpoint "
                       f"{metadata['step']} was trained on ({saved['path']!r}): leaves {bad[:5]}")
    return state.replace(frozen=frozen), data_state, metadata

  def _delete_failed(self, steps: list[int]) -> None:
    """Moves newer checkpoints that failed out of the rotation (so keep-N never keeps them over
    good ones): a local one goes to `<directory>/damaged/<step>` for inspection, a remote one is
    deleted."""
    for step in steps:
      source = os.path.join(self.directory, str(step))
      try:
        if "://" not in self.directory and os.path.isdir(source):
          target = os.path.join(self.directory, "damaged", f"{step}-{int(time.time())}")
          os.makedirs(os.path.dirname(target), exist_ok=True)
          os.replace(source, target)
        else:
          self._manager.delete(step)
      except Exception as error:  # noqa: BLE001 -- best effort
        warnings.warn(f"rljax: could not set aside damaged checkpoint {step}: {error}", stacklevel=3)
    self._manager.reload()
