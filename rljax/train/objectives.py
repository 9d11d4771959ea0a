"""Model-level objectives: a model forward pass composed with an `rljax.losses` / `rljax.ops` loss.

Each objective has the signature `loss_fn(model, batch, *, normalizer) -> (loss, metrics)` of
`rljax.train.step.make_train_step`, and a matching count function for the global normalizer:

  sft_loss       + sft_token_count   token-mean NLL of the response tokens
  dpo_objective  + pair_count        DPO (and variants) on precomputed reference log-probs,
                                     optionally + the chosen NLL (RPO)

With the normalizer, each returns a sum over its rows divided by the normalizer, so summing the
losses (and gradients) of microbatches gives exactly the full-batch value. With
`normalizer=None` each is the plain mean over its own batch.

Alignment: `input_ids[:, t + 1]` is predicted from position t, so the per-token losses use the
hidden states of positions 0..T-2 and the tokens and `loss_mask` of positions 1..T-1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rljax.losses.dpo import dpo_loss
from rljax.ops._checks import check_ndim, check_nonnegative, check_same_shape
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.ops.logprobs import sequence_logprobs
from rljax.ops.masking import aggregate
from rljax.train.normalizers import rescale_to_normalizer

Batch = dict[str, jax.Array]


def next_token_logprobs(
  model: Any, input_ids: jax.Array, attention_mask: jax.Array, *, chunk_size: int = 64
) -> jax.Array:
  """[B, T-1] log-probs of input_ids[:, 1:] under the model (fused, no [B, T, V] logits)."""
  hidden = model.hidden_states(input_ids, attention_mask)[:, :-1]
  return logprobs_from_hidden(hidden, model.unembedding, input_ids[:, 1:], chunk_size=chunk_size)


def sft_token_count(batch: Batch) -> jax.Array:
  """Number of response tokens that carry loss: Σ loss_mask[:, 1:] (float32 scalar)."""
  return jnp.sum(jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32))


def sft_loss(
  model: Any, batch: Batch, *, normalizer: jax.Array | None = None, chunk_size: int = 64
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised fine-tuning: token-mean negative log-likelihood of the response tokens.

    loss = Σ_{b,t} m[b,t+1] · (−log π(x[b,t+1] | x[b,≤t])) / N,   N = normalizer or Σ m[:, 1:]

  Args:
    model: a `Transformer` (anything with `hidden_states(ids, mask)` and `unembedding`).
    batch: {"input_ids" [B, T] int, "attention_mask" [B, T], "loss_mask" [B, T] (1 on the
      response tokens that are predicted; position 0 is never predicted)}.
    normalizer: the global loss-token count (`sft_token_count` of the full batch); None uses
      this batch's count. An all-zero loss mask gives loss 0 with zero gradient.
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, {"nll": this batch's own token-mean NLL (no gradient)}).

  Example:
    >>> step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count)
  """
  ids = jnp.asarray(batch["input_ids"])
  check_same_shape(input_ids=ids, attention_mask=batch["attention_mask"],
                   loss_mask=batch["loss_mask"])
  logp = next_token_logprobs(model, ids, batch["attention_mask"], chunk_size=chunk_size)
  mask = jnp.asarray(batch["loss_mask"])[:, 1:]
  loss = aggregate(-logp, mask, "token-mean", normalizer=normalizer)
  nll = aggregate(jax.lax.stop_gradient(-logp), mask, "token-mean")
  return loss, {"nll": nll}


def pair_count(batch: Batch) -> jax.Array:
  """Number of preference pairs B in a DPO batch (float32 scalar)."""
  return jnp.asarray(jnp.shape(batch["chosen_input_ids"])[0], jnp.float32)


# ----------------------------------------------------------------------------------------------
# Sequence log-probs of groups of rows (DPO here; ORPO / SimPO / CPO / KTO in `preference`).
# ----------------------------------------------------------------------------------------------

Group = tuple[jax.Array, jax.Array, jax.Array]  # (input_ids, attention_mask, loss_mask)
FIELDS = ("input_ids", "attention_mask", "loss_mask")
CHOSEN_KEYS = tuple(f"chosen_{f}" for f in FIELDS)
REJECTED_KEYS = tuple(f"rejected_{f}" for f in FIELDS)


