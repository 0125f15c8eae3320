"""Evaluation by context length: perplexity, sliding-window perplexity, loss by position,
and retrieval accuracy by depth x length.

Protocols
- Perplexity by length ("same targets"): validation documents at least max(lengths) + 1
  tokens long; for every length L the window is the L tokens that end at the document's
  end, and only the last `score_tokens` targets are scored. The scored tokens are the same
  at every L, so only the amount of context changes.
- Sliding window (the protocol of the Position Interpolation and YaRN papers): windows of
  L tokens move over each document by `stride`; each window scores the targets the previous
  window did not (all of them for the first).
- Loss by position: the longest same-target windows with every target scored, averaged in
  log2 buckets of the token position ([1, 2), [2, 4), ...).
- Retrieval (train/retrieval.py): passkey, key-value and line retrieval samples on a grid
  of depth x length, scored by teacher-forced exact match and answer log-likelihood.
Lengths a model cannot run (learned positions beyond l_max) are reported as not evaluable
with the reason. All metrics are reductions on the host of per-token scores computed on
the mesh by `score_rows`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train import data as data_lib
from train import retrieval as retrieval_lib
from train.loss import token_scores

DEPTHS = tuple(i / 10 for i in range(11))   # 0%, 10%, ..., 100%


# ------------------------------------------------------------------ lengths
def evaluation_lengths(config, top: int | None = None) -> tuple[int, ...]:
    """eval.lengths if set; else powers of two from l_max / 2 up to max(8 l_max, top).

    `top` is the probed longest length (default_top_length); None: 8 l_max."""
    if config.eval.lengths:
        return tuple(sorted(int(x) for x in config.eval.lengths))
    l_max = config.curriculum.l_max
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


def scoring_bytes(run, abstract_params, rows: int, length: int) -> int:
    """Bytes one device holds while scoring a [rows, length] batch on run's mesh (arguments
    + outputs + temporaries - aliased, from compile().memory_analysis())."""
    sharding = mesh_lib.batch_sharding(run.mesh)
    batch = {key: jax.ShapeDtypeStruct((rows, length), dtype, sharding=sharding)
             for key, dtype in (("tokens", np.int32), ("targets", np.int32),
                                ("positions", np.int32), ("segment_ids", np.int32),
                                ("loss_mask", np.float32))}
    with mesh_lib.use_mesh(run.mesh):
        analysis = score_function(run).lower(abstract_params, batch).compile().memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def memory_fits(run, abstract_params, rows: int, budget: int):
    """fits(length) for default_top_length: True, or why the scoring does not fit."""
    def fits(length: int):
        needed = scoring_bytes(run, abstract_params, rows, length)
        if needed <= budget:
            return True
        return (f"scoring [{rows}, {length}] needs {needed / 2**20:.0f} MiB per device, "
                f"over the budget of {budget / 2**20:.0f} MiB")
    return fits


def evaluable(model_config, length: int) -> str | None:
    """None if the model can run at `length`, else the reason it cannot."""
    if model_config.position == "learned" and length > model_config.l_max:
        return (f"learned absolute positions stop at l_max={model_config.l_max}; "
                f"length {length} has no position embedding")
    return None


# ------------------------------------------------------------------ rows (pure numpy)
def _rows(tokens, targets, loss_mask, segment_ids=None):
    """A dict of [n, L] rows with positions 0..L-1 (row-wise) from stacked inputs."""
    n, length = tokens.shape
    if segment_ids is None:
        segment_ids = np.ones((n, length), np.int32)
    positions = np.where(segment_ids > 0, np.arange(length, dtype=np.int32)[None], 0)
    return {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            "positions": positions.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
            "loss_mask": loss_mask.astype(np.float32)}


def same_target_windows(documents, lengths, score_tokens: int, max_windows: int) -> dict:
    """{L: rows [n, L]} ending at each document's end; the last `score_tokens` targets scored.

    Uses the documents (int token arrays) with at least max(lengths) + 1 tokens, at most
    `max_windows` of them (0: all). Raises ValueError if there is none.
    """
    longest = max(lengths)
    usable = [d for d in documents if len(d) >= longest + 1]
    if max_windows:
        usable = usable[:max_windows]
    if not usable:
        raise ValueError(f"no validation document has {longest + 1} tokens, which the "
                         f"longest evaluation length {longest} needs; lower eval.lengths")
    if not 0 < score_tokens <= min(lengths):
        raise ValueError(f"eval.score_tokens ({score_tokens}) must be in 1..{min(lengths)}")
    windows = {}
    for length in lengths:
        tokens = np.stack([d[len(d) - 1 - length:len(d) - 1] for d in usable])   # [n, L]
        targets = np.stack([d[len(d) - length:] for d in usable])
        loss_mask = np.zeros(tokens.shape, np.float32)
        loss_mask[:, -score_tokens:] = 1.0
        windows[length] = _rows(tokens, targets, loss_mask)
    return windows


def sliding_windows(documents, length: int, stride: int, max_windows: int) -> dict:
    """Rows [n, length] of the sliding-window protocol (stride `stride`); each window scores
    only targets no earlier window scored. Short tails are padded (segment 0, no loss)."""
    tokens, targets, masks, segments = [], [], [], []
    for doc in documents:
        inputs_end = len(doc) - 1                        # inputs are doc[:-1], targets doc[1:]
        scored_until = 0
        for begin in range(0, max(inputs_end, 1), stride):
            end = min(begin + length, inputs_end)
            n = end - begin
            row = np.zeros((4, length), np.int64)
            row[0, :n], row[1, :n] = doc[begin:end], doc[begin + 1:end + 1]
            row[2, :n] = np.arange(begin, end) >= scored_until
            row[3, :n] = 1
            tokens.append(row[0]); targets.append(row[1]); masks.append(row[2]); segments.append(row[3])
            scored_until = end
            if end == inputs_end or (max_windows and len(tokens) >= max_windows):
                break
        if max_windows and len(tokens) >= max_windows:
            break
    if not tokens:
        raise ValueError("the validation split has no document with 2 tokens")
    return _rows(np.stack(tokens), np.stack(targets), np.stack(masks).astype(np.float32),
                 np.stack(segments))


def batches_of(rows: dict, batch_size: int) -> list[dict]:
    """Split [n, L] rows into batches of `batch_size`; the last is padded with empty rows."""
    n = len(rows["tokens"])
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        missing = batch_size - len(batch["tokens"])
        if missing:
            batch = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        out.append(batch)
    return out


def position_buckets(nll, loss_mask) -> dict:
    """Mean loss per log2 bucket of the (1-based) token position: [1, 2), [2, 4), ..."""
    length = nll.shape[1]
    starts, ends, losses, counts = [], [], [], []
    start = 1
    while start <= length:
        end = min(2 * start, length + 1)
        cols = slice(start - 1, end - 1)
        count = float(loss_mask[:, cols].sum())
        starts.append(start); ends.append(end)
        losses.append(float((nll[:, cols] * loss_mask[:, cols]).sum() / max(count, 1.0)))
        counts.append(int(count))
        start *= 2
    return {"length": length, "bucket_start": starts, "bucket_end": ends, "loss": losses,
            "tokens": counts}


def unigram_perplexity_of_targets(batches, vocab_size: int) -> float:
    """Baseline: perplexity of the best context-free model on exactly the scored targets,
    i.e. exp(entropy) of their own unigram distribution (an oracle: it is fitted to the
    very tokens it scores). A model that has learned anything from context is below it."""
    counts = np.zeros(vocab_size, np.float64)
    for batch in batches:
        real = batch["loss_mask"] > 0
        counts += np.bincount(batch["targets"][real], minlength=vocab_size)[:vocab_size]
    if counts.sum() == 0:
        return float("nan")
    probs = counts[counts > 0] / counts.sum()
    return float(math.exp(-np.sum(probs * np.log(probs))))


# ------------------------------------------------------------------ what to evaluate
@dataclasses.dataclass
class EvalData:
    """Host-side batches (global rows), built once and reused at every evaluation."""
    lengths: list[int]                       # evaluable lengths
    not_evaluable: dict[str, str]
    windows: dict[int, list[dict]]           # same-target batches per length
    sliding: dict[int, list[dict]]           # sliding-window batches per length
    retrieval: dict[str, tuple[list, dict[int, list[dict]]]]  # task -> (samples, batches per length)
    retrieval_not_evaluable: dict[str, str]


def validation_documents(config, tokenizer) -> list[np.ndarray]:
    """The validation split as int64 token arrays, in order."""
    return [np.asarray(tokenizer.encode(text), np.int64)
            for text in data_lib.list_documents(config.data, "validation")]


def build_eval_data(config, model_config, tokenizer, *, full: bool = True,
                    top_length: int | None = None, documents=None) -> EvalData:
    """The evaluation batches for `config.eval`; with full=False only the same-target
    perplexity (the cheap check run during training). top_length: the probed longest
    default length (evaluation_lengths); documents: validation_documents, if already read."""
    e = config.eval
    lengths = evaluation_lengths(config, top_length)
    not_evaluable = {str(L): r for L in lengths if (r := evaluable(model_config, L))}
    lengths = [L for L in lengths if str(L) not in not_evaluable]
    if documents is None:
        documents = validation_documents(config, tokenizer)
    windows, sliding = {}, {}
    if lengths:
        score_tokens = e.score_tokens or min(lengths)
        rows = same_target_windows(documents, lengths, score_tokens, e.max_batches * e.batch_size)
        windows = {L: batches_of(r, e.batch_size) for L, r in rows.items()}
        if full and e.sliding_stride:
            for L in lengths:
                r = sliding_windows(documents, L, min(e.sliding_stride, L), e.sliding_max_windows)
                sliding[L] = batches_of(r, e.batch_size)
    retrieval, retrieval_not_evaluable = {}, {}
    if full and e.retrieval_tasks:
        r_lengths = sorted(e.retrieval_lengths or lengths)
        retrieval_not_evaluable = {str(L): r for L in r_lengths if (r := evaluable(model_config, L))}
        r_lengths = [L for L in r_lengths if str(L) not in retrieval_not_evaluable]
        for task in e.retrieval_tasks:
            samples = retrieval_lib.make_grid(task, tokenizer, lengths=r_lengths, depths=DEPTHS,
                                              samples_per_cell=e.retrieval_samples, seed=config.seed)
            by_length = {L: batches_of(retrieval_lib.teacher_forced_batch(
                [s for s in samples if s.length == L], L), e.batch_size) for L in r_lengths}
            retrieval[task] = (samples, by_length)
    return EvalData(lengths, not_evaluable, windows, sliding, retrieval, retrieval_not_evaluable)


# ------------------------------------------------------------------ scoring on the mesh
def score_function(run):
    """jit((params, batch) -> (nll, is_argmax)) on run's mesh, weights gathered for compute
    like the train step (parallel.mesh.compute_shardings)."""
    gathered = mesh_lib.compute_shardings(run.state_shardings["params"])
    return jax.jit(lambda p, b: token_scores(
        run.graphdef, jax.lax.with_sharding_constraint(p, gathered), b))


class Scorer:
    """Per-token scores of global host batches on `run`'s mesh, back on the host in the
    original token order. One compiled function per shape."""

    def __init__(self, run, params):
        self.run, self.params = run, params
        self._score = score_function(run)

    def __call__(self, batch: dict):
        run = self.run
        rows, length = batch["tokens"].shape
        seq = run.mesh.shape["seq"]
        layout = run.config.mesh.layout
        _, _, local_rows, offset = mesh_lib.data_shard(run.mesh, rows, length)
        local = {k: v[offset:offset + local_rows] for k, v in batch.items()}
        local = layout_lib.apply_layout(local, layout, seq)
        device_batch = mesh_lib.host_batch_to_global(local, run.mesh, rows, row_offset=offset)
        with mesh_lib.use_mesh(run.mesh):
            nll, is_argmax = self._score(self.params, device_batch)
        nll, is_argmax = multihost_utils.process_allgather((nll, is_argmax), tiled=True)
        if layout == "zigzag" and seq > 1:
            restored = layout_lib.from_zigzag({"nll": np.asarray(nll), "hit": np.asarray(is_argmax)}, seq)
            nll, is_argmax = restored["nll"], restored["hit"]
        return np.asarray(nll, np.float64), np.asarray(is_argmax)


class Progress:
    """A one-line progress bar on process 0's console."""

    def __init__(self, total: int, label: str = "eval"):
        self.total, self.done, self.label = total, 0, label
        self.enabled = jax.process_index() == 0 and total > 0

    def advance(self, what: str = "") -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stdout.write(f"\r[{self.label}] [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total} {what:<24}")
            if self.done == self.total:
                sys.stdout.write("\n")
            sys.stdout.flush()


