"""Trains a tiny deterministic MLP with checkpoints; used by the SIGKILL fault tests.

  python checkpoint_worker.py --dir D --steps N --every K [--sync] [--resume]
      [--kill-at S | --kill-mid-save S] [--out final.npz]

The batch of step s (1-based) is a pure function of the data position s - 1, and the state
carries the RNG key (split every step for a dropout mask), so a resumed run repeats exactly the
computation of an uninterrupted one. `--kill-at S` SIGKILLs the process after step S is computed,
before it could be saved; `--kill-mid-save S` SIGKILLs it right after the (asynchronous) save of
step S has been started, printing MIDSAVE when orbax still had the write in flight.
"""

from __future__ import annotations

import argparse
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax.train.checkpoint import Checkpointer

IN, HIDDEN, OUT, BATCH = 8, 16, 4, 8
OPTIMIZER = optax.adamw(1e-2, weight_decay=0.01)


def batch_at(position: int) -> tuple[jax.Array, jax.Array]:
  key = jax.random.fold_in(jax.random.key(1234), position)
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (BATCH, IN)), jax.random.normal(ky, (BATCH, OUT))


def init_state() -> dict:
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "w1": jax.random.normal(k1, (IN, HIDDEN)) * 0.3,
    "b1": jnp.zeros((HIDDEN,)),
    "w2": jax.random.normal(k2, (HIDDEN, OUT)) * 0.3,
  }
  return {"params": params, "opt_state": OPTIMIZER.init(params), "rng": k3,
          "step": jnp.zeros((), jnp.int32)}


def loss_fn(params: dict, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
  h = jax.nn.gelu(x @ params["w1"] + params["b1"])
  keep = jax.random.bernoulli(key, 0.9, h.shape)
  h = jnp.where(keep, h / 0.9, 0.0)
  return jnp.mean((h @ params["w2"] - y) ** 2)


@jax.jit
def train_step(state: dict, x: jax.Array, y: jax.Array) -> dict:
  rng, dropout_key = jax.random.split(state["rng"])
  grads = jax.grad(loss_fn)(state["params"], x, y, dropout_key)
  updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state, "rng": rng, "step": state["step"] + 1}


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

  state = init_state()
  position = 0
  with Checkpointer(args.dir, save_every=args.every, keep=2, async_save=not args.sync,
                    metadata={"worker": "mlp"}) as ckpt:
    if args.resume and ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(state)
      position = data_state["position"]
      assert int(state["step"]) == position == meta["step"], (state["step"], position, meta)
      print(f"RESUMED {position}", flush=True)
    for step in range(position + 1, args.steps + 1):
      x, y = batch_at(step - 1)
      state = train_step(state, x, y)
      if step == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      ckpt.save(step, state, data_state={"position": step}, force=step == args.steps)
      if step == args.kill_mid_save:
        if ckpt._manager.is_saving_in_progress():  # noqa: SLF001 -- test instrumentation
          print("MIDSAVE", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
  if args.out:
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    np.savez(args.out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
  print("DONE", flush=True)


if __name__ == "__main__":
  main()
