"""`--mode plan`: what a run needs per device, known before anything is allocated.

For every curriculum level the train step is compiled on that level's mesh, and the
scoring step at the longest evaluation length on the evaluation mesh, with abstract
parameters, optimizer state and batches (`jax.eval_shape`, `jax.ShapeDtypeStruct`:
nothing is allocated, so a 7B model plans on a laptop's CPU with N simulated devices).
XLA's buffer assignment (`compile().memory_analysis()`) gives the bytes per device.

FLOPs: `flops_per_step` is the model FLOPs count of model/flops.py (what MFU is quoted
against); `xla_flops` is `compile().cost_analysis()`, which counts the body of each loop
once (the scanned layers, the blockwise kernel's block loops), so it is a lower bound.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import resource
import time

import jax
import jax.numpy as jnp

from evaluation.lengths import evaluation_lengths
from evaluation.scoring import score_function
from model.attention import SEQUENCE_PARALLEL
from model.flops import training_flops_per_step
from parallel import collectives, sequence_parallel
from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train import curriculum as curriculum_lib
from train.state import abstract_state, build_run
from train.step import make_train_step
from train.validate import validate_config
from util import json_values
from util.tables import format_table

GIB = 2 ** 30
PLAN_FILE = "plan.json"


def host_peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM where /proc has it, else ru_maxrss.

    ru_maxrss alone is wrong for a process started by a big parent: it keeps the parent's
    peak across fork + exec (a plan run from a 4 GiB test process reported 4 GiB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def abstract_batch(run, rows: int, length: int) -> dict:
    """The input batch of a step as ShapeDtypeStructs in the mesh's batch sharding."""
    sharding = mesh_lib.batch_sharding(run.mesh)
    length = layout_lib.layout_length(length, run.layout, run.mesh.shape["seq"],
                                      run.layout_parts)
    batch = {name: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding)
             for name in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((rows, length), jnp.float32, sharding=sharding)
    return batch


