"""Tunix side of `benchmarks/grpo_step.py` and `benchmarks/rollout_engine.py`: a persistent
worker that times Tunix's own code.

Runs under the Tunix interpreter (its own venv, never rljax's; see the install commands in
`grpo_step.py`) and never imports rljax. The driver starts it once and sends one JSON
command per line on stdin; the worker answers one JSON line per command on stdout and is idle
(blocked on stdin) otherwise, so the two processes never run at the same time:

  {"op": "setup", "workdir": ..., "config": {...}}  build the Qwen3 policy + reference from the
        rljax weights in workdir/weights.npz, an RLCluster and a GRPOLearner; reply with the
        parameter count, versions, backend, pip freeze and the learner's kl_loss_mode
  {"op": "reference"}       rl_cluster.get_ref_per_token_logps (what the learner calls)
  {"op": "lower_update"}    lower + compile the actor trainer's jitted train step (once): wall
        and process CPU seconds, temp memory, distinct kernels (`hlo_stats`)
  {"op": "update"}          one call of that jitted train step (PeftTrainer's train_step)
  {"op": "gae", "calls": n}  n calls of the "gae" advantage estimator
        (algo_core.compute_gae_advantages)
  {"op": "dump"}            write ref log-probs / GAE advantages to workdir for checks
  {"op": "setup_sampler", "workdir": ..., "config": {...}}  only the Qwen3 (rollout_engine.py)
  {"op": "sampler_case", "name": ..., "prompts": [[ids]], "max_new_tokens": N,
   "eos_tokens": [...], "top_p": ...}  a `tunix.generate.sampler.Sampler` for one case
  {"op": "sample", "name": ..., "seed": ...}  one Sampler call: seconds and completion lengths
  {"op": "turn_sampler", "name": ..., "width": W, "max_new_tokens": N, "eos_tokens": [...]}
        a Sampler for one turn of `multi_turn.py`'s re-prefill loop (prompts left-padded to W)
  {"op": "sample_ids", "name": ..., "prompts": [[ids]], "seed": ..., "top_p": ...}  one call
        of that Sampler on these prompts: seconds and the completions' ids
  {"op": "quit"}

Every timed reply carries "seconds": wall time of one call up to `jax.block_until_ready`.
Anything a library prints goes to stderr (fd 1 is pointed at fd 2): stdout carries only the
protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from hlo_stats import distinct_kernels


class IdTokenizer:
  """Token ids as text, the tokenizer interface Tunix's `Sampler` (and RLCluster's rollout)
  call: encode("5 17 3") == [5, 17, 3] and decode([5, 17, 3]) == "5 17 3", so the sampler reads
  and returns exactly the ids it is given; no BOS (`bos_id()` None: `Sampler.tokenize`
  prepends nothing)."""

  def __init__(self, pad_id: int, eos_id: int):
    self._pad, self._eos = pad_id, eos_id

  @staticmethod
  def text(ids) -> str:
    return " ".join(str(int(i)) for i in ids)

  def encode(self, text, **kwargs):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs):
    return self.text(ids)

  def bos_id(self):
    return None

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return self._pad


def _assign(variable, value) -> None:
  value = jnp.asarray(value, variable.value.dtype)
  if value.shape != variable.value.shape:
    raise ValueError(f"shape {value.shape} != {variable.value.shape}")
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:
    variable.value = value


def load_rljax_weights(model, weights) -> None:
  """Copies rljax's (stacked-layer) parameters into a Tunix Qwen3 (same layouts, see
  `grpo_step.py`), so both libraries start from the same random weights."""
  _assign(model.embedder.input_embedding, weights["embed"])
  _assign(model.final_norm.w, weights["final_norm"])
  for i, layer in enumerate(model.layers):
    w = {k.split("/", 1)[1]: v[i] for k, v in weights.items() if k.startswith("layers/")}
    _assign(layer.input_layernorm.w, w["attn_norm"])
    _assign(layer.post_attention_layernorm.w, w["mlp_norm"])
    _assign(layer.attn.q_proj.w, w["q_proj"])
    _assign(layer.attn.k_proj.w, w["k_proj"])
    _assign(layer.attn.v_proj.w, w["v_proj"])
    _assign(layer.attn.o_proj.w, w["o_proj"])
    _assign(layer.attn.q_norm.w, w["q_norm"])
    _assign(layer.attn.k_norm.w, w["k_norm"])
    _assign(layer.mlp.gate_proj.kernel, w["gate_proj"])
    _assign(layer.mlp.up_proj.kernel, w["up_proj"])
    _assign(layer.mlp.down_proj.kernel, w["down_proj"])


def pip_freeze() -> list[str]:
  try:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]
  except Exception:  # noqa: BLE001 - fall back to the installed distributions
    from importlib import metadata

    return sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())


def qwen3_model(c: dict, weights):
  """A Tunix `Qwen3` of the benchmark configuration `c` (grpo_step.CONFIG's keys) holding the
  rljax weights (`load_rljax_weights`)."""
  from flax import nnx
  from tunix.models.qwen3 import model as qwen3

  config = qwen3.ModelConfig(
    num_layers=c["num_layers"], vocab_size=c["vocab_size"], embed_dim=c["d_model"],
    hidden_dim=c["d_mlp"], num_heads=c["num_heads"], head_dim=c["head_dim"],
    num_kv_heads=c["num_kv_heads"], rope_theta=int(c["rope_theta"]), norm_eps=c["norm_eps"],
    use_tied_embedding=True, dtype=jnp.float32, param_dtype=jnp.float32,
  )
  model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  load_rljax_weights(model, weights)
  return model


def count_params(model) -> int:
  from flax import nnx

  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def environment() -> dict:
  """Backend, devices, key versions, pip freeze and interpreter of this process."""
  import flax
  import optax
  import tunix

  try:
    tunix_version = __import__("importlib.metadata").metadata.version("google-tunix")
  except Exception:  # noqa: BLE001
    tunix_version = getattr(tunix, "__version__", "?")
  return {
    "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
    "versions": {"google-tunix": tunix_version, "jax": jax.__version__,
                 "jaxlib": __import__("jaxlib").__version__, "flax": flax.__version__,
                 "optax": optax.__version__, "numpy": np.__version__,
                 "python": sys.version.split()[0]},
    "freeze": pip_freeze(),
    "python": sys.executable,
  }


class Worker:
  def __init__(self):
    self.cluster = self.learner = self.trainer = None
    self.train_step = self.ref_logp = self.gae_out = None

  # -- setup ---------------------------------------------------------------------------------

  def setup(self, cmd):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import optax
    from flax import nnx
    from tunix.rl import function_registry
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    self.nnx, self.grpo_learner, self.rl_cluster_lib = nnx, grpo_learner, rl_cluster_lib
    c, workdir = cmd["config"], cmd["workdir"]
    self.workdir, self.c = workdir, c
    weights = dict(np.load(os.path.join(workdir, "weights.npz")))
    data = dict(np.load(os.path.join(workdir, "batch.npz")))

    actor, reference = qwen3_model(c, weights), qwen3_model(c, weights)
    num_params = count_params(actor)

    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    role = rl_cluster_lib.Role
    training_config = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(c["lr"]), eval_every_n_steps=10**9, max_steps=10**9,
    )
    cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False, training_config=training_config,
      rollout_config=base_rollout.RolloutConfig(
        max_tokens_to_generate=c["completion_len"], max_prompt_length=c["prompt_len"],
        kv_cache_size=c["prompt_len"] + c["completion_len"], temperature=1.0),
    )
    self.cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=IdTokenizer(c["pad_id"], c["eos_id"]),
      cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(
      num_generations=c["group_size"], num_iterations=1, beta=c["beta"], epsilon=c["clip_eps"],
      loss_agg_mode="sequence-mean-token-mean",
    )
    # The learner installs its GRPO loss (algo_core.grpo_loss_fn) on the actor trainer.
    self.learner = grpo_learner.GRPOLearner(
      self.cluster, algo, reward_fns=lambda prompts, completions, **kw: [0.0] * len(prompts))
    self.algo = algo
    self.trainer = self.cluster.actor_trainer
    self.pad_id, self.eos_id = self.cluster.rollout.pad_id(), self.cluster.rollout.eos_id()

    self.prompt_ids = jnp.asarray(data["prompt_ids"])
    self.completion_ids = jnp.asarray(data["completion_ids"])
    self.advantages = data["advantages"]
    # As GRPOLearner._generate_and_compute_advantage: masks from the pad id.
    self.prompt_mask = self.prompt_ids != self.pad_id
    self.completion_mask = jnp.array(np.not_equal(data["completion_ids"], self.pad_id))
    # The learner's micro batch for log-probs: compute_logps_micro_batch_size (default: the
    # train micro batch = the whole batch of prompts) × num_generations rows.
    self.logps_micro_batch = int(self.prompt_ids.shape[0])
    self.gae_args = {k: jnp.asarray(data[k]) for k in ("gae_rewards", "gae_values", "gae_mask")}
    self.gae_fn = function_registry.default_registry.get("advantage_estimator", "gae")

    with self._actor_mesh():
      # What PeftTrainer.train does before its loop (cache_nnx_graph=True there).
      self.train_step, _ = self.trainer.jit_train_and_eval_step(skip_jit=False,
                                                                cache_nnx_graph=True)
    return {
      "params": num_params,
      "kl_loss_mode": algo.kl_loss_mode, "kl_clamp_value": algo.kl_clamp_value,
      "epsilon_high": getattr(algo, "epsilon_high", None), "temperature": algo.temperature,
      "loss_agg_mode": algo.loss_agg_mode, **environment(),
    }

  def _actor_mesh(self):
    return self.cluster._get_mesh_and_logical_axis_rules_cm(self.rl_cluster_lib.Role.ACTOR)

  def _example(self):
    """The TrainExample GRPOLearner builds at num_iterations=1 (old_per_token_logps=None, so
    grpo_loss_fn uses stop_gradient(logp)), placed as PeftTrainer.train places it."""
    from tunix.sft import sharding_utils

    if self.ref_logp is None:
      raise RuntimeError("run 'reference' before 'update'")
    example = self.grpo_learner.TrainExample(
      prompt_ids=self.prompt_ids, prompt_mask=self.prompt_mask,
      completion_ids=self.completion_ids, completion_mask=self.completion_mask,
      ref_per_token_logps=self.ref_logp, advantages=jax.device_put(self.advantages),
      old_per_token_logps=None,
    )
    with self._actor_mesh():
      return sharding_utils.shard_input(example, self.trainer.config.data_sharding_axis)

  # -- timed ops -----------------------------------------------------------------------------

  def reference(self, cmd):
    start = time.perf_counter()
    ref = self.cluster.get_ref_per_token_logps(
      prompt_tokens=self.prompt_ids, completion_tokens=self.completion_ids,
      pad_id=self.pad_id, eos_id=self.eos_id, micro_batch_size=self.logps_micro_batch)
    jax.block_until_ready(ref)
    seconds = time.perf_counter() - start
    self.ref_logp = ref
    return {"seconds": seconds}

  def lower_update(self, cmd):
    example = self._example()
    jitted = getattr(self.train_step.func, "__wrapped__", None)  # the nnx.jit of _train_step
    if jitted is None or not hasattr(jitted, "lower"):
      jitted = self.trainer._jitted_train_step_fn.func.__wrapped__
    with self._actor_mesh():
      cpu_start, start = time.process_time(), time.perf_counter()
      lowered = jitted.lower(self.trainer.model, self.trainer.optimizer, example)
      lowered_s = time.perf_counter() - start
      compiled = lowered.compile()
      total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    kernels, kernel_instructions = distinct_kernels(hlo)
    return {"seconds": total, "lower_seconds": lowered_s, "cpu_seconds": cpu,
            "kernels": kernels, "kernel_instructions": kernel_instructions,
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "logits_dots": sorted({s for s in _dot_shapes(hlo) if str(self.c["vocab_size"]) in s})}

  def update(self, cmd):
    example = self._example()
    with self._actor_mesh():
      start = time.perf_counter()
      loss, aux, grad_norm = self.train_step(example)
      jax.block_until_ready((loss, aux, grad_norm))
      seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": float(loss), "grad_norm": float(grad_norm),
            "kl": float(aux["kl"]), "entropy": float(aux["entropy"])}

  def gae(self, cmd):
    """`calls` (default 1) timed calls; "seconds" is the first one's, "all_seconds" all."""
    a = self.gae_args
    times = []
    for _ in range(int(cmd.get("calls", 1))):
      start = time.perf_counter()
      out = self.gae_fn(rewards=a["gae_rewards"], values=a["gae_values"],
                        completion_mask=a["gae_mask"], gamma=cmd["gamma"],
                        gae_lambda=cmd["lam"])
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
    self.gae_out = out
    return {"seconds": times[0], "all_seconds": times}

  def dump(self, cmd):
    arrays = {}
    if self.ref_logp is not None:
      arrays["ref_logp"] = np.asarray(self.ref_logp)
    if self.gae_out is not None:
      arrays["gae_advantages"] = np.asarray(self.gae_out[0])
    path = os.path.join(self.workdir, "tunix_out.npz")
    np.savez(path, **arrays)
    return {"path": path}


  # -- sampling (benchmarks/rollout_engine.py) -----------------------------------------------

  def setup_sampler(self, cmd):
    """The Qwen3 of workdir/weights.npz for `sampler_case` / `sample` (no RL cluster)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    self.c, self.workdir = cmd["config"], cmd["workdir"]
    self.model = qwen3_model(self.c, dict(np.load(os.path.join(self.workdir, "weights.npz"))))
    self.cases = {}
    return {"params": count_params(self.model), **environment()}

  def sampler_case(self, cmd):
    """A `tunix.generate.sampler.Sampler` for case `name`: `prompts` (lists of ids, no padding
    id inside), `max_new_tokens` N, `eos_tokens`, `top_p` (1.0: plain categorical sampling over
    the full vocabulary; None: Tunix's greedy mode), temperature 1, KV cache of P + N slots. One Sampler per case: its
    jitted functions read `eos_tokens` when first traced and keep them."""
    from tunix.generate import sampler as sampler_lib

    c = self.c
    prompts = [list(map(int, p)) for p in cmd["prompts"]]
    length = max(map(len, prompts))
    cache = sampler_lib.CacheConfig(cache_size=length + cmd["max_new_tokens"],
                                    num_layers=c["num_layers"], num_kv_heads=c["num_kv_heads"],
                                    head_dim=c["head_dim"])
    tokenizer = IdTokenizer(c["pad_id"], cmd["eos_tokens"][0])
    self.cases[cmd["name"]] = dict(
      cmd, sampler=sampler_lib.Sampler(self.model, tokenizer, cache), prompt_length=length,
      prompt_ids=prompts, texts=[IdTokenizer.text(p) for p in prompts])
    return {"cache_size": cache.cache_size}

  def sample(self, cmd):
    """One `Sampler.__call__` of case `name` with `seed` (the strings built beforehand).
    Replies its seconds, the completion lengths (up to and including the first eos token, else
    N), whether every prompt came back as the same ids (no BOS, no padding added) and every
    completion decoded to its ids; with `tokens` true also the completions."""
    case = self.cases[cmd["name"]]
    n = case["max_new_tokens"]
    start = time.perf_counter()
    out = case["sampler"](
      case["texts"], max_generation_steps=n, max_prompt_length=case["prompt_length"],
      echo=False, eos_tokens=case["eos_tokens"], temperature=1.0, top_p=case["top_p"],
      top_k=None, seed=int(cmd["seed"]))
    seconds = time.perf_counter() - start
    completions = [np.asarray(t).tolist() for t in out.tokens]
    lengths = [len(t) + (len(t) < n) for t in completions]  # + the eos token where one came
    same_ids = (np.array_equal(np.asarray(out.padded_prompt_tokens), case["prompt_ids"])
                and all(text == IdTokenizer.text(t) for text, t in zip(out.text, completions)))
    reply = {"seconds": seconds, "lengths": lengths, "same_ids": bool(same_ids)}
    if cmd.get("tokens"):
      reply["tokens"] = completions
    return reply


  # -- multi-turn re-prefill (benchmarks/multi_turn.py) ----------------------------------------

  def turn_sampler(self, cmd):
    """A Sampler for one turn of the re-prefill loop: every prompt left-padded to `width`
    (`max_prompt_length`: one compile per turn, whatever the histories' lengths), KV cache of
    width + N slots."""
    from tunix.generate import sampler as sampler_lib

    c = self.c
    cache = sampler_lib.CacheConfig(cache_size=cmd["width"] + cmd["max_new_tokens"],
                                    num_layers=c["num_layers"], num_kv_heads=c["num_kv_heads"],
                                    head_dim=c["head_dim"])
    tokenizer = IdTokenizer(c["pad_id"], cmd["eos_tokens"][0])
    self.cases[cmd["name"]] = dict(cmd, sampler=sampler_lib.Sampler(self.model, tokenizer, cache))
    return {"cache_size": cache.cache_size}

  def sample_ids(self, cmd):
    """One Sampler call of turn sampler `name` on `prompts` (id lists, built into strings
    inside the timing: Tunix's interface is text); temperature 1, `top_p` (None: greedy).
    Replies its seconds, the completions (cut before the first eos token, as Tunix returns
    them) and whether each prompt came back as exactly its ids behind the left padding."""
    case = self.cases[cmd["name"]]
    prompts = [list(map(int, p)) for p in cmd["prompts"]]
    start = time.perf_counter()
    out = case["sampler"](
      [IdTokenizer.text(p) for p in prompts], max_generation_steps=case["max_new_tokens"],
      max_prompt_length=case["width"], echo=False, eos_tokens=case["eos_tokens"],
      temperature=1.0, top_p=cmd.get("top_p"), top_k=None, seed=int(cmd["seed"]))
    seconds = time.perf_counter() - start
    padded = np.asarray(out.padded_prompt_tokens)
    same_ids = all(padded[i, padded.shape[1] - len(p):].tolist() == p
                   for i, p in enumerate(prompts))
    return {"seconds": seconds, "tokens": [np.asarray(t).tolist() for t in out.tokens],
            "same_ids": bool(same_ids)}


def _dot_shapes(hlo: str) -> list[str]:
  import re

  return re.findall(r"= (\S+) dot\(", hlo)


def main() -> None:
  protocol = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # stray prints of the libraries (Python or C) must not corrupt the protocol
  sys.stdout = sys.stderr
  worker = Worker()
  for line in sys.stdin:
    line = line.strip()
    if not line:
      continue
    try:
      cmd = json.loads(line)
      op = cmd["op"]
      if op == "quit":
        protocol.write(json.dumps({"ok": True}) + "\n")
        break
      if op.startswith("_") or not hasattr(worker, op):
        raise ValueError(f"unknown op {op!r}")
      reply = getattr(worker, op)(cmd)
    except Exception:  # noqa: BLE001 - report every failure to the driver
      reply = {"error": traceback.format_exc()}
    protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
  main()
