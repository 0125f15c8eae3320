"""Fixed-length training at l_max vs the length curriculum, at equal tokens, on the embedded
corpus: validation perplexity at l_max, 2 l_max, 4 l_max and 8 l_max.

Launches main.py twice on 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, cwd = the repository, --workdir
always given):
  * curriculum: configs/curriculum_cpu.py as it is (64 x 32 rows -> 128 x 16 -> 256 x 8 ->
    512 x 4, relayout data 8 -> seq 8; 50/25/12.5/12.5% of the steps);
  * fixed: the same config with --config.curriculum.levels=1 (64 tokens x 32 rows on
    data 8 for every step), so both train the same steps of 2048 tokens;
both with --config.eval.lengths=(64,128,256,512) (evaluated at the end on the last level's
mesh: seq 8 for the curriculum, data 8 x seq 1 = blockwise for the fixed run). Reads
tokens from each run's metrics.jsonl and perplexities from eval/perplexity_by_length.json,
prints markdown tables (the runs: levels as logged, evaluation mesh = the last level's,
steps, tokens, final loss, wall time; perplexity by length; sliding-window perplexity when
the evaluation reports it) and a one-line summary computed from the numbers. Each run's
output goes to <workdir>/<run>.log; existing runs are never overwritten. Without
--workdir the runs go to a fresh directory under the system's temp dir, not the repository.

    python -m benchmarks.curriculum_vs_fixed [--steps 400] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from benchmarks.common import REPO, new_workdir
from util.tables import format_table

CONFIG = "configs/curriculum_cpu.py"
DEVICES = 8
RUNS = (("fixed", ["--config.curriculum.levels=1"]), ("curriculum", []))


def launch(name: str, workdir: str, steps: int | None, lengths: str, extra: list[str]) -> dict:
    """Run main.py; return {"wall_s", "tokens", "steps", "final_loss", "eval", "log"}."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    command = [sys.executable, "main.py", "--config", CONFIG, "--workdir", workdir,
               f"--config.eval.lengths={lengths}", *extra]
    if steps is not None:
        command.append(f"--config.train.steps={steps}")
    log_path = workdir.rstrip("/") + ".log"
    print(f"[{name}] {' '.join(command)}  (log: {log_path})", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if code:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f"[{name}] main.py exited with {code} after {wall:.0f}s; log tail:\n{tail}")
    records = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record and "tokens" in record:
                records.append(record)
    with open(os.path.join(workdir, "eval", "perplexity_by_length.json")) as f:
        evaluation = json.load(f)
    last = records[-1]
    print(f"[{name}] done in {wall:.0f}s: step {last['step']}, {last['tokens']:,} tokens, "
          f"final train loss {last['loss']:.4f}", flush=True)
    return {"wall_s": wall, "tokens": last["tokens"], "steps": last["step"],
            "final_loss": last["loss"], "eval": evaluation, "log": log_path,
            "levels": sorted({(r.get("seq_len"), r.get("batch_size"), r.get("layout"))
                              for r in records}, key=lambda x: x[0] or 0)}


def _by_length(evaluation: dict, key: str = "perplexity") -> dict[int, float]:
    return {int(length): float(v) for length, v in zip(evaluation.get("lengths", []),
                                            evaluation.get(key, []))}


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def summary(lengths, fixed: dict, curriculum: dict, l_max: int) -> str:
    both = [(length, fixed[length], curriculum[length]) for length in lengths
            if length in fixed and length in curriculum]
    if not both:
        return "no length was evaluated by both runs"
    better = [length for length, f, c in both if c < f]
    parts = [f"curriculum perplexity lower than fixed at {len(better)} of {len(both)} lengths"
             + (f" ({', '.join(map(str, better))})" if better else ""),
             "curriculum / fixed: " + ", ".join(f"{length}: {c / f:.3f}" for length, f, c in both)]
    for length, f, c in both:
        if length == l_max or length == max(lengths):
            parts.append(f"at {length} ({length // l_max}x l_max): fixed {f:.3f} vs "
                         f"curriculum {c:.3f} "
                         f"(loss {math.log(f):.4f} vs {math.log(c):.4f} nats, "
                         f"{'curriculum' if c < f else 'fixed'} lower by "
                         f"{abs(math.log(f) - math.log(c)):.4f})")
    return "; ".join(parts)


