"""Reports of evaluation results: plots, markdown summaries and cross-run comparisons.

Reads eval[/<name>]/perplexity_by_length.json (and retrieval.json) as written by
evaluation/suite.py, writes PNG and markdown; no JAX here. Keys other than "lengths" and
"perplexity" may be absent. Not-evaluable lengths are never drawn or tabulated as numbers
('x' markers on plots, "n/e" or their reason in tables). Figures use matplotlib's object
API (no pyplot); the `*_figure` builders return the Figure for inspection.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullLocator

from util.tables import format_table

PERPLEXITY_FILE = "perplexity_by_length.json"
RETRIEVAL_FILE = "retrieval.json"
SUMMARY_FILE = "summary.md"
PERPLEXITY_PNG = "perplexity_by_length.png"
RETRIEVAL_PNG = "retrieval.png"
RULER_FILE = "ruler.json"
RULER_HEATMAP_PNG = "ruler_heatmap.png"
RULER_CURVE_PNG = "ruler_by_length.png"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare_perplexity.png"
NOT_EVALUABLE = "n/e"
LOG_Y_RATIO = 10.0          # log y axis when max / min of the plotted values exceeds this


# ------------------------------------------------------------------ reading
def _read_json(path: str) -> dict:
    """The JSON object in `path`; ValueError (one line) if it is missing or not an object."""
    if not os.path.isfile(path):
        raise ValueError(f"report: {path} does not exist")
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"report: {path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"report: {path} holds a {type(value).__name__}, not a JSON object")
    return value


def load_result(eval_dir: str) -> dict:
    """eval_dir/perplexity_by_length.json as a dict, with "eval_dir" added.
    ValueError if it is missing, malformed, or lacks "lengths" / "perplexity" of equal size."""
    path = os.path.join(eval_dir, PERPLEXITY_FILE)
    result = _read_json(path)
    lengths, ppl = result.get("lengths"), result.get("perplexity")
    if not isinstance(lengths, list) or not isinstance(ppl, list) or len(lengths) != len(ppl):
        raise ValueError(f"report: {path} needs 'lengths' and 'perplexity' lists of equal length")
    result["eval_dir"] = eval_dir
    return result


def load_retrieval(eval_dir: str) -> dict | None:
    """eval_dir/retrieval.json as a dict, or None if there is no such file."""
    path = os.path.join(eval_dir, RETRIEVAL_FILE)
    return _read_json(path) if os.path.isfile(path) else None


def load_ruler(eval_dir: str) -> dict | None:
    """eval_dir/ruler.json as a dict, or None if there is no such file."""
    path = os.path.join(eval_dir, RULER_FILE)
    return _read_json(path) if os.path.isfile(path) else None


def find_results(workdir: str) -> list[dict]:
    """Every perplexity_by_length.json under workdir/eval (eval/ itself and eval/<name>/, at
    any depth), loaded with `load_result` and sorted by name ("" = eval/ first).

    Each dict gets "name" = its directory relative to eval/ ("" for eval/) when the file has
    no non-empty name, and "workdir" = `workdir` (where it was found now, which is what
    labels and comparisons should use even if the run was moved). Returns [] when there are
    no results; ValueError if `workdir` is not a directory."""
    if not os.path.isdir(workdir):
        raise ValueError(f"report: workdir {workdir!r} does not exist or is not a directory")
    root = os.path.join(workdir, "eval")
    results = []
    for directory, _, files in os.walk(root):
        if PERPLEXITY_FILE not in files:
            continue
        result = load_result(directory)
        relative = os.path.relpath(directory, root)
        result["name"] = result.get("name") or ("" if relative == "." else relative)
        result["workdir"] = workdir
        results.append(result)
    return sorted(results, key=lambda r: r["name"])


# ------------------------------------------------------------------ small helpers
def _not_evaluable(result: dict) -> dict[int, str]:
    """{length: reason} of the result's not-evaluable lengths (JSON keys are strings)."""
    return {int(k): str(v) for k, v in (result.get("not_evaluable") or {}).items()}


