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

from typing import Any

import jax
import jax.numpy as jnp

from rljax.losses.dpo import dpo_loss
from rljax.ops._checks import check_nonnegative, check_same_shape
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.ops.logprobs import sequence_logprobs
from rljax.ops.masking import aggregate

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


def _sequence_logps(
  model: Any, ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array, chunk_size: int
) -> jax.Array:
  logp = next_token_logprobs(model, ids, attention_mask, chunk_size=chunk_size)
  return sequence_logprobs(logp, jnp.asarray(loss_mask)[:, 1:])


def policy_pair_logps(model: Any, batch: Batch, *, chunk_size: int = 64):
  """Policy sequence log-probs ([B] chosen, [B] rejected) of a preference batch.

  Chosen and rejected rows of equal length go through one forward pass of [2B, T] (TRL's
  "concatenated forward"); otherwise two passes.
  """
  names = ("input_ids", "attention_mask", "loss_mask")
  chosen = [jnp.asarray(batch[f"chosen_{n}"]) for n in names]
  rejected = [jnp.asarray(batch[f"rejected_{n}"]) for n in names]
  check_same_shape(chosen_input_ids=chosen[0], chosen_attention_mask=chosen[1],
                   chosen_loss_mask=chosen[2])
  check_same_shape(rejected_input_ids=rejected[0], rejected_attention_mask=rejected[1],
                   rejected_loss_mask=rejected[2])
  if chosen[0].shape == rejected[0].shape:
    both = [jnp.concatenate([c, r], axis=0) for c, r in zip(chosen, rejected)]
    logps = _sequence_logps(model, *both, chunk_size)
    b = chosen[0].shape[0]
    return logps[:b], logps[b:]
  return (
    _sequence_logps(model, *chosen, chunk_size),
    _sequence_logps(model, *rejected, chunk_size),
  )


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
  policy_chosen, policy_rejected = policy_pair_logps(model, batch, chunk_size=chunk_size)
  chosen_lengths = jnp.sum(jnp.asarray(batch["chosen_loss_mask"])[:, 1:], axis=-1)
  lengths = {}
  if variant == "sigmoid_norm" or (variant == "ipo" and length_normalize):
    lengths = {
      "chosen_lengths": chosen_lengths,
      "rejected_lengths": jnp.sum(jnp.asarray(batch["rejected_loss_mask"])[:, 1:], axis=-1),
    }
  loss, metrics = dpo_loss(
    policy_chosen,
    policy_rejected,
    batch["ref_chosen"],
    batch["ref_rejected"],
    beta=beta,
    variant=variant,
    label_smoothing=label_smoothing,
    **lengths,
  )
  chosen_nll = jnp.mean(-policy_chosen / jnp.maximum(chosen_lengths, 1))  # seq-mean-token-mean
  if nll_coef > 0:
    loss = loss + nll_coef * chosen_nll
  metrics = {**metrics, "nll": jax.lax.stop_gradient(chosen_nll)}
  if normalizer is not None:
    loss = loss * policy_chosen.shape[0] / normalizer
  return loss, metrics
