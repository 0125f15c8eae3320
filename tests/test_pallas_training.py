"""Specification of model.attention_kernel=pallas in training: configs/tiny.py with heads of
128 on 8 simulated devices follows the blockwise kernel's loss curve with each
sequence-parallel strategy (the Pallas kernel runs in Pallas' interpreter on the CPU)."""
import functools

import jax
import numpy as np
import pytest

from configs import tiny
from parallel import mesh as mesh_lib
from tests.test_any_length_training import packed_batch
from train.state import build_run, init_state
from train.step import make_train_step, put_batch
from train.validate import validate_config

STRATEGIES = {"ring": {}, "ulysses": {}, "allgather": {}, "hybrid": {"ulysses_degree": 2}}
STEPS = 6
LENGTH = 256
ROWS = 2


@functools.lru_cache(maxsize=None)
def tiny_losses(strategy: str, kernel: str) -> tuple[float, ...]:
    """configs/tiny.py, heads of 128, float32, mesh seq 8 with `strategy` and the per-device
    `kernel`: the losses of 6 steps on one packed batch."""
    config = tiny.get_config()
    config.mesh.update(dict(data=1, fsdp=1, seq=8, tensor=1))
    config.model.attention, config.model.attention_kernel = strategy, kernel
    config.model.head_dim, config.model.dtype = 128, "float32"
    config.model.block_q = config.model.block_k = 16
    for key, value in STRATEGIES[strategy].items():
        config.model[key] = value
    validate_config(config, len(jax.devices()), platform="cpu")
    run = build_run(config)
    assert run.kernel == kernel
    state = init_state(run, seed=0)
    step = make_train_step(run, 1, LENGTH)
    batch = put_batch(packed_batch(rows=ROWS, length=LENGTH), run.mesh, ROWS, run.layout,
                      run.layout_parts)
    losses = []
    with mesh_lib.use_mesh(run.mesh):
        for _ in range(STEPS):
            state, metrics = step(state, batch, np.float32(2e-3))
            losses.append(float(metrics["loss"]))
    return tuple(losses)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_training_with_the_pallas_kernel_follows_the_blockwise_loss_curve(strategy):
    blockwise, pallas = tiny_losses(strategy, "blockwise"), tiny_losses(strategy, "pallas")
    np.testing.assert_allclose(pallas, blockwise, rtol=1e-4)
    assert blockwise[-1] < blockwise[0]                  # it learned something


def test_pallas_on_a_tpu_is_one_line_before_compiling():
    config = tiny.get_config()
    config.model.attention_kernel = "pallas"
    with pytest.raises(ValueError, match="model.attention_kernel=pallas: the Pallas kernel is "
                                         "written for GPUs"):
        validate_config(config, 1, platform="tpu")
