"""Perplexity by context length (same targets), sliding-window perplexity, loss by position.

Protocols (docs/evaluation.md): same-target windows end at each document's end and score
its last targets at every length, so only the context changes; sliding windows score each
target once; loss by position averages the longest windows' losses in log2 buckets.
Inputs are host batches (data/windows.py) scored by a Scorer (scoring.py).
"""
from __future__ import annotations

import math

import numpy as np


def position_buckets(nll, loss_mask) -> dict:
    """Mean loss per log2 bucket of the (1-based) token position: [1, 2), [2, 4), ..."""
    length = nll.shape[1]
    starts, ends, losses, counts = [], [], [], []
    start = 1
    while start <= length:
        end = min(2 * start, length + 1)
        cols = slice(start - 1, end - 1)
        count = float(loss_mask[:, cols].sum())
        starts.append(start)
        ends.append(end)
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


def _mean_loss(scorer, batches, progress, what) -> tuple[float, int, np.ndarray | None]:
    nll_sum, count, per_token = 0.0, 0.0, []
    for batch in batches:
        nll, _ = scorer(batch)
        nll_sum += float((nll * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
        per_token.append(nll)
        progress.advance(what)
    return nll_sum / max(count, 1.0), int(count), np.concatenate(per_token)


def same_target_perplexity(scorer, windows: dict, progress, vocab_size: int) -> dict:
    """{"lengths", "loss", "perplexity", "target_tokens", "unigram_perplexity"}: one entry
    per length of `windows` ({length: batches})."""
    out = {"lengths": [], "perplexity": [], "loss": [], "target_tokens": [],
           "unigram_perplexity": []}
    for length, batches in windows.items():
        loss, count, _ = _mean_loss(scorer, batches, progress, f"length {length}")
        out["lengths"].append(length)
        out["loss"].append(loss)
        out["perplexity"].append(math.exp(loss))
        out["target_tokens"].append(count)
        out["unigram_perplexity"].append(unigram_perplexity_of_targets(batches, vocab_size))
    return out


def sliding_window_perplexity(scorer, sliding: dict, stride: int, progress) -> dict:
    """{"stride", "lengths", "perplexity", "target_tokens"} of the sliding-window batches."""
    out = {"stride": stride, "lengths": [], "perplexity": [], "target_tokens": []}
    for length, batches in sliding.items():
        loss, count, _ = _mean_loss(scorer, batches, progress, f"sliding {length}")
        out["lengths"].append(length)
        out["perplexity"].append(math.exp(loss))
        out["target_tokens"].append(count)
    return out


def loss_by_position(scorer, batches: list[dict], progress) -> dict:
    """position_buckets of `batches` (the longest same-target windows) with every real
    target scored."""
    full = [dict(b, loss_mask=(b["segment_ids"] > 0).astype(np.float32)) for b in batches]
    _, _, nll = _mean_loss(scorer, full, progress, "by position")
    mask = np.concatenate([b["loss_mask"] for b in full])
    return position_buckets(nll, mask)
