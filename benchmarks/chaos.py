"""Chaos run: train while the process is killed at random moments, restart each time, and
compare the final parameters with an uninterrupted run.

    python -m benchmarks.chaos [--kills 20] [--steps 300] [--seed 0] [--workdir DIR]
                               [--set KEY=VALUE ...]

Both runs are configs/tiny.py for --steps steps on one CPU device (checkpoints every 10
steps, asynchronous saves, a short final evaluation). The chaos run is started, and after
a random moment killed: SIGKILL during a step, SIGKILL right after a checkpoint step (its
asynchronous save in flight) or SIGTERM (a preemption: it must checkpoint and exit 0),
drawn in turn from --seed; `--set KEY=VALUE` adds `--config.KEY=VALUE` to both runs (the test
uses it for a smaller batch). Every restart is the same command; after --kills kills the run
is left to finish. Prints the kills by kind, the steps computed again after kills (the work
lost), whether every restart resumed by itself, and the largest absolute difference between
the two runs' final parameters.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks.common import REPO, new_workdir
from configs.sections import settings as settings_of

EVERY = 10


def command(workdir: str, steps: int, overrides: list[str]) -> list[str]:
    extra = [f"--config.{override}" for override in overrides]
    return [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", workdir,
            f"--config.train.steps={steps}", f"--config.checkpoint.every_steps={EVERY}",
            "--config.checkpoint.max_to_keep=2", "--config.train.log_every_steps=1",
            "--config.checkpoint.async_save=True", "--config.eval.lengths=(256,)",
            "--config.eval.sliding_stride=0", "--config.eval.max_batches=1", *extra]


class Run:
    """One main.py process whose printed steps are followed by a reader thread."""

    def __init__(self, args):
        self.process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
        self.lines: queue.Queue = queue.Queue()
        self.last_step, self.resumed_at, self.output = 0, None, []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.output.append(line)
            if (match := re.match(r"step\s+(\d+)/", line)):
                self.last_step = int(match.group(1))
                self.lines.put(self.last_step)
            if (match := re.search(r"resumed from .* at step (\d+)", line)):
                self.resumed_at = int(match.group(1))

    def wait_for_step(self, step: int, timeout: float = 600) -> bool:
        start = time.time()
        while time.time() - start < timeout and self.process.poll() is None:
            if self.last_step >= step:
                return True
            time.sleep(0.02)
        return self.last_step >= step


def final_parameters(workdir: str) -> dict:
    """The newest checkpoint's parameters as numpy, by path (the model the run wrote to
    its config.json, so --set overrides of model keys are honoured)."""
    import jax

    from configs import workdir_config
    from train.state import build_run
    from train.checkpoint import restore_newest
    config = workdir_config.load(workdir)
    config.mesh.data = 1
    run = build_run(settings_of(config), devices=jax.devices()[:1])
    state, meta = restore_newest(workdir, run, "chaos")
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return int(meta["step"]), {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def main(argv=None):
    from util.tables import format_table
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both runs, e.g. train.batch_size=4")
    args = parser.parse_args(argv)
    root = args.workdir or new_workdir("chaos")
    reference, chaos = os.path.join(root, "uninterrupted"), os.path.join(root, "chaos")
    start = time.time()
    clean = Run(command(reference, args.steps, args.set))
    assert clean.process.wait() == 0, "".join(clean.output[-40:])
    print(f"uninterrupted run: {time.time() - start:.0f} s", flush=True)

    rng = np.random.default_rng(args.seed)
    kinds = ("SIGKILL in a step", "SIGKILL during a save", "SIGTERM")
    kills = {kind: 0 for kind in kinds}
    recomputed, restarts_ok, terms_clean, previous_reach = 0, True, True, 0
    for kill in range(args.kills):
        run = Run(command(chaos, args.steps, args.set))
        kind = kinds[kill % 3]
        resumed = None
        if not run.wait_for_step(run.last_step + 1):          # the first step of this life
            break
        resumed = run.resumed_at or 0
        if kill and resumed < previous_reach:
            recomputed += previous_reach - resumed
        restarts_ok &= kill == 0 or run.resumed_at is not None
        remaining = args.steps - resumed
        if remaining <= 3:
            run.process.wait()
            break
        if kind == "SIGKILL during a save":
            target = (resumed // EVERY + 1 + int(rng.integers(0, 2))) * EVERY
            if target >= args.steps or not run.wait_for_step(target):
                run.process.wait()
                break
            time.sleep(float(rng.uniform(0.0, 0.3)))          # the async save in flight
            run.process.kill()
        else:
            target = resumed + int(rng.integers(1, max(2, min(15, remaining - 1))))
            if not run.wait_for_step(target):
                run.process.wait()
                break
            time.sleep(float(rng.uniform(0.0, 0.5)))
            if kind == "SIGTERM":
                run.process.terminate()
            else:
                run.process.kill()
        code = run.process.wait()
        previous_reach = run.last_step
        if kind == "SIGTERM":
            terms_clean &= code == 0 and any("stopped after step" in line for line in run.output)
        kills[kind] += 1
        print(f"  kill {kill + 1}: {kind} at step {run.last_step} (resumed at {resumed}), "
              f"exit {code}", flush=True)
    final = Run(command(chaos, args.steps, args.set))
    assert final.process.wait() == 0, "".join(final.output[-40:])
    if final.resumed_at is not None and final.resumed_at < previous_reach:
        recomputed += previous_reach - final.resumed_at
    restarts_ok &= final.resumed_at is not None
    step_a, a = final_parameters(reference)
    step_b, b = final_parameters(chaos)
    difference = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"configs/tiny.py, {args.steps} steps, checkpoints every {EVERY} (async), seed "
          f"{args.seed}, {time.time() - start:.0f} s in all")
    print(format_table(["kills", "SIGKILL in a step", "SIGKILL during a save",
                        "SIGTERM (exit 0 + checkpoint)", "steps computed again",
                        "every restart resumed", "final steps", "max param difference"],
                       [[sum(kills.values()), kills[kinds[0]], kills[kinds[1]],
                         f"{kills[kinds[2]]} ({'all clean' if terms_clean else 'NOT all clean'})",
                         recomputed, "yes" if restarts_ok else "no", f"{step_a} / {step_b}",
                         f"{difference:.1e}"]]))


if __name__ == "__main__":
    main()
