"""Benchmark: sampling in the training (FSDP) layout vs. the inference layout the trainers use.

The on-policy trainers hand their parameters to the sampler once per rollout
(`OnPolicyTrainer.sampler_params`), re-sharded by `rljax.parallel.inference_rules` (the fsdp axis
gathered once, tensor parallelism kept). This script compiles and runs the same `generate` on a
mesh of emulated CPU devices with the parameters

  1. as trained: FSDP-sharded (each weight matrix split over `fsdp`);
  2. re-sharded to the inference layout (one `device_put` per rollout, timed separately);

and prints the collectives inside the compiled program's while loops (the decode loop and the
scanned layers: executed every decode step) and anywhere, and the median wall time. With
`--dtype bfloat16` the inference copy is also cast (the `rollout_dtype` option).

  python benchmarks/rollout_layout.py                 # mesh 2 x 4 (data x fsdp), D=256, 4 layers
  python benchmarks/rollout_layout.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from rljax.models.config import ModelConfig  # noqa: E402
from rljax.models.transformer import Transformer  # noqa: E402
from rljax.parallel.rules import MESH_AXES, inference_rules, mesh_and_rules  # noqa: E402
from rljax.rollout.generate import _generate_jit, _Options  # noqa: E402
from rljax.train.state import cast_floating, variable_shardings  # noqa: E402

from bench_utils import loop_collectives, median_seconds  # noqa: E402

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mesh", default="2,4,1", help="data,fsdp,tensor")
  parser.add_argument("--rules", default="fsdp")
  parser.add_argument("--dtype", default=None, help="cast the inference copy, e.g. bfloat16")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  shape = tuple(int(x) for x in args.mesh.split(","))
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  config = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
                       num_heads=8, num_kv_heads=4)
  with mesh_and_rules(mesh, args.rules):
    graphdef, trained = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  shardings = variable_shardings(trained, mesh, inference_rules(args.rules))
  dtype = None if args.dtype is None else jnp.dtype(args.dtype)
  to_inference = jax.jit(lambda s: cast_floating(s, dtype), out_shardings=shardings)

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.prompt)), jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  options = _Options(max_new_tokens=args.new_tokens, temperature=1.0, top_k=None, top_p=None,
                     stop_tokens=(-1,), pad_id=0, num_samples=1)
  key = jax.random.key(0)

  print(f"mesh {shape} (data, fsdp, tensor), rules {args.rules!r}, D={config.hidden_size}, "
        f"{config.num_layers} layers, V={config.vocab_size}, B={args.batch}, "
        f"P={args.prompt}, N={args.new_tokens}, {jax.device_count()} {jax.devices()[0].platform} "
        "devices")
  rows = []
  with mesh_and_rules(mesh, args.rules):
    inference = to_inference(trained)
    reshard = median_seconds(lambda: to_inference(trained), args.repeats)
    for name, state in (("training layout (fsdp)", trained),
                        (f"inference layout{'' if dtype is None else ', ' + args.dtype}",
                         inference)):
      hlo = _generate_jit.lower(graphdef, state, tokens, mask, key, options).compile().as_text()
      inside, total = loop_collectives(hlo)
      seconds = median_seconds(
        lambda s=state: _generate_jit(graphdef, s, tokens, mask, key, options), args.repeats)
      rows.append((name, inside, total, seconds))
  print(f"{'parameters':32s} {'loop collectives':>17s} {'all':>5s} {'generate':>10s}")
  for name, inside, total, seconds in rows:
    print(f"{name:32s} {inside:17d} {total:5d} {1e3 * seconds:8.1f} ms")
  print(f"re-sharding (+ cast) once per rollout: {1e3 * reshard:.1f} ms; "
        f"generate speed-up {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
  main()
