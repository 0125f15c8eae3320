"""The longest context that fits, with and without host offload, on 8 and 64 H100s
(compile-only), beside the published figures of other systems.

For each Llama preset and GPU count, `python main.py --mode plan` of the four-million-token
recipe (configs/llama.py:<preset>_4m: every layer's input offloaded to pinned host memory)
and of the same recipe without offload (model.remat=full in groups of 4 layers, the
no-offload recipe of the presets), with the longest-fit search against the target's 80 GiB.
8 GPUs: Ulysses over the 8 (one host). 64 GPUs (8 hosts of 8): the hybrid, Ulysses within
each host and a ring across the hosts (Ulysses alone cannot split 32 heads 64 ways).
Nothing is allocated; these are the XLA:GPU compiler's buffer assignments, not runs.

    python -m benchmarks.longest_fit [--presets llama3_8b,llama2_7b] [--gpus 8,64]
        [--workdir DIR] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import os

from benchmarks.common import add_plan_reuse_arguments, int_list, main_py, new_workdir
from util.tables import format_table

GIB = 2 ** 30
FOUR_MILLION = 4 * 2 ** 20
# where each GPU count's search starts (the level the plan compiles first)
START_LENGTH = {8: FOUR_MILLION, 64: 4 * FOUR_MILLION}
RECIPES = {"offload": [],
           "no offload": ["--config.model.remat=full", "--config.model.remat_group=4"]}
# Published longest contexts on H100s, for comparison (their own recipes and models).
PUBLISHED = [
    ("ALST (Ulysses, tiled MLP and loss, layer inputs and the optimizer in CPU memory, ZeRO-3;"
     " hosts of 1.9 TB)", "Llama-3.1-8B", 1, "500K", "arXiv 2506.13996"),
    ("ALST", "Llama-3.1-8B", 8, "3.7M", "arXiv 2506.13996"),
    ("ALST", "Llama-3.1-8B", 32, "15M", "arXiv 2506.13996"),
    ("TRL (ring context parallelism, FSDP2, checkpoint offload, chunked loss; 56.2 GB per "
     "GPU, 380 s a step)", "Qwen3-8B", 8, "1M", "Hugging Face TRL, context parallelism"),
    ("TRL", "Qwen3-8B", 16, "2M", "Hugging Face TRL, context parallelism"),
    ("TRL", "Qwen3-8B", 32, "4M", "Hugging Face TRL, context parallelism"),
]


def mesh_args(gpus: int) -> list[str]:
    """The sequence-parallel layout of `gpus` H100s (8 a host)."""
    if gpus <= 8:
        return [f"--config.mesh.seq={gpus}"]
    return [f"--config.mesh.seq={gpus}", "--config.model.attention=hybrid",
            "--config.model.ulysses_degree=8", "--config.plan.strategies=('hybrid',)"]


def plan(preset: str, gpus: int, recipe: str, workdir: str, reuse: bool) -> dict:
    """plan.json of `preset`'s 4M recipe (or its no-offload variant) on `gpus` H100s."""
    path = os.path.join(workdir, f"{preset}_{gpus}_{recipe.replace(' ', '_')}")
    if not (reuse and os.path.exists(os.path.join(path, "plan.json"))):
        length = START_LENGTH[gpus]
        strategies = [] if gpus > 8 else ["--config.plan.strategies=('ulysses',)"]
        seconds = main_py("--mode", "plan", "--config", f"configs/llama.py:{preset}_4m",
                          "--workdir", path, "--config.plan.target=h100",
                          f"--config.plan.devices={gpus}", f"--config.curriculum.l_max={length}",
                          f"--config.eval.lengths=({length},)", *mesh_args(gpus), *strategies,
                          *RECIPES[recipe])
        print(f"  {preset} on {gpus} H100, {recipe}: {seconds:.0f} s", flush=True)
    with open(os.path.join(path, "plan.json")) as f:
        return json.load(f)


def host_at_fit(level: dict, fit: dict) -> str:
    """Host GiB per device at the longest fit: compiled (plans written since this script),
    else scaled from the compiled length ("~": the offloaded layer inputs grow linearly)."""
    if "host_bytes_per_device" in fit:
        return f"{fit['host_bytes_per_device'] / GIB:.0f}"
    host = level["host_bytes_per_device"]["total"]
    return f"~{host * fit['length'] / level['length'] / GIB:.0f}" if host else "0"


def row(preset: str, gpus: int, recipe: str, result: dict) -> list:
    """model, GPUs, recipe, the start level's GiB per device (device / host), longest fit
    (device GiB, host GiB)."""
    level = result["levels"][-1]
    fit = result.get("longest_fit")
    memory, host = level["bytes_per_device"], level["host_bytes_per_device"]["total"]
    at_start = f"{memory['total'] / GIB:.1f} / {host / GIB:.0f}"
    longest = (f"{fit['length']:,} ({fit['bytes_per_device'] / GIB:.1f} / "
               f"{host_at_fit(level, fit)})" if fit else "none fits")
    return [preset, gpus, recipe, f"{level['length']:,}", at_start, longest]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.longest_fit",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="llama3_8b,llama2_7b",
                        help="comma-separated presets of configs/llama.py with a _4m recipe")
    parser.add_argument("--gpus", type=int_list, default=[8, 64])
    add_plan_reuse_arguments(parser)
    args = parser.parse_args(argv)
    workdir = args.workdir or new_workdir("longest_fit")
    rows = [row(preset, gpus, recipe, plan(preset, gpus, recipe, workdir, args.reuse))
            for preset in [p for p in args.presets.split(",") if p]
            for gpus in args.gpus for recipe in RECIPES]
    print("\nLongest context per row of one sequence on H100s (compile-only, XLA:GPU buffer "
          "assignment; budget 80 GiB per device); GiB per device at the first length "
          "compiled: device / pinned host")
    print(format_table(["model", "H100s", "recipe", "length compiled", "GiB device / host",
                        "longest fit (GiB device / host)"], rows))
    print("\nPublished, measured on H100s by their authors (other recipes, for comparison)")
    print(format_table(["system", "model", "H100s", "longest context", "source"], PUBLISHED))
    print(f"plans in {workdir}")


if __name__ == "__main__":
    main()