def _points(lengths, values, exclude=()) -> tuple[list[int], list[float]]:
    """(x, y) pairs with a finite value and a length not in `exclude`, sorted by length."""
    pairs = sorted((int(L), float(v)) for L, v in zip(lengths, values)
                   if v is not None and math.isfinite(float(v)) and int(L) not in exclude)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def format_length(length: int) -> str:
    """Compact tick label: 512 -> "512", 2048 -> "2k", 1048576 -> "1M"."""
    length = int(length)
    if length >= 1 << 20 and length % (1 << 20) == 0:
        return f"{length >> 20}M"
    if length >= 1024 and length % 1024 == 0:
        return f"{length >> 10}k"
    return str(length)


def _format_number(value, digits: int = 3) -> str:
    """Fixed-point number for tables; "inf"/"nan" as such, "" for None."""
    if value is None:
        return ""
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return format_table(header, rows).splitlines()


def scaling_label(rope_scaling) -> str:
    """"linear x4" for {"rope_type": "linear", "factor": 4.0}; "" for None / default."""
    if not isinstance(rope_scaling, dict):
        return ""
    kind = rope_scaling.get("rope_type") or rope_scaling.get("type") or ""
    if kind in ("", "default"):
        return ""
    factor = rope_scaling.get("factor")
    return f"{kind} x{float(factor):g}" if isinstance(factor, (int, float)) else str(kind)


def curve_label(result: dict) -> str:
    """Short label of a result: its name, else its workdir's basename (else "result"),
    then " / <position> positions" unless positions are RoPE (or unknown), then
    " / <rope_type> x<factor>" when RoPE scaling is on. E.g. "tiny / linear x4",
    "ext / learned positions"."""
    workdir = str(result.get("workdir") or "").rstrip("/\\")
    parts = [result.get("name") or os.path.basename(workdir) or "result"]
    position = result.get("position")
    if position and position != "rope":
        parts.append(f"{position} positions")
    scaling = scaling_label(result.get("rope_scaling"))
    if scaling:
        parts.append(scaling)
    return " / ".join(parts)


def unique_labels(results: list[dict]) -> list[str]:
    """curve_label of each result, made unique: a label shared by results of different
    workdirs is prefixed with the workdir's basename ("runA: tiny"); any label still
    repeated gets " #2", " #3", ..."""
    base_labels = [curve_label(r) for r in results]
    labels = list(base_labels)
    for i, result in enumerate(results):
        workdir = os.path.basename(str(result.get("workdir") or "").rstrip("/\\"))
        if base_labels.count(base_labels[i]) > 1 and workdir and result.get("name"):
            labels[i] = f"{workdir}: {base_labels[i]}"
    seen: dict[str, int] = {}
    for i, label in enumerate(list(labels)):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _save(fig: Figure, path: str) -> None:
    """Write `fig` to `path` (PNG by extension), creating the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------ perplexity plot
def _draw_curve(ax, result: dict, label: str, color) -> list[float]:
    """Perplexity line (gid "perplexity:<label>"), its sliding-window line dotted in the same
    colour ("sliding:<label>") and 'x' markers at the top edge for not-evaluable lengths
    ("not_evaluable:<label>"). Returns the plotted y values."""
    skip = _not_evaluable(result)
    xs, ys = _points(result["lengths"], result["perplexity"], exclude=skip)
    ax.plot(xs, ys, "o-", color=color, label=label, gid=f"perplexity:{label}")
    plotted = list(ys)
    window = result.get("sliding_window")
    if window:
        sx, sy = _points(window.get("lengths", []), window.get("perplexity", []), exclude=skip)
        ax.plot(sx, sy, "s:", color=color, markersize=4, label=f"{label} (sliding)",
                gid=f"sliding:{label}")
        plotted += sy
    if skip:
        ax.plot(sorted(skip), [0.97] * len(skip), "x", color=color, markersize=9,
                markeredgewidth=2, linestyle="none", transform=ax.get_xaxis_transform(),
                clip_on=False, label="_nolegend_", gid=f"not_evaluable:{label}")
    return plotted


def _draw_unigram(ax, result: dict) -> list[float]:
    """The result's unigram baseline as a thin grey line (gid "unigram"); its y values."""
    skip = _not_evaluable(result)
    xs, ys = _points(result["lengths"], result.get("unigram_perplexity") or [], exclude=skip)
    if xs:
        ax.plot(xs, ys, "-.", color="0.55", linewidth=1, label="unigram baseline", gid="unigram")
    return ys


