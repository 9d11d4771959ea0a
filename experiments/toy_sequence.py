"""REINFORCE vs. PPO vs. GRPO on a toy sequence task, built from rljax's functional core.

The task: given a start token s ∈ {0..V-1}, generate L tokens; the target sequence counts up
modulo V (s+1, s+2, …). The score of a completion is the fraction of positions that equal the
target — a verifiable, sequence-level reward like a math answer checker's, and it can only be
raised by conditioning on the previous token (the policy is autoregressive).

Every algorithm samples the same number of sequences per step from the same initial policy (a
small Flax NNX network over (previous token, position)) and differs only in its rljax pieces:

  REINFORCE  batch-mean baseline → `policy_gradient_loss`, one update per batch
  PPO        KL-to-reference shaped rewards (`kl_penalty`, `token_level_rewards`) → critic →
             `gae` → `masked_whiten` → `ppo_clip_loss` + `value_loss`, several epochs
  GRPO       G samples per prompt → `grpo_advantages` → `grpo_loss` (k3 KL to the reference)

Run: python experiments/toy_sequence.py [--steps 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import rljax

VOCAB, LENGTH, WIDTH = 8, 6, 64


class Policy(nnx.Module):
  """logits and value for token t from (previous token, position): a tiny autoregressive policy."""

  def __init__(self, rngs: nnx.Rngs):
    self.token_embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.pos_embed = nnx.Embed(LENGTH, WIDTH, rngs=rngs)
    self.hidden = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.logits_head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)
    self.value_head = nnx.Linear(WIDTH, 1, rngs=rngs)

  def __call__(self, prev_tokens, positions):  # [B, T], [T] → logits [B, T, V], values [B, T]
    h = self.token_embed(prev_tokens) + self.pos_embed(positions)
    h = nnx.gelu(self.hidden(nnx.gelu(h)))
    return self.logits_head(h), self.value_head(h)[..., 0]


class Batch(NamedTuple):
  starts: jax.Array  # [B]
  tokens: jax.Array  # [B, L]
  logp: jax.Array  # [B, L] behaviour log-probs
  scores: jax.Array  # [B]
  mask: jax.Array  # [B, L]


def previous_tokens(starts, tokens):
  return jnp.concatenate([starts[:, None], tokens[:, :-1]], axis=1)


def forward(graphdef, params, starts, tokens):
  """Teacher-forced log-probs of `tokens` and values (each position sees only its previous token)."""
  logits, values = nnx.merge(graphdef, params)(previous_tokens(starts, tokens), jnp.arange(LENGTH))
  return rljax.token_logprobs(logits, tokens), values


def score(starts, tokens):
  target = (starts[:, None] + 1 + jnp.arange(LENGTH)) % VOCAB
  return jnp.mean(tokens == target, axis=-1)


def sample(graphdef, params, starts, key, *, greedy=False):
  model = nnx.merge(graphdef, params)

  def step(prev, inputs):
    t, k = inputs
    logits = model(prev[:, None], t[None])[0][:, 0]  # one position: [B, V]
    tok = jnp.argmax(logits, -1) if greedy else jax.random.categorical(k, logits)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], -1)[:, 0]
    return tok, (tok, logp)

  keys = jax.random.split(key, LENGTH)
  _, (tokens, logp) = jax.lax.scan(step, starts, (jnp.arange(LENGTH), keys))
  tokens, logp = tokens.T, logp.T
  return Batch(starts, tokens, logp, score(starts, tokens), jnp.ones_like(logp))


# ---- the three algorithms: each is a loss over one sampled batch ----


def reinforce_loss(params, graphdef, ref_params, batch):
  logp, _ = forward(graphdef, params, batch.starts, batch.tokens)
  advantages = batch.scores - jnp.mean(batch.scores)
  return rljax.policy_gradient_loss(logp, advantages, batch.mask)


def ppo_loss(params, graphdef, ref_params, batch, advantages, returns, old_values):
  logp, values = forward(graphdef, params, batch.starts, batch.tokens)
  pg, metrics = rljax.ppo_clip_loss(logp, batch.logp, advantages, batch.mask, clip_eps=0.2)
  vf, vf_metrics = rljax.value_loss(values, old_values, returns, batch.mask, clip_eps=0.2)
  return pg + 0.5 * vf, {**metrics, **vf_metrics}


def ppo_advantages(params, graphdef, ref_params, batch, beta=0.02):
  _, values = forward(graphdef, params, batch.starts, batch.tokens)
  ref_logp, _ = forward(graphdef, ref_params, batch.starts, batch.tokens)
  kl = rljax.kl_penalty(batch.logp, ref_logp, kind="k1")
  rewards = rljax.token_level_rewards(batch.scores, batch.mask, kl=kl, beta=beta)
  advantages, returns = rljax.gae(rewards, values, batch.mask, gamma=1.0, lam=0.95)
  return rljax.masked_whiten(advantages, batch.mask), returns, values


def grpo_loss(params, graphdef, ref_params, batch, group_size):
  logp, _ = forward(graphdef, params, batch.starts, batch.tokens)
  ref_logp, _ = forward(graphdef, ref_params, batch.starts, batch.tokens)
  advantages = rljax.grpo_advantages(batch.scores, group_size=group_size)
  return rljax.grpo_loss(logp, batch.logp, ref_logp, advantages, batch.mask, beta=0.04)


def train(algo: str, *, steps: int, seed: int, batch_size: int = 64, group_size: int = 8, lr: float = 3e-3):
  graphdef, params = nnx.split(Policy(nnx.Rngs(seed)))
  ref_params = params
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(params)

  def update(params, opt_state, loss_fn, *args):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, ref_params, *args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def step(params, opt_state, key):
    k_prompt, k_sample = jax.random.split(key)
    if algo == "grpo":  # batch_size / G prompts, G samples each (contiguous rows)
      starts = jnp.repeat(jax.random.randint(k_prompt, (batch_size // group_size,), 0, VOCAB), group_size)
    else:
      starts = jax.random.randint(k_prompt, (batch_size,), 0, VOCAB)
    batch = sample(graphdef, params, starts, k_sample)
    if algo == "reinforce":
      params, opt_state, metrics = update(params, opt_state, reinforce_loss, batch)
    elif algo == "ppo":
      adv, returns, old_values = ppo_advantages(params, graphdef, ref_params, batch)
      for _ in range(4):  # PPO epochs over the same batch
        params, opt_state, metrics = update(params, opt_state, ppo_loss, batch, adv, returns, old_values)
    else:
      for _ in range(2):  # GRPO iterations reuse old_logp = the sampling log-probs
        params, opt_state, metrics = update(params, opt_state, grpo_loss, batch, group_size)
    return params, opt_state, jnp.mean(batch.scores), metrics

  @jax.jit
  def evaluate(params):
    batch = sample(graphdef, params, jnp.arange(VOCAB), jax.random.key(0), greedy=True)
    return jnp.mean(batch.scores)

  key = jax.random.key(seed + 1)
  curve, start = [], time.perf_counter()
  for _ in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, mean_score, metrics = step(params, opt_state, sub)
    curve.append(float(mean_score))
  return {
      "first10": sum(curve[:10]) / 10,
      "last10": sum(curve[-10:]) / 10,
      "greedy": float(evaluate(params)),
      "seconds": time.perf_counter() - start,
      "metrics": {k: float(v) for k, v in metrics.items()},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(f"toy sequence task: count up mod {VOCAB} for {LENGTH} tokens; 64 samples/step, {args.steps} steps")
  print(f"{'algorithm':<10} {'score@start':>11} {'score@end':>9} {'greedy':>7} {'time':>6}  last-step metrics")
  for algo in ("reinforce", "ppo", "grpo"):
    r = train(algo, steps=args.steps, seed=args.seed)
    shown = {k: v for k, v in r["metrics"].items() if k in ("clipfrac", "approx_kl", "kl", "vf_clipfrac")}
    extra = " ".join(f"{k}={v:.3g}" for k, v in shown.items())
    print(f"{algo:<10} {r['first10']:>11.3f} {r['last10']:>9.3f} {r['greedy']:>7.3f} {r['seconds']:>5.1f}s  {extra}")


if __name__ == "__main__":
  main()
