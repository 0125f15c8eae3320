"""Helpers shared by the benchmark scripts (run each as `python -m benchmarks.NAME`).

Nothing here imports jax at module level: a script that simulates devices sets
`XLA_FLAGS` first and may import this module before or after that.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from configs.sections import settings as settings_of

MIB = 2 ** 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def int_list(text: str) -> list[int]:
    """argparse type: "1024,2048" -> [1024, 2048]."""
    return [int(x) for x in text.split(",") if x.strip()]


def main_py(*args: str) -> float:
    """Runs `python main.py ARGS` in the repository (its stdout dropped, a failure raises);
    its wall seconds."""
    command = [sys.executable, "main.py", *args]
    print("+ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def new_workdir(name: str) -> str:
    """A fresh, empty directory outside the repository for a benchmark's runs:
    <system temp dir>/boundless_<name>_XXXXXX."""
    return tempfile.mkdtemp(prefix=f"boundless_{name}_")


def memory(compiled, seconds: float) -> dict:
    """Per-device memory of a compiled XLA executable from its buffer assignment:
    {"temp", "argument", "output", "alias", "host", "total", "compile_s"} in MiB / seconds,
    with total = temp + argument + output (device memory) and host the pinned-host bytes."""
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes / MIB, "argument": m.argument_size_in_bytes / MIB,
           "output": m.output_size_in_bytes / MIB, "alias": m.alias_size_in_bytes / MIB,
           "host": (m.host_temp_size_in_bytes + m.host_argument_size_in_bytes
                    + m.host_output_size_in_bytes) / MIB,
           "compile_s": seconds}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    return out


def target_list(text: str) -> list[str]:
    """argparse type: "cpu,h100,v5p" -> the plan.target names, checked."""
    from parallel import targets
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        targets.get(name)
    return names


def target_devices(name: str, count: int) -> list:
    """The first `count` devices of target `name` (parallel/targets.py): this process's
    (simulated) CPU devices for cpu, else compile-only GPUs, or the chips of the smallest
    TPU slice that has `count` (a 2-device mesh on a v5p takes 2 chips of its 4)."""
    import jax

    from parallel import targets
    target = targets.get(name)
    if not target.compile_only:
        if count > jax.device_count():
            raise SystemExit(f"{count} devices needed, {jax.device_count()} present (set "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return jax.devices()[:count]
    if target.platform == "tpu":
        count_of_slice = min(n for n in target.slices if n >= count)
        return targets.compile_only_devices(target, count_of_slice)[:count]
    return targets.compile_only_devices(target, count)


def describe_devices(devices) -> str:
    """"8 x NVIDIA H100 80GB HBM3 (compile-only)" or "8 cpu devices"."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return f"{len(devices)} simulated cpu devices"
    return f"{len(devices)} x {kind} (compile-only)"


def train_step_memory(attention: str, length: int, seq: int = 1, devices=None) -> dict:
    """Compiled per-device memory (see `memory`) of one train step of configs/tiny.py at
    batch 1 with `model.attention = attention`, on a mesh seq x 1 over the first `seq` of
    `devices` (default: this process's; data = fsdp = tensor = 1). Inputs are abstract:
    nothing is allocated."""
    import jax
    import jax.numpy as jnp

    from configs import tiny
    from parallel import mesh as mesh_lib
    from train import state as state_lib
    from train.step import make_train_step

    config = tiny.get_config()
    config.model.attention = attention
    config.curriculum.l_max = length
    config.eval.lengths = None
    config.train.batch_size = 1
    config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 1, seq, 1
    run = state_lib.build_run(settings_of(config), devices=(devices or jax.devices())[:seq])
    state = state_lib.abstract_state(run)
    rows = mesh_lib.batch_sharding(run.mesh)
    batch = {name: jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=rows)
             for name in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((1, length), jnp.float32, sharding=rows)
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        compiled = make_train_step(run, 1).lower(state, batch, learning_rate).compile()
    return memory(compiled, time.time() - start)


def save_figure(fig, path: str) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def add_plan_reuse_arguments(parser) -> None:
    """--workdir and --reuse of the scripts that run `--mode plan` per row."""
    parser.add_argument("--workdir", default=None,
                        help="where the plans go (default: a new temporary directory)")
    parser.add_argument("--reuse", action="store_true",
                        help="read a plan.json already in --workdir instead of planning again")
