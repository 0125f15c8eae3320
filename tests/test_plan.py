"""Specification of `--mode plan` (cli/memory_plan.py): every level's train step and the
evaluation's scoring step compiled abstractly, their per-device memory, plan.json, the
longest fit, and no parameter ever allocated."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import small_config
from cli import memory_plan as plan_lib
from train.state import build_run, init_state
from train.step import make_train_step
from train.validate import validate_config
from configs.sections import settings as settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def curriculum_config():
    """small_config with 3 levels (64, 128, 256) moving devices from data to seq."""
    return small_config(**{"curriculum.levels": 3, "model.attention": "ring",
                           "eval.lengths": (64, 256)})


def main_plan(*args, devices=8):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "main.py", "--mode", "plan", *args,
                           f"--config.plan.devices={devices}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_plan_prints_a_row_per_level_and_writes_plan_json(tmp_path):
    result = main_plan("--config", "tests/small_config.py", "--workdir", str(tmp_path),
                       "--config.curriculum.levels=3", "--config.model.attention=ring",
                       "--config.eval.lengths=(64,256)", "--config.plan.strategies=()")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["devices"] == 8 and plan["platform"] == "cpu"
    assert [level["length"] for level in plan["levels"]] == [64, 128, 256]
    assert [level["level"] for level in plan["levels"]] == [0, 1, 2]
    for entry in plan["levels"] + [plan["eval"]]:
        assert set(entry) >= {"length", "batch_size", "mesh", "bytes_per_device",
                              "flops_per_step", "tokens_per_step", "compile_s"}
        assert set(entry["mesh"]) == {"data", "fsdp", "seq", "tensor"}
        b = entry["bytes_per_device"]
        assert b["total"] == b["arguments"] + b["temp"] + b["output"] - b["alias"] > 0
    assert plan["levels"][2]["mesh"]["seq"] == 4           # relayout: devices moved to seq
    assert plan["eval"]["length"] == 256 and plan["longest_fit"] is None
    printed = [line for line in result.stdout.splitlines()
               if line.startswith("|") and line.strip("| ").startswith("level")]
    assert len(printed) == 3 + 1                            # the curriculum table's header too
    assert any(line.startswith("| eval ") for line in result.stdout.splitlines())


@pytest.mark.slow
def test_planned_memory_equals_what_the_real_train_step_compiles_to():
    config = curriculum_config()
    curriculum = validate_config(settings_of(config))
    level = curriculum.levels[1]
    planned = plan_lib.train_step_entry(settings_of(config), level)["bytes_per_device"]
    run = build_run(settings_of(config), level=level)
    state = init_state(run, seed=0)                        # real arrays this time
    rows, length = level.batch_size, level.seq_len
    batch = {key: np.zeros((rows, length), np.int32)
             for key in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = np.ones((rows, length), np.float32)
    sharding = plan_lib.abstract_batch(run, rows, length)["tokens"].sharding
    batch = {key: jax.device_put(value, sharding) for key, value in batch.items()}
    with jax.set_mesh(run.mesh):
        compiled = make_train_step(run, 1).lower(state, batch, np.float32(1e-3)).compile()
    memory = compiled.memory_analysis()
    assert planned["arguments"] == memory.argument_size_in_bytes
    assert planned["temp"] == memory.temp_size_in_bytes
    assert planned["output"] == memory.output_size_in_bytes


@pytest.mark.slow
def test_the_longest_fit_is_the_longest_length_within_the_budget():
    config = small_config(**{"model.attention": "ring", "mesh.seq": 8, "mesh.data": 1,
                             "train.batch_size": 1})
    level = validate_config(settings_of(config)).levels[0]
    sizes = {}
    for length in (256, 512, 1024):
        entry = plan_lib.train_step_entry(settings_of(config), type(level)(**{**level.__dict__,
                                                                "seq_len": length}))
        sizes[length] = entry["bytes_per_device"]["total"]
    assert sizes[256] < sizes[512] < sizes[1024]
    budget = (sizes[512] + sizes[1024]) // 2              # 512 fits, 1024 does not
    fit = plan_lib.longest_fit(settings_of(config), level, budget, log=lambda *a, **k: None)
    step = plan_lib.length_step(settings_of(config), 8)
    assert 512 <= fit["length"] < 1024 and fit["length"] % step == 0
    assert fit["bytes_per_device"] <= budget
    longer = plan_lib.train_step_entry(settings_of(config), type(level)(**{**level.__dict__,
                                                             "seq_len": fit["length"] + step}))
    assert longer["bytes_per_device"]["total"] > budget   # one step more does not fit


@pytest.mark.slow
def test_plan_of_a_model_larger_than_host_memory_allocates_nothing(tmp_path):
    """A 2-layer model of 51 billion float32 parameters (204 GB of weights, 612 GB with
    Adam's moments) plans on this machine; the process stays far below the weights."""
    result = main_plan("--config", "configs/llama2_7b.py", "--workdir", str(tmp_path),
                       "--config.model.d_model=65536", "--config.model.mlp_dim=131072",
                       "--config.model.n_layers=2", "--config.model.remat_group=1",
                       "--config.model.q_heads=64",
                       "--config.model.kv_heads=64", "--config.model.head_dim=1024",
                       "--config.curriculum.l_max=4096", "--config.eval.lengths=(4096,)")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    weights = 4 * (2 * (4 * 65536 * 65536 + 3 * 65536 * 131072) + 2 * 32000 * 65536)
    assert weights > 200e9
    assert plan["levels"][0]["bytes_per_device"]["arguments"] > 3 * weights / 8 * 0.99
    rss = plan["host_peak_rss_gib"] * 2**30
    assert rss < 4 * 2**30 and rss < weights / 50


def test_host_peak_rss_is_the_process_own_not_its_parent_peak():
    ballast = np.ones(2**30 // 8)                     # 1 GiB touched in this (parent) process
    code = "from cli.memory_plan import host_peak_rss_bytes; print(host_peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert child.returncode == 0, child.stderr[-2000:]
    assert ballast.sum() == 2**30 // 8
    assert int(child.stdout.split()[-1]) < 2**30 // 2


def test_valid_lengths_step_by_zigzag_chunks_blocks_and_loss_and_mlp_chunks():
    config = small_config()                       # blocks of 16
    assert plan_lib.length_step(settings_of(config), 1) == 16
    assert plan_lib.length_step(settings_of(config), 8) == 128
    config.model.loss_chunk_tokens = 96
    config.model.mlp_chunk_tokens = 64
    assert plan_lib.length_step(settings_of(config), 2) == 192     # lcm(4, 32, 96, 64)


@pytest.mark.slow
def test_plan_compares_the_strategies_side_by_side(tmp_path):
    result = main_plan("--config", "tests/small_config.py", "--workdir", str(tmp_path),
                       "--config.mesh.seq=8", "--config.mesh.data=1",
                       "--config.model.attention=ring", "--config.model.q_heads=8",
                       "--config.model.head_dim=8", "--config.eval.lengths=(64,)")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    entries = {e["strategy"]: e for e in plan["strategies"]}
    assert sorted(entries) == ["allgather", "hybrid", "ring", "ulysses"]
    assert entries["hybrid"]["ulysses_degree"] == 4           # the largest proper divisor
    kinds = {name: {k for k, v in e["collective_bytes"].items()
                    if v and k not in ("traffic", "attention_traffic")}
             for name, e in entries.items()}
    # each strategy's own collectives, read from its compiled HLO
    assert "collective-permute" in kinds["ring"] and "all-to-all" not in kinds["ring"]
    assert "all-to-all" in kinds["ulysses"] and "collective-permute" not in kinds["ulysses"]
    assert {"all-gather", "reduce-scatter"} <= kinds["allgather"]
    assert {"all-to-all", "collective-permute"} <= kinds["hybrid"]
    for e in entries.values():
        assert e["closed_form"]["bytes"] > 0 and e["bytes_per_device"]["total"] > 0
        assert e["collective_seconds"]["inter_host"] == pytest.approx(
            9 * e["collective_seconds"]["intra_host"])       # 450 / 50 GB/s
    assert "placed" in entries["hybrid"]["collective_seconds"]
    assert "sequence-parallel strategies at the last level" in result.stdout
