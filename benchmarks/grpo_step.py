"""Benchmark: one GRPO training step, rljax vs. Google Tunix 0.1.7, side by side in one run.

Install Tunix in a venv of its own, OUTSIDE the repo (it pins jax < 0.11.1, so it must never
become an rljax dependency). On this CPU machine these two commands are all it needs; the
default `jax` wheel it pulls in (0.10.2 here, the same as rljax's venv) already runs on CPU, no
`jax[cpu]` extra or other package is needed:

  python3 -m venv /work/tunix-venv
  /work/tunix-venv/bin/pip install google-tunix==0.1.7

Run (from the repo root, in rljax's venv):

  .venv/bin/python benchmarks/grpo_step.py --tunix-python /work/tunix-venv/bin/python
  .venv/bin/python benchmarks/grpo_step.py --repeats 9 --json grpo_step.json
  .venv/bin/python benchmarks/grpo_step.py          # no Tunix: rljax numbers only

Design. This script runs rljax in its own process and starts `benchmarks/tunix_worker.py` once
under the Tunix interpreter; they talk over stdin/stdout, one JSON line per command
({"op": "update"} -> {"seconds": ...}). Every figure is sampled ABAB: rljax, Tunix, rljax, Tunix,
... (>= 5 repetitions each after a warm-up call; compile excluded), and each process is blocked
on the pipe while the other one times, so the two never run at the same time. The worker gets
this process's environment (XLA_FLAGS, thread variables, JAX_PLATFORMS, ...; only PYTHONPATH /
VIRTUAL_ENV are dropped), so both run under the same XLA / thread settings. Both `pip freeze`s,
the load average before / during / after and nproc are recorded. Without a usable Tunix python
the rljax numbers are still printed and Tunix is reported as skipped.

The configuration (both libraries, identical). A Qwen3-style decoder with random weights:
V=8192, 4 layers, d_model=256, SwiGLU MLP 1024, 4 query / 2 KV heads, head_dim 64, q/k RMSNorm,
tied embeddings, RoPE theta 1e6 (Tunix's Qwen3 `apply_rope` hard-codes 1_000_000), RMSNorm eps
1e-6, float32 params and activations: 6,032,128 parameters (asserted for both). rljax draws the
weights; the worker copies them into Tunix's `Qwen3` (same layouts), so both compute the same
function, which the checks below verify. GRPO batch: 16 rows (4 prompts x G=4) of 64 prompt +
192 completion tokens: random ids in [1, V), prompts left-padded, completions with a padded
tail (pad id 0; Tunix derives its masks from `ids != pad_id`, rljax gets the same masks),
per-row group-normalised advantages of random rewards (Tunix's formula), beta=0.04, eps=0.2,
seq-mean-token-mean, AdamW(lr=1e-5) (`optax.adamw` in both), num_iterations=1.

KL estimator: Tunix 0.1.7's `GRPOConfig.kl_loss_mode` defaults to "kl", i.e. the k1 estimator
log pi - log pi_ref (no clamp: `kl_clamp_value=None`), added as beta * agg(kl) to the loss by
`algo_core.grpo_loss_fn` (`common.compute_kl_divergence`; "low_var_kl" = k3 is opt-in). rljax is
set to the same: `GRPOConfig(kl_kind="k1")` (rljax's default is k3).

What is timed (median, min-max over the repetitions; one call per sample, up to
`jax.block_until_ready`):
  1. GRPO update: Tunix: the actor trainer's jitted `PeftTrainer._train_step` with the loss
     `GRPOLearner` installs (`algo_core.grpo_loss_fn`: `common.compute_per_token_logps`, old
     log-probs = stop_gradient(logp) at num_iterations=1, the reference log-probs as input,
     `nnx.Optimizer.update`), called as `PeftTrainer.train` calls it
     (`jit_train_and_eval_step(cache_nnx_graph=True)`, under the actor mesh, on the
     `TrainExample` `GRPOLearner` builds). rljax: the public `GRPOTrainer.update(state, batch)`
     on the `Experience` `GRPOTrainer.prepare` builds (at one update per batch old_logp is None:
     stop_gradient(logp) inside the update; the state is donated and threaded through).
  2. Reference log-prob pass: Tunix: `RLCluster.get_ref_per_token_logps` (what the learner
     calls; it runs `common.compute_per_token_logps` on the reference model); rljax:
     `GRPOTrainer.reference_logprobs` (log-probs only, from `state.extras["reference"]`).
  3. Old-log-prob forward: timed for reference only; neither trainer runs it at
     num_iterations=1 (rljax runs it when `config.recompute_old_logp`).
  4. Trainer cost per batch = reference + old-log-prob (if any) + update, summed per repetition;
     tokens/s counts all B x (P + N) = 4096 positions of the batch (the number of completion
     tokens under the mask is printed too).
  5. GAE, B=256, T=2048, whitened: Tunix's "gae" advantage estimator
     (`algo_core.compute_gae_advantages`, already jitted, whitening included) vs.
     `rljax.ops.returns.gae(..., whiten=True)` (jitted inside the library); the same inputs.
     Each sample is the median of a burst of GAE_CALLS calls, and which library goes first
     alternates. Both in ONE process with many paired rounds: `benchmarks/gae.py --short`
     under Tunix's interpreter.
  6. XLA compile time of the update: lower + compile, once each, before any call (wall and
     process CPU time, and the distinct fusion kernels XLA generated: `hlo_stats`); several
     fresh-process compiles: `benchmarks/compile_time.py`.
  7. Compiled temp memory of the update: `memory_analysis().temp_size_in_bytes` of that
     compile.
  8. Machine f32 matmul peak: a jitted 2048^3 matmul in this process, sampled with the
     repetitions (median), and each update's achieved fraction of it from an analytic FLOP
     count (`update_flops`; XLA's cost_analysis() counts rljax's scanned layer body once).

The functions `rljax_*` below are the whole rljax side; they are kept small so that they can be
switched to a new trainer API without touching the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.returns import gae
from rljax.rollout.sampling import SamplingConfig
from rljax.train.experience import Experience
from rljax.train.flops import forward_flops
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.onpolicy import UpdateConfig
from rljax.train.state import create_train_state

from bench_utils import print_side_by_side
from hlo_stats import distinct_kernels

# ----------------------------------------------------------------------------------------------
# The rljax side: small functions, switched to the public trainer API later.
# ----------------------------------------------------------------------------------------------


def rljax_trainer(graphdef, optimizer, c: dict) -> GRPOTrainer:
  """The GRPO trainer of the benchmark's configuration (no rollout is run)."""
  config = GRPOConfig(
    sampling=SamplingConfig(num_samples=c["group_size"], max_new_tokens=c["completion_len"]),
    update=UpdateConfig(agg="seq-mean-token-mean"), kl_coef=c["beta"], kl_kind=c["kl_kind"],
    clip_eps=c["clip_eps"])
  return GRPOTrainer(graphdef, optimizer, config, reward_fn=lambda *a, **k: None,
                     stop_tokens=c["eos_id"], pad_id=c["pad_id"])


