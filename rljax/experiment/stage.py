"""Expensive preambles, computed once per run: `cached_stage(config, name, compute, template)`.

An experiment's hook may run a long stage before the runner's loop starts — the addition
experiment's `build_model` trains an SFT policy for 800 steps, then the runner runs GRPO on it.
Wrapped in `cached_stage`, the stage's result is written to `<logging.out_dir>/preamble/<name>`
(`rljax.train.checkpoint.save_value`: orbax, with fingerprints) when it is first computed, and a
resumed run restores it from there instead of computing it again. A fresh run in the same
directory computes it anew (the runner deletes `preamble/` when it starts a run).

Example (a `build_model` hook):

  >>> def build_model(config, tokenizer):
  ...   return cached_stage(config, "sft", lambda: run_sft(...),
  ...                       template=lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flax import nnx

from rljax.train.checkpoint import restore_value, save_value, value_saved

PREAMBLE_DIR = "preamble"


def stage_path(config: Any, name: str) -> str:
  """Where `cached_stage(config, name, ...)` keeps its result."""
  if not name or os.sep in name or name in (".", ".."):
    raise ValueError(f"stage name must be a plain directory name; got {name!r}.")
  return os.path.join(os.path.abspath(config.logging.out_dir), PREAMBLE_DIR, name)


def cached_stage(config: Any, name: str, compute: Callable[[], Any],
                 template: Callable[[], Any]) -> Any:
  """`compute()`, or the result an earlier call of this run directory saved.

  Args:
    config: the run's `ExperimentConfig` (a hook's argument); `logging.out_dir` is the run
      directory.
    name: the stage's name (a directory name under `preamble/`).
    compute: () -> an `nnx.Module` or a pytree of arrays: the expensive stage.
    template: () -> a value of the same structure (e.g. a freshly initialised module); it is
      only traced (`nnx.eval_shape`), so it costs no computation.

  Returns:
    The stage's result; a restored one is bitwise equal to the computed one.
  """
  path = stage_path(config, name)
  if value_saved(path):
    abstract = nnx.eval_shape(template)
    if isinstance(abstract, nnx.Module):
      graphdef, state = nnx.split(abstract)
      return nnx.merge(graphdef, restore_value(path, state))
    return restore_value(path, abstract)
  value = compute()
  save_value(path, nnx.state(value) if isinstance(value, nnx.Module) else value)
  return value
