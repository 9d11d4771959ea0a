"""Preference objectives beyond pairwise DPO (KTO, ORPO, SimPO, CPO) and reference log-probs.

Objectives follow `loss_fn(model, batch, *, normalizer) -> (loss, metrics)` of
`rljax.train.step.make_train_step`, composing a policy forward pass with `rljax.losses.preference`:

  kto_objective    + example_count   unpaired desirable / undesirable completions
  orpo_objective   + pair_count      reference-free, odds ratio of average log-probs + NLL
  simpo_objective  + pair_count      reference-free, average log-probs with a target margin
  cpo_objective    + pair_count      reference-free, summed log-probs + NLL

(`rljax.train.objectives.dpo_objective` covers DPO and its pairwise variants.) With a normalizer N
(the global number of pairs / examples) each returns its rows' sum divided by N, so microbatch
losses and gradients sum exactly to the full-batch ones — except KTO's reference point z, a
batch statistic (stop-gradient) that each microbatch estimates from its own KL rows, as TRL does
under gradient accumulation.

Reference log-probs are data. `reference_logps(ref_graphdef, ref_params, batch)` computes them
once per batch with one jitted forward pass of the frozen reference (the caller adds them to the
batch, `add_reference_logps`), or `precompute_reference_logps(ref_model, batches)` once for a
dataset; DPO and KTO read them from the batch and never differentiate them.

Batch keys ([B, T] token ids of prompt + response; `loss_mask` is 1 on the response tokens,
which are scored from position 1 on, as in `sft_loss`):

  pairs     "chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask",
            "rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask"
            (+ "ref_chosen", "ref_rejected" [B] for DPO)
  KTO       "input_ids", "attention_mask", "loss_mask", "label" [B] bool (True: desirable),
            "ref_logps" [B]; optionally the KL rows "kl_input_ids", "kl_attention_mask",
            "kl_loss_mask" (each prompt with a mismatched completion, TRL's KL dataset) and
            "ref_kl_logps" [B]. Without KL rows the reference point z is 0.

Packed batches (`rljax.data.packing`, selected by "segment_ids"; `rljax.train.packed`): a pair
batch holds chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1} as its N = 2P sequences; a KTO
batch ("label" [P]) its P completions, then (N = 2P) the P KL completions, KL completion j the
pair of prompt j. The per-sequence arrays ("ref_chosen", "ref_logps", "label", ...) are [P].
Every objective and `reference_logps` read them by segment and equal the unpacked ones.

NLL convention (ORPO, CPO): the chosen NLL is each chosen response's token-mean NLL averaged
over pairs ("seq-mean-token-mean"), which splits exactly over microbatches of pairs. TRL uses
the token-mean over all chosen tokens of the batch; the two agree when the chosen responses have
equal lengths.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.losses.preference import cpo_loss, kto_loss, orpo_loss, simpo_loss
from rljax.ops.logprobs import sequence_logprobs
from rljax.ops.masking import masked_mean, safe_divide
from rljax.train import packed
from rljax.train.objectives import (
  CHOSEN_KEYS,
  FIELDS,
  REJECTED_KEYS,
  batch_token_logprobs,
  check_batch_keys,
  group_token_logps,
  pair_count,
  pair_sequence_logps,
  row_group,
)
from rljax.train.normalizers import rescale_to_normalizer
from rljax.train.reward_modeling import graphdef_and_states
from rljax.train.supervised import CPOConfig, KTOConfig, ORPOConfig, SimPOConfig

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
UNPAIRED_KEYS = FIELDS
KL_KEYS = tuple(f"kl_{f}" for f in FIELDS)


# ----------------------------------------------------------------------------------------------
# Reference log-probs, once per batch or once per dataset.
# ----------------------------------------------------------------------------------------------


def _reference_groups(batch: Batch) -> dict[str, tuple[str, ...]]:
  """Output name → the keys of its rows, for every group of rows present in the batch."""
  groups = {}
  if all(k in batch for k in CHOSEN_KEYS + REJECTED_KEYS):
    groups["ref_chosen"] = CHOSEN_KEYS
    groups["ref_rejected"] = REJECTED_KEYS
  if all(k in batch for k in UNPAIRED_KEYS):
    groups["ref_logps"] = UNPAIRED_KEYS
  if all(k in batch for k in KL_KEYS):
    groups["ref_kl_logps"] = KL_KEYS
  if not groups:
    raise ValueError(
      "reference_logps needs the pair keys "
      f"{list(CHOSEN_KEYS + REJECTED_KEYS)} and/or the unpaired keys {list(UNPAIRED_KEYS)} "
      f"(optionally {list(KL_KEYS)}); the batch has {sorted(batch)}."
    )
  return groups


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "chunk_size"))
def _reference_logps(graphdef, states, rows, *, names, chunk_size):
  """Jitted body of `reference_logps`; `names` is ((output name, row keys), ...)."""
  model = nnx.merge(graphdef, *states)
  groups = [row_group(rows, keys) for _, keys in names]
  logps = group_token_logps(model, groups, chunk_size=chunk_size)
  return {
    name: jax.lax.stop_gradient(sequence_logprobs(logp, mask))
    for (name, _), (logp, mask) in zip(names, logps)
  }


def _packed_reference_names(batch: Batch) -> tuple[str, ...]:
  """The reference keys of a packed batch, one per equal part of its N sequences (module doc)."""
  n = packed.num_sequences(batch)
  if "label" in batch:
    p = int(np.shape(batch["label"])[0])
    if n not in (p, 2 * p):
      raise ValueError(f"a packed KTO batch has N = P or 2P sequence slots for P = {p} labels; "
                       f"`sequence_mask` has {n}.")
    return ("ref_logps", "ref_kl_logps") if n == 2 * p else ("ref_logps",)
  if n % 2:
    raise ValueError(f"a packed pair batch has an even number of sequence slots; got {n}.")
  return ("ref_chosen", "ref_rejected")


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "chunk_size"))
def _packed_reference_logps(graphdef, states, rows, *, names, chunk_size):
  """Jitted body of `reference_logps` for a packed batch: one pass over its rows."""
  logp = batch_token_logprobs(nnx.merge(graphdef, *states), rows, chunk_size=chunk_size)
  sums, _ = packed.sequence_sums(logp, packed.response_mask(rows), rows)
  return {name: jax.lax.stop_gradient(part)
          for name, part in zip(names, jnp.split(sums, len(names)))}


def reference_logps(
  ref_graphdef: nnx.GraphDef, ref_params: Any, batch: Batch, *, chunk_size: int = 64
) -> dict[str, jax.Array]:
  """Reference-model sequence log-probs of a preference batch: one jitted forward pass.

    ref[b] = Σ_t loss_mask[b, t+1] · log π_ref(x[b, t+1] | x[b, ≤t])

  the same sums over the same response tokens as the policy side of `dpo_objective` /
  `kto_objective`, returned without gradient (the reference is frozen). Call it once per batch
  (before the train step, or inside a custom step) and add the result to the batch.

  Args:
    ref_graphdef: the reference model's graphdef (hashable; a static jit argument).
    ref_params: its state: one `nnx.State`, or a tuple of states (e.g. `(params, frozen)`)
      merged with `nnx.merge(ref_graphdef, *states)`.
    batch: a pair batch and/or a KTO batch (keys in the module docstring); only the token keys
      go to the device.
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    {"ref_chosen", "ref_rejected"} [B] float32 for a pair batch; {"ref_logps"} for a KTO batch,
    plus "ref_kl_logps" when it has KL rows. A packed batch gives the same keys, [P] each.

  Raises:
    ValueError: the batch holds none of the key groups.

  Example:
    >>> batch = {**batch, **reference_logps(ref_graphdef, ref_params, batch)}
    >>> state, metrics = dpo_step(state, batch)
  """
  states = tuple(ref_params) if isinstance(ref_params, (tuple, list)) else (ref_params,)
  if packed.is_packed(batch):
    packed.check_packed(batch, "reference_logps")
    rows = {k: batch[k] for k in packed.PACKED_KEYS}
    return _packed_reference_logps(ref_graphdef, states, rows,
                                   names=_packed_reference_names(batch), chunk_size=chunk_size)
  groups = _reference_groups(batch)
  rows = {k: batch[k] for keys in groups.values() for k in keys}
  return _reference_logps(ref_graphdef, states, rows, names=tuple(groups.items()),
                          chunk_size=chunk_size)


def add_reference_logps(
  ref_graphdef: nnx.GraphDef, ref_params: Any, batch: Batch, *, chunk_size: int = 64
) -> Batch:
  """`{**batch, **reference_logps(ref_graphdef, ref_params, batch)}` (a new dict)."""
  return {**batch, **reference_logps(ref_graphdef, ref_params, batch, chunk_size=chunk_size)}


def precompute_reference_logps(
  ref_model: Any, batches: Iterable[Batch], *, chunk_size: int = 64
) -> list[Batch]:
  """Reference log-probs of a whole dataset, computed once before training (TRL's
  `precompute_ref_log_probs`), so the reference model can be freed during training.

  Args:
    ref_model: the reference model: an NNX module or `(graphdef, state, ...)`.
    batches: an iterable of batches (keys as `reference_logps`).
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    A list of new batches, each the input batch plus its reference keys as host numpy float32
    arrays (one compile per batch shape).

  Example:
    >>> train_batches = precompute_reference_logps(sft_model, pair_batches)
  """
  graphdef, states = graphdef_and_states(ref_model)
  out = []
  for batch in batches:
    refs = reference_logps(graphdef, states, batch, chunk_size=chunk_size)
    out.append({**batch, **{k: np.asarray(v) for k, v in refs.items()}})
  return out


# ----------------------------------------------------------------------------------------------
# Objectives.
# ----------------------------------------------------------------------------------------------


def example_count(batch: Batch) -> jax.Array:
  """Number of (unpaired) examples B of a KTO batch (float32 scalar); packed, the real example
  slots Σ sequence_mask[:P]."""
  if packed.is_packed(batch):
    p = jnp.shape(batch["label"])[0]
    return jnp.sum((jnp.asarray(batch[packed.SEQUENCE_MASK])[:p] != 0).astype(jnp.float32))
  check_batch_keys(batch, ("input_ids",), "example_count")
  return jnp.asarray(jnp.shape(batch["input_ids"])[0], jnp.float32)


def _kto_sequence_logps(model: Any, batch: Batch, chunk_size: int):
  """(policy [B], policy_kl [B'] (stop-gradient), ref_kl [B'], weights [B] or None) of a KTO
  batch; packed, the KL terms are the present KL sequences' mean log-ratio as one entry (so
  `kto_loss`'s reference point z is exactly the unpacked one) and `weights` marks the present
  examples."""
  if not packed.is_packed(batch):
    [(logp, mask)] = group_token_logps(model, [row_group(batch, UNPAIRED_KEYS)],
                                       chunk_size=chunk_size)
    policy = sequence_logprobs(logp, mask)
    if not any(k in batch for k in KL_KEYS):
      return policy, jnp.zeros((1,), policy.dtype), jnp.zeros((1,), policy.dtype), None
    check_batch_keys(batch, KL_KEYS + ("ref_kl_logps",), "kto_objective with KL rows")
    [(kl_logp, kl_mask)] = group_token_logps(model, [row_group(batch, KL_KEYS)],
                                             chunk_size=chunk_size)
    policy_kl = jax.lax.stop_gradient(sequence_logprobs(kl_logp, kl_mask))
    return policy, policy_kl, jnp.asarray(batch["ref_kl_logps"]), None
  packed.check_packed(batch, "kto_objective")
  names = _packed_reference_names(batch)
  sums, _ = packed.sequence_sums(batch_token_logprobs(model, batch, chunk_size=chunk_size),
                                 packed.response_mask(batch), batch)
  parts, present = jnp.split(sums, len(names)), jnp.split(packed.present(batch), len(names))
  zeros = jnp.zeros((1,), sums.dtype)
  if len(names) == 1:
    return parts[0], zeros, zeros, present[0].astype(jnp.float32)
  check_batch_keys(batch, ("ref_kl_logps",), "kto_objective with KL sequences")
  log_ratio = jax.lax.stop_gradient(parts[1]) - jnp.asarray(batch["ref_kl_logps"], sums.dtype)
  z = masked_mean(log_ratio, present[1])[None]
  return parts[0], z, zeros, present[0].astype(jnp.float32)


def kto_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  beta: float = KTOConfig.beta,
  desirable_weight: float = KTOConfig.desirable_weight,
  undesirable_weight: float = KTOConfig.undesirable_weight,
  chunk_size: int = KTOConfig.chunk_size,
) -> tuple[jax.Array, Metrics]:
  """KTO (Ethayarajh et al. 2024) on unpaired labelled completions; see `kto_loss`.

    r_i = π_i − ref_i,   z = stop_gradient(max(mean_j(π^KL_j − ref^KL_j), 0))
    loss = Σ_i w_i·(desirable_i ? σ(β(z − r_i)) : σ(β(r_i − z))) / N,   N = normalizer or B

  The KL rows' policy log-probs come from a separate forward pass whose output is stopped
  (TRL computes them under `no_grad`), so their backward pass is never computed.

  Args:
    model: the policy.
    batch: the KTO keys of the module docstring ("ref_logps" and, with KL rows,
      "ref_kl_logps" from `reference_logps`). Without KL rows z = 0.
    normalizer: the global number of examples (`example_count`); None means B.
    beta, desirable_weight, undesirable_weight: as `kto_loss` (0.1, 1.0, 1.0: TRL's).
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, kto_loss's metrics ("kl", "rewards_chosen", "rewards_rejected", "reward_margin",
    "desirable_fraction") plus "reward_accuracy": the fraction of examples on their label's
    side of the reference point, r_i > z for desirable and r_i < z for undesirable ones).

  Example:
    >>> batch = add_reference_logps(ref_graphdef, ref_params, kto_batch)
    >>> step = make_train_step(kto_objective, graphdef, optimizer, count_fn=example_count)
  """
  check_batch_keys(batch, UNPAIRED_KEYS + ("label", "ref_logps"), "kto_objective")
  policy, policy_kl, ref_kl, weights = _kto_sequence_logps(model, batch, chunk_size)

  def loss_fn(logps, ref, label):
    return kto_loss(logps, ref, label, policy_kl, ref_kl, beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)

  loss, metrics = packed.example_mean(loss_fn, weights, policy, jnp.asarray(batch["ref_logps"]),
                                      jnp.asarray(batch["label"]))
  if weights is not None:  # per-example "rewards_chosen" is d·r: divide by the desirable share
    frac = metrics["desirable_fraction"]
    chosen = safe_divide(metrics["rewards_chosen"], frac)
    rejected = safe_divide(metrics["rewards_rejected"], 1.0 - frac)
    metrics = {**metrics, "rewards_chosen": chosen, "rewards_rejected": rejected,
               "reward_margin": chosen - rejected}
  ratio = jax.lax.stop_gradient(policy - jnp.asarray(batch["ref_logps"], policy.dtype))
  desirable = jnp.asarray(batch["label"]) != 0
  right_side = jnp.where(desirable, ratio > metrics["kl"], ratio < metrics["kl"])
  metrics = {**metrics,
             "reward_accuracy": packed.mean_over(right_side.astype(jnp.float32), weights)}
  return rescale_to_normalizer(loss, packed.count_of(policy, weights), normalizer), metrics


def orpo_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  beta: float = ORPOConfig.beta,
  chunk_size: int = ORPOConfig.chunk_size,
) -> tuple[jax.Array, Metrics]:
  """ORPO (Hong et al. 2024): chosen NLL + β·odds-ratio term, reference-free; see `orpo_loss`.

    loss = Σ_b [nll_c[b] − β·logσ(log odds(e^{a_c[b]}) − log odds(e^{a_r[b]}))] / N

  with a the per-token mean log-probs of the responses and nll_c = −a_c (the module's NLL
  convention). N = normalizer (`pair_count`) or B.

  Args:
    model: the policy.
    batch: the pair keys (no reference log-probs needed).
    normalizer: the global number of pairs; None means B.
    beta: λ of the paper (0.1, TRL's default).
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, orpo_loss's metrics: "nll", "log_odds_ratio", "log_odds_chosen", "rewards_chosen",
    "rewards_rejected", "reward_margin", "reward_accuracy").

  Example:
    >>> step = make_train_step(orpo_objective, graphdef, optimizer, count_fn=pair_count)
  """
  s = pair_sequence_logps(model, batch, chunk_size=chunk_size)
  loss, metrics = packed.example_mean(functools.partial(orpo_loss, beta=beta), s.get("weights"),
                                      s["chosen_avg"], s["rejected_avg"], s["chosen_nll"])
  return rescale_to_normalizer(loss, packed.count_of(s["chosen"], s.get("weights")),
                               normalizer), metrics


def simpo_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  beta: float = SimPOConfig.beta,
  gamma: float = SimPOConfig.gamma,
  chunk_size: int = SimPOConfig.chunk_size,
) -> tuple[jax.Array, Metrics]:
  """SimPO (Meng et al. 2024), reference-free on average log-probs; see `simpo_loss`.

    loss = Σ_b −logσ(β·(a_c[b] − a_r[b]) − γ) / N,   N = normalizer (`pair_count`) or B

  Args:
    model: the policy.
    batch: the pair keys.
    normalizer: the global number of pairs; None means B.
    beta, gamma: β (2.0) and the target margin γ (0.5), the SimPO paper's defaults.
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} of the
    rewards β·a).

  Example:
    >>> step = make_train_step(simpo_objective, graphdef, optimizer, count_fn=pair_count)
  """
  s = pair_sequence_logps(model, batch, chunk_size=chunk_size)
  loss, metrics = packed.example_mean(functools.partial(simpo_loss, beta=beta, gamma=gamma),
                                      s.get("weights"), s["chosen_avg"], s["rejected_avg"])
  return rescale_to_normalizer(loss, packed.count_of(s["chosen"], s.get("weights")),
                               normalizer), metrics


def cpo_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  beta: float = CPOConfig.beta,
  alpha: float = CPOConfig.alpha,
  chunk_size: int = CPOConfig.chunk_size,
) -> tuple[jax.Array, Metrics]:
  """CPO (Xu et al. 2024), reference-free on summed log-probs plus NLL; see `cpo_loss`.

    loss = Σ_b [−logσ(β·(π_c[b] − π_r[b])) + α·nll_c[b]] / N,   N = normalizer or B

  Args:
    model: the policy.
    batch: the pair keys.
    normalizer: the global number of pairs (`pair_count`); None means B.
    beta, alpha: β (0.1) and the NLL weight α (1.0), TRL's defaults.
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, cpo_loss's metrics: "nll", "preference_loss" and the reward metrics of β·π).

  Example:
    >>> step = make_train_step(cpo_objective, graphdef, optimizer, count_fn=pair_count)
  """
  s = pair_sequence_logps(model, batch, chunk_size=chunk_size)
  loss, metrics = packed.example_mean(functools.partial(cpo_loss, beta=beta, alpha=alpha),
                                      s.get("weights"), s["chosen"], s["rejected"],
                                      s["chosen_nll"])
  return rescale_to_normalizer(loss, packed.count_of(s["chosen"], s.get("weights")),
                               normalizer), metrics


__all__ = [
  "add_reference_logps",
  "cpo_objective",
  "example_count",
  "group_token_logps",
  "kto_objective",
  "orpo_objective",
  "pair_count",
  "pair_sequence_logps",
  "precompute_reference_logps",
  "reference_logps",
  "simpo_objective",
]
