"""The on-policy skeleton: the single-pass fast path equals the two-pass form, reference skipping,
`trainer.update` on a user-built `Experience`, the reference kept in the state across a resume
(written once per run), and errors that name what is missing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.losses.policy import grpo_loss
from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.logprobs import token_logprobs
from rljax.rollout.sampling import SamplingConfig
from rljax.train.checkpoint import Checkpointer
from rljax.train.experience import Experience
from rljax.train.grpo import GRPOConfig, GRPOTrainer, grpo_objective
from rljax.train.normalizers import agg_count
from rljax.train.onpolicy import UpdateConfig
from rljax.train.ppo import PPOConfig, PPOTrainer
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import create_train_state
from rljax.train.step import make_grad_fn

from tiny_tokenizer import tiny_prompt_batch, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}
OPTIMIZER = make_optimizer(OptimizerConfig(1e-2))
B, P, N = 4, 6, 6


def config(**kw):
  return GRPOConfig(**{"sampling": SamplingConfig(num_samples=2, max_new_tokens=N),
                       "update": UpdateConfig(chunk_size=8), **kw})


def reward(prompts, completions, **fields):
  return np.array([len(c) % 3 for c in completions], np.float32)


def make(cfg, seed=0):
  graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(seed)), OPTIMIZER,
                                       rng=seed)
  trainer = GRPOTrainer(graphdef, OPTIMIZER, cfg, reward, TOKENIZER, stop_tokens=[EOS],
                        pad_id=EOS, compiler_options=FAST)
  return trainer, state


def user_batch(seed=0, **fields) -> Experience:
  """A hand-built batch: left-padded prompts, right-padded completions, random advantages."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CONFIG.vocab_size, (B, P + N)).astype(np.int32)
  prompt_mask = np.arange(P)[None] >= np.array([0, 2, 1, 0])[:, None]
  loss_mask = np.arange(N)[None] < np.array([6, 3, 1, 4])[:, None]
  return Experience(tokens=jnp.asarray(tokens),
                    attention_mask=jnp.asarray(np.concatenate([prompt_mask, loss_mask], 1)),
                    loss_mask=jnp.asarray(loss_mask),
                    advantages=jnp.asarray(rng.normal(size=(B, N)) * loss_mask, jnp.float32),
                    **fields)


def naive_logp(model, batch):
  """Completion log-probs from the full [B, T, V] logits (the unfused reference path)."""
  logits = model(batch.tokens, batch.attention_mask)[:, P - 1 : -1]
  return jnp.where(batch.loss_mask, token_logprobs(logits, batch.tokens[:, P:]), 0.0)


def test_single_pass_fast_path_equals_the_two_pass_form():
  """old_logp = stop_gradient(logp) inside the update gives the loss and gradient of the
  recomputed old log-probs (ratio 1) within 1e-6, under microbatching too."""
  trainer, state = make(config())
  state = trainer.init_state(state)
  model = nnx.merge(trainer.graphdef, state.params, state.frozen)
  batch = user_batch(ref_logp=naive_logp(model, user_batch()) - 0.1)
  old = trainer.logprobs(state.params, state.frozen, batch)
  for k in (1, 2):
    cfg = config(update=UpdateConfig(chunk_size=8, num_microbatches=k))
    grad_fn = jax.jit(make_grad_fn(functools.partial(grpo_objective, config=cfg),
                                   trainer.graphdef, num_microbatches=k,
                                   count_fn=lambda b: agg_count(b.loss_mask, cfg.update.agg)))
    fast_loss, fast_grads, fast_m = grad_fn(state.params, state.frozen, batch)
    loss, grads, m = grad_fn(state.params, state.frozen, batch.replace(old_logp=old))
    assert abs(float(fast_loss) - float(loss)) <= 1e-6
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), fast_grads, grads)
    assert max(jax.tree.leaves(diff)) <= 1e-6
    assert float(fast_m["ratio_mean"]) == 1.0 and abs(float(m["ratio_mean"]) - 1) < 1e-6
  # The trainer takes the fast path only for one update per batch without TIS.
  assert not config().recompute_old_logp
  assert config(update=UpdateConfig(num_epochs=2)).recompute_old_logp
  assert config(use_rollout_logprobs=True).recompute_old_logp


