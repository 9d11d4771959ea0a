"""Multi-host: `initialize`, and 2 processes × 4 CPU devices train exactly like 1 process × 8."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rljax.parallel import distributed
from rljax.parallel.distributed import initialize, launcher_detected

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import multihost_worker  # noqa: E402

CONFIG = multihost_worker.CONFIG

TIMEOUT_S = 120
# One layout keeps the test near 20 s on 2 cores; the worker runs the others by hand
# (`--layouts data_fsdp_tp,fsdp`), and they pass too.
LAYOUTS = ("fsdp_tp",)
# Parameters after 3 AdamW steps (lr 1e-3): Adam normalises each gradient, so float rounding
# differences of the two runs' gradients move a parameter by far less than one step (1e-3).
ATOL_PARAMS = 1e-5
_LAUNCHER_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                  "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", distributed.ENV_COORDINATOR,
                  distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
                  distributed.ENV_LOCAL_DEVICE_IDS)


@pytest.fixture
def clean_env(monkeypatch):
  for name in _LAUNCHER_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.fixture
def fake_jax_initialize(monkeypatch):
  """Records calls to jax.distributed.initialize instead of starting anything."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def test_single_process_is_a_noop(clean_env, fake_jax_initialize):
  assert initialize() is False
  assert initialize(num_processes=1) is False
  clean_env.setenv(distributed.ENV_NUM_PROCESSES, "1")
  assert initialize() is False
  assert fake_jax_initialize == []
  assert not jax.distributed.is_initialized()


def test_arguments_and_environment_are_passed_on(clean_env, fake_jax_initialize):
  assert initialize("10.0.0.1:1234", 4, 3, [0, 1], initialization_timeout=7) is True
  clean_env.setenv(distributed.ENV_COORDINATOR, "10.0.0.2:99")
  clean_env.setenv(distributed.ENV_NUM_PROCESSES, "2")
  clean_env.setenv(distributed.ENV_PROCESS_ID, "1")
  clean_env.setenv(distributed.ENV_LOCAL_DEVICE_IDS, "2,3")
  assert initialize() is True
  assert initialize(process_id=0) is True  # arguments win over the environment
  first, from_env, overridden = fake_jax_initialize
  assert first == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                       local_device_ids=[0, 1], initialization_timeout=7)
  assert from_env["coordinator_address"] == "10.0.0.2:99"
  assert (from_env["num_processes"], from_env["process_id"]) == (2, 1)
  assert from_env["local_device_ids"] == [2, 3]
  assert overridden["process_id"] == 0


def test_cluster_detection_is_left_to_jax(clean_env, fake_jax_initialize):
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_NTASKS", "1")
  assert not launcher_detected() and initialize() is False
  clean_env.setenv("SLURM_NTASKS", "16")
  assert launcher_detected() and initialize() is True
  assert initialize(auto_detect=False) is False
  clean_env.delenv("SLURM_JOB_ID")
  assert initialize(auto_detect=True) is True  # e.g. a Cloud TPU VM pod slice
  assert len(fake_jax_initialize) == 2
  for call in fake_jax_initialize:  # nothing given: JAX detects everything
    assert all(call[k] is None for k in ("coordinator_address", "num_processes", "process_id"))


def test_bad_arguments(clean_env, fake_jax_initialize):
  with pytest.raises(ValueError, match="process_id must be in"):
    initialize("h:1", 2, 2)
  with pytest.raises(ValueError, match="num_processes must be >= 1"):
    initialize(num_processes=0)
  with pytest.raises(ValueError, match="cpu_collectives must be one of"):
    initialize("h:1", 2, 0, cpu_collectives="nccl")
  with pytest.raises(ValueError, match="needs coordinator_address"):
    initialize(num_processes=2, auto_detect=False)
  with pytest.raises(ValueError, match="no process count: pass num_processes"):
    initialize("h:1")
  with pytest.raises(ValueError, match="no process count"):
    initialize(process_id=0)
  clean_env.setenv(distributed.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ValueError, match=distributed.ENV_NUM_PROCESSES):
    initialize()
  assert fake_jax_initialize == []


def test_idempotent_once_running(clean_env, fake_jax_initialize, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert initialize("h:1", 2, 0) is True
  assert fake_jax_initialize == []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  for name in _LAUNCHER_VARS:
    env.pop(name, None)
  return env


def _start_two_processes(save_dir: pathlib.Path) -> list[subprocess.Popen]:
  coordinator = f"127.0.0.1:{_free_port()}"
  return [
    subprocess.Popen(
      [sys.executable, str(HERE / "multihost_worker.py"), "--coordinator", coordinator,
       "--num-processes", "2", "--process-id", str(i), "--save-dir", str(save_dir),
       "--layouts", ",".join(LAYOUTS)],
      env=_child_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for i in range(2)
  ]


def _results(procs: list[subprocess.Popen]) -> list[dict]:
  """Each worker's JSON line; kills both on a failure or after TIMEOUT_S."""
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=TIMEOUT_S)
      assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-4000:]}"
      outputs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  """Losses of 2 processes × 4 devices == 1 process × 8 devices, both trained with the library's
  `create_train_state` / `make_train_step`; the exported policy too."""
  from rljax.models.io import load_pretrained
  from rljax.models.hf_weights import to_hf_state_dict

  assert jax.device_count() == 8 and jax.process_count() == 1
  procs = _start_two_processes(tmp_path / "hf")
  try:  # the single-process reference runs while the workers do
    reference = {layout: multihost_worker.train(layout) for layout in LAYOUTS}
  finally:
    results = _results(procs)
  for pid, result in enumerate(results):
    assert result["initialized"] is True
    assert (result["process_id"], result["process_count"]) == (pid, 2)
    assert (result["device_count"], result["local_device_count"]) == (8, 4)
  for layout, (losses, _, facts) in reference.items():
    assert len(losses) == multihost_worker.NUM_STEPS
    assert len(set(np.round(losses, 6))) > 1  # the model really trains between steps
    assert facts["step"] == multihost_worker.NUM_STEPS and facts["skipped_steps"] == 0
    for result in results:
      np.testing.assert_allclose(result["losses"][layout], losses, rtol=0, atol=1e-5,
                                 err_msg=layout)
      got = result["facts"][layout]
      assert got["step"] == multihost_worker.NUM_STEPS and got["skipped_steps"] == 0
      # The parameters were created as one array over the devices of both processes (not a
      # process-local copy), in shards as small as in the 1-process run (really split).
      assert got["embed_fully_addressable"] is False
      assert got["embed_shard_shape"] == facts["embed_shard_shape"]
      assert got["embed_shard_shape"] != [CONFIG.vocab_size, CONFIG.hidden_size]
  # The policy sharded across both processes was gathered and written once, as an HF directory.
  exported, _ = load_pretrained(tmp_path / "hf")
  expected = to_hf_state_dict(reference[LAYOUTS[0]][1])
  got = to_hf_state_dict(exported)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=ATOL_PARAMS, err_msg=name)
