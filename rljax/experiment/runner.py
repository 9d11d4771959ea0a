"""The runner: `run_experiment(experiment, overrides, resume=..., out_dir=...)`.

The loop, for every algorithm:

    state, iterator ← build (or restore the newest checkpoint with --resume)
    for step in start+1 .. steps:
        batch ← next(iterator)
        state, metrics ← STEP[algorithm family](run, state, batch, step)
        evaluate every eval_every steps and at the last step (sample completions too)
        log metrics (JSONL / TensorBoard / W&B / progress bar) every log_every steps
        checkpoint every save_every steps, at the last step, and when interrupted
    final model, plot and summary

Interruption: the first SIGINT / SIGTERM lets the step in flight finish (with its logging and
evaluation), checkpoints it, waits for the asynchronous save, flushes the logs and raises
`RunInterrupted` (the CLI prints how to resume and exits with 130 / 143); a second one exits at
once, keeping the last complete checkpoint. `resume=True` restores the newest checkpoint and
continues with the next step: the logs are cut back to that step first (`MetricsLogger`), so
every step is logged exactly once, and the rest of the run is the one an uninterrupted run
would have had (the same data order, rollout keys and updates). Resuming a run directory
without checkpoints is an error, and resuming a finished one returns its summary untouched.

One small step function per family: `supervised_step` (sft, reward_model and the DPO family
through `make_train_step` with the objective and its count function; DPO / KTO add the frozen
reference's log-probs to each batch), `grpo_step` (`GRPOTrainer.step`) and `ppo_step`
(`PPOTrainer.step`). Supervised steps also log the batch's `padding_fraction` (packed batches,
`data.packing`, or padded buckets). Rollout keys are `fold_in(key(seed), step)`, so a resumed
run draws the same samples as an uninterrupted one; a checkpoint holds the TrainState (params,
optimizer state, RNG, PPO critic and KL controllers; the on-policy reference policy is written
once per run, see `Checkpointer`) and, as JSON, the data iterator's position and the run time.

Every logged record also has "compiles": the number of XLA compilations during that step
(from `jax.monitoring`), 0 once the shapes have settled.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.data.packing import padding_fraction
from rljax.experiment import build
from rljax.experiment.config import ConfigError, Experiment, ExperimentConfig, load_experiment
from rljax.experiment.config import to_jsonable
from rljax.experiment.evaluation import default_evaluate, reference_of
from rljax.experiment.logging import MetricsLogger, read_metrics
from rljax.experiment.plots import plot_curves
from rljax.experiment.progress import Progress
from rljax.experiment.stage import PREAMBLE_DIR
from rljax.models.adapters import save_adapter
from rljax.models.lora import lora_layers, trainable_filter
from rljax.models.transformer import Transformer
from rljax.train.checkpoint import Checkpointer
from rljax.train.grpo import GRPOTrainer
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.optim import make_optimizer
from rljax.train.ppo import PPOTrainer, split_critic
from rljax.train.preference import (
  add_reference_logps, cpo_objective, example_count, kto_objective, orpo_objective,
  simpo_objective,
)
from rljax.train.reward_modeling import reward_pair_objective
from rljax.train.state import create_train_state, state_shardings
from rljax.train.supervised import options
from rljax.train.compiles import count_compiles
from rljax.train.step import make_train_step

# algorithm → (objective, count function, needs the frozen reference's log-probs)
OBJECTIVES: dict[str, tuple[Callable, Callable, bool]] = {
  "sft": (sft_loss, sft_token_count, False),
  "reward_model": (reward_pair_objective, pair_count, False),
  "dpo": (dpo_objective, pair_count, True),
  "kto": (kto_objective, example_count, True),
  "orpo": (orpo_objective, pair_count, False),
  "simpo": (simpo_objective, pair_count, False),
  "cpo": (cpo_objective, pair_count, False),
}
SUMMARY_KEYS = ("loss", "nll", "reward_mean", "kl", "reward_accuracy", "grad_norm")
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"  # model/adapter: a LoRA run's adapters in PEFT's format

# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything a step or an evaluation needs (the `run` given to an `evaluate` hook)."""

  config: ExperimentConfig
  experiment: Experiment
  tokenizer: Any
  model: nnx.Module            # the initial module (graph template; its arrays are not updated)
  graphdef: nnx.GraphDef
  optimizer: Any
  train_iter: Any
  eval_batches: list
  reference: tuple | None = None   # DPO / KTO: frozen (params, frozen) of the initial policy
  #                                  (frozen None under LoRA: the state's, `reference_of`)
  loss_fn: Callable | None = None
  train_step: Callable | None = None
  eval_step: Callable | None = None  # the jitted supervised objective, for evaluation
  trainer: Any = None              # GRPOTrainer / PPOTrainer
  key: jax.Array | None = None
  out_dir: str = ""
  samples: list = dataclasses.field(default_factory=list)  # the latest evaluation's completions


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)  # steps donate the state's buffers


