"""The runner end to end on a tiny from-scratch model: SFT writes metrics and the plot, resume
continues the curve exactly (and refuses to resume nothing or a finished run), no recompilation
after the first steps, GRPO through the CLI with its sample completions."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_experiment import five_reward, grpo_config, prompt_rows, sft_config  # noqa: E402

from rljax.cli import main  # noqa: E402
from rljax.experiment.config import ConfigError, LoggingSection  # noqa: E402
from rljax.experiment.logging import read_metrics, read_samples, read_tensorboard  # noqa: E402
from rljax.experiment.runner import run_experiment, saved_steps  # noqa: E402
from rljax.rollout.sampling import SamplingConfig  # noqa: E402
from rljax.train.onpolicy import UpdateConfig  # noqa: E402
from rljax.train.ppo import PPOConfig  # noqa: E402

TIMING = {"time", "tokens_per_second", "compiles"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _values(record, *, evals=True):
  return {k: v for k, v in record.items()
          if k not in TIMING and (evals or not k.startswith("eval/"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("sft_full")
  summary = run_experiment(sft_config(str(out)))
  return out, summary


def test_sft_run_writes_metrics_plot_and_summary(uninterrupted):
  out, summary = uninterrupted
  records = read_metrics(str(out))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert saved_steps(str(out)) == [6]  # save_every=0: one checkpoint, at the end
  for r in records:
    assert {"loss", "nll", "grad_norm", "learning_rate", "time", "tokens_per_second"} <= set(r)
  assert records[-1]["loss"] < records[0]["loss"]  # SFT at lr 1e-2 on 6 rows learns
  assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
  saved = json.loads((out / "summary.json").read_text())
  assert saved["steps"] == 6 and saved["last"]["loss"] == pytest.approx(records[-1]["loss"])
  assert summary["eval"]["eval/nll"] > 0  # default evaluation at the end (held-out NLL)
  assert (out / "model" / "config.json").exists()


def test_no_recompilation_after_first_steps(uninterrupted):
  out, _ = uninterrupted
  records = read_metrics(str(out))
  assert records[0]["compiles"] >= 1  # the step compiles once ...
  assert all(r["compiles"] == 0 for r in records[2:])  # ... and never again (steps 3+)


def test_resume_continues_the_curve(uninterrupted, tmp_path):
  full = read_metrics(str(uninterrupted[0]))
  out = str(tmp_path / "run")
  run_experiment(sft_config(out, save_every=3), ["steps=4"])
  assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
  assert saved_steps(out) == [3, 4]  # every save_every steps, and at the end
  with pytest.raises(ConfigError, match="--resume"):
    run_experiment(sft_config(out, save_every=3))
  run_experiment(sft_config(out, save_every=3), resume=True)  # steps=6: trains on
  resumed = read_metrics(out)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  assert resumed[4]["time"] >= resumed[3]["time"]  # wall time continues too
  assert {k for k in resumed[3] if k.startswith("eval/")} == {"eval/loss", "eval/nll"}  # steps=4
  for a, b in zip(resumed, full, strict=True):  # bitwise: the same updates
    assert _values(a, evals=a["step"] != 4) == _values(b), f"step {a['step']}"


def test_resume_needs_a_checkpoint(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run stopped in setup
  with pytest.raises(ConfigError, match="nothing to resume.*no checkpoint"):
    run_experiment(sft_config(str(out)), resume=True)
  assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # untouched


def test_resuming_a_finished_run_keeps_its_summary(uninterrupted, capsys):
  out, summary = uninterrupted
  files = {p: p.read_bytes() for p in out.glob("*.json*")}
  assert run_experiment(sft_config(str(out)), resume=True) == json.loads(
    (out / "summary.json").read_text())
  assert "already finished" in capsys.readouterr().out
  assert {p: p.read_bytes() for p in out.glob("*.json*")} == files
  assert summary["eval"]["eval/nll"] > 0


def test_resume_cuts_records_logged_after_the_checkpoint(tmp_path):
  """A run killed at once (a second Ctrl-C) logged step 3 after its last checkpoint, step 2: on
  resume step 3 is in metrics.jsonl and TensorBoard once, with the resumed run's values."""
  from tensorboardX import SummaryWriter

  out = str(tmp_path / "run")
  config = sft_config(out, save_every=2, plot=False, save_model=False, tensorboard=True)
  run_experiment(config, ["steps=3"])
  shutil.rmtree(Path(out) / "checkpoints" / "3")
  with open(Path(out) / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "time": 1.0, "loss": 123.0}) + "\n")
  with SummaryWriter(str(Path(out) / "tensorboard")) as writer:
    writer.add_scalar("loss", 123.0, 3)
  run_experiment(config, ["steps=3"], resume=True)
  records = read_metrics(out)
  assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] != 123.0
  loss = sorted((step, value) for step, tag, value in read_tensorboard(out) if tag == "loss")
  assert [step for step, _ in loss] == [1, 2, 3]
  assert loss[-1][1] == pytest.approx(records[-1]["loss"])


