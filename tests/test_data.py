"""Tests of data/: documents (sources), tokenizers, packing, the training pipeline (sharding,
iterator state) and the synthetic retrieval mix."""
import gzip
import itertools
import json
import logging
import os

import numpy as np
import pytest

import grain

from configs.base import get_config
from data.packing import SyntheticDocument, packed_rows
from data.pipeline import _epochs, make_train_iterator
from data.retrieval_mix import mixed_epochs, retrieval_mix, synthetic_sample
from data.sources import _stdlib_files, list_documents
from data.tokenizers import Tokenizer, make_tokenizer

KEYS = {"tokens": np.int32, "targets": np.int32, "positions": np.int32,
        "segment_ids": np.int32, "loss_mask": np.float32}


def data_config(**overrides):
    config = get_config().data
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def write_text_corpus(directory, texts, suffix=".txt"):
    """One file per text, doc_000.txt, doc_001.txt, ...; returns the glob."""
    os.makedirs(directory, exist_ok=True)
    for i, text in enumerate(texts):
        with open(os.path.join(directory, f"doc_{i:03d}{suffix}"), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(str(directory), f"*{suffix}")


def varied_texts(count, seed=0, min_len=5, max_len=90):
    """`count` distinct documents of varied length (distinct bytes sequences)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "pi", "rho", "sigma", "tau", "omega", "mu"]
    texts = []
    for i in range(count):
        n = int(rng.integers(min_len, max_len))
        body = " ".join(rng.choice(words, size=n // 4 + 1))
        texts.append(f"#{i}: {body}"[:n])
    return texts


def text_config(tmp_path, texts, **overrides):
    return data_config(source="text", path=write_text_corpus(tmp_path / "corpus", texts),
                       **overrides)


def segments(batch):
    """(tokens, targets, positions) of every non-padding segment of every row."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        ids = batch["segment_ids"][row]
        for segment in np.unique(ids[ids > 0]):
            where = ids == segment
            out.append((batch["tokens"][row][where], batch["targets"][row][where],
                        batch["positions"][row][where]))
    return out


def piece_bytes(tokens, targets):
    """The document bytes a piece covers: its inputs and then its last target."""
    return bytes(np.append(tokens, targets[-1]).astype(np.uint8))


def sorted_rows(batches):
    """The rows of some batches, as comparable tuples, sorted."""
    rows = []
    for batch in batches:
        for r in range(batch["tokens"].shape[0]):
            rows.append(tuple(batch[k][r].tobytes() for k in sorted(KEYS)))
    return sorted(rows)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- documents ------------------------------------------------------------------------------

def test_stdlib_listing_is_deterministic_and_nonempty():
    config = data_config()
    first = list_documents(config, "train")
    assert len(first) > 100
    assert all(isinstance(text, str) for text in first)
    assert list(list_documents(config, "train")) == list(first)


def test_stdlib_files_are_sorted_and_skip_site_packages():
    files = _stdlib_files()
    names = [name for _, name in files]
    assert names == sorted(names)
    assert all(name.endswith(".py") for name in names)
    assert not any(part in ("site-packages", "dist-packages")
                   for name in names for part in name.split("/"))


def test_stdlib_validation_share_is_roughly_validation_percent():
    config = data_config(validation_percent=5)
    train = list_documents(config, "train")
    validation = list_documents(config, "validation")
    total = len(train) + len(validation) + train.num_skipped + validation.num_skipped
    assert total == len(_stdlib_files())
    assert 0.025 < len(validation) / total < 0.075


def test_train_and_validation_are_disjoint_and_cover_the_corpus(tmp_path):
    texts = varied_texts(200)
    config = text_config(tmp_path, texts, validation_percent=30)
    train = list_documents(config, "train")
    validation = list_documents(config, "validation")
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(texts)
    assert 0.15 < len(validation) / len(texts) < 0.45


def test_split_depends_on_relative_path_not_location(tmp_path):
    texts = varied_texts(60)
    a = data_config(source="text", validation_percent=30,
                    path=write_text_corpus(tmp_path / "a", texts))
    b = data_config(source="text", validation_percent=30,
                    path=write_text_corpus(tmp_path / "elsewhere" / "b", texts))
    assert list(list_documents(a, "validation")) == list(list_documents(b, "validation"))


def test_text_glob_is_recursive_and_sorted(tmp_path):
    root = tmp_path / "tree"
    (root / "x" / "y").mkdir(parents=True)
    (root / "b.txt").write_text("second file")
    (root / "a.txt").write_text("first file")
    (root / "x" / "y" / "c.txt").write_text("deep file")
    (root / "x" / "ignored.md").write_text("not matched")
    config = data_config(source="text", path=str(root / "**" / "*.txt"), validation_percent=0)
    assert list(list_documents(config, "train")) == ["first file", "second file",
                                                          "deep file"]


def test_jsonl_source_reads_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"body": "one", "id": 1}, {"body": "two"}, {"body": "three ü"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    config = data_config(source="jsonl", path=str(path), text_field="body",
                         validation_percent=0)
    assert list(list_documents(config, "train")) == ["one", "two", "three ü"]


def test_jsonl_gz_source_is_decompressed(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped a"}) + "\n" + json.dumps({"text": "zipped b"}))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "plain"}) + "\n")
    config = data_config(source="jsonl", path=str(tmp_path / "*.jsonl*"), validation_percent=0)
    assert list(list_documents(config, "train")) == ["zipped a", "zipped b", "plain"]


def test_parquet_source_reads_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["p one", "p two"], "n": [1, 2]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"content": ["p three"], "n": [3]}), tmp_path / "b.parquet")
    config = data_config(source="parquet", path=str(tmp_path / "*.parquet"),
                         text_field="content", validation_percent=0)
    assert list(list_documents(config, "train")) == ["p one", "p two", "p three"]


