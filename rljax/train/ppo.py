"""PPO with a critic (InstructGPT-style RLHF) as a trainer.

One `PPOTrainer.step(state, prompts, key)`:

  1. the current parameters are handed to the sampler once (`OnPolicyTrainer.sampler_params`:
     cast to `rollout_dtype`, re-sharded to the inference layout on a mesh); `generate` samples
     `num_samples` completions per prompt; the reward function scores them on the host;
  2. jitted forward passes: old_logp (trainer's own forward at the sampling parameters, so the
     first ratio is 1), ref_logp (frozen reference, default the initial policy), values (critic);
  3. token rewards r_t = score·[t = last] − β·KL̂_t with KL̂ = kl_penalty(old_logp, ref_logp,
     kind=kl_kind) (k1 by default, as InstructGPT / TRL / verl) and β from the KL controller in
     `state.extras["kl_ctl"]` (fixed, or adaptive — Ziegler et al. 2019 — updated with the
     observed mean sequence KL);
  4. (advantages, returns) = gae(r, values, γ, λ); advantages whitened over the batch
     (`masked_whiten`, as TRL / verl);
  5. ppo_epochs × num_minibatches jitted updates of the policy (ppo_clip_loss — or
     ppo_penalty_loss with the adaptive β of `ppo_kl_controller` in `state.extras["penalty"]` —
     minus entropy_coef·entropy, plus ptx_coef·pretraining NLL given a `ptx_batch`) and of the
     critic (value_loss, clipped to old_values ± value_clip) with its own optimizer; the critic's
     parameters and optimizer state live in `state.extras["critic"]`. Each update accumulates
     `num_microbatches` microbatches with exact global normalizers (the ptx term has its own);
     on a mesh the update is jitted with the state's shardings (critic included) and the
     experience rows split over the data axes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax.losses.policy import ppo_clip_loss, ppo_penalty_loss, ppo_ptx_loss
from rljax.losses.value import value_loss
from rljax.ops._checks import check_choice
from rljax.ops.advantages import token_level_rewards
from rljax.ops.kl import kl_penalty
from rljax.ops.kl_control import adaptive_kl_controller, fixed_kl_controller, ppo_kl_controller
from rljax.ops.masking import AGG_MODES, aggregate, masked_mean, masked_whiten
from rljax.ops.returns import gae
from rljax.train.experience import (
  agg_count,
  completion_logprobs,
  completion_values,
  count_trace,
  critic_values,
  experience_arrays,
  mean_metrics,
  minibatch_indices,
  policy_logprobs,
  rescale_to_normalizer,
  rollout_metrics,
  take_rows,
)
from rljax.train.objectives import next_token_logprobs
from rljax.train.onpolicy import OnPolicyTrainer, check_rollout_dtype, under_mesh
from rljax.train.state import TrainState, state_shardings, variable_shardings
from rljax.train.step import (
  apply_gradients,
  default_batch_sharding,
  jit_step,
  make_grad_fn,
  mesh_of,
)

KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Hyper-parameters of PPO with a critic (defaults follow TRL's PPO / verl where noted).

  Attributes:
    num_samples: completions per prompt (1).
    max_new_tokens, temperature (> 0), top_k, top_p: sampling.
    kl_coef: β of the KL penalty in the reward (0.05, TRL's `kl_coef`); the initial value when
      `adaptive_kl`.
    kl_kind: per-token KL estimator in the reward ("k1", InstructGPT / TRL).
    adaptive_kl, kl_target, kl_horizon: Ziegler et al.'s adaptive controller (target 6.0,
      horizon 10000: TRL's defaults); False keeps β fixed.
    gamma, lam: GAE discount and λ (1.0, 0.95: TRL).
    whiten_advantages: whiten advantages over the batch's tokens (True).
    mode: "clip" (ppo_clip_loss) or "penalty" (ppo_penalty_loss with adaptive β).
    clip_eps, clip_eps_high: policy clip range (0.2).
    penalty_beta, penalty_target, penalty_kl_kind: PPO-penalty β₀ (1.0), target KL (0.01) and
      estimator ("k1"), the PPO paper's settings.
    value_clip: clip of the value loss around the rollout's values (0.2, TRL's `cliprange_value`);
      None disables it.
    entropy_coef: entropy bonus coefficient (0.0).
    ptx_coef: PPO-ptx coefficient γ on the pretraining NLL of a `ptx_batch` (0.0).
    ppo_epochs: passes over each rollout batch (4, TRL). num_minibatches: updates per pass (1).
    num_microbatches: gradient accumulation inside one update (exact normalizers, also for the
      ptx term; 1). The minibatch (and a `ptx_batch`) must divide into it.
    agg: aggregation of the per-token losses ("token-mean").
    chunk_size: positions per chunk of the fused log-prob computation (64).
    rollout_dtype: cast the parameters to this dtype for sampling ("bfloat16"); None samples
      in the training dtype (old_logp is recomputed in the training dtype either way).
  """

  num_samples: int = 1
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
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
  penalty_beta: float = 1.0
  penalty_target: float = 0.01
  penalty_kl_kind: str = "k1"
  value_clip: float | None = 0.2
  entropy_coef: float = 0.0
  ptx_coef: float = 0.0
  ppo_epochs: int = 4
  num_minibatches: int = 1
  num_microbatches: int = 1
  agg: str = "token-mean"
  chunk_size: int = 64
  rollout_dtype: str | None = None

  def __post_init__(self) -> None:
    check_rollout_dtype(self.rollout_dtype)
    check_choice("`mode`", self.mode, ("clip", "penalty"))
    check_choice("`kl_kind`", self.kl_kind, KL_KINDS)
    check_choice("`penalty_kl_kind`", self.penalty_kl_kind, KL_KINDS)
    check_choice("`agg`", self.agg, [a for a in AGG_MODES if a != "token-sum"])
    for name in ("num_samples", "max_new_tokens", "ppo_epochs", "num_minibatches",
                 "num_microbatches", "chunk_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1; got {value!r}.")
    if not self.temperature > 0:
      raise ValueError(f"`temperature` must be > 0 for training; got {self.temperature!r}.")
    for name in ("kl_coef", "entropy_coef", "ptx_coef", "penalty_beta"):
      if getattr(self, name) < 0:
        raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)!r}.")


