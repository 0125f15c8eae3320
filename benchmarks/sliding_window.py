"""What a sliding window saves: attention tiles computed and ring hops made, counted by
running the kernels' forward pass (`blockwise_tiles`, `ring_work`), against full causal
attention on the same inputs.

One row of T tokens, float32, GQA heads as given, causal. On one device the blockwise
kernel; on `seq` devices the ring with the inputs in zigzag order (hops are all made, and
those with no key in any local query's window skip their compute) and in contiguous order
(the ring stops after the hops the window reaches: fewer transfers).

    python -m benchmarks.sliding_window [--length 32768] [--windows 4096,1024] [--seq 8]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse

import jax
import numpy as np

from benchmarks.common import int_list
from util.tables import format_table
from model.blockwise import blockwise_tiles
from parallel.layout import apply_layout
from parallel.mesh import make_mesh
from parallel.ring_attention import ring_work

BLOCK = 256


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sliding_window",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--windows", type=int_list, default=[4096, 1024])
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--q_heads", type=int, default=2)
    parser.add_argument("--kv_heads", type=int, default=1)
    parser.add_argument("--head_dim", type=int, default=32)
    args = parser.parse_args(argv)
    T, n = args.length, args.seq
    rng = np.random.default_rng(0)
    row = {"q": rng.standard_normal((1, T, args.q_heads, args.head_dim), np.float32),
           "k": rng.standard_normal((1, T, args.kv_heads, args.head_dim), np.float32),
           "v": rng.standard_normal((1, T, args.kv_heads, args.head_dim), np.float32),
           "positions": np.arange(T, dtype=np.int32)[None]}
    mesh = make_mesh(dict(data=1, fsdp=1, seq=n, tensor=1), jax.devices()[:n])
    orders = {"zigzag": apply_layout(row, "zigzag", n), "contiguous": row}
    rows = []
    for window in [None] + list(args.windows):
        computed, total = blockwise_tiles(row["q"], row["k"], row["v"],
                                          positions=row["positions"], sliding_window=window,
                                          block_q=BLOCK, block_k=BLOCK)
        rows.append([window or "none (causal)", "1 device, blockwise", f"{computed} / {total}",
                     f"{computed / total:.3f}", "-", "-"])
        for layout, x in orders.items():
            work = ring_work(x["q"], x["k"], x["v"], mesh=mesh, positions=x["positions"],
                             sliding_window=window, layout=layout, block_q=BLOCK,
                             block_k=BLOCK)
            tiles, per_device = work["tiles"], work["tiles_in_full_ring"]
            rows.append([window or "none (causal)", f"{n} devices, ring, {layout}",
                         f"{tiles.max()} / {per_device} (max over devices)",
                         f"{tiles.sum() / (per_device * n):.3f}",
                         f"{work['hops']} / {work['hops_in_full_ring']}",
                         "/".join(str(h) for h in work["hops_computed"])])
    print(f"sliding window vs full causal attention, T = {T}, block {BLOCK}, "
          f"{args.q_heads} query / {args.kv_heads} key-value heads x {args.head_dim}")
    print(format_table(["window", "kernel", "tiles computed / all", "share computed",
                        "K/V transfers / full ring", "key slices computed per device"], rows))


if __name__ == "__main__":
    main()
