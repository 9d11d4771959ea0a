"""The on-policy skeleton that GRPO and PPO share: one loop, one compiled update, state in the state.

`OnPolicyTrainer.step(state, prompts)` owns the loop:

  1. collect   the current parameters are handed to the sampler once (`sampler_params`: cast
               to `sampling.rollout_dtype`, re-sharded to the inference layout on a mesh), G
               completions per prompt are sampled and scored on the host (hook: GRPO adds
               dynamic sampling);
  2. prepare   the `Experience` batch: reference log-probs (when a KL term needs them), the
               old log-probs (only when more than one update sees the batch), advantages (hook);
  3. update    `num_epochs × num_minibatches` calls of ONE compiled `update(state, batch)`;
  4. finish    a hook after the updates (PPO-penalty's β rule); metrics.

Everything the trainer carries between steps lives in the `TrainState` pytree, so it is sharded
and checkpointed with the policy: the reference parameters (`extras["reference"]`, taken once by
`init_state`, saved once per run by `Checkpointer`), the KL controllers, the critic (a nested
`TrainState`), and the RNG root (`state.rng`; each step's key is `fold_in(rng, state.step)`).

The update is public: `trainer.update(state, batch) -> (state, metrics)` over an `Experience`
(`rljax.train.experience`) — bring your own rollouts and advantages. It is jitted once, at
construction; on a mesh the state's outputs are constrained to the shardings of their logical
axes and the batch rows to the data axes, so no example state is needed to build it.

The single-pass fast path. When an update is the only pass over a batch at unchanged parameters
(`num_epochs = num_minibatches = 1`, no importance correction that needs them beforehand),
`Experience.old_logp` is None and the update uses `stop_gradient(logp)`: the ratio is exactly 1
and its gradient is that of the two-pass form, without a separate forward pass.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.agents.observations import ChatTurns
from rljax.agents.rollout import MultiTurnConfig
from rljax.models.lora import check_no_dropout, lora_config_of, merged
from rljax.models.quant import is_quantized
from rljax.ops._checks import check_bool, check_choice, check_int, check_number
from rljax.ops.masking import AGG_MODES
from rljax.parallel.mesh import use_mesh
from rljax.parallel.rules import DATA, FSDP, inference_rules
from rljax.rollout.engine import EngineConfig
from rljax.rollout.generate import check_token_ids
from rljax.rollout.sampling import SamplingConfig
from rljax.rollout.stops import check_stop_strings
from rljax.train.experience import (
  Experience,
  mean_metrics,
  minibatch_indices,
  pack_experience,
  take_rows,
)
from rljax.train.flops import update_flops
from rljax.train.forward import policy_logprobs
from rljax.train.scoring import (
  Scored,
  accuracy_metrics,
  collect_rollout,
  collect_trajectories,
  rollout_metrics,
)
from rljax.train.state import TrainState, cast_floating, variable_shardings
from rljax.train.step import default_batch_sharding, jit_step_by_rules

KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")
REFERENCE = "reference"
FIRST_METRICS = ("ratio_mean", "clipfrac", "kl")  # logged for the first update of a step too


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """How a rollout batch is turned into optimizer updates (shared by GRPO and PPO).

  Attributes:
    num_epochs: passes over each rollout batch (GRPO's μ, PPO's epochs); None takes the
      algorithm's default (GRPO 1, PPO 4, TRL's `ppo_epochs`).
    num_minibatches: updates per pass; rows are shuffled each pass (1).
    num_microbatches: gradient accumulation inside one update, exact under every `agg`
      (`rljax.train.normalizers`; 1). The minibatch must divide into it.
    chunk_size: positions per chunk of the fused log-prob computation (64).
    agg: aggregation of the per-token losses (`rljax.ops.aggregate`); None takes the
      algorithm's default (GRPO "seq-mean-token-mean", the GRPO paper; PPO "token-mean", TRL).
      DAPO uses "token-mean", Dr. GRPO "seq-mean-token-sum-norm".
    peak_flops: the machine's peak FLOP/s; when set, each step logs `mfu`, the analytic FLOPs of
      its updates (`rljax.train.flops`) per second over this peak. None skips it.
    packing: pack the rollout's sequences end to end into fewer rows
      (`rljax.train.experience.pack_experience`), so what varied completion lengths leave as
      padding is not computed: GRPO packs before its reference / old-log-prob passes and the
      update, PPO after GAE (which runs along unpacked rows), so its epochs of updates run
      packed. Off by default (a rollout without stop tokens has nothing to pack); not with
      "seq-mean-token-sum-norm", whose horizon is the unpacked completion length.
  """

  num_epochs: int | None = None
  num_minibatches: int = 1
  num_microbatches: int = 1
  chunk_size: int = 64
  agg: str | None = None
  peak_flops: float | None = None
  packing: bool = False

  def __post_init__(self) -> None:
    for name in ("num_epochs", "num_minibatches", "num_microbatches", "chunk_size"):
      if not (name == "num_epochs" and self.num_epochs is None):
        check_int(name, getattr(self, name), 1)
    if self.agg is not None:
      check_choice("`agg`", self.agg, [a for a in AGG_MODES if a != "token-sum"])
    check_number("peak_flops", self.peak_flops, low_open=True, optional=True)
    check_bool("packing", self.packing)
    if self.packing and self.agg == "seq-mean-token-sum-norm":
      raise ValueError("`packing` does not support agg='seq-mean-token-sum-norm' (its horizon is "
                       "the unpacked completion length); use packing=False.")

  def with_defaults(self, *, num_epochs: int, agg: str) -> UpdateConfig:
    """This section with an algorithm's defaults in place of its None fields."""
    return dataclasses.replace(self, num_epochs=num_epochs if self.num_epochs is None
                               else self.num_epochs, agg=agg if self.agg is None else self.agg)

  @property
  def single_pass(self) -> bool:
    """One update per batch (no epochs, no minibatches): old log-probs are not needed apart."""
    return self.num_epochs in (None, 1) and self.num_minibatches == 1