# --- document errors ------------------------------------------------------------------------

def test_unknown_source_is_an_error():
    with pytest.raises(ValueError, match="data.source 'nope'"):
        list_documents(data_config(source="nope"), "train")


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split 'test'"):
        list_documents(data_config(), "test")


def test_missing_path_is_an_error(tmp_path):
    missing = str(tmp_path / "no_such_file.txt")
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        list_documents(data_config(source="text", path=missing), "train")


def test_empty_path_is_an_error():
    with pytest.raises(ValueError, match="data.path is empty"):
        list_documents(data_config(source="text", path=""), "train")


def test_glob_without_match_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_documents(data_config(source="text", path=str(tmp_path / "*.txt")), "train")


def test_empty_split_is_an_error(tmp_path):
    config = text_config(tmp_path, varied_texts(10), validation_percent=0)
    with pytest.raises(ValueError, match="no documents in the validation split"):
        list_documents(config, "validation")


def test_empty_jsonl_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    config = data_config(source="jsonl", path=str(tmp_path / "empty.jsonl"), validation_percent=0)
    with pytest.raises(ValueError, match="no documents"):
        list_documents(config, "train")


def test_json_line_without_the_field_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"other": "x"}) + "\n")
    config = data_config(source="jsonl", path=str(path), validation_percent=0)
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: no field 'text'"):
        list_documents(config, "train")


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
    config = data_config(source="jsonl", path=str(path), validation_percent=0)
    with pytest.raises(ValueError, match=r"docs\.jsonl:3: not valid JSON"):
        list_documents(config, "train")


def test_parquet_without_the_column_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    config = data_config(source="parquet", path=str(tmp_path / "a.parquet"), validation_percent=0)
    with pytest.raises(ValueError, match="no column 'text'"):
        list_documents(config, "train")


def test_undecodable_files_are_skipped_and_counted(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    glob = write_text_corpus(corpus, ["good one", "good two", "good three"])
    (corpus / "doc_bad.txt").write_bytes(b"caf\xe9 latin-1 \xff")
    config = data_config(source="text", path=glob, validation_percent=0)
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        documents = list_documents(config, "train")
    assert sorted(documents) == ["good one", "good three", "good two"]
    assert documents.num_skipped == 1
    assert documents.skipped_files[0].endswith("doc_bad.txt")
    assert "skipped 1 file" in caplog.text


def test_all_undecodable_corpus_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.txt").write_bytes(b"\xff\xfe\xfa bytes")
    config = data_config(source="text", path=str(tmp_path / "*.txt"), validation_percent=0)
    with pytest.raises(ValueError, match="failed to decode"):
        list_documents(config, "train")


# --- tokenizers -----------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_utf8():
    tokenizer = make_tokenizer("bytes")
    text = "naïve café ∑ 🙂"
    ids = tokenizer.encode(text)
    assert tokenizer.vocab_size == 256
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([0x61, 0xFF]) == "a\ufffd"
    assert isinstance(tokenizer, Tokenizer)


def test_sentencepiece_tokenizer_round_trips(tmp_path):
    import sentencepiece
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=8)) + f" {i}" for i in range(400)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=100,
        model_type="unigram", character_coverage=1.0, minloglevel=2)
    tokenizer = make_tokenizer(str(tmp_path / "sp.model"))
    text = "the quick number 12 jumps over 3 lazy dogs"
    ids = tokenizer.encode(text)
    assert tokenizer.vocab_size == 100
    assert ids.dtype == np.int32 and 0 < len(ids) and ids.max() < 100
    assert tokenizer.decode(ids) == text


