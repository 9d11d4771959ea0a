"""The continuous-batching engine against the static reference `generate`.

Both draw token t of request r with fold_in(fold_in(key, r), t), so for the same key the engine
must return generate's `Rollout` — greedy and sampled tokens, masks, lengths, finished flags,
log-probs within 1e-5 — whatever the slot count, block size and pool size (refills, requests
waiting for blocks, prompts shorter than, equal to and longer than a block). Per-request
budgets must give generate's rows cut at the budget. The host schedule is checked on its own:
shared prompt blocks are never given to a sample as its own, no block is held twice, and every
block returns to the pool.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.io import load_pretrained
from rljax.models.transformer import Transformer
from rljax.ops.logprobs import token_logprobs
from rljax.parallel.rules import FSDP_RULES, FSDP_TP_RULES, MESH_AXES, inference_rules
import rljax.rollout.engine as engine_module
from rljax.rollout.engine import (
  EngineConfig,
  _Prompt,
  _Schedule,
  engine_generate,
  engine_layout,
)
from rljax.rollout.generate import generate
from rljax.rollout.sampling import SamplingConfig
from rljax.train.compiles import count_compiles
from rljax.train.objectives import next_token_logprobs
from rljax.train.state import variable_shardings

from bench_utils import loop_collectives

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                        "fixtures")

CONFIG = ModelConfig(
  vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
  num_kv_heads=2, head_dim=8, attention_bias=True, qk_norm=True,
)
P, N, G = 9, 12, 3
PROMPTS = np.array([
  [0, 0, 0, 0, 0, 5, 9, 17, 30],    # 4 tokens: one block of 4 exactly
  [3, 4, 5, 6, 7, 8, 9, 10, 11],    # 9 tokens: two blocks and a partial one
  [63, 63, 0, 0, 0, 0, 0, 22, 40],  # 2 tokens
  [0, 0, 0, 0, 1, 2, 33, 44, 55],   # 5 tokens
], np.int32)
MASK = PROMPTS != 0
STOPS = (1, 2, 3)  # end rows early at random lengths under the tiny random model
SAMPLING = {"greedy": SamplingConfig(max_new_tokens=N, num_samples=G, temperature=0.0),
            "sampled": SamplingConfig(max_new_tokens=N, num_samples=G, temperature=1.0),
            "top-p": SamplingConfig(max_new_tokens=N, num_samples=G, temperature=0.8, top_k=20,
                                    top_p=0.9)}
ENGINES = {  # refills through 3 slots; all rows at once; a pool at ~1/4 of the worst case
  "3 slots": EngineConfig(num_slots=3, block_size=4, blocks_per_step=2, sync_every=5),
  "all slots": EngineConfig(num_slots=12, block_size=16),
  "small pool": EngineConfig(num_slots=4, block_size=4, num_blocks=7, refill_slots=2),
}


def _model(config: ModelConfig = CONFIG) -> Transformer:
  """Weights scaled up so that next-token distributions are far from uniform."""
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, state))


@pytest.fixture(scope="module")
def model():
  return _model()


def _run(fn, model, sampling, key=0, prompts=PROMPTS, **kw):
  with jax.default_matmul_precision("highest"):
    return jax.device_get(fn(model, prompts, prompts != 0, jax.random.key(key), sampling,
                             stop_tokens=STOPS, pad_id=0, **kw))


def _assert_same_rollout(out, ref):
  for field in ("tokens", "prompt_mask", "completion_mask", "lengths", "finished"):
    np.testing.assert_array_equal(getattr(out, field), getattr(ref, field), err_msg=field)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)


def test_the_small_pool_is_a_quarter_of_the_worst_case():
  worst = G * len(PROMPTS) * -(-(P + N) // 4)  # every request's P + N tokens in its own blocks
  layout = engine_layout(ENGINES["small pool"], requests=G * len(PROMPTS), prompt_length=P,
                         max_new_tokens=N, num_samples=G)
  assert layout.num_blocks - 1 <= worst / 4 + 1


@pytest.mark.parametrize("engine,sampling", [  # each pair compiles the engine's programs
  ("3 slots", "sampled"), ("3 slots", "greedy"), ("all slots", "top-p"), ("small pool", "sampled"),
])
def test_engine_returns_the_rollout_of_generate(model, engine, sampling):
  ref = _run(generate, model, SAMPLING[sampling])
  assert ref.finished.any() and not ref.finished.all()  # early stops and a truncation
  _assert_same_rollout(_run(engine_generate, model, SAMPLING[sampling], engine=ENGINES[engine]),
                       ref)


def test_engine_logprobs_equal_teacher_forced_logprobs(model):
  out = _run(engine_generate, model, SAMPLING["sampled"], engine=ENGINES["3 slots"], key=4)
  with jax.default_matmul_precision("highest"):
    logits = model(out.tokens, out.attention_mask)[:, P - 1 : -1]
  expected = np.where(out.completion_mask, token_logprobs(logits, out.tokens[:, P:]), 0.0)
  np.testing.assert_allclose(out.logprobs, expected, atol=1e-5, rtol=0)


def test_per_request_budgets_cut_generates_rows(model):
  ref = _run(generate, model, SAMPLING["sampled"], key=2)
  budgets = np.random.default_rng(0).integers(1, N + 1, size=G * len(PROMPTS))
  out = _run(engine_generate, model, SAMPLING["sampled"], key=2, engine=ENGINES["small pool"],
             budgets=budgets)
  lengths = np.minimum(ref.lengths, budgets)
  np.testing.assert_array_equal(out.lengths, lengths)
  np.testing.assert_array_equal(out.finished, ref.finished & (ref.lengths <= budgets))
  keep = np.arange(N)[None] < lengths[:, None]
  np.testing.assert_array_equal(out.tokens[:, P:], np.where(keep, ref.tokens[:, P:], 0))
  np.testing.assert_allclose(out.logprobs, np.where(keep, ref.logprobs, 0), atol=1e-5)


def test_sliding_window_and_softcap_models_match_generate():
  config = dataclasses.replace(CONFIG, sliding_window=(5, None),
                               attention_softcap=3.0)
  model = _model(config)
  sampling = SAMPLING["sampled"]
  _assert_same_rollout(_run(engine_generate, model, sampling, engine=ENGINES["3 slots"]),
                       _run(generate, model, sampling))


def _sharded(model, shape, rules):
  """(mesh, the model's (graphdef, state) in the inference layout of `rules` on it)."""
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(model)
  return mesh, (graphdef, jax.device_put(
    state, variable_shardings(state, mesh, inference_rules(rules))))


@pytest.mark.parametrize("shape,rules", [
  ((2, 4, 1), FSDP_RULES),  # 8 shards, 4 of them without a prompt
  ((2, 2, 2), FSDP_TP_RULES),  # 4 shards, each splitting the model over `tensor`: lockstep
])
def test_one_pool_per_data_shard_returns_the_rollout_of_generate(model, shape, rules):
  mesh, sharded = _sharded(model, shape, rules)
  out = _run(engine_generate, sharded, SAMPLING["sampled"], engine=ENGINES["3 slots"],
             mesh=mesh)
  _assert_same_rollout(out, _run(generate, model, SAMPLING["sampled"]))


def test_the_shards_decode_loops_hold_no_collective(model, monkeypatch):
  """With the model whole inside each shard, the decode program communicates nothing."""
  mesh, sharded = _sharded(model, (2, 4, 1), FSDP_RULES)
  calls = []

  def abstract(x):  # the call donates its arrays; an unplaced one (the key) stays unplaced
    placed = len(x.sharding.device_set) > 1
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if placed else None)

  def recorded(*args):
    calls.append(jax.tree.map(lambda x: abstract(x) if isinstance(x, jax.Array) else x, args))
    return decode(*args)

  decode = engine_module._decode
  monkeypatch.setattr(engine_module, "_decode", recorded)
  _run(engine_generate, sharded, SAMPLING["sampled"], engine=ENGINES["3 slots"], mesh=mesh)
  hlo = decode.lower(*calls[0]).compile().as_text()
  assert loop_collectives(hlo) == (0, 0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_engine_matches_generate_and_the_fused_training_logprobs(family):
  """The parity fixtures' Gemma models (window 4 < P + N; Gemma 2's soft-caps, Gemma 3's two
  RoPE tables): the engine's paged decode, generate's KV cache and the training forward (fused
  log-probs with the final soft-cap) give the same tokens and log-probs."""
  model, _ = load_pretrained(os.path.join(FIXTURES, family))
  sampling = SAMPLING["sampled"]
  ref = _run(generate, model, sampling)
  _assert_same_rollout(_run(engine_generate, model, sampling, engine=ENGINES["3 slots"]), ref)
  with jax.default_matmul_precision("highest"):
    fused = next_token_logprobs(model, ref.tokens, ref.attention_mask)[:, P - 1:]
  np.testing.assert_allclose(ref.logprobs, np.where(ref.completion_mask, fused, 0.0), atol=1e-5,
                             rtol=0)


@pytest.mark.parametrize("min_slots,sizes", [(None, [8, 4, 2]), (8, [8])])
def test_the_drain_runs_on_fewer_slots_and_still_equals_generate(model, monkeypatch, min_slots,
                                                                  sizes):
  """Once no request waits, the live slots are compacted into halves down to `min_slots`."""
  seen = []

  def recorded(*args):
    seen.append(args[6].tokens.shape[1])  # slots [D, S]
    return decode(*args)

  decode = engine_module._decode
  monkeypatch.setattr(engine_module, "_decode", recorded)
  config = EngineConfig(num_slots=8, block_size=4, sync_every=3, min_slots=min_slots)
  out = _run(engine_generate, model, SAMPLING["sampled"], engine=config)
  assert sorted(set(seen), reverse=True) == sizes and seen == sorted(seen, reverse=True), seen
  _assert_same_rollout(out, _run(generate, model, SAMPLING["sampled"]))


def test_no_recompilation_across_calls(model):
  engine = ENGINES["3 slots"]
  _run(engine_generate, model, SAMPLING["sampled"], engine=engine)
  other = np.roll(PROMPTS, 1, axis=0)
  with count_compiles() as compiles:
    _run(engine_generate, model, SAMPLING["sampled"], key=9, prompts=other, engine=engine)
  assert compiles.count == 0


def test_schedule_never_shares_a_written_block():
  """Random finishing orders through the host schedule: a slot's own blocks are disjoint from
  every prompt's and from every other live slot's; all blocks come back at the end."""
  rng = np.random.default_rng(0)
  lengths = [4, 9, 2, 5, 16, 1]
  prompts = [_Prompt(np.arange(1, n + 1), G) for n in lengths]
  budgets = rng.integers(1, N + 1, size=G * len(prompts))
  budgets[[0, 12]] = 1  # prompts of 4 and 16 tokens: these requests need no block of their own
  layout = engine_layout(EngineConfig(num_slots=4, block_size=4, num_blocks=14),
                         requests=len(budgets), prompt_length=16, max_new_tokens=N,
                         num_samples=G)
  schedule = _Schedule(layout, prompts, budgets, G)
  served = []
  while schedule.pending or schedule.busy:
    for slot, request, table, source in schedule.admissions()[0]:
      prompt = prompts[request // G]
      shared = table[: prompt.length // 4]
      assert shared == prompt.blocks[: len(shared)]
      assert len(table) == -(-(prompt.length + budgets[request] - 1) // 4)  # no block more
      assert source == (prompt.blocks[-1] if prompt.length % 4 else 0)
      served.append(request)
    live = [set(b) for b in schedule.slot_blocks if b]
    held = [set(p.blocks) for p in prompts if p.blocks]
    owned = set().union(*live) if live else set()
    assert sum(map(len, live)) == len(owned)  # no block is two slots' own
    assert not owned & set().union(*held) if held else True
    assert not (owned | set().union(*held) if held else owned) & set(schedule.free_blocks)
    finished = rng.random(layout.slots) < 0.4
    schedule.release(np.array([r >= 0 and not f for r, f in zip(schedule.slot_request,
                                                                 finished)]))
  assert sorted(served) == list(range(len(budgets)))
  assert sorted(schedule.free_blocks) == list(range(1, layout.num_blocks))


def test_bad_arguments_are_named(model):
  sampling = SAMPLING["greedy"]
  with pytest.raises(ValueError, match="budgets"):
    _run(engine_generate, model, sampling, budgets=np.full(G * len(PROMPTS), N + 1))
  with pytest.raises(ValueError, match="budgets"):
    _run(engine_generate, model, sampling, budgets=np.ones(3, int))
  with pytest.raises(ValueError, match="num_blocks"):
    _run(engine_generate, model, sampling, engine=EngineConfig(block_size=4, num_blocks=3))
  with pytest.raises(ValueError, match="engine"):
    _run(engine_generate, model, sampling, engine={"num_slots": 2})
  with pytest.raises(ValueError, match="num_slots"):
    EngineConfig(num_slots=0)
