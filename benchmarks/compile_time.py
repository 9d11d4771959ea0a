"""Benchmark: XLA compile time of the GRPO update, rljax vs. Google Tunix 0.1.7, each compile in
a fresh process, alternating (rljax, Tunix, Tunix, rljax, ...) for --rounds rounds.

The update and its inputs are `benchmarks/grpo_step.py`'s (same model, weights, batch and
trainers; Tunix in its own venv, see there). One compile per process, after the reference
log-prob pass has compiled (as in grpo_step.py), so nothing is cached from an earlier compile
of the same program and no persistent compilation cache is used. Per compile it records the
wall time of lower + compile (the goal's figure), the process CPU time over the same span (XLA
compiles fusions on several threads; on a shared machine the CPU time moves less with the load
than the wall time), the lowering alone, and the distinct fusion kernels XLA generated code for
(`hlo_stats.distinct_kernels`, deterministic). The table gives medians and minima, with the
load average at each compile.

  .venv/bin/python benchmarks/compile_time.py --tunix-python /work/tunix-venv/bin/python
  .venv/bin/python benchmarks/compile_time.py --rounds 3          # rljax only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rljax_child(workdir: str, seed: int) -> dict:
  """One compile of rljax's update in this (fresh) process; writes the weights and batch for
  the Tunix worker to `workdir` when they are not there yet."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import grpo_step as gs
  from hlo_stats import distinct_kernels
  from rljax.models.transformer import Transformer
  from rljax.train.experience import Experience
  from rljax.train.state import create_train_state

  c = dict(gs.CONFIG, attention="auto")
  optimizer = optax.adamw(c["lr"])
  graphdef, state = create_train_state(
    lambda: Transformer(gs.model_config(c), rngs=nnx.Rngs(0)), optimizer, rng=0)
  trainer = gs.rljax_trainer(graphdef, optimizer, c)
  state = trainer.init_state(state)
  data = gs.make_grpo_batch(c, seed=seed)
  if not os.path.exists(os.path.join(workdir, "batch.npz")):
    rewards, values, mask = gs.make_gae_inputs(c["gae_batch"], c["gae_length"], seed=seed)
    np.savez(os.path.join(workdir, "weights.npz"), **gs.flatten_params(state.params))
    np.savez(os.path.join(workdir, "batch.npz"), **data, gae_rewards=rewards,
             gae_values=values, gae_mask=mask)
  tokens = jnp.asarray(np.concatenate([data["prompt_ids"], data["completion_ids"]], axis=1))
  completion_mask = jnp.asarray(data["completion_ids"] != c["pad_id"])
  batch = Experience(tokens=tokens, attention_mask=tokens != c["pad_id"],
                     loss_mask=completion_mask,
                     advantages=jnp.asarray(data["advantages"])[:, None] * completion_mask)
  ref_logp = jax.block_until_ready(gs.rljax_reference(trainer, state, batch))
  batch = batch.replace(ref_logp=ref_logp, old_logp=None)
  cpu_start, start = time.process_time(), time.perf_counter()
  lowered = gs.rljax_lower_update(trainer, state, batch)
  lowered_s = time.perf_counter() - start
  compiled = lowered.compile()
  total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  kernels, instructions = distinct_kernels(compiled.as_text())
  return {"seconds": total, "lower_seconds": lowered_s, "cpu_seconds": cpu, "kernels": kernels,
          "kernel_instructions": instructions,
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes), "config": c}


def run_rljax(workdir: str, seed: int) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", workdir,
                        "--seed", str(seed)], capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"rljax child failed (rc={out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def run_tunix(python: str, workdir: str, config: dict) -> dict:
  from grpo_step import TunixWorker

  worker = TunixWorker(python, workdir)
  try:
    worker.call("setup", workdir=workdir, config=config)
    worker.call("reference")
    return worker.call("lower_update")
  finally:
    worker.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON"))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one rljax compile
  args = parser.parse_args()
  sys.path.insert(0, HERE)
  if args.child:
    print(json.dumps(rljax_child(args.child, args.seed)))
    return

  workdir = tempfile.mkdtemp(prefix="compile_time_")
  samples: dict[str, list[dict]] = {"rljax": [], "tunix": []}
  print(f"load average at the start: {os.getloadavg()[0]:.2f}; nproc {os.cpu_count()}")
  config = None
  for i in range(args.rounds):
    order = ["rljax", "tunix"] if i % 2 == 0 else ["tunix", "rljax"]
    if config is None:
      order = ["rljax", "tunix"]  # the first rljax child writes the weights for the worker
    for lib in order:
      if lib == "tunix" and not args.tunix_python:
        continue
      load = os.getloadavg()[0]
      r = (run_rljax(workdir, args.seed) if lib == "rljax"
           else run_tunix(args.tunix_python, workdir, config))
      config = config or r.get("config")
      r["load"] = load
      samples[lib].append(r)
      print(f"round {i} {lib:6s} lower + compile {r['seconds']:6.2f} s (lower "
            f"{r['lower_seconds']:.2f}), CPU {r['cpu_seconds']:6.2f} s, {r['kernels']} kernels "
            f"({r['kernel_instructions']} instructions), temp "
            f"{r['temp_bytes'] / 2**20:.0f} MiB, load {load:.2f}", flush=True)

  def med(lib, key):
    return statistics.median(r[key] for r in samples[lib])

  print(f"\nmedian (min) of {args.rounds} fresh-process compiles each; load average at the end "
        f"{os.getloadavg()[0]:.2f}")
  for lib in ("tunix", "rljax"):
    if samples[lib]:
      print(f"  {lib:6s} wall {med(lib, 'seconds'):.2f} s "
            f"({min(r['seconds'] for r in samples[lib]):.2f}), CPU {med(lib, 'cpu_seconds'):.2f}"
            f" s ({min(r['cpu_seconds'] for r in samples[lib]):.2f}), lower "
            f"{med(lib, 'lower_seconds'):.2f} s, {samples[lib][0]['kernels']} kernels")
  if samples["tunix"]:
    pairs = list(zip(samples["rljax"], samples["tunix"]))
    paired = statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)
    print(f"  rljax / Tunix: wall {med('rljax', 'seconds') / med('tunix', 'seconds'):.2f}x "
          f"(paired by round {paired:.2f}x), CPU "
          f"{med('rljax', 'cpu_seconds') / med('tunix', 'cpu_seconds'):.2f}x, kernels "
          f"{samples['rljax'][0]['kernels'] / samples['tunix'][0]['kernels']:.2f}x")


if __name__ == "__main__":
  main()
