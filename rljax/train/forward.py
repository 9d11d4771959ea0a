"""Jitted forward passes over experience: completion log-probs of a policy, values of a critic.

Alignment. A row is `tokens = [prompt (P, left-padded) | completion (N)]`. Completion token t
(column P + t) is predicted from position P + t − 1, so the log-probs use the final hidden states
of positions P−1 .. P+N−2 and the values of the same positions (the value of the state *before*
token t; `ValueModel` gives the value after reading tokens[:, :s+1]).

A packed batch (`rljax.train.experience.pack_experience`) has P = 1 and passes its segment ids,
so the same slicing gives every packed column's log-prob.

Log-probs are computed with `logprobs_from_hidden` (chunked, custom VJP): no [B, T, V] logits
exist in the forward or the backward pass. Each pass computes only what its caller uses: the
reference pass gives log-probs alone, entropy is computed where it is logged or trained on.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.models.transformer import logit_softcap_of
from rljax.ops.fused_logprobs import logprobs_from_hidden

Array = jax.Array


def completion_logprobs(model: Any, batch: Any, *, temperature: float = 1.0,
                        chunk_size: int = 64, return_entropy: bool = False,
                        entropy_grad: bool = True):
  """[B, N] log-probs (and entropies) of the completion tokens of `batch` under `model`.

    logp[b, t] = log softmax(cap(h[b, P+t−1] @ Wᵀ) / temperature)[tokens[b, P+t]]
    (cap: the model's final logit soft-cap, Gemma 2; the identity without one)

  Args:
    model: a `Transformer` (anything with `hidden_states` and `unembedding`).
    batch: an `Experience` (tokens [B, P+N], attention_mask, positions; N = loss_mask.shape[1]).
    temperature: the sampling temperature (the rollout's log-probs use the same one).
    chunk_size: positions per chunk of `logprobs_from_hidden`.
    return_entropy: also return the [B, N] entropy of each position's distribution.
    entropy_grad: False when the entropy is only logged (no gradient, no backward work).
  Returns logp, or (logp, entropy) with `return_entropy`, as `logprobs_from_hidden`.
  """
  p = batch.prompt_length
  hidden = model.hidden_states(batch.tokens, batch.attention_mask, batch.positions,
                               batch.segment_ids)[:, p - 1 : -1]
  return logprobs_from_hidden(hidden, model.unembedding, batch.tokens[:, p:],
                              temperature=temperature, chunk_size=chunk_size,
                              return_entropy=return_entropy, entropy_grad=entropy_grad,
                              softcap=logit_softcap_of(model))


def completion_values(critic: Any, batch: Any) -> Array:
  """[B, N] critic values V(state before completion token t) = critic(...)[:, P+t−1]."""
  p = batch.prompt_length
  return critic(batch.tokens, batch.attention_mask, batch.positions,
                batch.segment_ids)[:, p - 1 : -1]


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk_size",
                                              "return_entropy"))
def policy_logprobs(graphdef: nnx.GraphDef, params: Any, frozen: Any, batch: Any, *,
                    temperature: float = 1.0, chunk_size: int = 64,
                    return_entropy: bool = False):
  """Jitted [B, N] completion log-probs of a policy (graphdef, params, frozen), 0 outside
  `batch.loss_mask`; with `return_entropy` also the [B, N] entropies (0 outside the mask).

  One compiled program per shapes/options, shared by the old-policy and the reference passes
  (same graphdef, other parameters). The reference pass asks for log-probs only.
  """
  model = nnx.merge(graphdef, params, frozen)
  out = completion_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size,
                            return_entropy=return_entropy)
  mask = batch.loss_mask.astype(bool)
  return jax.tree.map(lambda x: jnp.where(mask, x, 0.0), out)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def critic_values(graphdef: nnx.GraphDef, params: Any, frozen: Any, batch: Any) -> Array:
  """Jitted [B, N] float32 values of a `ValueModel` (graphdef, params, frozen); 0 off the
  loss mask."""
  critic = nnx.merge(graphdef, params, frozen)
  return jnp.where(batch.loss_mask.astype(bool), completion_values(critic, batch), 0.0)
