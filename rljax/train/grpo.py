"""The GRPO family as a trainer: G samples per prompt → rewards → group advantages → clipped updates.

One `GRPOTrainer.step(state, prompts)` runs the `OnPolicyTrainer` loop with these hooks:

  collect   G completions per prompt (contiguous rows), scored on the host by OUTCOME
            supervision (one reward per completion) or, with `advantage="process"`, PROCESS
            supervision (the reward function returns `rljax.rewards.StepRewards`: one reward per
            reasoning step, at the token where the step ends); optional DAPO soft overlong
            penalty; optional dynamic sampling (`rljax.train.dynamic_sampling`);
  prepare   ref_logp from `state.extras["reference"]` when kl_coef > 0 (log-probs only);
            old_logp by the trainer's own forward pass only when the batch sees more than one
            update or TIS needs it (otherwise the update uses stop_gradient(logp): ratio 1, no
            extra pass); advantages (`config.advantage`);
  update    grpo (PPO clip, optional dual clip), gspo (sequence ratio) or cispo (clipped
            IS-weighted REINFORCE), plus kl_coef · agg(KL̂(π_θ‖π_ref)) in the LOSS.

Process supervision (Shao et al. 2024, §4.1.3). Every step reward of a group is normalised by the
mean and std of all step rewards of that group, and a token's advantage is the sum of the
normalised rewards of the steps ending at or after it. A row's score — for `reward_mean`,
accuracy and `evaluate` — is the sum of its step rewards. The DAPO overlong penalty is added to
the reward at a row's last completion token (which becomes a step end).

Truncated importance sampling (`use_rollout_logprobs=True`). An inference engine's log-probs
differ from the trainer's for the same parameters (kernels, precision). Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training" (verl's TIS,
`tis_imp_ratio_cap`) correct the policy-gradient term of each token by
    w_t = min(exp(old_logp_t − rollout_logp_t), tis_cap)        (stop-gradient)
where old_logp is the trainer's recomputed log-prob at the sampling parameters and rollout_logp
the sampler's. The PPO ratio keeps the trainer's old_logp as denominator (so it is still 1 at the
first iteration). Because w_t > 0 is a constant, w·max(−A·r, −A·clip(r)) = max(−(wA)·r,
−(wA)·clip(r)): the weight is applied by scaling the token advantages; the KL term is not
weighted (as verl).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from rljax.losses.policy import cispo_loss, gspo_loss, ppo_clip_loss
from rljax.ops._checks import (
  check_bool, check_choice, check_int, check_number, clamped_exp, where_valid,
)
from rljax.ops.advantages import (
  grpo_advantages,
  grpo_process_advantages,
  reinforce_pp_advantages,
  reinforce_pp_baseline_advantages,
  rloo_advantages,
  token_level_rewards,
)
from rljax.ops.kl import kl_penalty
from rljax.ops.masking import aggregate, masked_mean
from rljax.agents.rollout import MultiTurnConfig
from rljax.rollout.engine import EngineConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.dynamic_sampling import collect_streamed, sample_informative
from rljax.train.experience import Experience, check_experience, experience_from_rollout
from rljax.train.forward import completion_logprobs
from rljax.train.normalizers import agg_count, rescale_to_normalizer
from rljax.train.onpolicy import (
  KL_KINDS,
  OnPolicyTrainer,
  UpdateConfig,
  check_engine,
  check_multi_turn,
  check_training_sampling,
  resolve_update,
)
from rljax.train.scoring import NONFINITE_REWARDS
from rljax.train.state import TrainState
from rljax.train.step import apply_gradients, make_grad_fn

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "process")
# Each loss's own clip range (ε_low, ε_high), used where the config leaves it None.
CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (0.2, 0.28)}
LOSSES = tuple(CLIP_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Hyper-parameters of the GRPO family (defaults: DeepSeekMath GRPO as in TRL / verl).

  Attributes:
    sampling: `SamplingConfig`; `num_samples` is the group size G (8, >= 2); temperature > 0.
    engine: `EngineConfig` of the continuous-batching rollout engine (default sizes); None
      samples with the static `generate` (the same rollouts, every row decoded to the longest).
      On a mesh the rollout is `generate`'s.
    multi_turn: `rljax.agents.MultiTurnConfig`, the turns' limits when the trainer has an
      `environment` (multi-turn rollouts through the engine; ignored without one).
    update: `UpdateConfig` (epochs — GRPO's μ, default 1 —, minibatches, microbatches, chunk
      size, agg — default "seq-mean-token-mean", the GRPO paper).
    kl_coef: β of the KL to the reference, a term of the LOSS, β·agg(KL̂) (0.04, DeepSeekMath);
      0 drops the term and the reference forward pass.
    kl_kind: `kl_penalty` estimator of that KL ("k3").
    loss: "grpo" (PPO clip), "gspo" (sequence ratio) or "cispo" (clipped IS-weighted
      REINFORCE).
    clip_eps, clip_eps_high: clip range; None takes the loss's own (`CLIP_DEFAULTS`: grpo
      0.2 / 0.2, gspo 3e-4 / 4e-4, cispo 0.2 / 0.28). DAPO's clip-higher: clip_eps_high=0.28.
    clip_ratio_c: dual-clip constant c > 1 for negative advantages (loss "grpo"; None: off).
    advantage: "grpo", "dr_grpo" (no std), "rloo", "reinforce_pp" (batch-whitened returns of the
      outcome reward, γ = 1), "reinforce_pp_baseline" (group mean baseline, batch-whitened) —
      outcome supervision, the reward fn returns float32 [B] — or "process" (process
      supervision, `grpo_process_advantages`): the reward fn returns `rljax.rewards.StepRewards`.
      A reward of the other kind raises ValueError.
    dynamic_sampling: drop zero-variance groups and refill by resampling (DAPO; False). On the
      engine a stream: a prompt whose group is uninformative gets its next group at once,
      into free slots of the same run (`collect_streamed`); with `generate` or an environment,
      whole extra rollouts (`sample_informative`).
    max_resample: extra groups per prompt (engine) or extra rollouts per step (3).
    overlong_cache: DAPO's soft overlong penalty interval L_cache (`soft_overlong_penalty`);
      None disables it. overlong_factor: its scale (1.0).
    use_rollout_logprobs: apply truncated importance sampling from the sampler's log-probs.
    tis_cap: the TIS truncation C (2.0, verl's `tis_imp_ratio_cap` example).
    nonfinite_rewards: a non-finite reward from `reward_fn` "raise"s a ValueError naming the
      rows (default), or with "drop" every row of its group is dropped from the step
      (`rljax.train.scoring.drop_rows`) and counted in the `dropped_rows` metric.
  """

  sampling: SamplingConfig = SamplingConfig(num_samples=8)
  update: UpdateConfig = UpdateConfig()
  engine: EngineConfig | None = EngineConfig()
  multi_turn: MultiTurnConfig = MultiTurnConfig()
  kl_coef: float = 0.04
  kl_kind: str = "k3"
  loss: str = "grpo"
  clip_eps: float | None = None
  clip_eps_high: float | None = None
  clip_ratio_c: float | None = None
  advantage: str = "grpo"
  dynamic_sampling: bool = False
  max_resample: int = 3
  overlong_cache: int | None = None
  overlong_factor: float = 1.0
  use_rollout_logprobs: bool = False
  tis_cap: float = 2.0
  nonfinite_rewards: str = "raise"

  def __post_init__(self) -> None:
    check_engine(self.engine)
    check_multi_turn(self.multi_turn)
    check_training_sampling(self.sampling, min_samples=2)
    resolve_update(self, num_epochs=1, agg="seq-mean-token-mean")
    check_choice("`advantage`", self.advantage, ADVANTAGES)
    check_choice("`loss`", self.loss, LOSSES)
    check_choice("`kl_kind`", self.kl_kind, KL_KINDS)
    check_choice("`nonfinite_rewards`", self.nonfinite_rewards, NONFINITE_REWARDS)
    check_number("kl_coef", self.kl_coef)
    for name in ("clip_eps", "clip_eps_high"):
      check_number(name, getattr(self, name), low_open=True, optional=True)
    if self.clip_ratio_c is not None:
      if self.loss != "grpo":
        raise ValueError(f"`clip_ratio_c` (dual clip) applies to loss 'grpo'; got loss "
                         f"{self.loss!r}.")
      check_number("clip_ratio_c", self.clip_ratio_c, low=1.0, low_open=True)
    for name in ("dynamic_sampling", "use_rollout_logprobs"):
      check_bool(name, getattr(self, name))
    check_int("max_resample", self.max_resample, 0)
    check_number("tis_cap", self.tis_cap, low_open=True)
    check_number("overlong_factor", self.overlong_factor)
    if self.overlong_cache is not None:
      check_int("overlong_cache", self.overlong_cache, 1)
      if self.overlong_cache > self.sampling.max_new_tokens:
        raise ValueError(f"`overlong_cache` must be in [1, sampling.max_new_tokens = "
                         f"{self.sampling.max_new_tokens}]; got {self.overlong_cache!r}.")

  @property
  def clip_range(self) -> tuple[float, float]:
    """(ε_low, ε_high) of the chosen loss: the config's values, else the loss's own."""
    low, high = CLIP_DEFAULTS[self.loss]
    low = low if self.clip_eps is None else self.clip_eps
    if self.clip_eps_high is not None:
      high = self.clip_eps_high
    elif self.clip_eps is not None:
      high = self.clip_eps  # a symmetric range when only ε is given
    return low, high

  @property
  def recompute_old_logp(self) -> bool:
    """Whether `prepare` runs the old-policy forward pass (several updates per batch, or TIS)."""
    return not self.update.single_pass or self.use_rollout_logprobs

  @classmethod
  def dr_grpo(cls, **kw: Any) -> GRPOConfig:
    """Dr. GRPO (Liu et al. 2025): no std normalisation, `seq-mean-token-sum-norm`, β = 0."""
    update = dataclasses.replace(kw.pop("update", UpdateConfig()), agg="seq-mean-token-sum-norm")
    return cls(**{"advantage": "dr_grpo", "kl_coef": 0.0, "update": update, **kw})

  @classmethod
  def dapo(cls, **kw: Any) -> GRPOConfig:
    """DAPO (Yu et al. 2025): clip 0.2 / 0.28, token-mean, no KL, dynamic sampling, soft
    overlong penalty over the last quarter of `max_new_tokens`."""
    sampling = kw.get("sampling", cls.sampling)
    update = dataclasses.replace(kw.pop("update", UpdateConfig()), agg="token-mean")
    return cls(**{"clip_eps": 0.2, "clip_eps_high": 0.28, "kl_coef": 0.0, "update": update,
                  "dynamic_sampling": True,
                  "overlong_cache": max(1, sampling.max_new_tokens // 4), **kw})

  @classmethod
  def gspo(cls, **kw: Any) -> GRPOConfig:
    """GSPO (Zheng et al. 2025): sequence-level ratio, clip 3e-4 / 4e-4 (its own), β = 0."""
    return cls(**{"loss": "gspo", "kl_coef": 0.0, **kw})


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kind", "group_size"))
def token_advantages(scores, loss_mask, *, kind: str, group_size: int, step_rewards=None,
                     step_mask=None):
  """[B, N] token advantages (0 outside the loss mask; no gradient).

  kind "process" reads `step_rewards` / `step_mask` ([B, N], `Scored.step_rewards`) instead of
  `scores`; the other kinds read `scores` [B].
  """
  mask = loss_mask.astype(jnp.float32)
  if kind == "process":
    adv = grpo_process_advantages(step_rewards, step_mask, mask, group_size=group_size)
  elif kind in ("grpo", "dr_grpo"):
    adv = grpo_advantages(scores, group_size=group_size, normalize_std=kind == "grpo")
  elif kind == "rloo":
    adv = rloo_advantages(scores, group_size=group_size)
  elif kind == "reinforce_pp":
    adv = reinforce_pp_advantages(token_level_rewards(scores, mask), mask, gamma=1.0)
  else:
    adv = reinforce_pp_baseline_advantages(scores, mask, group_size=group_size)
  return jax.lax.stop_gradient(where_valid(adv[:, None] if adv.ndim == 1 else adv, mask))


@functools.partial(jax.jit, static_argnames=("cap",))
def tis_weighted(advantages, loss_mask, old_logp, rollout_logp, *, cap: float):
  """(advantages · w, mean w) with the truncated importance weight of the sampler's log-probs,
  w = min(exp(old_logp − rollout_logp), cap), token by token (no gradient)."""
  mask = loss_mask.astype(jnp.float32)
  advantages, old_logp, rollout_logp = (where_valid(x, mask)
                                        for x in (advantages, old_logp, rollout_logp))
  weight = jnp.minimum(clamped_exp(old_logp - rollout_logp), cap)
  return jax.lax.stop_gradient(advantages * weight), masked_mean(weight, mask)


def check_reward_kind(scored: Any, advantage: str) -> None:
  """ValueError unless `scored` holds step rewards exactly when `advantage` is "process"."""
  if advantage == "process" and scored.step_rewards is None:
    raise ValueError(
      'GRPOConfig(advantage="process") needs a `reward_fn` that returns StepRewards (per-step '
      "rewards and step ends, [B, N]; see `rljax.rewards.process_reward`); it returned one "
      "float per completion.")
  if advantage != "process" and scored.step_rewards is not None:
    raise ValueError(
      f"GRPOConfig(advantage={advantage!r}) needs one reward per completion, but `reward_fn` "
      'returned StepRewards; use GRPOConfig(advantage="process") for process supervision.')


def grpo_objective(model: Any, batch: Experience, *, normalizer=None, config: GRPOConfig
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The per-(micro)batch loss: policy forward + the chosen surrogate + kl_coef·agg(KL̂).

    L = agg(ℓ_surrogate) + β · agg(KL̂(π_θ‖π_ref))
  with old_logp = stop_gradient(logp) when `batch.old_logp` is None (single pass). With
  `normalizer` (the full batch's `agg_count`) the loss is this microbatch's share
  (`rescale_to_normalizer`). For loss "grpo" this is `rljax.losses.grpo_loss` (plus the dual
  clip when `clip_ratio_c` is set).
  """
  c, u = config, config.update
  mask = batch.loss_mask
  logp, entropy = completion_logprobs(model, batch, temperature=c.sampling.temperature,
                                      chunk_size=u.chunk_size, return_entropy=True,
                                      entropy_grad=False)  # logged only
  old = jax.lax.stop_gradient(logp) if batch.old_logp is None else batch.old_logp
  low, high = c.clip_range
  segments = batch.segments  # packed rows: per-sequence terms by segment
  if c.loss == "grpo":
    loss, metrics = ppo_clip_loss(logp, old, batch.advantages, mask, clip_eps=low,
                                  clip_eps_high=high, clip_ratio_c=c.clip_ratio_c, agg=u.agg,
                                  **segments)
  else:
    fn = gspo_loss if c.loss == "gspo" else cispo_loss
    loss, metrics = fn(logp, old, batch.advantages, mask, clip_eps=low, clip_eps_high=high,
                       agg=u.agg, **segments)
  if c.kl_coef > 0:
    kl = kl_penalty(where_valid(logp, mask), where_valid(batch.ref_logp, mask), kind=c.kl_kind)
    loss = loss + c.kl_coef * aggregate(kl, mask, u.agg, **segments)
    metrics = dict(metrics, kl=jax.lax.stop_gradient(masked_mean(kl, mask)))
  metrics = dict(metrics, entropy=jax.lax.stop_gradient(masked_mean(entropy, mask)))
  count = agg_count(mask, u.agg, **segments)
  return rescale_to_normalizer(loss, count, normalizer), metrics


def make_grpo_update(graphdef: Any, optimizer: Any, config: GRPOConfig):
  """The pure `update(state, batch: Experience) -> (state, metrics)` of the GRPO family:
  exact gradient accumulation over `update.num_microbatches`, then one optimizer step
  (skipped when non-finite)."""
  agg = config.update.agg
  grad_fn = make_grad_fn(functools.partial(grpo_objective, config=config), graphdef,
                         count_fn=lambda b: agg_count(b.loss_mask, agg, **b.segments),
                         num_microbatches=config.update.num_microbatches)
  required = ("advantages",) + (("ref_logp",) if config.kl_coef > 0 else ())

  def update(state: TrainState, batch: Experience):
    check_experience(batch, required=required)
    loss, grads, metrics = grad_fn(state.params, state.frozen, batch)
    state, update_metrics = apply_gradients(state, grads, loss, optimizer)
    return state, {**metrics, "loss": loss, **update_metrics}

  return update


# ----------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------


class GRPOTrainer(OnPolicyTrainer):
  """Runs GRPO-family steps for a policy given as (graphdef, TrainState).

  Args:
    graphdef, optimizer: the policy's graphdef and optax transformation (`create_train_state`).
    config: `GRPOConfig`.
    reward_fn: host callable `fn(prompts, completions, **fields) -> float32 [B]` (also offered
      prompt_tokens / completion_tokens / completion_mask / completion_lengths keywords), or
      `StepRewards` for `advantage="process"`.
    tokenizer: decodes completions for the reward function (None: token-id lists are passed).
    stop_tokens, pad_id: as `generate`.
    mesh, rules: shardings of the update and of the sampler's inference layout; None: unsharded.
    compiler_options: XLA options of the compiled update (tests:
      {"xla_backend_optimization_level": 0}).

  Example:
    >>> graphdef, state = create_train_state(policy, optimizer, rng=0)
    >>> config = GRPOConfig(sampling=SamplingConfig(num_samples=8, max_new_tokens=64))
    >>> trainer = GRPOTrainer(graphdef, optimizer, config, math_answer_reward, tokenizer,
    ...                       stop_tokens=[eos], pad_id=eos)
    >>> state = trainer.init_state(state)            # the reference policy, once
    >>> state, metrics = trainer.step(state, prompt_batch)
    >>> state, metrics = trainer.update(state, my_experience)   # bring your own batch
  """

  drop_groups = True  # group advantages: a non-finite reward drops its whole group

  @property
  def turn_rewards(self) -> bool:
    """Multi-turn: per-turn rewards with `advantage="process"`, else the trajectory's sum."""
    return self.config.advantage == "process"

  def init_extras(self, state: TrainState, **kwargs: Any) -> dict[str, Any]:
    if kwargs:
      raise TypeError(f"GRPOTrainer.init_state takes no extra arguments; got {sorted(kwargs)}.")
    return {}

  def make_update(self):
    return make_grpo_update(self.graphdef, self.optimizer, self.config)

  def collect(self, state: TrainState, prompts: Any, key: jax.Array):
    """Rollout + rewards with dynamic sampling: on the engine a stream of resampled groups
    (`collect_streamed`), with `generate` or multi-turn resampled batches
    (`sample_informative`)."""
    c = self.config
    if c.dynamic_sampling and c.engine is not None and self.environment is None:
      scored, metrics = collect_streamed(
        self.sampler_graphdef, self.sampler_params(state), prompts, key, c.sampling,
        max_resample=c.max_resample, stop_tokens=self.stop_tokens, pad_id=self.pad_id,
        engine=c.engine, mesh=self.mesh, stop_strings=self.stop_strings,
        tokenizer=self.tokenizer, reward_fn=self.reward_fn, overlong_cache=c.overlong_cache,
        overlong_factor=c.overlong_factor, nonfinite_rewards=c.nonfinite_rewards,
        drop_groups=self.drop_groups)
      check_reward_kind(scored, c.advantage)
      return scored, metrics

    def rollout(k):
      scored = self.rollout(state, prompts, k, overlong_cache=c.overlong_cache,
                            overlong_factor=c.overlong_factor)
      check_reward_kind(scored, c.advantage)
      return scored

    return sample_informative(rollout, key, c.sampling.num_samples,
                              enabled=c.dynamic_sampling, max_resample=c.max_resample)

  def prepare(self, state: TrainState, scored: Any):
    """The `Experience` of a scored rollout: ref_logp (kl_coef > 0), old_logp (only when
    `config.recompute_old_logp`), advantages (process supervision: from the step rewards)."""
    c = self.config
    check_reward_kind(scored, c.advantage)
    batch = self.shard_batch(experience_from_rollout(scored))
    steps = {}
    if c.advantage == "process":
      steps = self.shard_batch({"step_rewards": jnp.asarray(scored.step_rewards, jnp.float32),
                                "step_mask": jnp.asarray(scored.step_mask, bool)})
    adv = token_advantages(batch.scores, batch.loss_mask, kind=c.advantage,
                           group_size=c.sampling.num_samples, **steps)
    batch = self.pack(batch.replace(advantages=adv))  # update.packing: the passes below too
    old_logp = self.logprobs(state.params, state.frozen, batch) if c.recompute_old_logp \
      else None
    ref_logp = self.reference_logprobs(state, batch) if c.kl_coef > 0 else None
    adv, tis_mean = batch.advantages, 1.0
    if c.use_rollout_logprobs:
      adv, tis_mean = tis_weighted(batch.advantages, batch.loss_mask, old_logp,
                                   batch.rollout_logp, cap=float(c.tis_cap))
    batch = batch.replace(old_logp=old_logp, ref_logp=ref_logp, advantages=adv)
    return state, batch, {"tis_weight_mean": tis_mean}