class _Options(NamedTuple):
  """Static options of the jitted update (hashable)."""

  mode: str
  clip_eps: float
  clip_eps_high: float | None
  penalty_kl_kind: str
  value_clip: float | None
  entropy_coef: float
  ptx_coef: float
  agg: str
  temperature: float
  chunk_size: int


def _options(c: PPOConfig) -> _Options:
  return _Options(c.mode, c.clip_eps, c.clip_eps_high, c.penalty_kl_kind, c.value_clip,
                  c.entropy_coef, c.ptx_coef, c.agg, c.temperature, c.chunk_size)


# ----------------------------------------------------------------------------------------------
# Jitted pieces.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9, 10, 11, 12))
def ppo_advantages(scores, completion_mask, old_logp, ref_logp, values, kl_state, kl_kind: str,
                   gamma: float, lam: float, whiten: bool, adaptive: bool, kl_target: float,
                   kl_horizon: float):
  """KL-shaped token rewards → GAE → (whitened) advantages, returns, and the updated KL
  controller state (adaptive: observed KL = batch mean of the per-sequence summed KL̂)."""
  count_trace("ppo_advantages")
  mask = completion_mask.astype(jnp.float32)
  kl = jnp.where(completion_mask, kl_penalty(old_logp, ref_logp, kind=kl_kind), 0.0)
  rewards = token_level_rewards(scores, mask, kl=kl, beta=kl_state.coef)
  advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
  if whiten:
    advantages = masked_whiten(advantages, mask)
  seq_kl = jnp.mean(jnp.sum(kl, axis=-1))
  if adaptive:
    kl_state = adaptive_kl_controller(0.0, target=kl_target, horizon=kl_horizon).update(
      kl_state, seq_kl, scores.shape[0])
  metrics = {"kl": masked_mean(kl, mask), "sequence_kl": seq_kl,
             "non_score_reward": jnp.mean(jnp.sum(rewards, -1) - scores)}
  return advantages, returns, kl_state, metrics


def policy_count(batch: dict, agg: str):
  """Global normalizers of the policy loss: `agg_count` of the completion mask, and with a
  "ptx" batch {"exp": that, "ptx": its number of loss tokens} (`make_grad_fn`'s dict form)."""
  exp = agg_count(batch["exp"]["completion_mask"], agg)
  if "ptx" not in batch:
    return exp
  return {"exp": exp, "ptx": agg_count(batch["ptx"]["loss_mask"][:, 1:], "token-mean")}


