"""The GRPO family as a trainer: G samples per prompt → rewards → group advantages → clipped updates.

One `GRPOTrainer.step(state, prompts, key)`:

  1. the current parameters are handed to the sampler once (`OnPolicyTrainer.sampler_params`:
     cast to `rollout_dtype`, re-sharded to the inference layout on a mesh), and
     `generate(num_samples=G)` samples G completions per prompt (contiguous rows);
  2. completions are decoded (for the reward function only) and scored on the host, by
     OUTCOME supervision (one reward per completion) or, with `advantage="process"`, PROCESS
     supervision (the reward function returns `rljax.rewards.StepRewards`: one reward per
     reasoning step, at the token where the step ends); optional DAPO soft overlong penalty;
  3. dynamic sampling (DAPO): groups whose rewards all agree (process: all step rewards of the
     group agree) are dropped and the prompts are resampled (up to `max_resample` times) until
     the batch is refilled with informative groups; if it cannot be refilled, zero-variance
     groups fill the rest (their advantage is 0), so the batch shape never changes (no
     recompilation);
  4. old_logp is RECOMPUTED by the trainer's own jitted forward pass at the sampling parameters,
     so the first ratio is exactly 1; ref_logp by the same pass with the reference parameters;
  5. advantages (`config.advantage`: a group baseline of the outcome scores, or
     `grpo_process_advantages` of the step rewards), then `num_iterations` × `num_minibatches`
     jitted updates of `grpo_loss` / `gspo_loss` / `cispo_loss` through
     `rljax.train.step.make_train_step`.

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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax.losses.policy import cispo_loss, grpo_loss, gspo_loss
from rljax.ops._checks import check_choice, clamped_exp
from rljax.ops.advantages import (
  grpo_advantages,
  grpo_process_advantages,
  reinforce_pp_advantages,
  reinforce_pp_baseline_advantages,
  rloo_advantages,
  token_level_rewards,
)
from rljax.ops.kl import kl_penalty
from rljax.ops.masking import AGG_MODES, aggregate, masked_mean
from rljax.train.experience import (
  agg_count,
  completion_logprobs,
  count_trace,
  experience_arrays,
  informative_groups,
  mean_metrics,
  minibatch_indices,
  policy_logprobs,
  rescale_to_normalizer,
  rollout_metrics,
  select_rows,
  take_rows,
)
from rljax.train.onpolicy import OnPolicyTrainer, check_rollout_dtype, under_mesh
from rljax.train.state import TrainState
from rljax.train.step import make_train_step

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "process")
LOSSES = ("grpo", "gspo", "cispo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Hyper-parameters of the GRPO family (defaults: DeepSeekMath GRPO as in TRL / verl).

  Attributes:
    group_size: G completions per prompt (8).
    max_new_tokens: completion length N (static shape).
    temperature, top_k, top_p: sampling options (temperature > 0; the log-probs use it).
    beta: KL-to-reference coefficient in the loss (0.04, DeepSeekMath); 0 skips the reference.
    kl_kind: `kl_penalty` estimator of that KL ("k3").
    clip_eps, clip_eps_high: clip range (0.2; DAPO's clip-higher 0.28). `gspo` presets 3e-4/4e-4.
    agg: loss aggregation ("seq-mean-token-mean", the GRPO paper; DAPO "token-mean"; Dr. GRPO
      "seq-mean-token-sum-norm").
    advantage: "grpo", "dr_grpo" (no std), "rloo", "reinforce_pp" (batch-whitened returns of the
      outcome reward, γ = 1), "reinforce_pp_baseline" (group mean baseline, batch-whitened) —
      outcome supervision, the reward fn returns float32 [B] — or "process" (process
      supervision, `grpo_process_advantages`): the reward fn returns `rljax.rewards.StepRewards`
      (e.g. from `rljax.rewards.process_reward`), and a row's score (metrics, accuracy) is the
      sum of its step rewards. A reward of the other kind raises ValueError.
    loss: "grpo", "gspo" (sequence ratio) or "cispo" (clipped IS-weighted REINFORCE); the KL term
      β·agg(KL̂) is added to gspo / cispo when beta > 0.
    num_iterations: optimisation passes over each rollout batch (μ in the GRPO paper; 1).
    num_minibatches: updates per pass; rows are shuffled each pass (1).
    num_microbatches: gradient accumulation inside one update (exact normalizer; 1).
    dynamic_sampling: drop zero-variance groups and refill by resampling (DAPO; False).
    max_resample: extra rollouts allowed per step to refill (3).
    overlong_buffer: DAPO soft overlong penalty length L_cache; None disables it.
    overlong_penalty: scale of that penalty (1.0).
    use_rollout_logprobs: apply truncated importance sampling from the sampler's log-probs.
    tis_cap: the TIS truncation C (2.0, verl's `tis_imp_ratio_cap` example).
    chunk_size: positions per chunk of the fused log-prob computation (64).
    rollout_dtype: cast the parameters to this dtype for sampling ("bfloat16"); None samples
      in the training dtype. old_logp is still recomputed in the training dtype; pair it with
      `use_rollout_logprobs` to correct the mismatch.
  """

  group_size: int = 8
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  beta: float = 0.04
  kl_kind: str = "k3"
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  agg: str = "seq-mean-token-mean"
  advantage: str = "grpo"
  loss: str = "grpo"
  num_iterations: int = 1
  num_minibatches: int = 1
  num_microbatches: int = 1
  dynamic_sampling: bool = False
  max_resample: int = 3
  overlong_buffer: int | None = None
  overlong_penalty: float = 1.0
  use_rollout_logprobs: bool = False
  tis_cap: float = 2.0
  chunk_size: int = 64
  rollout_dtype: str | None = None

  def __post_init__(self) -> None:
    check_rollout_dtype(self.rollout_dtype)
    check_choice("`advantage`", self.advantage, ADVANTAGES)
    check_choice("`loss`", self.loss, LOSSES)
    check_choice("`agg`", self.agg, [a for a in AGG_MODES if a != "token-sum"])
    check_choice("`kl_kind`", self.kl_kind, ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs"))
    for name in ("group_size", "max_new_tokens", "num_iterations", "num_minibatches",
                 "num_microbatches", "chunk_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (2 if name == "group_size" else 1):
        raise ValueError(f"`{name}` must be an int >= {2 if name == 'group_size' else 1}; "
                         f"got {value!r}.")
    if not self.temperature > 0:
      raise ValueError(f"`temperature` must be > 0 for training; got {self.temperature!r}.")
    if self.beta < 0:
      raise ValueError(f"`beta` must be >= 0; got {self.beta!r}.")
    if self.max_resample < 0:
      raise ValueError(f"`max_resample` must be >= 0; got {self.max_resample!r}.")
    if not self.tis_cap > 0:
      raise ValueError(f"`tis_cap` must be > 0; got {self.tis_cap!r}.")
    if self.overlong_buffer is not None and not 0 < self.overlong_buffer <= self.max_new_tokens:
      raise ValueError(f"`overlong_buffer` must be in (0, max_new_tokens]; got "
                       f"{self.overlong_buffer!r}.")

  @classmethod
  def dr_grpo(cls, **kw: Any) -> GRPOConfig:
    """Dr. GRPO (Liu et al. 2025): no std normalisation, `seq-mean-token-sum-norm`, β = 0."""
    return cls(**{"advantage": "dr_grpo", "agg": "seq-mean-token-sum-norm", "beta": 0.0, **kw})

  @classmethod
  def dapo(cls, **kw: Any) -> GRPOConfig:
    """DAPO (Yu et al. 2025): clip-higher 0.28, token-mean, no KL, dynamic sampling, soft
    overlong penalty over the last quarter of `max_new_tokens`."""
    n = kw.get("max_new_tokens", cls.max_new_tokens)
    return cls(**{"clip_eps_high": 0.28, "agg": "token-mean", "beta": 0.0,
                  "dynamic_sampling": True, "overlong_buffer": max(1, n // 4), **kw})

  @classmethod
  def gspo(cls, **kw: Any) -> GRPOConfig:
    """GSPO (Zheng et al. 2025): sequence-level ratio, clip 3e-4 / 4e-4, β = 0."""
    return cls(**{"loss": "gspo", "clip_eps": 3e-4, "clip_eps_high": 4e-4, "beta": 0.0, **kw})


# ----------------------------------------------------------------------------------------------
# Jitted pieces.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def token_advantages(scores, completion_mask, kind: str, group_size: int, use_tis: bool,
                     tis_cap: float, old_logp=None, rollout_logp=None, step_rewards=None,
                     step_mask=None):
  """[B, N] token advantages (× the TIS weight when `use_tis`) and the mean TIS weight.

  kind "process" reads `step_rewards` / `step_mask` ([B, N], `Scored.step_rewards`) instead of
  `scores`; the other kinds read `scores` [B].
  """
  count_trace("grpo_advantages")
  mask = completion_mask.astype(jnp.float32)
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
  adv = adv[:, None] * mask if adv.ndim == 1 else adv * mask
  weight = jnp.ones_like(mask)
  if use_tis:
    weight = jnp.minimum(clamped_exp(old_logp - rollout_logp), tis_cap)
    adv = adv * jax.lax.stop_gradient(weight)
  return jax.lax.stop_gradient(adv), masked_mean(weight, mask)


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


class LossOptions(NamedTuple):
  """The fields of `GRPOConfig` that the update step depends on (its compile-cache key)."""

  loss: str
  agg: str
  clip_eps: float
  clip_eps_high: float | None
  beta: float
  kl_kind: str
  temperature: float
  chunk_size: int

  @classmethod
  def of(cls, config: GRPOConfig) -> LossOptions:
    return cls(*(getattr(config, f) for f in cls._fields))


def grpo_objective(model: Any, batch: dict[str, jax.Array], *, normalizer=None,
                   config: GRPOConfig | LossOptions) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The per-minibatch loss of `make_train_step`: policy forward + grpo/gspo/cispo loss.

  batch: tokens, attention_mask, completion_mask, old_logp, ref_logp, advantages ([B, N]).
  With `normalizer` (the global `agg_count`) the loss is this microbatch's share of the
  full-batch loss (`rescale_to_normalizer`).
  """
  count_trace("grpo_objective")
  c = config
  mask = batch["completion_mask"]
  logp, entropy = completion_logprobs(
    model, batch["tokens"], batch["attention_mask"], mask.shape[1], temperature=c.temperature,
    chunk_size=c.chunk_size, return_entropy=True,
  )
  old, ref, adv = batch["old_logp"], batch["ref_logp"], batch["advantages"]
  if c.loss == "grpo":
    loss, metrics = grpo_loss(logp, old, ref if c.beta else None, adv, mask, clip_eps=c.clip_eps,
                              clip_eps_high=c.clip_eps_high, beta=c.beta, kl_kind=c.kl_kind,
                              agg=c.agg)
  else:
    fn = gspo_loss if c.loss == "gspo" else cispo_loss
    kw = {} if c.clip_eps_high is None else {"clip_eps_high": c.clip_eps_high}
    loss, metrics = fn(logp, old, adv, mask, clip_eps=c.clip_eps, agg=c.agg, **kw)
    kl = kl_penalty(logp, ref, kind=c.kl_kind)
    if c.beta:
      loss = loss + c.beta * aggregate(kl, mask, c.agg)
    metrics = dict(metrics, kl=jax.lax.stop_gradient(masked_mean(kl, mask)))
  metrics = dict(metrics, entropy=jax.lax.stop_gradient(masked_mean(entropy, mask)))
  return rescale_to_normalizer(loss, mask, c.agg, normalizer), metrics


@functools.lru_cache(maxsize=64)
def _cached_train_step(graphdef, optimizer, options: LossOptions, num_microbatches: int,
                       compiler_options: tuple | None):
  """One jitted update per (model, optimizer, loss options): trainers that differ only in
  rollout / advantage settings share the compiled step (no mesh)."""
  return make_train_step(
    functools.partial(grpo_objective, config=options), graphdef, optimizer,
    count_fn=lambda b: agg_count(b["completion_mask"], options.agg),
    num_microbatches=num_microbatches,
    compiler_options=None if compiler_options is None else dict(compiler_options),
  )


# ----------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------


class GRPOTrainer(OnPolicyTrainer):
  """Runs GRPO-family steps for a policy given as (graphdef, TrainState).

  Args:
    graphdef: the policy's graphdef (from `create_train_state`).
    optimizer: the optax transformation the state was created with.
    config: `GRPOConfig`.
    reward_fn: host callable `fn(prompts, completions, **fields) -> float32 [B]` (also offered
      prompt_tokens / completion_tokens / completion_mask / completion_lengths keywords).
    tokenizer: decodes completions for the reward function (None: token-id lists are passed).
    stop_tokens, pad_id: as `generate`.
    ref_params: frozen reference (params, frozen) pair; default the parameters of the first
      state seen by `step` (the initial policy).
    mesh, rules: shardings for the train step (`state_shardings`) and the sampler's inference
      layout (`OnPolicyTrainer.sampler_params`); None jits without them.
    compiler_options: XLA options for the train step (tests: {"xla_backend_optimization_level":
      0}).

  Example:
    >>> graphdef, state = create_train_state(policy, optimizer, rng=0)
    >>> trainer = GRPOTrainer(graphdef, optimizer, GRPOConfig(group_size=8, max_new_tokens=64),
    ...                       math_answer_reward, tokenizer, stop_tokens=[eos], pad_id=eos)
    >>> state, metrics = trainer.step(state, prompt_batch, jax.random.key(0))
  """

  def __init__(self, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
               config: GRPOConfig, reward_fn: Callable, tokenizer: Any = None, *,
               stop_tokens: int | Sequence[int], pad_id: int, ref_params: Any = None,
               mesh: Any = None, rules: Any = None,
               compiler_options: dict[str, Any] | None = None):
    super().__init__(graphdef, config, reward_fn, tokenizer, stop_tokens=stop_tokens,
                     pad_id=pad_id, ref_params=ref_params, mesh=mesh, rules=rules)
    self.optimizer, self.compiler_options = optimizer, compiler_options
    self._train_step = None

  # -- pieces ------------------------------------------------------------------------------

  def _make_train_step(self, state: TrainState):
    c = self.config
    options = LossOptions.of(c)
    if self.mesh is None:
      compiler = None if self.compiler_options is None else tuple(
        sorted(self.compiler_options.items()))
      return _cached_train_step(self.graphdef, self.optimizer, options, c.num_microbatches,
                                compiler)
    from rljax.train.state import state_shardings

    return make_train_step(
      functools.partial(grpo_objective, config=options), self.graphdef, self.optimizer,
      count_fn=lambda b: agg_count(b["completion_mask"], c.agg),
      shardings=state_shardings(self.graphdef, state, self.mesh, self.rules),
      num_microbatches=c.num_microbatches, compiler_options=self.compiler_options,
    )

  def _rollout(self, state: TrainState, prompts: Any, key: jax.Array, num_samples: int,
               temperature: float):
    c = self.config
    return self.rollout(state, prompts, key, num_samples, temperature,
                        overlong_buffer=c.overlong_buffer,
                        overlong_penalty_coef=c.overlong_penalty)

  def sample_groups(self, state: TrainState, prompts: Any, key: jax.Array):
    """Rollout + rewards with dynamic sampling; returns (scored batch, metrics of the first
    rollout, zero-variance fraction, number of resamples)."""
    c, g = self.config, self.config.group_size
    first = self._rollout(state, prompts, key, g, c.temperature)
    check_reward_kind(first, c.advantage)
    metrics = rollout_metrics(first)
    informative = informative_groups(first, g)
    metrics["zero_variance_groups"] = float(1.0 - informative.mean())
    num_groups = informative.shape[0]
    resamples = 0
    if c.dynamic_sampling:
      pool = [first]
      picks = [(0, np.flatnonzero(informative))]
      have = len(picks[0][1])
      while have < num_groups and resamples < c.max_resample:
        resamples += 1
        extra = self._rollout(state, prompts, jax.random.fold_in(key, resamples), g,
                              c.temperature)
        pool.append(extra)
        good = np.flatnonzero(informative_groups(extra, g))[: num_groups - have]
        picks.append((len(pool) - 1, good))
        have += len(good)
      if have < num_groups:  # fill with zero-variance groups (advantage 0) to keep the shape
        picks.append((0, np.flatnonzero(~informative)[: num_groups - have]))
      rows = [(i, (groups[:, None] * g + np.arange(g)).reshape(-1)) for i, groups in picks]
      first = select_rows(pool, [(i, r) for i, r in rows if len(r)])
      metrics["filled_zero_variance_groups"] = float(1.0 - informative_groups(first, g).mean())
    metrics["resamples"] = float(resamples)
    return first, metrics

  def prepare(self, state: TrainState, scored) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The training batch of a scored rollout: recomputed old_logp, ref_logp, advantages
    (process supervision: from `scored.step_rewards` / `scored.step_mask`)."""
    c = self.config
    check_reward_kind(scored, c.advantage)
    arrays = self.shard_batch(experience_arrays(scored))
    steps = {}
    if c.advantage == "process":
      steps = self.shard_batch({"step_rewards": jnp.asarray(scored.step_rewards, jnp.float32),
                                "step_mask": jnp.asarray(scored.step_mask, bool)})
    fwd = functools.partial(policy_logprobs, self.graphdef, temperature=c.temperature,
                            chunk_size=c.chunk_size)
    args = (arrays["tokens"], arrays["attention_mask"], arrays["completion_mask"])
    old_logp, entropy = fwd(state.params, state.frozen, *args)
    if c.beta > 0 or c.loss != "grpo":
      ref_params, ref_frozen = self.reference(state)
      ref_logp, _ = fwd(ref_params, ref_frozen, *args)
    else:
      ref_logp = old_logp
    adv, tis_mean = token_advantages(
      arrays["scores"], arrays["completion_mask"], c.advantage, c.group_size,
      c.use_rollout_logprobs, float(c.tis_cap), old_logp, arrays["rollout_logp"], **steps,
    )
    batch = {
      "tokens": arrays["tokens"], "attention_mask": arrays["attention_mask"],
      "completion_mask": arrays["completion_mask"], "old_logp": old_logp, "ref_logp": ref_logp,
      "advantages": adv,
    }
    extra = {"entropy": masked_mean(entropy, arrays["completion_mask"]),
             "tis_weight_mean": tis_mean}
    return batch, extra

  # -- public ------------------------------------------------------------------------------

  @under_mesh
  def step(self, state: TrainState, prompts: Any, key: jax.Array
           ) -> tuple[TrainState, dict[str, float]]:
    """One rollout of G samples per prompt, then num_iterations × num_minibatches updates.

    Metrics: reward_mean / reward_std / response_length / truncation_rate / tokens_per_second
    of the first rollout of the step (before dynamic-sampling filtering), zero_variance_groups
    (fraction), resamples, entropy (of the sampling policy), tis_weight_mean, and the means over
    updates of loss, kl, clipfrac, approx_kl, ratio_mean, grad_norm, learning_rate, skipped;
    first_ratio_mean / first_clipfrac / first_kl are those of the first update (1 and 0 when
    recomputing; first_kl is 0 at the first step, when the reference is the initial policy).
    """
    c = self.config
    self.reference(state)
    if self._train_step is None:
      self._train_step = self._make_train_step(state)
    rollout_key, shuffle_key = jax.random.split(key)
    scored, metrics = self.sample_groups(state, prompts, rollout_key)
    batch, extra = self.prepare(state, scored)
    rng = np.random.default_rng(int(jax.random.randint(shuffle_key, (), 0, 2**31 - 1)))
    history = []
    for _ in range(c.num_iterations):
      for rows in minibatch_indices(batch["tokens"].shape[0], c.num_minibatches, rng):
        mb = batch if c.num_minibatches == 1 else take_rows(batch, np.sort(rows))
        state, m = self._train_step(state, self.shard_batch(mb))
        history.append(m)
    updates = mean_metrics(history)
    first = jax.device_get(history[0])
    metrics.update(updates)
    metrics.update({k: float(v) for k, v in jax.device_get(extra).items()})
    metrics["first_ratio_mean"] = float(first["ratio_mean"])
    metrics["first_clipfrac"] = float(first["clipfrac"])
    metrics["first_kl"] = float(first["kl"])
    return state, metrics


