"""A tiny sharded SFT run with the library's training code, shared by the multi-process test and
its single-process reference.

Run as a script it is one process of a multi-host job:

  python multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \
      [--layouts fsdp_tp,data_fsdp_tp,fsdp] [--save-dir DIR]

It calls `rljax.parallel.initialize` and, for each layout of `LAYOUTS` (a mesh spanning every
device of every process, `make_mesh(MeshConfig(...))`), trains the same tiny Transformer exactly
as a user would: `create_train_state` (parameters and Adam moments created directly sharded),
`make_optimizer(OptimizerConfig(...))` and `make_train_step(sft_loss, ...,
count_fn=sft_token_count, shardings=state_shardings(...))`, feeding only this process's rows of
the global batch (`jax.make_array_from_process_local_data`). It prints one JSON line:
{"process_id", "process_count", "device_count", "losses": {layout: [...]}, ...}. With --save-dir
the final policy of the first layout (sharded across the processes) is exported with
`save_pretrained` (gathered across processes, written by process 0).

Imported, `train(layout)` is the same computation in the current process (the test's 8-device
reference).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.distributed import initialize
from rljax.parallel.mesh import MeshConfig, make_mesh, use_mesh
from rljax.train.objectives import sft_loss, sft_token_count
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import create_train_state, state_shardings
from rljax.train.step import default_batch_sharding, make_train_step

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
GLOBAL_BATCH, SEQ_LEN, PROMPT_LEN, NUM_STEPS = 8, 16, 3, 3
OPTIMIZER_CONFIG = OptimizerConfig(1e-3, schedule="linear", total_steps=10, weight_decay=0.01)
# The same (fast-compiling) XLA options in every process and in the reference.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# layout name → (mesh config over 8 devices, rule set). With 2 processes of 4 devices (devices
# ordered by process), "fsdp_tp" splits every matrix over `fsdp` across the two processes (the
# per-layer all-gathers and the gradient reduce-scatter cross them) with `tensor` inside each;
# "data_fsdp_tp" puts `data` across the processes (the gradient all-reduce crosses them).
LAYOUTS: dict[str, tuple[MeshConfig, str]] = {
  "fsdp_tp": (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp"),
  "data_fsdp_tp": (MeshConfig(data=2, fsdp=2, tensor=2), "fsdp_tp"),
  "fsdp": (MeshConfig(data=1, fsdp=-1, tensor=1), "fsdp"),
}


def new_model() -> Transformer:
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


def global_batch(step: int) -> dict[str, np.ndarray]:
  """The full SFT batch of step `step` (same on every process): right-padded token rows whose
  first PROMPT_LEN tokens are the prompt (no loss)."""
  rng = np.random.default_rng(1000 + step)
  tokens = rng.integers(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ_LEN), dtype=np.int32)
  lengths = rng.integers(PROMPT_LEN + 2, SEQ_LEN + 1, GLOBAL_BATCH)
  positions = np.arange(SEQ_LEN)[None, :]
  valid = (positions < lengths[:, None]).astype(np.int32)
  return {
    "input_ids": tokens * valid,
    "attention_mask": valid,
    "loss_mask": valid * (positions >= PROMPT_LEN),
  }


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
  """The contiguous block of rows (dim 0) this process's devices hold under `sharding`."""
  index_map = sharding.addressable_devices_indices_map(global_shape)
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global arrays from this process's rows only (what a per-host data loader would feed)."""
  out = {}
  for name, value in batch.items():
    rows = process_rows(sharding, value.shape)
    out[name] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
  return out


def train(layout: str, num_steps: int = NUM_STEPS) -> tuple[list[float], Any, dict[str, Any]]:
  """Trains `num_steps` steps on `layout`; returns (losses, final model, facts about the run)."""
  mesh_config, rules = LAYOUTS[layout]
  mesh = make_mesh(mesh_config)
  optimizer = make_optimizer(OPTIMIZER_CONFIG)
  graphdef, state = create_train_state(new_model, optimizer, rng=0, mesh=mesh, rules=rules)
  shardings = state_shardings(graphdef, state, mesh, rules)
  batch_sharding = default_batch_sharding(mesh)
  step = make_train_step(functools.partial(sft_loss, chunk_size=8), graphdef, optimizer,
                         count_fn=sft_token_count, shardings=shardings,
                         batch_sharding=batch_sharding, compiler_options=FAST_COMPILE)
  embed = state.params["embed"][...]
  facts = {  # the parameters really are split, across the processes when there are several
    "embed_shard_shape": list(embed.addressable_shards[0].data.shape),
    "embed_fully_addressable": bool(embed.is_fully_addressable),
  }
  losses = []
  with use_mesh(mesh, rules):
    for i in range(num_steps):
      state, metrics = step(state, to_global(global_batch(i), batch_sharding))
      losses.append(float(metrics["loss"]))
  facts["step"], facts["skipped_steps"] = int(state.step), int(state.skipped_steps)
  return losses, state.model(graphdef), facts


def train_losses(layout: str, num_steps: int = NUM_STEPS) -> list[float]:
  """Just the losses of `train`."""
  return train(layout, num_steps)[0]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--save-dir", default=None)
  parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated LAYOUTS keys")
  args = parser.parse_args(argv)
  started = initialize(args.coordinator, args.num_processes, args.process_id,
                       initialization_timeout=60)
  losses, facts = {}, {}
  for i, layout in enumerate(args.layouts.split(",")):
    losses[layout], model, facts[layout] = train(layout)
    if i == 0 and args.save_dir:
      from rljax.models.io import save_pretrained

      save_pretrained(model, None, args.save_dir)
  result = {
    "initialized": started,
    "process_id": jax.process_index(),
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "losses": losses,
    "facts": facts,
  }
  print(json.dumps(result), flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
