"""Test configuration: 8 emulated CPU devices (set before jax is imported), compile-time
savings, and hypothesis profiles.

Most of the suite's time is XLA compiling tiny programs that then run in microseconds, so the
tests (and the subprocesses they start, which inherit the environment) compile with LLVM at -O0
(`--xla_backend_optimization_level=0`: the same HLO and the same IEEE arithmetic, less
machine-code optimisation: the clean-clone suite 711 → 623 s; the execution-bound addition run
drops the flag in its own process), and share one persistent compilation cache per run
(created by the first process, inherited by the pytest-xdist workers and every subprocess,
removed at the end): a program that several tests build (the same tiny model's forward, the
same loss) is compiled once. `rljax.train.count_compiles` counts cache hits as well as
compilations, so the tests that assert "no new program" see both.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "RLJAX_TEST_COMPILATION_CACHE" not in os.environ
_CACHE = os.environ.setdefault("RLJAX_TEST_COMPILATION_CACHE",
                               tempfile.mkdtemp(prefix="rljax-test-xla-cache-"))
# JAX reads its options from JAX_* variables, so subprocesses (a resumed run, the multi-process
# workers) use the cache too: a resumed process loads the programs its first run compiled.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

assert jax.config.jax_compilation_cache_dir == _CACHE


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)

# Few examples, no deadline (the first example of each test pays for compilation).
settings.register_profile(
    "rljax", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("rljax")


@pytest.fixture
def x64():
  """Runs the test body with 64-bit types enabled (float64 references at atol 1e-6)."""
  with jax.enable_x64(True):
    yield


def pytest_collection_modifyitems(items):
  """Slow tests first: under pytest-xdist (`-n auto`, pyproject's addopts) the longest ones start
  while the rest of the suite fills the other workers, instead of running alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
