"""PPO with a critic (InstructGPT-style RLHF) as a trainer.

One `PPOTrainer.step(state, prompts)` runs the `OnPolicyTrainer` loop with these hooks:

  collect   `sampling.num_samples` completions per prompt, one score per sequence;
  prepare   jitted forward passes: old_logp (the trainer's own forward at the sampling
            parameters, so the first ratio is 1; skipped on the single-pass fast path when no
            KL shaping or penalty needs it), ref_logp (`state.extras["reference"]`), values (the
            critic, `state.extras["critic"]`, a nested `TrainState`); then
            token rewards r_t = score·[t = last] − β·KL̂_t with KL̂ = kl_penalty(old_logp,
            ref_logp, kind=kl_kind) (k1 by default, as InstructGPT / TRL / verl) and β =
            `kl_coef` — a coefficient in the REWARD — from the KL controller in
            `state.extras["kl_ctl"]` (fixed, or adaptive — Ziegler et al. 2019 — updated with
            the observed mean sequence KL); (advantages, returns) = gae(r, values, γ, λ),
            advantages whitened over the batch (`masked_whiten`, as TRL / verl);
  update    one compiled joint update of the policy (ppo_clip_loss — or ppo_penalty_loss with
            the adaptive β of `state.extras["penalty"]`, a coefficient in the LOSS — minus
            entropy_coef·entropy, plus ptx_coef·pretraining NLL of a `ptx_batch`) and of the
            critic (value_loss, clipped to old_values ± value_clip) with its own optimizer; both
            gradients accumulate `num_microbatches` microbatches with exact global normalizers
            (the ptx term has its own);
  finish    PPO-penalty: the PPO paper's halve/double rule for its β.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.losses.policy import ppo_clip_loss, ppo_penalty_loss, ppo_ptx_loss
from rljax.losses.value import value_loss
from rljax.models.lora import check_no_dropout, trainable_filter
from rljax.ops._checks import check_bool, check_choice, check_number
from rljax.ops.advantages import token_level_rewards
from rljax.ops.kl import kl_penalty
from rljax.ops.kl_control import adaptive_kl_controller, fixed_kl_controller, ppo_kl_controller
from rljax.ops.masking import aggregate, masked_mean, masked_whiten
from rljax.ops.returns import gae
from rljax.agents.rollout import MultiTurnConfig
from rljax.rollout.engine import EngineConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.experience import Experience, check_experience, experience_from_rollout
from rljax.train.flops import value_update_flops
from rljax.train.forward import completion_logprobs, completion_values, critic_values
from rljax.train.normalizers import agg_count, rescale_to_normalizer
from rljax.train.objectives import next_token_logprobs
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
from rljax.train.state import TrainState, variable_shardings
from rljax.train.step import apply_gradients, make_grad_fn

@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Hyper-parameters of PPO with a critic (defaults follow TRL's PPO / verl where noted).

  Attributes:
    sampling: `SamplingConfig` (num_samples 1; temperature > 0).
    engine: `EngineConfig` of the continuous-batching rollout engine (default sizes); None
      samples with the static `generate` (the same rollouts, every row decoded to the longest).
      On a mesh the rollout is `generate`'s.
    multi_turn: `rljax.agents.MultiTurnConfig`, the turns' limits when the trainer has an
      `environment` (multi-turn rollouts through the engine; ignored without one).
    update: `UpdateConfig` (defaults: num_epochs 4 as TRL's ppo_epochs, agg "token-mean").
    kl_coef: β of the KL penalty in the REWARD, r_t −= β·KL̂_t (0.05, TRL's `kl_coef`); the
      initial value when `adaptive_kl`. 0 (and not adaptive) drops the reference pass.
    kl_kind: per-token KL estimator in the reward ("k1", InstructGPT / TRL).
    adaptive_kl, kl_target, kl_horizon: Ziegler et al.'s adaptive controller (target 6.0,
      horizon 10000: TRL's defaults); False keeps β fixed.
    gamma, lam: GAE discount and λ in [0, 1] (1.0, 0.95: TRL).
    whiten_advantages: whiten advantages over the batch's tokens (True).
    mode: "clip" (ppo_clip_loss) or "penalty" (ppo_penalty_loss with adaptive β).
    clip_eps, clip_eps_high: policy clip range (0.2; None: symmetric).
    clip_ratio_c: dual-clip constant c > 1 for negative advantages (None: off).
    penalty_kl_coef, penalty_kl_target, penalty_kl_kind: PPO-penalty's β₀ — a coefficient in
      the LOSS — (1.0), target KL (0.01) and estimator ("k1"), the PPO paper's settings.
    value_clip: clip of the value loss around the rollout's values (0.2, TRL's `cliprange_value`);
      None disables it.
    entropy_coef: entropy bonus coefficient (0.0).
    ptx_coef: PPO-ptx coefficient γ on the pretraining NLL of a `ptx_batch` (0.0).
    nonfinite_rewards: a non-finite reward from `reward_fn` "raise"s a ValueError naming the
      rows (default), or with "drop" those rows are dropped from the step
      (`rljax.train.scoring.drop_rows`) and counted in the `dropped_rows` metric.
  """

  sampling: SamplingConfig = SamplingConfig()
  update: UpdateConfig = UpdateConfig()
  engine: EngineConfig | None = EngineConfig()
  multi_turn: MultiTurnConfig = MultiTurnConfig()
  kl_coef: float = 0.05
  kl_kind: str = "k1"
  adaptive_kl: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10_000.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  mode: str = "clip"
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  clip_ratio_c: float | None = None
  penalty_kl_coef: float = 1.0
  penalty_kl_target: float = 0.01
  penalty_kl_kind: str = "k1"
  value_clip: float | None = 0.2
  entropy_coef: float = 0.0
  ptx_coef: float = 0.0
  nonfinite_rewards: str = "raise"

  def __post_init__(self) -> None:
    check_engine(self.engine)
    check_multi_turn(self.multi_turn)
    check_training_sampling(self.sampling)
    resolve_update(self, num_epochs=4, agg="token-mean")
    check_choice("`mode`", self.mode, ("clip", "penalty"))
    check_choice("`kl_kind`", self.kl_kind, KL_KINDS)
    check_choice("`penalty_kl_kind`", self.penalty_kl_kind, KL_KINDS)
    check_choice("`nonfinite_rewards`", self.nonfinite_rewards, NONFINITE_REWARDS)
    for name in ("kl_coef", "entropy_coef", "ptx_coef", "penalty_kl_coef"):
      check_number(name, getattr(self, name))
    for name in ("kl_target", "kl_horizon", "penalty_kl_target", "clip_eps"):
      check_number(name, getattr(self, name), low_open=True)
    for name in ("gamma", "lam"):
      check_number(name, getattr(self, name), high=1.0, high_open=False)
    for name in ("clip_eps_high", "value_clip"):
      check_number(name, getattr(self, name), low_open=True, optional=True)
    check_number("clip_ratio_c", self.clip_ratio_c, low=1.0, low_open=True, optional=True)
    for name in ("adaptive_kl", "whiten_advantages"):
      check_bool(name, getattr(self, name))

  @property
  def recompute_old_logp(self) -> bool:
    """Whether `prepare` runs the old-policy forward pass: several updates per batch, the KL
    shaping of the rewards (it compares old and reference log-probs), or the penalty rule."""
    return (not self.update.single_pass or self.kl_coef > 0 or self.adaptive_kl
            or self.mode == "penalty")


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kl_kind", "gamma", "lam", "whiten", "adaptive",
                                              "kl_target", "kl_horizon"))
