"""What the scanned layers, the remat policies and the chunked loss cost and save.

    python -m benchmarks.layers_and_memory [--tables compile,remat,loss] [--repeats 3]

compile: compile time of configs/tiny.py's train step (batch 1 x 256 tokens, one device)
  at 2, 8 and 32 layers, layers scanned (model.scan_layers) or a Python loop; median of
  --repeats compiles (jax.clear_caches() between), and the ratio to 2 layers.
scan: configs/tiny.py's own train step (16 x 256) scanned vs looped: compiled temp memory
  and median step time, stepped in turns.
remat: per remat policy, configs/tiny.py at 1 x 2048 tokens on one device: the compiled
  temp memory (memory_analysis) and the median step time of --steps steps, the policies
  timed in turns (A B C D A B C D ...) so machine load hits them alike.
loss: the train step of configs/tiny.py's layers with Llama 3's 128256-token vocabulary
  at 1 x 4096 tokens, compiled temp memory with model.loss_chunk_tokens 0 (all logits) and
  512 (chunks).
Inputs for memory are abstract (jax.ShapeDtypeStruct): nothing is allocated.
"""
from __future__ import annotations

import os
from configs.sections import settings as settings_of

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import MIB
from model.choices import REMAT_POLICIES
from configs import tiny
from util.tables import format_table
from parallel import mesh as mesh_lib
from cli import memory_plan as plan_lib
from train.state import abstract_state, build_run, init_state
from train.step import make_train_step


def one_device_config(**model):
    """configs/tiny.py on one device, layers scanned unless `model` says otherwise."""
    config = tiny.get_config()
    config.model.scan_layers = True
    config.mesh.data = 1
    config.train.batch_size = 1
    for key, value in model.items():
        config.model[key] = value
    return config


def real_batch(run, rows: int, length: int) -> dict:
    """Rows of random bytes as a batch on run's mesh."""
    tokens = np.random.default_rng(0).integers(0, 256, (rows, length + 1)).astype(np.int32)
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
            "segment_ids": np.zeros((rows, length), np.int32),
            "loss_mask": np.ones((rows, length), np.float32)}
    sharding = mesh_lib.batch_sharding(run.mesh)
    return {key: jax.device_put(value, sharding) for key, value in host.items()}


def compiled_step(config, length: int, concrete: bool = False, rows: int = 1):
    """(compiled train step, compile seconds, (state, batch)) at [rows, length] on one
    device; state and batch are real arrays with `concrete`, else abstract."""
    config.curriculum.l_max = length
    config.eval.lengths = (length,)
    run = build_run(settings_of(config), devices=jax.devices()[:1])
    state = init_state(run, 0) if concrete else abstract_state(run)
    batch = (real_batch(run, rows, length) if concrete
             else plan_lib.abstract_batch(run, rows, length))
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        compiled = make_train_step(run, 1).lower(state, batch, jnp.float32(1e-3)).compile()
    return compiled, time.time() - start, (state, batch)


def compile_table(repeats: int) -> str:
    rows, base = [], {}
    for layers in (2, 8, 32):
        cells = [layers]
        for scan in (True, False):
            times = []
            for _ in range(repeats):
                jax.clear_caches()
                config = one_device_config(n_layers=layers, scan_layers=scan)
                _, seconds, _ = compiled_step(config, 256)
                times.append(seconds)
            median = statistics.median(times)
            base.setdefault(scan, median)
            cells += [f"{median:.2f}", f"{median / base[scan]:.2f}"]
        rows.append(cells)
        print(f"  compile: {layers} layers done", flush=True)
    return format_table(["layers", "scanned s", "scanned / 2 layers", "loop s", "loop / 2 layers"],
                        rows)


def timed_in_turns(variants: dict, length: int, steps: int, rows: int = 1) -> dict:
    """{name: (compiled temp MiB, median step seconds)} of configs/tiny.py variants
    ({name: model overrides}) at [rows, length] on one device, stepped in turns
    (A B C A B C ...) so machine load hits them alike; the first step of each is dropped."""
    compiled = {}
    for name, overrides in variants.items():
        config = one_device_config(**overrides)
        config.train.batch_size = rows
        step, _, (state, batch) = compiled_step(config, length, True, rows)
        compiled[name] = [step, state, batch]
    times = {name: [] for name in variants}
    for _ in range(steps + 1):
        for name in variants:
            step, state, batch = compiled[name]
            start = time.time()
            state, metrics = step(state, batch, jnp.float32(1e-3))
            jax.block_until_ready(metrics["loss"])
            times[name].append(time.time() - start)
            compiled[name][1] = state
    return {name: (compiled[name][0].memory_analysis().temp_size_in_bytes / MIB,
                   statistics.median(times[name][1:])) for name in variants}


def remat_table(steps: int) -> str:
    measured = timed_in_turns({p: {"remat": p} for p in REMAT_POLICIES}, 2048, steps)
    base = measured["none"][1]
    rows = [[policy, f"{temp:.1f}", f"{seconds * 1000:.0f}", f"{seconds / base:.2f}"]
            for policy, (temp, seconds) in measured.items()]
    return format_table(["model.remat", "temp MiB", "step ms (median)", "step / none"], rows)


def scan_table(steps: int) -> str:
    measured = timed_in_turns({"scanned": {"scan_layers": True}, "loop": {"scan_layers": False}},
                              256, steps, rows=16)
    base = measured["loop"][1]
    rows = [[name, f"{temp:.1f}", f"{seconds * 1000:.0f}", f"{seconds / base:.2f}"]
            for name, (temp, seconds) in measured.items()]
    return format_table(["layers", "temp MiB", "step ms (median)", "step / loop"], rows)


def loss_table() -> str:
    rows = []
    for chunk in (0, 512):
        config = one_device_config(vocab_size=128256, loss_chunk_tokens=chunk)
        compiled, _, _ = compiled_step(config, 4096)
        m = compiled.memory_analysis()
        rows.append([chunk or "off (all logits)", f"{m.temp_size_in_bytes / MIB:.1f}",
                     f"{m.argument_size_in_bytes / MIB:.1f}"])
    return format_table(["model.loss_chunk_tokens", "temp MiB", "arguments MiB"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layers_and_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default="compile,scan,remat,loss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args(argv)
    tables = args.tables.split(",")
    out = []
    if "compile" in tables:
        out.append("train step compile time, configs/tiny.py layers, 1 x 256 tokens, one CPU "
                   f"device (median of {args.repeats}):\n" + compile_table(args.repeats))
    if "scan" in tables:
        out.append("scanned layers vs a Python loop, configs/tiny.py (4 layers) at its training "
                   f"shape 16 x 256, one CPU device ({args.steps} steps each, in turns):\n"
                   + scan_table(args.steps))
    if "remat" in tables:
        out.append("remat policies, configs/tiny.py at 1 x 2048 tokens, one CPU device "
                   f"({args.steps} steps each, in turns):\n" + remat_table(args.steps))
    if "loss" in tables:
        out.append("LM head + loss at vocab 128256, configs/tiny.py layers, 1 x 4096 tokens, "
                   "one device (compiled):\n" + loss_table())
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
