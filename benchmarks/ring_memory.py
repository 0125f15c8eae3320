"""Per-device compiled memory of ring attention and of the ring train step, by length x seq.

Two measurements, both from `jax.jit(f).lower(...).compile().memory_analysis()` on
`jax.ShapeDtypeStruct` inputs (nothing is allocated), on 8 devices of each --target
(simulated CPU devices, or compile-only GPUs / TPU chips compiled for by their own
compilers; with several targets the seq = max columns are also printed side by side):
  1. attention alone: jax.grad of ring_attention(q, k, v).sum() w.r.t. q, k, v; float32,
     batch 1, 4 heads (q and kv), head_dim 64, default block sizes, inputs sharded over a
     mesh of the first `seq` devices (seq = 1 is the blockwise kernel). Temp memory.
  2. the full train step of configs/tiny.py at batch 1 with model.attention = "ring" and
     mesh.seq = seq (data = fsdp = tensor = 1). Total = temp + argument + output.
Prints markdown tables, the longest length whose train step fits --budget_mib per seq, a
one-line verdict on the targets, and with --png writes a plot.

    python -m benchmarks.ring_memory [--lengths 4096,...] [--seqs 1,2,4,8] [--budget_mib 512]
                                     [--png PATH] [--target cpu,h100,v5p]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")     # compile-only targets need no other backend

import argparse
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.common import (describe_devices, int_list, memory, pyplot, save_figure,
                               target_devices, target_list, train_step_memory)
from util.tables import format_table
from parallel.mesh import make_mesh
from parallel.ring_attention import ring_attention
from util.errors import error_line

ATTENTION_TARGET_LENGTH, TARGET_SEQ = 32768, 8
ATTENTION_LIMIT_MIB, ATTENTION_AIM_MIB = 64.0, 48.0
STEP_TARGET_RATIO = 7.0


def attention_memory(length: int, seq: int, heads: int = 4, head_dim: int = 64,
                     devices=None) -> dict:
    """Compiled per-device memory of fwd+bwd of ring attention alone (float32, batch 1) on
    the first `seq` of `devices` (default: this process's)."""
    mesh = make_mesh(dict(data=1, fsdp=1, seq=seq, tensor=1),
                     (devices or jax.devices())[:seq])
    x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "seq", None, None)))
    grad = jax.grad(lambda q, k, v: ring_attention(q, k, v, mesh=mesh).sum(),
                    argnums=(0, 1, 2))
    start = time.time()
    compiled = jax.jit(grad).lower(x, x, x).compile()
    return memory(compiled, time.time() - start)


class Skipped(str):
    """A table cell that was not measured, with the reason."""


def measure_grid(name: str, fn, lengths, seqs, max_compile_seconds: float) -> dict:
    """{(length, seq): memory dict | error class name | Skipped}. Lengths run shortest
    first; once a compile for a seq takes longer than the limit, its longer lengths are
    skipped."""
    cells, slow = {}, {}
    for seq in seqs:
        for length in lengths:
            if seq in slow:
                cells[length, seq] = Skipped(f"skipped: compile at {slow[seq][0]} took "
                                             f"{slow[seq][1]:.0f}s > {max_compile_seconds:.0f}s")
                continue
            try:
                m = fn(length, seq)
                cells[length, seq] = m
                print(f"  {name} T={length:6d} seq={seq}: temp {m['temp']:.1f} MiB, total "
                      f"{m['total']:.1f} MiB (compiled in {m['compile_s']:.1f}s)", flush=True)
                if m["compile_s"] > max_compile_seconds:
                    slow[seq] = (length, m["compile_s"])
            except Exception as error:  # noqa: BLE001 - the table shows what failed
                cells[length, seq] = type(error).__name__
                print(f"  {name} T={length:6d} seq={seq}: {error_line(error)}", flush=True)
    return cells


def _fmt(cell, key: str, with_temp: bool = False) -> str:
    if isinstance(cell, Skipped):
        return "skipped"
    if isinstance(cell, str):
        return cell
    return f"{cell[key]:.1f} ({cell['temp']:.1f})" if with_temp else f"{cell[key]:.1f}"


