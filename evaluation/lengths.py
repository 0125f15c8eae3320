"""Which lengths to evaluate: eval.lengths, or powers of two up to what the mesh and the
validation documents allow (the memory probe compiles the scoring step; scoring.py)."""
from __future__ import annotations

import dataclasses
import os

import jax


def evaluation_lengths(lengths, l_max: int, top: int | None = None) -> tuple[int, ...]:
    """`lengths` (eval.lengths) if set; else powers of two from l_max / 2 up to
    max(8 l_max, top).

    `top` is the probed longest length (default_top_length); None: 8 l_max."""
    if lengths:
        return tuple(sorted(int(x) for x in lengths))
    top = max(8 * l_max, top or 0)
    lengths, length = [], max(1, l_max // 2)
    while length <= top:
        lengths.append(length)
        length *= 2
    return tuple(lengths)


@dataclasses.dataclass(frozen=True)
class TopLength:
    """The result of default_top_length: the longest default evaluation length and why the
    doubling stopped there (for the log)."""
    length: int
    reason: str


def default_top_length(l_max: int, document_lengths, *, rows: int, max_length: int = 0,
                       fits=None) -> TopLength:
    """The largest power of two L = 8 l_max * 2^k such that
      - fits(L) is true (the mesh holds the scoring of a [rows, L] batch; None: not checked),
      - at least `rows` validation documents have L + 1 tokens (same-target windows use
        the same documents at every length, so a longer L would use fewer of them),
      - L <= max_length when max_length > 0 (a cap: evaluation time grows with L).
    8 l_max itself is returned even when it fails these (the evaluation's minimum); the
    reason then says which check failed. Every candidate is checked in order, so `fits`
    (which compiles) is called at most once more than the number of lengths kept."""
    document_lengths = sorted((int(n) for n in document_lengths), reverse=True)

    def failure(length: int) -> str | None:
        if max_length and length > max_length:
            return f"{length} > eval.max_length {max_length}"
        enough = len(document_lengths) >= rows and document_lengths[rows - 1] >= length + 1
        if not enough:
            return (f"fewer than eval.batch_size = {rows} validation documents have "
                    f"{length + 1} tokens")
        if fits is not None:
            verdict = fits(length)
            if verdict is not True:
                return verdict
        return None

    length = 8 * l_max
    reason = failure(length)
    if reason is not None:
        return TopLength(length, f"8 l_max kept although {reason}")
    while True:
        reason = failure(2 * length)
        if reason is not None:
            return TopLength(length, f"stopped: {reason}")
        length *= 2


def memory_budget_bytes(devices, budget_mib: float = 0) -> tuple[int, str]:
    """Bytes one device may use while evaluating, and where the figure comes from:
    eval.memory_budget_mib when > 0; else the accelerator's own limit (memory_stats
    bytes_limit); else, on CPU, the host's physical memory shared by its local devices."""
    if budget_mib > 0:
        return int(budget_mib * 2**20), "eval.memory_budget_mib"
    stats = devices[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{devices[0].platform} bytes_limit"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, sum(1 for d in devices if d.process_index == jax.process_index()))
    return physical // local, f"host memory / {local} local devices"


def evaluable(model_config, length: int) -> str | None:
    """None if the model can run at `length`, else the reason it cannot."""
    if model_config.position == "learned" and length > model_config.l_max:
        return (f"learned absolute positions stop at l_max={model_config.l_max}; "
                f"length {length} has no position embedding")
    return None
