"""A tiny sharded SFT run, shared by the multi-process test and its single-process reference.

Run as a script it is one process of a multi-host job:

  python multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \
      [--layouts fsdp_tp,data_fsdp_tp,fsdp] [--save-dir DIR]

It calls `rljax.parallel.initialize`, trains the same tiny Transformer on each layout of
`LAYOUTS` (a mesh spanning every device of every process) for `NUM_STEPS` AdamW steps, feeding
only this process's rows of the global batch (`jax.make_array_from_process_local_data`), and
prints one JSON line: {"process_id", "process_count", "device_count", "losses": {layout: [...]}}.
With --save-dir the final parameters of the first layout are exported with `save_pretrained`
(gathered across processes, written by process 0).

Imported, `train_losses(layout)` is the same computation in the current process (the test's
8-device reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.ops.masking import aggregate
from rljax.parallel.distributed import initialize
from rljax.parallel.mesh import MeshConfig, constrain, make_mesh, use_mesh
from rljax.parallel.rules import logical_to_mesh_spec, named_shardings

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
GLOBAL_BATCH, SEQ_LEN, NUM_STEPS = 8, 16, 3
LEARNING_RATE = 1e-3
# layout name → (mesh config over 8 devices, rule set). With 2 processes of 4 devices (devices
# ordered by process), "fsdp_tp" splits every matrix over `fsdp` across the two processes (the
# per-layer all-gathers and the gradient reduce-scatter cross them) with `tensor` inside each;
# "data_fsdp_tp" puts `data` across the processes (the gradient all-reduce crosses them).
LAYOUTS: dict[str, tuple[MeshConfig, str]] = {
  "fsdp_tp": (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp"),
  "data_fsdp_tp": (MeshConfig(data=2, fsdp=2, tensor=2), "fsdp_tp"),
  "fsdp": (MeshConfig(data=1, fsdp=-1, tensor=1), "fsdp"),
}


def global_batch(step: int) -> dict[str, np.ndarray]:
  """The full batch of step `step` (same on every process): right-padded token rows."""
  rng = np.random.default_rng(1000 + step)
  tokens = rng.integers(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), dtype=np.int32)
  lengths = rng.integers(4, SEQ_LEN + 2, GLOBAL_BATCH)
  valid = (np.arange(SEQ_LEN + 1)[None, :] < lengths[:, None]).astype(np.int32)
  return {
    "inputs": tokens[:, :-1] * valid[:, :-1],
    "attention_mask": valid[:, :-1],
    "targets": tokens[:, 1:],
    "loss_mask": valid[:, 1:],
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


def sft_loss(params: Any, graphdef: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Token-mean NLL of the targets under the model (fused log-probs, no [B, T, V] logits)."""
  model = nnx.merge(graphdef, params)
  hidden = model.hidden_states(batch["inputs"], batch["attention_mask"])
  hidden = constrain(hidden, ("batch", "length", "act_embed"))
  logp = logprobs_from_hidden(hidden, model.unembedding, batch["targets"], chunk_size=8)
  return aggregate(-logp, batch["loss_mask"], "token-mean")


def build(layout: str) -> dict[str, Any]:
  """Mesh, sharded initial parameters and optimizer state, and the jitted step for `layout`."""
  mesh_config, rules = LAYOUTS[layout]
  mesh = make_mesh(mesh_config)
  tx = optax.adamw(LEARNING_RATE, weight_decay=0.01)
  with use_mesh(mesh, rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))))
    param_sh = named_shardings(abstract, mesh, rules)
    params = jax.jit(
      lambda: nnx.state(Transformer(CONFIG, rngs=nnx.Rngs(0))), out_shardings=param_sh
    )()
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract), param_sh,
      transform_non_params=lambda _: replicated,
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    batch_sh = NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), rules, mesh))

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(sft_loss)(params, graphdef, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(
      step,
      in_shardings=(param_sh, opt_sh, batch_sh),
      out_shardings=(param_sh, opt_sh, replicated),
      donate_argnums=(0, 1),
    )
  return dict(mesh=mesh, rules=rules, graphdef=graphdef, params=params, opt_state=opt_state,
              batch_sharding=batch_sh, step=step)


def train(layout: str, num_steps: int = NUM_STEPS) -> tuple[list[float], Any]:
  """Trains `num_steps` steps; returns (losses, final model) — the shared computation."""
  run = build(layout)
  params, opt_state, losses = run["params"], run["opt_state"], []
  with use_mesh(run["mesh"], run["rules"]):
    for i in range(num_steps):
      batch = to_global(global_batch(i), run["batch_sharding"])
      params, opt_state, loss = run["step"](params, opt_state, batch)
      losses.append(float(loss))
  return losses, nnx.merge(run["graphdef"], params)


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
  losses = {}
  for i, layout in enumerate(args.layouts.split(",")):
    losses[layout], model = train(layout)
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
  }
  print(json.dumps(result), flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