def _draw_l_max(ax, results: list[dict]) -> list[int]:
    """One dashed vertical line per distinct l_max (gid "l_max:<value>"), labelled on the
    plot; returns the distinct values."""
    values = sorted({int(r["l_max"]) for r in results if r.get("l_max")})
    for value in values:
        ax.axvline(value, color="0.35", linestyle="--", linewidth=1, gid=f"l_max:{value}",
                   label="_nolegend_")
        ax.text(value, 0.92, f"l_max={format_length(value)} ", rotation=90, fontsize=8,
                color="0.35", transform=ax.get_xaxis_transform(), ha="right", va="top")
    return values


def _add_headroom(ax, fraction: float = 0.12) -> None:
    """Raise the top of the y axis by `fraction` of its span (in its scale), so that the
    not-evaluable markers at the top edge never sit on a data point."""
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log" and low > 0:
        ax.set_ylim(low, high * (high / low) ** fraction)
    else:
        ax.set_ylim(low, high + fraction * (high - low))


def _format_axes(ax, lengths: list[int], values: list[float], headroom: bool) -> None:
    """log2 x axis with ticks at `lengths`; log y axis when the values span > 10x; room at
    the top for the not-evaluable markers when `headroom`."""
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(lengths)
        ax.set_xticklabels([format_length(L) for L in lengths])
        ax.set_xlim(min(lengths) / 1.4, max(lengths) * 1.4)
    ax.xaxis.set_minor_locator(NullLocator())
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_Y_RATIO:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if headroom and values:
        _add_headroom(ax)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="major", alpha=0.3)


def _legend(ax, any_not_evaluable: bool, any_l_max: bool) -> None:
    """Legend of the drawn lines plus notes for the 'x' markers and the l_max lines."""
    handles, labels = ax.get_legend_handles_labels()
    if any_l_max:
        handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=1))
        labels.append("training length l_max")
    if any_not_evaluable:
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="none",
                              markeredgewidth=2))
        labels.append("x: not evaluable (see summary)")
    ax.legend(handles, labels, fontsize=8, loc="best")


def perplexity_figure(curves: list[dict], *, title: str = "", labels: list[str] | None = None,
                      show_unigram: bool = False) -> Figure:
    """The Figure that `plot_perplexity_by_length` saves (see there); `labels` overrides the
    curve labels (default: unique_labels(curves)). Lines carry gids for inspection:
    "perplexity:<label>", "sliding:<label>", "not_evaluable:<label>", "l_max:<value>",
    "unigram". ValueError for an empty `curves`."""
    if not curves:
        raise ValueError("report: no perplexity results to plot")
    labels = labels or unique_labels(curves)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(curves))]
    values = []
    for curve, label, color in zip(curves, labels, colors):
        values += _draw_curve(ax, curve, label, color)
    if show_unigram:
        values += _draw_unigram(ax, curves[0])
    l_max = _draw_l_max(ax, curves)
    lengths = set()
    for curve in curves:
        lengths |= {int(L) for L in curve["lengths"]} | set(_not_evaluable(curve))
        lengths |= {int(L) for L in (curve.get("sliding_window") or {}).get("lengths", [])}
    any_not_evaluable = any(_not_evaluable(c) for c in curves)
    _format_axes(ax, sorted(lengths), values, headroom=any_not_evaluable)
    _legend(ax, any_not_evaluable, bool(l_max))
    ax.set_title(title or "Perplexity by context length")
    return fig


def plot_perplexity_by_length(curves: list[dict], path: str, *, title: str = "",
                              show_unigram: bool = False) -> None:
    """Save a perplexity-vs-length plot of `curves` (perplexity_by_length dicts) to `path`.

    One line per dict, labelled by `curve_label` (made unique); x = context length on a log2
    axis with ticks at every length; y = perplexity, log scale when the plotted values span
    more than 10x. Each distinct l_max is a dashed vertical line. Not-evaluable lengths are
    'x' markers at the top edge in the curve's colour, with a legend note, never a value. A
    dict's "sliding_window" perplexity is drawn dotted in the same colour ("(sliding)").
    With show_unigram, the first dict's unigram baseline is drawn as a thin grey line.
    ValueError for an empty `curves`."""
    _save(perplexity_figure(curves, title=title, show_unigram=show_unigram), path)


