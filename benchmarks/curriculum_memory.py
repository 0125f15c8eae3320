"""Per-device compiled memory of the train step at every curriculum level, relayout on vs off.

For configs/curriculum_cpu.py (4 levels on 8 simulated devices: 64 x 32 rows -> 128 x 16 ->
256 x 8 -> 512 x 4, the same 2048 tokens per step) and, by default, the same curriculum with
l_max 1024 (1024 .. 8192), builds each level's Run twice:
  * relayout on (the default): the level's own mesh, devices moved from data to seq as the
    length grows (data 8 -> data 4 x seq 2 -> data 2 x seq 4 -> seq 8);
  * relayout off: every level keeps the config's mesh (data 8 x seq 1; ring attention on
    seq 1 is the blockwise kernel). A level that cannot run that way (e.g. its batch does
    not split over data x fsdp) says "n/a" with the reason: the ValueError that
    train.curriculum.make_curriculum (batch split) or train.validate (weight and sequence
    splits) raises for that level with relayout off.
and reads `make_train_step(run, 1).lower(state, batch, lr).compile().memory_analysis()` on
`jax.ShapeDtypeStruct` inputs (nothing is allocated). Total = temp + arguments + outputs,
as in ring_memory.py (the donated state counts in arguments and in outputs).

Prints a markdown table per l_max, a breakdown (train state / batch / temp), a one-line
verdict on the target (relayout on: the last level's total within +-15% of the first
level's) and with --png writes a plot.

    python -m benchmarks.curriculum_memory [--l_max 64,1024] [--levels 4] [--batch 32]
                                           [--png PATH]
"""
from __future__ import annotations

import os
from configs.sections import settings as settings_of

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import dataclasses
import re
import time

import jax
import jax.numpy as jnp

from benchmarks.common import MIB, int_list, memory, pyplot, save_figure
from configs import curriculum_cpu
from util.tables import format_table
from parallel import mesh as mesh_lib
from train import curriculum as curriculum_lib
from train import state as state_lib
from train import validate
from train.step import make_train_step
from util.errors import error_line

TOLERANCE = 0.15          # target: last level's total within +-15% of the first level's
BATCH_FIELDS = {"tokens": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                "segment_ids": jnp.int32, "loss_mask": jnp.float32}


def make_config(l_max: int, levels: int, batch: int, relayout: bool = True):
    config = curriculum_cpu.get_config()
    config.curriculum.l_max = l_max
    config.curriculum.levels = levels
    config.curriculum.relayout = relayout
    config.train.batch_size = batch
    config.eval.lengths = None         # evaluation is not measured here
    return config


def step_memory(config, level) -> dict:
    """Compiled per-device memory of the train step at `level` (its mesh, length, batch)."""
    run = state_lib.build_run(settings_of(config), level=level)
    state = state_lib.abstract_state(run)
    rows = mesh_lib.batch_sharding(run.mesh)
    shape = (level.batch_size, level.seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
             for name, dtype in BATCH_FIELDS.items()}
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        compiled = make_train_step(run, 1).lower(state, batch, learning_rate).compile()
    out = memory(compiled, time.time() - start)
    # what the arguments hold: the train state (params + optimizer) and this device's batch
    out["state"] = sum(_bytes(x.sharding.shard_shape(x.shape), x.dtype)
                       for x in jax.tree.leaves(state)) / MIB
    out["batch"] = sum(_bytes(x.sharding.shard_shape(x.shape), x.dtype)
                       for x in batch.values()) / MIB
    out["mesh"] = curriculum_lib.format_mesh(level.mesh)
    return out


def _bytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * jnp.dtype(dtype).itemsize


_LEVEL_PREFIX = re.compile(r"^curriculum level \d+( \(length \d+\))?: ")


def off_reason(config, level) -> str | None:
    """Why `level` cannot run with relayout off (on the config's own mesh), or None.

    The level alone is planned as a one-level curriculum (its length and batch, relayout
    off), so train.curriculum.make_curriculum checks its batch split as for any level; then
    train.validate checks the weight split and the sequence split on that mesh. The
    reason is the ValueError's message, without make_curriculum's "curriculum level 0 (length
    N): " prefix (the table's row names the level)."""
    single = make_config(level.seq_len, 1, level.batch_size, relayout=False)
    for key in ("lengths", "shares", "rope_thetas", "rope_scalings", "lr_multipliers"):
        single.curriculum[key] = None
    try:
        (only,) = curriculum_lib.make_curriculum(settings_of(single), jax.device_count()).levels
        validate.check_weight_split(config.model, only.mesh_dict, "the config's mesh")
        validate.check_length(level.seq_len, config, only.mesh_dict)
    except ValueError as error:
        return _LEVEL_PREFIX.sub("", str(error))
    return None


