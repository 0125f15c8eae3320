"""Fused attention against the blockwise loop in a compiled train step, per strategy and
target (compile-only: nothing runs, nothing is allocated).

configs/tiny.py with packed rows in bf16 and heads of 128 (what the accelerator kernels
take), one row of `--length` tokens split over 8 devices of the seq axis, for each
sequence-parallel strategy: the train step compiled with model.attention_kernel=blockwise
and with =auto (the platform's fused kernel: Pallas Triton on an H100, Pallas Mosaic on a
TPU v5p). Per device: the compiled temp memory (MiB) of each, and the fused kernel's
custom calls in the compiled HLO (plan.json's fused_attention_calls).

    python -m benchmarks.fused_kernels [--target h100,v5p] [--length 32768]
        [--strategies ring,ulysses,allgather,hybrid]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the targets compile here; nothing runs

from benchmarks.common import target_list
from cli import memory_plan as plan_lib
from configs import tiny
from parallel import targets
from train.validate import validate_config
from util.tables import format_table

MIB = 2 ** 20
STRATEGIES = ("ring", "ulysses", "allgather", "hybrid")


def step_config(strategy: str, kernel: str, length: int):
    """tiny, bf16, heads of 128, seq 8 (hybrid: Ulysses groups of 4), one row of `length`."""
    config = tiny.get_config()
    config.mesh.seq, config.mesh.data = 8, 1
    config.train.batch_size = 1
    config.curriculum.l_max = length
    config.eval.lengths = (length,)
    config.model.attention, config.model.attention_kernel = strategy, kernel
    config.model.dtype, config.model.head_dim = "bfloat16", 128
    config.model.ulysses_degree = 4 if strategy == "hybrid" else None
    return config


def step_entry(strategy: str, kernel: str, length: int, devices, target) -> dict:
    config = step_config(strategy, kernel, length)
    level = validate_config(config, len(devices), platform=devices[0].platform).levels[0]
    return plan_lib.train_step_entry(config, level, devices, target)


def rows(target_name: str, length: int, strategies) -> list[list]:
    target = targets.get(target_name)
    devices = targets.compile_only_devices(target, 8)
    out = []
    for strategy in strategies:
        loop = step_entry(strategy, "blockwise", length, devices, target)
        fused = step_entry(strategy, "auto", length, devices, target)
        loop_mib, fused_mib = (e["bytes_per_device"]["temp"] / MIB for e in (loop, fused))
        out.append([target_name, strategy, f"{loop_mib:,.1f}", fused["attention_kernel"],
                    f"{fused_mib:,.1f}", f"{fused_mib / loop_mib:.2f}",
                    fused["fused_attention_calls"]])
        print(f"  {target_name} {strategy}: done", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_kernels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=target_list, default=["h100", "v5p"])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    table = [row for name in args.target for row in rows(name, args.length, strategies)]
    print(f"\ntiny (bf16, heads of 128), packed train step, {args.length:,} tokens on seq 8: "
          "temp memory per device, compile-only")
    print(format_table(["target", "strategy", "blockwise MiB", "fused kernel", "fused MiB",
                        "fused / blockwise", "fused calls"], table))


if __name__ == "__main__":
    main()
