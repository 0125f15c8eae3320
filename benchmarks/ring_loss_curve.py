"""Train configs/tiny.py on one device and with ring attention over seq=8 simulated devices
for the same steps, and print both loss curves side by side.

  python -m benchmarks.ring_loss_curve [--steps 60] [--workdir DIR] [--log_every N]

Both runs use the full tiny schedule (train.steps=600) and stop at --steps
(train.stop_at_step), so their learning rates are identical; the difference column is what
float32 reordering across devices leaves. The runs go to DIR/one_device and DIR/ring_seq8
(default DIR: a new directory boundless_ring_loss_curve_* in the system's temp dir);
existing runs are never overwritten.
"""
import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import REPO, new_workdir
from util.tables import format_table

RUNS = (("one_device", 1, []),
        ("ring_seq8", 8, ["--config.mesh.seq=8", "--config.model.attention=ring"]))


def run(workdir, steps, devices, extra):
    """Train with main.py (its output discarded); return {step: loss} from metrics.jsonl."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", workdir,
               f"--config.train.stop_at_step={steps}", *extra]
    print("+ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ring_loss_curve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="train steps of each run")
    parser.add_argument("--workdir", default=None,
                        help="parent directory of the two runs (default: a new directory in "
                             "the system's temp dir)")
    parser.add_argument("--log_every", type=int, default=None,
                        help="train.log_every_steps, the steps compared (default: the "
                             "config's, 20)")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir) if args.workdir else new_workdir("ring_loss_curve")
    for name, _, _ in RUNS:
        if os.path.exists(os.path.join(workdir, name)):
            sys.exit(f"{workdir}/{name} exists; pick another --workdir")
    log = [f"--config.train.log_every_steps={args.log_every}"] if args.log_every else []
    one, ring = [run(os.path.join(workdir, name), args.steps, devices, extra + log)
                 for name, devices, extra in RUNS]
    steps = sorted(set(one) & set(ring))
    print(format_table(
        ["step", "loss, 1 device (blockwise)", "loss, 8 devices seq=8 (ring)", "difference"],
        [[s, f"{one[s]:.5f}", f"{ring[s]:.5f}", f"{abs(one[s] - ring[s]):.1e}"] for s in steps]))
    if steps:
        worst = max(abs(one[s] - ring[s]) for s in steps)
        print(f"largest difference over {len(steps)} logged steps: {worst:.1e}")
    else:
        print(f"no step logged by both runs in {args.steps} steps (see --log_every)")
    print(f"runs in {workdir}/{{one_device,ring_seq8}}")


if __name__ == "__main__":
    main()
