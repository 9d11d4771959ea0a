"""Reward-model objectives: Bradley–Terry on pairs, listwise on rankings, held-out pair accuracy.

Objectives follow the contract of `rljax.train.step.make_train_step`,
`loss_fn(model, batch, *, normalizer) -> (loss, metrics)`, with `model` a `RewardModel`
(`rljax.models.heads`: one float32 reward per row, read at the last valid token):

  reward_pair_objective      + pair_count      Bradley–Terry on (chosen, rejected) pairs
  listwise_reward_objective  + ranking_count   all K-choose-2 pairs of ranked lists (InstructGPT)

With a normalizer N (the global number of pairs / lists of the full batch) each returns its rows'
*sum* divided by N, so summing microbatch losses and gradients gives exactly the full-batch
value; with `normalizer=None` it is the plain mean over its own batch.

Batch keys (right- or left-padded token ids; no loss mask is needed — the reward is read at the
last position with attention_mask 1, so the rows must hold prompt + response):

  pairs     "chosen_input_ids", "chosen_attention_mask", "rejected_input_ids",
            "rejected_attention_mask" [B, T] (the keys of `dpo_objective`; its loss masks, if
            present, are ignored); optional "margin" [B] (per-pair margin, Llama 2).
  rankings  "input_ids", "attention_mask" [B, K, T], response k of prompt b at [b, k], ranked
            best first (k = 0 the best).

A packed pair batch (`rljax.data.packing`: "segment_ids", chosen_0..chosen_{P-1} then
rejected_0..rejected_{P-1}; "margin" [P]) gives the rewards at each segment's last token from
one pass over its rows, and the loss is averaged over the present pairs
(`rljax.train.packed`), equal to the unpacked one.

`pair_accuracy(model, batches)` is the held-out evaluation: the fraction of pairs whose chosen
response gets the strictly larger reward (ties count as wrong, TRL's convention), jitted.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.losses.reward_model import listwise_reward_loss, reward_model_loss
from rljax.ops._checks import check_ndim, check_same_shape, check_integer_ids
from rljax.train import packed
from rljax.train.normalizers import rescale_to_normalizer
from rljax.train.objectives import check_batch_keys, pair_count
from rljax.train.supervised import RewardModelConfig

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]

PAIR_REWARD_KEYS = (
  "chosen_input_ids",
  "chosen_attention_mask",
  "rejected_input_ids",
  "rejected_attention_mask",
)
RANKING_KEYS = ("input_ids", "attention_mask")


def graphdef_and_states(model: Any) -> tuple[nnx.GraphDef, tuple[Any, ...]]:
  """(graphdef, states) of an NNX module, or of a `(graphdef, state, ...)` tuple as given."""
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return graphdef, (state,)
  if isinstance(model, (tuple, list)) and len(model) >= 2:
    return model[0], tuple(model[1:])
  raise ValueError(
    f"`model` must be an nnx.Module or a (graphdef, state, ...) tuple; got {type(model)}."
  )


def pair_rewards(model: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Rewards ([B] chosen, [B] rejected) of a pair batch under a `RewardModel`.

  Chosen and rejected rows of equal shape go through one [2B, T] forward pass; otherwise two.
  A packed batch gives ([P], [P]) from one pass over its rows.
  """
  if packed.is_packed(batch):
    packed.check_packed(batch, "a reward-model pair batch")
    ids, attention, positions, segments = packed.model_inputs(batch)
    rewards = model(ids, attention, positions, segments, num_segments=packed.num_sequences(batch))
    return packed.halves(rewards)
  check_batch_keys(batch, PAIR_REWARD_KEYS, "a reward-model pair batch")
  c_ids, c_mask, r_ids, r_mask = (jnp.asarray(batch[k]) for k in PAIR_REWARD_KEYS)
  check_same_shape(chosen_input_ids=c_ids, chosen_attention_mask=c_mask)
  check_same_shape(rejected_input_ids=r_ids, rejected_attention_mask=r_mask)
  for name, ids in (("chosen_input_ids", c_ids), ("rejected_input_ids", r_ids)):
    check_ndim(name, ids, 2)
    check_integer_ids(name, ids)
  if c_ids.shape[0] != r_ids.shape[0]:
    raise ValueError(
      f"`chosen_input_ids` has shape {c_ids.shape} but `rejected_input_ids` has shape "
      f"{r_ids.shape}; they must have the same number of rows."
    )
  if c_ids.shape == r_ids.shape:
    rewards = model(jnp.concatenate([c_ids, r_ids]), jnp.concatenate([c_mask, r_mask]))
    b = c_ids.shape[0]
    return rewards[:b], rewards[b:]
  return model(c_ids, c_mask), model(r_ids, r_mask)


