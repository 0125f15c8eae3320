"""How many bytes a compiled step moves between devices, and what the strategies' closed
forms say it should.

`collective_bytes(hlo_text)` reads the optimised HLO of a compiled function
(`compiled.as_text()`): every all-to-all, all-gather, reduce-scatter, all-reduce and
collective-permute, the bytes of its operand on one device, times how often it runs
(while loops carry XLA's `known_trip_count`, or where a compiler leaves it out, as the TPU
compiler does, their count is read from the loop's condition and initial value; of a
conditional's branches the largest
counts), and the traffic that means on one device's link (what it sends: an all-gather
sends its operand to the g - 1 others, an all-to-all (g - 1) / g of it, ...).
`closed_form_bytes` is the volume of one attention layer per device, forward and backward,
for each strategy, as our kernels move it (the ring's float32 dK/dV included), to put beside
it. The two differ by what the formula leaves out (positions and segment ids travel too)
and, on XLA:CPU, by its float32 copies of bf16 buffers (collectives included).
"""
from __future__ import annotations

import json
import re

import numpy as np

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type: one array or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def replica_groups(line: str, device_count: int = 0) -> list[list[int]] | None:
    """The device groups of one collective, in each of XLA's spellings: explicit
    ({{0,1},{2,3}}; {} = one group of all `device_count`), iota ([2,4]<=[8], with an
    optional transpose T(1,0)), mesh (mesh['a'=2,'b'=4] {'b'}: the devices that differ only
    along the named axes), and a collective-permute's source_target_pairs (each pair a
    group). The ids are the step's logical device ids (mesh.devices.flat order). None when
    the line has none of them."""
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if explicit:
        groups = [[int(x) for x in g.split(",") if x]
                  for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
        groups = [g for g in groups if g]
        return groups or ([list(range(device_count))] if device_count else None)
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        dims = [int(d) for d in iota.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
        return ids.reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:                            # mesh['axis_0'=1,'axis_1'=8] {'axis_1'}
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names = [name for name, _ in axes]
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(2))]
        ids = np.arange(int(np.prod([int(n) for _, n in axes]))).reshape(
            [int(n) for _, n in axes])
        rest = [i for i in range(len(axes)) if i not in chosen]
        size = int(np.prod([int(axes[i][1]) for i in chosen]))
        return ids.transpose(rest + chosen).reshape(-1, size).tolist()
    return None


def _group_size(line: str, device_count: int = 0) -> int:
    """Devices in one replica group of a collective (1 when the line names none)."""
    groups = replica_groups(line, device_count)
    return len(groups[0]) if groups else 1


def _tuple_elements(text: str) -> list[str]:
    """The top-level elements of an HLO tuple type, "(a, (b, c), d)" -> ["a", "(b, c)", "d"]
    (dimensions in brackets hold commas, layouts in braces parentheses too:
    "bf16[1,64]{1,0:T(8,128)}"); a non-tuple type is itself."""
    text = text.strip()
    if not text.startswith("("):
        return [text]
    elements, depth, brace, start = [], 0, 0, 1
    for i, char in enumerate(text):
        if char in "{[":
            brace += 1
        elif char in "}]":
            brace -= 1
        elif brace == 0 and char == "(":
            depth += 1
        elif brace == 0 and char == ")":
            depth -= 1
            if depth == 0:
                elements.append(text[start:i].strip())
                break
        elif brace == 0 and char == "," and depth == 1:
            elements.append(text[start:i].strip())
            start = i + 1
    return elements


def _operand_bytes(kind: str, op: str, result: str, line: str, device_count: int = 0) -> int:
    """Operand bytes of one collective on one device, from its result type: an async
    collective-permute-start's or all-gather-start's result tuple begins with its operand,
    or with the tuple of its operands when the compiler combined several (XLA:GPU sends K,
    V, positions and segment ids of a ring hop as one); an all-reduce's operands are its
    results; otherwise all-gather's result is group x its operand, reduce-scatter's operand
    is group x its result, the others' operand is their result."""
    if op.endswith("-start") and kind != "all-reduce" and result.startswith("("):
        return _shape_bytes(_tuple_elements(result)[0])
    size = _shape_bytes(result)
    if kind == "all-gather":
        return size // _group_size(line, device_count)
    if kind == "reduce-scatter":
        return size * _group_size(line, device_count)
    return size