def rljax_update(trainer: GRPOTrainer, state, batch: Experience):
  """One GRPO update, the public `trainer.update`: (new state, metrics). Donates `state`."""
  return trainer.update(state, batch)


def rljax_lower_update(trainer: GRPOTrainer, state, batch: Experience):
  """The update's `jax.stages.Lowered` (for compile time and memory)."""
  return trainer.update.lower(state, batch)


def rljax_reference(trainer: GRPOTrainer, state, batch: Experience):
  """[B, N] completion log-probs under `state.extras["reference"]` (what `prepare` runs)."""
  return trainer.reference_logprobs(state, batch)


def rljax_old_logprobs(trainer: GRPOTrainer, state, batch: Experience):
  """[B, N] completion log-probs at the current parameters: the forward `prepare` runs only
  when `config.recompute_old_logp` (several updates per batch, or TIS); timed for reference."""
  return trainer.logprobs(state.params, state.frozen, batch)


def rljax_gae(rewards, values, mask, *, gamma: float, lam: float):
  """(whitened advantages, returns), both [B, T]: `rljax.gae(..., whiten=True)`, jitted inside
  the library (no user `jax.jit`)."""
  return gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)


# ----------------------------------------------------------------------------------------------
# Configuration, inputs, FLOPs.
# ----------------------------------------------------------------------------------------------

