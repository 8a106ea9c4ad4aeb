"""Test set-up: 8 fake CPU devices (for the sharding tests) before jax is imported."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests only: the counter-based "rbg" PRNG compiles parameter init much faster than
# threefry on CPU; no test depends on particular random values.
jax.config.update("jax_default_prng_impl", "rbg")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.exists():
    pytest.fail(f"{SHARED} is missing: CI clones shared/ beside the repository")
  return SHARED