def _mesh(config: ExperimentConfig):
  """A mesh (and rules) on several devices; None on one device (same code, no shardings)."""
  devices = jax.devices()[: config.num_devices]
  if len(devices) == 1:
    return None, None
  from rljax.parallel.mesh import make_mesh

  mesh = make_mesh(config.mesh, devices=devices)
  batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  samples = {"grpo": config.grpo.sampling.num_samples, "ppo": config.ppo.sampling.num_samples}
  rows = config.data.batch_size * samples.get(config.algorithm, 1)
  if rows % batch_axes:
    raise ConfigError(f"the rows of a batch (data.batch_size {config.data.batch_size} x "
                      f"{samples.get(config.algorithm, 1)} samples = {rows}) must be divisible "
                      f"by the data x fsdp mesh size ({batch_axes}); or set num_devices / mesh.")
  return mesh, config.rules


def setup(exp: Experiment, out_dir: str) -> tuple[Run, Any]:
  """Builds the tokenizer, model, train state, data and trainer of an experiment."""
  c = exp.config
  tokenizer = build.build_tokenizer(c)
  model = build.build_model(exp, tokenizer)
  optimizer = make_optimizer(c.optimizer)
  mesh, rules = _mesh(c)
  graphdef, state = create_train_state(model, optimizer, rng=c.logging.seed, mesh=mesh,
                                       rules=rules, trainable=trainable_filter(model))
  run = Run(config=c, experiment=exp, tokenizer=tokenizer, model=model, graphdef=graphdef,
            optimizer=optimizer, train_iter=build.train_iterator(c, tokenizer),
            eval_batches=build.eval_batches(c, tokenizer), key=jax.random.key(c.logging.seed),
            out_dir=out_dir)
  compiler_options = dict(c.compiler_options) or None
  if c.algorithm in OBJECTIVES:
    objective, count_fn, needs_reference = OBJECTIVES[c.algorithm]
    run.loss_fn = functools.partial(objective, **options(c.objective))  # the typed section
    if needs_reference:  # under LoRA a copy of the adapters only, on the state's frozen base
      lora = bool(lora_layers(model))
      run.reference = (_copy(state.params), None if lora else _copy(state.frozen))
    shardings = None if mesh is None else state_shardings(graphdef, state, mesh, rules)
    run.train_step = make_train_step(
      run.loss_fn, graphdef, optimizer, count_fn=count_fn, shardings=shardings,
      num_microbatches=c.num_microbatches,
      compute_dtype=build.dtype_of(c.compute_dtype, "compute_dtype"),
      compiler_options=compiler_options)
    return run, state
  environment = None
  if exp.build_environment is not None:
    if c.data.chat is not False:
      raise ConfigError("a build_environment run renders its chats itself (`rljax.agents`): set "
                        "data.chat=False, so the rows' prompts reach env.reset as written.")
    environment = exp.build_environment(c, tokenizer)
  reward_fn = None if environment is not None else build.build_reward(exp, tokenizer)
  kw = {"stop_tokens": build.stop_tokens_of(tokenizer, getattr(model, "config", None)),
        "pad_id": build.pad_id_of(tokenizer), "stop_strings": c.stop_strings,
        "environment": environment,
        "mesh": mesh, "rules": rules, "compiler_options": compiler_options}
  if c.algorithm == "grpo":
    run.trainer = GRPOTrainer(graphdef, optimizer, c.grpo, reward_fn, tokenizer, **kw)
    return run, run.trainer.init_state(state)  # the reference: the initial policy, in the state
  critic = build.build_critic(exp, model)
  critic_graphdef, _, _ = split_critic(critic)
  critic_optimizer = make_optimizer(c.critic_optimizer or c.optimizer)
  run.trainer = PPOTrainer(graphdef, critic_graphdef, optimizer, critic_optimizer, c.ppo,
                           reward_fn, tokenizer, **kw)
  return run, run.trainer.init_state(state, critic=critic)


