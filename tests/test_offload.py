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
from parallel import mesh as mesh_lib
from tests.test_any_length_training import packed_batch
from train.state import build_run, init_state
from train.step import make_train_step, put_batch

STRATEGIES = {"ring": {}, "ulysses": {}, "allgather": {}, "hybrid": {"ulysses_degree": 2}}
STEPS = 20
LENGTH = 256                     # configs/tiny.py's l_max
ROWS = 2                         # rows a step (tiny's shape; fewer rows keep the test quick)


@functools.lru_cache(maxsize=None)
def tiny_losses(strategy: str, remat: str) -> tuple[float, ...]:
    """configs/tiny.py with scanned layers (offload needs them) on mesh seq 8 with
    `strategy`: the losses of 20 steps on one packed batch."""
    config = tiny.get_config()
    config.mesh.update(dict(data=1, fsdp=1, seq=8, tensor=1))
    config.model.attention, config.model.remat = strategy, remat
    config.model.scan_layers = True
    for key, value in STRATEGIES[strategy].items():
        config.model[key] = value
    run = build_run(config)
    state = init_state(run, seed=0)
    step = make_train_step(run, 1, LENGTH)
    # one batch throughout: the loss must fall as the model learns it
    batch = put_batch(packed_batch(rows=ROWS, length=LENGTH), run.mesh, ROWS, run.layout,
                      run.layout_parts)
    losses = []
    with mesh_lib.use_mesh(run.mesh):
        for _ in range(STEPS):
            state, metrics = step(state, batch, np.float32(2e-3))
            losses.append(float(metrics["loss"]))
    return tuple(losses)


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
    assert build_run(config, devices=jax.devices()[:1]).model_config.remat == "offload"


def test_offload_without_scanned_layers_is_one_line():
    config = tiny.get_config()
    config.model.remat, config.model.scan_layers = "offload", False
    with pytest.raises(ValueError, match="model.remat=offload needs model.scan_layers=True"):
        build_run(config, devices=jax.devices()[:1])


def test_offload_attention_takes_groups_of_one_layer():
    config = tiny.get_config()
    config.model.remat, config.model.scan_layers = "offload_attention", True
    config.model.n_layers, config.model.remat_group = 4, 2
    with pytest.raises(ValueError, match="offload_attention keeps every layer's attention "
                                         "residuals in host memory: it takes "
                                         "model.remat_group=1, got 2"):
        build_run(config, devices=jax.devices()[:1])
