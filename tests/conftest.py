"""Test setup: 8 fake CPU devices so sharding is exercised without accelerators.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags; tests never parse argv.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True, scope="session")
def _check_devices():
  assert jax.device_count() == 8, jax.devices()