# ----------------------------------------------------------------------------------------------
# One step per algorithm family.
# ----------------------------------------------------------------------------------------------


def supervised_step(run: Run, state: Any, batch: Mapping, step: int) -> tuple[Any, dict]:
  """One optimizer update of the objective (reference log-probs added for DPO / KTO)."""
  del step
  if run.reference is not None:
    batch = add_reference_logps(run.graphdef, reference_of(run, state), batch)
  start = time.perf_counter()
  state, metrics = run.train_step(state, batch)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  tokens = sum(float(np.sum(v)) for k, v in batch.items() if k.endswith("attention_mask"))
  metrics["tokens_per_second"] = tokens / max(time.perf_counter() - start, 1e-9)
  metrics["padding_fraction"] = padding_fraction(batch)
  return state, metrics


def grpo_step(run: Run, state: Any, prompts: Any, step: int) -> tuple[Any, dict]:
  """One GRPO rollout (G samples per prompt) and its updates."""
  return run.trainer.step(state, prompts, jax.random.fold_in(run.key, step))


def ppo_step(run: Run, state: Any, prompts: Any, step: int) -> tuple[Any, dict]:
  """One PPO rollout and its epochs of policy / critic updates."""
  return run.trainer.step(state, prompts, jax.random.fold_in(run.key, step))


def step_function(algorithm: str) -> Callable:
  return {"grpo": grpo_step, "ppo": ppo_step}.get(algorithm, supervised_step)


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def _evaluate(run: Run, state: Any) -> dict[str, float]:
  run.samples = []
  hook = run.experiment.evaluate
  results = hook(run, state) if hook is not None else default_evaluate(run, state)
  return {(k if k.startswith("eval/") else f"eval/{k}"): float(v) for k, v in results.items()}


def _save_final_model(run: Run, state: Any) -> str | None:
  model = nnx.merge(run.graphdef, state.params, state.frozen)
  if not isinstance(model, Transformer):
    return None
  from rljax.models.io import save_pretrained

  path = os.path.join(run.out_dir, "model")
  save_pretrained(model, run.tokenizer, path)  # LoRA: merged
  if lora_layers(model):
    save_adapter(model, os.path.join(path, ADAPTER_DIR),
                 base_model_name_or_path=run.config.model.path)
  return path


def frozen_base(config: ExperimentConfig) -> str:
  """Where a LoRA run's frozen base comes from (recorded in its checkpoints)."""
  m = config.model
  return m.path if m.path is not None else f"model.config (init_seed {m.init_seed})"


def summarize(records: list[dict], seconds: float, steps: int) -> dict[str, Any]:
  """{"steps", "seconds", "first": {...}, "last": {...}, "eval": {...}} of the key metrics;
  "eval" holds the evaluation of the last step."""
  train = [r for r in records if any(k in r for k in SUMMARY_KEYS)]
  pick = lambda r: {k: r[k] for k in SUMMARY_KEYS if k in r}  # noqa: E731
  final = next((r for r in reversed(records) if r["step"] == steps), {})
  evals = {k: v for k, v in final.items() if k.startswith("eval/") and isinstance(v, float)}
  return {"steps": steps, "seconds": round(seconds, 2),
          "first": pick(train[0]) if train else {}, "last": pick(train[-1]) if train else {},
          "eval": evals}