EXPERIMENT_FILE = """
import sys
sys.path.insert(0, {here!r})
from tiny_experiment import grpo_config
config = grpo_config({out!r})
"""


def test_sft_packs_by_default_when_max_length_is_set(tmp_path):
  base = sft_config(str(tmp_path), plot=False, save_model=False)
  config = dataclasses.replace(base, steps=3, data=dataclasses.replace(
    base.data, buckets=None, max_length=16))
  assert config.packs and not base.packs
  run_experiment(config)
  records = read_metrics(str(tmp_path))
  assert all(0.0 <= r["padding_fraction"] < 0.5 and np.isfinite(r["loss"]) for r in records)
  assert all(r["compiles"] == 0 for r in records[1:])  # static packed shapes: one compile


def test_grpo_through_the_cli(tmp_path, capsys):
  out = tmp_path / "grpo"
  path = tmp_path / "grpo_exp.py"
  path.write_text(EXPERIMENT_FILE.format(here=str(Path(__file__).resolve().parent), out=str(out)))
  assert main(["train", str(path), "--set", "grpo.update.num_epochs=1", "--out", str(out)]) == 0
  records = read_metrics(str(out))
  assert [r["step"] for r in records] == [1, 2, 3]
  samples = read_samples(str(out))  # logging.samples=4 greedy completions per evaluation
  assert [s["step"] for s in samples] == [2] * 4 + [3] * 4
  prompts = {r["prompt"] for r in prompt_rows()}
  for s in samples:
    assert s["prompt"] in prompts and s["answer"] == "5"
    assert s["reward"] == pytest.approx(float(five_reward([s["prompt"]], [s["completion"]],
                                                          answer=["5"])[0]))
  text = [(step, value) for step, tag, value in read_tensorboard(str(out)) if tag == "samples"]
  assert [step for step, _ in text] == [2, 3] and samples[-1]["completion"] in text[-1][1]
  for key in ("reward_mean", "reward_std", "response_length", "truncation_rate", "entropy", "kl",
              "clipfrac", "zero_variance_groups", "grad_norm", "learning_rate",
              "tokens_per_second"):
    assert key in records[-1], key
  assert records[0]["first_ratio_mean"] == pytest.approx(1.0)
  assert {"eval/accuracy", "eval/pass@2"} <= set(records[1])  # eval_every=2, and at the end
  assert records[2]["compiles"] == 0
  assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
  assert "rljax: 3 steps" in capsys.readouterr().out
  assert main(["train", str(path), "--set", "grpo.group_sz=2"]) == 2
  assert "valid keys" in capsys.readouterr().err


def test_sft_on_a_mesh_of_all_devices(tmp_path):
  """Same runner, every (emulated) device: data-parallel mesh; the batch must divide."""
  import jax

  n = jax.device_count()
  out = str(tmp_path / "mesh")
  with pytest.raises(ConfigError, match="divisible"):
    run_experiment(sft_config(out), ["num_devices=null", "data.batch_size=3"] if n > 1 else
                   ["num_devices=null", "data.batch_size=0"])
  run_experiment(sft_config(out, plot=False, save_model=False),
                 ["num_devices=null", f"data.batch_size={n}", "steps=2"])
  assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_ppo_on_a_mesh_of_all_devices(tmp_path):
  """PPO through the runner on every (emulated) device, 2 microbatches per update: the critic is
  placed on the mesh with the policy and the rows of 4 prompts x 2 samples split over it."""
  import jax

  n = jax.device_count()
  out = str(tmp_path / "ppo")
  config = dataclasses.replace(
    grpo_config(out), algorithm="ppo", steps=2, eval_k=1,
    ppo=PPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4),
                  update=UpdateConfig(num_epochs=1, num_microbatches=2, agg="token-mean")),
    logging=LoggingSection(out_dir=out, progress=False, tensorboard=False, plot=False))
  run_experiment(config, ["num_devices=null", f"data.batch_size={max(1, n // 2)}"])
  records = read_metrics(out)
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["value_loss"]) and np.isfinite(r["loss"]) for r in records)

