"""Benchmark: KV-cache decoding (`rljax.rollout.generate`) vs. re-running the full forward pass.

Same model, same prompts, same number of new tokens, greedy, both jitted (compile time excluded):
  1. `generate`: one prefill over the P prompt tokens, then a `lax.while_loop` feeding one token
     per step through a static [L, B, P+N, KV, Dh] KV cache;
  2. the cache-free loop: a `lax.fori_loop` that runs the full forward pass over a static
     [B, P+N] buffer (future slots masked) every step and takes the argmax at the current slot —
     what one writes without a cache and without recompiling per length.
The greedy tokens of both are checked to agree. Also reported: prefill time (one jitted prefill)
vs. per-token decode time ((generate - prefill) / (N - 1), the N - 1 while-loop steps). Each
timing is the median of --repeats runs after one warm-up run.

  python benchmarks/rollout.py                  # D=256, 4 layers, V=4096, B=8, P=64, N=64
  python benchmarks/rollout.py --new-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.kv_cache import hidden_states_with_cache, init_kv_cache
from rljax.models.transformer import Transformer
from rljax.rollout.generate import generate

from bench_utils import median_seconds


def make_full_forward_decoder(graphdef, prompt_len: int, new_tokens: int):
  """Greedy decoding that re-runs the full forward pass over [B, P+N] at every step."""

  @jax.jit
  def decode(state, prompts, prompt_mask):
    model = nnx.merge(graphdef, state)
    b = prompts.shape[0]
    tokens = jnp.concatenate([prompts, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.zeros((b, new_tokens), bool)], axis=1)

    def step(t, carry):
      tokens, mask = carry
      hidden = model.hidden_states(tokens, mask)
      last = jax.lax.dynamic_index_in_dim(hidden, prompt_len - 1 + t, axis=1)
      token = jnp.argmax(model.logits_from_hidden(last)[:, 0], axis=-1).astype(jnp.int32)
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, prompt_len + t, axis=1)
      mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones((b,), bool), prompt_len + t, 1)
      return tokens, mask

    return jax.lax.fori_loop(0, new_tokens, step, (tokens, mask))[0]

  return decode


def make_prefill(graphdef, new_tokens: int):
  """The prefill part of `generate` alone: prompts into a P+N-slot cache, last-token logits."""

  @jax.jit
  def prefill(state, prompts, prompt_mask):
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    cache = init_kv_cache(model.config, b, p + new_tokens)
    hidden, cache = hidden_states_with_cache(model, prompts, cache, 0, prompt_mask)
    return model.logits_from_hidden(hidden[:, -1:]), cache

  return prefill


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt-length", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  b, p, n = args.batch, args.prompt_length, args.new_tokens

  config = ModelConfig(
    vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
    num_layers=args.layers, num_heads=4, num_kv_heads=2,
  )
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, state)  # peaked distributions
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, args.vocab, size=(b, p)).astype(np.int32)
  pad = rng.integers(0, p // 2, size=b)  # left padding of up to P/2 tokens per row
  prompt_mask = np.arange(p)[None, :] >= pad[:, None]
  prompts = np.where(prompt_mask, prompts, 0).astype(np.int32)

  def cached():
    return generate(
      (graphdef, state), prompts, prompt_mask, jax.random.key(0), max_new_tokens=n,
      temperature=0.0, stop_tokens=(), pad_id=0,
    ).tokens

  full = make_full_forward_decoder(graphdef, p, n)
  prefill = make_prefill(graphdef, n)
  reference = np.asarray(full(state, prompts, prompt_mask))
  agree = np.mean(np.asarray(cached())[:, p:] == reference[:, p:])

  t_cached = median_seconds(cached, args.repeats)
  t_full = median_seconds(lambda: full(state, prompts, prompt_mask), args.repeats)
  t_prefill = median_seconds(lambda: prefill(state, prompts, prompt_mask), args.repeats)
  t_step = (t_cached - t_prefill) / max(n - 1, 1)

  print(
    f"rollout benchmark on {jax.devices()[0].platform}: D={args.hidden} layers={args.layers} "
    f"V={args.vocab} B={b} P={p} N={n}, greedy, jitted, median of {args.repeats}"
  )
  print(f"greedy tokens agree (KV cache vs full forward): {agree:.1%}")
  rate = b * n / t_cached
  print(f"KV-cache generate           : {t_cached * 1e3:9.1f} ms  {rate:9.0f} new tok/s")
  print(f"full forward each step      : {t_full * 1e3:9.1f} ms  {b * n / t_full:9.0f} new tok/s")
  print(f"  KV-cache speed-up         : {t_full / t_cached:9.1f}x")
  print(
    f"prefill (B x P tokens)      : {t_prefill * 1e3:9.2f} ms  "
    f"{b * p / t_prefill:9.0f} prompt tok/s"
  )
  print(
    f"decode, per step (B tokens) : {t_step * 1e3:9.2f} ms  {b / t_step:9.0f} new tok/s"
  )
  print(f"  prefill / one decode step : {t_prefill / t_step:9.1f}x "
        f"(prefill processes {p}x the tokens of a step)")


if __name__ == "__main__":
  main()