def _mean_loss(scorer, batches, progress, what) -> tuple[float, int, np.ndarray | None]:
    nll_sum, count, per_token = 0.0, 0.0, []
    for batch in batches:
        nll, _ = scorer(batch)
        nll_sum += float((nll * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
        per_token.append(nll)
        progress.advance(what)
    return nll_sum / max(count, 1.0), int(count), np.concatenate(per_token)


def evaluate(run, params, data: EvalData, *, step: int | None = None, name: str = "") -> dict:
    """Run every evaluation in `data`; returns {"perplexity_by_length": {...},
    "retrieval": {...} or None}."""
    scorer = Scorer(run, params)
    total = (sum(len(b) for b in data.windows.values()) + sum(len(b) for b in data.sliding.values())
             + sum(len(b) for _, by_len in data.retrieval.values() for b in by_len.values()))
    progress = Progress(total)
    mc = run.model_config
    result = {"name": name, "step": step, "l_max": mc.l_max, "position": mc.position,
              "rope_theta": mc.rope_theta, "rope_scaling": mc.rope_scaling,
              "lengths": [], "perplexity": [], "loss": [], "target_tokens": [],
              "unigram_perplexity": [], "not_evaluable": dict(data.not_evaluable)}
    for length in data.lengths:
        loss, count, _ = _mean_loss(scorer, data.windows[length], progress, f"length {length}")
        result["lengths"].append(length)
        result["loss"].append(loss)
        result["perplexity"].append(math.exp(loss))
        result["target_tokens"].append(count)
        result["unigram_perplexity"].append(
            unigram_perplexity_of_targets(data.windows[length], mc.vocab_size))
    if data.sliding:
        sliding = {"stride": run.config.eval.sliding_stride, "lengths": [], "perplexity": [],
                   "target_tokens": []}
        for length, batches in data.sliding.items():
            loss, count, _ = _mean_loss(scorer, batches, progress, f"sliding {length}")
            sliding["lengths"].append(length)
            sliding["perplexity"].append(math.exp(loss))
            sliding["target_tokens"].append(count)
        result["sliding_window"] = sliding
        # loss by position: the longest windows with every real target scored
        longest = max(data.lengths)
        full = [dict(b, loss_mask=(b["segment_ids"] > 0).astype(np.float32))
                for b in data.windows[longest]]
        _, _, nll = _mean_loss(scorer, full, Progress(0), "")
        mask = np.concatenate([b["loss_mask"] for b in full])
        result["loss_by_position"] = position_buckets(nll, mask)
    retrieval = None
    if data.retrieval:
        threshold = run.config.eval.retrieval_threshold
        retrieval = {"threshold": threshold, "tasks": {},
                     "not_evaluable": dict(data.retrieval_not_evaluable)}
        for task, (samples, by_length) in data.retrieval.items():
            exact, logprob = [], []
            for length, batches in by_length.items():
                n = sum(1 for s in samples if s.length == length)
                hits, lps = [], []
                for batch in batches:
                    nll, is_argmax = scorer(batch)
                    scored = retrieval_lib.score_answers(-nll, is_argmax, batch["answer_mask"])
                    hits.append(scored["exact_match"]); lps.append(scored["answer_logprob"])
                    progress.advance(f"{task} {length}")
                exact.append(np.concatenate(hits)[:n]); logprob.append(np.concatenate(lps)[:n])
            # samples are ordered by length, then depth, then sample: same as the batches
            retrieval["tasks"][task] = retrieval_lib.summarise_grid(
                samples, np.concatenate(exact), np.concatenate(logprob), threshold=threshold)
    return {"perplexity_by_length": result, "retrieval": retrieval}


# ------------------------------------------------------------------ outputs
def scalars(outcome: dict) -> dict[str, float]:
    """Flat scalars for metrics.jsonl / TensorBoard."""
    result = outcome["perplexity_by_length"]
    out = {}
    for length, ppl, loss in zip(result["lengths"], result["perplexity"], result["loss"]):
        out[f"perplexity_{length}"] = ppl
        out[f"loss_{length}"] = loss
    sliding = result.get("sliding_window")
    if sliding:
        for length, ppl in zip(sliding["lengths"], sliding["perplexity"]):
            out[f"sliding_perplexity_{length}"] = ppl
    for task, grid in ((outcome.get("retrieval") or {}).get("tasks") or {}).items():
        for length, accuracy in zip(grid["lengths"], grid["length_accuracy"]):
            out[f"retrieval_{task}_{length}"] = accuracy
        if grid["k_max"] is not None:
            out[f"retrieval_{task}_k_max"] = grid["k_max"]
    return out


def format_table(result: dict) -> str:
    window = result.get("sliding_window") or {}
    sliding = dict(zip(window.get("lengths", []), window.get("perplexity", [])))
    lines = ["length | loss   | perplexity | sliding ppl | unigram baseline | target tokens",
             "-------|--------|------------|-------------|------------------|--------------"]
    for length, loss, ppl, unigram, n in zip(result["lengths"], result["loss"],
                                             result["perplexity"], result["unigram_perplexity"],
                                             result["target_tokens"]):
        slide = f"{sliding[length]:>11.3f}" if length in sliding else f"{'-':>11}"
        lines.append(f"{length:>6} | {loss:.4f} | {ppl:>10.3f} | {slide} | {unigram:>16.3f} | {n}")
    for length, reason in result.get("not_evaluable", {}).items():
        lines.append(f"{length:>6} | not evaluable: {reason}")
    return "\n".join(lines)


def eval_directory(workdir: str, name: str = "") -> str:
    return os.path.join(workdir, "eval", name) if name else os.path.join(workdir, "eval")


def write_results(outcome: dict, eval_dir: str, is_writer: bool = True) -> None:
    """perplexity_by_length.json/.csv, retrieval.json, PNG plots and summary.md."""
    if not is_writer:
        return
    os.makedirs(eval_dir, exist_ok=True)
    result = outcome["perplexity_by_length"]
    with open(os.path.join(eval_dir, "perplexity_by_length.json"), "w") as f:
        json.dump(result, f, indent=2)
    window = result.get("sliding_window") or {}
    sliding = dict(zip(window.get("lengths", []), window.get("perplexity", [])))
    with open(os.path.join(eval_dir, "perplexity_by_length.csv"), "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["length", "loss", "perplexity", "sliding_window_perplexity",
                        "unigram_perplexity", "target_tokens"])
        for row in zip(result["lengths"], result["loss"], result["perplexity"],
                       [sliding.get(L, "") for L in result["lengths"]],
                       result["unigram_perplexity"], result["target_tokens"]):
            table.writerow(row)
    if outcome.get("retrieval"):
        with open(os.path.join(eval_dir, "retrieval.json"), "w") as f:
            json.dump(outcome["retrieval"], f, indent=2)
    from train import report  # matplotlib only where files are written
    report.write_plots(eval_dir)
    report.write_summary(eval_dir)
