"""Fused attention against the blockwise loop, per strategy and target, compiled
(compile-only: nothing runs, nothing is allocated).

configs/tiny.py with packed rows in bf16 and heads of 128 (what the accelerator kernels
take), one row of `--length` tokens split over 8 devices of the seq axis, for each
sequence-parallel strategy, with model.attention_kernel=blockwise and with =auto (the
platform's fused kernel: Pallas Triton on an H100, Pallas Mosaic on a TPU v5p). Per
device, compiled temp memory (MiB) of
- the attention: the strategy's attention call, forward and backward, on tiny's heads
  (8 query / 4 KV heads of 128, bf16; block 128);
- the train step (plan.json's), with the fused kernel's custom calls in its HLO
  (fused_attention_calls).

    python -m benchmarks.fused_kernels [--target h100,v5p] [--length 32768]
        [--strategies ring,ulysses,allgather,hybrid]
"""
from __future__ import annotations

import argparse
import os
from configs.sections import settings as settings_of

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the targets compile here; nothing runs

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.common import target_list
from cli import memory_plan as plan_lib
from configs import tiny
from parallel import targets
from parallel.mesh import make_mesh
from parallel.sequence_parallel import choose_kernel, sequence_attention
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
    level = validate_config(settings_of(config),
                            len(devices), platform=devices[0].platform).levels[0]
    return plan_lib.train_step_entry(settings_of(config), level, devices, target)


def attention_temp(strategy: str, kernel: str, length: int, devices) -> float:
    """MiB of temp memory per device of grad(sum(attention)) of the strategy on seq 8."""
    mesh = make_mesh(dict(data=1, fsdp=1, seq=8, tensor=1), devices)
    tokens = NamedSharding(mesh, PartitionSpec(None, "seq", None, None))
    ids = NamedSharding(mesh, PartitionSpec(None, "seq"))
    shapes = [jax.ShapeDtypeStruct((1, length, heads, 128), jnp.bfloat16, sharding=tokens)
              for heads in (8, 4, 4)]
    shapes += [jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=ids)] * 2

    def loss(q, k, v, positions, segments):
        out = sequence_attention(q, k, v, mesh=mesh, strategy=strategy, positions=positions,
                                 segment_ids=segments, kernel=kernel, block_q=128,
                                 block_k=128, ulysses_degree=4 if strategy == "hybrid" else None)
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def rows(target_name: str, length: int, strategies) -> list[list]:
    target = targets.get(target_name)
    devices = targets.compile_only_devices(target, 8)
    out = []
    for strategy in strategies:
        loop = step_entry(strategy, "blockwise", length, devices, target)
        fused = step_entry(strategy, "auto", length, devices, target)
        loop_mib, fused_mib = (e["bytes_per_device"]["temp"] / MIB for e in (loop, fused))
        kernel = choose_kernel("auto", strategy=strategy, platform=devices[0].platform,
                               in_order=False, head_dim=128, dtype="bfloat16")
        attention = [attention_temp(strategy, name, length, devices)
                     for name in ("blockwise", kernel)]
        out.append([target_name, strategy, fused["attention_kernel"],
                    f"{attention[0]:,.1f}", f"{attention[1]:,.1f}",
                    f"{attention[1] / attention[0]:.2f}", f"{loop_mib:,.1f}",
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
    print(f"\ntiny (bf16, heads of 128), packed rows, {args.length:,} tokens on seq 8: temp "
          "memory per device (MiB), compile-only")
    print(format_table(["target", "strategy", "fused kernel", "attention: blockwise",
                        "fused", "ratio", "train step: blockwise", "fused", "ratio",
                        "fused calls"], table))


if __name__ == "__main__":
    main()
