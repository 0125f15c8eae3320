"""Specification of model.attention_kernel=pallas in training: configs/tiny.py with heads of
128 on 8 simulated devices follows the blockwise kernel's loss curve with each
sequence-parallel strategy (the Pallas kernel runs in Pallas' interpreter on the CPU)."""
import functools

import numpy as np
import pytest

from tests.helpers import tiny_losses_on_8

STRATEGIES = {"ring": {}, "ulysses": {}, "allgather": {}, "hybrid": {"ulysses_degree": 2}}
STEPS = 6


@functools.lru_cache(maxsize=None)
def tiny_losses(strategy: str, kernel: str) -> tuple[float, ...]:
    """configs/tiny.py, heads of 128, float32, mesh seq 8 with `strategy` and the per-device
    `kernel`: the losses of 6 steps on one packed batch."""
    settings = (("model.attention", strategy), ("model.attention_kernel", kernel),
                ("model.head_dim", 128), ("model.dtype", "float32"), ("model.block_q", 16),
                ("model.block_k", 16),
                *((f"model.{key}", value) for key, value in STRATEGIES[strategy].items()))
    losses, used = tiny_losses_on_8(settings, STEPS)
    assert used == kernel
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_training_with_the_pallas_kernel_follows_the_blockwise_loss_curve(strategy):
    blockwise, pallas = tiny_losses(strategy, "blockwise"), tiny_losses(strategy, "pallas")
    np.testing.assert_allclose(pallas, blockwise, rtol=1e-4)
    assert blockwise[-1] < blockwise[0]                  # it learned something