CONFIG = {
  "vocab_size": 8192, "num_layers": 4, "d_model": 256, "d_mlp": 1024, "num_heads": 4,
  "num_kv_heads": 2, "head_dim": 64, "rope_theta": 1_000_000.0, "norm_eps": 1e-6,
  "batch": 16, "group_size": 4, "prompt_len": 64, "completion_len": 192,
  "beta": 0.04, "clip_eps": 0.2, "kl_kind": "k1", "lr": 1e-5, "pad_id": 0, "eos_id": 1,
  "gae_batch": 256, "gae_length": 2048, "gamma": 1.0, "lam": 0.95, "matmul_n": 2048,
}
EXPECTED_PARAMS = 6_032_128
GAE_CALLS = 5  # GAE calls per library and repetition (their median is the sample)


def model_config(c: dict) -> ModelConfig:
  return ModelConfig(
    vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=c["d_mlp"],
    num_layers=c["num_layers"], num_heads=c["num_heads"], num_kv_heads=c["num_kv_heads"],
    head_dim=c["head_dim"], rope_theta=c["rope_theta"], rms_norm_eps=c["norm_eps"],
    tie_word_embeddings=True, qk_norm=True, model_type="qwen3",
    dtype=jnp.float32, param_dtype=jnp.float32, attention=c["attention"],
  )


def make_grpo_batch(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random ids in [1, V); prompts left-padded (32..64 real tokens), completions with a padded
  tail (96..192 real tokens); group-normalised advantages of random rewards (Tunix's
  `compute_advantages`: (r - mean) / (std(ddof=1) + 1e-6) per group)."""
  rng = np.random.default_rng(seed)
  b, p, n, pad = c["batch"], c["prompt_len"], c["completion_len"], c["pad_id"]
  prompt = rng.integers(1, c["vocab_size"], (b, p)).astype(np.int32)
  completion = rng.integers(1, c["vocab_size"], (b, n)).astype(np.int32)
  prompt_lengths = rng.integers(p // 2, p + 1, b)
  completion_lengths = rng.integers(n // 2, n + 1, b)
  for row in range(b):
    prompt[row, : p - prompt_lengths[row]] = pad
    completion[row, completion_lengths[row]:] = pad
  rewards = rng.random(b).astype(np.float32).reshape(-1, c["group_size"])
  advantages = (rewards - rewards.mean(-1, keepdims=True)) / (
    rewards.std(-1, ddof=1, keepdims=True) + 1e-6)
  return {"prompt_ids": prompt, "completion_ids": completion,
          "advantages": advantages.reshape(-1).astype(np.float32)}


def make_gae_inputs(batch: int, length: int, seed: int = 0):
  """As benchmarks/gae.py: random rewards/values, random response lengths, one masked span of up
  to 32 tokens per row (a tool output)."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(batch, length)).astype(np.float32)
  values = rng.normal(size=(batch, length)).astype(np.float32)
  lengths = rng.integers(length // 4, length + 1, size=batch)
  mask = np.arange(length)[None, :] < lengths[:, None]
  for row, start in enumerate(rng.integers(0, length, size=batch)):
    mask[row, start : start + rng.integers(1, 33)] = False
  return rewards, values, mask


def update_flops(c: dict, logit_positions: int, logits_passes: int) -> float:
  """Analytic FLOPs of one update from `rljax.train.flops.forward_flops` (2 FLOPs per
  multiply-add; masked positions are computed; attention dense over T×T):

    update = 3·(layers + attention) + logits_passes · 2·B·logit_positions·D·V

  Useful work: logit_positions = N (the completion), logits_passes = 3 (forward, dgrad, wgrad):
  148.2 GFLOP here. rljax's fused log-prob backward recomputes each chunk's logits (4 passes
  over N: 161.1 GFLOP, `rljax.train.flops.update_flops`); Tunix's `compute_per_token_logps`
  computes the logits of all P+N positions and slices them afterwards (its compiled update holds
  a [B·(P+N), V] logits dot): 3 passes over P+N, also 161.1 GFLOP.
  """
  f = forward_flops(model_config(c), c["batch"], c["prompt_len"], c["completion_len"])
  logits = 2.0 * c["batch"] * logit_positions * c["d_model"] * c["vocab_size"]
  return float(3 * (f["layers"] + f["attention"]) + logits_passes * logits)


def rljax_update_flops(trainer: GRPOTrainer, state, batch: Experience) -> float:
  """The FLOPs rljax's update executes (`GRPOTrainer.update_flops`, as its `mfu` metric)."""
  return trainer.update_flops(state, batch)


# ----------------------------------------------------------------------------------------------
# The Tunix worker (a subprocess under the Tunix interpreter).
# ----------------------------------------------------------------------------------------------


class TunixWorker:
  """`benchmarks/tunix_worker.py` under `python`; `call(op, **kw)` sends one JSON line and waits
  for the reply (this process is idle meanwhile)."""

  def __init__(self, python: str, workdir: str):
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
      env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    self.log_path = os.path.join(workdir, "tunix_worker.log")
    self._log = open(self.log_path, "w")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunix_worker.py")
    self.proc = subprocess.Popen([python, script], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                 cwd=workdir)

  def call(self, op: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the Tunix worker exited (rc={self.proc.poll()}); log tail:\n"
                         + self.log_tail())
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"Tunix worker, op {op!r}:\n{reply['error']}")
    return reply

  def log_tail(self, chars: int = 3000) -> str:
    self._log.flush()
    with open(self.log_path) as f:
      return f.read()[-chars:]

  def close(self) -> None:
    if self._log.closed:
      return
    if self.proc.poll() is None:
      try:
        self.call("quit")
        self.proc.wait(timeout=30)
      except Exception:  # noqa: BLE001
        self.proc.kill()
    self._log.close()


# ----------------------------------------------------------------------------------------------
# Measurement helpers.
# ----------------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return time.perf_counter() - start, out


def summary(samples: list[float]) -> dict:
  return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
          "samples": samples}


