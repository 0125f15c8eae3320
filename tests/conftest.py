"""Test set-up: 8 simulated CPU devices, float32 matmuls at full precision.

XLA_FLAGS must be set before JAX is imported anywhere, so it is done here at import time.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (training, multi-process); they still run in CI")
