"""Scoring retrieval samples (data/retrieval_tasks.py) by teacher forcing.

A sample is fed as prompt + answer; at the answer's target positions the model's
log-probability of the target and whether it was the argmax give
  exact match     every answer token is the argmax
  answer logprob  the sum of the answer tokens' log-probabilities
and `summarise_grid` reduces one task's depth x length grid to accuracies and k_max.

With eval.retrieval_scoring = "generate", exact match is instead whether greedy decoding
of the prompt (evaluation/generate.py) produces exactly the answer ids
(`generated_exact_match`); the answer log-probability stays the teacher-forced one.
Teacher-forced exact match implies generated exact match (greedy decoding then feeds
exactly the teacher-forced tokens), and a teacher-forced miss is a miss of greedy decoding
at the first wrong token; the two can differ only through numerics (prefill + KV cache vs.
one full forward) on near-ties. "generate" is the protocol of papers that decode.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data.retrieval_tasks import Sample

# Relative tolerance for summarise_grid's accuracy >= threshold test (float rounding only).
_THRESHOLD_EPS = 1e-12


def teacher_forced_batch(samples: Sequence[Sample], length: int) -> dict[str, np.ndarray]:
    """Rows [n, length] that feed prompt + answer to a causal LM, in the training rows' format
    (data/pipeline.py).

    Every sample must have exactly `length` tokens (prompt + answer). Row i is
      tokens      = (prompt + answer)[:-1], then one pad token 0        int32
      targets     = (prompt + answer)[1:],  then 0                      int32
      positions   = 0 .. length - 2, then 0                             int32
      segment_ids = 1 on the length - 1 real tokens, 0 on the pad       int32
      loss_mask   = 1.0 on every real target, 0.0 on the pad            float32
      answer_mask = 1.0 exactly on the len(answer) targets that are answer tokens, i.e.
                    columns [len(prompt) - 1, length - 1)               float32
    """
    if not samples:
        raise ValueError("retrieval: teacher_forced_batch got no samples")
    n = len(samples)
    out = {key: np.zeros((n, length), np.int32)
           for key in ("tokens", "targets", "positions", "segment_ids")}
    out["loss_mask"] = np.zeros((n, length), np.float32)
    out["answer_mask"] = np.zeros((n, length), np.float32)
    for i, sample in enumerate(samples):
        sequence = np.concatenate([sample.prompt, sample.answer]).astype(np.int32)
        if sequence.size != length:
            raise ValueError(f"retrieval: sample {i} has {sequence.size} tokens, the batch "
                             f"length is {length}; they must be equal")
        real = length - 1
        out["tokens"][i, :real] = sequence[:-1]
        out["targets"][i, :real] = sequence[1:]
        out["positions"][i, :real] = np.arange(real, dtype=np.int32)
        out["segment_ids"][i, :real] = 1
        out["loss_mask"][i, :real] = 1.0
        out["answer_mask"][i, sample.prompt.size - 1:real] = 1.0
    return out


def score_answers(target_logprob, is_argmax, answer_mask) -> dict[str, np.ndarray]:
    """Per-sample scores from per-target arrays, each [n, length]:
    target_logprob (log p of the target token), is_argmax (the target was the argmax),
    answer_mask (nonzero on answer targets). Returns
      exact_match    bool    [n]  every answer token is the argmax (False if no answer token)
      answer_logprob float64 [n]  sum of target_logprob over the answer tokens
      answer_tokens  int32   [n]  number of answer tokens
    Values off the answer mask are ignored (even NaN)."""
    logprob = np.asarray(target_logprob, dtype=np.float64)
    argmax = np.asarray(is_argmax).astype(bool)
    mask = np.asarray(answer_mask) != 0
    if not logprob.shape == argmax.shape == mask.shape or logprob.ndim != 2:
        raise ValueError(f"retrieval: score_answers needs three [n, length] arrays of one shape, "
                         f"got {logprob.shape}, {argmax.shape}, {mask.shape}")
    tokens = mask.sum(axis=1).astype(np.int32)
    return {
        "exact_match": np.all(argmax | ~mask, axis=1) & (tokens > 0),
        "answer_logprob": np.where(mask, logprob, 0.0).sum(axis=1),
        "answer_tokens": tokens,
    }


def summarise_grid(samples: Sequence[Sample], exact_match, answer_logprob, *,
                   threshold: float) -> dict:
    """JSON-ready summary of one task's grid (samples as from make_grid, in any order, with
    their per-sample scores):
      task, lengths (ascending), depths (ascending), samples_per_cell, threshold
      accuracy            [len(lengths)][len(depths)]  exact-match rate per cell
      mean_answer_logprob [len(lengths)][len(depths)]
      length_accuracy     [len(lengths)]  mean over depths of the cells' accuracy
      depth_accuracy      [len(depths)]   mean over lengths
      k_max  the largest length L such that every length <= L has length_accuracy >=
             threshold (None if the shortest fails): a later pass after a failure does not
             count.
    Raises ValueError unless all samples share one task and every (length, depth) cell has
    the same number of samples."""
    exact_match = np.asarray(exact_match).astype(bool).reshape(-1)
    answer_logprob = np.asarray(answer_logprob, dtype=np.float64).reshape(-1)
    if not samples or not len(samples) == exact_match.size == answer_logprob.size:
        raise ValueError(f"retrieval: summarise_grid needs one score per sample, got "
                         f"{len(samples)} samples, {exact_match.size} and "
                         f"{answer_logprob.size} scores")
    tasks = sorted({s.task for s in samples})
    if len(tasks) != 1:
        raise ValueError(f"retrieval: summarise_grid takes one task at a time, got {tasks}")
    lengths = sorted({int(s.length) for s in samples})
    depths = sorted({float(s.depth) for s in samples})
    cells: dict[tuple[int, float], list[int]] = {(length, d): [] for length in lengths
                                                 for d in depths}
    for i, s in enumerate(samples):
        cells[(int(s.length), float(s.depth))].append(i)
    counts = {len(v) for v in cells.values()}
    if len(counts) != 1:
        raise ValueError("retrieval: summarise_grid needs the same number of samples in every "
                         f"(length, depth) cell, got counts {sorted(counts)}")
    accuracy = [[float(exact_match[cells[(length, d)]].mean()) for d in depths]
                for length in lengths]
    logprob = [[float(answer_logprob[cells[(length, d)]].mean()) for d in depths]
               for length in lengths]
    table = np.asarray(accuracy, dtype=np.float64)    # [lengths, depths]
    length_accuracy = table.mean(axis=1)
    k_max = None
    for length, acc in zip(lengths, length_accuracy):
        if acc < threshold - _THRESHOLD_EPS:
            break
        k_max = length
    return {
        "task": tasks[0],
        "lengths": lengths,
        "depths": depths,
        "accuracy": accuracy,
        "mean_answer_logprob": logprob,
        "length_accuracy": [float(a) for a in length_accuracy],
        "depth_accuracy": [float(a) for a in table.mean(axis=0)],
        "samples_per_cell": counts.pop(),
        "k_max": k_max,
        "threshold": float(threshold),
    }


SCORING_MODES = ("teacher_forced", "generate")


def generated_exact_match(generate_fn, samples: Sequence[Sample]) -> np.ndarray:
    """bool [n]: whether greedy decoding of each sample's prompt gives exactly its answer.

    `generate_fn(prompts [k, P] int32, max_new_tokens) -> tokens [k, <= max_new_tokens]`
    (evaluation.generate.generate at temperature 0, without EOS). Samples sharing a prompt
    length are decoded as one batch, for the longest answer among them; each is compared
    on its own answer's length."""
    hits = np.zeros(len(samples), bool)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(int(s.prompt.size), []).append(i)
    for _, members in sorted(groups.items()):
        prompts = np.stack([np.asarray(samples[i].prompt, np.int32) for i in members])
        new = max(int(samples[i].answer.size) for i in members)
        out = np.asarray(generate_fn(prompts, new))
        for row, i in enumerate(members):
            answer = np.asarray(samples[i].answer)
            got = out[row, :answer.size]
            hits[i] = answer.size > 0 and got.size == answer.size and bool(np.all(got == answer))
    return hits


