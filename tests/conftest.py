"""Test set-up: 8 simulated CPU devices, float32 matmuls at full precision, and one small
trained workdir shared by the end-to-end tests that only need "a trained checkpoint".

XLA_FLAGS must be set before JAX is imported anywhere, so it is done here at import time.
The repository root is put on sys.path by pytest.ini (pythonpath = .).
"""
import contextlib
import io
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from util.quiet_imports import import_jax_quietly

import_jax_quietly()          # the CUDA plugin of the target lane starts quietly (no GPU here)
import jax  # noqa: E402 - after the quiet import above

jax.config.update("jax_default_matmul_precision", "highest")

# The shared run: small_config() with an evaluation every 4 of its 8 steps.
TRAINED_OVERRIDES = {"eval.every_steps": 4}


class TrainedWorkdir(str):
    """The path of the shared trained workdir; `.summary` is what train() returned and
    `.output` what it printed.

    Tests must not change it in a way other tests can see: evaluate under their own
    eval.name, or copy it (shutil.copytree) before writing into it.
    """
    summary: dict
    output: str


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir trained once per session with tests.helpers.small_config(**TRAINED_OVERRIDES):
    checkpoints at steps 4 and 8, metrics, eval/ of the final evaluation."""
    from tests.helpers import small_config
    from train.trainer import train
    path = str(tmp_path_factory.mktemp("trained") / "run")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        summary = train(small_config(**TRAINED_OVERRIDES), path)
    workdir = TrainedWorkdir(path)
    workdir.summary, workdir.output = summary, output.getvalue()
    return workdir
