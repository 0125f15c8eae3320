"""The Llama presets planned on XLA:CPU and on compile-only accelerators, side by side.

For each preset and each target, `python main.py --mode plan` at one length with every
sequence-parallel strategy (8 devices: 8 simulated CPU devices, 8 H100s, 8 TPU v5p chips
...), then one table per preset from the plan.json files: per strategy and target the
per-device memory (total, of which temp), pinned-host memory, the bytes each device sends
per step (all collectives, and the attention's), and the step-time bound (compile-only
targets; not a measurement). Nothing is allocated.

    python -m benchmarks.target_plans [--presets llama2_7b,llama3_8b] [--length 1048576]
        [--target cpu,h100,v5p] [--devices 8] [--workdir DIR] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import os

from benchmarks.common import add_plan_reuse_arguments, main_py, new_workdir, target_list
from util.tables import format_table

GIB = 2 ** 30


def plan(preset: str, target: str, length: int, devices: int, workdir: str,
         reuse: bool) -> dict:
    """plan.json of `preset` planned for `devices` devices of `target` at `length`."""
    path = os.path.join(workdir, f"{preset}_{target}_{length}")
    if not (reuse and os.path.exists(os.path.join(path, "plan.json"))):
        seconds = main_py("--mode", "plan", "--config", f"configs/{preset}.py",
                          "--workdir", path, f"--config.plan.target={target}",
                          f"--config.plan.devices={devices}",
                          f"--config.curriculum.l_max={length}",
                          f"--config.eval.lengths=({length},)",
                          "--config.plan.memory_budget_gib=-1")
        print(f"  {preset} on {target}: {seconds:.0f} s", flush=True)
    with open(os.path.join(path, "plan.json")) as f:
        return json.load(f)


def rows(plans: dict) -> list[list]:
    """One row per strategy: for each target, GiB total (temp), host GiB, GB sent (of
    which attention), the bound (no overlap)."""
    names = list(plans)
    strategies = [e["strategy"] for e in plans[names[0]]["strategies"] if "skipped" not in e]
    out = []
    for strategy in strategies:
        row = [strategy]
        for name in names:
            (e,) = [e for e in plans[name]["strategies"] if e["strategy"] == strategy]
            if "skipped" in e:
                row += ["skipped"] * 4
                continue
            b, h, c = e["bytes_per_device"], e["host_bytes_per_device"], e["collective_bytes"]
            degree = f" (U={e['ulysses_degree']})" if e.get("ulysses_degree") else ""
            row[0] = strategy + degree
            row += [f"{b['total'] / GIB:.1f} ({b['temp'] / GIB:.1f})",
                    f"{h['total'] / GIB:.1f}",
                    f"{c['traffic'] / 1e9:,.0f} ({c['attention_traffic'] / 1e9:,.0f})",
                    f"{e['bound']['step_s']:.1f}" if e.get("bound") else "-"]
        out.append(row)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.target_plans",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="llama2_7b,llama3_8b",
                        help="comma-separated config files of configs/ (without .py)")
    parser.add_argument("--length", type=int, default=1048576)
    parser.add_argument("--target", type=target_list, default=["cpu", "h100", "v5p"])
    parser.add_argument("--devices", type=int, default=8)
    add_plan_reuse_arguments(parser)
    args = parser.parse_args(argv)
    workdir = args.workdir or new_workdir("target_plans")
    for preset in [p for p in args.presets.split(",") if p]:
        plans = {t: plan(preset, t, args.length, args.devices, workdir, args.reuse)
                 for t in args.target}
        kinds = ", ".join(f"{t}: {p['devices']} x {p['device_kind']}" for t, p in plans.items())
        print(f"\n{preset} at {args.length:,} tokens, train step, batch 1, seq "
              f"{args.devices} ({kinds}); per device: GiB total (temp), pinned-host GiB, GB "
              "sent per step (attention), bound s (compile-only targets: max(compute, "
              "memory) + links, no overlap; not a measurement)")
        header = ["strategy"]
        for t in args.target:
            header += [f"GiB {t}", f"host GiB {t}", f"GB sent {t}", f"bound s {t}"]
        print(format_table(header, rows(plans)))
        eval_rows = [[t, p["eval"]["kernel"],
                      f"{p['eval']['bytes_per_device']['total'] / GIB:.1f}",
                      p["eval"]["compile_s"]] for t, p in plans.items()]
        print(format_table(["target", "eval kernel", "eval GiB", "eval compile s"], eval_rows))
    print(f"plans in {workdir}")


if __name__ == "__main__":
    main()
