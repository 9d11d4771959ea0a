"""Sequence packing vs. today's padded buckets on SFT data with log-normal lengths (issue 11).

Data: records of length L ~ round(LogNormal(log 256, σ = 1)) clipped to [32, 4096] (seed 0),
rows in data order (no shuffling); token ids drawn uniformly (no tokenizer), the first L // 4
tokens the prompt, the rest the response (loss tokens).

1. Padding fraction over the whole dataset: today's collator (`collate_sft`, batches of
   `--batch-size` records padded to the power-of-two buckets up to 4096) vs. the packer
   (`PackedBatchIterator`: rows of T = 4096, `--rows` rows per batch, FFD in its default window).
2. Real (non-pad) tokens/s of the jitted SFT train step (`make_train_step(sft_loss, ...,
   count_fn=sft_token_count)`, AdamW) over the whole dataset both ways (the same real tokens):
   the padded batches of part 1 (`--batch-size` records each) and the packed ones ([rows, 4096]
   each). A step's time depends only on its static shape, so each distinct shape is timed once
   (median of `--repeats` steps after a warm-up step; compiles excluded) and the epoch's time is
   Σ over its batches of their shape's step time. Model: V = 8192, 2 layers, d = 128, MLP 512,
   4 query / 2 KV heads, tied embeddings, float32 (small enough for a 2-core CPU).
3. Attention cost of one packed row: value_and_grad of sum(attention · w) of the attention core
   the model runs (`self_attention`, "auto") on the first packed row with its segment ids vs. the
   sum over its segments each run alone (one row of its own length), same heads.
4. On-policy experience (`UpdateConfig.packing`): the GRPO objective's value_and_grad (the
   update's work) on a rollout-shaped batch — 64 rows of 64 prompt + 448 completion slots,
   completion lengths geometric with mean 64 (the long tail of RL; clipped to 448) — unpacked vs.
   `pack_experience`d (same sequences), same model; real tokens/s.

Run:  .venv/bin/python benchmarks/packing.py   (about 7 minutes on 2 CPU cores shared with
other jobs, load average ~4; most of it compiling and timing the five padded bucket shapes)
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from bench_utils import median_seconds
from flax import nnx

from rljax.data.batching import bucket_sizes, collate_sft
from rljax.data.packing import PackedBatchIterator, padding_fraction
from rljax.models.attention import self_attention
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer, positions_from_segments
from rljax.train import (OptimizerConfig, create_train_state, make_optimizer, make_train_step,
                         sft_loss, sft_token_count)

T = 4096
MODEL = ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=512, num_layers=2,
                    num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


def sft_records(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  lengths = np.clip(np.rint(rng.lognormal(np.log(256), 1.0, n)), 32, T).astype(int)
  records = []
  for length in lengths:
    ids = rng.integers(1, MODEL.vocab_size, length).tolist()
    prompt = max(1, length // 4)
    records.append({"prompt_ids": ids[:prompt], "response_ids": ids[prompt:]})
  return records


def padded_batches(records: list[dict], batch_size: int) -> list[dict]:
  buckets = bucket_sizes(T)
  return [collate_sft(records[i:i + batch_size], pad_id=0, buckets=buckets)
          for i in range(0, len(records), batch_size)]


def overall_padding(batches: list[dict]) -> float:
  real = sum(float(b["attention_mask"].sum()) for b in batches)
  return 1.0 - real / sum(b["attention_mask"].size for b in batches)


def packed_iterator(records: list[dict], rows: int) -> PackedBatchIterator:
  return PackedBatchIterator(records, kind="sft", row_length=T, num_rows=rows, pad_id=0, seed=0,
                             shuffle=False, num_epochs=1)


def epoch_seconds(batches: list[dict], repeats: int) -> tuple[float, dict]:
  """(Σ over `batches` of their shape's median step seconds, {shape: (count, seconds)})."""
  optimizer = make_optimizer(OptimizerConfig(1e-4))
  graphdef, state = create_train_state(Transformer(MODEL, rngs=nnx.Rngs(0)), optimizer, rng=0)
  step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count)
  holder, per_shape = {"state": state}, {}
  for shape, count in sorted(Counter(b["input_ids"].shape for b in batches).items()):
    batch = jax.device_put(next(b for b in batches if b["input_ids"].shape == shape))

    def one_step(batch=batch):
      holder["state"], metrics = step(holder["state"], batch)
      return metrics

    per_shape[shape] = (count, median_seconds(one_step, repeats))
  return sum(count * seconds for count, seconds in per_shape.values()), per_shape


def attention_seconds(segment_ids: np.ndarray, mask: np.ndarray, repeats: int) -> float:
  """Median seconds of value_and_grad of sum(attention(q, k, v) · w) on one row."""
  t = segment_ids.shape[-1]
  dh = MODEL.hidden_size // MODEL.num_heads
  ks = jax.random.split(jax.random.key(0), 4)
  q, w = (jax.random.normal(key, (1, t, MODEL.num_heads, dh)) for key in ks[:2])
  k, v = (jax.random.normal(key, (1, t, MODEL.num_kv_heads, dh)) for key in ks[2:])
  mask, segments = jnp.asarray(mask[None]), jnp.asarray(segment_ids[None])
  positions = positions_from_segments(segments)

  @jax.jit
  def grads(q, k, v):
    def loss(q, k, v):
      attend = self_attention(MODEL, mask, positions, segments)
      return jnp.sum(attend(q, k, v) * w)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  return median_seconds(lambda: grads(q, k, v), repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=10000, help="dataset size for part 1")
  parser.add_argument("--batch-size", type=int, default=8, help="records per padded batch")
  parser.add_argument("--rows", type=int, default=2, help="rows of 4096 per packed batch")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; os.getloadavg() at start = "
        f"{tuple(round(x, 2) for x in os.getloadavg())}")
  records = sft_records(args.records)
  lengths = np.array([len(r["prompt_ids"]) + len(r["response_ids"]) for r in records])
  print(f"{len(records)} records, lengths median {np.median(lengths):.0f}, mean "
        f"{lengths.mean():.0f}, min {lengths.min()}, max {lengths.max()}")

  packed = list(packed_iterator(records, args.rows))
  if 1 in args.parts:
    padding_part(records, args)
  if 2 in args.parts:
    step_part(records, lengths, packed, args)
  if 3 in args.parts:
    attention_part(packed, args)
  if 4 in args.parts:
    experience_part(args)
  print(f"\nos.getloadavg() at end = {tuple(round(x, 2) for x in os.getloadavg())}")