def measure(l_max: int, levels: int, batch: int) -> dict:
    """{"curriculum", "on": [cell per level], "off": [...], "off_curriculum_error", "off_mesh"}; a
    cell is a memory dict or a string ("n/a: reason" / an error class name). Every level
    runs with relayout on (validate_config checked the curriculum); with relayout off a level
    says n/a with the reason from off_reason."""
    config = make_config(l_max, levels, batch)
    curriculum = validate.validate_config(settings_of(config))
    base = mesh_lib.mesh_shape(config.mesh, jax.device_count())
    off_mesh = tuple((axis, base[axis]) for axis in curriculum_lib.MESH_AXES)
    try:
        curriculum_lib.make_curriculum(
            settings_of(make_config(l_max, levels, batch, relayout=False)), jax.device_count())
        off_curriculum_error = None
    except ValueError as error:
        off_curriculum_error = str(error)
    result = {"curriculum": curriculum, "on": [], "off": [],
              "off_curriculum_error": off_curriculum_error, "off_mesh": off_mesh}
    for level in curriculum.levels:
        for key, lvl in (("on", level), ("off", dataclasses.replace(level, mesh=off_mesh))):
            what = f"level {level.index} (length {level.seq_len}), relayout {key}"
            reason = off_reason(config, level) if key == "off" else None
            if reason is not None:
                result[key].append(f"n/a: {reason}")
                print(f"  l_max={l_max} {what}: n/a: {reason}", flush=True)
                continue
            try:
                m = step_memory(config, lvl)
                result[key].append(m)
                print(f"  l_max={l_max} {what} [{m['mesh']}]: total {m['total']:.1f} MiB "
                      f"(temp {m['temp']:.1f}, arguments {m['argument']:.1f}, outputs "
                      f"{m['output']:.1f}) compiled in {m['compile_s']:.1f}s", flush=True)
            except Exception as error:  # noqa: BLE001 - the table shows what failed
                result[key].append(f"{type(error).__name__}")
                print(f"  l_max={l_max} {what}: {error_line(error)}", flush=True)
    return result


def _total(cell) -> str:
    if isinstance(cell, dict):
        return f"{cell['total']:.1f}"
    return cell


def print_tables(l_max: int, result: dict) -> None:
    curriculum = result["curriculum"]
    print(f"\nl_max {l_max}: per-device compiled memory of the train step, MiB "
          f"(total = temp + arguments + outputs)")
    rows = []
    for level, on, off in zip(curriculum.levels, result["on"], result["off"]):
        on_mesh = on["mesh"] if isinstance(on, dict) else curriculum_lib.format_mesh(level.mesh)
        off_mesh = curriculum_lib.format_mesh(result["off_mesh"])
        rows.append([level.index, level.seq_len, level.batch_size, on_mesh, _total(on),
                     off_mesh, _total(off)])
    print(format_table(["level", "length", "batch", "mesh (relayout on)", "on: total MiB",
                        "off: mesh", "off: total MiB"], rows))
    if result["off_curriculum_error"]:
        print(f"  relayout off, make_curriculum itself raises: {result['off_curriculum_error']}")

    print(f"\nl_max {l_max}: breakdown, MiB per device (state = params + optimizer "
          f"state; batch = this device's rows; arguments = state + batch; outputs = the new "
          f"state, aliased to the donated one, so resident = total - aliased)")
    rows = []
    for level, on, off in zip(curriculum.levels, result["on"], result["off"]):
        for key, cell in (("on", on), ("off", off)):
            if not isinstance(cell, dict):
                continue
            mesh = dict(level.mesh if key == "on" else result["off_mesh"])
            rows_per_device = level.batch_size // (mesh["data"] * mesh["fsdp"])
            local = level.seq_len // mesh["seq"]
            rows.append([level.index, key, cell["mesh"], f"{rows_per_device} x {local}",
                         f"{cell['state']:.2f}", f"{cell['batch']:.3f}", f"{cell['temp']:.2f}",
                         f"{cell['output']:.2f}", f"{cell['total']:.2f}",
                         f"{cell['total'] - cell['alias']:.2f}", f"{cell['compile_s']:.1f}"])
    print(format_table(["level", "relayout", "mesh", "rows x tokens per device", "state",
                        "batch", "temp", "outputs", "total", "resident", "compile s"], rows))


def ratio_text(cells, key: str = "total") -> tuple[str, float | None]:
    """"last / first = ratio" for the last level's cell vs the first level's."""
    first, last = cells[0], cells[-1]
    if isinstance(first, dict) and isinstance(last, dict):
        r = last[key] / first[key]
        return f"{last[key]:.1f} / {first[key]:.1f} = {r:.2f}", r
    missing = first if not isinstance(first, dict) else last
    return f"not measurable ({missing})", None


