"""LoRA (`rljax.models.lora`): trainable state and training-step memory against full fine-tuning,
and sampling with the adapters merged into the sampler's copy against applying them unmerged.

1. Counts (exact, from the shapes): trainable parameters of LoRA r=16 on all seven projections
   = Σ r·(in + out), and trainable + gradient + Adam-moment bytes (fp32: 4 · 4 bytes per
   trainable parameter) as a fraction of full fine-tuning's, for a SmolLM2-135M-shaped and a
   1B-shaped (Llama-3.2-1B) config.
2. Memory (compile-only `memory_analysis`, nothing allocated): one training step (value_and_grad
   of the mean log-prob + AdamW) of the SmolLM2-135M shape at B=8, T=512, remat on: arguments
   (parameters + optimizer state + batch) and temporaries, full vs LoRA vs QLoRA (NF4 base);
   the 1B shape at B=1, T=512.
3. GRPO update memory (compile-only `memory_analysis` of `GRPOTrainer.update`, the compiled update
   `rljax.train` runs, on the abstract `TrainState` of `init_state`: policy parameters, frozen
   base, AdamW state and the reference policy; kl_coef 0.04, one update per batch): the same
   shapes, rows of P = 128 prompt + N = 384 completion tokens, the 135M batch also accumulated
   over 2 and 4 microbatches; arguments (the state, split into its parts, and the batch) and
   temporaries per device, and the ratios against full fine-tuning's total (at the same
   microbatch count, and at full fine-tuning's least-memory one: its gradient accumulator
   costs more than microbatching saves), and at one microbatch with the layers checkpointed in
   groups of 2 and 3 (`ModelConfig.remat_group`). Full fine-tuning's reference is a second copy
   of the parameters; LoRA's is the initial adapters on the same frozen base (no second base).
4. Decode (CPU wall time, median of `--repeats`): `generate` of B=8 prompts × 32 new tokens on a
   4-layer d=256 model with r=16 adapters on all projections: merged (W + s·A B, adapters off;
   what `OnPolicyTrainer.sampler_params` hands the sampler) vs unmerged (the adapters applied at
   every step), plus the one-off cost of merging.

5. With `--time-steps`, the wall time of that training step on CPU (the SmolLM2-135M shape at
   `--step-shape` B,T: 2,128 by default, 8,512 the issue's size), full vs LoRA vs QLoRA, timed
   round-robin (medians of `--repeats` rounds of one step each, after a warm-up step each).

Run:  .venv/bin/python benchmarks/lora.py [--repeats 3] [--skip-memory] [--time-steps]
(--skip-memory skips 2 and 3, about two minutes of compiles on two cores)
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import optax
from bench_utils import median_seconds, round_robin_seconds
from flax import nnx

from rljax.models.config import REMAT_POLICIES, ModelConfig
from rljax.models.lora import LoRAConfig, add_lora, lora_param_count, lora_trainable, merged
from rljax.models.quant import quantize_base
from rljax.models.transformer import Transformer
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.rollout.generate import generate
from rljax.rollout.sampling import SamplingConfig
from rljax.train.experience import Experience
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.onpolicy import REFERENCE, UpdateConfig
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import abstract_train_state

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, tie_word_embeddings=True)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True)
LORA = LoRAConfig(rank=16, alpha=32)
MIB = 2**20


def counts(name: str, shape: dict) -> None:
  config = ModelConfig(**shape)
  full = sum(x.size for x in jax.tree.leaves(nnx.state(
    nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))))
  lora = lora_param_count(config, LORA)
  print(f"{name}: full {full / 1e6:.1f}M trainable, LoRA r=16 all-linear {lora / 1e6:.2f}M "
        f"(= Σ r·(in+out)); trainable + grads + Adam: {100 * lora / full:.2f} % of full")


def make_model(config: ModelConfig, mode: str) -> nnx.Module:
  """A `Transformer` of `config`: "full", "lora" (r=16 on all seven projections) or "qlora" (the
  same on an NF4 base)."""
  model = Transformer(config, rngs=nnx.Rngs(0))
  if mode == "qlora":
    quantize_base(model, "nf4")
  return model if mode == "full" else add_lora(model, LORA, rngs=nnx.Rngs(1))


def _mib(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / MIB


def grpo_update_memory(shape: dict, batch: int, prompt: int, completion: int, mode: str,
                       microbatches: int = 1, remat_group: int = 1) -> dict[str, float]:
  """MiB of `GRPOTrainer.update` compiled for an abstract state (nothing allocated): "args",
  "temp", and the arguments' parts "params" (trained), "frozen", "opt_state", "reference",
  "batch"; the update accumulates over `microbatches`, the layers checkpointed in groups of
  `remat_group` (`ModelConfig.remat_group`)."""
  config = ModelConfig(**shape, remat=True, remat_group=remat_group, scan_unroll=1)
  optimizer = make_optimizer(OptimizerConfig(1e-5))
  graphdef, state = abstract_train_state(lambda: make_model(config, mode), optimizer,
                                         trainable=nnx.Param if mode == "full" else lora_trainable)
  grpo = GRPOConfig(sampling=SamplingConfig(num_samples=4, max_new_tokens=completion),
                    kl_coef=0.04, update=UpdateConfig(num_microbatches=microbatches))
  trainer = GRPOTrainer(graphdef, optimizer, grpo, lambda *a, **k: None, stop_tokens=[0],
                        pad_id=0)
  state = jax.eval_shape(trainer.init_state, state)
  rows, n = (batch, prompt + completion), (batch, completion)
  sds = jax.ShapeDtypeStruct
  experience = Experience(tokens=sds(rows, jnp.int32), attention_mask=sds(rows, jnp.bool_),
                          loss_mask=sds(n, jnp.bool_), advantages=sds(n, jnp.float32),
                          ref_logp=sds(n, jnp.float32))
  m = trainer.update.lower(state, experience).compile().memory_analysis()
  return {"args": m.argument_size_in_bytes / MIB, "temp": m.temp_size_in_bytes / MIB,
          "params": _mib(state.params), "frozen": _mib(state.frozen),
          "opt_state": _mib(state.opt_state), "reference": _mib(state.extras[REFERENCE]),
          "batch": _mib(experience)}


def grpo_memory_report(name: str, shape: dict, batch: int, microbatches=(1,),
                       remat_groups=(1,)) -> None:
  """Prints the GRPO update memory of full / LoRA / QLoRA for each microbatch count (remat
  group 1) and each remat group (one microbatch), and each total against full fine-tuning's at
  the same setting and at its least-memory one."""
  settings = [(k, 1) for k in microbatches] + [(1, g) for g in remat_groups if g != 1]
  results = {(k, g, mode): grpo_update_memory(shape, batch, 128, 384, mode, k, g)
             for k, g in settings for mode in ("full", "lora", "qlora")}
  total = {key: r["args"] + r["temp"] for key, r in results.items()}
  best_full = min(total[k, g, "full"] for k, g in settings)
  print(f"{name} GRPO update B={batch} T=128+384 remat (MiB per device; arguments = params + "
        "frozen + opt_state + reference + batch):")
  for (k, g, mode), r in results.items():
    print(f"  {mode:5s} microbatches {k} remat_group {g}: args {r['args']:7.0f} (params "
          f"{r['params']:.0f}, frozen {r['frozen']:.0f}, opt {r['opt_state']:.0f}, reference "
          f"{r['reference']:.0f}, batch {r['batch']:.2f}) + temp {r['temp']:6.0f} = "
          f"{total[k, g, mode]:7.0f}  ({total[k, g, mode] / total[k, g, 'full']:.3f}x full at "
          f"the same, {total[k, g, mode] / best_full:.3f}x full's least)")


def training_step(shape: dict, mode: str, *, abstract: bool, remat_policy: str = "nothing",
                  scan_unroll: int | None = 1, remat_group: int = 1):
  """(jitted step(params, frozen, opt_state, tokens), params, frozen, opt_state): value_and_grad
  of the mean log-prob + AdamW; `mode` "full", "lora" or "qlora" (NF4 base)."""
  config = ModelConfig(**shape, remat=True, remat_policy=remat_policy, remat_group=remat_group,
                       scan_unroll=scan_unroll)

  make = functools.partial(make_model, config, mode)
  graphdef, params, frozen = nnx.split(nnx.eval_shape(make) if abstract else make(),
                                       nnx.Param if mode == "full" else lora_trainable, ...)
  optimizer = optax.adamw(1e-4)
  opt_state = (jax.eval_shape(optimizer.init, params) if abstract
               else jax.jit(optimizer.init)(params))

  def step(params, frozen, opt_state, tokens):
    def loss(params):
      model = nnx.merge(graphdef, params, frozen)
      hidden = model.hidden_states(tokens)
      return -jnp.mean(logprobs_from_hidden(hidden[:, :-1], model.unembedding, tokens[:, 1:]))

    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 2)), params, frozen, opt_state


def step_memory(shape: dict, batch: int, length: int, mode: str) -> tuple[float, float]:
  """(argument MiB, temp MiB) of one compiled training step (abstract: nothing allocated)."""
  step, params, frozen, opt_state = training_step(shape, mode, abstract=True)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  m = step.lower(params, frozen, opt_state, tokens).compile().memory_analysis()
  return m.argument_size_in_bytes / MIB, m.temp_size_in_bytes / MIB


def step_seconds(shape: dict, batch: int, length: int, modes: tuple[str, ...], repeats: int,
                 remat_policy: str = "nothing", scan_unroll: int | None = 1,
                 remat_group: int = 1) -> dict[str, float]:
  """{mode: median wall time of one training step} (CPU), the modes timed round-robin
  (`round_robin_seconds`)."""
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, shape["vocab_size"])
  runs = {}
  for mode in modes:
    step, params, frozen, opt_state = training_step(shape, mode, abstract=False,
                                                    remat_policy=remat_policy,
                                                    scan_unroll=scan_unroll,
                                                    remat_group=remat_group)
    state = [params, opt_state]

    def one(step=step, frozen=frozen, state=state):
      state[0], state[1] = step(state[0], frozen, state[1], tokens)
      return state[0]

    runs[mode] = one
  return round_robin_seconds(runs, repeats)


def decode(repeats: int) -> None:
  config = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                       num_heads=8, num_kv_heads=4, tie_word_embeddings=True)
  model = add_lora(Transformer(config, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1))
  for name in LORA.target_modules:  # trained-looking adapters (B = 0 would be skipped by nothing)
    b = getattr(model.layers, f"{name}_lora_b")
    b[...] = 0.01 * jax.random.normal(jax.random.key(2), b.shape)
  prompts = jax.random.randint(jax.random.key(3), (8, 16), 1, config.vocab_size)
  mask = jnp.ones(prompts.shape, bool)
  sampling = SamplingConfig(max_new_tokens=32, temperature=1.0, num_samples=1)
  run = functools.partial(generate, prompt_tokens=prompts, prompt_mask=mask,
                          key=jax.random.key(4), sampling=sampling, stop_tokens=[-1 % 4096],
                          pad_id=0)
  unmerged_pair = nnx.split(model)
  merge_s = median_seconds(lambda: nnx.state(merged(model)), repeats)
  merged_pair = nnx.split(merged(model))
  unmerged = median_seconds(lambda: run(unmerged_pair).tokens, repeats)
  merged_time = median_seconds(lambda: run(merged_pair).tokens, repeats)
  print(f"decode B=8 x 32 tokens, 4 layers d=256, r=16 all-linear (CPU): unmerged "
        f"{unmerged * 1e3:.0f} ms, merged {merged_time * 1e3:.0f} ms "
        f"({unmerged / merged_time:.2f}x), merging once {merge_s * 1e3:.1f} ms")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--time-steps", action="store_true",
                      help="also time the SmolLM2-135M-shaped step (CPU: minutes)")
  parser.add_argument("--step-shape", default="2,128", metavar="B,T",
                      help="rows and tokens of the timed step (2,128; the goal's 8,512 takes "
                           "~10 min on 2 cores)")
  parser.add_argument("--remat-policy", default="nothing", choices=REMAT_POLICIES,
                      help="ModelConfig.remat_policy of the timed step (nothing)")
  parser.add_argument("--scan-unroll", default="1", metavar="N|auto",
                      help="ModelConfig.scan_unroll of the timed step: N layers per iteration "
                           "(1, the default; 30 unrolls them all) or auto (None: 1 with remat)")
  parser.add_argument("--remat-group", type=int, default=1,
                      help="ModelConfig.remat_group of the timed step (1: every layer's input "
                           "checkpointed)")
  parser.add_argument("--skip-decode", action="store_true")
  args = parser.parse_args()
  counts("SmolLM2-135M shape", SMOLLM2_135M)
  counts("1B shape", LLAMA_1B)
  if not args.skip_memory:
    for name, shape, batch in (("SmolLM2-135M shape", SMOLLM2_135M, 8), ("1B shape", LLAMA_1B, 1)):
      full = step_memory(shape, batch, 512, "full")
      line = f"{name} step B={batch} T=512 remat: full {full[0]:.0f} + {full[1]:.0f} MiB"
      for mode in ("lora", "qlora"):
        arg_mib, temp = step_memory(shape, batch, 512, mode)
        line += (f"; {mode} {arg_mib:.0f} + {temp:.0f} MiB "
                 f"({(arg_mib + temp) / (full[0] + full[1]):.2f}x)")
      print(line + "  (arguments + temporaries)")
    grpo_memory_report("SmolLM2-135M shape", SMOLLM2_135M, 8, microbatches=(1, 2, 4),
                       remat_groups=(1, 2, 3))
    grpo_memory_report("1B shape", LLAMA_1B, 1)
  if args.time_steps:
    b, t = (int(x) for x in args.step_shape.split(","))
    times = step_seconds(SMOLLM2_135M, b, t, ("full", "lora", "qlora"), args.repeats,
                         args.remat_policy, None if args.scan_unroll == "auto"
                         else int(args.scan_unroll), args.remat_group)
    print(f"SmolLM2-135M shape step B={b} T={t} remat ({args.remat_policy}, group "
          f"{args.remat_group}, scan_unroll {args.scan_unroll}; CPU): " + ", ".join(
      f"{mode} {s:.2f} s ({s / times['full']:.2f}x)" for mode, s in times.items()))
  if not args.skip_decode:
    decode(args.repeats)


if __name__ == "__main__":
  main()
