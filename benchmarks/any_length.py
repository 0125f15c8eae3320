"""What a length that divides nothing costs: attention fwd+bwd at T and T - 1 tokens.

For each mesh (1 device: the blockwise kernel; seq devices: the ring), the inputs take the
path a training batch takes: the input layout (parallel/layout.py) pads the rows to whole
zigzag chunks of the seq devices (nothing on one device), then the kernel covers each
device's slice with blocks whose last one overlaps its neighbour instead of padding. Reported per
device: temp memory from `compile().memory_analysis()` (no allocation), and the fwd+bwd
time of T - 1 relative to T, measured interleaved (T, T - 1, T, T - 1, ...) in one process,
median over rounds, after a warm-up call each. Float32, batch 1, GQA heads as given.

    python -m benchmarks.any_length [--length 32768] [--seqs 1,8] [--rounds 5]
                                    [--q_heads 4] [--kv_heads 1] [--head_dim 32]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import statistics
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.common import MIB, int_list
from util.tables import format_table
from model.blockwise import block_plan, blockwise_attention
from parallel.layout import apply_layout, layout_length
from parallel.mesh import make_mesh
from parallel.ring_attention import ring_attention

BLOCK = 256


def inputs(length: int, seq: int, q_heads: int, kv_heads: int, head_dim: int):
    """(q, k, v, positions, segment_ids) of one row of `length` tokens laid out for `seq`
    devices (zigzag, padded to whole chunks) and placed on them."""
    rng = np.random.default_rng(length)
    row = {"q": rng.standard_normal((1, length, q_heads, head_dim), np.float32),
           "k": rng.standard_normal((1, length, kv_heads, head_dim), np.float32),
           "v": rng.standard_normal((1, length, kv_heads, head_dim), np.float32),
           "positions": np.arange(length, dtype=np.int32)[None],
           "segment_ids": np.zeros((1, length), np.int32)}
    laid = apply_layout(row, "zigzag", seq)
    mesh = make_mesh(dict(data=1, fsdp=1, seq=seq, tensor=1), jax.devices()[:seq])
    placed = {name: jax.device_put(array, NamedSharding(
        mesh, P(None, "seq", *([None] * (array.ndim - 2))))) for name, array in laid.items()}
    return mesh, placed


def fwd_bwd(mesh, seq: int):
    """jit(grad of sum(attention * 1)) over q, k, v for the mesh's kernel."""
    def attention(q, k, v, positions, segment_ids):
        if seq == 1:
            return blockwise_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                                       block_q=BLOCK, block_k=BLOCK)
        return ring_attention(q, k, v, mesh=mesh, positions=positions,
                              segment_ids=segment_ids, block_q=BLOCK, block_k=BLOCK)

    return jax.jit(jax.grad(lambda q, k, v, p, s: attention(q, k, v, p, s).sum(),
                            argnums=(0, 1, 2)))


def measure(length: int, seq: int, rounds: int, heads: tuple[int, int, int]) -> dict:
    """Temp MiB of T and T - 1, and the median time ratio (T - 1) / T."""
    setups = {}
    for n in (length, length - 1):
        mesh, x = inputs(n, seq, *heads)
        args = (x["q"], x["k"], x["v"], x["positions"], x["segment_ids"])
        fn = fwd_bwd(mesh, seq)
        compiled = fn.lower(*args).compile()
        jax.block_until_ready(compiled(*args))                     # warm-up
        setups[n] = (compiled, args, compiled.memory_analysis().temp_size_in_bytes / MIB)
    times = {length: [], length - 1: []}
    for _ in range(rounds):
        for n in (length, length - 1):
            compiled, args, _ = setups[n]
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[n].append(time.perf_counter() - start)
    ratios = [short / full for short, full in zip(times[length - 1], times[length])]
    laid_out = layout_length(length - 1, "zigzag", seq)
    block, count = block_plan(laid_out // seq, BLOCK)
    return {"seq": seq, "temp_T": setups[length][2], "temp_T1": setups[length - 1][2],
            "ratio": statistics.median(ratios), "laid_out": laid_out,
            "local": (laid_out // seq, count, block),
            "median_T_s": statistics.median(times[length])}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.any_length",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="T")
    parser.add_argument("--seqs", type=int_list, default=[1, 8], help="devices on the seq axis")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--q_heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=1)
    parser.add_argument("--head_dim", type=int, default=32)
    args = parser.parse_args(argv)
    T = args.length
    heads = (args.q_heads, args.kv_heads, args.head_dim)
    rows = []
    for seq in args.seqs:
        r = measure(T, seq, args.rounds, heads)
        local, count, block = r["local"]
        rows.append([seq, "blockwise" if seq == 1 else "ring", f"{r['temp_T']:.1f}",
                     f"{r['temp_T1']:.1f}", f"{r['temp_T1'] / r['temp_T']:.3f}",
                     f"{r['ratio']:.3f}", f"{r['laid_out']} ({local}/device: {count} "
                     f"blocks of {block})", f"{r['median_T_s']:.2f}"])
        print(f"seq={seq} done", flush=True)
    print(f"attention fwd+bwd, float32, batch 1, {args.q_heads} query / {args.kv_heads} "
          f"key-value heads x {args.head_dim}, causal, block {BLOCK}; T = {T}; "
          f"{args.rounds} interleaved rounds; {jax.devices()[0].platform} "
          f"({jax.device_count()} devices)")
    print(format_table(["seq", "kernel", "temp MiB at T", "temp MiB at T-1", "memory T-1 / T",
                        "time T-1 / T (median)", "T-1 laid out as", "T seconds (median)"], rows))


if __name__ == "__main__":
    main()
