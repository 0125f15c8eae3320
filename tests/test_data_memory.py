"""Host memory of the training data path does not grow with a prepared corpus (issue 19).

A scaled-down pair of prepared corpora of the same shape (one document per file, three in
four of 60-200 bytes, one of 2.2-6 KB; half held out), 1,200 and 48,000 files (0.9 MB and
54 MB of text). A subprocess per corpus runs what training runs on it with configs/tiny.py:
the stream from make_train_stream, 100 batches, then the end-of-training evaluation's reads
of the validation split (same-target windows of 128 documents and sliding windows, 128 ..
2048 tokens), and reports its peak RSS (VmHWM). Measured: +1.8 MiB from the small corpus to
the big one; before the fix +49.8 MiB, and this test failed: the manifest listed every
source file (parsed at every start, twice) and the token files were memory-mapped, so every
page a read touched (with the kernel's fault-around, 64 KB) stayed in the process's RSS,
growing with the part of the corpus read. The other tests pin the causes one by one (each
failed before the fix too).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.corpus import corpus_from_texts
from data.pipeline import load_corpus
from data.tokenizers import make_tokenizer
from data.windows import CorpusDocuments, same_target_windows, sliding_windows
from tests.helpers import data_config

BYTES = make_tokenizer("bytes")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, sys
from configs import tiny
from data.pipeline import make_train_stream
from data.tokenizers import make_tokenizer
from data.windows import (document_lengths, same_target_windows, sliding_windows,
                          validation_documents)
config = tiny.get_config()
config.data.source, config.data.path = "prepared", sys.argv[1]
tokenizer = make_tokenizer(config.data.tokenizer)
l_max, e = config.curriculum.l_max, config.eval
stream = make_train_stream(config.data, tokenizer, lengths=[l_max],
                           seed=config.data.shuffle_seed, l_max=l_max)
for _ in range(100):
    stream.next_batch(0, l_max, config.train.batch_size)
documents = validation_documents(config.data, tokenizer)
assert max(document_lengths(documents)) > 2048
lengths = [128, 256, 512, 1024, 2048]
rows = same_target_windows(documents, lengths, e.score_tokens or min(lengths),
                           e.max_batches * e.batch_size)
for length in lengths:
    sliding_windows(documents, length, min(e.sliding_stride, length), e.sliding_max_windows)
# VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across a vfork + exec
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak_kib": peak,
                  "documents": len(stream.documents.corpus), "windows": len(rows[2048]["tokens"])}))
"""


def write_corpus(directory, files: int, seed: int) -> str:
    """`files` documents, one file each: three in four of 60-200 bytes, one of 2.2-6 KB."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(ord("a"), ord("z") + 1, 1 << 20, dtype=np.uint8)
    pool[rng.integers(0, len(pool), len(pool) // 6)] = ord(" ")
    pool = pool.tobytes()
    os.makedirs(directory)
    for i in range(files):
        size = int(rng.integers(2200, 6000) if i % 4 == 0 else rng.integers(60, 200))
        start = int(rng.integers(0, len(pool) - size))
        with open(os.path.join(directory, f"{i:06d}.txt"), "wb") as f:
            f.write(pool[start:start + size])
    return os.path.join(directory, "*.txt")


def prepared(tmp_path, name, files):
    from ml_collections import config_dict
    from cli.prepare_mode import prepare_workdir
    glob = write_corpus(str(tmp_path / name), files, seed=len(name))
    config = config_dict.ConfigDict({"data": data_config(source="text", path=glob,
                                                         validation_percent=50)})
    config.data.prepare_dir = str(tmp_path / f"{name}_prepared")
    config.data.prepare_workers = 1
    prepare_workdir(config)
    return config.data.prepare_dir


def peak(directory) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, directory], cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_training_data_memory_does_not_grow_with_a_prepared_corpus(tmp_path):
    small = peak(prepared(tmp_path, "small", files=1_200))
    big = peak(prepared(tmp_path, "big", files=48_000))
    assert big["documents"] > 30 * small["documents"]
    assert small["windows"] == big["windows"] == 128   # as much evaluation on both
    grown_mib = (big["peak_kib"] - small["peak_kib"]) / 1024
    print(f"peak RSS {small['peak_kib'] / 1024:.0f} MiB ({small['documents']} train documents) "
          f"vs {big['peak_kib'] / 1024:.0f} MiB ({big['documents']}): +{grown_mib:.1f} MiB")
    assert grown_mib < 16, f"the data path's peak grew by {grown_mib:.1f} MiB with the corpus"


def test_a_prepared_corpus_is_read_without_mapping_its_token_files(tmp_path):
    """Pages of a memory map that a read touches stay in the process's RSS; a prepared
    corpus is read by offset (TokenFile), so no token file is mapped, whatever is read."""
    directory = prepared(tmp_path, "corpus", files=40)
    config = data_config(source="prepared", path=directory)
    corpus = load_corpus(config, BYTES, "train")
    for doc in range(len(corpus)):
        assert len(corpus.read(doc)) == corpus.lengths[doc]
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    assert ".tokens" not in maps


def test_the_manifest_that_training_reads_does_not_grow_with_the_files(tmp_path):
    small = json.loads(open(os.path.join(prepared(tmp_path, "small", files=20),
                                         "manifest.json")).read())
    big = json.loads(open(os.path.join(prepared(tmp_path, "big", files=2_000),
                                       "manifest.json")).read())
    assert len(small["units"]) == len(big["units"]) == 1
    assert len(json.dumps(big)) < len(json.dumps(small)) + 100     # the counts' digits


class CountingDocuments(CorpusDocuments):
    """Validation documents that count the tokens read from them."""

    def __init__(self, corpus):
        super().__init__(corpus)
        self.tokens_read = 0

    def __getitem__(self, index):
        document = super().__getitem__(index)
        self.tokens_read += len(document)
        return document

    def read(self, index, start, stop):
        tokens = super().read(index, start, stop)
        self.tokens_read += len(tokens)
        return tokens


def test_evaluation_windows_read_only_the_tokens_they_use():
    """Each same-target window is a document's last L + 1 tokens and the sliding windows
    stop after max_windows: long validation documents are not read whole (before, each of
    up to 128 documents was read whole, as int64, to take its last 2,049 tokens)."""
    rng = np.random.default_rng(0)
    lengths = [5_000, 200_000, 3_000, 150_000, 100]
    corpus = corpus_from_texts(["".join(rng.choice(list("abc "), n)) for n in lengths], BYTES)
    documents = CountingDocuments(corpus)
    rows = same_target_windows(documents, [128, 256, 1024], 128, 0)
    assert len(rows[1024]["tokens"]) == 4 and documents.tokens_read == 4 * 1025
    documents.tokens_read = 0
    rows = sliding_windows(documents, 1024, 256, 8)
    assert len(rows["tokens"]) == 8 and documents.tokens_read == 8 * 1025