def resolve_update(config: Any, *, num_epochs: int, agg: str) -> None:
  """Checks `config.update` and fills its None fields with the algorithm's defaults (in a
  frozen config's `__post_init__`)."""
  if not isinstance(config.update, UpdateConfig):
    raise ValueError(f"`update` must be an UpdateConfig; got {type(config.update).__name__}.")
  object.__setattr__(config, "update", config.update.with_defaults(num_epochs=num_epochs,
                                                                   agg=agg))


def check_engine(engine: Any) -> None:
  """ValueError unless `engine` is an `EngineConfig` or None (the static `generate`)."""
  if engine is not None and not isinstance(engine, EngineConfig):
    raise ValueError(f"`engine` must be an EngineConfig or None; got {type(engine).__name__}.")


def check_multi_turn(multi_turn: Any) -> None:
  """ValueError unless `multi_turn` is a `MultiTurnConfig`."""
  if not isinstance(multi_turn, MultiTurnConfig):
    raise ValueError(f"`multi_turn` must be a MultiTurnConfig; got {type(multi_turn).__name__}.")


def check_training_sampling(sampling: SamplingConfig, min_samples: int = 1) -> None:
  """ValueError unless `sampling` is a `SamplingConfig` usable for training (temperature > 0)."""
  if not isinstance(sampling, SamplingConfig):
    raise ValueError(f"`sampling` must be a SamplingConfig; got {type(sampling).__name__}.")
  if not sampling.temperature > 0:
    raise ValueError(f"`sampling.temperature` must be > 0 for training (the log-probs use it); "
                     f"got {sampling.temperature!r}.")
  check_int("sampling.num_samples", sampling.num_samples, min_samples)


