"""Multi-host start-up: `initialize` wraps `jax.distributed.initialize`.

A multi-host job runs the same script once per host (process). Each process sees its local
devices; after `initialize` every process also sees the global device list (`jax.devices()`),
a mesh built by `rljax.parallel.make_mesh` spans all of them, and `jax.jit` over that mesh runs
one SPMD program across hosts (JAX's own collectives: NCCL on GPU, ICI/DCN on TPU, gloo on CPU).
No rljax code communicates by itself.

Where the coordinates come from, first match wins:
  1. the arguments;
  2. `RLJAX_COORDINATOR_ADDRESS` ("host:port" of process 0), `RLJAX_NUM_PROCESSES`,
     `RLJAX_PROCESS_ID`, `RLJAX_LOCAL_DEVICE_IDS` ("0,1,2,3");
  3. JAX's cluster auto-detection (`jax.distributed.initialize()` with no arguments: SLURM,
     Open MPI, Cloud TPU pods / GKE TPU, Kubernetes JobSets, mpi4py), used when a
     multi-process launcher is visible in the environment (SLURM with more than one task,
     Open MPI with more than one rank, GKE TPU with several worker hosts, or
     `JAX_COORDINATOR_ADDRESS` set), or always with `auto_detect=True` — needed on a Cloud TPU
     VM pod slice, which is recognised only through the TPU metadata server.
With none of these (or a process count of 1) it does nothing and returns False, so a script that
calls it runs unchanged on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

ENV_COORDINATOR = "RLJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RLJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "RLJAX_LOCAL_DEVICE_IDS"
CPU_COLLECTIVES = ("gloo", "mpi")


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw is None or raw.strip() == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _env_int_list(name: str) -> list[int] | None:
  raw = os.environ.get(name)
  if raw is None or raw.strip() == "":
    return None
  try:
    return [int(p) for p in raw.split(",")]
  except ValueError:
    raise ValueError(f"environment variable {name} must be like '0,1,2,3', got {raw!r}") from None


def launcher_detected() -> bool:
  """True when the environment shows a multi-process launcher JAX can auto-configure from.

  SLURM with more than one task (`SLURM_NTASKS` / `SLURM_STEP_NUM_TASKS` > 1), Open MPI with
  more than one rank (`OMPI_COMM_WORLD_SIZE` > 1), GKE TPU with several worker hosts
  (`TPU_WORKER_HOSTNAMES` listing more than one), or `JAX_COORDINATOR_ADDRESS` set.
  """
  env = os.environ
  slurm = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
  if env.get("SLURM_JOB_ID") and slurm and slurm.isdigit() and int(slurm) > 1:
    return True
  ompi = env.get("OMPI_COMM_WORLD_SIZE")
  if ompi and ompi.isdigit() and int(ompi) > 1:
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def is_initialized() -> bool:
  """Whether the JAX distributed system is running in this process."""
  return jax.distributed.is_initialized()


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  *,
  auto_detect: bool | None = None,
  cpu_collectives: str | None = "gloo",
  initialization_timeout: int = 300,
) -> bool:
  """Starts JAX's multi-process runtime (`jax.distributed.initialize`) for a multi-process job.

  Must run before anything touches a JAX device (computation, `jax.devices()`, `device_put`).
  Idempotent: a second call (or a call after the runtime was started by other means) returns
  True and does nothing.

  Args:
    coordinator_address: "host:port" of process 0, reachable from every process (any free
      port); default `$RLJAX_COORDINATOR_ADDRESS`, then JAX's detection.
    num_processes: number of processes; default `$RLJAX_NUM_PROCESSES`. 1 means single-process:
      nothing is started.
    process_id: this process's rank in [0, num_processes); default `$RLJAX_PROCESS_ID`.
    local_device_ids: restrict this process to these local devices (e.g. one GPU per process);
      default `$RLJAX_LOCAL_DEVICE_IDS` ("0,1"), else all local devices.
    auto_detect: None (default): let JAX detect the cluster when no process count is given but a
      launcher is visible (`launcher_detected`); True: always hand over to JAX's detection when
      the coordinates are incomplete (Cloud TPU VM pods, mpi4py); False: never.
    cpu_collectives: cross-process collectives on the CPU backend, "gloo" (default, bundled)
      or "mpi"; None leaves `jax_cpu_collectives_implementation` as it is. Irrelevant on GPU/TPU.
    initialization_timeout: seconds to wait for all processes to connect (JAX's default 300).

  Returns:
    True if the distributed runtime is running (started now or before), False for a
    single-process run.

  Raises:
    ValueError: a malformed environment variable, a process id outside [0, num_processes), a
      coordinator or process id without a process count (and no cluster to detect), or an
      unknown `cpu_collectives`; RuntimeError (from JAX) when called after JAX has already
      initialised its backend.

  Example:
    >>> # on every host, before any other JAX call:
    >>> rljax.parallel.initialize()          # RLJAX_* env vars, or SLURM / TPU pod detection
    >>> mesh = rljax.parallel.make_mesh(MeshConfig(data=jax.process_count(), fsdp=-1))
  """
  if jax.distributed.is_initialized():
    return True
  if cpu_collectives is not None and cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(
      f"cpu_collectives must be one of {CPU_COLLECTIVES} or None, got {cpu_collectives!r}"
    )
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if local_device_ids is None:
    local_device_ids = _env_int_list(ENV_LOCAL_DEVICE_IDS)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if num_processes == 1:
    return False
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  explicit = num_processes is not None
  if not explicit:
    wants_detection = launcher_detected() if auto_detect is None else auto_detect
    if not wants_detection and (coordinator_address is not None or process_id is not None):
      raise ValueError(
        f"a coordinator address or process id was given but no process count: pass "
        f"num_processes (or set {ENV_NUM_PROCESSES}), or auto_detect=True on a cluster JAX detects"
      )
    if not wants_detection:
      return False
  elif auto_detect is False and None in (coordinator_address, process_id):
    raise ValueError(
      f"num_processes={num_processes} needs coordinator_address and process_id (arguments or "
      f"{ENV_COORDINATOR} / {ENV_PROCESS_ID}) when auto_detect=False"
    )
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=local_device_ids,
    initialization_timeout=initialization_timeout,
  )
  return True


def shutdown() -> None:
  """Stops the distributed runtime (no-op when it is not running)."""
  jax.distributed.shutdown()