def test_hugging_face_tokenizer_json_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([f"hello world {i} tokens" for i in range(200)], trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tokenizer = make_tokenizer(str(tmp_path / "tokenizer.json"))
    ids = tokenizer.encode("hello world 42 tokens")
    assert tokenizer.vocab_size == hf.get_vocab_size()
    assert ids.dtype == np.int32 and len(ids) < len("hello world 42 tokens")
    assert tokenizer.decode(ids) == "hello world 42 tokens"


def test_missing_tokenizer_file_names_the_path(tmp_path):
    path = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        make_tokenizer(path)


def test_unknown_tokenizer_spec_is_an_error():
    with pytest.raises(ValueError, match="gpt9"):
        make_tokenizer("gpt9")


# --- packing --------------------------------------------------------------------------------

def test_train_batches_have_the_shapes_and_dtypes(tmp_path):
    config = text_config(tmp_path, varied_texts(50), validation_percent=0)
    iterator = make_train_iterator(config, make_tokenizer("bytes"), seq_len=32,
                                   batch_size=4, seed=0)
    batch = next(iterator)
    assert set(batch) == set(KEYS)
    for key, dtype in KEYS.items():
        assert batch[key].shape == (4, 32), key
        assert batch[key].dtype == dtype, key


def test_targets_are_the_next_token_of_the_same_document(tmp_path):
    texts = varied_texts(80, min_len=3, max_len=70)
    config = text_config(tmp_path, texts, validation_percent=0)
    iterator = make_train_iterator(config, make_tokenizer("bytes"), seq_len=24,
                                   batch_size=8, seed=1)
    documents = [t.encode("utf-8") for t in texts]
    count = 0
    for _ in range(10):
        for tokens, targets, positions in segments(next(iterator)):
            np.testing.assert_array_equal(targets[:-1], tokens[1:])
            piece = piece_bytes(tokens, targets)
            # the piece (inputs + last target) is a contiguous run of one document, starting
            # at a multiple of seq_len
            assert any(d[start:start + len(piece)] == piece
                       for d in documents for start in range(0, len(d), 24)), piece
            count += 1
    assert count > 50


def test_positions_restart_at_zero_for_each_segment(tmp_path):
    config = text_config(tmp_path, varied_texts(60, min_len=3, max_len=30), validation_percent=0)
    iterator = make_train_iterator(config, make_tokenizer("bytes"), seq_len=32,
                                   batch_size=4, seed=0)
    batch = next(iterator)
    assert batch["segment_ids"].max() > 1  # several documents share a row
    for tokens, targets, positions in segments(batch):
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))
    for row in batch["segment_ids"]:
        real = row[row > 0]
        assert real[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)


def test_padding_has_segment_zero_and_no_loss(tmp_path):
    config = text_config(tmp_path, varied_texts(40, min_len=3, max_len=20), validation_percent=0)
    iterator = make_train_iterator(config, make_tokenizer("bytes"), seq_len=64,
                                   batch_size=8, seed=0)
    batches = [next(iterator) for _ in range(4)]
    padding = np.concatenate([b["segment_ids"] == 0 for b in batches])
    loss_mask = np.concatenate([b["loss_mask"] for b in batches])
    assert padding.any()
    np.testing.assert_array_equal(loss_mask, np.where(padding, 0.0, 1.0))
    for key in ("tokens", "targets", "positions"):
        assert not np.concatenate([b[key] for b in batches])[padding].any(), key
    # padding only follows the real tokens of a row
    for row in padding:
        assert not np.any(np.diff(row.astype(int)) < 0)