def test_update_on_a_user_built_batch_equals_grpo_loss_of_the_naive_path():
  """`trainer.update` trains on a user's own Experience; its loss is `grpo_loss` of log-probs
  from materialised logits, and its gradient step moves the parameters."""
  cfg = config(kl_coef=0.05, update=UpdateConfig(chunk_size=8, num_microbatches=2))
  trainer, state = make(cfg)
  state = trainer.init_state(state)
  model = nnx.merge(trainer.graphdef, state.params, state.frozen)
  batch = user_batch()
  logp = naive_logp(model, batch)
  ref = logp - 0.2 * batch.loss_mask
  want, _ = grpo_loss(logp, logp, ref, batch.advantages, batch.loss_mask, beta=0.05,
                      kl_kind="k3", agg="seq-mean-token-mean")
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = trainer.update(state, batch.replace(ref_logp=ref))
  assert float(metrics["loss"]) == pytest.approx(float(want), abs=1e-5)
  assert metrics["skipped"] == 0 and int(state.step) == 1
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before)
  assert max(jax.tree.leaves(moved)) > 0


def test_update_names_missing_and_misshapen_fields():
  trainer, state = make(config(kl_coef=0.05))
  state = trainer.init_state(state)
  with pytest.raises(ValueError, match="batch.ref_logp"):
    trainer.update(state, user_batch())
  with pytest.raises(ValueError, match="batch.advantages"):
    trainer.update(state, user_batch().replace(advantages=jnp.zeros((B, N + 1)),
                                               ref_logp=jnp.zeros((B, N))))
  with pytest.raises(ValueError, match="rljax.train.Experience"):
    trainer.update(state, {"tokens": user_batch().tokens})


@pytest.mark.parametrize("ids, name", [
  (dict(pad_id=CONFIG.vocab_size), "pad_id"), (dict(pad_id=-1), "pad_id"),
  (dict(stop_tokens=[EOS, CONFIG.vocab_size + 3]), "stop_tokens"),
  (dict(stop_tokens=-2), "stop_tokens")])
def test_token_ids_outside_the_vocabulary_fail_at_construction(ids, name):
  """GRPO and PPO (the shared constructor), before anything is compiled."""
  graphdef = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))[0]
  kwargs = {"stop_tokens": [EOS], "pad_id": EOS, **ids}
  match = rf"`{name}` must be a token id.*\[0, {CONFIG.vocab_size}\)"
  with pytest.raises(ValueError, match=match):
    GRPOTrainer(graphdef, OPTIMIZER, config(), reward, TOKENIZER, **kwargs)
  with pytest.raises(ValueError, match=match):
    PPOTrainer(graphdef, graphdef, OPTIMIZER, OPTIMIZER, PPOConfig(), reward, TOKENIZER,
               **kwargs)


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
def test_no_reference_pass_without_a_kl_term(loss, monkeypatch):
  """GSPO / CISPO at β = 0: no reference in the state, no reference forward pass."""
  trainer, state = make(config(loss=loss, kl_coef=0.0))
  state = trainer.init_state(state)
  assert "reference" not in state.extras
  monkeypatch.setattr(trainer, "reference_logprobs",
                      lambda *a: pytest.fail("reference pass at kl_coef = 0"))
  prompts = tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?"), length=P)
  state, m = trainer.step(state, prompts, jax.random.key(0))
  assert "kl" not in m and np.isfinite(m["loss"]) and m["first_ratio_mean"] == 1.0


