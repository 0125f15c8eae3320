"""Length extrapolation of configs/tiny.py models, as in the Position Interpolation paper.

  python -m benchmarks.length_extrapolation --base DIR [--out DIR] [--learned DIR] [--png PATH]

1. the RoPE model trained at l_max (--base: a workdir of `main.py --config configs/tiny.py
   --workdir DIR`) is evaluated to 8 l_max with no scaling and with linear (Position
   Interpolation), dynamic (NTK) and YaRN scaling by --factor, without retraining (the
   results go to DIR/eval/<name>/; scalings already evaluated there are skipped);
2. the same model is fine-tuned for --finetune_steps at --factor x l_max with linear
   scaling (Position Interpolation) and evaluated (OUT/pi<factor>_finetune);
3. the learned-absolute-positions baseline (same config, model.position=learned) is trained
   (or reused if --learned already holds a run) and evaluated;
then every result goes on one plot and one table (main.py --mode compare, written to
OUT/compare/). Prints the table; with --png also copies the plot there. OUT defaults to
<system temp dir>/boundless_length_extrapolation, --learned to OUT/tiny_learned.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import REPO, main_py


def tiny(*args: str) -> float:
    """main.py with configs/tiny.py and `args`; its wall seconds."""
    return main_py("--config", "configs/tiny.py", *args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.length_extrapolation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True,
                        help="workdir of the RoPE model trained with configs/tiny.py")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(),
                                                      "boundless_length_extrapolation"),
                        help="where the fine-tune and the comparison go (default: "
                             "boundless_length_extrapolation in the system's temp dir)")
    parser.add_argument("--learned", default=None,
                        help="workdir of the learned-positions baseline, trained there "
                             "unless it holds checkpoints (default: OUT/tiny_learned)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--finetune_steps", type=int, default=60)
    parser.add_argument("--learned_steps", type=int, default=None,
                        help="train.steps of the learned baseline (default: the config's, "
                             "the base model's budget)")
    parser.add_argument("--max_batches", type=int, default=4, help="eval windows / eval.batch_size")
    parser.add_argument("--png", default=None,
                        help="also copy the comparison plot here (the README's is "
                             "benchmarks/results/length_extrapolation.png)")
    args = parser.parse_args(argv)
    base, out = os.path.abspath(args.base), os.path.abspath(args.out)
    learned_dir = os.path.abspath(args.learned or os.path.join(out, "tiny_learned"))
    with open(os.path.join(base, "config.json")) as f:
        l_max = json.load(f)["curriculum"]["l_max"]
    # l_max/2 .. 8 l_max
    lengths = "(" + ",".join(str(l_max * 2 ** k // 2) for k in range(5)) + ")"
    evaluation = [f"--config.eval.lengths={lengths}",
                  f"--config.eval.max_batches={args.max_batches}",
                  "--config.eval.sliding_max_windows=16"]
    f = args.factor
    scalings = {"none": '"none"',
                f"linear{f}": json.dumps({"rope_type": "linear", "factor": f}),
                f"dynamic{f}": json.dumps({"rope_type": "dynamic", "factor": f}),
                f"yarn{f}": json.dumps({"rope_type": "yarn", "factor": f})}
    for name, scaling in scalings.items():
        if os.path.exists(os.path.join(base, "eval", name, "perplexity_by_length.json")):
            print(f"(skipping {name}: already evaluated)")
            continue
        tiny("--mode", "eval", "--workdir", base, f"--config.eval.name={name}",
             f"--config.eval.rope_scaling={scaling}", *evaluation)

    finetune = os.path.join(out, f"pi{f}_finetune")
    linear = json.dumps({"rope_type": "linear", "factor": f})   # positions / f: 4 l_max -> l_max
    tiny_batch = 16
    tiny("--workdir", finetune, f"--config.train.init_from={base}",
         f"--config.curriculum.l_max={f * l_max}", f"--config.model.rope.scaling={linear}",
         f"--config.train.batch_size={tiny_batch // f}",
         f"--config.train.steps={args.finetune_steps}",
         "--config.train.learning_rate=2e-4", "--config.train.warmup_fraction=0.05",
         "--config.checkpoint.every_steps=1000", "--config.eval.name=pi", *evaluation)

    if not os.path.exists(os.path.join(learned_dir, "checkpoints")):
        steps = [f"--config.train.steps={args.learned_steps}"] if args.learned_steps else []
        tiny("--workdir", learned_dir, "--config.model.position=learned",
             "--config.eval.lengths=(128,)", "--config.eval.sliding_stride=0", *steps)
    tiny("--mode", "eval", "--workdir", learned_dir, "--config.model.position=learned",
         "--config.eval.name=learned", *evaluation)

    compare_dir = os.path.join(out, "compare")
    subprocess.run([sys.executable, "main.py", "--mode", "compare", "--workdirs",
                    ",".join([base, finetune, learned_dir]), "--workdir", compare_dir],
                   cwd=REPO, check=True)
    if args.png:
        from evaluation.report import COMPARE_PNG  # the plot `main.py --mode compare` draws
        folder = os.path.dirname(os.path.abspath(args.png))
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(os.path.join(compare_dir, COMPARE_PNG), args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