def ppo_advantages(scores, loss_mask, old_logp, ref_logp, values, kl_state, *, kl_kind: str,
                   gamma: float, lam: float, whiten: bool, adaptive: bool, kl_target: float,
                   kl_horizon: float, step_rewards=None):
  """KL-shaped token rewards → GAE → (whitened) advantages, returns, the per-token rewards and
  the updated KL controller state (adaptive: observed KL = batch mean of the per-sequence
  summed KL̂). `ref_logp=None` means no shaping (β·KL̂ = 0).

    r_t = s·[t = last valid token] − β·KL̂_t          (outcome: `scores` [B])
    r_t = step_rewards_t · mask_t − β·KL̂_t           (`step_rewards` [B, N]: process rewards at
                                                       their step ends, a multi-turn
                                                       trajectory's turn rewards at turn ends)
  """
  mask = loss_mask.astype(jnp.float32)
  if ref_logp is None:
    kl = jnp.zeros_like(mask)
  else:
    kl = jnp.where(loss_mask, kl_penalty(old_logp, ref_logp, kind=kl_kind), 0.0)
  if step_rewards is None:
    rewards = token_level_rewards(scores, mask, kl=kl, beta=kl_state.coef)
  else:
    rewards = jax.lax.stop_gradient(step_rewards * mask - kl_state.coef * kl * mask)
  advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
  if whiten:
    advantages = masked_whiten(advantages, mask)
  seq_kl = jnp.mean(jnp.sum(kl, axis=-1))
  if adaptive:
    kl_state = adaptive_kl_controller(0.0, target=kl_target, horizon=kl_horizon).update(
      kl_state, seq_kl, scores.shape[0])
  metrics = {"kl": masked_mean(kl, mask), "sequence_kl": seq_kl,
             "non_score_reward": jnp.mean(jnp.sum(rewards, -1) - scores)}
  return jax.lax.stop_gradient(advantages), returns, rewards, kl_state, metrics


