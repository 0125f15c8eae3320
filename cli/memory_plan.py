"""`--mode plan`: what a run needs per device, known before anything is allocated.

For every curriculum level the train step is compiled on that level's mesh, and the
scoring step at the longest evaluation length on the evaluation mesh, with abstract
parameters, optimizer state and batches (`jax.eval_shape`, `jax.ShapeDtypeStruct`:
nothing is allocated, so a 7B model plans on a laptop's CPU). The devices are the
`plan.target`'s: this machine's (cpu, N simulated with plan.devices=N) or N compile-only
GPUs or TPU chips (parallel/targets.py), compiled by that accelerator's own compiler.
XLA's buffer assignment (`compile().memory_analysis()`) gives the bytes per device, on the
device and in pinned host memory; the compiled HLO gives the collectives.

FLOPs: `flops_per_step` is the model FLOPs count of model/flops.py (what MFU is quoted
against); `xla_flops` is `compile().cost_analysis()` where the compiler gives one (XLA:CPU
and TPU; not a compile-only GPU), which counts the body of each loop once (the scanned
layers, the blockwise kernel's block loops), so it is a lower bound.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import time

import jax
import jax.numpy as jnp

from configs import sections
from evaluation.lengths import evaluation_lengths
from evaluation.scoring import score_function
from model.choices import SEQUENCE_PARALLEL, policy_name
from model import remat as remat_lib
from model.flops import training_flops_per_step
from parallel import collectives, sequence_parallel, targets
from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train.state import abstract_state, build_run
from train.step import make_train_step
from train.run_spec import resolve
from util import json_values
from util.errors import first_line
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


def plan_devices(settings) -> tuple[targets.Target, list]:
    """(the plan.target, the devices the plan compiles for): this process's devices for
    cpu, plan.devices compile-only devices of an accelerator otherwise."""
    target = targets.get(settings.plan.target)
    if not target.compile_only:
        return target, jax.devices()
    if settings.plan.devices < 1:
        raise ValueError(f"plan.target={target.name} needs plan.devices=N: the number of "
                         f"{'GPUs' if target.platform == 'gpu' else 'chips'} to plan for")
    return target, targets.compile_only_devices(target, int(settings.plan.devices))


class DoesNotFit(ValueError):
    """The target's compiler refused a step for want of device memory (the TPU compiler
    does, where XLA:CPU and XLA:GPU report the bytes and compile)."""


def _compile(lowered):
    """lowered.compile(); a compiler library that is missing is one ValueError line, a
    step the target's compiler refuses for memory a DoesNotFit line."""
    try:
        return lowered.compile()
    except Exception as error:     # re-raised unless it is one of the two
        text = str(error)
        if "cuDNN not found" in text:
            raise ValueError(f"cuDNN attention needs cuDNN, which is not installed: pip "
                             f"install -r {targets.GPU_REQUIREMENTS} (a GPU host), or for "
                             f"planning only: pip install --no-deps -r "
                             f"{targets.COMPILE_ONLY_REQUIREMENTS}") from None
        if "RESOURCE_EXHAUSTED" in text:
            raise DoesNotFit(first_line(text.split("RESOURCE_EXHAUSTED:", 1)[-1].strip(),
                                        300)) from None
        raise