def test_update_flops_and_the_mfu_metric():
  """The analytic count, by hand for the test model: per token 2·L·(D·H·d + 2·D·K·d + H·d·D +
  3·D·F) in the layers, 4·B·H·T²·d·L in attention, 2·B·N·D·V for the logits; ×3 for forward and
  backward, plus one logits recompute. `mfu` is those FLOPs per second over `peak_flops`."""
  from rljax.train.flops import update_flops

  c, t = CONFIG, P + N
  d, kv = c.hidden_size // c.num_heads, c.num_kv_heads
  per_token = 2 * c.num_layers * (c.hidden_size * c.num_heads * d * 2 + 2 * c.hidden_size * kv * d
                                  + 3 * c.hidden_size * c.intermediate_size)
  attention = 4 * B * c.num_heads * t * t * d * c.num_layers
  logits = 2 * B * N * c.hidden_size * c.vocab_size
  assert update_flops(c, B, P, N) == 3 * (per_token * B * t + attention + logits) + logits
  assert update_flops(c.replace(remat=True), B, P, N) == update_flops(c, B, P, N) + (
    per_token * B * t + attention)
  trainer, state = make(config(update=UpdateConfig(chunk_size=8, peak_flops=1e12)))
  state = trainer.init_state(state)
  prompts = tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?"), length=P)
  state, m = trainer.step(state, prompts, jax.random.key(0))
  flops = update_flops(CONFIG, B, P, N)
  assert m["mfu"] == pytest.approx(flops / m["update_seconds"] / 1e12, rel=1e-6)
  assert 0 < m["mfu"] < 1


def test_update_flops_count_the_blocks_the_blockwise_core_computes():
  """Blockwise attention (num blocks per row): num·(num+1)/2 of the num² block pairs, backward
  2.5x the forward (scores recomputed); "auto" counts dense at or below two blocks."""
  from rljax.train.flops import attention_flops, update_flops

  c = CONFIG.replace(attention="blockwise", attention_block=4)
  t, num = 16, 4
  d = c.hidden_size // c.num_heads
  dense = 4 * B * c.num_heads * t * t * d * c.num_layers
  forward = dense * (num * (num + 1) / 2) / num**2
  assert attention_flops(c, B, t) == (forward, 2.5 * forward)
  assert attention_flops(c.replace(attention="auto"), B, 8) == attention_flops(
    c.replace(attention="naive"), B, 8)
  dense_update = update_flops(c.replace(attention="naive"), B, 6, 10)
  assert update_flops(c, B, 6, 10) == dense_update - 3 * dense + 3.5 * forward


def test_step_needs_init_state():
  trainer, state = make(config(kl_coef=0.04))
  prompts = tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?"), length=P)
  with pytest.raises(ValueError, match="init_state"):
    trainer.step(state, prompts, jax.random.key(0))


def test_resume_keeps_the_reference_and_writes_it_once(tmp_path):
  """The reference lives in the state: a resumed run trains against the INITIAL policy, not
  the resumed one, and checkpoints do not hold a copy of it per step."""
  trainer, state = make(config(kl_coef=0.04))
  state = trainer.init_state(state)
  reference = jax.tree.map(np.asarray, state.extras["reference"])
  prompts = tiny_prompt_batch(TOKENIZER, ("what is 2 + 3 ?", "hello world ?"), length=P)
  with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
    for step in (1, 2):
      state, _ = trainer.step(state, prompts)
      ckpt.save(step, state)
  assert (tmp_path / "ckpt" / "once" / "reference").is_dir()
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    _, _, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=2)
    target = jax.eval_shape(trainer.init_state, jax.eval_shape(lambda s: s, state))
    del meta
    restored, _, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  stored = json_fingerprint_keys(tmp_path / "ckpt" / "2")
  assert stored and not any("reference" in k for k in stored)  # each step: no reference copy
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               restored.extras["reference"], reference)
  assert jax.tree.structure(target) == jax.tree.structure(restored)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       restored.params, restored.extras["reference"]["params"])
  assert max(jax.tree.leaves(moved)) > 0  # the policy trained away from its reference
  # The resumed run continues exactly: the same next step from the restored state.
  state, m = trainer.step(state, prompts)
  restored, m2 = trainer.step(restored, prompts)
  assert m["loss"] == m2["loss"] and m["kl"] == m2["kl"]


def json_fingerprint_keys(step_dir) -> list[str]:
  import json

  return list(json.loads((step_dir / "meta" / "metadata").read_text())["fingerprints"])
