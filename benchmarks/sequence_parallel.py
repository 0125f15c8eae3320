"""The four sequence-parallel strategies side by side, for real attention shapes on 8
devices of each --target (simulated CPU devices, or compile-only H100s / TPU chips ...).

Table 1 per target (compiled, nothing allocated): attention fwd+bwd of one layer, bf16,
batch 1, at each length, with Llama-2-7B's heads (32 query = 32 KV heads of 128) and
Llama-3-8B's (32 query / 8 KV): per-device memory (`memory_analysis()`: temp and total),
the bytes each device sends per step read from the compiled HLO (parallel/collectives.py)
and the textbook volume of the strategy next to it, and the seconds those bytes take on
one link at 450 GB/s (NVLink) and 50 GB/s (across hosts). With several targets, a table of
the HLO bytes and memory side by side follows.

Table 2 (with cpu among the targets): fwd+bwd time on this CPU relative to the ring,
interleaved (ring, ulysses, allgather, hybrid, ring, ...), median over rounds, at a size a
CPU runs in seconds. XLA:CPU keeps float32 copies of bf16 buffers, so its collectives move
twice the bf16 bytes; the closed form counts the compute dtype.

    python -m benchmarks.sequence_parallel [--lengths 32768,65536,131072] [--rounds 5]
        [--time_length 4096] [--time_heads 8,2,64] [--target cpu,h100,v5p]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")     # compile-only targets need no other backend

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.common import MIB, describe_devices, int_list, target_devices, target_list
from util.tables import format_table
from parallel.collectives import (closed_form_bytes, collective_bytes,
                                  transfer_seconds)
from parallel.mesh import make_mesh
from parallel.sequence_parallel import sequence_attention

MODELS = {"Llama-2-7B": (32, 32, 128), "Llama-3-8B": (32, 8, 128)}
STRATEGIES = (("ring", None), ("ulysses", None), ("allgather", None), ("hybrid", 4))
SEQ, BLOCK = 8, 512


def attention_grad(mesh, strategy, degree):
    def loss(q, k, v):
        out = sequence_attention(q, k, v, mesh=mesh, strategy=strategy, ulysses_degree=degree,
                                 block_q=BLOCK, block_k=BLOCK)
        return out.astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def shapes(mesh, length, q_heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    sharding = NamedSharding(mesh, P(None, "seq", None, None))
    q = jax.ShapeDtypeStruct((1, length, q_heads, head_dim), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((1, length, kv_heads, head_dim), dtype, sharding=sharding)
    return q, kv, kv


def compiled_rows(lengths, devices):
    """One table row per model x length x strategy, compiled for `devices`, and the same
    figures as numbers: {(model, length, strategy): {"total", "sent", "closed"} MiB}."""
    mesh = make_mesh(dict(data=1, fsdp=1, seq=SEQ, tensor=1), devices[:SEQ])
    rows, figures = [], {}
    for model, (hq, hkv, d) in MODELS.items():
        for length in lengths:
            for strategy, degree in STRATEGIES:
                start = time.time()
                compiled = attention_grad(mesh, strategy, degree).lower(
                    *shapes(mesh, length, hq, hkv, d)).compile()
                memory = compiled.memory_analysis()
                sent = collective_bytes(compiled.as_text())["attention_traffic"]
                closed = closed_form_bytes(strategy, length=length, seq=SEQ, q_heads=hq,
                                           kv_heads=hkv, head_dim=d, ulysses_degree=degree)
                total = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                         + memory.output_size_in_bytes - memory.alias_size_in_bytes)
                name = strategy + (f" (U={degree})" if degree else "")
                figures[model, length, name] = {"total": total / MIB, "sent": sent / MIB,
                                                "closed": closed["bytes"] / MIB}
                rows.append([model, length, name,
                             f"{memory.temp_size_in_bytes / MIB:.0f}", f"{total / MIB:.0f}",
                             f"{sent / MIB:.1f}", f"{closed['bytes'] / MIB:.1f}",
                             f"{transfer_seconds(sent, 450) * 1e3:.2f}",
                             f"{transfer_seconds(sent, 50) * 1e3:.2f}",
                             f"{time.time() - start:.0f}"])
                print(f"  {model} {length} {strategy}: compiled", flush=True)
    return rows, figures


def side_by_side(figures: dict) -> str:
    """{target: compiled_rows figures} as one table: HLO bytes / closed form and total
    memory per target."""
    names = list(figures)
    keys = list(figures[names[0]])
    rows = []
    for key in keys:
        closed = figures[names[0]][key]["closed"]
        rows.append([*key, f"{closed:.1f}"]
                    + [f"{figures[n][key]['sent']:.1f} ({figures[n][key]['sent'] / closed:.2f}x)"
                       for n in names]
                    + [f"{figures[n][key]['total']:.0f}" for n in names])
    return format_table(["model heads", "length", "strategy", "MiB closed form"]
                        + [f"MiB sent, {n} (x closed)" for n in names]
                        + [f"total MiB, {n}" for n in names], rows)


def timed_rows(length, heads, rounds):
    mesh = make_mesh(dict(data=1, fsdp=1, seq=SEQ, tensor=1), jax.devices()[:SEQ])
    hq, hkv, d = heads
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P(None, "seq", None, None))
    args = [jax.device_put(rng.standard_normal((1, length, h, d), np.float32), sharding)
            for h in (hq, hkv, hkv)]
    fns = {}
    for strategy, degree in STRATEGIES:
        fn = attention_grad(mesh, strategy, degree)
        jax.block_until_ready(fn(*args))                        # compile and warm up
        fns[strategy] = fn
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    ring = times["ring"]
    return [[name, f"{statistics.median(t):.3f}",
             f"{statistics.median([a / b for a, b in zip(t, ring)]):.2f}"]
            for name, t in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sequence_parallel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list, default=[32768, 65536, 131072])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--time_length", type=int, default=4096)
    parser.add_argument("--time_heads", type=int_list, default=[8, 2, 64],
                        help="query heads, KV heads, head_dim of the timed shape")
    parser.add_argument("--target", type=target_list, default=["cpu"],
                        help="comma-separated plan.target names to compile for (cpu: the "
                             "simulated devices; h100, v5p, ...: compile-only, "
                             "requirements-plan.txt)")
    args = parser.parse_args(argv)
    figures = {}
    for target in args.target:
        devices = target_devices(target, SEQ)
        rows, figures[target] = compiled_rows(args.lengths, devices)
        print(f"attention fwd+bwd of one layer, bf16, batch 1, seq = {SEQ}, "
              f"{describe_devices(devices)}, block {BLOCK}; memory per device from "
              "memory_analysis(); bytes sent per device per step from the compiled HLO"
              + (" (XLA:CPU: float32 copies of bf16)" if target == "cpu" else "")
              + " and the closed form (bf16)")
        print(format_table(["model heads", "length", "strategy", "temp MiB", "total MiB",
                            "MiB sent (HLO)", "MiB closed form", "ms at 450 GB/s",
                            "ms at 50 GB/s", "compile s"], rows))
    if len(args.target) > 1:
        print("side by side: MiB sent per device (HLO) and per-device total memory, by "
              "target:")
        print(side_by_side(figures))
    if "cpu" not in args.target:
        return
    timed = timed_rows(args.time_length, args.time_heads, args.rounds)
    hq, hkv, d = args.time_heads
    print(f"fwd+bwd time on this CPU ({jax.devices()[0].platform}, {SEQ} simulated devices), "
          f"float32, length {args.time_length}, {hq} query / {hkv} KV heads x {d}, "
          f"{args.rounds} interleaved rounds:")
    print(format_table(["strategy", "median s", "time / ring (median of rounds)"], timed))


if __name__ == "__main__":
    main()
