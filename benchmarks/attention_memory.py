"""Per-device compiled memory of a train step, dense vs blockwise attention, on one device.

Builds the train step of configs/tiny.py (batch 1, mesh of one device) at each length and
reads XLA's buffer assignment: `jax.jit(step).lower(...).compile().memory_analysis()`.
Inputs are `jax.ShapeDtypeStruct`s with shardings, so nothing is allocated and long
lengths compile on any machine. Prints a markdown table of temp memory, the growth factor
per doubling of the length, a one-line verdict, and writes a PNG.

    python benchmarks/attention_memory.py [--lengths 1024,2048,...] [--png PATH]
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import tiny  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from train import trainer  # noqa: E402

MIB = 2 ** 20
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def train_step_memory(attention: str, length: int, seq: int = 1) -> dict:
    """Compiled per-device memory of one train step of configs/tiny.py at batch 1.

    The mesh is seq x 1 over the first `seq` devices (data = fsdp = tensor = 1).
    Returns {"temp", "argument", "output", "alias", "total", "compile_s"} (MiB / seconds);
    total = temp + argument + output.
    """
    config = tiny.get_config()
    config.model.attention = attention
    config.curriculum.l_max = length
    config.eval.lengths = None
    config.train.batch_size = 1
    config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 1, seq, 1
    run = trainer.build_run(config, devices=jax.devices()[:seq])
    state = trainer.abstract_state(run)
    rows = mesh_lib.batch_sharding(run.mesh)
    batch = {name: jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=rows)
             for name in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((1, length), jnp.float32, sharding=rows)
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        compiled = trainer.make_train_step(run, 1).lower(state, batch, learning_rate).compile()
    return _memory(compiled, time.time() - start)


def _memory(compiled, seconds: float) -> dict:
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes / MIB, "argument": m.argument_size_in_bytes / MIB,
           "output": m.output_size_in_bytes / MIB, "alias": m.alias_size_in_bytes / MIB,
           "compile_s": seconds}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    return out


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, values in series.items():
        points = [(l, v) for l, v in zip(lengths, values) if isinstance(v, float)]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{l // 1024}k" if l >= 1024 else str(l) for l in lengths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("per-device temp memory (MiB)")
    ax.set_title("train step, configs/tiny.py, batch 1, one device")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)



def save_figure(fig, path: str) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=_int_list,
                        default=[1024 * 2 ** i for i in range(6)],
                        help="comma-separated sequence lengths (default 1024..32768)")
    parser.add_argument("--attentions", default="dense,blockwise",
                        help="comma-separated model.attention values to compare")
    parser.add_argument("--png", default=os.path.join(RESULTS, "attention_memory.png"))
    args = parser.parse_args(argv)
    attentions = [a for a in args.attentions.split(",") if a]

    print(f"# train step memory, configs/tiny.py, batch 1, 1 device "
          f"({jax.devices()[0].platform}); jax {jax.__version__}", flush=True)
    results = {a: [] for a in attentions}
    for length in args.lengths:
        for attention in attentions:
            try:
                m = train_step_memory(attention, length)
                results[attention].append(m["temp"])
                print(f"  {attention:9s} L={length:6d}: temp {m['temp']:.1f} MiB, arguments "
                      f"{m['argument']:.1f} MiB, outputs {m['output']:.1f} MiB "
                      f"(compiled in {m['compile_s']:.1f}s)", flush=True)
            except Exception as error:  # noqa: BLE001 - the table shows what failed
                results[attention].append(type(error).__name__)
                print(f"  {attention:9s} L={length:6d}: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200] if str(error) else ''}", flush=True)

    print()
    header = ["length"] + [f"{a} temp MiB" for a in attentions]
    if len(attentions) == 2:
        header.append(f"{attentions[0]} / {attentions[1]}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for i, length in enumerate(args.lengths):
        row = [str(length)] + [_cell(results[a][i]) for a in attentions]
        if len(attentions) == 2:
            a, b = results[attentions[0]][i], results[attentions[1]][i]
            row.append(f"{a / b:.1f}x" if isinstance(a, float) and isinstance(b, float) else "-")
        print("| " + " | ".join(row) + " |")

    factors = {a: growth_per_doubling(args.lengths, results[a]) for a in attentions}
    print()
    print("growth factor of temp memory per doubling of the length:")
    print("| step | " + " | ".join(attentions) + " |")
    print("|---|" + "|".join("---:" for _ in attentions) + "|")
    for i in range(len(args.lengths) - 1):
        cells = [f"{factors[a][i]:.2f}x" if factors[a][i] is not None else "-"
                 for a in attentions]
        print(f"| {args.lengths[i]} -> {args.lengths[i + 1]} | " + " | ".join(cells) + " |")

    plot(args.lengths, results, args.png)
    print(f"\nwrote {args.png}")
    others = [verdict(a, factors[a]) for a in attentions if a != "blockwise"]
    main_verdict = verdict("blockwise", factors["blockwise"]) if "blockwise" in factors else ""
    print("verdict: " + "; ".join([main_verdict] + others if main_verdict else others))


if __name__ == "__main__":
    main()
