"""Evaluation rows of the validation split: same-target windows and sliding windows.

Rows are dicts of [n, L] numpy arrays in the training rows' format (data/pipeline.py),
with positions 0 .. L-1 in each row; padding rows and tails have segment 0 and no loss.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.pipeline import load_corpus


class CorpusDocuments(Sequence):
    """The documents of a Corpus as int64 token arrays, each read when asked for (a
    prepared validation split stays on disk); `lengths` [n] without reading any."""

    def __init__(self, corpus):
        self.corpus, self.lengths = corpus, corpus.lengths

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.corpus.read(int(index)).astype(np.int64)

    def read(self, index: int, start: int, stop: int) -> np.ndarray:
        """Tokens start .. stop - 1 of document `index` (only those are read)."""
        return self.corpus.read(int(index), int(start), int(stop)).astype(np.int64)


def validation_documents(data_config, tokenizer) -> CorpusDocuments:
    """The validation split, in order (from the prepared directory when data.source =
    "prepared")."""
    return CorpusDocuments(load_corpus(data_config, tokenizer, "validation"))


def document_lengths(documents) -> np.ndarray:
    """Token counts of a sequence of documents (without reading a CorpusDocuments')."""
    lengths = getattr(documents, "lengths", None)
    return np.asarray([len(d) for d in documents] if lengths is None else lengths)


def _read(documents, index: int, start: int, stop: int) -> np.ndarray:
    """Tokens start .. stop - 1 of documents[index], reading no more of a CorpusDocuments'
    (a validation document may be longer than everything evaluation takes from it)."""
    read = getattr(documents, "read", None)
    if read is not None:
        return read(index, start, stop)
    return np.asarray(documents[index])[start:stop]


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
    sizes = document_lengths(documents)
    usable = np.flatnonzero(sizes >= longest + 1)
    if max_windows:
        usable = usable[:max_windows]
    # each document's last longest + 1 tokens: all that any length's window takes from it
    tails = [_read(documents, i, sizes[i] - longest - 1, sizes[i]) for i in usable]
    if not tails:
        raise ValueError(f"no validation document has {longest + 1} tokens, which the "
                         f"longest evaluation length {longest} needs; lower eval.lengths")
    if not 0 < score_tokens <= min(lengths):
        raise ValueError(f"eval.score_tokens ({score_tokens}) must be in 1..{min(lengths)}")
    windows = {}
    for length in lengths:
        tokens = np.stack([t[longest - length:longest] for t in tails])   # [n, L]
        targets = np.stack([t[longest + 1 - length:] for t in tails])
        loss_mask = np.zeros(tokens.shape, np.float32)
        loss_mask[:, -score_tokens:] = 1.0
        windows[length] = _rows(tokens, targets, loss_mask)
    return windows


def sliding_windows(documents, length: int, stride: int, max_windows: int) -> dict:
    """Rows [n, length] of the sliding-window protocol (stride `stride`); each window scores
    only targets no earlier window scored. Short tails are padded (segment 0, no loss)."""
    tokens, targets, masks, segments = [], [], [], []
    for index, size in enumerate(document_lengths(documents)):
        if size == 0:
            continue
        inputs_end = int(size) - 1                       # inputs are doc[:-1], targets doc[1:]
        scored_until = 0
        for begin in range(0, max(inputs_end, 1), stride):
            end = min(begin + length, inputs_end)
            n = end - begin
            row = np.zeros((4, length), np.int64)
            piece = _read(documents, index, begin, end + 1)     # only this window's tokens
            row[0, :n], row[1, :n] = piece[:-1], piece[1:]
            row[2, :n] = np.arange(begin, end) >= scored_until
            row[3, :n] = 1
            tokens.append(row[0])
            targets.append(row[1])
            masks.append(row[2])
            segments.append(row[3])
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
