"""Length extrapolation of configs/tiny.py models, as in the Position Interpolation paper.

  python benchmarks/length_extrapolation.py --base workdirs/tiny [--out workdirs/extrapolation]

1. the RoPE model trained at l_max (--base, trained with `main.py --config configs/tiny.py`)
   is evaluated to 8 l_max with no scaling and with linear (Position Interpolation),
   dynamic (NTK) and YaRN scaling by --factor, without retraining;
2. the same model is fine-tuned for --finetune_steps at --factor x l_max with linear
   scaling (Position Interpolation) and evaluated;
3. the learned-absolute-positions baseline (same config, model.position=learned) is trained
   (or reused if --learned already holds a run) and evaluated;
then every result goes on one plot and one table (main.py --mode compare). Prints the table.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_py(*args):
    command = [sys.executable, "main.py", "--config", "configs/tiny.py", *args]
    print("+ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="workdirs/tiny")
    parser.add_argument("--learned", default="workdirs/tiny_learned")
    parser.add_argument("--out", default="workdirs/extrapolation")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--finetune_steps", type=int, default=60)
    parser.add_argument("--max_batches", type=int, default=4, help="eval windows / eval.batch_size")
    args = parser.parse_args()
    with open(os.path.join(REPO, args.base, "config.json")) as f:
        l_max = json.load(f)["curriculum"]["l_max"]
    lengths = "(" + ",".join(str(l_max * 2 ** k // 2) for k in range(5)) + ")"   # l_max/2 .. 8 l_max
    evaluation = [f"--config.eval.lengths={lengths}", f"--config.eval.max_batches={args.max_batches}",
                  "--config.eval.sliding_max_windows=16"]
    f = args.factor
    scalings = {"none": '"none"',
                f"linear{f}": json.dumps({"rope_type": "linear", "factor": f}),
                f"dynamic{f}": json.dumps({"rope_type": "dynamic", "factor": f}),
                f"yarn{f}": json.dumps({"rope_type": "yarn", "factor": f})}
    for name, scaling in scalings.items():
        if os.path.exists(os.path.join(REPO, args.base, "eval", name, "perplexity_by_length.json")):
            print(f"(skipping {name}: already evaluated)")
            continue
        main_py("--mode", "eval", "--workdir", args.base, f"--config.eval.name={name}",
                f"--config.eval.rope_scaling={scaling}", *evaluation)

    finetune = os.path.join(args.out, f"pi{f}_finetune")
    linear = json.dumps({"rope_type": "linear", "factor": f})   # positions / f: 4 l_max -> l_max
    tiny_batch = 16
    main_py("--workdir", finetune, f"--config.train.init_from={args.base}",
            f"--config.curriculum.l_max={f * l_max}", f"--config.model.rope.scaling={linear}",
            f"--config.train.batch_size={tiny_batch // f}", f"--config.train.steps={args.finetune_steps}",
            "--config.train.learning_rate=2e-4", "--config.train.warmup_fraction=0.05",
            "--config.checkpoint.every_steps=1000", "--config.eval.name=pi", *evaluation)

    if not os.path.exists(os.path.join(REPO, args.learned, "checkpoints")):
        main_py("--workdir", args.learned, "--config.model.position=learned",
                "--config.eval.lengths=(128,)", "--config.eval.sliding_stride=0")
    main_py("--mode", "eval", "--workdir", args.learned, "--config.model.position=learned",
            "--config.eval.name=learned", *evaluation)

    compare_dir = os.path.join(args.out, "compare")
    subprocess.run([sys.executable, "main.py", "--mode", "compare", "--workdirs",
                    ",".join([args.base, finetune, args.learned]), "--workdir", compare_dir],
                   cwd=REPO, check=True)


if __name__ == "__main__":
    main()