def packed_once(texts, seq_len, **shuffle):
    """Every row packed_rows (data/packing.py) makes of one pass over `texts`, stacked into
    one batch [n, seq_len]; no shuffle unless `shuffle` (shuffle_seed, shuffle_window)."""
    shuffle = shuffle or {"shuffle_seed": None}
    rows = list(packed_rows(grain.MapDataset.source(list(texts)), make_tokenizer("bytes"),
                            seq_len, **shuffle))
    return {key: np.stack([row[key] for row in rows]) for key in KEYS}


def test_document_longer_than_seq_len_is_split_into_pieces():
    seq_len = 16
    long_text = "".join(chr(ord("a") + i % 26) + str(i) for i in range(40))  # 110 bytes
    texts = ["short one", long_text, "short two"]
    batch = packed_once(texts, seq_len)
    document = long_text.encode()
    pieces = {}
    for tokens, targets, positions in segments(batch):
        assert len(tokens) <= seq_len
        start = document.find(piece_bytes(tokens, targets))
        if start >= 0 and len(tokens) > 9:
            pieces[start] = len(tokens)
    n_pairs = len(document) - 1
    expected = {s: min(seq_len, n_pairs - s) for s in range(0, n_pairs, seq_len)}
    assert pieces == expected


def test_documents_shorter_than_two_tokens_are_dropped():
    batch = packed_once(["x", "", "yz"], seq_len=8)
    assert batch["tokens"].shape == (1, 8)
    assert batch["segment_ids"].max() == 1
    assert batch["loss_mask"].sum() == 1
    assert (batch["tokens"][0, 0], batch["targets"][0, 0]) == (ord("y"), ord("z"))


def test_shuffled_packing_keeps_every_target_exactly_once():
    """One pass over the documents, shuffled and packed as in training: the pieces are the
    documents' seq_len-pieces, each once (nothing lost or repeated)."""
    texts = varied_texts(30)
    batch = packed_once(texts, 32, shuffle_seed=0, shuffle_window=64)
    got = sorted(piece_bytes(tokens, targets) for tokens, targets, _ in segments(batch))
    documents = [t.encode() for t in texts]
    expected = sorted(d[s:s + 33] for d in documents for s in range(0, len(d) - 1, 32))
    assert got == expected
    assert batch["loss_mask"].sum() == sum(len(d) - 1 for d in documents)


def test_train_iterator_repeats_epochs(tmp_path):
    texts = varied_texts(12, min_len=30, max_len=31)  # each document fills one 29-token row
    config = text_config(tmp_path, texts, validation_percent=0)
    iterator = make_train_iterator(config, make_tokenizer("bytes"), seq_len=29,
                                   batch_size=12, seed=0)
    batches = [next(iterator) for _ in range(16)]  # 16 epochs' worth of rows
    starts = [bytes(row[:8].astype(np.uint8)) for b in batches for row in b["tokens"]]
    counts = {t.encode()[:8]: starts.count(t.encode()[:8]) for t in texts}
    assert len(starts) == 192 and sum(counts.values()) == 192
    assert all(12 <= c <= 20 for c in counts.values()), counts
    assert starts[:12] != starts[12:24]


def test_documents_are_reshuffled_each_epoch():
    documents = [f"document {i}" for i in range(50)]
    epochs = _epochs(documents, seed=0)
    first = [epochs[i] for i in range(50)]
    second = [epochs[i] for i in range(50, 100)]
    assert sorted(first) == sorted(second) == sorted(documents)
    assert first != second and first != documents
    assert [_epochs(documents, seed=1)[i] for i in range(50)] != first


def test_train_stream_depends_on_the_seed_only(tmp_path):
    config = text_config(tmp_path, varied_texts(60), validation_percent=0)
    tokenizer = make_tokenizer("bytes")

    def take(seed):
        iterator = make_train_iterator(config, tokenizer, seq_len=32, batch_size=4,
                                       seed=seed)
        return [next(iterator) for _ in range(3)]

    assert_batches_equal(take(0), take(0))
    assert not np.array_equal(take(0)[0]["tokens"], take(1)[0]["tokens"])


def test_train_iterator_without_usable_documents_is_an_error(tmp_path):
    config = text_config(tmp_path, ["a", "b", ""], validation_percent=0)
    with pytest.raises(ValueError, match="2 or more tokens"):
        make_train_iterator(config, make_tokenizer("bytes"), seq_len=8, batch_size=2,
                            seed=0)