def _measured(compiled, seconds: float) -> dict:
    """Memory (memory_analysis), XLA FLOPs, the collectives of the compiled HLO and the
    compile time of a compiled step."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    parts = {"arguments": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
             "output": memory.output_size_in_bytes, "alias": memory.alias_size_in_bytes}
    # donated inputs that outputs reuse count once
    parts["total"] = parts["arguments"] + parts["temp"] + parts["output"] - parts["alias"]
    return {"bytes_per_device": {k: int(v) for k, v in parts.items()},
            "xla_flops": float(cost.get("flops", 0.0)), "compile_s": round(seconds, 2),
            "collective_bytes": collectives.collective_bytes(compiled.as_text())}


def train_step_entry(config, level) -> dict:
    """Compiled memory and FLOPs of one train step at `level` (a curriculum Level)."""
    run = build_run(config, level=level)
    state = abstract_state(run)
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        step = make_train_step(run, int(config.train.grad_accum_steps), level.seq_len)
        compiled = step.lower(state, abstract_batch(run, level.batch_size, level.seq_len),
                              learning_rate).compile()
    return {"length": level.seq_len, "batch_size": level.batch_size, "mesh": level.mesh_dict,
            "tokens_per_step": level.tokens_per_step,
            "flops_per_step": training_flops_per_step(run.model_config, level.seq_len,
                                                      level.batch_size),
            **_measured(compiled, time.time() - start)}


def eval_step_entry(config, level, length: int) -> dict:
    """Compiled memory of scoring an [eval.batch_size, length] batch on the eval mesh."""
    run = build_run(config, level=level)
    params = abstract_state(run)["params"]
    rows = int(config.eval.batch_size)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        compiled = score_function(run).lower(params, abstract_batch(run, rows, length),
                                             length).compile()
    return {"length": length, "batch_size": rows, "mesh": level.mesh_dict,
            "tokens_per_step": rows * length,
            "flops_per_step": training_flops_per_step(run.model_config, length, rows) / 3,
            **_measured(compiled, time.time() - start)}


def length_step(config, seq: int) -> int:
    """The granularity of the longest-fit search on `seq` devices: lengths that need no
    padding (whole zigzag chunks, attention blocks per device, loss / MLP chunks). Any
    length runs; these waste nothing."""
    m = config.model
    parts = [2 * seq, seq * m.block_q, seq * m.block_k]
    parts += [c for c in (m.loss_chunk_tokens, m.mlp_chunk_tokens) if c > 0]
    return math.lcm(*parts)


def longest_fit(config, level, budget_bytes: int, log=print) -> dict | None:
    """The longest length whose train step, with `level`'s batch rows and mesh, fits
    `budget_bytes` per device: level.seq_len x 2^k doubled (or halved) to the last power
    of two that fits, then refined by bisection in multiples of length_step. None if no
    candidate down to one step fits."""
    step = length_step(config, level.mesh_dict["seq"])
    tried = {}

    def fits(length):
        if length not in tried:
            result = train_step_entry(config, dataclasses.replace(level, seq_len=length))
            total = result["bytes_per_device"]["total"]
            log(f"  length {length}: {total / GIB:.2f} GiB per device "
                f"({'fits' if total <= budget_bytes else 'over'} {budget_bytes / GIB:g} GiB)",
                flush=True)
            tried[length] = result if total <= budget_bytes else None
        return tried[length]

    low = level.seq_len
    while fits(low) is None:                     # halve until it fits
        if low // 2 < step or (low // 2) % step:
            return None
        low //= 2
    high = 2 * low
    while fits(high) is not None:                # double while it fits
        low, high = high, 2 * high
    while high - low > step:                     # bisect in whole steps
        middle = (low + high) // 2 // step * step
        if middle in (low, high):
            break
        if fits(middle) is not None:
            low = middle
        else:
            high = middle
    return _fit(tried[low], budget_bytes)


def _fit(result, budget_bytes):
    if result is None:
        return None
    return {"length": result["length"], "bytes_per_device": result["bytes_per_device"]["total"],
            "budget_gib": budget_bytes / GIB, "mesh": result["mesh"],
            "batch_size": result["batch_size"]}


def strategy_configs(config, seq: int) -> list:
    """(name, config) for each of plan.strategies that can split this model over `seq`
    devices (heads divisible; the hybrid's degree: model.ulysses_degree, else the largest
    proper divisor of seq whose all-to-all the heads allow), and (name, why not) for the
    others."""
    m = config.model
    out = []
    for strategy in config.plan.strategies:
        candidate = copy.deepcopy(config)
        candidate.model.attention = strategy
        degrees = [None]
        if strategy == "hybrid":
            degrees = [m.ulysses_degree] if m.ulysses_degree else \
                [d for d in range(seq - 1, 1, -1) if seq % d == 0]
        reason = None
        for degree in degrees:
            try:
                d = sequence_parallel.check_degree(strategy, seq, degree)
                sequence_parallel.check_heads(strategy, m.q_heads, m.kv_heads, d)
                candidate.model.ulysses_degree = degree
                reason = None
                break
            except ValueError as error:
                reason = str(error)
        if strategy == "hybrid" and not degrees:
            reason = f"mesh.seq = {seq} has no proper divisor for the groups"
        out.append((strategy, reason or candidate))
    return out


def strategy_entry(config, level, strategy: str, candidate) -> dict:
    """The train step of `level` compiled with one strategy: memory, the collectives XLA
    kept (bytes sent per device and step), the closed form and their time on the links."""
    if isinstance(candidate, str):
        return {"strategy": strategy, "skipped": candidate}
    entry = train_step_entry(candidate, level)
    m, p = candidate.model, candidate.plan
    layers = m.n_layers
    closed = collectives.closed_form_bytes(
        strategy, length=level.seq_len, seq=level.mesh_dict["seq"], q_heads=m.q_heads,
        kv_heads=m.kv_heads, head_dim=m.head_dim, batch=level.batch_size,
        dtype_bytes=jnp.dtype(m.dtype).itemsize, ulysses_degree=m.ulysses_degree,
        forward_passes=1 if m.remat == "none" else 2)
    closed = {**closed, **{k: v * layers for k, v in closed.items() if k != "formula"}}
    sent = entry["collective_bytes"]["traffic"]             # attention and weights
    seconds = {"intra_host": collectives.transfer_seconds(sent, p.intra_host_gbps),
               "inter_host": collectives.transfer_seconds(sent, p.inter_host_gbps)}
    if strategy == "hybrid":          # its all-to-all within a host, its ring across hosts
        ring = entry["collective_bytes"]["collective-permute"]
        seconds["placed"] = (collectives.transfer_seconds(sent - ring, p.intra_host_gbps)
                             + collectives.transfer_seconds(ring, p.inter_host_gbps))
    return {"strategy": strategy, "ulysses_degree": m.ulysses_degree, **entry,
            "closed_form": closed, "collective_seconds": seconds}


def format_strategies(entries: list, intra: float, inter: float) -> str:
    rows = []
    for e in entries:
        if "skipped" in e:
            rows.append([e["strategy"], "-", "-", "-", "-", "-", "-", "-", e["skipped"]])
            continue
        name = e["strategy"] + (f" (U={e['ulysses_degree']})" if e.get("ulysses_degree") else "")
        c, s = e["collective_bytes"], e["collective_seconds"]
        kinds = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in c.items()
                          if v and k in collectives.KINDS)
        rows.append([name, f"{e['bytes_per_device']['total'] / GIB:.2f}",
                     f"{c['traffic'] / 1e9:.3g}", f"{c['attention_traffic'] / 1e9:.3g}",
                     f"{e['closed_form']['bytes'] / 1e9:.3g}",
                     f"{s['intra_host']:.3g}", f"{s['inter_host']:.3g}",
                     f"{s['placed']:.3g}" if "placed" in s else "", kinds])
    return format_table(["strategy", "GiB per device", "GB sent per device (HLO)",
                         "of which attention", "GB closed form (attention)",
                         f"s at {intra:g} GB/s", f"s at {inter:g} GB/s", "s placed (hybrid)",
                         "operands GB by collective (HLO)"], rows)


def plan_workdir(config, workdir: str) -> dict:
    """Compile every level's train step and the longest evaluation's scoring step
    abstractly; print a table, write workdir/plan.json (process 0) and return its dict."""
    plan = validate_config(config)
    print(plan.format(), flush=True)
    levels = []
    for level in plan.levels:
        entry = {"level": level.index, **train_step_entry(config, level)}
        levels.append(entry)
        print(f"level {level.index}: compiled in {entry['compile_s']:.1f} s", flush=True)
    strategies = []
    last = plan.levels[-1]
    if last.mesh_dict["seq"] > 1 and config.model.attention in SEQUENCE_PARALLEL and \
            config.plan.strategies:
        print(f"sequence-parallel strategies at level {last.index} (length {last.seq_len}, "
              f"seq {last.mesh_dict['seq']}):", flush=True)
        for strategy, candidate in strategy_configs(config, last.mesh_dict["seq"]):
            strategies.append(strategy_entry(config, last, strategy, candidate))
            print(f"  {strategy}: " + ("skipped: " + strategies[-1]["skipped"]
                                       if "skipped" in strategies[-1] else "compiled"),
                  flush=True)
    eval_level = curriculum_lib.eval_level(config, plan)
    longest = max(evaluation_lengths(config.eval.lengths, config.curriculum.l_max))
    eval_entry = eval_step_entry(config, eval_level, longest)
    budget = float(config.plan.memory_budget_gib)
    fit = None
    if budget > 0:
        print(f"longest length within {budget:g} GiB per device (batch "
              f"{plan.levels[-1].batch_size}, mesh of the last level):", flush=True)
        fit = longest_fit(config, plan.levels[-1], int(budget * GIB))
    result = {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "levels": levels, "eval": eval_entry, "longest_fit": fit, "budget_gib": budget,
              "strategies": strategies,
              "link_gbps": {"intra_host": config.plan.intra_host_gbps,
                            "inter_host": config.plan.inter_host_gbps},
              "host_peak_rss_gib": host_peak_rss_bytes() / GIB}
    print(format_plan(result), flush=True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, PLAN_FILE), "w") as f:
            json_values.dump(result, f, indent=2)
    return result


def format_plan(result: dict) -> str:
    """The plan as a markdown table (GiB per device) and its closing lines."""
    def row(name, e):
        b = e["bytes_per_device"]
        mesh = " x ".join(f"{axis} {size}" for axis, size in e["mesh"].items() if size > 1) or "1"
        gib = [f"{b[key] / GIB:.3g}" for key in ("arguments", "temp", "output", "total")]
        return [name, e["length"], e["batch_size"], mesh, *gib,
                f"{e['flops_per_step'] / 1e12:.3g}", e["tokens_per_step"],
                f"{e['compile_s']:.1f}"]

    rows = [row(f"level {e['level']}", e) for e in result["levels"]]
    rows.append(row("eval", result["eval"]))
    lines = [f"per-device memory on {result['devices']} {result['platform']} devices "
             "(XLA buffer assignment; GiB):",
             format_table(["step", "length", "batch", "mesh", "arguments", "temp", "output",
                           "total", "model TFLOPs", "tokens/step", "compile s"], rows)]
    if result.get("budget_gib"):
        fit = result["longest_fit"]
        lines.append(f"longest fit: length {fit['length']} ({fit['bytes_per_device'] / GIB:.2f} "
                     f"GiB per device of {fit['budget_gib']:g})" if fit else
                     f"longest fit: no length fits {result['budget_gib']:g} GiB per device")
    if result.get("strategies"):
        lines.append("sequence-parallel strategies at the last level (train step; bytes sent "
                     "per device per step; seconds those take on one link):")
        lines.append(format_strategies(result["strategies"], result["link_gbps"]["intra_host"],
                                       result["link_gbps"]["inter_host"]))
    lines.append(f"host peak RSS {result['host_peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)