def policy_count(batch: dict, agg: str):
  """Global normalizers of the policy loss: `agg_count` of the loss mask, and with a "ptx"
  batch {"exp": that, "ptx": its number of loss tokens} (`make_grad_fn`'s dict form)."""
  exp = agg_count(batch["exp"].loss_mask, agg, **batch["exp"].segments)
  if batch.get("ptx") is None:
    return exp
  return {"exp": exp, "ptx": agg_count(batch["ptx"]["loss_mask"][:, 1:], "token-mean")}


def ppo_policy_objective(model: Any, batch: dict, *, normalizer=None, config: PPOConfig):
  """Policy loss of one (micro)batch: clipped (or KL-penalised, β = batch["penalty_kl_coef"][0],
  the controller's β broadcast over rows so microbatches split it)
  surrogate − entropy_coef·entropy (+ ptx_coef · NLL of batch["ptx"]). `normalizer`: None, or
  `policy_count` of the full batch."""
  c, u, exp = config, config.update, batch["exp"]
  ptx_normalizer = None
  if isinstance(normalizer, dict):
    normalizer, ptx_normalizer = normalizer["exp"], normalizer["ptx"]
  mask, segments = exp.loss_mask, exp.segments  # packed rows: per-sequence terms by segment
  logp, entropy = completion_logprobs(model, exp, temperature=c.sampling.temperature,
                                      chunk_size=u.chunk_size, return_entropy=True,
                                      entropy_grad=c.entropy_coef > 0)
  old = jax.lax.stop_gradient(logp) if exp.old_logp is None else exp.old_logp
  if c.mode == "clip":
    loss, metrics = ppo_clip_loss(logp, old, exp.advantages, mask, clip_eps=c.clip_eps,
                                  clip_eps_high=c.clip_eps_high, clip_ratio_c=c.clip_ratio_c,
                                  agg=u.agg, **segments)
  else:
    loss, metrics = ppo_penalty_loss(logp, old, exp.advantages, mask,
                                     beta=batch["penalty_kl_coef"][0], kl_kind=c.penalty_kl_kind,
                                     agg=u.agg, **segments)
    metrics = dict(metrics, policy_kl=metrics.pop("kl"))
  if c.entropy_coef:
    loss = loss - c.entropy_coef * aggregate(entropy, mask, u.agg, **segments)
  loss = rescale_to_normalizer(loss, agg_count(mask, u.agg, **segments), normalizer)
  metrics = dict(metrics, entropy=jax.lax.stop_gradient(masked_mean(entropy, mask)))
  if batch.get("ptx") is not None:
    ptx = batch["ptx"]
    ptx_logp = next_token_logprobs(model, ptx["input_ids"], ptx["attention_mask"],
                                   chunk_size=u.chunk_size)
    loss, metrics = ppo_ptx_loss((loss, metrics), ptx_logp, ptx["loss_mask"][:, 1:],
                                 ptx_coef=c.ptx_coef, normalizer=ptx_normalizer)
  return loss, metrics


def ppo_critic_objective(critic: Any, batch: dict, *, normalizer=None, config: PPOConfig):
  """Clipped value loss of one (micro)batch."""
  exp, agg = batch["exp"], config.update.agg
  loss, metrics = value_loss(completion_values(critic, exp), exp.values, exp.returns,
                             exp.loss_mask, clip_eps=config.value_clip, agg=agg, **exp.segments)
  count = agg_count(exp.loss_mask, agg, **exp.segments)
  return rescale_to_normalizer(loss, count, normalizer), metrics