def padding_part(records, args) -> None:
  print("\n1. padding fraction (whole dataset, data order)")
  for batch_size in sorted({args.batch_size, 32}):
    print(f"  padded buckets, {batch_size:2d} records / batch : "
          f"{overall_padding(padded_batches(records, batch_size)):6.1%}")
  for rows in sorted({args.rows, 8}):
    start = time.perf_counter()
    batches = list(packed_iterator(records, rows))
    print(f"  packed, {rows} rows x {T} / batch       : {overall_padding(batches):6.1%}  "
          f"({len(batches)} batches, largest per-batch {max(map(padding_fraction, batches)):.1%}"
          f", packing {time.perf_counter() - start:.1f} s)")



def step_part(records, lengths, packed, args) -> None:
  print(f"\n2. SFT train step over the dataset, real tokens / s (per shape: median of "
        f"{args.repeats} steps, compile excluded)")
  padded = padded_batches(records, args.batch_size)
  real = float(lengths.sum())
  assert all(real == sum(float(b["attention_mask"].sum()) for b in bs) for bs in (padded, packed))
  results = {}
  for name, batches in (("padded", padded), ("packed", packed)):
    seconds, per_shape = epoch_seconds(batches, args.repeats)
    results[name] = seconds
    shapes = ", ".join(f"{count} x {list(shape)} {1e3 * t:.0f} ms"
                       for shape, (count, t) in per_shape.items())
    print(f"  {name}: padding {overall_padding(batches):5.1%}, {seconds:7.1f} s/epoch, "
          f"{real / seconds:7,.0f} tokens/s   [{shapes}]")
  print(f"  packed / padded tokens/s: {results['padded'] / results['packed']:.2f}x   "
        f"(goal >= 2.5x)")


def attention_part(packed, args) -> None:
  print("\n3. attention core fwd + bwd: one packed row vs. its segments alone")
  row_ids, row_mask = packed[0]["segment_ids"][0], packed[0]["attention_mask"][0]  # data order
  n = packed[0]["sequence_mask"].shape[0]
  segment_lengths = [int(np.sum(row_ids == s)) for s in sorted(set(row_ids.tolist()) - {n})]
  row_s = attention_seconds(row_ids, row_mask, args.repeats)
  alone_s = sum(attention_seconds(np.zeros(m, np.int32), np.ones(m, np.int32), args.repeats)
                for m in segment_lengths)
  print(f"  row of {T} with {len(segment_lengths)} segments {segment_lengths}: {row_s * 1e3:.1f} ms;"
        f" segments alone: {alone_s * 1e3:.1f} ms")
  print(f"  packed row / sum of segments alone: {row_s / alone_s:.2f}x   (goal <= 1.2x)")



def experience_part(args) -> None:
  from rljax.rollout.sampling import SamplingConfig
  from rljax.train.experience import Experience, pack_experience
  from rljax.train.grpo import GRPOConfig, grpo_objective
  from rljax.train.normalizers import agg_count
  from rljax.train.step import make_grad_fn

  rows, p, n = 64, 64, 448
  rng = np.random.default_rng(0)
  lengths = np.minimum(rng.geometric(1 / 64, rows), n)
  completion = np.arange(n)[None] < lengths[:, None]
  mask = np.concatenate([np.ones((rows, p), bool), completion], axis=1)
  batch = Experience(tokens=jnp.asarray(rng.integers(1, MODEL.vocab_size, (rows, p + n)),
                                        jnp.int32),
                     attention_mask=jnp.asarray(mask), loss_mask=jnp.asarray(completion),
                     advantages=jnp.asarray(rng.normal(size=(rows, n)) * completion, jnp.float32))
  packed = pack_experience(batch)
  config = GRPOConfig(sampling=SamplingConfig(num_samples=4, max_new_tokens=n), kl_coef=0.0)
  graphdef, state = create_train_state(Transformer(MODEL, rngs=nnx.Rngs(0)),
                                       make_optimizer(OptimizerConfig(1e-5)), rng=0)
  grad = jax.jit(make_grad_fn(
    lambda m, b, normalizer=None: grpo_objective(m, b, normalizer=normalizer, config=config),
    graphdef, count_fn=lambda b: agg_count(b.loss_mask, config.update.agg, **b.segments)))
  real = float(mask.sum())
  times = {name: median_seconds(lambda b=b: grad(state.params, state.frozen, b), args.repeats)
           for name, b in (("unpacked", batch), ("packed", packed))}
  print(f"\n4. GRPO objective value_and_grad, {rows} rows x ({p} + {n}); completions mean "
        f"{lengths.mean():.0f}, max {lengths.max()}; packed into {packed.num_rows} rows")
  for name, seconds in times.items():
    print(f"  {name}: {seconds * 1e3:.0f} ms, {real / seconds:,.0f} real tokens/s")
  print(f"  packed / unpacked tokens/s: {times['unpacked'] / times['packed']:.2f}x")


if __name__ == "__main__":
  main()