def _format_summary(summary: dict[str, Any]) -> str:
  lines = [f"rljax: {summary['steps']} steps in {summary['seconds']:.1f} s"]
  for key in summary["last"]:
    lines.append(f"  {key:16s} {summary['first'].get(key, float('nan')):.4g} → "
                 f"{summary['last'][key]:.4g}")
  for key, value in summary["eval"].items():
    lines.append(f"  {key:16s} {value:.4g}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Interruption.
# ----------------------------------------------------------------------------------------------


class RunInterrupted(Exception):
  """The run stopped at SIGINT / SIGTERM. `step` is its newest checkpoint (None: it has none,
  nothing to resume), from which `resume=True` continues; `exit_code` is the shell's 128 +
  the signal number (130 for SIGINT, 143 for SIGTERM)."""

  def __init__(self, signum: int, step: int | None, out_dir: str):
    self.signum, self.step, self.out_dir = int(signum), step, out_dir
    self.exit_code = 128 + self.signum
    name = signal.Signals(self.signum).name
    super().__init__(f"{name} before the first checkpoint; nothing to resume" if step is None
                     else f"{name}: stopped at step {step}, checkpoint saved in {out_dir}")


def _write_stderr(text: str) -> None:
  os.write(2, (text + "\n").encode())  # unbuffered: safe inside a signal handler


class StopRequests:
  """While active (a context manager; a no-op outside the main thread), the first SIGINT /
  SIGTERM only records `signum`, so the loop stops after the step in flight (Python runs
  handlers between XLA calls); a second one calls `exit(128 + signum)` at once (default
  `os._exit`: no cleanup), keeping the last complete checkpoint — orbax commits a step by an
  atomic rename, so a save cut short leaves nothing behind."""

  def __init__(self, *, exit: Callable[[int], Any] = os._exit,
               say: Callable[[str], None] = _write_stderr):
    self.signum: int | None = None
    self._exit, self._say = exit, say
    self._previous: dict[int, Any] = {}

  def handle(self, signum: int, frame: Any = None) -> None:
    del frame
    if self.signum is not None:
      self._say("rljax: second interrupt; exiting now (the last complete checkpoint is kept).")
      self._exit(128 + signum)
      return
    self.signum = signum
    self._say(f"rljax: {signal.Signals(signum).name}: stopping after the step in flight, then "
              "checkpointing (interrupt again to exit at once).")

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._previous[s] = signal.signal(s, self.handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def saved_steps(out_dir: str) -> list[int]:
  """The steps of the committed checkpoints of a run directory, ascending."""
  directory = os.path.join(out_dir, CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def train_loop(run: Run, state: Any, start_step: int, *, checkpointer: Checkpointer,
               logger: MetricsLogger, progress: Progress, stop: StopRequests, t0: float
               ) -> tuple[Any, int]:
  """Steps `start_step + 1 .. config.steps` (module docstring): log, evaluate (every
  `eval_every` steps and at the last), checkpoint (every `save_every` steps, at the last and
  when `stop` records a signal, after which it returns). Returns (state, the last step run)."""
  c, log = run.config, run.config.logging
  step_fn = step_function(c.algorithm)
  has_eval = bool(run.eval_batches) or run.experiment.evaluate is not None
  step = start_step
  for step in range(start_step + 1, c.steps + 1):
    batch = next(run.train_iter)
    with count_compiles() as compiles:
      state, metrics = step_fn(run, state, batch, step)
    metrics["compiles"] = compiles.count
    last = step == c.steps
    evaluated = has_eval and (last or (log.eval_every > 0 and step % log.eval_every == 0))
    if evaluated:
      metrics.update(_evaluate(run, state))
    if step % log.log_every == 0 or last or evaluated:
      logger.log(step, metrics, time=time.perf_counter() - t0)
    if evaluated:
      logger.log_samples(step, run.samples)
    progress.update(step, metrics)
    if last or stop.signum is not None or (log.save_every and step % log.save_every == 0):
      checkpointer.save(step, state, force=True, data_state={
        "iterator": run.train_iter.state_dict(), "step": step,
        "time": time.perf_counter() - t0})
    if stop.signum is not None:
      break
  return state, step


def _check_run_directory(out_dir: str, config: ExperimentConfig, resume: bool
                         ) -> dict[str, Any] | None:
  """Refuses a fresh run over checkpoints and a resume without any; the saved summary when
  resuming a run that has already finished."""
  steps = saved_steps(out_dir)
  if not resume and steps:
    raise ConfigError(f"{out_dir} already holds checkpoints (step {steps[-1]}); pass --resume to "
                      "continue that run or --out for a new directory.")
  if resume and not steps:
    raise ConfigError(f"nothing to resume in {out_dir}: it holds no checkpoint (a run saves one "
                      "every logging.save_every steps, when interrupted and at its last step); "
                      "start the run without --resume.")
  summary_path = os.path.join(out_dir, SUMMARY_FILE)
  if resume and steps[-1] >= config.steps and os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  return None


def run_experiment(target: str | ExperimentConfig | Experiment, overrides: Any = (), *,
                   resume: bool = False, out_dir: str | None = None) -> dict[str, Any]:
  """Runs an experiment end to end and returns its summary (also printed and written to
  `out_dir/summary.json`). See the module docstring for the loop and
  `rljax.experiment.config` for the experiment format.

  Raises:
    ConfigError: a bad config; `out_dir` already holds checkpoints and `resume` is False; or
      `resume` is True and it holds none.
    RunInterrupted: SIGINT / SIGTERM (after checkpointing the step in flight when it came
      during the loop).
  """
  exp = load_experiment(target, overrides)
  c = exp.config
  if out_dir is not None:
    exp.config = c = dataclasses.replace(c, logging=dataclasses.replace(c.logging,
                                                                        out_dir=out_dir))
  log = c.logging
  out_dir = os.path.abspath(log.out_dir)
  finished = _check_run_directory(out_dir, c, resume)
  if finished is not None:
    print(f"rljax: {out_dir} has already finished its {c.steps} steps; nothing to resume (its "
          f"summary: {os.path.join(out_dir, SUMMARY_FILE)}; raise `steps` to train on).")
    return finished
  if log.wandb is not None and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"logging.wandb={log.wandb!r} needs the wandb package: "
                      "pip install 'rljax[wandb]'.")
  os.makedirs(out_dir, exist_ok=True)
  if not resume:
    shutil.rmtree(os.path.join(out_dir, PREAMBLE_DIR), ignore_errors=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(to_jsonable(c), f, indent=1)
  try:
    return _run(exp, out_dir, resume)
  except KeyboardInterrupt:  # outside the loop (setup, the final model and plot)
    steps = saved_steps(out_dir)
    raise RunInterrupted(signal.SIGINT, steps[-1] if steps else None, out_dir) from None


def _run(exp: Experiment, out_dir: str, resume: bool) -> dict[str, Any]:
  c = exp.config
  log = c.logging
  run, state = setup(exp, out_dir)
  checkpointer = Checkpointer(os.path.join(out_dir, CHECKPOINTS_DIR), keep=log.keep,
                              metadata={"algorithm": c.algorithm},
                              frozen_base=frozen_base(c) if lora_layers(run.model) else None)
  start_step, elapsed = 0, 0.0
  if resume:
    state, data_state, _ = checkpointer.restore(state)
    run.train_iter.load_state_dict(data_state["iterator"])
    start_step, elapsed = int(data_state["step"]), float(data_state["time"])
  logger = MetricsLogger(out_dir, resume_step=start_step if resume else None,
                         tensorboard=log.tensorboard, wandb=log.wandb, config=to_jsonable(c))
  progress = Progress(c.steps, initial=start_step, enabled=log.progress)
  stop = StopRequests()
  t0 = time.perf_counter() - elapsed
  try:
    with stop:
      state, step = train_loop(run, state, start_step, checkpointer=checkpointer, logger=logger,
                               progress=progress, stop=stop, t0=t0)
      checkpointer.wait()
  finally:
    progress.close()
    logger.close()
    checkpointer.close()
  if stop.signum is not None:
    raise RunInterrupted(stop.signum, step, out_dir)
  seconds = time.perf_counter() - t0
  if log.save_model:
    _save_final_model(run, state)
  records = read_metrics(out_dir)
  if log.plot:
    plot_curves(records, os.path.join(out_dir, "curves.png"), title=f"{c.algorithm}: {exp.source}")
  summary = summarize(records, seconds, c.steps)
  with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=1)
  print(_format_summary(summary))
  return summary