def make_ppo_update(graphdef, critic_graphdef, optimizer, critic_optimizer, config: PPOConfig):
  """The pure joint update `(state, batch: Experience, ptx=None) -> (state, metrics)` of policy
  and critic (`state.extras["critic"]`, a nested `TrainState`); both gradients accumulated over
  `update.num_microbatches` with exact global normalizers (`make_grad_fn`)."""
  u = config.update
  policy_grad = make_grad_fn(functools.partial(ppo_policy_objective, config=config), graphdef,
                             count_fn=functools.partial(policy_count, agg=u.agg),
                             num_microbatches=u.num_microbatches)
  critic_grad = make_grad_fn(functools.partial(ppo_critic_objective, config=config),
                             critic_graphdef,
                             count_fn=lambda b: agg_count(b["exp"].loss_mask, u.agg,
                                                          **b["exp"].segments),
                             num_microbatches=u.num_microbatches)

  def update(state: TrainState, batch: Experience, ptx: dict | None = None):
    check_experience(batch, required=("advantages", "values", "returns"))
    full = {"exp": batch, "ptx": ptx}
    if config.mode == "penalty":
      full["penalty_kl_coef"] = jnp.broadcast_to(state.extras["penalty"].coef,
                                                 (batch.num_rows,))
    loss, grads, metrics = policy_grad(state.params, state.frozen, full)
    critic = state.extras["critic"]
    closs, cgrads, cmetrics = critic_grad(critic.params, critic.frozen, full)
    state, um = apply_gradients(state, grads, loss, optimizer)
    critic, cm = apply_gradients(critic, cgrads, closs, critic_optimizer)
    state = state.replace(extras={**state.extras, "critic": critic})
    out = {**metrics, "loss": loss, **um, "value_loss": closs, "critic_grad_norm":
           cm["grad_norm"], **{k: v for k, v in cmetrics.items() if k != "normalizer"}}
    return state, out

  return update


# ----------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------