def score_grids(scorer, grids: dict, threshold: float, progress, generate_fn=None) -> dict:
    """{task: summarise_grid(...)} for `grids` = {task: (samples, {length: batches})}, the
    batches made by teacher_forced_batch from the samples in make_grid's order. With
    `generate_fn` (see generated_exact_match), exact match comes from greedy decoding; the
    answer log-probability is the teacher-forced one either way."""
    summaries = {}
    for task, (samples, by_length) in grids.items():
        exact, logprob = [], []
        for length, batches in by_length.items():
            n = sum(1 for s in samples if s.length == length)
            hits, lps = [], []
            for batch in batches:
                nll, is_argmax = scorer(batch)
                scored = score_answers(-nll, is_argmax, batch["answer_mask"])
                hits.append(scored["exact_match"])
                lps.append(scored["answer_logprob"])
                progress.advance(f"{task} {length}")
            hits = np.concatenate(hits)[:n]               # the last batch is padded
            if generate_fn is not None:
                hits = generated_exact_match(
                    generate_fn, [s for s in samples if s.length == length])
            exact.append(hits)
            logprob.append(np.concatenate(lps)[:n])
        # samples are ordered by length, then depth, then sample: the batches' order
        summaries[task] = summarise_grid(samples, np.concatenate(exact),
                                         np.concatenate(logprob), threshold=threshold)
    return summaries
