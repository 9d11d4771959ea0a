"""What the on-policy trainers (GRPO, PPO) share: the reference, the sampler's parameters, rollout.

`OnPolicyTrainer` holds the policy's graphdef, the reward function and the sampling settings, and
provides

  shard_batch(batch)      experience rows over the mesh's data axes
  reference(state)        the frozen reference (params, frozen); default: the first state's
  sampler_params(state)   the trainer's parameters handed to the sampler ONCE per rollout: cast to
                          `config.rollout_dtype` and, on a mesh, re-sharded to the inference
                          layout (`rljax.parallel.rules.inference_rules`: fsdp gathered once,
                          tensor parallelism kept), so no decode step gathers parameters
  rollout(...)            `collect_rollout` with those parameters (`Scored`)
  evaluate(...)           greedy accuracy / pass@k of a verifiable reward

Casting for inference. Sampling in bf16 halves the bytes each decode step reads; the trainer
still recomputes old_logp with its own forward pass in the training dtype, so the PPO ratio is
unaffected, and `use_rollout_logprobs=True` (GRPO's truncated importance sampling) corrects for
the sampler/trainer mismatch that the cast introduces.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.parallel.mesh import use_mesh
from rljax.parallel.rules import inference_rules
from rljax.train.experience import Scored, accuracy_metrics, collect_rollout
from rljax.train.state import TrainState, cast_floating, variable_shardings
from rljax.train.step import default_batch_sharding


def check_rollout_dtype(name: str | None) -> None:
  """ValueError unless `name` is None or a floating dtype name ("bfloat16", "float32", ...)."""
  if name is None:
    return
  try:
    floating = jnp.issubdtype(jnp.dtype(name), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"`rollout_dtype` must be None or a floating dtype name such as "
                     f"'bfloat16'; got {name!r}.")


def under_mesh(method: Callable) -> Callable:
  """Runs a trainer method inside `use_mesh(trainer.mesh, trainer.rules)` (when it has a mesh),
  so the models' activation constraints (`rljax.parallel.constrain`) apply as they are traced."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    context = contextlib.nullcontext() if self.mesh is None else use_mesh(self.mesh, self.rules)
    with context:
      return method(self, *args, **kwargs)

  return wrapper


class OnPolicyTrainer:
  """Base of `GRPOTrainer` and `PPOTrainer` (see the module doc).

  Args:
    graphdef: the policy's graphdef; config: a config with max_new_tokens, temperature, top_k,
      top_p and rollout_dtype fields.
    reward_fn, tokenizer, stop_tokens, pad_id: as `collect_rollout`.
    ref_params: frozen reference (params, frozen); None takes the first state's parameters.
    mesh, rules: the training mesh and rules; None trains and samples without shardings.
  """

  def __init__(self, graphdef: nnx.GraphDef, config: Any, reward_fn: Callable,
               tokenizer: Any = None, *, stop_tokens: int | Sequence[int], pad_id: int,
               ref_params: Any = None, mesh: Any = None, rules: Any = None):
    if (mesh is None) != (rules is None):
      raise ValueError("`mesh` and `rules` must be given together (or neither).")
    self.graphdef, self.config = graphdef, config
    self.reward_fn, self.tokenizer = reward_fn, tokenizer
    self.stop_tokens = (stop_tokens,) if isinstance(stop_tokens, int) else tuple(stop_tokens)
    self.pad_id, self.ref_params = pad_id, ref_params
    self.mesh, self.rules = mesh, rules
    self._sampler_shardings = None

  def reference(self, state: TrainState) -> tuple[Any, Any]:
    """The frozen reference (params, frozen); copies of the first state's on first use (the
    train step donates the state's buffers)."""
    if self.ref_params is None:
      self.ref_params = jax.tree.map(jnp.copy, (state.params, state.frozen))
    return self.ref_params

  def sampler_params(self, state: TrainState) -> nnx.State:
    """One `nnx.State` of trainable and frozen variables for `generate((graphdef, state))`,
    cast to `config.rollout_dtype` and placed in the inference layout (on a mesh)."""
    dtype = self.config.rollout_dtype
    params = cast_floating(nnx.merge_state(state.params, state.frozen),
                           None if dtype is None else jnp.dtype(dtype))
    if self.mesh is None:
      return params
    if self._sampler_shardings is None:
      self._sampler_shardings = variable_shardings(params, self.mesh,
                                                   inference_rules(self.rules))
    return jax.device_put(params, self._sampler_shardings)

  def shard_batch(self, batch: Any) -> Any:
    """On a mesh, every [B, ...] leaf placed with its rows over the data axes (the layout of the
    update's batch, `default_batch_sharding`); unchanged without a mesh. Forward passes over
    the experience then run data-parallel, and the update receives what it expects."""
    if self.mesh is None:
      return batch
    return jax.device_put(batch, default_batch_sharding(self.mesh))

  def rollout(self, state: TrainState, prompts: Any, key: jax.Array, num_samples: int,
              temperature: float, **kwargs: Any) -> Scored:
    """`num_samples` completions per prompt from the current policy, scored on the host."""
    c = self.config
    return collect_rollout(
      self.graphdef, self.sampler_params(state), prompts, key, reward_fn=self.reward_fn,
      tokenizer=self.tokenizer, num_samples=num_samples, max_new_tokens=c.max_new_tokens,
      temperature=temperature, top_k=c.top_k, top_p=c.top_p, stop_tokens=self.stop_tokens,
      pad_id=self.pad_id, **kwargs,
    )

  @under_mesh
  def evaluate(self, state: TrainState, prompts: Any, key: jax.Array, *, k: int = 1,
               temperature: float = 0.0) -> dict[str, float]:
    """Accuracy (mean of reward > 0.5) and pass@k of k completions per prompt.

    k = 1 with temperature 0 is greedy accuracy; for k > 1 a temperature of 0 is replaced by the
    config's sampling temperature. Returns {"accuracy", "reward_mean", f"pass@{k}"}.
    """
    if k > 1 and temperature == 0:
      temperature = self.config.temperature
    return accuracy_metrics(self.rollout(state, prompts, key, k, temperature), k)
