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

Packed batches (several sequences per row, `rljax.data.packing`; "segment_ids" in the batch
selects the path, `rljax.train.packed` describes it) give the same losses and gradients as the
same sequences one per row: per-sequence sums are read by segment, pairs and examples are
averaged over the present ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rljax.losses.dpo import dpo_loss
from rljax.ops._checks import check_ndim, check_nonnegative, check_same_shape, check_integer_ids
from rljax.models.transformer import logit_softcap_of
from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.ops.logprobs import sequence_logprobs
from rljax.ops.masking import aggregate, safe_divide
from rljax.train import packed
from rljax.train.normalizers import rescale_to_normalizer
from rljax.train.supervised import DPOConfig, SFTConfig

Batch = dict[str, jax.Array]


def next_token_logprobs(
  model: Any,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  *,
  chunk_size: int = 64,
  positions: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """[B, T-1] log-probs of input_ids[:, 1:] under the model (fused, no [B, T, V] logits); packed
  rows pass their `positions` and `segment_ids` to the model."""
  extra = () if segment_ids is None else (positions, segment_ids)
  hidden = model.hidden_states(input_ids, attention_mask, *extra)[:, :-1]
  return logprobs_from_hidden(hidden, model.unembedding, input_ids[:, 1:], chunk_size=chunk_size,
                              softcap=logit_softcap_of(model))


def batch_token_logprobs(model: Any, batch: Batch, *, chunk_size: int = 64) -> jax.Array:
  """[R, T-1] next-token log-probs of a packed batch's rows (segment ids and positions given)."""
  ids, attention, positions, segments = packed.model_inputs(batch)
  return next_token_logprobs(model, ids, attention, chunk_size=chunk_size, positions=positions,
                             segment_ids=segments)


def sft_token_count(batch: Batch) -> jax.Array:
  """Number of response tokens that carry loss: Σ loss_mask[:, 1:] (float32 scalar); packed,
  without the first token of each segment (`rljax.train.packed.response_mask`)."""
  check_batch_keys(batch, ("loss_mask",), "sft_token_count")
  return jnp.sum(packed.response_mask(batch).astype(jnp.float32))


def sft_loss(
  model: Any, batch: Batch, *, normalizer: jax.Array | None = None,
  chunk_size: int = SFTConfig.chunk_size,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised fine-tuning: token-mean negative log-likelihood of the response tokens.

    loss = Σ_{b,t} m[b,t+1] · (−log π(x[b,t+1] | x[b,≤t])) / N,   N = normalizer or Σ m[:, 1:]

  Args:
    model: a `Transformer` (anything with `hidden_states(ids, mask)` and `unembedding`).
    batch: {"input_ids" [B, T] int, "attention_mask" [B, T], "loss_mask" [B, T] (1 on the
      response tokens that are predicted; position 0 is never predicted)}, or a packed batch
      (`rljax.data.packing`: + "positions", "segment_ids" [R, T], "sequence_mask" [N]; the
      first token of each segment is never predicted).
    normalizer: the global loss-token count (`sft_token_count` of the full batch); None uses
      this batch's count. An all-zero loss mask gives loss 0 with zero gradient.
    chunk_size: positions per chunk of the fused log-prob computation.

  Returns:
    (loss, {"nll": this batch's own token-mean NLL (no gradient)}).

  Example:
    >>> step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count)
  """
  check_batch_keys(batch, FIELDS, "sft_loss")
  ids = jnp.asarray(batch["input_ids"])
  check_same_shape(input_ids=ids, attention_mask=batch["attention_mask"],
                   loss_mask=batch["loss_mask"])
  if packed.is_packed(batch):
    packed.check_packed(batch, "sft_loss")
    logp = batch_token_logprobs(model, batch, chunk_size=chunk_size)
  else:
    logp = next_token_logprobs(model, ids, batch["attention_mask"], chunk_size=chunk_size)
  mask = packed.response_mask(batch)
  loss = aggregate(-logp, mask, "token-mean", normalizer=normalizer)
  nll = aggregate(jax.lax.stop_gradient(-logp), mask, "token-mean")
  return loss, {"nll": nll}


def pair_count(batch: Batch) -> jax.Array:
  """Number of preference pairs B in a DPO batch (float32 scalar); packed, the number of real
  pair slots Σ sequence_mask[:P]."""
  if packed.is_packed(batch):
    chosen, _ = packed.halves(jnp.asarray(batch[packed.SEQUENCE_MASK]))
    return jnp.sum((chosen != 0).astype(jnp.float32))
  check_batch_keys(batch, CHOSEN_KEYS[:1], "pair_count")
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
  check_integer_ids(keys[0], ids)
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

  A packed pair batch (sequences chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}) gives the
  same [P] statistics, read by segment from one pass over its rows, plus "weights" [P] (1 for
  a pair present in the batch, `rljax.train.packed.pair_weights`).
  """
  if packed.is_packed(batch):
    return packed_pair_sequence_logps(model, batch, chunk_size=chunk_size)
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


def packed_pair_sequence_logps(model: Any, batch: Batch, *, chunk_size: int = 64
                               ) -> dict[str, jax.Array]:
  """`pair_sequence_logps` of a packed pair batch (its docstring), + "weights"."""
  packed.check_packed(batch, "a preference pair batch")
  if packed.num_sequences(batch) % 2:
    raise ValueError(f"a packed pair batch has an even number of sequence slots (chosen, then "
                     f"rejected); `sequence_mask` has {packed.num_sequences(batch)}.")
  logp = batch_token_logprobs(model, batch, chunk_size=chunk_size)
  sums, counts = packed.sequence_sums(logp, packed.response_mask(batch), batch)
  (chosen, rejected), (c_len, r_len) = packed.halves(sums), packed.halves(counts)
  chosen_avg = safe_divide(chosen, c_len)
  return {
    "chosen": chosen,
    "rejected": rejected,
    "chosen_avg": chosen_avg,
    "rejected_avg": safe_divide(rejected, r_len),
    "chosen_nll": -chosen_avg,
    "chosen_lengths": c_len,
    "rejected_lengths": r_len,
    "weights": packed.pair_weights(batch),
  }


def dpo_objective(
  model: Any,
  batch: Batch,
  *,
  normalizer: jax.Array | None = None,
  beta: float = DPOConfig.beta,
  variant: str = DPOConfig.variant,
  label_smoothing: float = DPOConfig.label_smoothing,
  length_normalize: bool = DPOConfig.length_normalize,
  nll_coef: float = DPOConfig.nll_coef,
  discopop_tau: float = DPOConfig.discopop_tau,
  chunk_size: int = DPOConfig.chunk_size,
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
      the same loss tokens; stop-gradient inside `dpo_loss`). Or a packed pair batch
      (`rljax.data.packing`) with "ref_chosen", "ref_rejected" [P].
    normalizer: the global number of pairs (`pair_count` of the full batch); None means B.
    beta, variant, label_smoothing, discopop_tau: as `dpo_loss` (defaults 0.1, "sigmoid",
      0.0, TRL's; 0.05). The defaults of every option are `DPOConfig`'s.
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
  check_batch_keys(batch, ("ref_chosen", "ref_rejected"), "dpo_objective")
  s = pair_sequence_logps(model, batch, chunk_size=chunk_size)
  weights = s.get("weights")
  lengths = {}
  if variant == "sigmoid_norm" or (variant == "ipo" and length_normalize):
    lengths = {k: s[k] for k in ("chosen_lengths", "rejected_lengths")}
  loss_fn = functools.partial(dpo_loss, beta=beta, variant=variant,
                              label_smoothing=label_smoothing, discopop_tau=discopop_tau)
  loss, metrics = packed.example_mean(
    loss_fn, weights, s["chosen"], s["rejected"], jnp.asarray(batch["ref_chosen"]),
    jnp.asarray(batch["ref_rejected"]), **lengths)
  chosen_nll = packed.mean_over(s["chosen_nll"], weights)  # seq-mean-token-mean
  if nll_coef > 0:
    loss = loss + nll_coef * chosen_nll
  metrics = {**metrics, "nll": jax.lax.stop_gradient(chosen_nll)}
  return rescale_to_normalizer(loss, packed.count_of(s["chosen"], weights), normalizer), metrics