def _measured(compiled, seconds: float, mesh) -> dict:
    """Memory on the device and in pinned host memory (memory_analysis), XLA's FLOPs and
    bytes where its cost analysis gives them, the collectives of the compiled HLO (and what
    of them crosses hosts, the attention's element types, cuDNN's attention calls) and the
    compile time of a compiled step on `mesh`."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    parts = {"arguments": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
             "output": memory.output_size_in_bytes, "alias": memory.alias_size_in_bytes}
    # donated inputs that outputs reuse count once
    parts["total"] = parts["arguments"] + parts["temp"] + parts["output"] - parts["alias"]
    host = {"arguments": memory.host_argument_size_in_bytes,
            "temp": memory.host_temp_size_in_bytes,
            "output": memory.host_output_size_in_bytes, "alias": memory.host_alias_size_in_bytes}
    host["total"] = host["arguments"] + host["temp"] + host["output"] - host["alias"]
    hosts = [device.process_index for device in mesh.devices.flat]
    hlo = compiled.as_text()
    return {"bytes_per_device": {k: int(v) for k, v in parts.items()},
            "host_bytes_per_device": {k: int(v) for k, v in host.items()},
            "xla_flops": float(cost.get("flops", 0.0)),
            "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "compile_s": round(seconds, 2),
            "collective_bytes": collectives.collective_bytes(hlo, hosts),
            "attention_collective_dtypes": collectives.attention_dtypes(hlo),
            "cudnn_attention_calls": collectives.fused_attention_calls(hlo),
            "fused_attention_calls": (collectives.fused_attention_calls(hlo)
                                      + collectives.pallas_attention_calls(hlo))}


def _with_bound(entry: dict, target: targets.Target, devices: int) -> dict:
    """`entry` with "bound": a lower bound on its step's seconds on `target`
    (targets.step_time_bound) from the model FLOPs per device, the bytes the step must move
    at least once (its arguments read, its outputs and temp buffers written) and the
    collective bytes within and across hosts, and the offloaded bytes over PCIe. None on the
    CPU (no published figures)."""
    if not target.compile_only:
        return {**entry, "bound": None}
    b, c = entry["bytes_per_device"], entry["collective_bytes"]
    bound = targets.step_time_bound(
        target, flops=entry["flops_per_step"] / devices,
        min_bytes=b["arguments"] + b["output"] + b["temp"],
        intra_bytes=c["traffic"] - c["inter_host_traffic"], inter_bytes=c["inter_host_traffic"],
        host_bytes=entry["host_bytes_per_device"]["total"])
    return {**entry, "bound": bound}


def train_step_entry(settings, level, devices=None, target=None) -> dict:
    """Compiled memory, FLOPs, collectives and kernel of one train step at `level` (a
    curriculum Level) on `devices` (default: this process's) of `target` (default: cpu)."""
    run = build_run(settings, devices=devices, level=level)
    state = abstract_state(run)
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        step = make_train_step(run, int(settings.train.grad_accum_steps), level.seq_len)
        compiled = _compile(step.lower(state, abstract_batch(run, level.batch_size,
                                                             level.seq_len), learning_rate))
    entry = {"length": level.seq_len, "batch_size": level.batch_size, "mesh": level.mesh_dict,
             "tokens_per_step": level.tokens_per_step, "kernel": run.kernel,
             "attention_kernel": run.kernel,
             "flops_per_step": training_flops_per_step(run.model_config, level.seq_len,
                                                       level.batch_size),
             **_measured(compiled, time.time() - start, run.mesh)}
    return _with_bound(entry, target or targets.get("cpu"), run.mesh.size)


def eval_step_entry(settings, level, length: int, devices=None, target=None) -> dict:
    """Compiled memory of scoring an [eval.batch_size, length] batch on the eval mesh."""
    run = build_run(settings, devices=devices, level=level, rows_in_order=True)
    params = abstract_state(run)["params"]
    rows = int(settings.eval.batch_size)
    start = time.time()
    with mesh_lib.use_mesh(run.mesh):
        compiled = _compile(score_function(run).lower(params, abstract_batch(run, rows, length),
                                                      length))
    entry = {"length": length, "batch_size": rows, "mesh": level.mesh_dict,
             "tokens_per_step": rows * length, "kernel": run.kernel,
             "attention_kernel": run.kernel,
             "flops_per_step": training_flops_per_step(run.model_config, length, rows) / 3,
             **_measured(compiled, time.time() - start, run.mesh)}
    return _with_bound(entry, target or targets.get("cpu"), run.mesh.size)


def length_step(settings, seq: int) -> int:
    """The granularity of the longest-fit search on `seq` devices: lengths that need no
    padding (whole zigzag chunks, attention blocks per device, loss / MLP chunks). Any
    length runs; these waste nothing."""
    model_settings = settings.model
    parts = [2 * seq, seq * model_settings.block_q, seq * model_settings.block_k]
    parts += [chunk for chunk in (model_settings.loss_chunk_tokens,
                                  model_settings.mlp_chunk_tokens) if chunk > 0]
    return math.lcm(*parts)


def longest_fit(settings, level, budget_bytes: int, log=print, devices=None,
                target=None) -> dict | None:
    """The longest length whose train step, with `level`'s batch rows and mesh, fits
    `budget_bytes` per device (of `devices`, default this process's): level.seq_len x 2^k
    doubled (or halved) to the last power of two that fits, then refined by bisection in
    multiples of length_step. None if no candidate down to one step fits."""
    step = length_step(settings, level.mesh_dict["seq"])
    tried = {}

    def fits(length):
        if length not in tried:
            try:
                result = train_step_entry(settings, dataclasses.replace(level, seq_len=length),
                                          devices, target)
            except DoesNotFit as refused:
                log(f"  length {length}: over: the compiler refused it ({refused})", flush=True)
                tried[length] = None
                return None
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
            "host_bytes_per_device": result["host_bytes_per_device"]["total"],
            "budget_gib": budget_bytes / GIB, "mesh": result["mesh"],
            "batch_size": result["batch_size"]}


