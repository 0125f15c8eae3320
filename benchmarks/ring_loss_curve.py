"""Train configs/tiny.py on one device and with ring attention over seq=8 simulated devices
for the same steps, and print both loss curves side by side.

  python benchmarks/ring_loss_curve.py [--steps 60] [--workdir workdirs/ring_curve]

Both runs use the full tiny schedule (train.steps=600) and stop at --steps, so their learning
rates are identical; the difference column is what float32 reordering across devices leaves.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, steps, devices, extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", workdir,
               f"--config.train.stop_at_step={steps}", *extra]
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workdir", default="workdirs/ring_curve")
    args = parser.parse_args()
    for name in ("one_device", "ring_seq8"):
        if os.path.exists(os.path.join(args.workdir, name)):
            sys.exit(f"{args.workdir}/{name} exists; pick another --workdir")
    one = run(os.path.join(args.workdir, "one_device"), args.steps, 1, [])
    ring = run(os.path.join(args.workdir, "ring_seq8"), args.steps, 8,
               ["--config.mesh.seq=8", "--config.model.attention=ring"])
    print("| step | loss, 1 device (blockwise) | loss, 8 devices seq=8 (ring) | difference |")
    print("|---|---|---|---|")
    for step in sorted(one):
        print(f"| {step} | {one[step]:.5f} | {ring[step]:.5f} | {abs(one[step] - ring[step]):.1e} |")
    worst = max(abs(one[s] - ring[s]) for s in one)
    print(f"largest difference over {len(one)} logged steps: {worst:.1e}")


if __name__ == "__main__":
    main()