def test_stdlib_train_batch_is_packed_bytes():
    iterator = make_train_iterator(data_config(), make_tokenizer("bytes"),
                                   seq_len=64, batch_size=4, seed=0)
    batch = next(iterator)
    assert batch["tokens"].shape == (4, 64) and batch["tokens"].max() < 256
    assert batch["loss_mask"].mean() > 0.5


# --- shards ---------------------------------------------------------------------------------

def test_two_shards_cover_the_rows_of_one_shard_with_twice_the_batch(tmp_path):
    config = text_config(tmp_path, varied_texts(80), validation_percent=0)
    tokenizer = make_tokenizer("bytes")

    def iterator(batch_size, shard_index, shard_count):
        return make_train_iterator(config, tokenizer, seq_len=32, batch_size=batch_size,
                                   seed=3, shard_index=shard_index,
                                   shard_count=shard_count)

    whole = iterator(6, 0, 1)
    shards = [iterator(3, 0, 2), iterator(3, 1, 2)]
    for _ in range(5):
        parts = [next(shard) for shard in shards]
        assert all(p["tokens"].shape == (3, 32) for p in parts)
        expected = next(whole)
        assert sorted_rows(parts) == sorted_rows([expected])
        assert sorted_rows(parts[:1]) != sorted_rows(parts[1:])
        # shard s holds rows s, s + 2, s + 4 of the global stream
        for s, part in enumerate(parts):
            assert_batches_equal([part], [{k: v[s::2] for k, v in expected.items()}])


# --- iterator state -------------------------------------------------------------------------

def test_iterator_state_restores_the_same_next_batches(tmp_path):
    config = text_config(tmp_path, varied_texts(40), validation_percent=0)
    tokenizer = make_tokenizer("bytes")
    kwargs = dict(seq_len=32, batch_size=4, seed=5, shard_index=1, shard_count=2)
    iterator = make_train_iterator(config, tokenizer, **kwargs)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # as grain's checkpoint stores it
    expected = [next(iterator) for _ in range(2)]
    restored = make_train_iterator(config, tokenizer, **kwargs)
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(2)], expected)


def test_iterator_state_restores_across_epochs(tmp_path):
    # 8 short documents: each step of 4 rows x 64 tokens crosses several epochs
    config = text_config(tmp_path, varied_texts(8, min_len=20, max_len=40), validation_percent=0)
    tokenizer = make_tokenizer("bytes")
    kwargs = dict(seq_len=64, batch_size=4, seed=2)
    iterator = make_train_iterator(config, tokenizer, **kwargs)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = make_train_iterator(config, tokenizer, **kwargs)
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(3)], expected)


def test_iterator_saves_and_restores_with_grain_checkpoint_handler(tmp_path):
    import grain
    from etils import epath
    config = text_config(tmp_path, varied_texts(40), validation_percent=0)
    tokenizer = make_tokenizer("bytes")
    iterator = make_train_iterator(config, tokenizer, seq_len=32, batch_size=4, seed=0)
    for _ in range(3):
        next(iterator)
    directory = epath.Path(tmp_path / "checkpoint")
    directory.mkdir()
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(directory, args=grain.checkpoint.CheckpointSave(iterator))
    expected = [next(iterator) for _ in range(2)]
    restored = make_train_iterator(config, tokenizer, seq_len=32, batch_size=4, seed=0)
    handler.restore(directory, args=grain.checkpoint.CheckpointRestore(restored))
    assert_batches_equal([next(restored) for _ in range(2)], expected)


# --- synthetic retrieval mix ------------------------------------------------------------------

def mix_config(tmp_path, count=40, **overrides):
    """A text corpus of `count` short documents with a retrieval mix (samples of 110..160
    bytes, long enough for every task with the byte tokenizer)."""
    keys = dict(validation_percent=0, retrieval_fraction=0.3, retrieval_min_length=110,
                retrieval_max_length=160)
    keys.update(overrides)
    return text_config(tmp_path, varied_texts(count), **keys)