def _computations(hlo_text: str) -> tuple[dict, str]:
    """{name: [instruction lines]} and the entry computation's name."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)          # /*index=5*/ comments
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "=" not in line.split("{")[0]:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
        else:
            computations[current].append(line)
    return computations, entry


def _traffic(kind: str, operand: int, group: int) -> int:
    """Bytes one device sends for a collective of `operand` bytes over `group` devices."""
    if kind == "collective-permute":
        return operand
    if kind == "all-gather":
        return operand * (group - 1)
    if kind in ("all-to-all", "reduce-scatter"):
        return operand * (group - 1) // max(group, 1)
    return 2 * operand * (group - 1) // max(group, 1)          # all-reduce (ring algorithm)


TOTALS = KINDS + ("traffic", "attention_traffic", "inter_host_traffic", "uncounted_loops")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")


def _definitions(lines) -> dict[str, str]:
    """{instruction name: its line} of one computation."""
    found = {}
    for line in lines:
        match = _DEFINITION.match(line)
        if match:
            found[match.group(1)] = line
    return found


def _constant(name: str, definitions: dict) -> int | None:
    """The integer constant `name` holds, through copies (the TPU compiler copies a loop's
    initial values), or None."""
    for _ in range(8):
        line = definitions.get(name, "")
        value = re.search(r" constant\((-?\d+)\)", line)
        if value:
            return int(value.group(1))
        if " copy(" not in line:
            return None
        name = _operands(line, "copy")[0]
    return None


def _operands(line: str, op: str) -> list[str]:
    """The operand names of an instruction line (`op(%a, %b), ...`)."""
    inside = line.split(f" {op}(", 1)[1].split(")", 1)[0]
    return [name.strip().lstrip("%").split(" ")[-1].lstrip("%")
            for name in inside.split(",") if name.strip()]


def trip_count(line: str, definitions: dict, computations: dict) -> int | None:
    """The iterations of a while loop: XLA's known_trip_count, else read from a condition
    `i < bound` (or <=) on a tuple element that starts at a constant and steps by 1, the
    loops JAX writes. None when neither can be read."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", line)
    lines = computations.get(condition.group(1), ()) if condition else ()
    inside = _definitions(lines)
    root = next((x for x in lines if x.lstrip().startswith("ROOT ")), "")
    direction = re.search(r"direction=(LT|LE)", root)
    if " compare(" not in root or not direction:
        return None
    counter, bound = _operands(root, "compare")[:2]
    bound_value = _constant(bound, inside)
    index = re.search(r"get-tuple-element\(.*?\), index=(\d+)", inside.get(counter, ""))
    operands = _operands(line, "while")
    init = definitions.get(operands[0], "") if operands else ""
    if bound_value is None or not index or " tuple(" not in init:
        return None
    elements = _operands(init, "tuple")
    start = _constant(elements[int(index.group(1))], definitions) \
        if int(index.group(1)) < len(elements) else None
    if start is None:
        return None
    return max(0, bound_value - start + (direction.group(1) == "LE"))


def _device_count(hlo_text: str) -> int:
    """Devices of the compiled program: num_partitions x replica_count of its header."""
    header = hlo_text[:hlo_text.find("\n")] if "\n" in hlo_text else hlo_text
    partitions = re.search(r"num_partitions=(\d+)", header)
    replicas = re.search(r"replica_count=(\d+)", header)
    return (int(partitions.group(1)) if partitions else 1) * \
        (int(replicas.group(1)) if replicas else 1)


def _crosses_hosts(line: str, hosts, device_count: int) -> bool:
    """Whether a collective's groups put devices of two hosts together (`hosts[i]`: the
    host of logical device i). A line whose groups cannot be read counts as crossing."""
    if hosts is None or len(set(hosts)) < 2:
        return False
    groups = replica_groups(line, device_count)
    if groups is None:
        return True
    return any(len({hosts[i] for i in group}) > 1 for group in groups)


