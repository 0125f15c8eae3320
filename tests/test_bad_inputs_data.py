"""The catalogue of bad corpora (data/sources.py, data/prepare.py, --mode prepare): a .gz
file that is truncated, corrupt or not gzip at all, and a corpus without text (no file,
empty files, files that all fail to decode). Each is one ValueError / OSError line naming
the file or saying what was found (main.py prints it as `error: ...`, exit 2), in
`--mode prepare` and when training reads the corpus; a refused prepare leaves
data.prepare_dir as it was (not there at all when it was not there before)."""
import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from data import prepare as prepare_lib
from data.pipeline import load_corpus
from data.sources import list_documents
from data.tokenizers import make_tokenizer
from tests.helpers import data_config, varied_texts, write_text_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = make_tokenizer("bytes")


def prepare(config, out_dir):
    """What --mode prepare does, in this process (one worker process)."""
    from ml_collections import config_dict
    from cli.prepare_mode import prepare_workdir
    wrapper = config_dict.ConfigDict({"data": config})
    wrapper.data.prepare_dir = str(out_dir)
    wrapper.data.prepare_workers = 1
    return prepare_workdir(wrapper)


def jsonl_gz(texts) -> bytes:
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts)
    return gzip.compress(lines.encode("utf-8"))


def gz_corpus(directory, files):
    """Files name -> bytes in `directory`; the jsonl config over its *.jsonl.gz."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return data_config(source="jsonl", path=str(directory / "*.jsonl.gz"), validation_percent=0)


GOOD = jsonl_gz(varied_texts(40, min_len=200, max_len=400))
TRUNCATED = GOOD[:len(GOOD) // 2]                  # a download cut short
NOT_GZIP = b'{"text": "plain JSONL, not gzip"}\n'


def refused(out):
    """The prepare directory `out` was never created (nor its parent, made for the test)."""
    return not out.exists() and not out.parent.exists()


# ------------------------------------------------------------------ .gz: prepare
def test_prepare_of_a_truncated_gz_names_the_file_and_creates_no_directory(tmp_path):
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD, "b.jsonl.gz": TRUNCATED})
    out = tmp_path / "new" / "prepared"
    bad = tmp_path / "corpus" / "b.jsonl.gz"
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: truncated gzip file: "
                                         "the compressed stream ends before its end-of-stream"):
        prepare(config, out)
    assert refused(out)                 # the good unit's shards went with it


def test_prepare_of_a_file_misnamed_gz_is_refused_before_anything_is_written(tmp_path):
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD, "b.jsonl.gz": NOT_GZIP})
    out = tmp_path / "new" / "prepared"
    bad = tmp_path / "corpus" / "b.jsonl.gz"
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: not a gzip file: .*"
                                         "does not start with the gzip signature 1f 8b"):
        prepare(config, out)
    assert refused(out)


def test_a_refused_prepare_into_an_existing_empty_directory_leaves_it_empty(tmp_path):
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD, "b.jsonl.gz": TRUNCATED})
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(ValueError, match="b.jsonl.gz: truncated gzip file"):
        prepare(config, out)
    assert os.listdir(out) == []


def test_a_refused_resume_keeps_the_finished_units_and_the_manifest_as_they_were(tmp_path):
    """A unit finished by an earlier (interrupted) prepare stays; the units this command
    started (b finished, c refused) and its manifest changes are undone."""
    config = gz_corpus(tmp_path / "corpus", {name: GOOD for name in
                                              ("a.jsonl.gz", "b.jsonl.gz", "c.jsonl.gz")})
    out = tmp_path / "prepared"
    units = prepare_lib.work_units(config)
    manifest = prepare_lib.start_manifest(config, "bytes", str(out))
    prepare_lib.record_unit(manifest, 0, prepare_lib.prepare_unit(config, "bytes", str(out), 0,
                                                                  units[0]))
    prepare_lib.write_manifest(str(out), manifest)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    bad = tmp_path / "corpus" / "c.jsonl.gz"        # damaged in place: same size, same source
    bad.write_bytes(GOOD[:-8] + bytes(8))           # its checksum and length zeroed
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: corrupt gzip file"):
        prepare(config, out)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


# ------------------------------------------------------------------ .gz: training
def test_training_from_a_truncated_gz_names_the_file(tmp_path):
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD, "b.jsonl.gz": TRUNCATED})
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'corpus' / 'b.jsonl.gz'))}"
                                         ": truncated gzip file"):
        load_corpus(config, BYTES, "train")


def test_training_from_a_file_misnamed_gz_names_the_file(tmp_path):
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": NOT_GZIP})
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'corpus' / 'a.jsonl.gz'))}"
                                         ": not a gzip file"):
        load_corpus(config, BYTES, "train")


def test_training_from_a_gz_with_a_bad_checksum_names_the_file(tmp_path):
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD[:-8] + bytes(8)})
    with pytest.raises(ValueError, match=r"a\.jsonl\.gz: corrupt gzip file \(CRC check failed"):
        load_corpus(config, BYTES, "train")


def test_a_gz_of_text_that_is_not_utf8_is_skipped_as_documented(tmp_path, caplog):
    """A .gz whose content is not UTF-8 is a text file that is not UTF-8: skipped with a
    warning, not an error (docs/usage.md), in training and in prepare."""
    config = gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD,
                                              "b.jsonl.gz": gzip.compress(b"\xff\xfe" * 50)})
    documents = list_documents(config, "train")
    assert len(documents) == 40 and documents.skipped_files == [
        str(tmp_path / "corpus" / "b.jsonl.gz")]
    assert "skipped 1 file(s)" in caplog.text
    manifest = prepare(config, tmp_path / "prepared")
    assert manifest["splits"]["train"]["documents"] == 40
    assert manifest["skipped_files"] == documents.skipped_files


# ------------------------------------------------------------------ no documents
def test_prepare_of_an_empty_directory_names_the_glob_and_creates_nothing(tmp_path):
    (tmp_path / "corpus").mkdir()
    config = data_config(source="text", path=str(tmp_path / "corpus" / "*.txt"))
    out = tmp_path / "new" / "prepared"
    with pytest.raises(FileNotFoundError, match="the glob '.*corpus/\\*.txt' matches no file"):
        prepare(config, out)
    assert refused(out)


def test_prepare_of_empty_files_says_they_are_all_empty_and_creates_nothing(tmp_path):
    glob = write_text_corpus(tmp_path / "corpus", ["", "", ""])
    config = data_config(source="text", path=glob)
    out = tmp_path / "new" / "prepared"
    with pytest.raises(ValueError, match=f"^data: text source {re.escape(repr(glob))} has no "
                                         "documents with text: 3 files, all empty; nothing"):
        prepare(config, out)
    assert refused(out)


def test_prepare_of_an_all_binary_corpus_says_every_file_was_skipped_and_creates_nothing(
        tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_bytes(bytes(range(128, 256)) * 8)
    config = data_config(source="text", path=str(tmp_path / "corpus" / "*.txt"))
    out = tmp_path / "new" / "prepared"
    with pytest.raises(ValueError, match="has no documents with text: 3 files, all failed to "
                                         "decode as UTF-8 and were skipped .binary.., e.g. "
                                         f"{re.escape(str(tmp_path / 'corpus' / '0.txt'))}"):
        prepare(config, out)
    assert refused(out)


def test_prepare_of_jsonl_without_text_says_so_and_creates_nothing(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    (tmp_path / "corpus" / "b.jsonl").write_text("")
    config = data_config(source="jsonl", path=str(tmp_path / "corpus" / "*.jsonl"))
    out = tmp_path / "new" / "prepared"
    with pytest.raises(ValueError, match="has no documents with text: 2 files: 1 empty, "
                                         "1 without text; nothing to prepare"):
        prepare(config, out)
    assert refused(out)


def test_training_on_empty_files_says_they_are_all_empty(tmp_path):
    glob = write_text_corpus(tmp_path / "corpus", ["", "", ""])
    config = data_config(source="text", path=glob, validation_percent=0)
    with pytest.raises(ValueError, match="has only empty documents .none with 2 or more "
                                         "tokens. in the train split: 3 files, all empty$"):
        load_corpus(config, BYTES, "train")


def test_training_on_an_all_binary_corpus_says_every_file_failed_to_decode(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(2):
        (tmp_path / "corpus" / f"{i}.txt").write_bytes(b"\xff\xfe" * 64)
    config = data_config(source="text", path=str(tmp_path / "corpus" / "*.txt"),
                         validation_percent=0)
    with pytest.raises(ValueError, match="has no documents in the train split: 2 files, all "
                                         "failed to decode as UTF-8 and were skipped"):
        load_corpus(config, BYTES, "train")


# ------------------------------------------------------------------ through main.py
def main_error_line(tmp_path, *args):
    """main.py on the small config over tmp_path/corpus/*.jsonl.gz: exit 2, no traceback,
    and its one `error:` line."""
    result = subprocess.run(
        [sys.executable, "main.py", "--config", "tests/small_config.py",
         "--config.data.source=jsonl", f"--config.data.path={tmp_path / 'corpus' / '*.jsonl.gz'}",
         *args], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


TRUNCATED_LINE = ("truncated gzip file: the compressed stream ends before its end-of-stream "
                  "marker (a download or copy cut short?)")


@pytest.mark.slow
def test_main_prepare_of_a_truncated_gz_is_one_error_line_and_creates_nothing(tmp_path):
    gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD, "b.jsonl.gz": TRUNCATED})
    out = tmp_path / "prepared"
    line = main_error_line(tmp_path, "--mode", "prepare", f"--config.data.prepare_dir={out}",
                           "--config.data.prepare_workers=2")
    assert line == f"error: {tmp_path / 'corpus' / 'b.jsonl.gz'}: {TRUNCATED_LINE}"
    assert not out.exists()


@pytest.mark.slow
def test_main_training_on_a_truncated_gz_is_one_error_line_and_creates_no_workdir(tmp_path):
    gz_corpus(tmp_path / "corpus", {"a.jsonl.gz": GOOD, "b.jsonl.gz": TRUNCATED})
    line = main_error_line(tmp_path, "--workdir", str(tmp_path / "run"), "--config.train.steps=2")
    assert line == f"error: {tmp_path / 'corpus' / 'b.jsonl.gz'}: {TRUNCATED_LINE}"
    assert not (tmp_path / "run").exists()
