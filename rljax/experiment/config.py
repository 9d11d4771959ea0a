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
      path            Hugging Face / converted directory (config.json + safetensors), or a Hub
                      id such as "HuggingFaceTB/SmolLM2-135M-Instruct" (the huggingface_hub
                      cache; HF_HUB_OFFLINE=1 reads only the cache) (None)
      config          a `rljax.models.ModelConfig` to build a model from scratch (None); in
                      YAML/JSON a mapping of ModelConfig fields
      init_seed       parameter-initialisation seed of a from-scratch model (0)
      dtype, param_dtype  "float32" | "bfloat16" | None (the model's own)
      remat, remat_policy, remat_group  `ModelConfig`'s rematerialisation (a bool; "nothing" |
                      "dots"; layers per checkpoint, dividing the layers) for the training
                      passes, e.g. --set model.remat=true model.remat_group=2; None: the
                      model's own (None)
      critic_path     ppo: directory (or Hub id) of the reward model / critic backbone to
                      initialise the critic from (None: a copy of the policy backbone)
      lora            LoRASection: LoRA fine-tuning (`rljax.models.lora`), off by default
        rank            adapter rank r; 0 (default) trains every weight, e.g. --set
                        model.lora.rank=16 trains adapters on a frozen base
        alpha, dropout, use_rslora, target_modules  `LoRAConfig`'s (8.0, 0.0, False,
                        "all-linear"; targets among q, k, v, o, gate, up, down); dropout must
                        be 0 for grpo / ppo
        adapter_path    a PEFT adapter directory to start from (its config is used; the
                        on-policy reference is then base + this adapter) (None)
        critic          ppo: "full" (a fully trained critic) or "adapters" (its own adapters,
                        same options, on a frozen copy of the backbone; head in full) ("full")
        quantize        QLoRA: the policy's projections stored "nf4" or "int8" (block-wise
                        absmax, block 64, `rljax.models.quant`), dequantised on use (None)
                      With LoRA the reward model's head trains in full; checkpoints hold the
                      adapters (+ heads) only, with the base's fingerprints, and the final
                      model/ is the merged checkpoint plus the PEFT adapter in model/adapter.
    tokenizer       a directory path or Hub id (AutoTokenizer), a zero-argument callable
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
      max_length      longest prompt (+ response) in tokens, >= 1; longer rows are truncated
                      (None)
      buckets         static padded lengths, e.g. [32, 64]: non-empty, each >= 1, the largest
                      >= max_length (None: powers of two up to max_length when it is set, else
                      each batch's own longest row)
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
    stop_strings    grpo / ppo: strings that also end a completion (a multi-turn run's turn),
                    decoded by the tokenizer (`rljax.rollout.stops`), e.g. ["</answer>"] (None)
    objective       the supervised objective's typed section (`rljax.train.supervised`), one per
                    algorithm: sft `SFTConfig`, reward_model `RewardModelConfig` (margin,
                    center_coef), dpo `DPOConfig` (beta, variant, label_smoothing,
                    length_normalize, nll_coef, discopop_tau), kto `KTOConfig`, orpo
                    `ORPOConfig`, simpo `SimPOConfig`, cpo `CPOConfig` (each + chunk_size); in
                    YAML / JSON a mapping of its fields, e.g. {"beta": 0.1, "variant": "ipo"}
                    for dpo. A misspelled field or an unknown DPO variant fails at load.
                    grpo / ppo have none (None: the algorithm's defaults)
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
  build_environment(config, tokenizer) -> rljax.agents.Environment
      grpo / ppo: multi-turn rollouts in this environment (`grpo.multi_turn` /
      `ppo.multi_turn` its limits); the rewards are its own (no `reward`), the train and eval
      rows are the examples its `reset` takes ("prompt" and the row's other fields;
      data.chat=False, so that the prompt reaches it as written).
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
--set optimizer.learning_rate=3e-4 --set objective.beta=0.2`;
values parse as JSON first (ints, floats, true/false/null, lists, objects), then "None",
"True"/"False", else a plain string. An unknown key raises `ConfigError` listing the valid keys
at that level.

Checks, all before anything runs: every value of a config file or override is checked against
its field's declared type (an int is accepted for a float, a list for a tuple; `--set
logging.seed=abc` names the key, the value and the expected type), then each section validates
its values at construction (a `ConfigError` naming the field, the value and the valid range).
A missing experiment file or module is a one-line `ConfigError`. The "module:attr" strings of
`tokenizer`, `reward` and `data.train` / `data.eval` are imported at load, with the experiment
file's folder importable first (so `reward: mymodule:fn` finds mymodule.py next to it; a Python
experiment can import its neighbours too).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rljax.models.config import REMAT_POLICIES, ModelConfig
from rljax.models.lora import LoRAConfig
from rljax.models.quant import MODES as QUANT_MODES
from rljax.ops._checks import check_bool, check_choice, check_int
from rljax.parallel.mesh import MeshConfig
from rljax.train.grpo import GRPOConfig
from rljax.train.optim import OptimizerConfig
from rljax.train.ppo import PPOConfig
from rljax.train.supervised import SUPERVISED_CONFIGS

ALGORITHMS = ("sft", "reward_model", "dpo", "kto", "orpo", "simpo", "cpo", "grpo", "ppo")
DATA_KINDS = ("prompt", "sft", "preference", "kto", "ranked")
RULES = ("data", "fsdp", "fsdp_tp")
DTYPE_NAMES = ("float32", "bfloat16")  # model.dtype / model.param_dtype / compute_dtype
PACKED_ALGORITHMS = ("sft", "reward_model", "dpo", "kto", "orpo", "simpo", "cpo")
PACKED_KINDS = ("sft", "preference", "kto")
DEFAULT_KIND = {
  "sft": "sft", "reward_model": "preference", "dpo": "preference", "kto": "kto",
  "orpo": "preference", "simpo": "preference", "cpo": "preference", "grpo": "prompt",
  "ppo": "prompt",
}


class ConfigError(ValueError):
  """A bad experiment configuration or override (the message says which key and why)."""


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
  """Re-raises a section's `ValueError` (from the shared checks) as a `ConfigError`."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_dtype_name(name: str, value: Any) -> None:
  if value is not None:
    check_choice(f"`{name}`", value, DTYPE_NAMES)


LORA_CRITICS = ("full", "adapters")


@dataclasses.dataclass(frozen=True)
class LoRASection:
  """LoRA fine-tuning (`rljax.models.lora`; see the module docstring): off while `rank` is 0
  and no `adapter_path` is given. The defaults of the adapter options are `LoRAConfig`'s."""

  rank: int = 0
  alpha: float = LoRAConfig.alpha
  dropout: float = LoRAConfig.dropout
  use_rslora: bool = LoRAConfig.use_rslora
  target_modules: str | list[str] = LoRAConfig.target_modules
  adapter_path: str | None = None
  critic: str = "full"
  quantize: str | None = None

  def __post_init__(self) -> None:
    with config_errors():
      check_int("model.lora.rank", self.rank, 0)
      check_choice("`model.lora.critic`", self.critic, LORA_CRITICS)
      if self.quantize is not None:
        check_choice("`model.lora.quantize`", self.quantize, QUANT_MODES)
      if self.rank > 0 and self.adapter_path is not None:
        raise ValueError("model.lora: give `rank` (new adapters) or `adapter_path` (a PEFT "
                         "adapter, whose own config is used), not both.")
    if self.rank > 0:
      try:
        self.lora_config()
      except ValueError as e:
        raise ConfigError(f"model.lora: {e}") from None

  @property
  def enabled(self) -> bool:
    return self.rank > 0 or self.adapter_path is not None

  def lora_config(self) -> LoRAConfig:
    """The `LoRAConfig` of new adapters (rank > 0)."""
    targets = self.target_modules
    return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                      use_rslora=self.use_rslora,
                      target_modules=tuple(targets) if isinstance(targets, list) else targets)


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """Where the policy comes from (see the module docstring)."""

  path: str | None = None
  config: ModelConfig | None = None
  init_seed: int = 0
  dtype: str | None = None
  param_dtype: str | None = None
  remat: bool | None = None
  remat_policy: str | None = None
  remat_group: int | None = None
  critic_path: str | None = None
  lora: LoRASection = dataclasses.field(default_factory=LoRASection)

  def __post_init__(self) -> None:
    with config_errors():
      check_int("model.init_seed", self.init_seed, 0)
      for name in ("dtype", "param_dtype"):
        _check_dtype_name(f"model.{name}", getattr(self, name))
      check_bool("model.remat", self.remat, optional=True)
      if self.remat_policy is not None:
        check_choice("`model.remat_policy`", self.remat_policy, REMAT_POLICIES)
      check_int("model.remat_group", self.remat_group, 1, optional=True)

  @property
  def remat_overrides(self) -> dict[str, Any]:
    """The `ModelConfig` fields `remat`, `remat_policy`, `remat_group` that are set."""
    return {name: getattr(self, name) for name in ("remat", "remat_policy", "remat_group")
            if getattr(self, name) is not None}


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
    with config_errors():
      if self.kind is not None:
        check_choice("`data.kind`", self.kind, DATA_KINDS)
      check_int("data.batch_size", self.batch_size, 1)
      for name in ("eval_batch_size", "max_length"):
        check_int(f"data.{name}", getattr(self, name), 1, optional=True)
      for name in ("chat", "packing"):
        check_bool(f"data.{name}", getattr(self, name), optional=True)
      check_bool("data.shuffle", self.shuffle)
      if self.buckets is not None:
        check_buckets(self.buckets, self.max_length)


def check_buckets(buckets: Any, max_length: int | None) -> None:
  """ValueError unless `buckets` is a non-empty sequence of ints >= 1 whose largest is at least
  `max_length` (when given), so that every row fits a bucket."""
  if isinstance(buckets, (str, bytes)) or not isinstance(buckets, collections.abc.Sequence) \
      or not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                            for b in buckets):
    raise ValueError(f"`data.buckets` must be None or a non-empty list of ints >= 1; got "
                     f"{buckets!r}.")
  if max_length is not None and max(buckets) < max_length:
    raise ValueError(f"the largest of `data.buckets` ({max(buckets)}) is below `data.max_length` "
                     f"({max_length}); rows that long would fit no bucket.")


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
    with config_errors():
      for name, minimum in (("log_every", 1), ("eval_every", 0), ("save_every", 0), ("keep", 2),
                            ("samples", 0), ("seed", 0)):
        check_int(f"logging.{name}", getattr(self, name), minimum)
      for name in ("tensorboard", "progress", "plot", "save_model"):
        check_bool(f"logging.{name}", getattr(self, name))
    if self.wandb is not None and not (isinstance(self.wandb, str) and self.wandb):
      raise ConfigError(f"logging.wandb must be a W&B project name or None; got {self.wandb!r}.")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """The whole experiment (schema in the module docstring)."""

  algorithm: str
  steps: int = 100
  model: ModelSection = ModelSection()
  tokenizer: Any = None
  data: DataSection = DataSection()
  reward: Any = None
  stop_strings: tuple[str, ...] | None = None
  objective: Any = None
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
    with config_errors():
      for name in ("steps", "eval_k", "num_microbatches"):
        check_int(name, getattr(self, name), 1)
      check_int("num_devices", self.num_devices, 1, optional=True)
      _check_dtype_name("compute_dtype", self.compute_dtype)
    object.__setattr__(self, "objective", objective_section(self.algorithm, self.objective))
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


def objective_section(algorithm: str, objective: Any) -> Any:
  """The typed objective section of `algorithm` (`rljax.train.supervised`) from `objective`:
  None (the defaults), a mapping of its fields (YAML / JSON / --set), or the section itself.
  grpo / ppo have none (their options are the `grpo` / `ppo` sections): None or {}.

  A section of another algorithm left at its defaults (e.g. after `--set algorithm=kto`) is
  replaced by this algorithm's defaults; one with options set is an error."""
  cls = SUPERVISED_CONFIGS.get(algorithm)
  if cls is None:
    if objective is None or (isinstance(objective, Mapping) and not objective):
      return None
    raise ConfigError(f"algorithm {algorithm!r} takes no `objective` section (its options are "
                      f"`{algorithm}.*`); got {objective!r}.")
  if objective is None:
    return cls()
  if isinstance(objective, Mapping):
    return from_dict(cls, objective, path="objective")
  if isinstance(objective, cls):
    return objective
  others = tuple(SUPERVISED_CONFIGS.values())
  if isinstance(objective, others) and objective == type(objective)():
    return cls()
  raise ConfigError(f"`objective` of algorithm {algorithm!r} must be a {cls.__name__} or a "
                    f"mapping of its fields; got {objective!r}.")


# ----------------------------------------------------------------------------------------------
# Mappings → dataclasses, each value checked against its field's declared type.
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


_MISMATCH = object()


def _conform(annotation: Any, value: Any) -> Any:
  """`value` as a field of type `annotation` holds it (an int for a float becomes a float, a
  list for a tuple a tuple), or `_MISMATCH`. Annotations it does not know are not checked."""
  if annotation is Any or annotation is object:
    return value
  if annotation is None or annotation is type(None):
    return None if value is None else _MISMATCH
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    for arg in args:
      out = _conform(arg, value)
      if out is not _MISMATCH:
        return out
    return _MISMATCH
  if origin is typing.Literal:
    return value if value in args else _MISMATCH
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is bool:
    return value if isinstance(value, bool) else _MISMATCH
  if annotation is int:
    return value if is_number and isinstance(value, int) else _MISMATCH
  if annotation is float:
    return float(value) if is_number else _MISMATCH
  if annotation is str:
    return value if isinstance(value, str) else _MISMATCH
  container = origin or annotation
  if container in (tuple, list):
    if not isinstance(value, (list, tuple)):
      return _MISMATCH
    if not args:
      return container(value)
    if container is list or (len(args) == 2 and args[1] is Ellipsis):
      items = [args[0]] * len(value)
    elif len(args) == len(value):
      items = list(args)
    else:
      return _MISMATCH
    out = [_conform(a, v) for a, v in zip(items, value)]
    return _MISMATCH if any(o is _MISMATCH for o in out) else container(out)
  if container is dict:
    return value if isinstance(value, Mapping) else _MISMATCH
  if container is collections.abc.Callable:
    return value if callable(value) else _MISMATCH
  if isinstance(annotation, type):
    return value if isinstance(value, annotation) else _MISMATCH
  return value


def _type_name(annotation: Any) -> str:
  if isinstance(annotation, type):
    return annotation.__name__
  return str(annotation).replace("typing.", "").replace("NoneType", "None")


def check_type(annotation: Any, value: Any, key: str) -> Any:
  """`value` conformed to the field type `annotation` (see `_conform`); else a `ConfigError`
  naming the key, the value and the expected type."""
  out = _conform(annotation, value)
  if out is _MISMATCH:
    raise ConfigError(f"{key}={value!r}: expected {_type_name(annotation)}, got "
                      f"{type(value).__name__}.")
  return out


def _field_value(annotation: Any, value: Any, key: str) -> Any:
  """A field's value from a config file or override: a mapping for a section becomes that
  section (`from_dict`), anything else is type-checked."""
  sub = _dataclass_type(annotation)
  if sub is not None and isinstance(value, Mapping):
    return from_dict(sub, value, path=key)
  return check_type(annotation, value, key)


def from_dict(cls: type, mapping: Mapping[str, Any], *, path: str = "") -> Any:
  """Builds dataclass `cls` from a (nested) mapping; unknown keys, values of the wrong type and
  values the section rejects raise `ConfigError`."""
  if not isinstance(mapping, Mapping):
    raise ConfigError(f"'{path or cls.__name__}' must be a mapping; got {type(mapping).__name__}.")
  hints = _field_types(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for key, value in mapping.items():
    if key not in names:
      raise _unknown(path, key, names)
    kwargs[key] = _field_value(hints[key], value, f"{path}.{key}" if path else key)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
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


def _set(obj: Any, keys: list[str], value: Any, path: str, text: str | None = None) -> Any:
  """`obj` with the field at `keys` set to `value` (`text`: the override as typed, used where
  the field is a string and `value` parsed as something else, e.g. --set logging.out_dir=2024)."""
  key, rest = keys[0], keys[1:]
  child = f"{path}.{key}" if path else key
  if isinstance(obj, dict):
    if not rest:
      return {**obj, key: value}
    if key not in obj:
      raise _unknown(path, key, list(obj))
    return {**obj, key: _set(obj[key], rest, value, child, text)}
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
      if isinstance(obj, ExperimentConfig) and key == "objective":
        raise ConfigError(f"cannot set '{child}.{rest[0]}': algorithm {obj.algorithm!r} has no "
                          f"objective section (its options are {obj.algorithm}.*).")
      if sub is None:
        raise ConfigError(f"cannot set '{child}.{rest[0]}': '{child}' is None.")
      raise ConfigError(f"'{child}' is None; set the whole section, e.g. --set "
                        f"{child}='{{...}}' with the fields of {sub.__name__}.")
    new = _set(current, rest, value, child, text)
  elif text is not None and _conform(hints[key], value) is _MISMATCH \
      and _conform(hints[key], text) is not _MISMATCH:
    new = text
  else:
    new = _field_value(hints[key], value, child)
  try:
    return dataclasses.replace(obj, **{key: new})
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--set {child}: {e}") from None


def apply_overrides(config: ExperimentConfig, overrides: list[str] | Mapping[str, Any]
                    ) -> ExperimentConfig:
  """Returns `config` with each "a.b.c=value" (or mapping entry) applied in order; each value
  is checked against the declared type of its field before any section is rebuilt.

  Raises:
    ConfigError: a malformed override, an unknown key (the valid keys at that level are
      listed), a value of the wrong type (key, value and expected type named), or a value the
      section rejects.
  """
  items = [(k, v, None) for k, v in overrides.items()] if isinstance(overrides, Mapping) else [
    _split_override(o) for o in overrides]
  for key, value, text in items:
    config = _set(config, key.split("."), value, "", text)
  return config


def _split_override(text: str) -> tuple[str, Any, str]:
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key=value (e.g. logging.seed=1).")
  key, value = text.split("=", 1)
  if not key.strip():
    raise ConfigError(f"override {text!r} has an empty key.")
  return key.strip(), parse_value(value), value


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
  build_environment: Callable | None = None
  source: str = ""


HOOKS = ("build_model", "build_reward", "build_critic", "evaluate", "build_environment")
MAPPING_SUFFIXES = (".json", ".yaml", ".yml")
# The fields that may name a callable as "module:attr" (resolved next to the experiment file).
CALLABLE_FIELDS = (("tokenizer",), ("reward",), ("data", "train"), ("data", "eval"))


@contextlib.contextmanager
def _importable_from(folder: str | None) -> Iterator[None]:
  """`folder` first on `sys.path` for the duration (as Python does for a script's folder)."""
  if folder is None:
    yield
    return
  sys.path.insert(0, folder)
  try:
    yield
  finally:
    sys.path.remove(folder)


def _load_module(target: str) -> types.ModuleType:
  """The module of an experiment file (its folder importable while it runs) or module name."""
  import importlib.util

  if os.path.isfile(target):
    name = "rljax_experiment_" + os.path.splitext(os.path.basename(target))[0]
    spec = importlib.util.spec_from_file_location(name, target)
    if spec is None or spec.loader is None:
      raise ConfigError(f"cannot load {target!r} as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _importable_from(os.path.dirname(os.path.abspath(target))):
      spec.loader.exec_module(module)
    return module
  if target.endswith(".py") or os.sep in target:
    raise ConfigError(f"experiment file {target!r} does not exist.")
  try:
    return importlib.import_module(target)
  except ModuleNotFoundError as e:
    if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
      raise ConfigError(f"experiment {target!r} is neither a file nor an importable module.") \
        from None
    raise


def load_mapping(path: str) -> dict[str, Any]:
  """The mapping of a .json / .yaml / .yml experiment file."""
  if not os.path.isfile(path):
    raise ConfigError(f"experiment file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}.") from None
  try:
    import yaml
  except ImportError:
    raise ConfigError(f"{path}: YAML experiments need PyYAML (`pip install pyyaml`); "
                      "or write the same fields as JSON.") from None
  try:
    return yaml.safe_load(text) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: invalid YAML: {e}") from None


def load_experiment(target: str | ExperimentConfig | Experiment,
                    overrides: list[str] | Mapping[str, Any] = ()) -> Experiment:
  """Loads a Python file / module name / JSON / YAML experiment and applies overrides.

  "module:attr" strings of `tokenizer`, `reward`, `data.train` and `data.eval` are imported
  here, with the experiment file's folder importable (so `reward: mymodule:fn` finds
  mymodule.py next to the experiment), so a missing module fails before anything runs. The
  config keeps the strings (config.json records them as written); the builders resolve them
  later from `sys.modules`, where this import left the module.
  """
  folder = None
  if isinstance(target, Experiment):
    exp = dataclasses.replace(target)
  elif isinstance(target, ExperimentConfig):
    exp = Experiment(config=target, source="<config>")
  elif target.endswith(MAPPING_SUFFIXES):
    exp = Experiment(config=from_dict(ExperimentConfig, load_mapping(target)), source=target)
    folder = os.path.dirname(os.path.abspath(target))
  else:
    module = _load_module(target)
    config = getattr(module, "config", None)
    if not isinstance(config, ExperimentConfig):
      raise ConfigError(f"{target} must define `config = ExperimentConfig(...)`; "
                        f"got {type(config).__name__}.")
    hooks = {h: getattr(module, h, None) for h in HOOKS}
    exp = Experiment(config=config, source=target, **hooks)
    if os.path.isfile(target):
      folder = os.path.dirname(os.path.abspath(target))
  exp.config = apply_overrides(exp.config, overrides)
  import_references(exp.config, folder)
  return exp


def import_references(config: ExperimentConfig, folder: str | None = None) -> None:
  """Imports the module of each "module:attr" string in `config`'s `CALLABLE_FIELDS` (`folder`,
  the experiment's, importable first); raises `ConfigError` naming the field if one fails."""
  for keys in CALLABLE_FIELDS:
    section = config if len(keys) == 1 else getattr(config, keys[0])
    resolve_callable(getattr(section, keys[-1]), ".".join(keys), folder)


def is_reference(value: Any) -> bool:
  """Whether `value` is a "module:attr" string (not a path such as "/data/x.jsonl")."""
  return isinstance(value, str) and ":" in value and not value.startswith(("/", ".")) \
    and not os.path.exists(value)


def resolve_callable(value: Any, what: str, folder: str | None = None) -> Any:
  """A "module:attr" string → that attribute (`folder` importable first); anything else
  unchanged."""
  if not is_reference(value):
    return value
  module, _, attr = value.partition(":")
  with _importable_from(folder):
    try:
      return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      where = f" (looked next to the experiment, in {folder}, first)" if folder else ""
      raise ConfigError(f"{what}: cannot import {value!r}{where}: {e}.") from None


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