def ppo_policy_objective(model: Any, batch: dict, *, normalizer=None, options: _Options):
  """Policy loss of one minibatch: clipped (or KL-penalised) surrogate − entropy bonus
  (+ ptx_coef · NLL of batch["ptx"]). `normalizer`: None, or `policy_count` of the full batch."""
  count_trace("ppo_policy_objective")
  o, exp = options, batch["exp"]
  ptx_normalizer = None
  if isinstance(normalizer, dict):
    normalizer, ptx_normalizer = normalizer["exp"], normalizer["ptx"]
  mask = exp["completion_mask"]
  logp, entropy = completion_logprobs(model, exp["tokens"], exp["attention_mask"], mask.shape[1],
                                      temperature=o.temperature, chunk_size=o.chunk_size,
                                      return_entropy=True)
  if o.mode == "clip":
    loss, metrics = ppo_clip_loss(logp, exp["old_logp"], exp["advantages"], mask,
                                  clip_eps=o.clip_eps, clip_eps_high=o.clip_eps_high, agg=o.agg)
  else:
    loss, metrics = ppo_penalty_loss(logp, exp["old_logp"], exp["advantages"], mask,
                                     beta=exp["penalty_beta"][0], kl_kind=o.penalty_kl_kind,
                                     agg=o.agg)
    metrics = dict(metrics, policy_kl=metrics.pop("kl"))
  if o.entropy_coef:
    loss = loss - o.entropy_coef * aggregate(entropy, mask, o.agg)
  loss = rescale_to_normalizer(loss, mask, o.agg, normalizer)
  metrics = dict(metrics, entropy=jax.lax.stop_gradient(masked_mean(entropy, mask)))
  if "ptx" in batch:
    ptx = batch["ptx"]
    ptx_logp = next_token_logprobs(model, ptx["input_ids"], ptx["attention_mask"],
                                   chunk_size=o.chunk_size)
    loss, metrics = ppo_ptx_loss((loss, metrics), ptx_logp, ptx["loss_mask"][:, 1:],
                                 ptx_coef=o.ptx_coef, normalizer=ptx_normalizer)
  return loss, metrics


def ppo_critic_objective(critic: Any, batch: dict, *, normalizer=None, options: _Options):
  """Clipped value loss of one minibatch."""
  count_trace("ppo_critic_objective")
  exp = batch["exp"]
  mask = exp["completion_mask"]
  values = completion_values(critic, exp["tokens"], exp["attention_mask"], mask.shape[1])
  loss, metrics = value_loss(values, exp["values"], exp["returns"], mask,
                             clip_eps=options.value_clip, agg=options.agg)
  return rescale_to_normalizer(loss, mask, options.agg, normalizer), metrics


def make_ppo_update(graphdef, critic_graphdef, optimizer, critic_optimizer, options: _Options,
                    *, num_microbatches: int = 1, shardings: TrainState | None = None,
                    compiler_options: dict[str, Any] | None = None):
  """The jitted joint update `(state, batch) -> (state, metrics)` of policy and critic.

  Both gradients are accumulated over `num_microbatches` with exact global normalizers
  (`make_grad_fn`); with `shardings` (`state_shardings`, which covers the critic in
  `state.extras`) the update is jitted with the state's shardings and the batch's rows split
  over the data axes (`jit_step`), exactly as `make_train_step`.
  """
  batch_sharding = None if shardings is None else default_batch_sharding(mesh_of(shardings))
  kw = {"num_microbatches": num_microbatches, "batch_sharding": batch_sharding}
  policy_grad = make_grad_fn(functools.partial(ppo_policy_objective, options=options), graphdef,
                             count_fn=functools.partial(policy_count, agg=options.agg), **kw)
  critic_grad = make_grad_fn(
    functools.partial(ppo_critic_objective, options=options), critic_graphdef,
    count_fn=lambda b: agg_count(b["exp"]["completion_mask"], options.agg), **kw)

  def update(state: TrainState, batch: dict):
    loss, grads, metrics = policy_grad(state.params, state.frozen, batch)
    critic = state.extras["critic"]
    closs, cgrads, cmetrics = critic_grad(critic["params"], critic["frozen"], batch)
    new_state, um = apply_gradients(state, grads, loss, optimizer)
    shell = TrainState(step=state.step, params=critic["params"], frozen=critic["frozen"],
                       opt_state=critic["opt_state"], rng=state.rng)
    shell, cm = apply_gradients(shell, cgrads, closs, critic_optimizer)
    extras = dict(new_state.extras, critic={"params": shell.params, "frozen": shell.frozen,
                                            "opt_state": shell.opt_state})
    out = {**metrics, "loss": loss, **um, "value_loss": closs, "critic_grad_norm":
           cm["grad_norm"], **{k: v for k, v in cmetrics.items() if k != "normalizer"}}
    return new_state.replace(extras=extras), out

  return jit_step(update, shardings=shardings, batch_sharding=batch_sharding,
                  compiler_options=compiler_options)


