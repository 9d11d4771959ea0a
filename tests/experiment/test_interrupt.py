"""A real `rljax train` process interrupted with SIGINT mid-run, then resumed with the command it
prints (through `rljax.cli.main`, in the test's process): every step exactly once in
metrics.jsonl and TensorBoard, the experiment's preamble computed once, and a final train state
bitwise equal to an uninterrupted run's."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interruptible_experiment import STEPS  # noqa: E402

from rljax.cli import main  # noqa: E402
from rljax.experiment.config import load_experiment  # noqa: E402
from rljax.experiment.logging import read_metrics, read_tensorboard  # noqa: E402
from rljax.experiment.runner import run_experiment, saved_steps, setup  # noqa: E402
from rljax.train.checkpoint import Checkpointer  # noqa: E402

EXPERIMENT = str(Path(__file__).resolve().parent / "interruptible_experiment.py")
SIGNAL_AT = 3  # SIGINT once metrics.jsonl shows this step
TIMING = {"time", "tokens_per_second", "compiles"}


def _rljax(args: list[str], cwd: Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "rljax", *args], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_step(process: subprocess.Popen, metrics: Path, step: int, timeout: float) -> None:
  """Polls metrics.jsonl until it holds `step` (a record starts with its step)."""
  deadline = time.monotonic() + timeout
  marker = f'{{"step": {step},'
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.exists() and marker in metrics.read_text():
      return
    time.sleep(0.01)
  process.kill()
  pytest.fail(f"the run never logged step {step}: {process.communicate()[1][-2000:]}")


def _final_state(out: Path, target):
  with Checkpointer(out / "checkpoints") as checkpointer:
    state, _, _ = checkpointer.restore(target, step=STEPS)
  return state


def _bits(x) -> bytes:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes()


@pytest.mark.slow
def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path):
  out = tmp_path / "run"
  process = _rljax(["train", EXPERIMENT, "--out", str(out)], tmp_path)
  _wait_for_step(process, out / "metrics.jsonl", SIGNAL_AT, timeout=60)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr
  assert "Traceback" not in stderr and "PyTorch was not found" not in stderr  # no banner
  last_line = stderr.strip().splitlines()[-1]
  assert "resume with: " in last_line
  stopped = [r["step"] for r in read_metrics(str(out))]
  assert SIGNAL_AT <= stopped[-1] < STEPS, "the run finished before the signal"
  assert stopped == list(range(1, stopped[-1] + 1))
  assert saved_steps(str(out)) == [stopped[-1]]  # save_every=0: the interruption's checkpoint

  command = shlex.split(last_line.split("resume with: ", 1)[1])
  assert command[:3] == ["rljax", "train", EXPERIMENT] and command[-3:] == [
    "--resume", "--out", str(out)]
  assert main(command[1:]) == 0  # the printed command, in this process (saves a start-up)

  records = read_metrics(str(out))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  loss_steps = [step for step, tag, _ in read_tensorboard(str(out)) if tag == "loss"]
  assert sorted(loss_steps) == list(range(1, STEPS + 1))
  assert (out / "preamble_runs").read_text().count("computed") == 1  # not redone on resume

  reference = tmp_path / "reference"
  run_experiment(EXPERIMENT, out_dir=str(reference))
  expected = read_metrics(str(reference))
  for got, want in zip(records, expected, strict=True):
    assert {k: v for k, v in got.items() if k not in TIMING} == {
      k: v for k, v in want.items() if k not in TIMING}, got["step"]
  _, target = setup(load_experiment(EXPERIMENT, [f"logging.out_dir={reference}"]),
                    str(reference))
  final, want = _final_state(out, target), _final_state(reference, target)
  assert jax.tree.structure(final) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(want), strict=True):
    assert _bits(a) == _bits(b)
