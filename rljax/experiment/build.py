"""Building the pieces of a run from its config: tokenizer, model, datasets, reward function."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from rljax.data.batching import bucket_sizes, collator
from rljax.data.iterator import BatchIterator
from rljax.data.packing import PackedBatchIterator, add_kl_completions
from rljax.data.jsonl import read_jsonl
from rljax.data.tokenize import tokenize_dataset
from rljax.experiment.config import ConfigError, Experiment, ExperimentConfig, resolve_callable
from rljax.models.heads import RewardModel, ValueModel
from rljax.models.adapters import load_adapter
from rljax.models.io import load_pretrained, resolve_model_dir
from rljax.models.lora import add_lora, lora_config_of
from rljax.models.quant import quantize_base
from rljax.models.transformer import Transformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}


def _pretrained(path: str, what: str, **kwargs: Any) -> Any:
  """`load_pretrained(path)`'s model; its ValueError (no such directory or Hub id, a damaged
  file) as a one-line `ConfigError` naming the field."""
  try:
    model, _ = load_pretrained(path, **kwargs)
  except ValueError as e:
    raise ConfigError(f"{what}: {e}") from None
  return model


def dtype_of(name: str | None, what: str) -> Any:
  if name not in DTYPES:
    raise ConfigError(f"{what} must be one of {list(DTYPES)}; got {name!r}.")
  return DTYPES[name]


def build_tokenizer(config: ExperimentConfig) -> Any:
  """`config.tokenizer` (path / callable / "module:attr"), else the one saved with the model."""
  spec = resolve_callable(config.tokenizer, "tokenizer")
  if callable(spec):
    return spec()
  path = spec if spec is not None else config.model.path
  if path is None:
    raise ConfigError("no tokenizer: set `tokenizer` (a path or a callable) or `model.path`.")
  try:
    path = resolve_model_dir(path)
  except ValueError as e:
    raise ConfigError(f"tokenizer: {e}") from None
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_policy(config: ExperimentConfig) -> Transformer:
  m = config.model
  if (m.path is None) == (m.config is None):
    raise ConfigError("give exactly one of `model.path` (a pretrained directory) and "
                      "`model.config` (a ModelConfig to train from scratch), or a build_model hook.")
  if m.path is not None:
    return _pretrained(m.path, "model.path", dtype=dtype_of(m.dtype, "model.dtype"),
                       param_dtype=dtype_of(m.param_dtype, "model.param_dtype"),
                       **m.remat_overrides)
  try:
    config = m.config.replace(**m.remat_overrides)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None
  return Transformer(config, rngs=nnx.Rngs(m.init_seed))


def build_model(exp: Experiment, tokenizer: Any) -> nnx.Module:
  """The trained module: the policy, or a `RewardModel` for algorithm "reward_model"."""
  config = exp.config
  if exp.build_model is not None:
    return with_lora(config, exp.build_model(config, tokenizer))
  policy = _load_policy(config)
  if config.algorithm == "reward_model":
    policy = RewardModel.from_policy(policy, rngs=nnx.Rngs(config.model.init_seed + 1))
  return with_lora(config, policy)


def with_lora(config: ExperimentConfig, model: nnx.Module) -> nnx.Module:
  """`model` with the adapters of `model.lora` (new ones, or a PEFT adapter's), or unchanged
  when LoRA is off."""
  lora = config.model.lora
  if not lora.enabled:
    return model
  try:
    if lora.quantize is not None:
      quantize_base(model, lora.quantize)
    if lora.adapter_path is not None:
      load_adapter(model.backbone if isinstance(model, RewardModel) else model,
                   lora.adapter_path)
      return model
    return add_lora(model, lora.lora_config(), rngs=nnx.Rngs(config.model.init_seed + 3))
  except ValueError as e:
    raise ConfigError(f"model.lora: {e}") from None


def build_critic(exp: Experiment, policy: Transformer) -> ValueModel:
  """The PPO critic: the hook, a copy of `model.critic_path`'s backbone, or of the policy's."""
  config = exp.config
  if exp.build_critic is not None:
    return exp.build_critic(config, policy)
  rngs = nnx.Rngs(config.model.init_seed + 2)
  if config.model.critic_path is not None:
    critic = ValueModel.from_policy(_pretrained(config.model.critic_path, "model.critic_path",
                                                    **config.model.remat_overrides),
                                    rngs=rngs)
  else:
    critic = ValueModel.from_policy(policy, rngs=rngs)  # the base backbone, not the adapters
  lora = lora_config_of(policy)
  if lora is not None and config.model.lora.critic == "adapters":
    if config.model.lora.quantize is not None:
      quantize_base(critic, config.model.lora.quantize)
    add_lora(critic, lora, rngs=nnx.Rngs(config.model.init_seed + 4))
  return critic


def build_reward(exp: Experiment, tokenizer: Any) -> Callable:
  """The grpo / ppo reward: the hook, a callable, "module:attr", or a `rljax.rewards` name."""
  if exp.build_reward is not None:
    return exp.build_reward(exp.config, tokenizer)
  spec = resolve_callable(exp.config.reward, "reward")
  if isinstance(spec, str):
    import rljax.rewards

    if not callable(getattr(rljax.rewards, spec, None)):
      raise ConfigError(f"reward {spec!r} is not a function of rljax.rewards "
                        f"({', '.join(rljax.rewards.__all__)}) nor a 'module:attr' string.")
    spec = getattr(rljax.rewards, spec)
  if not callable(spec):
    raise ConfigError(f"algorithm {exp.config.algorithm!r} needs `reward` (a callable "
                      "fn(prompts, completions, **fields)) or a build_reward hook.")
  return spec


def load_rows(spec: Any, what: str) -> list[dict]:
  """Rows of a dataset spec: a JSONL path, a list of rows, or a callable returning them."""
  spec = resolve_callable(spec, what)
  if callable(spec):
    spec = spec()
  if isinstance(spec, (str, os.PathLike)):
    return read_jsonl(spec)
  if not isinstance(spec, (list, tuple)):
    raise ConfigError(f"{what} must be a JSONL path, a list of rows or a callable returning "
                      f"rows; got {type(spec).__name__}.")
  return list(spec)


# Tokens that end a chat turn before the tokenizer's eos: Gemma's chat template closes every turn
# with `<end_of_turn>` (generation_config's eos_token_id [1, 106] = <eos>, <end_of_turn>).
END_OF_TURN_TOKENS = ("<end_of_turn>",)


def stop_tokens_of(tokenizer: Any, model_config: Any = None) -> list[int]:
  """The ids a completion stops on: the tokenizer's eos, the model config's eos ids (a list for
  Gemma 3), and the end-of-turn tokens of `END_OF_TURN_TOKENS` the vocabulary has; each once,
  in that order.

  Raises:
    ConfigError: none at all (no eos, no end-of-turn token).
  """
  ids: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
  eos = getattr(model_config, "eos_token_id", None)
  ids += eos if isinstance(eos, (list, tuple)) else [eos]
  vocab = tokenizer.get_vocab()
  ids += [vocab.get(token) for token in END_OF_TURN_TOKENS]
  stops = list(dict.fromkeys(int(i) for i in ids if i is not None))
  if not stops:
    raise ConfigError("the tokenizer has no eos_token_id and no end-of-turn token: generation "
                      "would never stop")
  return stops


def pad_id_of(tokenizer: Any) -> int:
  pad = getattr(tokenizer, "pad_token_id", None)
  return int(pad if pad is not None else tokenizer.eos_token_id)


def _records(config: ExperimentConfig, tokenizer: Any, spec: Any, what: str) -> list[dict]:
  d = config.data
  kwargs = {} if d.chat is None else {"chat": d.chat}
  records, _ = tokenize_dataset(tokenizer, load_rows(spec, what), config.data_kind,
                                max_length=d.max_length, **kwargs)
  return records


def _collate(config: ExperimentConfig, tokenizer: Any):
  d = config.data
  buckets = d.buckets
  if buckets is None and d.max_length is not None:
    buckets = bucket_sizes(d.max_length)
  return collator(config.data_kind, pad_id=pad_id_of(tokenizer), buckets=buckets)


def packed_iterator(config: ExperimentConfig, tokenizer: Any,
                    records: list[dict]) -> PackedBatchIterator:
  """Packed training batches (`data.packing`): `batch_size` rows of max_length tokens per
  sequence a record holds (KTO records get their KL completions first)."""
  kind = config.data_kind
  if kind == "kto":
    records = add_kl_completions(records, max_length=config.data.max_length)
  per_record = 1 if kind == "sft" else 2
  return PackedBatchIterator(records, kind=kind, row_length=per_record * config.data.max_length,
                             num_rows=config.data.batch_size, pad_id=pad_id_of(tokenizer),
                             seed=config.logging.seed, shuffle=config.data.shuffle)


def train_iterator(config: ExperimentConfig, tokenizer: Any) -> BatchIterator | PackedBatchIterator:
  """Endless, seeded, resumable batches of the training set (packed when `config.packs`)."""
  if config.data.train is None:
    raise ConfigError("data.train is required.")
  records = _records(config, tokenizer, config.data.train, "data.train")
  if config.packs:
    return packed_iterator(config, tokenizer, records)
  return BatchIterator(records, config.data.batch_size, seed=config.logging.seed,
                       shuffle=config.data.shuffle, collate=_collate(config, tokenizer))


def eval_batches(config: ExperimentConfig, tokenizer: Any) -> list[Any]:
  """All batches of the held-out set, in order (the last one may be smaller); [] without one."""
  if config.data.eval is None:
    return []
  records = _records(config, tokenizer, config.data.eval, "data.eval")
  size = config.data.eval_batch_size or config.data.batch_size
  it = BatchIterator(records, min(size, len(records)), seed=0, shuffle=False, drop_last=False,
                     collate=_collate(config, tokenizer), num_epochs=1)
  return list(it)