@functools.lru_cache(maxsize=32)
def _cached_update(graphdef, critic_graphdef, optimizer, critic_optimizer, options: _Options,
                   num_microbatches: int, compiler_options: tuple | None):
  """`make_ppo_update` without shardings, shared by trainers with the same static options."""
  return make_ppo_update(graphdef, critic_graphdef, optimizer, critic_optimizer, options,
                         num_microbatches=num_microbatches,
                         compiler_options=None if compiler_options is None
                         else dict(compiler_options))


# ----------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------


class PPOTrainer(OnPolicyTrainer):
  """Runs PPO steps for a policy (graphdef, TrainState) and a `ValueModel` critic.

  Args:
    graphdef, optimizer: the policy's graphdef and optimizer (`create_train_state`).
    critic_graphdef, critic_optimizer: the critic's graphdef (from `split_critic`) and optimizer.
    config: `PPOConfig`; reward_fn, tokenizer, stop_tokens, pad_id: as `GRPOTrainer`.
    ref_params: frozen reference (params, frozen); default the first state's parameters.
    mesh, rules: shardings of the update (`state_shardings` covers the critic too) and of the
      sampler's inference layout; None jits without them.
    compiler_options: XLA options of the jitted update.

  Example:
    >>> critic = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
    >>> critic_graphdef, critic_params, critic_frozen = split_critic(critic)
    >>> trainer = PPOTrainer(graphdef, critic_graphdef, opt, critic_opt, PPOConfig(...),
    ...                      reward_fn, tokenizer, stop_tokens=[eos], pad_id=eos)
    >>> graphdef, state = create_train_state(policy, opt, rng=0,
    ...                                      extras=trainer.initial_extras(critic))
    >>> state, metrics = trainer.step(state, prompts, jax.random.key(0))
  """

  def __init__(self, graphdef: nnx.GraphDef, critic_graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation,
               critic_optimizer: optax.GradientTransformation, config: PPOConfig,
               reward_fn: Callable, tokenizer: Any = None, *, stop_tokens: int | Sequence[int],
               pad_id: int, ref_params: Any = None, mesh: Any = None, rules: Any = None,
               compiler_options: dict[str, Any] | None = None):
    super().__init__(graphdef, config, reward_fn, tokenizer, stop_tokens=stop_tokens,
                     pad_id=pad_id, ref_params=ref_params, mesh=mesh, rules=rules)
    self.critic_graphdef = critic_graphdef
    self.optimizer, self.critic_optimizer = optimizer, critic_optimizer
    self.compiler_options = compiler_options
    self._update = None

  def kl_controller(self):
    c = self.config
    if c.adaptive_kl:
      return adaptive_kl_controller(c.kl_coef, target=c.kl_target, horizon=c.kl_horizon)
    return fixed_kl_controller(c.kl_coef)

  def initial_extras(self, critic: nnx.Module) -> dict[str, Any]:
    """{"critic": {params, frozen, opt_state}, "kl_ctl": KLControllerState, "penalty":
    KLControllerState (PPO-penalty β)} for `create_train_state(..., extras=...)`. On the
    trainer's mesh the critic's variables are placed by their logical axes (as the policy's)."""
    _, params, frozen = split_critic(critic)
    extras = {
      "critic": {"params": params, "frozen": frozen,
                 "opt_state": self.critic_optimizer.init(params)},
      "kl_ctl": self.kl_controller().init(),
      "penalty": ppo_kl_controller(self.config.penalty_beta,
                                   target=self.config.penalty_target).init(),
    }
    if self.mesh is None:
      return extras
    return jax.device_put(extras, variable_shardings(extras, self.mesh, self.rules))

  def _make_update(self, state: TrainState):
    c = self.config
    if self.mesh is None:
      compiler = (None if self.compiler_options is None
                  else tuple(sorted(self.compiler_options.items())))
      return _cached_update(self.graphdef, self.critic_graphdef, self.optimizer,
                            self.critic_optimizer, _options(c), c.num_microbatches, compiler)
    return make_ppo_update(
      self.graphdef, self.critic_graphdef, self.optimizer, self.critic_optimizer, _options(c),
      num_microbatches=c.num_microbatches,
      shardings=state_shardings(self.graphdef, state, self.mesh, self.rules),
      compiler_options=self.compiler_options)

  def prepare(self, state: TrainState, scored) -> tuple[dict, TrainState, dict]:
    """Experience batch (old/ref log-probs, values, advantages, returns) and the state with the
    updated KL controller."""
    c = self.config
    a = self.shard_batch(experience_arrays(scored))
    args = (a["tokens"], a["attention_mask"], a["completion_mask"])
    fwd = functools.partial(policy_logprobs, self.graphdef, temperature=c.temperature,
                            chunk_size=c.chunk_size)
    old_logp, entropy = fwd(state.params, state.frozen, *args)
    ref_logp, _ = fwd(*self.reference(state), *args)
    critic = state.extras["critic"]
    values = critic_values(self.critic_graphdef, critic["params"], critic["frozen"], *args)
    advantages, returns, kl_state, m = ppo_advantages(
      a["scores"], a["completion_mask"], old_logp, ref_logp, values, state.extras["kl_ctl"],
      c.kl_kind, float(c.gamma), float(c.lam), c.whiten_advantages, c.adaptive_kl,
      float(c.kl_target), float(c.kl_horizon))
    batch = {"tokens": a["tokens"], "attention_mask": a["attention_mask"],
             "completion_mask": a["completion_mask"], "old_logp": old_logp,
             "advantages": advantages, "values": values, "returns": returns,
             "penalty_beta": jnp.broadcast_to(state.extras["penalty"].coef,
                                              a["scores"].shape)}
    m = dict(m, kl_coef=state.extras["kl_ctl"].coef,
             entropy=masked_mean(entropy, a["completion_mask"]))
    state = state.replace(extras=dict(state.extras, kl_ctl=kl_state))
    return batch, state, m

  @under_mesh
  def step(self, state: TrainState, prompts: Any, key: jax.Array, *,
           ptx_batch: dict | None = None) -> tuple[TrainState, dict[str, float]]:
    """One rollout, then ppo_epochs × num_minibatches joint policy/critic updates.

    `ptx_batch` ({"input_ids", "attention_mask", "loss_mask"} [B', T']) adds
    ptx_coef · NLL of its loss tokens to every policy update (PPO-ptx). Metrics: the rollout's
    reward_mean / reward_std / response_length / truncation_rate / tokens_per_second; kl
    (token mean of KL̂ to the reference), sequence_kl, kl_coef (β used in this step's rewards),
    entropy; means over updates of loss, clipfrac, approx_kl, ratio_mean, grad_norm,
    learning_rate, value_loss, vf_clipfrac, value_error, critic_grad_norm; first_ratio_mean /
    first_clipfrac of the first update; penalty_beta in penalty mode.
    """
    c = self.config
    self.reference(state)
    if self._update is None:
      self._update = self._make_update(state)
    rollout_key, shuffle_key = jax.random.split(key)
    scored = self.rollout(state, prompts, rollout_key, c.num_samples, c.temperature,
                          process=False)  # PPO trains on one score per sequence
    metrics = rollout_metrics(scored)
    batch, state, prep = self.prepare(state, scored)
    seed = int(jax.random.randint(shuffle_key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(c.ppo_epochs):
      for rows in minibatch_indices(batch["tokens"].shape[0], c.num_minibatches, rng):
        mb = batch if c.num_minibatches == 1 else take_rows(batch, np.sort(rows))
        full = {"exp": mb} if ptx_batch is None else {"exp": mb, "ptx": ptx_batch}
        state, m = self._update(state, self.shard_batch(full))
        history.append(m)
    first = jax.device_get(history[0])
    metrics.update(mean_metrics(history))
    metrics.update({k: float(v) for k, v in jax.device_get(prep).items()})
    metrics["first_ratio_mean"] = float(first["ratio_mean"])
    metrics["first_clipfrac"] = float(first["clipfrac"])
    if c.mode == "penalty":
      state, metrics["penalty_beta"] = self._update_penalty(state, batch)
    return state, metrics

  def _update_penalty(self, state: TrainState, batch: dict) -> tuple[TrainState, float]:
    """PPO paper's β rule on d = token mean of k1 KL(π_old‖π_new) after the epochs."""
    c = self.config
    new_logp, _ = policy_logprobs(self.graphdef, state.params, state.frozen, batch["tokens"],
                                  batch["attention_mask"], batch["completion_mask"],
                                  temperature=c.temperature, chunk_size=c.chunk_size)
    kl = masked_mean(batch["old_logp"] - new_logp, batch["completion_mask"])
    ctl = ppo_kl_controller(c.penalty_beta, target=c.penalty_target)
    penalty = ctl.update(state.extras["penalty"], kl)
    return state.replace(extras=dict(state.extras, penalty=penalty)), float(penalty.coef)


def split_critic(critic: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, params, frozen) of a critic (`ValueModel`), as `create_train_state` splits."""
  return nnx.split(critic, nnx.Param, ...)
