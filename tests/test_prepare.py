"""Specification of prepared corpora (data/prepare.py, --mode prepare): the manifest, the
same stream as on the fly, resuming an interrupted prepare, and clear errors for shards
that are damaged or were made with another tokenizer."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import prepare as prepare_lib
from data.pipeline import load_corpus, make_train_stream
from data.tokenizers import make_tokenizer, write_byte_tokenizer_json
from tests.helpers import assert_batches_equal, text_config, varied_texts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = make_tokenizer("bytes")


def prepare(config, out_dir, workers=1):
    """What --mode prepare does, in this process (one worker) or through main.py."""
    from ml_collections import config_dict
    from cli.prepare_mode import prepare_workdir
    wrapper = config_dict.ConfigDict({"data": config})
    wrapper.data.prepare_dir = str(out_dir)
    wrapper.data.prepare_workers = workers
    return prepare_workdir(wrapper)


@pytest.fixture
def corpus_config(tmp_path, monkeypatch):
    """60 text files of up to 400 bytes, prepared in units of ~2 KB (about 10 units)."""
    monkeypatch.setattr(prepare_lib, "UNIT_BYTES", 2048)
    return text_config(tmp_path, varied_texts(60, max_len=400), validation_percent=10)


def test_the_manifest_records_tokenizer_source_and_counts(corpus_config, tmp_path):
    manifest = prepare(corpus_config, tmp_path / "prepared")
    assert manifest["format"] == prepare_lib.FORMAT_VERSION and manifest["complete"]
    assert manifest["tokenizer"] == {"kind": "bytes", "sha256": None, "vocab_size": 256}
    assert manifest["token_dtype"] == "uint16"
    # the file list is in source.json; the manifest (which training reads) has its summary,
    # a few keys whatever the number of files
    source = json.loads((tmp_path / "prepared" / prepare_lib.SOURCE).read_text())
    files = source["files"]
    assert len(files) == 60 and all(f["size"] > 0 for f in files)
    assert manifest["source"] == prepare_lib.source_summary(source)
    assert manifest["source"]["files"] == 60
    assert manifest["source"]["bytes"] == sum(f["size"] for f in files)
    assert len(manifest["units"]) == len(prepare_lib.work_units(corpus_config)) > 5
    train = load_corpus(corpus_config, BYTES, "train")
    validation = load_corpus(corpus_config, BYTES, "validation")
    assert manifest["splits"]["train"] == {"documents": len(train), "tokens": train.total_tokens}
    assert manifest["splits"]["validation"] == {"documents": len(validation),
                                                "tokens": validation.total_tokens}
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text()) == manifest


def test_the_prepared_stream_equals_the_on_the_fly_stream_token_for_token(corpus_config, tmp_path):
    prepare(corpus_config, tmp_path / "prepared")
    prepared = corpus_config.copy_and_resolve_references()
    prepared.source, prepared.path = "prepared", str(tmp_path / "prepared")
    a = make_train_stream(corpus_config, BYTES, lengths=[32, 64], seed=5)
    b = make_train_stream(prepared, BYTES, lengths=[32, 64], seed=5)
    for step in range(12):
        level, length, rows = (0, 32, 8) if step < 6 else (1, 64, 4)
        assert_batches_equal([a.next_batch(level, length, rows)],
                             [b.next_batch(level, length, rows)])
    for x, y in zip(load_corpus(corpus_config, BYTES, "validation").documents(),
                    load_corpus(prepared, BYTES, "validation").documents()):
        np.testing.assert_array_equal(x, y)


def test_an_interrupted_prepare_keeps_finished_units_and_never_exposes_a_partial_one(
        corpus_config, tmp_path):
    out = tmp_path / "prepared"
    units = prepare_lib.work_units(corpus_config)
    manifest = prepare_lib.start_manifest(corpus_config, "bytes", str(out))
    for index in range(3):                                 # three units finished ...
        prepare_lib.record_unit(manifest, index, prepare_lib.prepare_unit(
            corpus_config, "bytes", str(out), index, units[index]))
        prepare_lib.write_manifest(str(out), manifest)
    (out / "train" / "00003.tokens.tmp").write_bytes(b"\x01\x02")   # ... one killed mid-write
    prepared = corpus_config.copy_and_resolve_references()
    prepared.source, prepared.path = "prepared", str(out)
    with pytest.raises(ValueError, match="not complete .3 units done.; run --mode prepare again"):
        load_corpus(prepared, BYTES, "train")
    kept = {name: os.path.getmtime(out / "train" / f"{name}.tokens") for name in ("00000", "00002")}
    manifest = prepare(corpus_config, out)
    assert manifest["complete"] and len(manifest["units"]) == len(units)
    assert {name: os.path.getmtime(out / "train" / f"{name}.tokens") for name in kept} == kept
    assert not list((out / "train").glob("*.tmp"))
    np.testing.assert_array_equal(load_corpus(prepared, BYTES, "train").lengths,
                                  load_corpus(corpus_config, BYTES, "train").lengths)


def test_a_prepare_with_another_tokenizer_is_refused(corpus_config, tmp_path):
    prepare(corpus_config, tmp_path / "prepared")
    other = write_byte_tokenizer_json(str(tmp_path / "tokenizer.json"))
    corpus_config.tokenizer = other
    with pytest.raises(ValueError, match="prepared with another tokenizer .bytes"):
        prepare(corpus_config, tmp_path / "prepared")
    corpus_config.source, corpus_config.path = "prepared", str(tmp_path / "prepared")
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        load_corpus(corpus_config, make_tokenizer(other), "train")


def test_a_prepare_of_another_source_into_the_same_directory_is_refused(corpus_config, tmp_path):
    prepare(corpus_config, tmp_path / "prepared")
    other = text_config(tmp_path / "other", varied_texts(5))
    with pytest.raises(ValueError, match="prepared from another source"):
        prepare(other, tmp_path / "prepared")


def test_a_format_1_directory_still_trains_and_a_prepare_into_it_continues(corpus_config,
                                                                          tmp_path):
    """Format 1 listed every source file in the manifest (which training reads, so memory
    grew with the corpus); its shards are the same: training reads it, and a prepare into it
    moves the list to source.json and continues (or refuses another source)."""
    out = tmp_path / "prepared"
    prepare(corpus_config, out)
    manifest = json.loads((out / "manifest.json").read_text())
    description = json.loads((out / prepare_lib.SOURCE).read_text())
    last = sorted(manifest["units"])[-1]
    old = dict(json.loads(json.dumps(manifest)), format=1, source=description, complete=False)
    del old["units"][last]                       # an interrupted format-1 prepare
    old.pop("splits"), old.pop("skipped_files")
    (out / prepare_lib.SOURCE).unlink()
    (out / "manifest.json").write_text(json.dumps(old))
    other = text_config(tmp_path / "other", varied_texts(5))
    with pytest.raises(ValueError, match="prepared from another source .text .*, 60 files"):
        prepare(other, out)
    assert prepare(corpus_config, out) == manifest
    assert json.loads((out / prepare_lib.SOURCE).read_text()) == description
    finished = json.loads((out / "manifest.json").read_text())
    finished["format"], finished["source"] = 1, description      # a complete format-1 one
    (out / "manifest.json").write_text(json.dumps(finished))
    config = corpus_config.copy_and_resolve_references()
    config.source, config.path = "prepared", str(out)
    a = make_train_stream(config, BYTES, lengths=[32, 64], seed=5)
    b = make_train_stream(corpus_config, BYTES, lengths=[32, 64], seed=5)
    for step in range(4):
        level, length = step % 2, 32 * (1 + step % 2)
        assert_batches_equal([a.next_batch(level, length, 4)], [b.next_batch(level, length, 4)])
    finished["format"] = 3
    (out / "manifest.json").write_text(json.dumps(finished))
    with pytest.raises(ValueError, match="prepared with format 3, this version reads formats 1, 2"):
        load_corpus(config, BYTES, "train")


@pytest.fixture
def prepared_dir(corpus_config, tmp_path):
    prepare(corpus_config, tmp_path / "prepared")
    config = corpus_config.copy_and_resolve_references()
    config.source, config.path = "prepared", str(tmp_path / "prepared")
    return config, tmp_path / "prepared"


def test_a_truncated_shard_is_an_error_naming_the_file(prepared_dir):
    config, out = prepared_dir
    shard = out / "train" / "00001.tokens"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{shard}: truncated or corrupt"):
        load_corpus(config, BYTES, "train")


def test_a_corrupt_document_table_is_an_error_naming_the_file(prepared_dir):
    config, out = prepared_dir
    table = out / "train" / "00002.starts.npy"
    starts = np.load(table)
    starts[1] = starts[-1] + 5
    np.save(table, starts)
    with pytest.raises(ValueError, match=f"{table}: corrupt"):
        load_corpus(config, BYTES, "train")
    table.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=f"{table}: corrupt"):
        load_corpus(config, BYTES, "train")


def test_token_ids_outside_the_vocabulary_are_an_error_naming_the_file(prepared_dir):
    config, out = prepared_dir
    shard = out / "train" / "00000.tokens"
    data = np.fromfile(shard, np.uint16)
    data[3] = 999
    data.tofile(shard)
    corpus = load_corpus(config, BYTES, "train")
    with pytest.raises(ValueError, match=f"{shard}: corrupt: token id 999"):
        corpus.read(0)


def test_training_from_a_prepared_directory_before_the_prepare_is_an_error(tmp_path):
    config = text_config(tmp_path, varied_texts(3))
    config.source, config.path = "prepared", str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no manifest.json; run --mode prepare first"):
        load_corpus(config, BYTES, "train")


@pytest.mark.slow
def test_main_prepare_uses_worker_processes_and_a_run_trains_from_it(tmp_path):
    """Four JSONL files (a unit each) prepared by two worker processes, then trained on."""
    texts = varied_texts(80, min_len=200, max_len=3000)
    (tmp_path / "corpus").mkdir()
    for part in range(4):
        with open(tmp_path / "corpus" / f"part{part}.jsonl", "w") as f:
            for text in texts[part * 20:(part + 1) * 20]:
                f.write(json.dumps({"text": text}) + "\n")
    out = tmp_path / "prepared"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "main.py", "--mode", "prepare", "--config",
                             "tests/small_config.py", "--config.data.source=jsonl",
                             f"--config.data.path={tmp_path / 'corpus' / '*.jsonl'}",
                             "--config.data.validation_percent=25",
                             f"--config.data.prepare_dir={out}", "--config.data.prepare_workers=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 units of jsonl" in result.stdout and "2 worker processes" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]
    assert sorted(manifest["units"]) == ["00000", "00001", "00002", "00003"]
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "validation")) == 80
    result = subprocess.run([sys.executable, "main.py", "--config", "tests/small_config.py",
                             "--workdir", str(tmp_path / "run"), "--config.data.source=prepared",
                             f"--config.data.path={out}", "--config.train.steps=2",
                             "--config.eval.lengths=(64,)", "--config.eval.sliding_stride=0",
                             "--config.eval.max_batches=1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stdout
