"""Per-device memory of one full SFT training step under three sharding layouts.

The step is forward + backward + AdamW update of an rljax `Transformer` (token-mean NLL through
the fused `logprobs_from_hidden`), compiled with `jax.jit(step, in_shardings, out_shardings,
donate_argnums)` over a mesh of 8 devices with the default rule sets of `rljax.parallel`:

  data      8×1×1  DATA_PARALLEL_RULES  parameters and optimizer state replicated
  fsdp      1×8×1  FSDP_RULES           every matrix split over `fsdp` along the model width
  fsdp_tp   1×4×2  FSDP_TP_RULES        … and heads / MLP width / vocabulary over `tensor`

Compile-only: the model is built abstractly (`nnx.eval_shape`) and the step is lowered on
`jax.ShapeDtypeStruct`s carrying the shardings, so nothing is allocated or run. Memory is XLA's
per-device `memory_analysis()` of the SPMD-partitioned program: arguments (parameters, optimizer
state, batch), outputs (aliased to the donated arguments) and temporaries (activations,
gradients, collectives' buffers). On the CPU backend (8 emulated devices sharing the host), the
numbers are what each device would hold; timings there mean nothing (8 devices share the cores).

Run:  python benchmarks/sharding.py   [--hidden 1024 --layers 8 --vocab 32000 --batch 8 --seq 512]
It sets the 8-device XLA flag itself (unless XLA_FLAGS already forces a device count).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from rljax.models.config import ModelConfig  # noqa: E402
from rljax.models.transformer import Transformer  # noqa: E402
from rljax.ops.fused_logprobs import logprobs_from_hidden  # noqa: E402
from rljax.ops.masking import aggregate  # noqa: E402
from rljax.parallel.mesh import MeshConfig, constrain, make_mesh, use_mesh  # noqa: E402
from rljax.parallel.rules import logical_to_mesh_spec, named_shardings  # noqa: E402

LAYOUTS = {
  "data": (MeshConfig(data=8, fsdp=1, tensor=1), "data"),
  "fsdp": (MeshConfig(data=1, fsdp=8, tensor=1), "fsdp"),
  "fsdp_tp": (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp"),
}


def model_config(args: argparse.Namespace) -> ModelConfig:
  return ModelConfig(
    vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
    num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 128,
    tie_word_embeddings=False, remat=args.remat,
  )


def sft_step(graphdef, tx):
  """(params, opt_state, batch) → (params, opt_state, loss): one AdamW step on token NLL."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], batch["attention_mask"])
    hidden = constrain(hidden, ("batch", "sequence", "act_embed"))
    logp = logprobs_from_hidden(hidden, model.unembedding, batch["targets"], chunk_size=128)
    return aggregate(-logp, batch["loss_mask"], "token-mean")

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def with_sharding(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def per_device_bytes(abstract_with_sharding) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_with_sharding):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def compile_layout(name: str, config: ModelConfig, batch: int, seq: int) -> dict[str, float]:
  mesh_config, rules = LAYOUTS[name]
  mesh = make_mesh(mesh_config)
  tx = optax.adamw(1e-4, weight_decay=0.1)
  with use_mesh(mesh, rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    param_sh = named_shardings(abstract, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: replicated
    )
    batch_sh = NamedSharding(mesh, logical_to_mesh_spec(("batch", "sequence"), rules, mesh))
    batch_abs = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sh)
                 for k in ("inputs", "attention_mask", "targets", "loss_mask")}
    params_abs = with_sharding(abstract, param_sh)
    opt_abs = with_sharding(abstract_opt, opt_sh)
    step = jax.jit(
      sft_step(graphdef, tx),
      in_shardings=(param_sh, opt_sh, batch_sh),
      out_shardings=(param_sh, opt_sh, replicated),
      donate_argnums=(0, 1),
    )
    start = time.perf_counter()
    compiled = step.lower(params_abs, opt_abs, batch_abs).compile()
    seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return {
    "params": per_device_bytes(params_abs),
    "opt": per_device_bytes(opt_abs),
    "args": mem.argument_size_in_bytes,
    "out": mem.output_size_in_bytes,
    "alias": mem.alias_size_in_bytes,
    "temp": mem.temp_size_in_bytes,
    "compile_s": seconds,
  }


def mib(n: float) -> str:
  return f"{n / 2**20:9.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--remat", action="store_true", help="rematerialise layers (jax.checkpoint)")
  args = parser.parse_args()
  config = model_config(args)
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  print(f"backend: {jax.default_backend()}  devices: {jax.device_count()}  jax {jax.__version__}")
  print(
    f"model: D={config.hidden_size} layers={config.num_layers} heads={config.num_heads}/"
    f"{config.num_kv_heads} F={config.intermediate_size} V={config.vocab_size} "
    f"({n_params / 1e6:.1f}M params, float32, untied, remat={config.remat}); "
    f"batch B={args.batch} T={args.seq}; AdamW"
  )
  results = {name: compile_layout(name, config, args.batch, args.seq) for name in LAYOUTS}
  print("per-device MiB   mesh     params  opt-state  arguments    outputs    aliased       temp"
        "   args+temp   compile")
  for name, r in results.items():
    shape = "×".join(str(s) for s in LAYOUTS[name][0].shape(jax.device_count()))
    print(f"{name:<15}  {shape:<6}{mib(r['params'])}  {mib(r['opt'])}  {mib(r['args'])}  "
          f"{mib(r['out'])}  {mib(r['alias'])}  {mib(r['temp'])}  {mib(r['args'] + r['temp'])}"
          f"  {r['compile_s']:6.1f} s")
  base = results["data"]
  print("ratio vs data   params  args  temp  args+temp")
  for name, r in results.items():
    print(f"{name:<15} {r['params'] / base['params']:6.3f} {r['args'] / base['args']:5.3f} "
          f"{r['temp'] / base['temp']:5.3f} "
          f"{(r['args'] + r['temp']) / (base['args'] + base['temp']):6.3f}")


if __name__ == "__main__":
  main()