def reward_pair_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  margin: float | None = RewardModelConfig.margin,
  center_coef: float | None = RewardModelConfig.center_coef,
) -> tuple[jax.Array, Metrics]:
  """Bradley–Terry reward-model objective on preference pairs (TRL's `RewardTrainer`).

    loss = Σ_b [−logσ(r_c[b] − r_r[b] − m[b]) + c·(r_c[b] + r_r[b])²] / N,   N = normalizer or B

  r = model(prompt + response) is the `RewardModel`'s reward. See
  `rljax.losses.reward_model.reward_model_loss` for the margin (Llama 2) and the centring term
  (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`, e.g. 0.01).

  Args:
    model: a `RewardModel` (anything mapping (ids [B, T], mask [B, T]) to rewards [B]).
    batch: the pair keys of the module docstring; an optional "margin" [B] gives per-pair
      margins (data, stop-gradient).
    normalizer: the global number of pairs (`pair_count` of the full batch); None means B.
    margin: a scalar margin m for every pair (default None: 0). Giving both this and a
      batch "margin" raises ValueError.
    center_coef: c ≥ 0 of the centring term; None (default) leaves it out.

  Returns:
    (loss, {"reward_accuracy" (fraction with r_c > r_r; ties wrong), "reward_margin",
    "rewards_chosen", "rewards_rejected"} — means over this batch, no gradient).

  Example:
    >>> loss_fn = functools.partial(reward_pair_objective, center_coef=0.01)
    >>> step = make_train_step(loss_fn, graphdef, optimizer, count_fn=pair_count)
  """
  if margin is not None and "margin" in batch:
    raise ValueError("Give a per-pair batch['margin'] or the scalar `margin`, not both.")
  per_pair_margin = batch["margin"] if "margin" in batch else margin
  chosen, rejected = pair_rewards(model, batch)
  weights = packed.pair_weights(batch) if packed.is_packed(batch) else None
  margins = {}
  if per_pair_margin is not None and jnp.ndim(per_pair_margin) > 0:
    margins = {"margin": jnp.asarray(per_pair_margin)}  # [B]: one per example
  loss_fn = functools.partial(reward_model_loss, center_coef=center_coef,
                              **({} if margins else {"margin": per_pair_margin}))
  loss, metrics = packed.example_mean(loss_fn, weights, chosen, rejected, **margins)
  return rescale_to_normalizer(loss, packed.count_of(chosen, weights), normalizer), metrics


def ranking_count(batch: Batch) -> jax.Array:
  """Number of ranked lists B of a listwise batch ("input_ids" [B, K, T]; float32 scalar)."""
  check_batch_keys(batch, ("input_ids",), "ranking_count")
  return jnp.asarray(jnp.shape(batch["input_ids"])[0], jnp.float32)


def ranking_rewards(model: Any, batch: Batch) -> jax.Array:
  """[B, K] rewards of a listwise batch (one [B·K, T] forward pass)."""
  check_batch_keys(batch, RANKING_KEYS, "a listwise reward-model batch")
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  check_ndim("input_ids", ids, 3)
  check_same_shape(input_ids=ids, attention_mask=mask)
  b, k, t = ids.shape
  if k < 2:
    raise ValueError(
      f"`input_ids` must hold K >= 2 ranked responses per row; got shape {ids.shape}."
    )
  return model(ids.reshape(b * k, t), mask.reshape(b * k, t)).reshape(b, k)


