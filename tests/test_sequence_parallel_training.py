"""Specification of the sequence-parallel strategies in training: a step's loss and
gradients on seq = 8 equal one device's for each strategy (and with the curriculum's
relayout), batches take the layout their strategy needs, `configs/tiny.py` on mesh.seq = 8
follows the one-device loss curve with each strategy, and a run resumed with another
strategy continues its losses."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from model.loss import token_loss_sums
from parallel import mesh as mesh_lib
from tests.helpers import small_config
from tests.test_any_length_training import packed_batch
from train.state import build_run, init_state
from train.step import put_batch
from train.validate import validate_config
from configs.sections import settings as settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {"ring": {}, "ulysses": {}, "allgather": {},
              "hybrid": {"model.ulysses_degree": 2}}


def loss_and_grads(attention, seq, extra=None, length=200):
    config = small_config(**{"model.attention": attention, **(extra or {})})
    config.model.q_heads, config.model.kv_heads = 8, 2        # Ulysses on 8 replicates KV
    config.model.head_dim = 8
    config.mesh.update(dict(data=1, fsdp=1, seq=seq, tensor=1))
    run = build_run(settings_of(config), devices=jax.devices()[:seq])
    params = init_state(run, seed=0)["params"]
    batch = put_batch(packed_batch(length=length), run.mesh, 8, run.layout, run.layout_parts)

    def mean_loss(params):
        nll, count = token_loss_sums(run.graphdef, params, batch, sequence_length=length)
        return nll / count

    with mesh_lib.use_mesh(run.mesh):
        loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    return run, float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.fixture(scope="module")
def one_device():
    return loss_and_grads("blockwise", 1)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_step_on_seq_8_equals_one_device_with_each_strategy(one_device, strategy):
    _, ref_loss, ref_grads = one_device
    run, loss, grads = loss_and_grads(strategy, 8, STRATEGIES[strategy])
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for ref, got in zip(ref_grads, grads):
        assert np.linalg.norm(got - ref) <= 1e-5 * max(np.linalg.norm(ref), 1e-12)


def test_each_strategy_gets_the_layout_it_needs():
    layouts = {name: build_run(settings_of(small_config(**{"model.attention": name, **extra,
                                               "model.q_heads": 8, "mesh.seq": 8,
                                               "mesh.data": 1})))
               for name, extra in STRATEGIES.items()}
    assert {name: (run.layout, run.layout_parts) for name, run in layouts.items()} == {
        "ring": ("zigzag", 8), "allgather": ("zigzag", 8), "ulysses": ("contiguous", 1),
        "hybrid": ("zigzag", 4)}          # the hybrid balances its 4 groups of 2


@pytest.mark.parametrize("override,message", [
    ({"model.attention": "ulysses", "model.q_heads": 4, "model.kv_heads": 2},
     "4 query heads per device do not split over mesh.seq = 8"),
    ({"model.attention": "hybrid", "model.ulysses_degree": 3},
     "model.ulysses_degree must be a positive divisor of mesh.seq"),
    ({"model.attention": "blockwise"}, "splits the sequence: set model.attention"),
    ({"model.attention": "ring", "model.attention_kernel": "cudnn"},
     "model.attention_kernel=cudnn: cudnn attention needs an NVIDIA GPU"),
])
def test_strategy_settings_that_cannot_run_are_one_line_before_compiling(override, message):
    config = small_config(**{"mesh.seq": 8, "mesh.data": 1, **override})
    with pytest.raises(ValueError, match=message):
        validate_config(settings_of(config))
        build_run(settings_of(config))


# ----------------------------------------------------------------------------- main.py

STEPS = 6
COMMON = ["--config", "configs/tiny.py", f"--config.train.stop_at_step={STEPS}",
          "--config.train.log_every_steps=1", "--config.train.batch_size=8",
          "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=False"]


def main_py(workdir, devices, *extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    given = {arg.split("=", 1)[0] for arg in extra}       # a flag given twice is refused
    common = [arg for arg in COMMON if arg.split("=", 1)[0] not in given]
    result = subprocess.run([sys.executable, "main.py", *common, "--workdir", workdir, *extra],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def seq8(strategy):
    return ["--config.mesh.seq=8", f"--config.model.attention={strategy}"] + \
        [f"--config.{k}={v}" for k, v in STRATEGIES[strategy].items()]


@pytest.fixture(scope="module")
def one_device_curve(tmp_path_factory):
    return main_py(str(tmp_path_factory.mktemp("one") / "run"), 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_tiny_on_seq_8_follows_the_one_device_loss_curve(one_device_curve, strategy, tmp_path):
    curve = main_py(str(tmp_path / "run"), 8, *seq8(strategy))
    assert sorted(curve) == sorted(one_device_curve) == list(range(1, STEPS + 1))
    for step, loss in one_device_curve.items():
        assert abs(curve[step] - loss) <= 1e-4, (step, curve[step], loss)


@pytest.mark.slow
def test_a_run_resumed_with_another_strategy_continues_its_losses(one_device_curve, tmp_path):
    workdir = str(tmp_path / "run")
    main_py(workdir, 8, *seq8("ring"), "--config.train.stop_at_step=3")
    curve = main_py(workdir, 8, *seq8("ulysses"))
    for step, loss in one_device_curve.items():
        assert abs(curve[step] - loss) <= 1e-4, (step, curve[step], loss)