# ------------------------------------------------------------------ retrieval heatmap
def retrieval_matrix(grid: dict) -> np.ndarray:
    """A task's accuracy as a [depths, lengths] array (the JSON is [lengths][depths])."""
    accuracy = np.asarray(grid.get("accuracy") or [], dtype=np.float64)
    shape = (len(grid.get("lengths") or []), len(grid.get("depths") or []))
    if accuracy.size == 0:
        return np.zeros(shape[::-1])
    if accuracy.shape != shape:
        raise ValueError(f"report: retrieval task {grid.get('task')!r} accuracy has shape "
                         f"{accuracy.shape}, expected (lengths, depths) = {shape}")
    return accuracy.T


def _draw_heatmap(ax, task: str, grid: dict):
    """One task's depth x length accuracy heatmap with annotated cells; returns the image."""
    matrix = retrieval_matrix(grid)
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                      origin="upper", interpolation="nearest")
    lengths, depths = grid.get("lengths") or [], grid.get("depths") or []
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([format_length(L) for L in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("answer depth")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="black" if value > 0.6 else "white")
    k_max = grid.get("k_max")
    ax.set_title(f"{task}: k_max = {format_length(k_max) if k_max else 'none'}", fontsize=10)
    return image


def retrieval_figure(retrieval: dict) -> Figure:
    """The Figure that `plot_retrieval_heatmap` saves: one subplot per task (sorted), each
    holding one AxesImage of shape [len(depths), len(lengths)]. ValueError without tasks."""
    tasks = retrieval.get("tasks") or {}
    if not tasks:
        raise ValueError("report: retrieval results have no tasks to plot")
    widths = [max(3.5, 0.55 * len(g.get("lengths") or []) + 1.8) for g in tasks.values()]
    fig = Figure(figsize=(sum(widths) + 1.0, 5.0), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    images = [_draw_heatmap(ax, task, tasks[task]) for ax, task in zip(axes, sorted(tasks))]
    fig.colorbar(images[-1], ax=list(axes), label="exact-match accuracy", shrink=0.9)
    threshold = retrieval.get("threshold")
    if threshold is not None:
        fig.suptitle(f"Retrieval accuracy (k_max: longest length with every shorter one "
                     f">= {threshold:g})", fontsize=10)
    return fig


def plot_retrieval_heatmap(retrieval: dict, path: str) -> None:
    """Save one accuracy heatmap per retrieval task to `path`: rows = answer depth 0%..100%
    (top to bottom), columns = lengths (evenly spaced, i.e. log2 for power-of-two lengths),
    every cell annotated, colour scale fixed to 0..1, k_max in each subplot title.
    ValueError if `retrieval` has no tasks or a task's accuracy has the wrong shape."""
    _save(retrieval_figure(retrieval), path)


# ------------------------------------------------------------------ RULER
def _ruler_lengths(ruler: dict) -> list[int]:
    return sorted(int(L) for L in (ruler.get("mean") or {}))


def ruler_matrix(ruler: dict) -> tuple[list[str], list[int], np.ndarray]:
    """(tasks, lengths, scores [tasks, lengths] with NaN where not scored)."""
    tasks = list(ruler.get("tasks") or {})
    lengths = _ruler_lengths(ruler)
    matrix = np.full((len(tasks), len(lengths)), np.nan)
    for i, task in enumerate(tasks):
        for j, L in enumerate(lengths):
            value = ruler["tasks"][task].get(str(L))
            if value is not None:
                matrix[i, j] = value
    return tasks, lengths, matrix


def ruler_heatmap_figure(ruler: dict) -> Figure:
    """Task x length heatmap of RULER scores (0..100), cells annotated, blank = not scored."""
    tasks, lengths, matrix = ruler_matrix(ruler)
    fig = Figure(figsize=(max(4.0, 0.8 * len(lengths) + 3.0), max(2.5, 0.4 * len(tasks) + 1.5)),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=100.0, cmap="viridis",
                      aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([format_length(L) for L in lengths])
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks)
    ax.set_xlabel("context length (tokens)")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, "-" if math.isnan(value) else f"{value:.0f}", ha="center",
                va="center", fontsize=7, color="black" if value > 60 else "white")
    fig.colorbar(image, ax=ax, label="score")
    ax.set_title("RULER score by task and length", fontsize=10)
    return fig


def ruler_curve_figure(ruler: dict) -> Figure:
    """Mean RULER score over tasks by length, with the threshold line."""
    lengths = _ruler_lengths(ruler)
    points = [(L, ruler["mean"][str(L)]) for L in lengths if ruler["mean"][str(L)] is not None]
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="mean")
    threshold = ruler.get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", label=f"threshold {threshold:g}")
    if lengths:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_length(int(v))))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, 100)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("mean score over tasks")
    effective = ruler.get("effective_length")
    ax.set_title(f"RULER: effective length "
                 f"{format_length(effective) if effective else 'none'}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _ruler_lines(ruler: dict | None) -> list[str]:
    """The RULER section of summary.md, or nothing without ruler.json."""
    if not ruler:
        return []
    tasks, lengths, matrix = ruler_matrix(ruler)

    def cell(v):
        return "" if math.isnan(v) else f"{v:.1f}"

    rows = [[t] + [cell(v) for v in matrix[i]] for i, t in enumerate(tasks)]
    rows.append(["**mean**"] + [_format_number(ruler["mean"][str(L)], 3) for L in lengths])
    effective = ruler.get("effective_length")
    lines = ["## RULER", "",
             f"Effective length: {effective if effective is not None else 'none'} (longest "
             f"length with the mean score > {ruler.get('threshold')} there and at every "
             f"shorter length)", ""]
    lines += _table_lines(["task \\ length"] + [str(L) for L in lengths], rows) + [""]
    for key, reason in sorted((ruler.get("skipped") or {}).items()):
        lines.append(f"- skipped {key}: {reason}")
    return lines + [""]


def _ruler_comparison_lines(results: list[dict], labels: list[str]) -> list[str]:
    """RULER means by length and effective lengths side by side, when any result has them."""
    found = [(label, load_ruler(r["eval_dir"])) for r, label in zip(results, labels)
             if r.get("eval_dir")]
    found = [(label, ruler) for label, ruler in found if ruler]
    if not found:
        return []
    lengths = sorted({L for _, ruler in found for L in _ruler_lengths(ruler)})
    rows = [[label, str(ruler.get("effective_length"))]
            + [_format_number((ruler.get("mean") or {}).get(str(L)), 3) for L in lengths]
            for label, ruler in found]
    return (["## RULER mean score by length", ""]
            + _table_lines(["run", "effective length"] + [str(L) for L in lengths], rows)
            + [""])


# ------------------------------------------------------------------ markdown summary
def _header_lines(result: dict) -> list[str]:
    """Title and the run's metadata (only the keys present)."""
    lines = [f"# Evaluation: {curve_label(result)}", ""]
    for key in ("workdir", "step", "l_max", "position", "rope_theta"):
        if result.get(key) is not None:
            lines.append(f"- {key}: {result[key]}")
    if result.get("rope_scaling"):
        lines.append(f"- rope_scaling: `{json.dumps(result['rope_scaling'], sort_keys=True)}`")
    return lines + [""]


def perplexity_table(result: dict) -> str:
    """Table length | loss | perplexity | sliding-window perplexity | unigram baseline |
    target tokens over every length (evaluated, sliding or not evaluable), ascending; the
    console and summary.md print it."""
    skip = _not_evaluable(result)
    n = len(result["lengths"])
    columns = {key: dict(zip(result["lengths"], result.get(key) or [None] * n))
               for key in ("loss", "perplexity", "unigram_perplexity", "target_tokens")}
    window = result.get("sliding_window") or {}
    sliding = dict(zip(window.get("lengths", []), window.get("perplexity", [])))
    lengths = sorted({int(L) for L in result["lengths"]} | set(sliding) | set(skip))
    rows = []
    for L in lengths:
        if L in skip:
            rows.append([str(L), f"not evaluable: {skip[L]}"])
            continue
        tokens = columns["target_tokens"].get(L)
        rows.append([str(L), _format_number(columns["loss"].get(L), 4),
                     _format_number(columns["perplexity"].get(L)), _format_number(sliding.get(L)),
                     _format_number(columns["unigram_perplexity"].get(L)),
                     "" if tokens is None else str(tokens)])
    return format_table(["length", "loss", "perplexity", "sliding-window perplexity",
                         "unigram baseline", "target tokens"], rows)


def _perplexity_lines(result: dict) -> list[str]:
    """The perplexity_table section of summary.md, with its notes."""
    window = result.get("sliding_window") or {}
    lines = ["## Perplexity by context length", ""] + perplexity_table(result).splitlines()
    notes = []
    if window.get("stride"):
        notes.append(f"sliding window stride {window['stride']}")
    if result.get("l_max"):
        notes.append(f"lengths above l_max = {result['l_max']} are extrapolation")
    return lines + ([""] + ["; ".join(notes).capitalize() + "."] if notes else []) + [""]


def _position_lines(result: dict) -> list[str]:
    """Loss-by-position bucket table, or nothing when absent."""
    buckets = result.get("loss_by_position")
    if not buckets:
        return []
    rows = [[f"[{s}, {e})", _format_number(loss, 4),
             _format_number(math.exp(loss) if loss < 700 else math.inf), str(tokens)]
            for s, e, loss, tokens in zip(buckets["bucket_start"], buckets["bucket_end"],
                                          buckets["loss"], buckets["tokens"])]
    lines = [f"## Loss by token position (windows of {buckets.get('length', '?')} tokens)", ""]
    return lines + _table_lines(["positions", "mean loss", "perplexity", "tokens"], rows) + [""]


def _retrieval_task_lines(task: str, grid: dict) -> list[str]:
    """Depth x length accuracy table of one task (with length and depth means, computed from
    the accuracy when the JSON lacks them) and k_max."""
    lengths, depths = grid.get("lengths") or [], grid.get("depths") or []
    matrix = retrieval_matrix(grid)
    depth_mean = grid.get("depth_accuracy") or list(matrix.mean(axis=1))
    length_mean = grid.get("length_accuracy") or list(matrix.mean(axis=0))
    rows = [[f"{100 * d:.0f}%"] + [f"{v:.2f}" for v in matrix[i]]
            + [_format_number(depth_mean[i], 2)] for i, d in enumerate(depths)]
    rows.append(["**mean**"] + [_format_number(v, 2) for v in length_mean] + [""])
    k_max = grid.get("k_max")
    lines = [f"### {task}", "",
             f"k_max = {k_max if k_max is not None else 'none (the shortest length fails)'}"
             f" (threshold {grid.get('threshold', '?')}, "
             f"{grid.get('samples_per_cell', '?')} samples per cell)", ""]
    return lines + _table_lines(["depth \\ length"] + [str(L) for L in lengths] + ["mean"],
                                   rows) + [""]


def _retrieval_lines(retrieval: dict | None) -> list[str]:
    """Section of all retrieval tasks (sorted), or nothing without retrieval results."""
    if not retrieval:
        return []
    lines = ["## Retrieval accuracy (exact match, depth x length)", ""]
    for task in sorted(retrieval.get("tasks") or {}):
        lines += _retrieval_task_lines(task, retrieval["tasks"][task])
    for length, reason in sorted(_not_evaluable(retrieval).items()):
        lines.append(f"- length {length}: not evaluable: {reason}")
    return lines


def summary_markdown(result: dict, retrieval: dict | None = None,
                     ruler: dict | None = None) -> str:
    """The markdown that `write_summary` writes, from already-loaded dicts."""
    lines = (_header_lines(result) + _perplexity_lines(result) + _position_lines(result)
             + _retrieval_lines(retrieval) + _ruler_lines(ruler))
    return "\n".join(lines).rstrip() + "\n"


def write_summary(eval_dir: str) -> str:
    """Read eval_dir/perplexity_by_length.json (and retrieval.json if present), write
    eval_dir/summary.md and return its markdown: run metadata; perplexity_table (one row
    per length, not-evaluable rows with their reason); the loss-by-position bucket table when
    present; per retrieval task its k_max and a depth x length accuracy table.
    ValueError if perplexity_by_length.json is missing or malformed."""
    markdown = summary_markdown(load_result(eval_dir), load_retrieval(eval_dir),
                                load_ruler(eval_dir))
    with open(os.path.join(eval_dir, SUMMARY_FILE), "w") as f:
        f.write(markdown)
    return markdown


def write_plots(eval_dir: str) -> list[str]:
    """Write eval_dir/perplexity_by_length.png (the single curve with its unigram baseline)
    and, when retrieval.json has tasks, eval_dir/retrieval.png; return the paths written.
    ValueError if perplexity_by_length.json is missing or malformed."""
    result = load_result(eval_dir)
    step = f" (step {result['step']})" if result.get("step") is not None else ""
    paths = [os.path.join(eval_dir, PERPLEXITY_PNG)]
    plot_perplexity_by_length([result], paths[0], show_unigram=True,
                              title=f"Perplexity by context length: {curve_label(result)}{step}")
    retrieval = load_retrieval(eval_dir)
    if retrieval and retrieval.get("tasks"):
        paths.append(os.path.join(eval_dir, RETRIEVAL_PNG))
        plot_retrieval_heatmap(retrieval, paths[1])
    ruler = load_ruler(eval_dir)
    if ruler and ruler.get("mean"):
        paths += [os.path.join(eval_dir, RULER_HEATMAP_PNG),
                  os.path.join(eval_dir, RULER_CURVE_PNG)]
        _save(ruler_heatmap_figure(ruler), paths[-2])
        _save(ruler_curve_figure(ruler), paths[-1])
    return paths


# ------------------------------------------------------------------ comparison
def _collect(workdirs: list[str]) -> list[dict]:
    """All results of all workdirs, in order; ValueError (one line) for no workdirs, a
    missing workdir or a workdir without results."""
    if not workdirs:
        raise ValueError("report: compare needs at least one workdir")
    results = []
    for workdir in workdirs:
        found = find_results(workdir)
        if not found:
            raise ValueError(f"report: workdir {workdir!r} has no "
                             f"eval/**/{PERPLEXITY_FILE} (run the evaluation first)")
        results += found
    return results


def _comparison_row(result: dict, lengths: list[int], values: dict) -> list[str]:
    """Cells over `lengths`: the value, "n/e" where not evaluable, "" where not evaluated."""
    skip = _not_evaluable(result)
    return [NOT_EVALUABLE if L in skip else _format_number(values.get(L)) for L in lengths]


def comparison_markdown(results: list[dict], labels: list[str]) -> str:
    """Markdown comparing `results`: perplexity table (rows = labels, columns = union of
    lengths incl. not-evaluable ones; "" = not evaluated, "n/e" = not evaluable), a
    sliding-window table if any result has one, and the reasons for "n/e"."""
    lengths = sorted({int(L) for r in results for L in r["lengths"]}
                     | {L for r in results for L in _not_evaluable(r)})
    rows = [[label, str(r.get("l_max") or "")]
            + _comparison_row(r, lengths, dict(zip(r["lengths"], r["perplexity"])))
            for r, label in zip(results, labels)]
    lines = ["# Perplexity by context length", ""]
    lines += _table_lines(["run", "l_max"] + [str(L) for L in lengths], rows) + [""]
    windows = [(r, label, r.get("sliding_window")) for r, label in zip(results, labels)]
    windows = [(r, label, w) for r, label, w in windows if w]
    if windows:
        s_lengths = sorted({int(L) for _, _, w in windows for L in w.get("lengths", [])})
        s_rows = [[label] + _comparison_row(r, s_lengths, dict(zip(w["lengths"], w["perplexity"])))
                  for r, label, w in windows]
        lines += ["## Sliding-window perplexity", ""]
        lines += _table_lines(["run"] + [str(L) for L in s_lengths], s_rows) + [""]
    reasons = [f"- {label}, length {L}: {reason}" for r, label in zip(results, labels)
               for L, reason in sorted(_not_evaluable(r).items())]
    if reasons:
        lines += [f"{NOT_EVALUABLE} = not evaluable:", ""] + reasons + [""]
    lines += _ruler_comparison_lines(results, labels)
    return "\n".join(lines).rstrip() + "\n"


def compare(workdirs: list[str], out_dir: str | None = None) -> str:
    """Compare every result (find_results) of every workdir and return the markdown (see
    comparison_markdown; rows = unique curve labels). With `out_dir`, also write
    out_dir/compare.md and the perplexity-vs-length plot out_dir/compare_perplexity.png.
    ValueError (one line) for an empty list, a missing workdir or one without results."""
    results = _collect(workdirs)
    labels = unique_labels(results)
    markdown = comparison_markdown(results, labels)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        _save(perplexity_figure(results, labels=labels), os.path.join(out_dir, COMPARE_PNG))
        with open(os.path.join(out_dir, COMPARE_MD), "w") as f:
            f.write(markdown)
    return markdown
