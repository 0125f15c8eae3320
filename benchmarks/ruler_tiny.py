"""RULER by length for the tiny retrieval model and its PI / YaRN extensions.

  python -m benchmarks.ruler_tiny --base W0 [--out OUT] [--lengths 256,512,1024,2048]
      [--samples 8] [--target 1024] [--extend_steps 300]

1. --base: a workdir of `main.py --config configs/retrieval.py --workdir W0` (the model
   trained at l_max 256 on the corpus + passkey/kv/line mix);
2. it is extended to --target with Position Interpolation (linear) and with YaRN
   (configs/extend.py, --extend_steps steps of 4 x target tokens with the same retrieval
   mix: the extension recipe of benchmarks/README.md) into OUT/pi and OUT/yarn, unless
   they already hold checkpoints;
3. each of the three is scored on RULER's 11 download-free tasks at --lengths
   (`main.py --mode eval --config.eval.name=ruler`, greedy generation; results in
   W/eval/ruler/), and the script prints, per model, the score of every task and length,
   the mean over tasks (RULER's, defined only where every task fits the length), the mean
   over the tasks that fit, and the effective length by RULER's rule (threshold 85.6),
   then the published figures of real models as the scale;
4. beside it, the pass key in the format these models were trained on (data/retrieval_tasks.py:
   11 depths x 2 samples per length, exact match of the greedy answer; W/eval/passkey/),
   which tells "cannot retrieve" from "cannot follow RULER's prompts".
Evaluations already in W/eval/ruler or W/eval/passkey with the same settings are reused.
OUT defaults to boundless_ruler_tiny in the system's temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from benchmarks.common import int_list, main_py
from util.tables import format_table

# RULER (Hsieh et al. 2024): mean over the 13 tasks at 4K..128K, effective length
PUBLISHED = [("Llama-3.1-8B", "95.5 / 93.8 / 91.6 / 87.4 / 84.7 / 77.0", "32K"),
             ("Mistral-7B-v0.2", "93.6 / 91.2 / 87.2 / 75.4 / 49.0 / 13.8", "16K"),
             ("LWM-1M", "82.3 / 78.4 / 73.7 / 69.1 / 68.1 / 65.0", "< 4K")]

# the extension recipe of benchmarks/README.md, "Evidence: out to Hugging Face, back in,
# and extended"
RETRIEVAL_MIX = ["--config.data.retrieval_fraction=0.995",
                 "--config.data.retrieval_task_weights=(4.0,1.0,1.0)",
                 "--config.data.retrieval_answer_weight=20.0",
                 "--config.data.retrieval_min_length=128"]


def extend(base: str, out: str, scaling: str, target: int, steps: int) -> float:
    """Fine-tunes `base` at `target` tokens with `scaling` into `out` (skipped when `out`
    holds checkpoints); wall seconds (0 when skipped)."""
    if os.path.exists(os.path.join(out, "checkpoints")):
        print(f"(reusing {out})")
        return 0.0
    return main_py("--config", "configs/extend.py", "--workdir", out,
                   f"--config.train.init_from={base}", f"--config.extend.target_length={target}",
                   f"--config.extend.scaling={scaling}", f"--config.train.steps={steps}",
                   "--config.train.batch_size=4", "--config.train.learning_rate=2e-4",
                   "--config.extend.warmup_steps=10", "--config.model.dtype=float32",
                   "--config.model.block_q=128", "--config.model.block_k=128",
                   "--config.checkpoint.every_steps=1000", *RETRIEVAL_MIX,
                   f"--config.eval.lengths=({target},)", "--config.eval.max_batches=1",
                   "--config.eval.sliding_stride=0", "--config.eval.retrieval_tasks=()")


def score(workdir: str, lengths: list[int], samples: int) -> tuple[dict, float]:
    """RULER's 11 tasks at `lengths` on `workdir`: (ruler.json, wall seconds; 0 when an
    earlier run's ruler.json with these settings is reused)."""
    path = os.path.join(workdir, "eval", "ruler", "ruler.json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if (earlier["settings"]["lengths"] == sorted(lengths)
                and earlier["settings"]["samples"] == samples):
            print(f"(reusing {path})")
            return earlier, 0.0
    seconds = main_py("--mode", "eval", "--workdir", workdir, "--config.eval.name=ruler",
                      '--config.eval.ruler.tasks=("all",)',
                      f"--config.eval.ruler.lengths=({','.join(map(str, lengths))},)",
                      f"--config.eval.ruler.samples={samples}",
                      f"--config.eval.lengths=({min(lengths)},)", "--config.eval.max_batches=1",
                      "--config.eval.sliding_stride=0", "--config.eval.retrieval_tasks=()")
    with open(os.path.join(workdir, "eval", "ruler", "ruler.json")) as f:
        return json.load(f), seconds


