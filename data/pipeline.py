"""The training iterator: documents -> packed rows -> per-process batches, forever.

Sharding is by rows: every process builds the same global stream of packed rows; shard s
of S takes rows s, s+S, s+2S, ... of it, so the global batch does not depend on how many
processes share it. Each epoch shuffles the documents by the seed; pieces are shuffled in
a window before packing (data/packing.py) so one long document does not fill whole
batches. The iterator is a grain DatasetIterator: checkpointable, restored exactly.
"""
from __future__ import annotations

import functools
from typing import Sequence

import grain
import numpy as np

from data.packing import packed_rows, shuffle_window
from data.retrieval_mix import mixed_epochs, retrieval_mix
from data.sources import list_documents


def _shard_rows(batch: dict[str, np.ndarray], shard_index: int,
                shard_count: int) -> dict[str, np.ndarray]:
    """Rows shard_index, shard_index + shard_count, ... of a global batch."""
    return {key: value[shard_index::shard_count] for key, value in batch.items()}


def _check_shards(shard_index: int, shard_count: int, seq_len: int, batch_size: int) -> None:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")


def _require_tokens(documents: Sequence[str], tokenizer, split: str) -> None:
    """Raise unless some document has at least 2 tokens (else an endlessly repeated
    dataset would never yield a row). Stops at the first such document, usually the first."""
    for text in documents:
        if len(tokenizer.encode(text)) >= 2:
            return
    raise ValueError(f"data: no document of the {split} split has 2 or more tokens")


def _epochs(documents: Sequence[str], seed: int) -> grain.MapDataset:
    """The documents repeated forever, each epoch in another order drawn from `seed`."""
    return grain.MapDataset.source(list(documents)).shuffle(seed=seed).repeat()


def make_train_iterator(data_config, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, split: str = "train",
                        l_max: int | None = None):
    """A grain DatasetIterator of packed batches ([batch_size, seq_len] each, keys as in the
    data/packing.py), forever: epochs repeat, the documents reshuffled each epoch by
    `seed`. Checkpointable with get_state()/set_state() and grain.checkpoint.

    batch_size is this shard's rows per step. The global stream of rows is the same for any
    shard_count and batch_size; shard s of S takes rows s, s+S, ... of it, so at each step the
    S shards together hold the rows a single shard with batch S*batch_size would.

    With data.retrieval_fraction > 0 and split "train", synthetic retrieval documents are
    mixed in (data/retrieval_mix.py validates the keys). l_max (None: seq_len) is
    the curriculum's l_max, only read for data.retrieval_min_length = 0 (l_max // 4).
    """
    _check_shards(shard_index, shard_count, seq_len, batch_size)
    mix = (retrieval_mix(data_config, tokenizer, seq_len=seq_len, l_max=l_max)
           if split == "train" else None)
    documents = list_documents(data_config, split)
    _require_tokens(documents, tokenizer, split)
    if mix is None:
        epochs, synthetic = _epochs(documents, seed), 0
    else:
        epochs = mixed_epochs(documents, seed, mix, tokenizer)
        synthetic = mix.synthetic_per_epoch(len(documents))
    rows = packed_rows(epochs, tokenizer, seq_len, shuffle_seed=seed,
                        shuffle_window=shuffle_window(documents, seq_len, synthetic),
                        answer_weight=1.0 if mix is None else mix.answer_weight)
    batches = rows.batch(batch_size * shard_count, drop_remainder=True)  # [S * b, seq_len]
    batches = batches.map(functools.partial(
        _shard_rows, shard_index=shard_index, shard_count=shard_count))  # [b, seq_len]
    return iter(batches)


