"""The runner's parts without a run: which curves are plotted, the signal handling of the loop,
the once-per-run preamble cache and the W&B run a resumed logger continues."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_experiment import sft_config  # noqa: E402

from rljax.experiment.logging import MetricsLogger  # noqa: E402
from rljax.experiment.plots import is_constant, plot_curves, select_panels  # noqa: E402
from rljax.experiment.runner import RunInterrupted, StopRequests  # noqa: E402
from rljax.experiment.stage import cached_stage, stage_path  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(n=8):
  """GRPO-like records: KL 0 (β = 0), a loss of ±1e-7, accuracy equal to the eval reward."""
  rng = np.random.default_rng(0)
  records = []
  for step in range(1, n + 1):
    accuracy = float(step) / n
    records.append({
      "step": step, "time": 0.1 * step, "reward_mean": float(rng.uniform()),
      "kl": 0.0, "loss": 1e-7 * (-1) ** step, "entropy": 2.0 - 0.1 * step,
      "response_length": float(rng.integers(3, 9)), "clipfrac": 0.0,
      "grad_norm": float(rng.uniform(0.5, 2)), "skipped": 0.0,
      "eval/accuracy": accuracy, "eval/pass@4": accuracy, "eval/reward_mean": accuracy,
      "eval/custom": float(step % 3)})
  return records


def test_curves_skip_constant_series_and_merge_identical_ones(tmp_path):
  panels = dict(select_panels(_records()))
  assert list(panels) == ["reward", "accuracy", "entropy", "response length", "grad norm",
                          "evaluation"]  # no KL, loss or clip-fraction panel: all flat
  assert [label for label, _, _ in panels["reward"]] == ["reward_mean", "eval/reward_mean"]
  assert [label for label, _, _ in panels["accuracy"]] == ["eval/accuracy = eval/pass@4"]
  assert [label for label, _, _ in panels["evaluation"]] == ["eval/custom"]
  assert plot_curves(_records(), str(tmp_path / "curves.png"), title="t")
  assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
  assert not plot_curves([{"step": 1, "kl": 0.0}], str(tmp_path / "none.png"))


def test_is_constant():
  assert is_constant([0.0, 0.0]) and is_constant([1e-7, -1e-7]) and is_constant([5.0])
  assert is_constant([1e6, 1e6 + 0.5])  # relative to the magnitude
  assert not is_constant([1e-4, 2e-4]) and not is_constant([1.0, 1.1])


def test_stop_requests_first_signal_stops_the_loop_second_exits_at_once():
  said, exits = [], []
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  stop = StopRequests(exit=exits.append, say=said.append)
  with stop:
    assert signal.getsignal(signal.SIGINT) == stop.handle
    assert signal.getsignal(signal.SIGTERM) == stop.handle
    stop.handle(signal.SIGINT)
    assert stop.signum == signal.SIGINT and exits == [] and "stopping" in said[0]
    stop.handle(signal.SIGINT)
    assert exits == [130] and "exiting now" in said[1]
  # restored: Python's default_int_handler, or SIG_IGN in a process started in the background
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_run_interrupted_exit_codes_and_messages():
  e = RunInterrupted(signal.SIGTERM, 7, "/runs/a")
  assert e.exit_code == 143 and "step 7" in str(e) and "/runs/a" in str(e)
  assert "nothing to resume" in str(RunInterrupted(signal.SIGINT, None, "/runs/a"))


def test_cached_stage_computes_once_and_restores_bitwise(tmp_path):
  config = sft_config(str(tmp_path))
  calls = []

  def compute():  # the expensive stage: here, a module whose values the template lacks
    calls.append(1)
    return nnx.Linear(3, 2, rngs=nnx.Rngs(3))

  def template():
    return nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  first = cached_stage(config, "sft", compute, template)
  second = cached_stage(config, "sft", compute, template)  # e.g. on --resume
  assert calls == [1] and isinstance(second, nnx.Linear)
  assert not np.array_equal(second.kernel[...], template().kernel[...])
  a, b = nnx.state(first), nnx.state(second)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  tree = {"w": jax.numpy.arange(3.0)}
  assert cached_stage(config, "tree", lambda: tree, lambda: tree)["w"].tolist() == [0, 1, 2]
  with pytest.raises(ValueError, match="stage name"):
    stage_path(config, "../x")


def test_wandb_offline_resumed_logger_continues_the_run(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  with MetricsLogger(str(tmp_path), tensorboard=False, wandb="rljax-test",
                     config={"steps": 3}) as logger:
    for step in (1, 2):
      logger.log(step, {"loss": 1.0 / step}, time=step)
    logger.log_samples(2, [{"prompt": "p", "completion": "c", "reward": 1.0}])
  run_id = (tmp_path / "wandb_run_id").read_text()
  assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
  with MetricsLogger(str(tmp_path), resume_step=2, tensorboard=False, wandb="rljax-test") as logger:
    assert logger.wandb_run.id == run_id  # the same W&B run, continued
    logger.log(3, {"loss": 0.3}, time=3)
  with MetricsLogger(str(tmp_path), tensorboard=False, wandb="rljax-test") as logger:
    assert logger.wandb_run.id != run_id  # a fresh run in the same directory: a new W&B run


def test_stop_tokens_are_eos_the_model_eos_ids_and_end_of_turn():
  from tiny_tokenizer import tiny_gemma_tokenizer, tiny_tokenizer

  from rljax.experiment.build import stop_tokens_of
  from rljax.models.config import ModelConfig

  gemma = tiny_gemma_tokenizer()
  assert stop_tokens_of(gemma) == [1, 5]  # <eos>, <end_of_turn>
  config = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=1, eos_token_id=[1, 7])
  assert stop_tokens_of(gemma, config) == [1, 7, 5]
  assert stop_tokens_of(tiny_tokenizer()) == [2]  # no end-of-turn token: eos alone


def test_generation_stops_on_end_of_turn():
  """A Gemma model sampling with the runner's stop tokens ends a row at its first <end_of_turn>
  (and would run on past it with <eos> alone)."""
  from tiny_tokenizer import tiny_gemma_tokenizer

  from rljax.experiment.build import stop_tokens_of
  from rljax.models.config import ModelConfig
  from rljax.models.transformer import Transformer
  from rljax.rollout.generate import generate
  from rljax.rollout.sampling import SamplingConfig

  tokenizer = tiny_gemma_tokenizer()
  config = ModelConfig.from_hf(
    {"model_type": "gemma2", "vocab_size": len(tokenizer), "hidden_size": 16,
     "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
     "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4})
  model = Transformer(config, rngs=nnx.Rngs(0))
  prompt = np.asarray([tokenizer.convert_tokens_to_ids(["<bos>", "<start_of_turn>", "user"])])
  sampling = SamplingConfig(max_new_tokens=16, num_samples=16, temperature=1.0)
  end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
  for stops, stops_at_end in ((stop_tokens_of(tokenizer), True), ([tokenizer.eos_token_id], False)):
    out = jax.device_get(generate(model, prompt, prompt != 0, jax.random.key(0), sampling,
                                  stop_tokens=stops, pad_id=0))
    completions = out.tokens[:, prompt.shape[1]:]
    rows = [r for r in range(len(completions)) if end in completions[r, :out.lengths[r]]]
    assert rows  # the random model emits <end_of_turn> in some rows
    for r in rows:
      first = int(np.argmax(completions[r] == end))
      assert (out.lengths[r] == first + 1 and out.finished[r]) == stops_at_end, r