def passkey(workdir: str, lengths: list[int]) -> dict:
    """The pass key in its training format at `lengths`, scored by greedy generation:
    {length: exact match 0..1} (reused from W/eval/passkey when its lengths match)."""
    path = os.path.join(workdir, "eval", "passkey", "retrieval.json")
    if not os.path.exists(path) or _passkey_lengths(path) != sorted(lengths):
        main_py("--mode", "eval", "--workdir", workdir, "--config.eval.name=passkey",
                '--config.eval.retrieval_tasks=("passkey",)',
                f"--config.eval.retrieval_lengths=({','.join(map(str, lengths))},)",
                "--config.eval.retrieval_samples=2", "--config.eval.retrieval_scoring=generate",
                f"--config.eval.lengths=({min(lengths)},)", "--config.eval.max_batches=1",
                "--config.eval.sliding_stride=0")
    grid = _passkey_grid(path)
    return dict(zip(grid["lengths"], grid["length_accuracy"]))


def _passkey_grid(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    return result["tasks"]["passkey"] if "tasks" in result else result["passkey"]


def _passkey_lengths(path: str) -> list[int]:
    return sorted(_passkey_grid(path)["lengths"])


def cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def task_table(result: dict, lengths: list[int]) -> str:
    rows = [[task] + [cell(scores.get(str(L))) for L in lengths]
            for task, scores in result["tasks"].items()]
    rows.append(["mean (RULER: every task scored)"]
                + [cell(result["mean"].get(str(L))) for L in lengths])
    rows.append(["mean of the tasks that fit"]
                + [cell(fitted_mean(result, L)) for L in lengths])
    return format_table(["task"] + [str(L) for L in lengths], rows)


def fitted_mean(result: dict, length: int):
    scores = [s[str(length)] for s in result["tasks"].values() if s.get(str(length)) is not None]
    return sum(scores) / len(scores) if scores else None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ruler_tiny",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True,
                        help="workdir of the model trained with configs/retrieval.py")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(),
                                                      "boundless_ruler_tiny"),
                        help="where the PI and YaRN extensions go")
    parser.add_argument("--lengths", type=int_list, default=[256, 512, 1024, 2048])
    parser.add_argument("--samples", type=int, default=8, help="per task and length")
    parser.add_argument("--target", type=int, default=1024, help="the extensions' length")
    parser.add_argument("--extend_steps", type=int, default=300)
    args = parser.parse_args(argv)
    base, out = os.path.abspath(args.base), os.path.abspath(args.out)
    with open(os.path.join(base, "config.json")) as f:
        l_max = json.load(f)["curriculum"]["l_max"]
    factor = args.target // l_max
    models = {f"base (l_max {l_max})": base,
              f"PI x{factor}, {args.extend_steps} steps at {args.target}": os.path.join(out, "pi"),
              f"YaRN x{factor}, {args.extend_steps} steps at {args.target}":
                  os.path.join(out, "yarn")}
    walls = {}
    for (name, workdir), scaling in zip(list(models.items())[1:], ("linear", "yarn")):
        walls[name] = extend(base, workdir, scaling, args.target, args.extend_steps)
    results = {}
    for name, workdir in models.items():
        results[name], seconds = score(workdir, args.lengths, args.samples)
        walls[name] = walls.get(name, 0.0) + seconds

    for name, result in results.items():
        print(f"\n{name}: {models[name]} ({walls[name]:.0f} s of training and scoring)")
        print(task_table(result, args.lengths))
        skipped = sorted(k for k in result["skipped"] if not k.startswith("qa"))
        if skipped:
            print("not scored (the task does not fit the length with byte tokens): "
                  + ", ".join(skipped))
    print("\nsummary (effective length: RULER's rule, mean > "
          f"{next(iter(results.values()))['threshold']} at the length and every shorter one)")
    rows = [[name] + [cell(fitted_mean(r, L)) for L in args.lengths]
            + [str(r["effective_length"])] for name, r in results.items()]
    print(format_table(["model (mean of the tasks that fit)"] + [str(L) for L in args.lengths]
                       + ["effective length"], rows))
    print("\nthe pass key in the format the models were trained on (greedy exact match by "
          "length, 11 depths x 2 samples)")
    keys = {name: passkey(workdir, args.lengths) for name, workdir in models.items()}
    print(format_table(["model"] + [str(L) for L in args.lengths],
                       [[name] + [f"{keys[name].get(L, float('nan')):.2f}" for L in args.lengths]
                        for name in models]))
    print("\npublished (RULER, Hsieh et al. 2024; mean of 13 tasks at 4K / 8K / 16K / 32K / "
          "64K / 128K)")
    print(format_table(["model", "mean by length", "effective length"],
                       [list(row) for row in PUBLISHED]))


if __name__ == "__main__":
    main()