def test_mixed_documents_are_synthetic_at_the_requested_share(tmp_path):
    config = mix_config(tmp_path, count=60, retrieval_fraction=0.3)
    tokenizer = make_tokenizer("bytes")
    mix = retrieval_mix(config, tokenizer, seq_len=160)
    documents = list_documents(config, "train")
    stream = mixed_epochs(documents, 0, mix, tokenizer)
    first = [stream[i] for i in range(400)]  # several epochs of 60 + 26 documents
    synthetic = [d.ids for d in first if isinstance(d, SyntheticDocument)]
    assert abs(len(synthetic) / len(first) - 0.3) < 0.03
    assert all(isinstance(d, str) for d in first if not isinstance(d, SyntheticDocument))
    assert all(d.dtype == np.int32 and 110 <= d.size <= 160 for d in synthetic)
    assert len({d.size for d in synthetic}) > 10   # lengths vary over [min, max]
    assert len({d.tobytes() for d in synthetic}) == len(synthetic)  # every epoch new samples
    again = mixed_epochs(documents, 0, mix, tokenizer)
    assert all(np.array_equal(a.ids, again[i].ids) if isinstance(a, SyntheticDocument)
               else a == again[i] for i, a in enumerate(first))  # deterministic, any order


def test_synthetic_sample_is_one_segment_with_its_answer_as_targets(tmp_path):
    config = mix_config(tmp_path, retrieval_fraction=0.5)
    tokenizer = make_tokenizer("bytes")
    seq_len, seed = 160, 4
    mix = retrieval_mix(config, tokenizer, seq_len=seq_len)
    samples = [synthetic_sample(mix, tokenizer, seed=seed, epoch=0, index=j)
               for j in range(mix.synthetic_per_epoch(40))]
    by_sequence = {np.concatenate([s.prompt, s.answer]).tobytes(): s for s in samples}
    iterator = make_train_iterator(config, tokenizer, seq_len=seq_len, batch_size=8,
                                   seed=seed)
    found = 0
    for _ in range(4):
        for tokens, targets, positions in segments(next(iterator)):
            sample = by_sequence.get(np.append(tokens, targets[-1]).astype(np.int32).tobytes())
            if sample is None:
                continue
            found += 1
            p, a = sample.prompt.size, sample.answer.size
            np.testing.assert_array_equal(positions, np.arange(sample.length - 1))
            np.testing.assert_array_equal(tokens[:p], sample.prompt)   # the question ends at p-1
            np.testing.assert_array_equal(targets[p - 1:p - 1 + a], sample.answer)
    assert found >= 5


def test_answer_targets_weigh_retrieval_answer_weight_and_the_rest_one(tmp_path):
    config = mix_config(tmp_path, retrieval_fraction=0.5, retrieval_answer_weight=5.0)
    tokenizer = make_tokenizer("bytes")
    mix = retrieval_mix(config, tokenizer, seq_len=160)
    answers = {}
    for epoch, j in itertools.product(range(3), range(mix.synthetic_per_epoch(40))):
        sample = synthetic_sample(mix, tokenizer, seed=3, epoch=epoch, index=j)
        answers[np.concatenate([sample.prompt, sample.answer]).tobytes()] = sample.answer.size
    batch = next(make_train_iterator(config, tokenizer, seq_len=160, batch_size=16, seed=3))
    found = 0
    for row in range(16):
        ids, weights = batch["segment_ids"][row], batch["loss_mask"][row]
        assert np.all(weights[ids == 0] == 0.0)                      # padding weighs nothing
        for segment in np.unique(ids[ids > 0]):
            where = ids == segment
            sequence = np.append(batch["tokens"][row][where], batch["targets"][row][where][-1])
            expected = np.ones(where.sum(), np.float32)
            answer_tokens = answers.get(sequence.astype(np.int32).tobytes())
            if answer_tokens:
                expected[-answer_tokens:] = 5.0
                found += 1
            np.testing.assert_array_equal(weights[where], expected)
    assert found >= 3


def test_iterator_state_restores_the_same_next_batches_with_the_mix(tmp_path):
    config = mix_config(tmp_path, count=12, retrieval_fraction=0.5)
    tokenizer = make_tokenizer("bytes")
    kwargs = dict(seq_len=160, batch_size=4, seed=7)
    iterator = make_train_iterator(config, tokenizer, **kwargs)
    for _ in range(6):   # several epochs of 12 + 12 documents
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(3)]
    restored = make_train_iterator(config, tokenizer, **kwargs)
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(3)], expected)


