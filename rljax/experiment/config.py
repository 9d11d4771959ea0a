"""Experiment configuration: one frozen dataclass tree, loadable from Python, YAML or JSON.

An experiment is

  * a Python file (or dotted module name) that defines a module-level `config`, an
    `ExperimentConfig`, plus optional hooks (below) for the parts that are code; or
  * a YAML (needs PyYAML) or JSON file whose mapping has the same field names as
    `ExperimentConfig` (nested mappings for the sections; unknown keys are errors).

Run it with `rljax train <experiment> [--set a.b=value ...] [--resume] [--out DIR]`.

The schema (defaults in parentheses; every field can be overridden with `--set`):

  ExperimentConfig
    algorithm       "sft" | "reward_model" | "dpo" | "kto" | "orpo" | "simpo" | "cpo" | "grpo" |
                    "ppo"  (required)
    steps           number of steps (100); a step is one optimizer update for the supervised
                    algorithms, one `trainer.step` (rollout + updates) for grpo / ppo
    model           ModelSection
      path            Hugging Face / converted directory (config.json + safetensors) (None)
      config          a `rljax.models.ModelConfig` to build a model from scratch (None); in
                      YAML/JSON a mapping of ModelConfig fields
      init_seed       parameter-initialisation seed of a from-scratch model (0)
      dtype, param_dtype  "float32" | "bfloat16" | None (the model's own)
      critic_path     ppo: directory of the reward model / critic backbone to initialise the
                      critic from (None: a copy of the policy backbone)
    tokenizer       a directory path (AutoTokenizer, local files only), a zero-argument callable
                    returning a tokenizer, or a "module:attr" string naming such a callable;
                    None: the tokenizer stored with `model.path`
    data            DataSection
      train, eval     each: a JSONL path, a list of dict rows, a zero-argument callable returning
                      rows, or a "module:attr" string naming such a callable (None)
      kind            rows format for `rljax.data.tokenize_dataset` ("prompt", "sft",
                      "preference", "kto", "ranked"); None: from the algorithm (sft → "sft",
                      reward_model / dpo / orpo / simpo / cpo → "preference", kto → "kto",
                      grpo / ppo → "prompt")
      batch_size      rows (prompts for grpo / ppo; pairs for the preference family) per step (8)
      eval_batch_size rows per evaluation batch (None: batch_size)
      max_length      longest prompt (+ response) in tokens; longer rows are truncated (None)
      buckets         static padded lengths, e.g. [32, 64] (None: powers of two up to
                      max_length when it is set, else each batch's own longest row)
      chat            apply the tokenizer's chat template to prompts (None: auto)
      shuffle         reshuffle every epoch (True)
      packing         pack several records per row (`rljax.data.packing`; sft, reward_model and
                      the dpo family): True, False, or None (auto: pack when `max_length` is set
                      and `buckets` is not — packing needs the static row length max_length
                      gives, and explicit buckets ask for padded batches). Packed, a batch is
                      `batch_size` rows of T = max_length tokens (2·max_length for pairs and
                      KTO, whose records hold two sequences), TRL's convention, filled by
                      first-fit decreasing in data order, so a step trains on a fixed token
                      budget instead of a fixed number of records; the runner logs each batch's
                      `padding_fraction`. Evaluation batches stay padded. (None)
    reward          grpo / ppo: host reward function `fn(prompts, completions, **fields) ->
                    float32 [B]`, a "module:attr" string naming one, or the name of a
                    `rljax.rewards` function taking no configuration ("math_answer_reward")
    objective       dict of keyword arguments for the supervised objective, e.g. {"beta": 0.1,
                    "variant": "ipo"} for dpo, {"center_coef": 0.01} for reward_model ({})
    grpo            `rljax.train.GRPOConfig` (sampling.num_samples, sampling.max_new_tokens,
                    kl_coef, update.num_epochs, ...) (defaults)
    ppo             `rljax.train.PPOConfig` (defaults)
    optimizer       `rljax.train.OptimizerConfig` (learning_rate=1e-5, schedule, warmup, ...)
    critic_optimizer  ppo: `OptimizerConfig` of the critic (None: same as `optimizer`)
    mesh            `rljax.parallel.MeshConfig` (data=-1, fsdp=1, tensor=1, context=1; context
                    > 1 splits rows along T: context parallelism); used when the run has more
                    than one device (ppo runs unsharded)
    num_devices     use the first N devices (None: all); 1 runs without a mesh
    rules           logical-axis rule set: "data" | "fsdp" | "fsdp_tp" ("data")
    num_microbatches  gradient accumulation of the supervised step (1)
    compute_dtype   forward/backward dtype of the supervised step, "bfloat16" or None (None)
    eval_k          k of pass@k in the default grpo / ppo evaluation (1: greedy accuracy only)
    compiler_options  XLA options of the jitted steps, e.g. {"xla_backend_optimization_level":
                    0} for fast CPU tests ({})
    logging         LoggingSection
      out_dir         run directory: metrics.jsonl, samples.jsonl, tensorboard/,
                      checkpoints/, preamble/, model/, curves.png, summary.json
                      ("runs/experiment")
      log_every       write metrics every N steps (1)
      eval_every      evaluate every N steps; there is always an evaluation at the last step
                      when the run has an eval set or an `evaluate` hook; 0: only there (0)
      save_every      checkpoint every N steps; 0: only when interrupted (SIGINT / SIGTERM) and
                      at the last step (0)
      keep            checkpoints kept, >= 2 (2)
      seed            seed of the train state RNG, the data order and the rollouts (0)
      samples         sample completions (prompt, completion, reward) of the grpo / ppo
                      evaluation written to samples.jsonl and TensorBoard, per evaluation (4)
      tensorboard     also write TensorBoard events when tensorboardX is installed (True)
      wandb           Weights & Biases project to log to (`pip install rljax[wandb]`); a
                      resumed run continues the same W&B run (None: off)
      progress        console progress bar (True)
      plot            write curves.png at the end when matplotlib is installed (True)
      save_model      write the final model as a Hugging Face directory `out_dir/model`
                      (policy models only) (True)

Hooks (optional module-level functions of a Python experiment; each replaces a default):

  build_model(config, tokenizer) -> nnx.Module
      the policy (or the `RewardModel` for reward_model) instead of `config.model`; an
      expensive stage inside it (e.g. SFT before GRPO) wrapped in
      `rljax.experiment.stage.cached_stage` runs once per run, not again on --resume.
  build_reward(config, tokenizer) -> reward_fn
      the grpo / ppo reward (e.g. a learned reward model) instead of `config.reward`.
  build_critic(config, policy) -> ValueModel
      the ppo critic instead of `ValueModel.from_policy` / `model.critic_path`.
  evaluate(run, state) -> dict[str, float]
      evaluation every `eval_every` steps; `run` is the `rljax.experiment.runner.Run` (config,
      graphdef, tokenizer, trainer, eval batches, ...). Default: sft → held-out NLL;
      reward_model → held-out pair accuracy; grpo / ppo → greedy accuracy (+ pass@k) through
      `trainer.evaluate` on the eval prompts; dpo family → held-out reward accuracy.

Example (experiments/my_task.py):

  >>> from rljax.experiment.config import ExperimentConfig, DataSection, LoggingSection, ...
  >>> config = ExperimentConfig(
  ...   algorithm="grpo", steps=50,
  ...   model=ModelSection(path="runs/my_task_sft/model"),
  ...   data=DataSection(train=make_prompts, eval=make_eval_prompts, batch_size=16),
  ...   reward=exact_answer, grpo=GRPOConfig(sampling=SamplingConfig(num_samples=8,
  ...                                                                max_new_tokens=8), kl_coef=0.0),
  ...   optimizer=OptimizerConfig(1e-4), logging=LoggingSection(out_dir="runs/my_task_grpo"))

Overrides: `--set logging.save_every=10 --set grpo.kl_coef=0.0 --set grpo.sampling.temperature=0.7
--set optimizer.learning_rate=3e-4`;
values parse as JSON first (ints, floats, true/false/null, lists, objects), then "None",
"True"/"False", else a plain string. An unknown key raises `ConfigError` listing the valid keys
at that level.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from rljax.models.config import ModelConfig
from rljax.parallel.mesh import MeshConfig
from rljax.train.grpo import GRPOConfig
from rljax.train.optim import OptimizerConfig
from rljax.train.ppo import PPOConfig

ALGORITHMS = ("sft", "reward_model", "dpo", "kto", "orpo", "simpo", "cpo", "grpo", "ppo")
DATA_KINDS = ("prompt", "sft", "preference", "kto", "ranked")
RULES = ("data", "fsdp", "fsdp_tp")
PACKED_ALGORITHMS = ("sft", "reward_model", "dpo", "kto", "orpo", "simpo", "cpo")
PACKED_KINDS = ("sft", "preference", "kto")
DEFAULT_KIND = {
  "sft": "sft", "reward_model": "preference", "dpo": "preference", "kto": "kto",
  "orpo": "preference", "simpo": "preference", "cpo": "preference", "grpo": "prompt",
  "ppo": "prompt",
}


class ConfigError(ValueError):
  """A bad experiment configuration or override (the message says which key and why)."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """Where the policy comes from (see the module docstring)."""

  path: str | None = None
  config: ModelConfig | None = None
  init_seed: int = 0
  dtype: str | None = None
  param_dtype: str | None = None
  critic_path: str | None = None


@dataclasses.dataclass(frozen=True)
class DataSection:
  """Datasets and batching (see the module docstring)."""

  train: Any = None
  eval: Any = None
  kind: str | None = None
  batch_size: int = 8
  eval_batch_size: int | None = None
  max_length: int | None = None
  buckets: tuple[int, ...] | None = None
  chat: bool | None = None
  shuffle: bool = True
  packing: bool | None = None

  def __post_init__(self) -> None:
    if self.packing is not None and not isinstance(self.packing, bool):
      raise ConfigError(f"data.packing must be True, False or None; got {self.packing!r}.")
    if self.kind is not None and self.kind not in DATA_KINDS:
      raise ConfigError(f"data.kind must be one of {list(DATA_KINDS)} or None; got {self.kind!r}.")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ConfigError(f"data.batch_size must be an int >= 1; got {self.batch_size!r}.")


@dataclasses.dataclass(frozen=True)
class LoggingSection:
  """Run directory, logging / evaluation / checkpoint intervals, samples, W&B and the seed."""

  out_dir: str = "runs/experiment"
  log_every: int = 1
  eval_every: int = 0
  save_every: int = 0
  keep: int = 2
  seed: int = 0
  samples: int = 4
  tensorboard: bool = True
  wandb: str | None = None
  progress: bool = True
  plot: bool = True
  save_model: bool = True

  def __post_init__(self) -> None:
    minimum = {"log_every": 1, "eval_every": 0, "save_every": 0, "keep": 2, "samples": 0}
    for name, low in minimum.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"logging.{name} must be an int >= {low}; got {value!r}.")
    if not isinstance(self.seed, int) or isinstance(self.seed, bool):
      raise ConfigError(f"logging.seed must be an int; got {self.seed!r}.")
    if self.wandb is not None and not (isinstance(self.wandb, str) and self.wandb):
      raise ConfigError(f"logging.wandb must be a W&B project name or None; got {self.wandb!r}.")
    for name in ("tensorboard", "progress", "plot", "save_model"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"logging.{name} must be True or False; got {getattr(self, name)!r}.")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """The whole experiment (schema in the module docstring)."""

  algorithm: str
  steps: int = 100
  model: ModelSection = ModelSection()
  tokenizer: Any = None
  data: DataSection = DataSection()
  reward: Any = None
  objective: dict = dataclasses.field(default_factory=dict)
  grpo: GRPOConfig = GRPOConfig()
  ppo: PPOConfig = PPOConfig()
  optimizer: OptimizerConfig = OptimizerConfig(1e-5)
  critic_optimizer: OptimizerConfig | None = None
  mesh: MeshConfig = MeshConfig()
  rules: str = "data"
  num_devices: int | None = None
  num_microbatches: int = 1
  compute_dtype: str | None = None
  eval_k: int = 1
  compiler_options: dict = dataclasses.field(default_factory=dict)
  logging: LoggingSection = LoggingSection()

  def __post_init__(self) -> None:
    if self.algorithm not in ALGORITHMS:
      raise ConfigError(f"algorithm must be one of {list(ALGORITHMS)}; got {self.algorithm!r}.")
    if self.rules not in RULES:
      raise ConfigError(f"rules must be one of {list(RULES)}; got {self.rules!r}.")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ConfigError(f"steps must be an int >= 1; got {self.steps!r}.")
    if not isinstance(self.eval_k, int) or self.eval_k < 1:
      raise ConfigError(f"eval_k must be an int >= 1; got {self.eval_k!r}.")
    if self.data.packing:
      if self.algorithm not in PACKED_ALGORITHMS or self.data_kind not in PACKED_KINDS:
        raise ConfigError(f"data.packing=True needs an algorithm of {list(PACKED_ALGORITHMS)} "
                          f"on data.kind {list(PACKED_KINDS)}; got {self.algorithm!r} on "
                          f"{self.data_kind!r}.")
      if self.data.max_length is None:
        raise ConfigError("data.packing=True needs data.max_length (the packed row length).")

  @property
  def packs(self) -> bool:
    """Whether the training batches are packed (`data.packing`, or its auto rule)."""
    if self.data.packing is not None:
      return self.data.packing
    return (self.algorithm in PACKED_ALGORITHMS and self.data_kind in PACKED_KINDS
            and self.data.max_length is not None and self.data.buckets is None)

  @property
  def data_kind(self) -> str:
    """The rows format of the datasets (`data.kind`, or the algorithm's default)."""
    return self.data.kind or DEFAULT_KIND[self.algorithm]


# ----------------------------------------------------------------------------------------------
# Mappings → dataclasses.
# ----------------------------------------------------------------------------------------------


def _dataclass_type(annotation: Any) -> type | None:
  """The dataclass type inside an annotation like `X`, `X | None`, `Optional[X]`."""
  if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
    return annotation
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    for arg in typing.get_args(annotation):
      found = _dataclass_type(arg)
      if found is not None:
        return found
  return None


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _unknown(path: str, key: str, valid: list[str]) -> ConfigError:
  where = f"in '{path}'" if path else "at the top level"
  return ConfigError(f"unknown key '{key}' {where}; valid keys: {', '.join(sorted(valid))}.")


def _coerce(annotation: Any, value: Any) -> Any:
  """Lists → tuples for tuple-typed fields (JSON/YAML have no tuples)."""
  if isinstance(value, list):
    origins = {typing.get_origin(annotation)} | {
      typing.get_origin(a) for a in typing.get_args(annotation)}
    if tuple in origins:
      return tuple(value)
  return value


def from_dict(cls: type, mapping: Mapping[str, Any], *, path: str = "") -> Any:
  """Builds dataclass `cls` from a (nested) mapping; unknown keys raise `ConfigError`."""
  if not isinstance(mapping, Mapping):
    raise ConfigError(f"'{path or cls.__name__}' must be a mapping; got {type(mapping).__name__}.")
  hints = _field_types(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for key, value in mapping.items():
    if key not in names:
      raise _unknown(path, key, names)
    sub = _dataclass_type(hints[key])
    child = f"{path}.{key}" if path else key
    if sub is not None and isinstance(value, Mapping):
      value = from_dict(sub, value, path=child)
    kwargs[key] = _coerce(hints[key], value)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f"'{path or cls.__name__}': {e}") from None


# ----------------------------------------------------------------------------------------------
# Overrides.
# ----------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
  """An override's value: JSON (int, float, bool, null, list, object), else None / True /
  False spelled the Python way, else the string itself."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    pass
  return {"None": None, "True": True, "False": False}.get(text, text)


def _set(obj: Any, keys: list[str], value: Any, path: str) -> Any:
  key, rest = keys[0], keys[1:]
  child = f"{path}.{key}" if path else key
  if isinstance(obj, dict):
    if not rest:
      return {**obj, key: value}
    if key not in obj:
      raise _unknown(path, key, list(obj))
    return {**obj, key: _set(obj[key], rest, value, child)}
  if not dataclasses.is_dataclass(obj):
    raise ConfigError(f"cannot set '{child}': '{path}' is a {type(obj).__name__}, not a section.")
  hints = _field_types(type(obj))
  names = [f.name for f in dataclasses.fields(obj)]
  if key not in names:
    raise _unknown(path, key, names)
  current = getattr(obj, key)
  if rest:
    if current is None:
      sub = _dataclass_type(hints[key])
      if sub is None:
        raise ConfigError(f"cannot set '{child}.{rest[0]}': '{child}' is None.")
      raise ConfigError(f"'{child}' is None; set the whole section, e.g. --set "
                        f"{child}='{{...}}' with the fields of {sub.__name__}.")
    new = _set(current, rest, value, child)
  else:
    sub = _dataclass_type(hints[key])
    new = from_dict(sub, value, path=child) if sub is not None and isinstance(value, Mapping) \
      else _coerce(hints[key], value)
  try:
    return dataclasses.replace(obj, **{key: new})
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--set {child}: {e}") from None


def apply_overrides(config: ExperimentConfig, overrides: list[str] | Mapping[str, Any]
                    ) -> ExperimentConfig:
  """Returns `config` with each "a.b.c=value" (or mapping entry) applied in order.

  Raises:
    ConfigError: a malformed override, an unknown key (the valid keys at that level are
      listed), or a value the section rejects.
  """
  items = overrides.items() if isinstance(overrides, Mapping) else [
    _split_override(o) for o in overrides]
  for key, value in items:
    config = _set(config, key.split("."), value, "")
  return config


def _split_override(text: str) -> tuple[str, Any]:
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key=value (e.g. logging.seed=1).")
  key, value = text.split("=", 1)
  if not key.strip():
    raise ConfigError(f"override {text!r} has an empty key.")
  return key.strip(), parse_value(value)


# ----------------------------------------------------------------------------------------------
# Loading experiments.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Experiment:
  """A loaded experiment: its config and the hooks its module defines (None when absent)."""

  config: ExperimentConfig
  build_model: Callable | None = None
  build_reward: Callable | None = None
  build_critic: Callable | None = None
  evaluate: Callable | None = None
  source: str = ""


HOOKS = ("build_model", "build_reward", "build_critic", "evaluate")


def _load_module(target: str) -> types.ModuleType:
  import importlib.util
  import os
  import sys

  if os.path.isfile(target):
    name = "rljax_experiment_" + os.path.splitext(os.path.basename(target))[0]
    spec = importlib.util.spec_from_file_location(name, target)
    if spec is None or spec.loader is None:
      raise ConfigError(f"cannot load {target!r} as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
  return importlib.import_module(target)


def load_mapping(path: str) -> dict[str, Any]:
  """The mapping of a .json / .yaml / .yml experiment file."""
  with open(path) as f:
    text = f.read()
  if path.endswith(".json"):
    return json.loads(text)
  try:
    import yaml
  except ImportError:
    raise ConfigError(f"{path}: YAML experiments need PyYAML (`pip install pyyaml`); "
                      "or write the same fields as JSON.") from None
  return yaml.safe_load(text) or {}


def load_experiment(target: str | ExperimentConfig | Experiment,
                    overrides: list[str] | Mapping[str, Any] = ()) -> Experiment:
  """Loads a Python file / module name / JSON / YAML experiment and applies overrides."""
  if isinstance(target, Experiment):
    exp = dataclasses.replace(target)
  elif isinstance(target, ExperimentConfig):
    exp = Experiment(config=target, source="<config>")
  elif target.endswith((".json", ".yaml", ".yml")):
    exp = Experiment(config=from_dict(ExperimentConfig, load_mapping(target)), source=target)
  else:
    module = _load_module(target)
    config = getattr(module, "config", None)
    if not isinstance(config, ExperimentConfig):
      raise ConfigError(f"{target} must define `config = ExperimentConfig(...)`; "
                        f"got {type(config).__name__}.")
    hooks = {h: getattr(module, h, None) for h in HOOKS}
    exp = Experiment(config=config, source=target, **hooks)
  exp.config = apply_overrides(exp.config, overrides)
  return exp


def resolve_callable(value: Any, what: str) -> Any:
  """A "module:attr" string → that attribute; anything else unchanged."""
  if isinstance(value, str) and ":" in value and not value.startswith(("/", ".")):
    module, _, attr = value.partition(":")
    try:
      return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError(f"{what}: cannot import {value!r} ({e}).") from None
  return value


def to_jsonable(value: Any) -> Any:
  """The config as JSON-able data (callables by their qualified name), for logs/checkpoints."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    if len(value) > 20 and all(isinstance(v, Mapping) for v in value):
      return f"<{len(value)} rows>"
    return [to_jsonable(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  name = getattr(value, "__qualname__", None) or type(value).__qualname__
  return f"<{getattr(value, '__module__', '?')}.{name}>"