def listwise_reward_objective(
  model: Any, batch: Batch, *, normalizer: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """Listwise reward-model objective over ranked responses (InstructGPT, Ouyang et al. 2022).

    loss = Σ_b [1/C(K,2) · Σ_{i<j} −logσ(r[b,i] − r[b,j])] / N,   N = normalizer or B

  Every one of the K-choose-2 pairs of a prompt's ranked list is a comparison; InstructGPT puts
  all of them in one batch element (so each prompt weighs the same, and the K forward passes
  are shared by its C(K,2) pairs). With K = 2 this is `reward_pair_objective`.

  Args:
    model: a `RewardModel`.
    batch: {"input_ids", "attention_mask"} [B, K, T], K ≥ 2, ranked best first.
    normalizer: the global number of lists (`ranking_count` of the full batch); None means B.

  Returns:
    (loss, {"reward_accuracy" (fraction of the B·C(K,2) pairs ordered correctly),
    "reward_margin" (mean r_i − r_j over pairs), "rewards_best", "rewards_worst" (means of
    column 0 and K−1)}).

  Example:
    >>> step = make_train_step(listwise_reward_objective, graphdef, optimizer,
    ...                        count_fn=ranking_count)
  """
  rewards = ranking_rewards(model, batch)
  loss, metrics = listwise_reward_loss(rewards)
  r = jax.lax.stop_gradient(rewards)
  metrics = {**metrics, "rewards_best": jnp.mean(r[:, 0]), "rewards_worst": jnp.mean(r[:, -1])}
  return rescale_to_normalizer(loss, rewards.shape[0], normalizer), metrics


@functools.partial(jax.jit, static_argnums=0)
def _pair_wins(graphdef: nnx.GraphDef, states: tuple[Any, ...], batch: Batch) -> jax.Array:
  """(wins, pairs) of one batch (packed: over the present pairs)."""
  chosen, rejected = pair_rewards(nnx.merge(graphdef, *states), batch)
  wins = (chosen > rejected).astype(jnp.float32)
  if packed.is_packed(batch):
    weights = packed.pair_weights(batch)
    return jnp.sum(wins * weights), jnp.sum(weights)
  return jnp.sum(wins), jnp.asarray(wins.shape[0], jnp.float32)


def pair_accuracy(model: Any, batches: Batch | Iterable[Batch]) -> float:
  """Held-out pair accuracy of a reward model: the fraction of pairs with r_c > r_r.

  Ties count as wrong (TRL's `compute_accuracy` convention), so a constant reward scores 0.
  Jitted (one compile per batch shape); only the four pair keys are sent to the device.

  Args:
    model: a `RewardModel`, or `(graphdef, state, ...)` as from `nnx.split` (e.g.
      `(graphdef, train_state.params, train_state.frozen)`).
    batches: one pair batch (keys as `reward_pair_objective`) or an iterable of them; the
      accuracy is over all their pairs.

  Returns:
    The accuracy as a Python float in [0, 1] (0.0 for no pairs).

  Example:
    >>> acc = pair_accuracy((graphdef, state.params, state.frozen), held_out_batches)
  """
  graphdef, states = graphdef_and_states(model)
  if isinstance(batches, Mapping):
    batches = [batches]
  wins, pairs = 0.0, 0
  for batch in batches:
    keys = packed.PACKED_KEYS if packed.is_packed(batch) else PAIR_REWARD_KEYS
    check_batch_keys(batch, keys, "pair_accuracy")
    batch_wins, batch_pairs = _pair_wins(graphdef, states, {k: batch[k] for k in keys})
    wins, pairs = wins + float(batch_wins), pairs + int(batch_pairs)
  return wins / pairs if pairs else 0.0


__all__ = [
  "listwise_reward_objective",
  "pair_accuracy",
  "pair_count",
  "pair_rewards",
  "ranking_count",
  "ranking_rewards",
  "reward_pair_objective",
]