def print_table(title: str, cells, lengths, seqs, key: str, with_temp: bool = False) -> None:
    print(f"\n{title}")
    print(format_table(["T"] + [f"seq={s}" for s in seqs],
                       [[str(length)] + [_fmt(cells[length, s], key, with_temp) for s in seqs]
                        for length in lengths]))
    notes = sorted({str(c) for c in cells.values() if isinstance(c, Skipped)})
    for note in notes:
        cells_with = [f"T={length} seq={s}" for (length, s), c in cells.items() if str(c) == note]
        print(f"  {', '.join(cells_with)}: {note}")


def longest_fitting(cells, lengths, seq: int, budget: float):
    """(longest measured length whose total fits the budget or None, open): open is True
    when no measured longer length was seen to exceed the budget, i.e. the true limit may
    lie beyond the grid or in its unmeasured cells (memory grows with length)."""
    measured = [(length, cells[length, seq]["total"]) for length in lengths
                if isinstance(cells[length, seq], dict)]
    fitting = [length for length, total in measured if total <= budget]
    best = max(fitting) if fitting else None
    over = [length for length, total in measured
            if total > budget and (best is None or length > best)]
    return best, not over


def plot(attention_cells, step_cells, lengths, seqs, budget, path: str) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.6))
    panels = [(axes[0], step_cells, "total", "full train step (configs/tiny.py, batch 1)",
               "per-device temp + arguments + outputs (MiB)", budget,
               f"budget {budget:.0f} MiB"),
              (axes[1], attention_cells, "temp", "attention alone, fwd+bwd (f32, 4x64 heads)",
               "per-device temp (MiB)", ATTENTION_LIMIT_MIB,
               f"target < {ATTENTION_LIMIT_MIB:.0f} MiB at T=32k, seq=8")]
    for ax, cells, key, title, ylabel, line, line_label in panels:
        for seq in seqs:
            points = [(length, cells[length, seq][key]) for length in lengths
                      if isinstance(cells[length, seq], dict)]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"seq={seq}")
        ax.axhline(line, color="k", linestyle="--", linewidth=1, label=line_label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{length // 1024}k" for length in lengths])
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ring attention: per-device compiled memory (8 simulated devices)")
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ring_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list, default=[4096 * 2 ** i for i in range(6)],
                        help="comma-separated sequence lengths (default 4096..131072)")
    parser.add_argument("--seqs", type=int_list, default=[1, 2, 4, 8],
                        help="comma-separated sizes of the seq mesh axis")
    parser.add_argument("--budget_mib", type=float, default=512.0,
                        help="per-device memory budget for the full train step")
    parser.add_argument("--max_compile_seconds", type=float, default=120.0,
                        help="once one compile for a seq takes longer, skip its longer lengths")
    parser.add_argument("--parts", default="attention,step",
                        help="which measurements to run: attention, step or both")
    parser.add_argument("--png", default=None,
                        help="write the plot to this PNG (default: no plot; the README's is "
                             "benchmarks/results/ring_memory.png; the first target's)")
    parser.add_argument("--target", type=target_list, default=["cpu"],
                        help="comma-separated plan.target names to compile for (cpu: the "
                             "simulated devices; h100, v5p, ...: compile-only, "
                             "requirements-plan.txt)")
    args = parser.parse_args(argv)
    cells = {}
    for index, target in enumerate(args.target):
        cells[target] = measure_target(args, target, png=args.png if index == 0 else None)
    if len(args.target) > 1:
        print_side_by_side(cells, sorted(args.lengths), max(args.seqs))


def print_side_by_side(cells: dict, lengths, seq: int) -> None:
    """The seq = `seq` column of each measurement, one column per target."""
    names = list(cells)
    for part, key, title in (("attention", "temp", "attention alone, per-device temp MiB"),
                             ("step", "total", "full train step, per-device total MiB")):
        if any(cells[n][part] is None for n in names):
            continue
        print(f"\nside by side at seq={seq}: {title}")
        print(format_table(["T"] + names, [[str(length)] + [_fmt(cells[n][part][length, seq], key)
                                                          for n in names]
                                         for length in lengths]))


def measure_target(args, target: str, png: str | None) -> dict:
    """The grids, tables and verdicts of one target; {"attention": cells, "step": cells}."""
    lengths, seqs, budget = sorted(args.lengths), sorted(args.seqs), args.budget_mib
    parts = set(args.parts.split(","))
    devices = target_devices(target, max(seqs))
    print(f"# ring memory on {describe_devices(devices)}; jax {jax.__version__}; budget "
          f"{budget:.0f} MiB", flush=True)
    start = time.time()
    attention_cells = step_cells = None
    verdicts = []

    if "attention" in parts:
        attention_cells = measure_grid(
            "attention", lambda length, s: attention_memory(length, s, devices=devices),
            lengths, seqs, args.max_compile_seconds)
        print_table("attention alone, fwd+bwd, float32, batch 1, 4 heads x 64: per-device "
                    "temp MiB", attention_cells, lengths, seqs, "temp")
        cell = attention_cells.get((ATTENTION_TARGET_LENGTH, TARGET_SEQ))
        if isinstance(cell, dict):
            t = cell["temp"]
            verdicts.append(
                f"attention T={ATTENTION_TARGET_LENGTH} seq={TARGET_SEQ}: temp "
                f"{t:.1f} MiB, < {ATTENTION_LIMIT_MIB:.0f}: "
                f"{'yes' if t < ATTENTION_LIMIT_MIB else 'no'}"
                f", < {ATTENTION_AIM_MIB:.0f} (aim): {'yes' if t < ATTENTION_AIM_MIB else 'no'}")
        else:
            verdicts.append(f"attention T={ATTENTION_TARGET_LENGTH} seq={TARGET_SEQ}: "
                            f"not measured ({cell if cell is not None else 'not in the grid'})")

    if "step" in parts:
        step_cells = measure_grid("train step",
                                  lambda length, s: train_step_memory("ring", length, s,
                                                                      devices),
                                  lengths, seqs, args.max_compile_seconds)
        print_table("full train step, configs/tiny.py, ring, batch 1: per-device total MiB "
                    "(temp MiB); total = temp + arguments + outputs",
                    step_cells, lengths, seqs, "total", with_temp=True)
        for seq in seqs:
            measured = [c for (_, s), c in step_cells.items() if s == seq and isinstance(c, dict)]
            if measured:
                print(f"  seq={seq}: arguments {measured[-1]['argument']:.1f} MiB, outputs "
                      f"{measured[-1]['output']:.1f} MiB (of which aliased to donated "
                      f"arguments {measured[-1]['alias']:.1f} MiB)")

        print(f"\nlongest T whose train step fits {budget:.0f} MiB per device:")
        fits = {seq: longest_fitting(step_cells, lengths, seq, budget) for seq in seqs}
        base = fits[seqs[0]][0] if seqs[0] == 1 else None
        rows = []
        for seq in seqs:
            best, open_above = fits[seq]
            total = f"{step_cells[best, seq]['total']:.1f}" if best else "-"
            ratio = f"{best / base:.1f}x" if best and base else "-"
            bound = "+" if best and open_above else ""
            rows.append([str(seq), f"{best or 'none'}{bound}", total, ratio])
        print(format_table(["seq", "longest T (+: limit not reached in the grid)", "total MiB",
                            "x seq=1"], rows))
        if 1 in fits and TARGET_SEQ in fits:
            lo, hi = fits[1][0], fits[TARGET_SEQ][0]
            if lo and hi:
                ratio = hi / lo
                at_least = fits[TARGET_SEQ][1] and not fits[1][1]
                verdicts.append(
                    f"train step within {budget:.0f} MiB: longest T {lo} at seq=1, {hi} at "
                    f"seq={TARGET_SEQ} -> {'>= ' if at_least else ''}{ratio:.1f}x; "
                    f">= {STEP_TARGET_RATIO:.0f}x: {'yes' if ratio >= STEP_TARGET_RATIO else 'no'}"
                    + (f" (seq={TARGET_SEQ} never exceeded the budget in the grid: "
                       f"a lower bound)" if at_least else "")
                    + (" (seq=1's limit is beyond its measured lengths: ratio uncertain)"
                       if fits[1][1] else ""))
            else:
                verdicts.append(f"train step within {budget:.0f} MiB: seq=1 fits "
                                f"{lo or 'no length'}, seq={TARGET_SEQ} fits "
                                f"{hi or 'no length'} of the grid: ratio undefined")

    if png and (attention_cells is not None or step_cells is not None):
        empty = {(length, s): "-" for length in lengths for s in seqs}
        plot(attention_cells or empty, step_cells or empty, lengths, seqs, budget, png)
        print(f"\nwrote {png}")
    print(f"measured in {time.time() - start:.0f}s")
    print("verdict: " + "; ".join(verdicts))
    return {"attention": attention_cells, "step": step_cells}


if __name__ == "__main__":
    main()