class PPOTrainer(OnPolicyTrainer):
  """Runs PPO steps for a policy (graphdef, TrainState) and a `ValueModel` critic.

  Args:
    graphdef, optimizer: the policy's graphdef and optimizer (`create_train_state`).
    critic_graphdef, critic_optimizer: the critic's graphdef (from `split_critic`) and optimizer.
    config: `PPOConfig`; reward_fn, tokenizer, stop_tokens, pad_id, mesh, rules,
      compiler_options: as `GRPOTrainer`.

  Example:
    >>> critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
    >>> critic_graphdef, _, _ = split_critic(critic)
    >>> trainer = PPOTrainer(graphdef, critic_graphdef, opt, critic_opt, PPOConfig(...),
    ...                      reward_fn, tokenizer, stop_tokens=[eos], pad_id=eos)
    >>> state = trainer.init_state(state, critic=critic)
    >>> state, metrics = trainer.step(state, prompts)
  """

  turn_rewards = True  # multi-turn: each turn's reward at its last token (the critic's targets)

  def __init__(self, graphdef: nnx.GraphDef, critic_graphdef: nnx.GraphDef, optimizer: Any,
               critic_optimizer: Any, config: PPOConfig, reward_fn: Any, tokenizer: Any = None,
               **kwargs: Any):
    self.critic_graphdef, self.critic_optimizer = critic_graphdef, critic_optimizer
    check_no_dropout(critic_graphdef, "PPOTrainer's critic")
    super().__init__(graphdef, optimizer, config, reward_fn, tokenizer, **kwargs)

  @property
  def needs_reference(self) -> bool:
    return self.config.kl_coef > 0 or self.config.adaptive_kl

  def required_extras(self) -> list[str]:
    return super().required_extras() + ["critic", "kl_ctl", "penalty"]

  def kl_controller(self):
    c = self.config
    if c.adaptive_kl:
      return adaptive_kl_controller(c.kl_coef, target=c.kl_target, horizon=c.kl_horizon)
    return fixed_kl_controller(c.kl_coef)

  def penalty_controller(self):
    return ppo_kl_controller(self.config.penalty_kl_coef, target=self.config.penalty_kl_target)

  def init_extras(self, state: TrainState, *, critic: nnx.Module | None = None) -> dict:
    """{"critic": TrainState of the critic (params, frozen, opt_state), "kl_ctl", "penalty":
    KL-controller states}. On the trainer's mesh the critic's variables are placed by their
    logical axes (as the policy's)."""
    if critic is None:
      raise ValueError("PPOTrainer.init_state(state, critic=...) needs the critic module "
                       "(e.g. ValueModel.from_policy(policy, rngs=nnx.Rngs(1))).")
    _, params, frozen = split_critic(critic)
    critic_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                              opt_state=self.critic_optimizer.init(params),
                              rng=jax.random.fold_in(state.rng, 1))
    extras = {"critic": critic_state, "kl_ctl": self.kl_controller().init(),
              "penalty": self.penalty_controller().init()}
    if self.mesh is None:
      return extras
    return jax.device_put(extras, variable_shardings(extras, self.mesh, self.rules))

  def make_update(self):
    return make_ppo_update(self.graphdef, self.critic_graphdef, self.optimizer,
                           self.critic_optimizer, self.config)

  def prepare(self, state: TrainState, scored: Any):
    """Experience (old/ref log-probs, values, advantages, returns, token rewards) and the state
    with the updated KL controller. Process rewards (`Scored.step_rewards`: a reward fn's
    `StepRewards`, a multi-turn trajectory's turn rewards) are placed where their steps end."""
    c = self.config
    batch = self.shard_batch(experience_from_rollout(scored))
    old_logp = self.logprobs(state.params, state.frozen, batch) if c.recompute_old_logp \
      else None
    ref_logp = self.reference_logprobs(state, batch) if self.needs_reference else None
    critic = state.extras["critic"]
    values = critic_values(self.critic_graphdef, critic.params, critic.frozen, batch)
    advantages, returns, rewards, kl_state, m = ppo_advantages(
      batch.scores, batch.loss_mask, old_logp, ref_logp, values, state.extras["kl_ctl"],
      kl_kind=c.kl_kind, gamma=float(c.gamma), lam=float(c.lam), whiten=c.whiten_advantages,
      adaptive=c.adaptive_kl, kl_target=float(c.kl_target), kl_horizon=float(c.kl_horizon),
      step_rewards=None if scored.step_rewards is None else self.shard_batch(
        jnp.asarray(scored.step_rewards, jnp.float32)))
    batch = batch.replace(old_logp=old_logp, ref_logp=ref_logp, values=values, returns=returns,
                          advantages=advantages, rewards=rewards)
    batch = self.pack(batch)  # update.packing: after GAE (which runs along unpacked rows)
    m = dict(m, kl_coef=state.extras["kl_ctl"].coef)
    return state.replace(extras=dict(state.extras, kl_ctl=kl_state)), batch, m

  def step(self, state: TrainState, prompts: Any, key: jax.Array | None = None, *,
           ptx_batch: dict | None = None) -> tuple[TrainState, dict[str, float]]:
    """`OnPolicyTrainer.step`; `ptx_batch` ({"input_ids", "attention_mask", "loss_mask"}
    [B', T']) adds ptx_coef · NLL of its loss tokens to every policy update (PPO-ptx).

    Metrics also include kl (token mean of KL̂ to the reference), sequence_kl, kl_coef (β of
    this step's rewards), entropy, value_loss, vf_clipfrac, value_error, critic_grad_norm, and
    penalty_kl_coef in penalty mode.
    """
    return super().step(state, prompts, key, (self.shard_batch(ptx_batch),))

  def update_flops(self, state: TrainState, batch: Experience) -> float:
    """The policy's update FLOPs plus the critic's (`rljax.train.flops`), for `mfu` (a ptx
    batch's forward and backward are not counted)."""
    critic = state.extras["critic"]
    backbone = nnx.merge(self.critic_graphdef, critic.params, critic.frozen).backbone.config
    rows = batch.num_rows // self.config.update.num_minibatches
    return super().update_flops(state, batch) + value_update_flops(
      backbone, rows, batch.prompt_length, batch.loss_mask.shape[1])

  def finish(self, state: TrainState, batch: Experience):
    """PPO-penalty: the PPO paper's β rule on d = token mean of k1 KL(π_old‖π_new) after the
    updates."""
    if self.config.mode != "penalty":
      return state, {}
    new_logp = self.logprobs(state.params, state.frozen, batch)
    kl = masked_mean(batch.old_logp - new_logp, batch.loss_mask)
    penalty = self.penalty_controller().update(state.extras["penalty"], kl)
    state = state.replace(extras=dict(state.extras, penalty=penalty))
    return state, {"penalty_kl_coef": float(penalty.coef)}


def split_critic(critic: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, params, frozen) of a critic (`ValueModel`), as `create_train_state` splits: with
  LoRA adapters of its own, the adapters and the head train (`trainable_filter`), else all."""
  return nnx.split(critic, trainable_filter(critic), ...)