def collective_bytes(hlo_text: str, hosts=None) -> dict[str, int]:
    """{kind: operand bytes per device per call of the compiled function} for KINDS,
    "traffic": the bytes one device sends for all of them, "attention_traffic": for those
    inside a shard_map (the sequence-parallel attention; the rest are the weights' FSDP
    gathers and the gradients' reductions), "inter_host_traffic": for those whose groups
    span hosts, given `hosts` (the host of each logical device id, i.e. of
    mesh.devices.flat; None: one host), and "uncounted_loops": while loops whose trip
    count could not be read, their bodies counted once (the totals are then lower bounds)."""
    computations, entry = _computations(hlo_text)
    device_count = _device_count(hlo_text)
    memo = {}

    def visit(name: str) -> dict[str, int]:
        if name in memo:
            return memo[name]
        totals = dict.fromkeys(TOTALS, 0)
        definitions = _definitions(computations.get(name, ()))
        for line in computations.get(name, ()):
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            result, op = match.group(1), match.group(2)
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind in KINDS:
                operand = _operand_bytes(kind, op, result, line, device_count)
                totals[kind] += operand
                sent = _traffic(kind, operand, _group_size(line, device_count))
                totals["traffic"] += sent
                if "/shard_map/" in line:
                    totals["attention_traffic"] += sent
                if _crosses_hosts(line, hosts, device_count):
                    totals["inter_host_traffic"] += sent
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                count = trip_count(line, definitions, computations)
                for k, v in visit(body).items():
                    totals[k] += (count if count is not None else 1) * v
                if count is None:                        # counted once: a lower bound
                    totals["uncounted_loops"] += 1
            elif op == "conditional":
                if "branch_computations" in line:
                    names = re.findall(r"%?([\w.\-]+)",
                                       line.split("branch_computations={")[1].split("}")[0])
                else:
                    names = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
                branches = [visit(b) for b in names]
                for k in TOTALS:
                    totals[k] += max((b[k] for b in branches), default=0)
            elif op in ("call", "async-start"):
                for callee in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
                    for k, v in visit(callee).items():
                        totals[k] += v
        memo[name] = totals
        return totals

    return visit(entry) if entry else dict.fromkeys(TOTALS, 0)