def examples_of(prompts: Any) -> list:
  """The environment examples of a multi-turn step: `prompts` itself (a sequence), or a
  `PromptBatch`'s rows as {"prompt": text, **its fields}."""
  texts = getattr(prompts, "texts", None)
  if texts is None:
    return list(prompts)
  fields = dict(getattr(prompts, "fields", {}) or {})
  return [dict({k: v[i] for k, v in fields.items()}, prompt=text) for i, text in enumerate(texts)]


class OnPolicyTrainer(abc.ABC):
  """Base of `GRPOTrainer` and `PPOTrainer` (see the module doc).

  Args:
    graphdef: the policy's graphdef; optimizer: the optax transformation of its state.
    config: a config with `sampling` (`SamplingConfig`) and `update` (`UpdateConfig`) sections.
    reward_fn: host callable `fn(prompts, completions, **fields) -> float32 [B]` (see
      `rljax.train.scoring.call_reward_fn` for the fields offered).
    tokenizer: decodes completions for the reward function (None: token-id lists are passed).
    stop_tokens, pad_id: as `generate`: ids in [0, V), checked here (`check_token_ids`).
    stop_strings: None or non-empty strings that also end a completion (`rljax.rollout.stops`;
      they need the `tokenizer`), with the engine and with `generate` alike.
    mesh, rules: the training mesh and logical-axis rules; None trains and samples unsharded.
    compiler_options: XLA options of the compiled update.
    environment: None, or an `rljax.agents.Environment`: the rollouts are multi-turn
      (`rljax.agents.multi_turn_rollout` with `config.multi_turn`, through the engine), `step`'s
      prompts are the examples its `reset` takes (a `PromptBatch` becomes one dict per row:
      "prompt" and its fields), the rewards are its step rewards (`reward_fn` must be None)
      and the loss mask holds only the policy's tokens. It needs the `tokenizer` (with a chat
      template).

  Subclasses implement `init_extras`, `make_update` and `prepare` (and may override `collect`
  and `finish`).
  """

  drop_groups = False  # under nonfinite_rewards="drop": drop a row (False) or its whole group

  # Multi-turn: the environment's rewards reach the update per turn (step rewards at the turns'
  # ends: PPO; GRPO with advantage="process") rather than summed per row.
  turn_rewards = False

  def __init__(self, graphdef: nnx.GraphDef, optimizer: Any, config: Any, reward_fn: Callable,
               tokenizer: Any = None, *, stop_tokens: int | Sequence[int], pad_id: int,
               stop_strings: Sequence[str] | None = None, mesh: Any = None, rules: Any = None,
               compiler_options: dict[str, Any] | None = None, environment: Any = None):
    if (mesh is None) != (rules is None):
      raise ValueError("`mesh` and `rules` must be given together (or neither).")
    if environment is None and not callable(reward_fn):
      raise ValueError(f"`reward_fn` must be callable; got {type(reward_fn).__name__}.")
    self.environment, self.chat = environment, None
    if environment is not None:
      self.chat = self._check_environment(environment, reward_fn, tokenizer, config)
    self.stop_tokens = check_token_ids(graphdef, pad_id=pad_id, stop_tokens=stop_tokens)
    self.stop_strings = check_stop_strings(stop_strings, tokenizer)
    check_no_dropout(graphdef, type(self).__name__)
    self.lora = lora_config_of(graphdef) is not None
    self._sampler_graphdef = graphdef
    self.graphdef, self.optimizer, self.config = graphdef, optimizer, config
    self.reward_fn, self.tokenizer = reward_fn, tokenizer
    self.pad_id, self.mesh, self.rules = pad_id, mesh, rules
    self.compiler_options = compiler_options
    self._sampler_shardings = None
    self.update = self._compile(self.make_update())

  # -- hooks ---------------------------------------------------------------------------------

  @abc.abstractmethod
  def init_extras(self, state: TrainState, **kwargs: Any) -> dict[str, Any]:
    """The algorithm's sub-states for `state.extras` (controllers, critic)."""

  @abc.abstractmethod
  def make_update(self) -> Callable:
    """The pure `update(state, batch) -> (state, metrics)` (jitted by the constructor)."""

  @abc.abstractmethod
  def prepare(self, state: TrainState, scored: Scored
              ) -> tuple[TrainState, Experience, dict[str, Any]]:
    """The `Experience` of a scored rollout (and the state, e.g. with an updated controller)."""

  def collect(self, state: TrainState, prompts: Any, key: jax.Array
              ) -> tuple[Scored, dict[str, float]]:
    """Rollout + rewards; the default scores one rollout of `sampling.num_samples` per prompt
    with one reward per sequence."""
    scored = self.rollout(state, prompts, key, process=False)
    return scored, rollout_metrics(scored)

  def finish(self, state: TrainState, batch: Experience) -> tuple[TrainState, dict[str, float]]:
    """After the updates of a step (default: nothing)."""
    return state, {}

  @property
  def needs_reference(self) -> bool:
    """Whether a KL term needs the reference policy's log-probs."""
    return self.config.kl_coef > 0

  # -- state ---------------------------------------------------------------------------------

  def init_state(self, state: TrainState, **kwargs: Any) -> TrainState:
    """`state` with the trainer's sub-states in `extras`: the reference policy (a copy of the
    current parameters when a KL term needs it) and the algorithm's own. Call once at the start
    of training, not on a restored state (whose extras already hold them); traceable, so
    `jax.eval_shape(trainer.init_state, abstract_state)` gives a restore target.

    With LoRA (`rljax.models.lora`) the reference is the frozen base (`state.frozen`, never
    copied) with a copy of the initial adapters, `{"params": adapters}`: a fresh adapter's B is 0,
    so that is the base model exactly; an imported one is its starting point (TRL's
    `ref_adapter_name`)."""
    extras = dict(state.extras)
    if self.needs_reference:
      reference = {"params": state.params}
      if not self.lora:
        reference["frozen"] = state.frozen
      extras[REFERENCE] = jax.tree.map(jnp.copy, reference)
    extras.update(self.init_extras(state, **kwargs))
    return state.replace(extras=extras)

  def check_state(self, state: TrainState) -> None:
    """ValueError unless `state.extras` holds what this trainer needs (`init_state`)."""
    missing = [k for k in self.required_extras() if k not in state.extras]
    if missing:
      raise ValueError(f"`state.extras` lacks {missing}: call `state = trainer.init_state(state)` "
                       "once before the first step (a restored state already has them).")

  def required_extras(self) -> list[str]:
    return [REFERENCE] if self.needs_reference else []

  # -- pieces --------------------------------------------------------------------------------

  def _compile(self, update: Callable) -> Callable:
    if self.mesh is None:
      return jax.jit(update, donate_argnums=(0,), compiler_options=self.compiler_options)
    return jit_step_by_rules(update, self.mesh, self.rules,
                             compiler_options=self.compiler_options)

  def scope(self):
    """`use_mesh(mesh, rules)` so the models' activation constraints apply (no mesh: none)."""
    return contextlib.nullcontext() if self.mesh is None else use_mesh(self.mesh, self.rules)

  def sampler_params(self, state: TrainState) -> nnx.State:
    """One `nnx.State` of trainable and frozen variables for
    `generate((trainer.sampler_graphdef, state))`, cast to `sampling.rollout_dtype` and placed
    in the inference layout (on a mesh). LoRA adapters are merged into it (W + s · A B, adapters
    off: `rljax.models.lora.merged`), so decoding runs the base model's matmuls only."""
    dtype = self.config.sampling.rollout_dtype
    params = nnx.merge_state(state.params, state.frozen)
    if self.lora:  # a quantised base (QLoRA) samples unmerged: no full-precision copy
      model = nnx.merge(self.graphdef, params)
      if not is_quantized(model):
        self._sampler_graphdef, params = nnx.split(merged(model))
    params = cast_floating(params, None if dtype is None else jnp.dtype(dtype))
    if self.mesh is None:
      return params
    if self._sampler_shardings is None:
      self._sampler_shardings = variable_shardings(params, self.mesh,
                                                   inference_rules(self.rules))
    return jax.device_put(params, self._sampler_shardings)

  @property
  def sampler_graphdef(self) -> nnx.GraphDef:
    """The graphdef of `sampler_params` (with LoRA: the adapters off, once it has run)."""
    return self._sampler_graphdef

  def pack(self, batch: Experience) -> Experience:
    """`batch` packed (`pack_experience`) when `update.packing`, into a row count the data axes,
    minibatches and microbatches divide; else unchanged."""
    u = self.config.update
    if not u.packing:
      return batch
    data = 1
    if self.mesh is not None:
      data = math.prod(self.mesh.shape[a] for a in (DATA, FSDP) if a in self.mesh.axis_names)
    multiple = data * u.num_minibatches * u.num_microbatches
    return self.shard_batch(pack_experience(batch.replace(scores=None), row_multiple=multiple))

  def shard_batch(self, batch: Any) -> Any:
    """On a mesh, every [B, ...] leaf placed with its rows over the data axes (the layout of the
    update's batch); unchanged without a mesh."""
    if self.mesh is None:
      return batch
    return jax.device_put(batch, default_batch_sharding(self.mesh))


  def _check_environment(self, environment: Any, reward_fn: Any, tokenizer: Any, config: Any
                         ) -> ChatTurns:
    """The `ChatTurns` of a multi-turn trainer, after checking its arguments."""
    if not (callable(getattr(environment, "reset", None))
            and callable(getattr(environment, "step", None))):
      raise ValueError(f"`environment` must be an rljax.agents.Environment (reset and step); got "
                       f"{type(environment).__name__}.")
    if reward_fn is not None:
      raise ValueError("with an `environment` the rewards are its own: `reward_fn` must be None.")
    if config.engine is None:
      raise ValueError("multi-turn rollouts run on the engine: `engine` must be an EngineConfig.")
    if getattr(config, "overlong_cache", None) is not None:
      raise ValueError("`overlong_cache` does not apply to multi-turn rollouts (the budget is "
                       "shared by turns and observations); set it to None.")
    return ChatTurns(tokenizer)

  def rollout(self, state: TrainState, prompts: Any, key: jax.Array,
              sampling: SamplingConfig | None = None, **kwargs: Any) -> Scored:
    """Completions of `prompts` from the current policy, scored on the host (`sampling`
    defaults to the config's); with an `environment`, its multi-turn trajectories."""
    params = self.sampler_params(state)
    if self.environment is not None:
      c = self.config
      tools = getattr(self.environment, "tool_schemas", None)
      return collect_trajectories(
        self.sampler_graphdef, params, examples_of(prompts), key, sampling or c.sampling,
        env=self.environment, chat=self.chat, process=self.turn_rewards,
        stop_tokens=self.stop_tokens, pad_id=self.pad_id, config=c.multi_turn,
        seed=int(jax.random.randint(key, (), 0, 2**31 - 1)), stop_strings=self.stop_strings,
        tools=tools() if callable(tools) else None, engine=c.engine, mesh=self.mesh)
    return collect_rollout(
      self.sampler_graphdef, params, prompts, key, sampling or self.config.sampling,
      reward_fn=self.reward_fn, tokenizer=self.tokenizer, stop_tokens=self.stop_tokens,
      pad_id=self.pad_id, nonfinite_rewards=self.config.nonfinite_rewards,
      drop_groups=self.drop_groups, engine=self.config.engine, mesh=self.mesh,
      stop_strings=self.stop_strings, **kwargs)

  def logprobs(self, params: Any, frozen: Any, batch: Experience, *,
               return_entropy: bool = False):
    """Jitted [B, N] completion log-probs of `batch` under (params, frozen) (0 off the mask)."""
    c = self.config
    return policy_logprobs(self.graphdef, params, frozen, batch,
                           temperature=float(c.sampling.temperature),
                           chunk_size=c.update.chunk_size, return_entropy=return_entropy)

  def reference_logprobs(self, state: TrainState, batch: Experience) -> jax.Array:
    """Log-probs under `state.extras["reference"]` (log-probs only: no entropy); with LoRA its
    adapters on the current frozen base."""
    ref = state.extras[REFERENCE]
    return self.logprobs(ref["params"], ref.get("frozen", state.frozen), batch)

  # -- the loop ------------------------------------------------------------------------------

  def step(self, state: TrainState, prompts: Any, key: jax.Array | None = None,
           update_args: tuple = ()) -> tuple[TrainState, dict[str, float]]:
    """One rollout, then num_epochs × num_minibatches updates, then the finish hook.

    `key` defaults to `fold_in(state.rng, state.step)` (a resumed run continues the same key
    sequence). Metrics: the rollout's (reward_mean, reward_std, response_length,
    truncation_rate, tokens_per_second, ...), `prepare`'s, the means over updates of the
    update's metrics (loss, clipfrac, approx_kl, ratio_mean, grad_norm, learning_rate, skipped,
    ...), `first_ratio_mean` / `first_clipfrac` / `first_kl` of the first update (1, 0 and, at
    the first step, 0 on-policy), `update_seconds` (the updates' wall time) and `mfu` (with
    `update.peak_flops`). `update_args` are passed to every update after the batch (PPO: its
    ptx batch).
    """
    self.check_state(state)
    u = self.config.update
    with self.scope():
      if key is None:
        key = jax.random.fold_in(state.rng, state.step)
      rollout_key, shuffle_key = jax.random.split(key)
      scored, metrics = self.collect(state, prompts, rollout_key)
      state, batch, prepared = self.prepare(state, scored)
      batch = self.shard_batch(batch)
      rng = np.random.default_rng(int(jax.random.randint(shuffle_key, (), 0, 2**31 - 1)))
      history = []
      start = time.perf_counter()
      for _ in range(u.num_epochs):
        for rows in minibatch_indices(batch.num_rows, u.num_minibatches, rng):
          mb = batch if u.num_minibatches == 1 else self.shard_batch(take_rows(batch, rows))
          state, m = self.update(state, mb, *update_args)
          history.append(m)
      metrics.update(mean_metrics(history))  # fetching the metrics waits for the updates
      seconds = time.perf_counter() - start
      first = jax.device_get(history[0])
      metrics.update({k: float(v) for k, v in jax.device_get(prepared).items()})
      metrics.update({f"first_{k}": float(first[k]) for k in FIRST_METRICS if k in first})
      metrics["update_seconds"] = seconds
      if u.peak_flops is not None:
        flops = len(history) * self.update_flops(state, batch)
        metrics["mfu"] = flops / seconds / u.peak_flops
      state, finished = self.finish(state, batch)
      metrics.update(finished)
    return state, metrics

  def update_flops(self, state: TrainState, batch: Experience) -> float:
    """Analytic FLOPs of one update over a minibatch of `batch` (`rljax.train.flops`)."""
    model_config = nnx.merge(self.graphdef, state.params, state.frozen).config
    rows = batch.num_rows // self.config.update.num_minibatches
    return update_flops(model_config, rows, batch.prompt_length, batch.loss_mask.shape[1])

  def evaluate(self, state: TrainState, prompts: Any, key: jax.Array, *, k: int = 1,
               temperature: float = 0.0) -> dict[str, float]:
    """Accuracy (mean of reward > 0.5) and pass@k of k completions per prompt.

    k = 1 with temperature 0 is greedy accuracy; for k > 1 a temperature of 0 is replaced by the
    config's sampling temperature. Other sampling options are the config's. Returns
    {"accuracy", "reward_mean", f"pass@{k}"}.
    """
    check_int("k", k, 1)
    sampling = self.config.sampling
    if k > 1 and temperature == 0:
      temperature = sampling.temperature
    sampling = dataclasses.replace(sampling, num_samples=k, temperature=float(temperature))
    with self.scope():
      return accuracy_metrics(self.rollout(state, prompts, key, sampling), k)