def off_text(result: dict) -> str:
    """The relayout-off ratio; when the last level cannot run without relayout, say so and
    give the ratio of the last level that can."""
    cells, levels = result["off"], result["curriculum"].levels
    text, ratio = ratio_text(cells)
    if ratio is not None or not isinstance(cells[0], dict):
        return text
    measured = [k for k, c in enumerate(cells) if isinstance(c, dict)]
    k = measured[-1]
    return (f"n/a at level {levels[-1].index} ({cells[-1].removeprefix('n/a: ')}); level "
            f"{k} / level 0 = {cells[k]['total']:.1f} / {cells[0]['total']:.1f} = "
            f"{cells[k]['total'] / cells[0]['total']:.2f}")


def dominated_by(result: dict) -> str:
    """What makes the relayout-on totals differ: the train state (arguments + outputs) or
    the temporaries, in MiB at the first and the last level."""
    first, last = result["on"][0], result["on"][-1]
    if not (isinstance(first, dict) and isinstance(last, dict)):
        return ""
    state = [c["argument"] + c["output"] for c in (first, last)]
    temp = [first["temp"], last["temp"]]
    d_state, d_temp = state[1] - state[0], temp[1] - temp[0]
    part = "train state" if abs(d_state) >= abs(d_temp) else "temp"
    return (f"; the change is dominated by the {part}: arguments + outputs "
            f"{state[0]:.1f} -> {state[1]:.1f} MiB ({d_state:+.1f}; params + Adam "
            f"replicated over data at level 0, sharded over seq "
            f"{dict(result['curriculum'].levels[-1].mesh)['seq']} at the last level), temp "
            f"{temp[0]:.1f} -> {temp[1]:.1f} MiB ({d_temp:+.1f})")


def verdict(l_max: int, result: dict) -> str:
    on, on_ratio = ratio_text(result["on"])
    temp, _ = ratio_text(result["on"], "temp")
    inside = ("yes" if on_ratio is not None and abs(on_ratio - 1) <= TOLERANCE else
              "no" if on_ratio is not None else "unknown")
    return (f"l_max {l_max}: last/first level total with relayout on {on}, within "
            f"+-{TOLERANCE:.0%}: {inside} (temp alone {temp})"
            + (dominated_by(result) if inside == "no" else "")
            + f"; relayout off: {off_text(result)}")


def plot(results: dict, path: str) -> None:
    fig, axes = pyplot().subplots(1, len(results), figsize=(6 * len(results), 4.4), squeeze=False)
    for ax, (l_max, result) in zip(axes[0], results.items()):
        lengths = [level.seq_len for level in result["curriculum"].levels]
        for key, style in (("on", "-"), ("off", "--")):
            for part, marker in (("total", "o"), ("temp", "s")):
                points = [(length, c[part]) for length, c in zip(lengths, result[key])
                          if isinstance(c, dict)]
                if points:
                    ax.plot(*zip(*points), style, marker=marker, label=f"relayout {key}: {part}")
            for length, c in zip(lengths, result[key]):
                if isinstance(c, str):
                    ax.annotate("off: n/a", (length, 0), xycoords=("data", "axes fraction"),
                                xytext=(0, 8), textcoords="offset points", ha="center",
                                fontsize=8)
        first = result["on"][0]
        if isinstance(first, dict):
            ax.axhspan(first["total"] * (1 - TOLERANCE), first["total"] * (1 + TOLERANCE),
                       color="green", alpha=0.12, label="level 0 total +-15%")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(length) for length in lengths])
        ax.set_xlabel("level length (tokens; batch halves as the length doubles)")
        ax.set_ylabel("per-device MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(f"curriculum train step, l_max {l_max}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"per-device compiled memory per curriculum level ({jax.device_count()} "
                 f"simulated devices)")
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curriculum_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--l_max", type=int_list, default=[64, 1024],
                        help="comma-separated curriculum.l_max values, one table each")
    parser.add_argument("--levels", type=int, default=4, help="curriculum.levels")
    parser.add_argument("--batch", type=int, default=32, help="train.batch_size (rows at l_max)")
    parser.add_argument("--png", default=None,
                        help="write the plot to this PNG (default: no plot; the README's is "
                             "benchmarks/results/curriculum_memory.png)")
    args = parser.parse_args(argv)
    print(f"# curriculum memory: configs/curriculum_cpu.py, {args.levels} levels, batch "
          f"{args.batch} at l_max, on {jax.device_count()} simulated "
          f"{jax.devices()[0].platform} devices; jax {jax.__version__}", flush=True)
    start = time.time()
    results = {}
    for l_max in args.l_max:
        config = make_config(l_max, args.levels, args.batch)
        print(validate.validate_config(settings_of(config)).format(), flush=True)
        results[l_max] = measure(l_max, args.levels, args.batch)
    for l_max, result in results.items():
        print_tables(l_max, result)
    if args.png:
        plot(results, args.png)
        print(f"\nwrote {args.png}")
    print(f"measured in {time.time() - start:.0f}s")
    print("verdict: " + "; ".join(verdict(l_max, result) for l_max, result in results.items()))


if __name__ == "__main__":
    main()
