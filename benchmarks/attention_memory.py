"""Per-device compiled memory of a train step, dense vs blockwise attention, on one device.

Builds the train step of configs/tiny.py (batch 1, mesh of one device) at each length and
reads XLA's buffer assignment: `jax.jit(step).lower(...).compile().memory_analysis()`.
Inputs are `jax.ShapeDtypeStruct`s with shardings, so nothing is allocated and long
lengths compile on any machine. Prints a markdown table of temp memory, the growth factor
per doubling of the length, a one-line verdict, and with --png writes a plot; for each
--target (cpu, or one compile-only GPU / TPU chip compiled for by its own compiler), and
with several targets the temp memory side by side.

    python -m benchmarks.attention_memory [--lengths 1024,2048,...] [--png PATH]
        [--target cpu,h100,v5p]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")     # compile-only targets need no other backend

import argparse
import math

import jax

from benchmarks.common import (describe_devices, int_list, pyplot, save_figure,
                               target_devices, target_list, train_step_memory)
from util.tables import format_table
from util.errors import error_line


def growth_per_doubling(lengths, values) -> list[float | None]:
    """Between consecutive lengths: the factor memory grows by per doubling of the length
    (2 ** exponent of the local power law; 2 = linear, 4 = quadratic)."""
    factors = []
    for (l0, v0), (l1, v1) in zip(zip(lengths, values), zip(lengths[1:], values[1:])):
        if isinstance(v0, float) and isinstance(v1, float) and v0 > 0 and v1 > 0:
            exponent = math.log(v1 / v0) / math.log(l1 / l0)
            factors.append(2.0 ** exponent)
        else:
            factors.append(None)
    return factors


def _cell(value, fmt="{:.1f}") -> str:
    return fmt.format(value) if isinstance(value, float) else str(value)


def _mean_factor(factors) -> float | None:
    known = [f for f in factors if f is not None]
    return math.exp(sum(math.log(f) for f in known) / len(known)) if known else None


def verdict(name: str, factors) -> str:
    """Name the growth from the mean factor per doubling: about 2x (exponent < 1.25) is
    linear, about 4x (exponent > 1.75) quadratic, in between neither."""
    mean = _mean_factor(factors)
    if mean is None:
        return f"{name}: not enough compiled lengths to judge growth"
    exponent = math.log2(mean)
    kind = ("linearly" if exponent < 1.25 else "quadratically" if exponent > 1.75
            else "faster than linearly")
    tail = [f for f in factors if f is not None][-3:]
    return (f"{name} temp grows {kind}: mean factor per doubling {mean:.2f}x "
            f"(exponent {exponent:.2f}; last doublings "
            f"{', '.join(f'{f:.2f}x' for f in tail)})")


def plot(lengths, series: dict, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6.4, 4.4))
    for name, values in series.items():
        points = [(length, v) for length, v in zip(lengths, values) if isinstance(v, float)]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{length // 1024}k" if length >= 1024 else str(length)
                        for length in lengths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("per-device temp memory (MiB)")
    ax.set_title("train step, configs/tiny.py, batch 1, one device")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list,
                        default=[1024 * 2 ** i for i in range(6)],
                        help="comma-separated sequence lengths (default 1024..32768)")
    parser.add_argument("--attentions", default="dense,blockwise",
                        help="comma-separated model.attention values to compare")
    parser.add_argument("--png", default=None,
                        help="write the plot to this PNG (default: no plot; the README's is "
                             "benchmarks/results/attention_memory.png)")
    parser.add_argument("--target", type=target_list, default=["cpu"],
                        help="comma-separated plan.target names to compile for (cpu; h100, "
                             "v5p, ...: compile-only, requirements-plan.txt)")
    args = parser.parse_args(argv)
    attentions = [a for a in args.attentions.split(",") if a]
    by_target = {}
    for index, target in enumerate(args.target):
        by_target[target] = measure_target(args, attentions, target,
                                           png=args.png if index == 0 else None)
    if len(args.target) > 1:
        print("\nside by side: per-device temp MiB by target")
        print(format_table(
            ["length"] + [f"{a}, {t}" for a in attentions for t in args.target],
            [[str(length)] + [_cell(by_target[t][a][i]) for a in attentions
                              for t in args.target]
             for i, length in enumerate(args.lengths)]))


def measure_target(args, attentions, target: str, png: str | None) -> dict:
    """Tables and verdict of one target; {attention: [temp MiB or error name per length]}."""
    devices = target_devices(target, 1)
    print(f"# train step memory, configs/tiny.py, batch 1, {describe_devices(devices)}; "
          f"jax {jax.__version__}", flush=True)
    results = {a: [] for a in attentions}
    for length in args.lengths:
        for attention in attentions:
            try:
                m = train_step_memory(attention, length, devices=devices)
                results[attention].append(m["temp"])
                print(f"  {attention:9s} L={length:6d}: temp {m['temp']:.1f} MiB, arguments "
                      f"{m['argument']:.1f} MiB, outputs {m['output']:.1f} MiB "
                      f"(compiled in {m['compile_s']:.1f}s)", flush=True)
            except Exception as error:  # noqa: BLE001 - the table shows what failed
                results[attention].append(type(error).__name__)
                print(f"  {attention:9s} L={length:6d}: {error_line(error)}", flush=True)

    print()
    header = ["length"] + [f"{a} temp MiB" for a in attentions]
    if len(attentions) == 2:
        header.append(f"{attentions[0]} / {attentions[1]}")
    rows = []
    for i, length in enumerate(args.lengths):
        row = [str(length)] + [_cell(results[a][i]) for a in attentions]
        if len(attentions) == 2:
            a, b = results[attentions[0]][i], results[attentions[1]][i]
            row.append(f"{a / b:.1f}x" if isinstance(a, float) and isinstance(b, float) else "-")
        rows.append(row)
    print(format_table(header, rows))

    factors = {a: growth_per_doubling(args.lengths, results[a]) for a in attentions}
    print()
    print("growth factor of temp memory per doubling of the length:")
    print(format_table(
        ["step"] + attentions,
        [[f"{args.lengths[i]} -> {args.lengths[i + 1]}"]
         + [f"{factors[a][i]:.2f}x" if factors[a][i] is not None else "-" for a in attentions]
         for i in range(len(args.lengths) - 1)]))

    if png:
        plot(args.lengths, results, png)
        print(f"\nwrote {png}")
    others = [verdict(a, factors[a]) for a in attentions if a != "blockwise"]
    main_verdict = verdict("blockwise", factors["blockwise"]) if "blockwise" in factors else ""
    print("verdict: " + "; ".join([main_verdict] + others if main_verdict else others))
    return results


if __name__ == "__main__":
    main()