def strategy_configs(settings, seq: int, host_size: int | None = None) -> list:
    """(name, settings with that model.attention) for each of plan.strategies that can
    split this model over `seq` devices (heads divisible; the hybrid's degree:
    model.ulysses_degree, else the largest proper divisor of seq whose all-to-all the heads
    allow and, with `host_size` (the devices of one host, when the mesh spans hosts), that
    keeps the all-to-all within a host), and (name, why not) for the others."""
    model_settings = settings.model
    out = []
    for strategy in settings.plan.strategies:
        candidate = sections.replace(settings, {"model.attention": strategy})
        degrees = [None]
        if strategy == "hybrid":
            degrees = [model_settings.ulysses_degree] if model_settings.ulysses_degree else \
                [d for d in range(seq - 1, 1, -1)
                 if seq % d == 0 and (host_size is None or host_size % d == 0)]
        reason = None
        for degree in degrees:
            try:
                d = sequence_parallel.check_degree(strategy, seq, degree)
                sequence_parallel.check_heads(strategy, model_settings.q_heads,
                                              model_settings.kv_heads, d)
                candidate = sections.replace(candidate, {"model.ulysses_degree": degree})
                reason = None
                break
            except ValueError as error:
                reason = str(error)
        if strategy == "hybrid" and not degrees:
            reason = f"mesh.seq = {seq} has no proper divisor for the groups"
        out.append((strategy, reason or candidate))
    return out


def link_gbps(settings, target: targets.Target) -> tuple[float, float]:
    """(within a host, across hosts) GB/s that collective bytes are timed at:
    plan.intra_host_gbps / plan.inter_host_gbps where set (> 0), else the target's published
    figures (on the cpu target: the h100's, a common machine to put beside it)."""
    figures = target if target.compile_only else targets.get("h100")
    return (settings.plan.intra_host_gbps or figures.intra_host_gbps,
            settings.plan.inter_host_gbps or figures.inter_host_gbps)


