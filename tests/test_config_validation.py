"""Every config rejects a bad hyper-parameter at construction, with a ValueError naming the
field and the value (construction only: nothing is traced or compiled)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest

from rljax.experiment.config import (
  ConfigError, DataSection, ExperimentConfig, LoggingSection, ModelSection,
)
from rljax.models.config import ModelConfig
from rljax.parallel.mesh import MeshConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig
from rljax.train.objectives import dpo_objective, sft_loss
from rljax.train.onpolicy import UpdateConfig
from rljax.train.optim import OptimizerConfig
from rljax.train.ppo import PPOConfig
from rljax.train.preference import cpo_objective, kto_objective, orpo_objective, simpo_objective
from rljax.train.reward_modeling import reward_pair_objective
from rljax.train.supervised import (
  SUPERVISED_CONFIGS, CPOConfig, DPOConfig, KTOConfig, ORPOConfig, RewardModelConfig, SFTConfig,
  SimPOConfig, options,
)

NAN, INF = math.nan, math.inf
MODEL = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4)


def model_config(**kw):
  return ModelConfig(**{**MODEL, **kw})


# (constructor, field, bad value): every row must raise a ValueError naming field and value.
CASES = [
  *[(model_config, f, v) for f in ("vocab_size", "hidden_size", "intermediate_size",
                                   "num_layers", "num_heads", "max_position_embeddings")
    for v in (0, -1)],
  (model_config, "num_kv_heads", 0), (model_config, "num_kv_heads", 3),  # 4 heads: not divisible
  (model_config, "head_dim", 0), (model_config, "num_heads", 3),  # 16 % 3, no head_dim
  (model_config, "rms_norm_eps", 0.0), (model_config, "rms_norm_eps", -1e-6),
  (model_config, "rms_norm_eps", NAN), (model_config, "rope_theta", 0.0),
  (model_config, "rope_theta", INF), (model_config, "attention_block", 0),
  (model_config, "attention_softcap", 0.0), (model_config, "sliding_window", 0),
  (model_config, "qk_norm", 1), (model_config, "attention", "flash"),
  (model_config, "rope_scaling", {"rope_type": "linear", "factor": 0.0}),
  (model_config, "rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
  (OptimizerConfig, "learning_rate", INF), (OptimizerConfig, "learning_rate", NAN),
  (OptimizerConfig, "learning_rate", -1e-3), (OptimizerConfig, "b1", 1.5),
  (OptimizerConfig, "b1", 1.0), (OptimizerConfig, "b2", -0.1), (OptimizerConfig, "eps", -1e-8),
  (OptimizerConfig, "weight_decay", NAN), (OptimizerConfig, "max_grad_norm", 0.0),
  (OptimizerConfig, "warmup_steps", -1), (OptimizerConfig, "min_lr_ratio", 1.5),
  (OptimizerConfig, "total_steps", 0), (OptimizerConfig, "schedule", "exp"),
  (SamplingConfig, "top_k", 0), (SamplingConfig, "top_p", 0.0), (SamplingConfig, "top_p", 1.5),
  (SamplingConfig, "temperature", -1.0), (SamplingConfig, "temperature", INF),
  (SamplingConfig, "max_new_tokens", 0), (SamplingConfig, "rollout_dtype", "int8"),
  (UpdateConfig, "num_minibatches", 0), (UpdateConfig, "chunk_size", 0),
  (UpdateConfig, "agg", "mean"), (UpdateConfig, "peak_flops", 0.0),
  (UpdateConfig, "packing", "yes"),
  (GRPOConfig, "kl_coef", NAN), (GRPOConfig, "kl_coef", -0.1), (GRPOConfig, "clip_eps", -0.2),
  (GRPOConfig, "clip_eps_high", 0.0), (GRPOConfig, "clip_ratio_c", 1.0),
  (GRPOConfig, "tis_cap", 0.0), (GRPOConfig, "max_resample", -1),
  (GRPOConfig, "dynamic_sampling", "yes"), (GRPOConfig, "advantage", "gae"),
  (GRPOConfig, "nonfinite_rewards", "ignore"), (GRPOConfig, "kl_kind", "k4"),
  (PPOConfig, "kl_coef", NAN), (PPOConfig, "gamma", 1.5), (PPOConfig, "gamma", -0.1),
  (PPOConfig, "lam", NAN), (PPOConfig, "kl_target", 0.0), (PPOConfig, "kl_target", -1.0),
  (PPOConfig, "penalty_kl_target", 0.0), (PPOConfig, "clip_eps", -0.2),
  (PPOConfig, "value_clip", -0.2), (PPOConfig, "entropy_coef", INF),
  (PPOConfig, "whiten_advantages", 0), (PPOConfig, "nonfinite_rewards", "zero"),
  (MeshConfig, "data", 0),
  (SFTConfig, "chunk_size", 0), (DPOConfig, "beta", 0.0), (DPOConfig, "beta", NAN),
  (DPOConfig, "variant", "sigmod"), (DPOConfig, "label_smoothing", 1.5),
  (DPOConfig, "nll_coef", -1.0), (DPOConfig, "discopop_tau", 0.0),
  (DPOConfig, "length_normalize", "yes"), (KTOConfig, "beta", -0.1),
  (KTOConfig, "desirable_weight", -1.0), (ORPOConfig, "beta", INF),
  (SimPOConfig, "gamma", -0.5), (CPOConfig, "alpha", NAN),
  (RewardModelConfig, "center_coef", -0.01), (RewardModelConfig, "margin", NAN),
  (DataSection, "batch_size", 0), (DataSection, "eval_batch_size", 0),
  (DataSection, "max_length", 0), (DataSection, "buckets", ()), (DataSection, "buckets", (0,)),
  (DataSection, "kind", "chat"), (DataSection, "shuffle", None),
  (LoggingSection, "log_every", 0), (LoggingSection, "save_every", -1),
  (LoggingSection, "keep", 0), (LoggingSection, "seed", -1), (LoggingSection, "plot", "no"),
  (ModelSection, "dtype", "float16"), (ModelSection, "init_seed", -1),
  (ModelSection, "remat", "yes"), (ModelSection, "remat_policy", "all"),
  (ModelSection, "remat_group", 0), (ModelConfig, "remat_group", 0),
  (lambda **kw: ExperimentConfig("sft", **kw), "steps", 0),
  (lambda **kw: ExperimentConfig("sft", **kw), "num_microbatches", 0),
  (lambda **kw: ExperimentConfig("sft", **kw), "num_devices", 0),
  (lambda **kw: ExperimentConfig("sft", **kw), "compute_dtype", "fp8"),
]


def _build(make, field, value):
  if make is OptimizerConfig and field != "learning_rate":
    return make(1e-4, **{field: value})
  if make is ModelConfig:
    return model_config(**{field: value})
  return make(**{field: value})


@pytest.mark.parametrize("make,field,value", CASES,
                         ids=[f"{getattr(m, '__name__', 'ExperimentConfig')}.{f}={v!r}"
                              for m, f, v in CASES])
def test_bad_value_raises_naming_field_and_value(make, field, value):
  with pytest.raises(ValueError) as info:
    _build(make, field, value)
  message = str(info.value)
  assert field in message, message
  shown = repr(value["factor"]) if field == "rope_scaling" else repr(value)
  assert shown in message, message


def test_the_data_section_names_a_bucket_below_max_length():
  with pytest.raises(ConfigError, match=r"largest of `data.buckets` \(32\).*max_length.*64"):
    DataSection(max_length=64, buckets=(16, 32))
  assert DataSection(max_length=64, buckets=(64, 16)).buckets == (64, 16)  # order is free


def test_experiment_section_errors_are_config_errors():
  for make in (lambda: DataSection(batch_size=0), lambda: LoggingSection(keep=0),
               lambda: ModelSection(param_dtype="int8"), lambda: ExperimentConfig("sft", steps=0)):
    with pytest.raises(ConfigError):
      make()


def test_defaults_construct():
  for cls in (ModelSection, DataSection, LoggingSection, SamplingConfig, UpdateConfig,
              GRPOConfig, PPOConfig, *SUPERVISED_CONFIGS.values()):
    cls()
  for algorithm, cls in SUPERVISED_CONFIGS.items():
    assert ExperimentConfig(algorithm).objective == cls()
  assert ExperimentConfig("grpo").objective is None and ExperimentConfig("ppo").objective is None


OBJECTIVES = {"sft": sft_loss, "reward_model": reward_pair_objective, "dpo": dpo_objective,
              "kto": kto_objective, "orpo": orpo_objective, "simpo": simpo_objective,
              "cpo": cpo_objective}


@pytest.mark.parametrize("algorithm", sorted(OBJECTIVES))
def test_each_section_is_its_objectives_keyword_options(algorithm):
  """A section's fields are exactly the objective's options (all but `normalizer`), with the
  same defaults: the objective's keywords are declared and defaulted once."""
  params = {name: p.default for name, p in inspect.signature(OBJECTIVES[algorithm]).parameters
            .items() if p.kind is p.KEYWORD_ONLY and name != "normalizer"}
  assert options(SUPERVISED_CONFIGS[algorithm]()) == params


def test_objective_mappings_parse_into_the_algorithms_section():
  c = ExperimentConfig("dpo", objective={"beta": 0.2, "variant": "ipo"})
  assert c.objective == DPOConfig(beta=0.2, variant="ipo")
  with pytest.raises(ConfigError, match=r"unknown key 'varaint' in 'objective'.*variant"):
    ExperimentConfig("dpo", objective={"varaint": "ipo"})
  with pytest.raises(ConfigError, match="Unknown DPO `variant` 'sigmod'"):
    ExperimentConfig("dpo", objective={"variant": "sigmod"})
  with pytest.raises(ConfigError, match=r"objective.beta='0.1': expected float"):
    ExperimentConfig("kto", objective={"beta": "0.1"})
  with pytest.raises(ConfigError, match="'grpo' takes no `objective`"):
    ExperimentConfig("grpo", objective={"beta": 0.1})
  with pytest.raises(ConfigError, match="must be a KTOConfig"):
    ExperimentConfig("kto", objective=DPOConfig(beta=0.3))
  # A section left at its defaults follows the algorithm.
  assert dataclasses.replace(ExperimentConfig("dpo"), algorithm="kto").objective == KTOConfig()
