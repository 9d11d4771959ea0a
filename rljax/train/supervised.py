"""The supervised objectives' hyper-parameters: one typed, validated section per algorithm.

Each section holds the keyword options of one objective (the objective's own defaults are these
sections' defaults), checked when the section is built, so a misspelled option or an unknown
DPO variant fails before anything runs:

  algorithm      section            objective (options passed as keywords)
  sft            SFTConfig          `objectives.sft_loss`
  reward_model   RewardModelConfig  `reward_modeling.reward_pair_objective`
  dpo            DPOConfig          `objectives.dpo_objective` (every `dpo_loss` variant)
  kto            KTOConfig          `preference.kto_objective`
  orpo           ORPOConfig         `preference.orpo_objective`
  simpo          SimPOConfig        `preference.simpo_objective`
  cpo            CPOConfig          `preference.cpo_objective`

(modules of `rljax.train`).

`ExperimentConfig.objective` is the section of its algorithm (a YAML / JSON mapping is parsed
into it); `options(section)` gives the keywords, e.g.
`functools.partial(dpo_objective, **options(DPOConfig(beta=0.2, variant="ipo")))`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rljax.losses.dpo import check_dpo_options
from rljax.ops._checks import check_bool, check_int, check_number


def _check_chunk_size(section: Any) -> None:
  check_int("chunk_size", section.chunk_size, 1)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """`sft_loss`: chunk_size, positions per chunk of the fused log-prob computation (64)."""

  chunk_size: int = 64

  def __post_init__(self) -> None:
    _check_chunk_size(self)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """`reward_pair_objective` (Bradley–Terry): margin, one margin m >= 0 for every pair (None:
  0, or the batch's per-pair "margin"); center_coef, the centring coefficient c >= 0 (None: no
  centring term; TRL's `center_rewards_coefficient`, e.g. 0.01)."""

  margin: float | None = None
  center_coef: float | None = None

  def __post_init__(self) -> None:
    for name in ("margin", "center_coef"):
      check_number(name, getattr(self, name), optional=True)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """`dpo_objective`: DPO and its pairwise variants (`rljax.losses.dpo.dpo_loss`).

  Attributes:
    beta: β > 0 (0.1, TRL).
    variant: one of `rljax.losses.dpo.DPO_VARIANTS` ("sigmoid": DPO; "ipo", "robust", "hinge",
      ...).
    label_smoothing: ε of "sigmoid" (cDPO), "robust" ([0, 0.5)) and "exo_pair" ([0, 1)) (0.0).
    length_normalize: length-normalised IPO (variant "ipo"; False).
    nll_coef: α >= 0 on the chosen responses' NLL (RPO; 0.0).
    discopop_tau: τ > 0 of "discopop" (0.05).
    chunk_size: positions per chunk of the fused log-prob computation (64).
  """

  beta: float = 0.1
  variant: str = "sigmoid"
  label_smoothing: float = 0.0
  length_normalize: bool = False
  nll_coef: float = 0.0
  discopop_tau: float = 0.05
  chunk_size: int = 64

  def __post_init__(self) -> None:
    check_dpo_options(beta=self.beta, variant=self.variant, label_smoothing=self.label_smoothing,
                      discopop_tau=self.discopop_tau)
    check_bool("length_normalize", self.length_normalize)
    check_number("nll_coef", self.nll_coef)
    _check_chunk_size(self)


@dataclasses.dataclass(frozen=True)
class KTOConfig:
  """`kto_objective`: beta > 0 (0.1), desirable_weight and undesirable_weight >= 0 (1.0 each:
  TRL's), chunk_size (64)."""

  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  chunk_size: int = 64

  def __post_init__(self) -> None:
    check_number("beta", self.beta, low_open=True)
    for name in ("desirable_weight", "undesirable_weight"):
      check_number(name, getattr(self, name))
    _check_chunk_size(self)


@dataclasses.dataclass(frozen=True)
class ORPOConfig:
  """`orpo_objective`: beta, the paper's λ > 0 (0.1, TRL), chunk_size (64)."""

  beta: float = 0.1
  chunk_size: int = 64

  def __post_init__(self) -> None:
    check_number("beta", self.beta, low_open=True)
    _check_chunk_size(self)


@dataclasses.dataclass(frozen=True)
class SimPOConfig:
  """`simpo_objective`: beta > 0 (2.0) and the target margin gamma >= 0 (0.5), the SimPO
  paper's; chunk_size (64)."""

  beta: float = 2.0
  gamma: float = 0.5
  chunk_size: int = 64

  def __post_init__(self) -> None:
    check_number("beta", self.beta, low_open=True)
    check_number("gamma", self.gamma)
    _check_chunk_size(self)


@dataclasses.dataclass(frozen=True)
class CPOConfig:
  """`cpo_objective`: beta > 0 (0.1) and the NLL weight alpha >= 0 (1.0), TRL's; chunk_size
  (64)."""

  beta: float = 0.1
  alpha: float = 1.0
  chunk_size: int = 64

  def __post_init__(self) -> None:
    check_number("beta", self.beta, low_open=True)
    check_number("alpha", self.alpha)
    _check_chunk_size(self)


SUPERVISED_CONFIGS: dict[str, type] = {
  "sft": SFTConfig,
  "reward_model": RewardModelConfig,
  "dpo": DPOConfig,
  "kto": KTOConfig,
  "orpo": ORPOConfig,
  "simpo": SimPOConfig,
  "cpo": CPOConfig,
}


def options(section: Any) -> dict[str, Any]:
  """The objective's keyword arguments of a section (its fields)."""
  return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


__all__ = [
  "CPOConfig",
  "DPOConfig",
  "KTOConfig",
  "ORPOConfig",
  "RewardModelConfig",
  "SFTConfig",
  "SUPERVISED_CONFIGS",
  "SimPOConfig",
  "options",
]
