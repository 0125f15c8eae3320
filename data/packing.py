"""Packing documents into training rows.

A document of n tokens becomes inputs = ids[:-1], targets = ids[1:] (the shift is per
document, so no target crosses a document boundary; n < 2 gives nothing), cut into pieces
of at most seq_len, and the pieces are packed into rows of seq_len by grain's first-fit
packer. Every row is a dict of [seq_len] numpy arrays:
  tokens, targets, positions (from 0 in each piece), segment_ids (1, 2, ... per piece,
  0 on padding) int32; loss_mask float32 (0 on padding, else the target's loss weight).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

# Rows the first-fit packer fills before it emits them (and shuffles them, in training).
# It must not depend on the batch size or the shard count: the global row stream has to be
# the same whatever the sharding.
PACKING_BINS = 64


# In training, pieces of documents are shuffled in a window of about this many tokens
# before packing, so that the consecutive pieces of one long document spread over many steps
# instead of filling whole batches. A restore re-tokenizes the window, so it stays moderate.
SHUFFLE_WINDOW_TOKENS = 1 << 20


SHUFFLE_WINDOW_PIECES = (64, 8192)  # at least, at most


# The texts are in memory: grain's reader threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class SyntheticDocument:
    """A synthetic retrieval document: its token ids (prompt + answer, int32 [length]) and
    how many of the last ones are the answer."""
    ids: np.ndarray
    answer_tokens: int


@dataclasses.dataclass(frozen=True)
class _TokenizeAndShift:
    """document -> {"inputs": ids[:-1], "targets": ids[1:], "weights": loss weights}
    (int32, int32, float32 [n - 1]); empty if n < 2. A document is a text (encoded here) or
    a SyntheticDocument (its ids used as they are, not decoded and encoded again), whose
    answer targets weigh `answer_weight`; every other target weighs 1."""
    tokenizer: Any
    answer_weight: float = 1.0

    def __call__(self, document: str | SyntheticDocument) -> dict[str, np.ndarray]:
        answer_tokens = 0
        if isinstance(document, SyntheticDocument):
            ids = document.ids.astype(np.int32, copy=False).reshape(-1)  # [n]
            answer_tokens = document.answer_tokens
        else:
            ids = np.asarray(self.tokenizer.encode(document), dtype=np.int32)  # [n]
        if ids.shape[0] < 2:
            ids = ids[:0]
            return {"inputs": ids, "targets": ids, "weights": ids.astype(np.float32)}
        weights = np.ones([ids.shape[0] - 1], np.float32)    # [n - 1], one per target
        if answer_tokens:
            weights[-answer_tokens:] = self.answer_weight    # the answer is the last targets
        return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights}


class _SplitPieces(grain.experimental.FlatMapTransform):
    """A shifted document -> pieces of at most seq_len tokens (none for an empty one)."""

    max_fan_out = 1  # not enforced by FlatMapIterDataset; the fan-out is unbounded here

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, pair: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = pair["inputs"].shape[0]
        return [{key: value[start:start + self.seq_len] for key, value in pair.items()}
                for start in range(0, n, self.seq_len)]


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packed features -> ours. Grain's segment ids are already 1, 2, ... with 0 on
    padding, and positions restart at 0 per piece (0 on padding)."""
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)  # [seq_len]
    return {
        "tokens": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "segment_ids": segment_ids,
        # the targets' loss weights: 0 on padding (packed with zeros), else 1 but for the
        # answers of synthetic documents (data.retrieval_answer_weight)
        "loss_mask": np.where(segment_ids > 0, packed["weights"], 0.0).astype(np.float32),
    }


def shuffle_window(texts: Sequence[str], seq_len: int, extra_pieces: int = 0) -> int:
    """Pieces in the training shuffle window: about SHUFFLE_WINDOW_TOKENS tokens, but not
    much more than an epoch (estimated with one token per character, plus `extra_pieces`
    per epoch: the synthetic documents, one piece each), within SHUFFLE_WINDOW_PIECES."""
    pieces_per_epoch = sum(-(-len(text) // seq_len) for text in texts) + extra_pieces
    return int(np.clip(min(SHUFFLE_WINDOW_TOKENS // seq_len, pieces_per_epoch),
                       *SHUFFLE_WINDOW_PIECES))


def packed_rows(documents: grain.MapDataset, tokenizer, seq_len: int, *,
                 shuffle_seed: int | None, shuffle_window: int = 0,
                 answer_weight: float = 1.0) -> grain.IterDataset:
    """Packed rows (dicts of [seq_len] arrays) of a dataset of documents (texts, or token
    arrays: see _TokenizeAndShift). With a shuffle seed, pieces are shuffled in windows of
    `shuffle_window` and packed rows are shuffled among the packer's bins; with None the
    order is deterministic in the documents' order."""
    pairs = documents.map(_TokenizeAndShift(tokenizer, answer_weight)).to_iter_dataset(
        _READ_OPTIONS)
    pieces = grain.experimental.FlatMapIterDataset(pairs, _SplitPieces(seq_len))
    if shuffle_seed is not None:
        pieces = grain.experimental.WindowShuffleIterDataset(
            pieces, window_size=shuffle_window, seed=shuffle_seed + 1)
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
        num_packing_bins=PACKING_BINS, seed=0 if shuffle_seed is None else shuffle_seed + 2,
        shuffle_bins=shuffle_seed is not None)
    return packed.map(_to_row)