def strategy_entry(settings, level, strategy: str, candidate, devices=None,
                   target=None) -> dict:
    """The train step of `level` compiled with one strategy: memory, the collectives XLA
    kept (bytes sent per device and step), the closed form and their time on the links."""
    if isinstance(candidate, str):
        return {"strategy": strategy, "skipped": candidate}
    target = target or targets.get("cpu")
    try:
        entry = train_step_entry(candidate, level, devices, target)
    except DoesNotFit as refused:
        return {"strategy": strategy, "skipped": f"does not fit: {refused}"}
    model_settings = candidate.model
    layers = model_settings.n_layers
    policy = policy_name(model_settings.remat)
    group = model_settings.remat_group if model_settings.scan_layers else 1
    closed = collectives.closed_form_bytes(
        strategy, length=level.seq_len, seq=level.mesh_dict["seq"],
        q_heads=model_settings.q_heads, kv_heads=model_settings.kv_heads,
        head_dim=model_settings.head_dim, batch=level.batch_size,
        dtype_bytes=jnp.dtype(model_settings.dtype).itemsize,
        ulysses_degree=model_settings.ulysses_degree,
        forward_passes=remat_lib.layer_forward_passes(policy, group),
        ring_passes=remat_lib.attention_forward_passes(policy, group))
    closed = {**closed, **{k: v * layers for k, v in closed.items() if k != "formula"}}
    sent = entry["collective_bytes"]["traffic"]             # attention and weights
    across = entry["collective_bytes"]["inter_host_traffic"]
    intra, inter = link_gbps(settings, target)
    # placed: what crosses hosts in this mesh (the hybrid's ring, not its all-to-all, when
    # its groups fit in a host) at the inter-host figure, the rest within hosts
    seconds = {"intra_host": collectives.transfer_seconds(sent, intra),
               "inter_host": collectives.transfer_seconds(sent, inter),
               "placed": (collectives.transfer_seconds(sent - across, intra)
                          + collectives.transfer_seconds(across, inter))}
    return {"strategy": strategy, "ulysses_degree": model_settings.ulysses_degree, **entry,
            "closed_form": closed, "collective_seconds": seconds}


def format_strategies(entries: list, intra: float, inter: float) -> str:
    rows = []
    for e in entries:
        if "skipped" in e:
            rows.append([e["strategy"], *["-"] * 10, e["skipped"]])
            continue
        name = e["strategy"] + (f" (U={e['ulysses_degree']})" if e.get("ulysses_degree") else "")
        c, s = e["collective_bytes"], e["collective_seconds"]
        kinds = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in c.items()
                          if v and k in collectives.KINDS)
        bound = e.get("bound")
        rows.append([name, e["kernel"], f"{e['bytes_per_device']['total'] / GIB:.2f}",
                     f"{e['host_bytes_per_device']['total'] / GIB:.2f}",
                     f"{c['traffic'] / 1e9:.3g}", f"{c['attention_traffic'] / 1e9:.3g}",
                     f"{c['inter_host_traffic'] / 1e9:.3g}",
                     f"{e['closed_form']['bytes'] / 1e9:.3g}",
                     f"{s['intra_host']:.3g}", f"{s['placed']:.3g}",
                     f"{bound['step_s']:.3g}" if bound else "-", kinds])
    return format_table(["strategy", "kernel", "GiB per device", "host GiB",
                         "GB sent per device (HLO)", "of which attention", "across hosts",
                         "GB closed form (attention)", f"s at {intra:g} GB/s",
                         f"s placed ({inter:g} GB/s across hosts)", "bound s (no overlap)",
                         "operands GB by collective (HLO)"], rows)


