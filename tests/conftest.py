"""Test configuration: 8 emulated CPU devices (set before jax is imported) and hypothesis profiles."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