@pytest.mark.parametrize("overrides, key", [
    (dict(retrieval_fraction=1.0), "retrieval_fraction"),
    (dict(retrieval_fraction=-0.1), "retrieval_fraction"),
    (dict(retrieval_tasks=("passkey", "haystack")), "retrieval_tasks"),
    (dict(retrieval_tasks=()), "retrieval_tasks"),
    (dict(retrieval_min_length=170), "retrieval_min_length"),              # min > max
    (dict(retrieval_max_length=200), "retrieval_max_length"),              # max > seq_len
    (dict(retrieval_min_length=-1), "retrieval_min_length"),
    (dict(retrieval_min_length=50), "retrieval_min_length"),               # below the tasks'
    (dict(retrieval_min_length=0), "retrieval_min_length"),                # 0: 160 // 4 = 40
    (dict(retrieval_answer_weight=0.0), "retrieval_answer_weight"),
    (dict(retrieval_answer_weight=float("inf")), "retrieval_answer_weight"),
])
def test_bad_retrieval_keys_are_errors(tmp_path, overrides, key):
    config = mix_config(tmp_path, count=5, **overrides)
    with pytest.raises(ValueError, match=f"data.{key}"):
        make_train_iterator(config, make_tokenizer("bytes"), seq_len=160,
                            batch_size=2, seed=0)


def test_too_short_minimum_names_the_task_minimum():
    config = data_config(retrieval_fraction=0.5, retrieval_tasks=("passkey",),
                         retrieval_min_length=0)
    with pytest.raises(ValueError, match=r"l_max // 4.*passkey sample needs at least 104"):
        retrieval_mix(config, make_tokenizer("bytes"), seq_len=512, l_max=256)
    mix = retrieval_mix(config, make_tokenizer("bytes"), seq_len=512, l_max=512)
    assert (mix.min_length, mix.max_length) == (128, 512)


def test_zero_retrieval_fraction_leaves_the_stream_unchanged(tmp_path):
    texts = varied_texts(40)
    tokenizer = make_tokenizer("bytes")
    plain = text_config(tmp_path / "a", texts, validation_percent=0)
    zero = text_config(tmp_path / "b", texts, validation_percent=0, retrieval_fraction=0.0,
                       retrieval_tasks=("kv",), retrieval_min_length=999)
    assert retrieval_mix(zero, tokenizer, seq_len=32) is None

    def take(config):
        iterator = make_train_iterator(config, tokenizer, seq_len=32, batch_size=4, seed=1)
        return [next(iterator) for _ in range(4)]

    assert_batches_equal(take(zero), take(plain))


def test_validation_split_stays_pure_corpus_with_the_mix(tmp_path):
    config = mix_config(tmp_path, validation_percent=100, retrieval_fraction=0.5)
    pure = mix_config(tmp_path / "pure", validation_percent=100, retrieval_fraction=0.0)
    tokenizer = make_tokenizer("bytes")

    def take(config):
        iterator = make_train_iterator(config, tokenizer, seq_len=160, batch_size=4,
                                       seed=0, split="validation")
        return [next(iterator) for _ in range(3)]

    assert_batches_equal(take(config), take(pure))


def test_task_weights_set_each_task_share_of_the_synthetic_documents(tmp_path):
    config = mix_config(tmp_path, retrieval_task_weights=(3, 1, 0))
    tokenizer = make_tokenizer("bytes")
    mix = retrieval_mix(config, tokenizer, seq_len=160)
    tasks = [synthetic_sample(mix, tokenizer, seed=0, epoch=0, index=j).task
             for j in range(400)]
    assert tasks.count("line") == 0                          # weight 0: never drawn
    assert abs(tasks.count("passkey") / 400 - 0.75) < 0.06   # 3 : 1
    uniform = retrieval_mix(mix_config(tmp_path / "u"), tokenizer, seq_len=160)
    assert uniform.task_probabilities is None


@pytest.mark.parametrize("weights", [(1, 1), (1, -1, 1), (0, 0, 0), ("a", 1, 1)])
def test_bad_task_weights_are_errors(tmp_path, weights):
    config = mix_config(tmp_path, count=5, retrieval_task_weights=weights)
    with pytest.raises(ValueError, match="data.retrieval_task_weights"):
        retrieval_mix(config, make_tokenizer("bytes"), seq_len=160)
