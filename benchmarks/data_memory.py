"""Peak host memory of training from a prepared corpus, a small one against a big one.

    python -m benchmarks.data_memory [--small-mb 10] [--big-mb 1000] [--doc-kb 1,7]
        [--steps 20] [--eval small|config] [--workdir DIR]

Writes two synthetic text corpora (random words, one document per file, sizes uniform in
--doc-kb), prepares each (`main.py --mode prepare`, workers: one per core), then trains
--steps steps of configs/tiny.py from each prepared directory under `/usr/bin/time -v` and
prints the peak RSS ("Maximum resident set size") and wall time of both runs and their
difference, with the verdict against 150 MiB. `--eval small` ends each run with a small
evaluation (eval.lengths=(256,), no sliding windows), the same for both corpora; `config`
keeps configs/tiny.py's (lengths probed up to 2048, several minutes more per run). Corpora,
prepared directories and runs go under --workdir (default: a new temporary directory). The
1 GB pair needs about 3 GB of disk and, on a 2-core CPU, a few minutes to write and
prepare. Peaks of the same command vary by a few tens of MiB from run to run (XLA).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import new_workdir
from util.tables import format_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_MIB = 150


def write_corpus(directory: str, total_bytes: int, doc_kb: tuple[int, int], seed: int) -> int:
    """Files of random words (a 5,000-word vocabulary) until `total_bytes`; their count."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(5000)]
    pool = " ".join(words[i] for i in rng.integers(0, len(words), 4_000_000)).encode()
    os.makedirs(directory, exist_ok=True)
    written = files = 0
    while written < total_bytes:
        size = int(rng.integers(doc_kb[0] * 1024, doc_kb[1] * 1024))
        start = int(rng.integers(0, len(pool) - size))
        with open(os.path.join(directory, f"{files:07d}.txt"), "wb") as f:
            f.write(pool[start:start + size])
        written, files = written + size, files + 1
    return files


def timed(command: list[str], log: str) -> dict:
    """Run `command` under /usr/bin/time -v; its peak RSS (KiB) and wall seconds."""
    start = time.time()
    with open(log, "w") as out:
        result = subprocess.run(["/usr/bin/time", "-v"] + command, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    text = open(log).read()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}); see {log}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"peak_kib": int(peak.group(1)), "wall_s": time.time() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=float, default=10)
    parser.add_argument("--big-mb", type=float, default=1000)
    parser.add_argument("--doc-kb", default="1,7", help="document sizes: low,high KB")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval", choices=("small", "config"), default="small")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args(argv)
    workdir = args.workdir or new_workdir("data_memory")
    doc_kb = tuple(int(x) for x in args.doc_kb.split(","))
    eval_flags = (["--config.eval.lengths=(256,)", "--config.eval.sliding_stride=0"]
                  if args.eval == "small" else [])
    rows, peaks = [], []
    for name, megabytes in (("small", args.small_mb), ("big", args.big_mb)):
        corpus, prepared = os.path.join(workdir, name), os.path.join(workdir, name + "_prepared")
        files = write_corpus(corpus, int(megabytes * 1e6), doc_kb, seed=len(name))
        prepare = timed([sys.executable, "main.py", "--mode", "prepare", "--config",
                         "configs/tiny.py", "--config.data.source=text",
                         f"--config.data.path={os.path.join(corpus, '*.txt')}",
                         f"--config.data.prepare_dir={prepared}"],
                        os.path.join(workdir, name + "_prepare.log"))
        run = timed([sys.executable, "main.py", "--config", "configs/tiny.py",
                     "--config.data.source=prepared", f"--config.data.path={prepared}",
                     f"--config.train.steps={args.steps}", "--workdir",
                     os.path.join(workdir, name + "_run")] + eval_flags,
                    os.path.join(workdir, name + "_train.log"))
        peaks.append(run["peak_kib"])
        rows.append([name, f"{megabytes:g}", f"{files:,}", f"{prepare['wall_s']:.1f}",
                     f"{run['peak_kib']:,}", f"{run['peak_kib'] / 1024:.0f}",
                     f"{run['wall_s']:.1f}"])
    print(f"{args.steps} steps of configs/tiny.py from a prepared corpus ({args.eval} "
          f"evaluation); runs under {workdir}")
    print(format_table(["corpus", "MB of text", "files", "prepare s", "peak RSS KiB", "MiB",
                        "train wall s"], rows))
    grown = (peaks[1] - peaks[0]) / 1024
    print(f"verdict: the big corpus peaks {grown:+.0f} MiB from the small one: "
          f"{'within' if grown < BOUND_MIB else 'NOT within'} {BOUND_MIB} MiB")


if __name__ == "__main__":
    main()