def check_batch_keys(batch: Batch, keys: Iterable[str], what: str) -> None:
  """Raises `ValueError` naming the missing keys (and the present ones) of a batch."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"{what} needs batch keys {missing}; the batch has {sorted(batch)}.")


def row_group(batch: Batch, keys: Sequence[str]) -> Group:
  """The (input_ids, attention_mask, loss_mask) arrays named by `keys`, shapes checked."""
  ids, attention, loss = (jnp.asarray(batch[k]) for k in keys)
  check_ndim(keys[0], ids, 2)
  check_same_shape(**{keys[0]: ids, keys[1]: attention, keys[2]: loss})
  return ids, attention, loss


def group_token_logps(
  model: Any, groups: Sequence[Group], *, chunk_size: int = 64
) -> list[tuple[jax.Array, jax.Array]]:
  """(token log-probs [B_i, T-1], loss mask [B_i, T-1]) of each group of rows.

  Groups of equal length T go through one concatenated forward pass (TRL's "concatenated
  forward"); otherwise one pass each. Log-probs are fused (`logprobs_from_hidden`): no
  [B, T, V] logits.
  """
  lengths = {g[0].shape[1] for g in groups}
  if len(groups) > 1 and len(lengths) == 1:
    ids, attention = (jnp.concatenate([g[i] for g in groups]) for i in (0, 1))
    logp = next_token_logprobs(model, ids, attention, chunk_size=chunk_size)
    bounds = np.cumsum([g[0].shape[0] for g in groups])[:-1]
    parts = jnp.split(logp, bounds)
  else:
    parts = [next_token_logprobs(model, g[0], g[1], chunk_size=chunk_size) for g in groups]
  return [(p, g[2][:, 1:]) for p, g in zip(parts, groups)]


def pair_sequence_logps(model: Any, batch: Batch, *, chunk_size: int = 64) -> dict[str, jax.Array]:
  """Policy sequence statistics of a pair batch, [B] each, with gradient.

  Returns {"chosen", "rejected"} (sums of the response-token log-probs), {"chosen_avg",
  "rejected_avg"} (per-token means; 0 for an empty loss mask), "chosen_nll" (= −chosen_avg) and
  {"chosen_lengths", "rejected_lengths"} (numbers of loss tokens). Chosen and rejected rows of
  equal length share one forward pass.
  """
  check_batch_keys(batch, CHOSEN_KEYS + REJECTED_KEYS, "a preference pair batch")
  (c, c_mask), (r, r_mask) = group_token_logps(
    model, [row_group(batch, CHOSEN_KEYS), row_group(batch, REJECTED_KEYS)], chunk_size=chunk_size
  )
  chosen_avg = sequence_logprobs(c, c_mask, average=True)
  return {
    "chosen": sequence_logprobs(c, c_mask),
    "rejected": sequence_logprobs(r, r_mask),
    "chosen_avg": chosen_avg,
    "rejected_avg": sequence_logprobs(r, r_mask, average=True),
    "chosen_nll": -chosen_avg,
    "chosen_lengths": jnp.sum(c_mask, axis=-1),
    "rejected_lengths": jnp.sum(r_mask, axis=-1),
  }


def dpo_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  beta: float = 0.1,
  variant: str = "sigmoid",
  label_smoothing: float = 0.0,
  length_normalize: bool = False,
  nll_coef: float = 0.0,
  chunk_size: int = 64,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO (or a pairwise variant) of the policy against precomputed reference log-probs.

    loss = Σ_b [ℓ(β, π_c[b] − r_c[b], π_r[b] − r_r[b]) + α·nll_c[b]] / N,   N = normalizer or B
    nll_c[b] = −π_c[b] / |c_b|   (the chosen response's token-mean NLL; 0 for an empty response)

  `rljax.losses.dpo.dpo_loss` returns the mean over its B pairs, so the objective multiplies it
  by B / N: with N the global number of pairs the microbatch losses sum to the full-batch mean.

  α = `nll_coef` > 0 is RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization";
  TRL's `rpo_alpha`): the NLL of the chosen answer keeps its likelihood from falling while the
  margin grows (DPO alone can lower both, "likelihood displacement"). Normalisation: each chosen
  response's token-mean NLL averaged over pairs (the paper's −log π(c|x) / |c|, and the NLL
  convention of `orpo_objective` / `cpo_objective`), which splits exactly over microbatches of
  pairs with the pair-count normalizer. TRL takes the token-mean over all chosen tokens of the
  batch; the two agree when the chosen responses have equal lengths.

  Args:
    model: the policy.
    batch: {"chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask",
      "rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask"} [B, T] each, and
      "ref_chosen", "ref_rejected" [B]: the reference model's sequence log-probs (summed over
      the same loss tokens; stop-gradient inside `dpo_loss`).
    normalizer: the global number of pairs (`pair_count` of the full batch); None means B.
    beta, variant, label_smoothing: as `dpo_loss` (defaults 0.1, "sigmoid", 0.0, TRL's).
    length_normalize: pass the response lengths to `dpo_loss` for "ipo" (length-normalised
      IPO); "sigmoid_norm" always gets them.
    nll_coef: α ≥ 0, the weight of the chosen responses' NLL (RPO); default 0.0 (plain DPO,
      the loss is exactly that of `dpo_loss`).
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, dpo_loss's metrics: rewards_chosen, rewards_rejected, reward_margin,
    reward_accuracy, and "nll": the mean of nll_c (no gradient) — means over this batch).

  Example:
    >>> loss_fn = functools.partial(dpo_objective, beta=0.1, nll_coef=1.0)   # RPO
    >>> step = make_train_step(loss_fn, graphdef, optimizer, count_fn=pair_count)
  """
  check_nonnegative("nll_coef", nll_coef)
  s = pair_sequence_logps(model, batch, chunk_size=chunk_size)
  lengths = {}
  if variant == "sigmoid_norm" or (variant == "ipo" and length_normalize):
    lengths = {k: s[k] for k in ("chosen_lengths", "rejected_lengths")}
  loss, metrics = dpo_loss(
    s["chosen"],
    s["rejected"],
    batch["ref_chosen"],
    batch["ref_rejected"],
    beta=beta,
    variant=variant,
    label_smoothing=label_smoothing,
    **lengths,
  )
  chosen_nll = jnp.mean(s["chosen_nll"])  # seq-mean-token-mean
  if nll_coef > 0:
    loss = loss + nll_coef * chosen_nll
  metrics = {**metrics, "nll": jax.lax.stop_gradient(chosen_nll)}
  return rescale_to_normalizer(loss, s["chosen"].shape[0], normalizer), metrics