def plan_workdir(config, workdir: str) -> dict:
    """Compile every level's train step and the longest evaluation's scoring step
    abstractly on the plan.target's devices; print a table, write workdir/plan.json
    (process 0) and return its dict."""
    target, devices = plan_devices(sections.settings(config))
    spec = resolve(config, workdir, mode="plan", device_count=len(devices),
                   platform=devices[0].platform)
    settings, curriculum = spec.settings, spec.curriculum
    print(curriculum.format(), flush=True)
    print(f"compiling for {len(devices)} x {devices[0].device_kind} ({target.name}"
          + (f", topology {targets.topology_name(target, len(devices))}, "
             f"{targets.hosts(devices)} host(s), compile-only" if target.compile_only else "")
          + ")", flush=True)
    levels = []
    for level in curriculum.levels:
        try:
            entry = {"level": level.index, **train_step_entry(settings, level, devices, target)}
        except DoesNotFit as refused:
            raise ValueError(f"level {level.index} (length {level.seq_len}) does not fit "
                             f"{target.name}: {refused}") from None
        levels.append(entry)
        print(f"level {level.index}: {entry['kernel']} attention, compiled in "
              f"{entry['compile_s']:.1f} s", flush=True)
    strategies = []
    last = curriculum.levels[-1]
    if last.mesh_dict["seq"] > 1 and settings.model.attention in SEQUENCE_PARALLEL and \
            settings.plan.strategies:
        print(f"sequence-parallel strategies at level {last.index} (length {last.seq_len}, "
              f"seq {last.mesh_dict['seq']}):", flush=True)
        hosts = targets.hosts(devices)
        # a GPU mesh over hosts: the hybrid's all-to-all within a host (NVLink), its ring
        # across them (a TPU slice is one ICI network: no such split)
        host_size = len(devices) // hosts if hosts > 1 and target.platform == "gpu" else None
        for strategy, candidate in strategy_configs(settings, last.mesh_dict["seq"], host_size):
            strategies.append(strategy_entry(settings, last, strategy, candidate, devices,
                                             target))
            print(f"  {strategy}: " + ("skipped: " + strategies[-1]["skipped"]
                                       if "skipped" in strategies[-1] else "compiled"),
                  flush=True)
    eval_level = spec.eval_level
    longest = max(evaluation_lengths(settings.eval.lengths, settings.curriculum.l_max))
    try:
        eval_entry = eval_step_entry(settings, eval_level, longest, devices, target)
    except DoesNotFit as refused:
        raise ValueError(f"the evaluation at length {longest} does not fit {target.name}: "
                         f"{refused}") from None
    budget = budget_gib(settings, target)
    fit = None
    if budget > 0:
        print(f"longest length within {budget:g} GiB per device (batch "
              f"{curriculum.levels[-1].batch_size}, mesh of the last level):", flush=True)
        fit = longest_fit(settings, curriculum.levels[-1], int(budget * GIB), devices=devices,
                          target=target)
    intra, inter = link_gbps(settings, target)
    result = {"target": target.name, "target_description": target.description,
              "device_kind": devices[0].device_kind, "devices": len(devices),
              "platform": devices[0].platform, "hosts": targets.hosts(devices),
              "compile_only": target.compile_only,
              "topology": targets.topology_name(target, len(devices))
              if target.compile_only else None,
              "figures": target_figures(target), "levels": levels, "eval": eval_entry,
              "longest_fit": fit, "budget_gib": budget, "strategies": strategies,
              "optimizer_memory": settings.train.optimizer_memory,
              "link_gbps": {"intra_host": intra, "inter_host": inter},
              "host_peak_rss_gib": host_peak_rss_bytes() / GIB}
    print(format_plan(result), flush=True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, PLAN_FILE), "w") as f:
            json_values.dump(result, f, indent=2)
    return result


def budget_gib(settings, target: targets.Target) -> float:
    """The memory the longest-fit search fits into, GiB per device: plan.memory_budget_gib
    when > 0; when 0 the target's memory (none on cpu: no search); -1: no search."""
    budget = float(settings.plan.memory_budget_gib)
    if budget == 0 and target.compile_only:
        return float(target.memory_gib)
    return max(budget, 0.0)


def target_figures(target: targets.Target) -> dict | None:
    """The published figures the bounds use, with their sources (None on cpu)."""
    if not target.compile_only:
        return None
    return {"memory_gib": target.memory_gib, "peak_bf16_tflops": target.peak_bf16_tflops,
            "memory_gbps": target.memory_gbps, "host_link_gbps": target.host_link_gbps,
            "intra_host_gbps": target.intra_host_gbps,
            "inter_host_gbps": target.inter_host_gbps,
            "devices_per_host": target.devices_per_host, "sources": list(target.sources)}


def format_bound(entry: dict) -> str:
    """One line: the bound of a step split into compute, memory, links and offload."""
    bound = entry["bound"]
    text = (f"bound at length {entry['length']}: compute {bound['compute_s']:.3g} s, memory "
            f"{bound['memory_s']:.3g} s, links {bound['collective_s']:.3g} s")
    if bound["offload_s"] is not None:
        text += (f", offload {bound['offload_s']:.3g} s over PCIe ("
                 + ("hidden behind compute: each direction's copies take less than the "
                    "compute of its pass" if bound["offload_hidden"] else
                    "not hidden: the copies take longer than the compute of their pass") + ")")
    return text + f"; {bound['step_s']:.3g} s without overlap, {bound['overlap_s']:.3g} s with"