def print_ratio_table(lengths, fixed: dict, curriculum: dict, unigram: dict | None = None):
    """A markdown table of fixed vs curriculum perplexity (and their ratio) by length, with
    a unigram-baseline column when `unigram` is given."""
    header = ["length", "fixed l_max", "curriculum", "curriculum / fixed"]
    if unigram is not None:
        header.append("unigram baseline")
    rows = []
    for length in lengths:
        f, c = fixed.get(length), curriculum.get(length)
        ratio = f"{c / f:.3f}" if f is not None and c is not None else "-"
        rows.append([length, _cell(f), _cell(c), ratio]
                    + ([_cell(unigram.get(length))] if unigram is not None else []))
    print(format_table(header, rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curriculum_vs_fixed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="train.steps of both runs (default: the config's, 400)")
    parser.add_argument("--workdir", default=None,
                        help="parent directory of the two runs (default: a new directory "
                             "boundless_curriculum_vs_fixed_* in the system's temp dir)")
    parser.add_argument("--lengths", default="64,128,256,512",
                        help="comma-separated evaluation lengths (l_max, 2, 4, 8 x l_max)")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir) if args.workdir else new_workdir("curriculum_vs_fixed")
    for name, _ in RUNS:
        for path in (os.path.join(workdir, name), os.path.join(workdir, name + ".log")):
            if os.path.exists(path):
                sys.exit(f"{path} exists; pick another --workdir (runs are never overwritten)")
    os.makedirs(workdir, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    lengths_flag = "(" + ",".join(map(str, lengths)) + ")"

    start = time.time()
    results = {name: launch(name, os.path.join(workdir, name), args.steps, lengths_flag, extra)
               for name, extra in RUNS}
    fixed, curriculum = results["fixed"], results["curriculum"]
    l_max = lengths[0]

    print(f"\n{CONFIG} on {DEVICES} simulated CPU devices, {fixed['steps']} steps each")
    print(format_table(
        ["run", "levels in metrics.jsonl (length x rows, mesh)", "eval mesh", "steps", "tokens",
         "final train loss", "wall time"],
        [[name, ", ".join(f"{length} x {b} ({m})" for length, b, m in r["levels"]),
          r["levels"][-1][2], r["steps"], f"{r['tokens']:,}", f"{r['final_loss']:.4f}",
          f"{r['wall_s']:.0f}s"]
         for name, r in results.items()]))
    same = fixed["tokens"] == curriculum["tokens"]
    print(f"tokens: fixed {fixed['tokens']:,}, curriculum {curriculum['tokens']:,}: "
          f"{'equal' if same else 'DIFFERENT'}")

    f_ppl, c_ppl = _by_length(fixed["eval"]), _by_length(curriculum["eval"])
    unigram = _by_length(curriculum["eval"], "unigram_perplexity")
    print("\nvalidation perplexity by evaluation length (eval/perplexity_by_length.json)")
    print_ratio_table(lengths, f_ppl, c_ppl, unigram)
    for name, r in results.items():
        for length, reason in (r["eval"].get("not_evaluable") or {}).items():
            print(f"  {name}, length {length}: not evaluable: {reason}")
    f_slide = _by_length(fixed["eval"].get("sliding_window") or {})
    c_slide = _by_length(curriculum["eval"].get("sliding_window") or {})
    if f_slide or c_slide:
        stride = (curriculum["eval"].get("sliding_window") or {}).get("stride")
        print(f"\nsliding-window perplexity (stride {stride})")
        print_ratio_table(lengths, f_slide, c_slide)
    print(f"\nboth runs in {time.time() - start:.0f}s; workdirs {workdir}/{{fixed,curriculum}}")
    print("summary: " + summary(lengths, f_ppl, c_ppl, l_max)
          + ("" if same else f" (token totals differ: {fixed['tokens']:,} vs "
             f"{curriculum['tokens']:,})"))


if __name__ == "__main__":
    main()
