"""Tests of data/: documents (sources) and tokenizers. The training stream, the retrieval
mix and prepared corpora: tests/test_stream.py, tests/test_prepare.py."""
import gzip
import json
import logging
import re

import numpy as np
import pytest

from data.sources import _stdlib_files, list_documents
from data.tokenizers import Tokenizer, make_tokenizer
from tests.helpers import data_config, text_config, varied_texts, write_text_corpus

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


def test_a_parquet_file_that_is_not_parquet_is_one_error_line_naming_it(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("plain text, not Parquet\n" * 20)
    config = data_config(source="parquet", path=str(path), validation_percent=0)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a readable Parquet file "
                                         r"\(") as error:
        list_documents(config, "train")
    assert "\n" not in str(error.value), str(error.value)
    path.write_bytes(b"PAR1")                       # too short for a footer
    with pytest.raises(ValueError, match=f"^{path}: not a readable Parquet file"):
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
