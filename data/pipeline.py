"""The training data of a run: its corpus (on the fly or prepared) and its one stream.

data.source "stdlib" / "text" / "jsonl" / "parquet" are read and tokenized when the run
starts and held in memory (the embedded default needs no set-up); data.source = "prepared"
with data.path = a directory made by `--mode prepare` is read from disk a slice at a time
(data/corpus.py TokenFile), so host memory and start-up do not grow with the corpus. Either
way the rows come from data/stream.py's TrainStream, in the row format:
  tokens, targets, positions (from 0 in each segment), segment_ids (1, 2, ... per segment,
  0 on padding) int32 [length]; loss_mask float32 (0 on padding, else the target's loss
  weight: 1, or data.retrieval_answer_weight on a synthetic document's answer).

`data_config` throughout data/ is the typed `data` section (configs/sections.py:
DataSection), read by attribute; data/ never sees the whole config.
"""
from __future__ import annotations

from data.corpus import Corpus, corpus_from_texts
from data.prepare import open_prepared
from data.retrieval_mix import SyntheticDocuments, retrieval_mix
from data.sources import PREPARED, list_documents
from data.stream import Documents, TrainStream


def load_corpus(data_config, tokenizer, split: str) -> Corpus:
    """The `split` of the configured source as a Corpus."""
    if data_config.source == PREPARED:
        return open_prepared(data_config.path, split, data_config.tokenizer)
    return corpus_from_texts(list_documents(data_config, split), tokenizer)


def make_train_stream(data_config, tokenizer, *, lengths, seed: int,
                      l_max: int | None = None) -> TrainStream:
    """The stream every level of a run draws from: blocks of max(lengths) pairs (the
    longest training length), shuffled over the whole corpus each epoch by `seed`.

    With data.retrieval_fraction > 0, synthetic retrieval documents join every epoch
    (data/retrieval_mix.py validates the keys; their default longest length is the first
    level's, lengths[0], and data.retrieval_min_length 0 means l_max // 4)."""
    lengths = list(lengths)
    mix = retrieval_mix(data_config, tokenizer, seq_len=lengths[0], l_max=l_max)
    corpus = load_corpus(data_config, tokenizer, "train")
    synthetic = None if mix is None else SyntheticDocuments(mix, tokenizer, seed, len(corpus))
    return TrainStream(Documents(corpus, synthetic), block=max(lengths), seed=seed)
