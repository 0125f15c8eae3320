"""Specification of training and evaluating at lengths that divide nothing: a step's loss
and gradients at length 200 on a ring of 8 equal one device's; `main.py` trains at
curriculum.l_max = 200 and evaluates at (100, 333, 1000) on one device and on
mesh.seq = 8, with the same losses (1e-4), perplexities and real-token counts."""
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
from train.state import build_run, init_state
from train.step import put_batch
from configs.sections import settings as settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 200


def packed_batch(rows=8, length=LENGTH, seed=0):
    """Rows of three documents (positions restarting in each) and a random loss mask."""
    rng = np.random.default_rng(seed)
    sizes = [61, 90, length - 151]
    segments = np.repeat(np.arange(1, 4), sizes)[None].repeat(rows, 0)
    positions = np.concatenate([np.arange(n) for n in sizes])[None].repeat(rows, 0)
    return {"tokens": rng.integers(0, 256, (rows, length)).astype(np.int32),
            "targets": rng.integers(0, 256, (rows, length)).astype(np.int32),
            "positions": positions.astype(np.int32), "segment_ids": segments.astype(np.int32),
            "loss_mask": (rng.random((rows, length)) > 0.1).astype(np.float32)}


def loss_and_grads(mesh_sizes, attention, devices, layout):
    config = small_config(**{"model.attention": attention})
    config.mesh.update(mesh_sizes)
    config.mesh.layout = layout
    run = build_run(settings_of(config), devices=devices)
    params = init_state(run, seed=0)["params"]
    batch = put_batch(packed_batch(), run.mesh, 8, layout)
    assert batch["tokens"].shape[1] == (208 if layout == "zigzag" and len(devices) == 8 else
                                        LENGTH)

    def mean_loss(params):
        nll, count = token_loss_sums(run.graphdef, params, batch, sequence_length=LENGTH)
        return nll / count

    with mesh_lib.use_mesh(run.mesh):
        loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_a_step_at_length_200_on_a_ring_of_8_equals_one_device(layout):
    ref_loss, ref_grads = loss_and_grads(dict(data=1, fsdp=1, seq=1, tensor=1), "blockwise",
                                         jax.devices()[:1], layout)
    loss, grads = loss_and_grads(dict(data=1, fsdp=1, seq=8, tensor=1), "ring", jax.devices(),
                                 layout)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for ref, got in zip(ref_grads, grads):
        assert np.linalg.norm(got - ref) <= 1e-5 * max(np.linalg.norm(ref), 1e-12)


# ----------------------------------------------------------------------------- main.py

COMMON = ["--config", "configs/tiny.py", "--config.model.d_model=64", "--config.model.n_layers=2",
          "--config.model.q_heads=4", "--config.model.kv_heads=2", "--config.model.head_dim=16",
          "--config.model.mlp_dim=128", "--config.model.block_q=16", "--config.model.block_k=16",
          f"--config.curriculum.l_max={LENGTH}", "--config.train.steps=8",
          "--config.train.batch_size=8", "--config.train.log_every_steps=1",
          "--config.checkpoint.every_steps=8", "--config.eval.batch_size=8",
          "--config.eval.max_batches=1", "--config.eval.lengths=(100,333,1000)",
          "--config.eval.sliding_stride=0", "--config.eval.retrieval_lengths=()"]
RUNS = {"one_device": (1, []),
        "ring_seq8": (8, ["--config.mesh.seq=8", "--config.model.attention=ring"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs of main.py; {name: (metrics records, perplexity_by_length.json)}."""
    out = {}
    for name, (devices, extra) in RUNS.items():
        workdir = str(tmp_path_factory.mktemp(name) / "run")
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        result = subprocess.run([sys.executable, "main.py", *COMMON, "--workdir", workdir,
                                 *extra], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        with open(os.path.join(workdir, "eval", "perplexity_by_length.json")) as f:
            out[name] = (records, json.load(f))
    return out


@pytest.mark.slow
def test_training_at_l_max_200_on_a_ring_of_8_follows_one_device(runs):
    losses = {name: {r["step"]: r["loss"] for r in records if "loss" in r}
              for name, (records, _) in runs.items()}
    assert sorted(losses["one_device"]) == sorted(losses["ring_seq8"]) == list(range(1, 9))
    for step, loss in losses["one_device"].items():
        assert abs(loss - losses["ring_seq8"][step]) <= 1e-4, step
    assert losses["one_device"][8] < losses["one_device"][1]            # it learned


@pytest.mark.slow
def test_evaluation_at_100_333_and_1000_tokens_agrees_across_meshes(runs):
    one, ring = runs["one_device"][1], runs["ring_seq8"][1]
    assert one["lengths"] == ring["lengths"] == [100, 333, 1000]
    np.testing.assert_allclose(ring["perplexity"], one["perplexity"], rtol=1e-4)
    assert one["target_tokens"] == ring["target_tokens"]


@pytest.mark.slow
def test_metrics_count_the_real_tokens_only(runs):
    for records, _ in runs.values():
        steps = [r for r in records if "loss" in r]
        assert [r["tokens"] for r in steps] == [LENGTH * 8 * i for i in range(1, 9)]
        assert {r["seq_len"] for r in steps} == {LENGTH}
