"""Context parallelism: per-device memory of a training step against the context-axis size.

Compile-only (`memory_analysis()`, nothing allocated): one training forward + backward of the
issue-11 model (4 layers, d=512, V=32000, MLP 1536, 8 query / 4 KV heads, tied embeddings,
float32; loss = mean of `logprobs_from_hidden`) at B=1 and T = 8k, 16k tokens, on
`MeshConfig(data=1, context=n)` for n = 1, 2, 4, 8 emulated CPU devices (n = 1: no context
axis, one device's program). Temp and argument bytes are per device; the ratios are to n = 1.

Run:  .venv/bin/python benchmarks/context_parallel.py        (about 5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_utils import LONG_CONTEXT_MODEL, lm_training_step  # noqa: E402

from rljax.models.config import ModelConfig  # noqa: E402
from rljax.parallel.mesh import MeshConfig, make_mesh, use_mesh  # noqa: E402

MIB = 2**20


def step_memory(t: int, n: int, remat: bool) -> tuple[float, float, float]:
  """(temp MiB, argument MiB, compile seconds) per device of value_and_grad of the loss at B=1,
  T=t on a mesh with a context axis of n devices."""
  step, state = lm_training_step(ModelConfig(**LONG_CONTEXT_MODEL, remat=remat))
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  mesh = make_mesh(MeshConfig(data=1, context=n), devices=jax.devices()[:n])
  start = time.perf_counter()
  with use_mesh(mesh, "data"):
    compiled = step.lower(state, tokens).compile()
  memory = compiled.memory_analysis()
  return (memory.temp_size_in_bytes / MIB, memory.argument_size_in_bytes / MIB,
          time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--remat", action="store_true", help="ModelConfig(remat=True)")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, {jax.device_count()} devices, "
        f"remat {args.remat}")
  print("\nPer-device memory of one training forward + backward (MiB), B=1, compile-only\n")
  print("| T | context | temp | temp / context 1 | arguments | compile s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for t in args.lengths:
    base = None
    for n in args.sizes:
      temp, arguments, seconds = step_memory(t, n, args.remat)
      base = temp if base is None else base
      print(f"| {t} | {n} | {temp:.0f} | {temp / base:.3f} | {arguments:.0f} | {seconds:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