def pip_freeze() -> list[str]:
  try:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]
  except Exception:  # noqa: BLE001
    from importlib import metadata

    return sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())


def machine_info() -> dict:
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except Exception:  # noqa: BLE001
    pass
  env_names = ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "OPENBLAS_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL", "JAX_ENABLE_X64")
  return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
          "cpu": model, "platform": platform.platform(),
          "env": {k: os.environ[k] for k in env_names if k in os.environ}}


def key_versions() -> dict:
  import flax
  import jaxlib

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def flatten_params(params) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    keys = [k for k in keys if k != "value"]
    out["/".join(keys)] = np.asarray(leaf)
  return out


def run(args) -> dict:
  """All measurements; the Tunix worker and the temporary directory (weights and inputs for the
  worker) are cleaned up even if a measurement fails."""
  workdir = tempfile.mkdtemp(prefix="grpo_step_")
  workers: list[TunixWorker] = []
  try:
    return _run(args, workdir, workers)
  finally:
    for worker in workers:
      worker.close()
    shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: str, workers: list) -> dict:
  c = dict(CONFIG, attention=args.attention)
  result: dict[str, Any] = {"config": c, "machine": machine_info(), "load": []}

  def load(label: str) -> None:
    result["load"].append((label, os.getloadavg()))

  load("start")

  # rljax: model, state, trainer, inputs.
  optimizer = optax.adamw(c["lr"])
  graphdef, state = create_train_state(lambda: Transformer(model_config(c), rngs=nnx.Rngs(0)),
                                       optimizer, rng=0)
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  assert num_params == EXPECTED_PARAMS, num_params
  trainer = rljax_trainer(graphdef, optimizer, c)
  state = trainer.init_state(state)  # the reference: a copy of the initial parameters
  data = make_grpo_batch(c, seed=args.seed)
  gae_rewards, gae_values, gae_mask = make_gae_inputs(c["gae_batch"], c["gae_length"],
                                                      seed=args.seed)
  np.savez(os.path.join(workdir, "weights.npz"), **flatten_params(state.params))
  np.savez(os.path.join(workdir, "batch.npz"), **data, gae_rewards=gae_rewards,
           gae_values=gae_values, gae_mask=gae_mask)
  tokens = jnp.asarray(np.concatenate([data["prompt_ids"], data["completion_ids"]], axis=1))
  completion_mask = jnp.asarray(data["completion_ids"] != c["pad_id"])
  advantages = jnp.asarray(data["advantages"])[:, None] * completion_mask  # as token_advantages
  batch = Experience(tokens=tokens, attention_mask=tokens != c["pad_id"],
                     loss_mask=completion_mask, advantages=advantages)
  recompute_old = trainer.config.recompute_old_logp
  gae_args = tuple(jnp.asarray(x) for x in (gae_rewards, gae_values, gae_mask))
  n = c["matmul_n"]
  mat_a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mat_b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  result["rljax"] = {"params": num_params, "versions": key_versions(), "freeze": pip_freeze(),
                     "backend": jax.default_backend(), "python": sys.executable}

  # Tunix worker.
  worker, tunix = None, None
  result["tunix_skipped"] = None
  if not args.tunix_python:
    result["tunix_skipped"] = "no --tunix-python given"
  elif not (os.path.isfile(args.tunix_python) and os.access(args.tunix_python, os.X_OK)):
    result["tunix_skipped"] = f"{args.tunix_python} is not an executable"
  else:
    try:
      worker = TunixWorker(args.tunix_python, workdir)
      workers.append(worker)
      tunix = worker.call("setup", workdir=workdir, config=c)
      assert tunix["params"] == EXPECTED_PARAMS, tunix["params"]
      if tunix["backend"] != jax.default_backend():
        print(f"WARNING: Tunix runs on {tunix['backend']}, rljax on {jax.default_backend()}",
              file=sys.stderr)
    except Exception as e:  # noqa: BLE001
      lines = str(e).strip().splitlines() or [type(e).__name__]
      result["tunix_skipped"] = f"worker failed: {lines[-1]}"
      result["tunix_error"] = str(e)
      print(f"Tunix worker failed:\n{e}", file=sys.stderr)
      if worker is not None:
        worker.close()
      worker, tunix = None, None
  result["tunix"] = tunix

  def build_batch(ref_logp, old_logp):
    """The batch `prepare` hands to the update: old_logp only when the trainer computes it."""
    return batch.replace(ref_logp=ref_logp, old_logp=old_logp if recompute_old else None)

  # Warm-up of the forward passes (compiles them), then compile the updates (cold, once each).
  samples = {k: [] for k in ("rljax_update", "tunix_update", "rljax_reference",
                             "tunix_reference", "rljax_old", "rljax_gae", "tunix_gae",
                             "matmul", "rljax_batch", "tunix_batch")}
  first = {}
  first["rljax_reference"], ref_logp = timed(rljax_reference, trainer, state, batch)
  first["rljax_old"], old_logp = timed(rljax_old_logprobs, trainer, state, batch)
  if worker:
    first["tunix_reference"] = worker.call("reference")["seconds"]
  train_batch = build_batch(ref_logp, old_logp)
  cpu_start, start = time.process_time(), time.perf_counter()
  lowered = rljax_lower_update(trainer, state, train_batch)
  compiled = lowered.compile()
  compile_s = {"rljax": time.perf_counter() - start}
  compile_cpu = {"rljax": time.process_time() - cpu_start}
  temp = {"rljax": compiled.memory_analysis().temp_size_in_bytes}
  kernels = {"rljax": distinct_kernels(compiled.as_text())[0]}
  del lowered, compiled
  if worker:
    reply = worker.call("lower_update")
    compile_s["tunix"], temp["tunix"] = reply["seconds"], reply["temp_bytes"]
    compile_cpu["tunix"], kernels["tunix"] = reply["cpu_seconds"], reply["kernels"]
    result["tunix_logits_dots"] = reply["logits_dots"]
  first["rljax_update"], (state, metrics) = timed(rljax_update, trainer, state, train_batch)
  checks = {"rljax_first_update": {k: float(v) for k, v in metrics.items()}}
  if worker:
    reply = worker.call("update")
    first["tunix_update"] = reply["seconds"]
    checks["tunix_first_update"] = {k: v for k, v in reply.items() if k != "seconds"}
  first["rljax_gae"], rljax_gae_out = timed(rljax_gae, *gae_args, gamma=c["gamma"], lam=c["lam"])
  if worker:
    first["tunix_gae"] = worker.call("gae", gamma=c["gamma"], lam=c["lam"])["seconds"]
  first["matmul"], _ = timed(matmul, mat_a, mat_b)
  for _ in range(2):
    samples["matmul"].append(timed(matmul, mat_a, mat_b)[0])
  result["first_call_seconds"] = first

  # Correctness: same weights and inputs -> the same reference log-probs, first loss, GAE.
  if worker:
    out = np.load(worker.call("dump")["path"])
    m = np.asarray(completion_mask)
    checks["ref_logp_max_abs_diff"] = float(np.max(np.abs(
      np.where(m, out["ref_logp"] - np.asarray(ref_logp), 0.0))))
    checks["gae_adv_max_abs_diff"] = float(np.max(np.abs(
      np.where(gae_mask, out["gae_advantages"] - np.asarray(rljax_gae_out[0]), 0.0))))
  result["checks"] = checks

  # The repetitions, ABAB for every figure.
  for rep in range(args.repeats):
    load(f"rep {rep}")
    t_ref, ref_logp = timed(rljax_reference, trainer, state, batch)
    samples["rljax_reference"].append(t_ref)
    if worker:
      samples["tunix_reference"].append(worker.call("reference")["seconds"])
    t_old, old_logp = timed(rljax_old_logprobs, trainer, state, batch)
    samples["rljax_old"].append(t_old)
    t_upd, (state, metrics) = timed(rljax_update, trainer, state, build_batch(ref_logp, old_logp))
    samples["rljax_update"].append(t_upd)
    samples["rljax_batch"].append(t_ref + (t_old if recompute_old else 0.0) + t_upd)
    if worker:
      t_tupd = worker.call("update")["seconds"]
      samples["tunix_update"].append(t_tupd)
      samples["tunix_batch"].append(samples["tunix_reference"][-1] + t_tupd)
    # GAE: a burst of GAE_CALLS calls per library, its median one sample; the library that goes
    # first alternates (the first call after the other process's multi-second update runs ~2x
    # slower on this VM, whichever library it is).
    gae_order = ["rljax", "tunix"] if rep % 2 == 0 else ["tunix", "rljax"]
    for lib in gae_order:
      if lib == "rljax":
        samples["rljax_gae"].append(statistics.median(
          timed(rljax_gae, *gae_args, gamma=c["gamma"], lam=c["lam"])[0]
          for _ in range(GAE_CALLS)))
      elif worker:
        samples["tunix_gae"].append(statistics.median(
          worker.call("gae", gamma=c["gamma"], lam=c["lam"], calls=GAE_CALLS)["all_seconds"]))
    samples["matmul"].append(timed(matmul, mat_a, mat_b)[0])
  load("end")

  stats = {k: summary(v) for k, v in samples.items() if v}
  # Per-repetition rljax/Tunix ratios: adjacent samples share the machine's load at that moment.
  paired = {name: summary([a / b for a, b in zip(samples[f"rljax_{name}"],
                                                  samples[f"tunix_{name}"])])
            for name in ("update", "reference", "batch", "gae") if samples[f"tunix_{name}"]}
  peak = 2 * n**3 / stats["matmul"]["median"]
  flops = {"useful": update_flops(c, c["completion_len"], 3),
           "rljax": rljax_update_flops(trainer, state, batch),
           "tunix": update_flops(c, c["prompt_len"] + c["completion_len"], 3)}
  result.update(stats=stats, paired_ratios=paired, compile_seconds=compile_s,
                compile_cpu_seconds=compile_cpu, compile_kernels=kernels, temp_bytes=temp, flops=flops,
                matmul_peak_flops=peak,
                tokens_per_batch=int(tokens.size), rljax_recomputes_old_logp=recompute_old,
                completion_tokens=int(np.asarray(completion_mask).sum()))
  return result


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def report(r: dict) -> str:
  s, have_tunix = r["stats"], r["tunix"] is not None
  na = "–"

  def ms(key):
    if key not in s:
      return na
    x = s[key]
    return f"{x['median'] * 1e3:.1f} ({x['min'] * 1e3:.1f}–{x['max'] * 1e3:.1f})"

  def ratio(a, b, paired=None):
    if a is None or b in (None, 0):
      return na
    p = r.get("paired_ratios", {}).get(paired)
    extra = f" (paired {p['median']:.2f}, {p['min']:.2f}–{p['max']:.2f})" if p else ""
    return f"{a / b:.2f}{extra}"

  def med(key):
    return s[key]["median"] if key in s else None

  tok = r["tokens_per_batch"]
  rows = [("figure", "Tunix", "rljax", "rljax/Tunix"), ("---", "---", "---", "---")]
  rows.append(("1. GRPO update, ms (lower is better)", ms("tunix_update"), ms("rljax_update"),
               ratio(med("rljax_update"), med("tunix_update"), "update")))
  rows.append(("2. reference log-prob pass, ms", ms("tunix_reference"), ms("rljax_reference"),
               ratio(med("rljax_reference"), med("tunix_reference"), "reference")))
  old = "" if r["rljax_recomputes_old_logp"] else " (not run by the trainer at 1 update/batch)"
  rows.append((f"3. old-log-prob forward, ms{old}", na, ms("rljax_old"), na))
  rows.append(("4. trainer cost per batch (ref + any old + update), ms", ms("tunix_batch"),
               ms("rljax_batch"), ratio(med("rljax_batch"), med("tunix_batch"), "batch")))
  tps = {k: (tok / med(f"{k}_batch") if med(f"{k}_batch") else None) for k in ("tunix", "rljax")}
  rows.append((f"4. tokens/s ({tok} tokens = B·(P+N) per batch; higher is better)",
               f"{tps['tunix']:.0f}" if tps["tunix"] else na,
               f"{tps['rljax']:.0f}" if tps["rljax"] else na, ratio(tps["rljax"], tps["tunix"])))
  rows.append((f"5. GAE B={r['config']['gae_batch']} T={r['config']['gae_length']} + whiten, ms",
               ms("tunix_gae"), ms("rljax_gae"), ratio(med("rljax_gae"), med("tunix_gae"), "gae")))
  cs, tb = r["compile_seconds"], r["temp_bytes"]
  rows.append(("6. XLA compile of the update (lower + compile, once), s",
               f"{cs['tunix']:.2f}" if "tunix" in cs else na, f"{cs['rljax']:.2f}",
               ratio(cs.get("rljax"), cs.get("tunix"))))
  cc, ck = r["compile_cpu_seconds"], r["compile_kernels"]
  rows.append(("6. ... its process CPU time, s", f"{cc['tunix']:.2f}" if "tunix" in cc else na,
               f"{cc['rljax']:.2f}", ratio(cc.get("rljax"), cc.get("tunix"))))
  rows.append(("6. ... distinct fusion kernels XLA generated (`hlo_stats`)",
               str(ck.get("tunix", na)), str(ck["rljax"]), ratio(ck.get("rljax"), ck.get("tunix"))))
  rows.append(("7. compiled temp memory of the update, MiB",
               f"{tb['tunix'] / 2**20:.1f}" if "tunix" in tb else na,
               f"{tb['rljax'] / 2**20:.1f}", ratio(tb.get("rljax"), tb.get("tunix"))))
  peak, fl = r["matmul_peak_flops"], r["flops"]
  rows.append((f"8. f32 matmul peak ({r['config']['matmul_n']}³ in rljax's process; the "
               "machine's), GFLOP/s",
               f"{peak / 1e9:.1f}" if have_tunix else na, f"{peak / 1e9:.1f}", na))
  rows.append(("8. update FLOPs executed (analytic, `update_flops`; useful work "
               f"{fl['useful'] / 1e9:.1f}), GFLOP",
               f"{fl['tunix'] / 1e9:.1f}" if have_tunix else na, f"{fl['rljax'] / 1e9:.1f}",
               ratio(fl["rljax"], fl["tunix"]) if have_tunix else na))
  achieved = {k: (fl[k] / med(f"{k}_update") if med(f"{k}_update") else None)
              for k in ("tunix", "rljax")}
  rows.append(("8. update achieved GFLOP/s (% of peak)",
               f"{achieved['tunix'] / 1e9:.1f} ({100 * achieved['tunix'] / peak:.0f}%)"
               if achieved["tunix"] else na,
               f"{achieved['rljax'] / 1e9:.1f} ({100 * achieved['rljax'] / peak:.0f}%)",
               ratio(achieved["rljax"], achieved["tunix"])))
  lines = ["| " + " | ".join(row) + " |" for row in rows]
  lines.append("")
  order = "ABAB (rljax, Tunix)" if have_tunix else "rljax-only"
  lines.append(f"Times: median (min–max) of {len(s['rljax_update']['samples'])} {order} "
               "repetitions after one warm-up call, compile excluded; rljax/Tunix < 1 means "
               "rljax is faster / smaller (ratio of the medians; 'paired': median and range "
               "of the per-repetition ratios, whose two samples ran back to back). "
               f"Completion tokens under the mask: {r['completion_tokens']} of "
               f"{r['config']['batch'] * r['config']['completion_len']}.")
  m = r["machine"]
  loads = ", ".join(f"{label}: {a:.2f}/{b:.2f}/{c:.2f}" for label, (a, b, c) in r["load"])
  lines.append(f"Machine: {m['cpu']}, nproc={m['nproc']} (affinity {m['affinity']}), "
               f"{m['platform']}; env {m['env'] or '{}'}")
  lines.append(f"Load average (1/5/15 min): {loads}")
  rv = r["rljax"]["versions"]
  lines.append(f"rljax process: backend {r['rljax']['backend']}, "
               + ", ".join(f"{k} {v}" for k, v in rv.items()))
  if have_tunix:
    t = r["tunix"]
    lines.append(f"Tunix process: backend {t['backend']}, "
                 + ", ".join(f"{k} {v}" for k, v in t["versions"].items()))
    lines.append(f"Tunix GRPOConfig: kl_loss_mode={t['kl_loss_mode']!r} "
                 f"(rljax kl_kind={r['config']['kl_kind']!r}), kl_clamp_value="
                 f"{t['kl_clamp_value']}, loss_agg_mode={t['loss_agg_mode']!r}, "
                 f"temperature={t['temperature']}; logits dots in its compiled update: "
                 f"{', '.join(r.get('tunix_logits_dots', []))}")
    ch = r["checks"]
    ru, tu = ch["rljax_first_update"], ch["tunix_first_update"]
    lines.append(
      f"Checks (same weights, same inputs): reference log-prob max |Δ| "
      f"{ch['ref_logp_max_abs_diff']:.2e}; first update loss rljax {ru['loss']:.6f} / "
      f"Tunix {tu['loss']:.6f}, grad norm {ru['grad_norm']:.6f} / {tu['grad_norm']:.6f}, "
      f"entropy {ru['entropy']:.4f} / {tu['entropy']:.4f}; GAE advantages max |Δ| "
      f"{ch['gae_adv_max_abs_diff']:.2e} (valid positions)")
  else:
    lines.append(f"Tunix: skipped ({r['tunix_skipped']}).")
  fc = r["first_call_seconds"]
  lines.append("First calls (s; the updates' after lower+compile): "
               + ", ".join(f"{k} {v:.2f}" for k, v in fc.items()))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON"),
                      help="python of the Tunix venv (default: $TUNIX_PYTHON; none: skip Tunix)")
  parser.add_argument("--repeats", type=int, default=5, help="ABAB repetitions (>= 5 advised)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--attention", default="auto", choices=("auto", "naive", "blockwise"),
                      help="rljax's ModelConfig.attention (auto: dense at this T = 256)")
  parser.add_argument("--json", help="also write all results (samples, freezes) to this file")
  parser.add_argument("--no-freeze", action="store_true",
                      help="do not print the two pip freezes (they are always in --json)")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  start = time.perf_counter()
  result = run(args)
  result["wall_seconds"] = time.perf_counter() - start
  title = (f"GRPO step benchmark: rljax vs. Tunix, B={CONFIG['batch']} × "
        f"({CONFIG['prompt_len']} + {CONFIG['completion_len']}) tokens, "
        f"{EXPECTED_PARAMS:,}-parameter Qwen3-style model, float32")
  print_side_by_side(title, report(result), result, freeze=not args.no_freeze,
                     json_path=args.json)


if __name__ == "__main__":
  main()