def format_plan(result: dict) -> str:
    """The plan as a markdown table (GiB per device) and its closing lines."""
    compile_only = result.get("compile_only", False)

    def row(name, e):
        b, h = e["bytes_per_device"], e["host_bytes_per_device"]
        mesh = " x ".join(f"{axis} {size}" for axis, size in e["mesh"].items() if size > 1) or "1"
        gib = [f"{b[key] / GIB:.3g}" for key in ("arguments", "temp", "output", "total")]
        c = e["collective_bytes"]
        cells = [name, e["length"], e["batch_size"], mesh, e["kernel"], *gib,
                 f"{h['total'] / GIB:.3g}", f"{c['traffic'] / 1e9:.3g}",
                 f"{e['flops_per_step'] / 1e12:.3g}", e["tokens_per_step"]]
        if compile_only:
            cells.append(f"{e['bound']['step_s']:.3g} / {e['bound']['overlap_s']:.3g}")
        return cells + [f"{e['compile_s']:.1f}"]

    rows = [row(f"level {e['level']}", e) for e in result["levels"]]
    rows.append(row("eval", result["eval"]))
    header = ["step", "length", "batch", "mesh", "kernel", "arguments", "temp", "output",
              "total", "host GiB", "GB sent", "model TFLOPs", "tokens/step"]
    if compile_only:
        header.append("bound s (no overlap / overlap)")
    where = (f"{result['devices']} x {result['device_kind']} ({result['target']}, "
             f"compile-only)" if compile_only else
             f"{result['devices']} {result['platform']} devices")
    lines = [f"per-device memory on {where} (XLA buffer assignment; GiB; host GiB: pinned "
             "host memory; GB sent: collective bytes per device per step, from the HLO):",
             format_table(header + ["compile s"], rows)]
    if compile_only:
        figures = result["figures"]
        lines.append(
            f"bound: a lower bound on the step time, not a measurement: max(model FLOPs / "
            f"{figures['peak_bf16_tflops']:g} TFLOP/s, bytes the step must move / "
            f"{figures['memory_gbps']:g} GB/s) + collective bytes / "
            f"{figures['intra_host_gbps']:g} GB/s within a host "
            f"({figures['inter_host_gbps']:g} across hosts) + offloaded bytes out and back "
            f"over PCIe ({figures.get('host_link_gbps') or 'no published figure, not counted'}"
            f" GB/s); with overlap: the largest of the four. Figures: "
            + "; ".join(figures["sources"]))
        lines.append(format_bound(result["levels"][-1]))
    if result.get("budget_gib"):
        fit = result["longest_fit"]
        lines.append(f"longest fit: length {fit['length']} ({fit['bytes_per_device'] / GIB:.2f} "
                     f"GiB per device of {fit['budget_gib']:g})" if fit else
                     f"longest fit: no length fits {result['budget_gib']:g} GiB per device")
    if result.get("strategies"):
        lines.append("sequence-parallel strategies at the last level (train step; bytes sent "
                     "per device per step; seconds those take on the links):")
        lines.append(format_strategies(result["strategies"], result["link_gbps"]["intra_host"],
                                       result["link_gbps"]["inter_host"]))
    uncounted = sum(e["collective_bytes"].get("uncounted_loops", 0)
                    for e in [*result["levels"], result["eval"], *result.get("strategies", [])]
                    if "collective_bytes" in e)
    if uncounted:
        lines.append(f"note: {uncounted} loops of the compiled programs have no trip count "
                     "the plan could read; their collectives were counted once (the bytes sent "
                     "are lower bounds)")
    if compile_only and result.get("optimizer_memory") == "host":
        lines.append("train.optimizer_memory=host: compile-only devices have no host memory "
                     "space for a program's arguments, so these figures keep the optimizer "
                     "state on the device (on a GPU it would leave the device between steps)")
    if not compile_only and result["platform"] == "cpu":
        lines.append("XLA:CPU figures: it keeps float32 copies of bf16 buffers (collectives "
                     "included) and ignores host offload; plan.target=h100 (or a100, h200, "
                     "v5e, v5p, v6e) compiles with the accelerator's own compiler")
    lines.append(f"host peak RSS {result['host_peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)
