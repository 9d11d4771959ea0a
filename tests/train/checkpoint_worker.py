"""Trains a tiny rljax Transformer with the library's step and checkpoints; the SIGKILL fault tests.

  python checkpoint_worker.py --dir D --steps N --every K [--sync] [--resume]
      [--kill-at S | --kill-mid-save S] [--out final.npz]

The training is the library's own: `create_train_state` (on a one-device mesh, so every leaf has
a `NamedSharding`), `make_optimizer`, `make_train_step(sft_loss, ..., count_fn=sft_token_count)`
and a `Checkpointer(save_every=K, keep=2)` (asynchronous unless --sync) saving the whole
`TrainState` (parameters, Adam moments, step, RNG key, skipped-step counter) with the data
position in `data_state`.

The batch of step s (1-based) is a pure function of the data position s - 1 (the tokens) and of
the state's RNG key and step (a per-step `fold_in(rng, step)` key drops loss tokens), so a resumed
run repeats exactly the computation of an uninterrupted one only if the checkpoint restored the
position, the step and the key. `--resume` restores onto an *abstract* target (`jax.eval_shape`
of the state with the state's shardings): no initial state is built. `--kill-at S` SIGKILLs the
process after step S is computed, before it could be saved; `--kill-mid-save S` SIGKILLs it right
after the (asynchronous) save of step S has been started, printing MIDSAVE when orbax still had
the write in flight. `--out` writes the final parameters as .npz (one array per leaf path).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.parallel.mesh import MeshConfig, make_mesh
from rljax.train.checkpoint import Checkpointer
from rljax.train.objectives import sft_loss, sft_token_count
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import abstract_train_state, create_train_state
from rljax.train.step import make_train_step

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=2, num_kv_heads=1)
BATCH, SEQ_LEN, PROMPT_LEN = 4, 8, 3
RULES = "data"
# Optimisation level 0 halves the CPU compile time; every run (reference or resumed) uses it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
OPTIMIZER = make_optimizer(OptimizerConfig(1e-2, warmup_steps=2, schedule="cosine",
                                           total_steps=40, weight_decay=0.01))


def new_model() -> Transformer:
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def batch_at(position: jax.Array, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
  """The SFT batch at data position `position`; `fold_in(rng, step)` drops ~20% of loss tokens."""
  data_key = jax.random.fold_in(jax.random.key(1234), position)
  ids = jax.random.randint(data_key, (BATCH, SEQ_LEN), 0, CONFIG.vocab_size, jnp.int32)
  keep = jax.random.bernoulli(jax.random.fold_in(rng, step), 0.8, (BATCH, SEQ_LEN))
  response = jnp.arange(SEQ_LEN)[None, :] >= PROMPT_LEN
  return {
    "input_ids": ids,
    "attention_mask": jnp.ones((BATCH, SEQ_LEN), jnp.int32),
    "loss_mask": (response & keep).astype(jnp.int32),
  }


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--dir", required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--every", type=int, required=True)
  parser.add_argument("--sync", action="store_true")
  parser.add_argument("--resume", action="store_true")
  parser.add_argument("--kill-at", type=int, default=None)
  parser.add_argument("--kill-mid-save", type=int, default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  mesh = make_mesh(MeshConfig())  # every device (one, in the fault tests) on `data`

  def create():
    return create_train_state(new_model, OPTIMIZER, rng=7, mesh=mesh, rules=RULES)

  # The state's structure, shapes, dtypes and target shardings, without computing it.
  graphdef, target = abstract_train_state(new_model, OPTIMIZER, rng=7, mesh=mesh, rules=RULES)
  shardings = jax.tree.map(lambda x: x.sharding, target)
  train_step = make_train_step(functools.partial(sft_loss, chunk_size=8), graphdef, OPTIMIZER,
                               count_fn=sft_token_count, shardings=shardings,
                               compiler_options=FAST_COMPILE)
  with Checkpointer(args.dir, save_every=args.every, keep=2, async_save=not args.sync,
                    metadata={"worker": "tiny-transformer"}) as ckpt:
    if args.resume and ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(target)
      position = data_state["position"]
      assert int(state.step) == position == meta["step"], (state.step, position, meta)
      print(f"RESUMED {position}", flush=True)
    else:
      state, position = create()[1], 0
    for step in range(position + 1, args.steps + 1):
      batch = batch_at(step - 1, state.rng, state.step)
      state, _ = train_step(state, batch)
      if step == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      ckpt.save(step, state, data_state={"position": step}, force=step == args.steps)
      if step == args.kill_mid_save:
        if ckpt._manager.is_saving_in_progress():  # noqa: SLF001 -- test instrumentation
          print("MIDSAVE", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    assert int(state.step) == args.steps and int(state.skipped_steps) == 0
  if args.out:
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    np.savez(args.out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
  print("DONE", flush=True)


if __name__ == "__main__":
  main()