def closed_form_bytes(strategy: str, *, length: int, seq: int, q_heads: int, kv_heads: int,
                      head_dim: int, batch: int = 1, dtype_bytes: int = 2,
                      ulysses_degree: int | None = None, forward_passes: int = 1,
                      ring_passes: int | None = None) -> dict:
    """The bytes one device sends for one attention layer in a train step, as our kernels
    move them. {"formula": str, "bytes": int}; N = length, P = seq, d = head_dim, B = the
    compute dtype's bytes; a layer's forward collectives run `forward_passes` times (2 when
    rematerialised, 3 when its group is rerun first), the ring's `ring_passes` times (its
    transfers are inside the kernel: once when a remat policy keeps the kernel's residuals;
    default forward_passes):
      ulysses   B 2 (Hq + Hkv') N d / P x (P-1)/P per pass (q, k, v in, the output back;
                Hkv' = KV heads replicated up to P); the backward moves one pass (their
                transposes: dO in, dq, dk, dv back);
      ring      B 2 N Hkv d (P-1)/P per pass (K and V around the ring); the backward sends
                K, V once more and dK, dV in float32 over P hops (4 x 2 N Hkv d: the
                accumulators stay float32 so that a gradient is rounded once, and the last
                hop takes them home). A rerun's first hop sends what the backward ring's
                first sends, and XLA sends it once: 1/(P-1) of a pass less than counted;
      allgather B 2 N Hkv d (P-1)/P per pass (K and V gathered); the backward reduce-
                scatters dK, dV, twice a pass as the textbook counts it;
      hybrid    Ulysses inside groups of U devices + the ring across the P / U groups."""
    n, p, d, b = length, seq, head_dim, batch
    ring_passes = forward_passes if ring_passes is None else ring_passes
    if strategy == "hybrid":
        u = ulysses_degree or 1
        g = p // u
        inner = closed_form_bytes("ulysses", length=n // g, seq=u, q_heads=q_heads,
                                  kv_heads=kv_heads, head_dim=d, batch=b,
                                  dtype_bytes=dtype_bytes, forward_passes=forward_passes)
        # after the all-to-all a device holds its group's N / g tokens for 1/U of the
        # heads: the ring passes those chunks among the g groups
        ring = closed_form_bytes("ring", length=n, seq=g, q_heads=max(q_heads // u, 1),
                                 kv_heads=max(kv_heads, u) // u, head_dim=d, batch=b,
                                 dtype_bytes=dtype_bytes, ring_passes=ring_passes)
        return {"formula": "Ulysses in groups of U + ring of P/U groups",
                "bytes": inner["bytes"] + ring["bytes"], "all-to-all": inner["bytes"],
                "ring": ring["bytes"]}
    if p == 1:
        return {"formula": "one device", "bytes": 0}
    if strategy == "ulysses":
        per_pass = b * 2 * (q_heads + max(kv_heads, p)) * n * d // p * (p - 1) // p
        return {"formula": f"B 2 (Hq + Hkv') N d / P x (P-1)/P per pass, "
                           f"{forward_passes} forward + 1 backward",
                "bytes": per_pass * dtype_bytes * (forward_passes + 1)}
    per_pass = b * 2 * n * kv_heads * d * (p - 1) // p
    if strategy == "allgather":
        return {"formula": f"B 2 N Hkv d (P-1)/P per pass, {forward_passes} forward + "
                           "backward (2 passes)",
                "bytes": per_pass * dtype_bytes * (forward_passes + 2)}
    if strategy == "ring":
        gradients = b * 2 * n * kv_heads * d * 4
        return {"formula": f"B 2 N Hkv d (P-1)/P per pass, {ring_passes} forward + 1 backward"
                           ", + dK, dV in float32 over P hops (4 x 2 N Hkv d)",
                "bytes": per_pass * dtype_bytes * (ring_passes + 1) + gradients}
    raise ValueError(f"unknown strategy {strategy!r}")


def attention_dtypes(hlo_text: str) -> list[str]:
    """The element types the sequence-parallel attention's collectives (those inside a
    shard_map) move, e.g. ["bf16", "f32", "s32"]: what the compiler kept of the compute
    dtype (XLA:CPU moves float32 copies of bf16 buffers; GPU and TPU compilers keep bf16)."""
    found = set()
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))
        if not match or "/shard_map/" not in line:
            continue
        op = match.group(2)
        if (op[:-len("-start")] if op.endswith("-start") else op) in KINDS:
            found |= {dtype for dtype, _ in _SHAPE.findall(match.group(1))}
    return sorted(found)


def fused_attention_calls(hlo_text: str) -> int:
    """cuDNN fused attention kernels (forward and backward custom calls) in compiled HLO."""
    return len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text))


# The custom-call targets of Pallas kernels: Triton's on a GPU, Mosaic's on a TPU
PALLAS_CALL_TARGETS = ('custom_call_target="__gpu$xla.gpu.triton"',
                       'custom_call_target="tpu_custom_call"')


def pallas_attention_calls(hlo_text: str) -> int:
    """Calls of the Pallas attention kernels (custom calls named boundless_attention_*) in
    compiled HLO, on either platform."""
    return sum(1 for line in hlo_text.splitlines() if "boundless_attention_" in line
               and any(target in line for target in PALLAS_CALL_TARGETS))


def transfer_seconds(nbytes: int, gbytes_per_s: float) -> float:
    """Seconds `nbytes` take over one link of `gbytes_per_s` GB/s."""
    return nbytes / (gbytes_per_s * 1e9)


def describe(totals: dict) -> str:
    return json.dumps({k: v for k, v in totals.items() if v})
