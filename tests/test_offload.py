"""Specification of model.remat=offload and offload_attention: each layer's input (and with
offload_attention, the attention kernel's output and log-sum-exp) goes to pinned host memory
in the forward pass and comes back for the backward pass. XLA:CPU ignores the placement, so
on the CPU training with offload is training with full rematerialisation, step for step, with
every sequence-parallel strategy; the compiled placement is checked on the h100 target
(tests/test_targets.py)."""
import functools

import jax
import numpy as np
import pytest

from configs import tiny
from tests.helpers import tiny_losses_on_8
from train.state import build_run
from configs.sections import settings as settings_of

STRATEGIES = {"ring": {}, "ulysses": {}, "allgather": {}, "hybrid": {"ulysses_degree": 2}}
STEPS = 20


@functools.lru_cache(maxsize=None)
def tiny_losses(strategy: str, remat: str) -> tuple[float, ...]:
    """configs/tiny.py with scanned layers (offload needs them) on mesh seq 8 with
    `strategy`: the losses of 20 steps on one packed batch."""
    settings = (("model.attention", strategy), ("model.remat", remat),
                ("model.scan_layers", True),
                *((f"model.{key}", value) for key, value in STRATEGIES[strategy].items()))
    return tiny_losses_on_8(settings, STEPS)[0]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["offload", "offload_attention"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_training_with_offload_equals_full_remat_on_8_devices(strategy, policy):
    full, offload = tiny_losses(strategy, "full"), tiny_losses(strategy, policy)
    assert np.max(np.abs(np.subtract(full, offload))) <= 1e-6, (full, offload)
    assert full[-1] < 0.9 * full[0]             # it learned the batch


def test_offload_is_a_remat_policy_of_the_config():
    config = tiny.get_config()
    config.model.remat, config.model.scan_layers = "offload", True
    assert build_run(settings_of(config), devices=jax.devices()[:1]).model_config.remat == "offload"


def test_offload_without_scanned_layers_is_one_line():
    config = tiny.get_config()
    config.model.remat, config.model.scan_layers = "offload", False
    with pytest.raises(ValueError, match="model.remat=offload needs model.scan_layers=True"):
        build_run(settings_of(config), devices=jax.devices()[:1])


def test_offload_attention_takes_groups_of_one_layer():
    config = tiny.get_config()
    config.model.remat, config.model.scan_layers = "offload_attention", True
    config.model.n_layers, config.model.remat_group = 4, 2
    with pytest.raises(ValueError, match="offload_attention keeps every layer's attention "
                                         "residuals in host memory: it takes "
                                         "model.remat_group=1, got 2"):
        build_run(settings_of(config), devices=jax.devices()[:1])
