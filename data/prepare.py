"""Prepared corpora: a source tokenized once into shards of flat token arrays, with a manifest.

Layout of a prepared directory:
  manifest.json             format version, tokenizer identity, the source in brief (kind,
                            path, file count, bytes, sha256 of source.json's description),
                            token dtype, and per finished unit its shards' document and
                            token counts; per split the totals. Its size grows with the
                            units (~4 MiB of text each), not with the files or documents:
                            training reads it, and nothing else of the source
  source.json               the source's files with their sizes (written when the
                            directory is started; read by nobody but a person)
  train/NNNNN.tokens        the unit's train documents' ids, one after another (raw,
                            little-endian uint16 or uint32)
  train/NNNNN.starts.npy    int64 [documents + 1]: where each document begins
  validation/NNNNN.*        the same for the held-out documents
A unit is a group of source files (text / stdlib: files up to ~UNIT_BYTES of text; jsonl,
parquet: one file each), numbered in the source's sorted order, so a prepare that is killed
and run again redoes only the units its manifest does not list: a unit's files are written
under temporary names and renamed, and the manifest (rewritten atomically) names it, only
once all of them are complete. Training never reads a unit the manifest does not name.

Why flat arrays + offsets (as nanoGPT and Levanter do) rather than ArrayRecord: the
training stream needs arbitrary slices of documents (pieces at any length), which one read
at an offset serves with no per-record decoding, and the format needs nothing but numpy.
Training reads the slices with pread (data/corpus.py TokenFile), not through a memory map,
whose touched pages would stay in the process's resident memory.

A refused prepare leaves nothing behind: what needs no reading is checked before anything
is written (`check_source`: a .gz that is not gzip, every file empty), and what shows only
when the files are read (a truncated .gz, malformed JSONL, a corpus without text:
`check_has_text`) is undone by `Undo`: the directory as it was before the command (not
there at all when the command made it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Iterator

import numpy as np

from data.corpus import Corpus, Shard, TokenFile, token_dtype
from data.sources import (SPLITS, check_gzip_signature, describe_files, file_documents,
                          in_validation, source_files)
from data.tokenizers import make_tokenizer

FORMAT_VERSION = 2       # 2: the file list in source.json, not in the manifest
READABLE_FORMATS = (1, 2)   # the shards of both are the same; 1 listed every file in the manifest
MANIFEST = "manifest.json"
SOURCE = "source.json"
UNIT_BYTES = 4 << 20      # text / stdlib sources: files grouped up to this much text


def tokenizer_identity(spec: str) -> dict:
    """What makes two tokenizers the same: their kind and the sha256 of their file."""
    if spec == "bytes":
        return {"kind": "bytes", "sha256": None}
    with open(spec, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    kind = "sentencepiece" if spec.endswith(".model") else "huggingface"
    return {"kind": kind, "sha256": digest}


def work_units(data_config) -> list[list[tuple[str, str]]]:
    """The source's files in prepare units (deterministic: sorted names, sizes)."""
    files = source_files(data_config)
    if data_config.source in ("jsonl", "parquet"):
        return [[f] for f in files]
    units, current, size = [], [], 0
    for path, name in files:
        file_size = os.path.getsize(path)
        if current and size + file_size > UNIT_BYTES:
            units.append(current)
            current, size = [], 0
        current.append((path, name))
        size += file_size
    return units + ([current] if current else [])


def source_description(data_config) -> dict:
    """The source in full, as source.json records it (files with sizes): a prepare into an
    existing directory must come from the same."""
    return {"source": data_config.source, "path": data_config.path,
            "text_field": data_config.text_field,
            "validation_percent": int(data_config.validation_percent),
            "files": [{"name": name, "size": os.path.getsize(path)}
                      for path, name in source_files(data_config)]}


def source_summary(description: dict) -> dict:
    """The source as the manifest records it: a few keys whatever the number of files (a
    training run reads the manifest, and memory must not grow with the corpus), with the
    sha256 of the full description standing for the file list."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":")).encode()
    return {**{key: description[key] for key in ("source", "path", "text_field",
                                                  "validation_percent")},
            "files": len(description["files"]),
            "bytes": sum(f["size"] for f in description["files"]),
            "sha256": hashlib.sha256(canonical).hexdigest()}


def _source_line(source: dict) -> str:
    files = source["files"]                      # a count (format 2) or the list (format 1)
    count = files if isinstance(files, int) else len(files)
    return f"{source['source']} {source['path']!r}, {count} files"


def _unit_name(index: int) -> str:
    return f"{index:05d}"


def _split_documents(data_config, files, skipped: list) -> Iterator[tuple[str, str]]:
    """(split, text) of the unit's documents in order; files that are not valid UTF-8 are
    left out and appended to `skipped`."""
    for path, name in files:
        documents = file_documents(data_config, path, name)
        if documents is None:
            skipped.append(path)
        for identity, text in documents or ():
            split = "validation" if in_validation(identity, data_config.validation_percent) \
                else "train"
            yield split, text


def prepare_unit(data_config, tokenizer_spec: str, out_dir: str, index: int,
                 files) -> dict:
    """Tokenize one unit into its shard files (written under temporary names, then renamed);
    returns {split: {"documents", "tokens"}, "skipped": [undecodable files]} for the
    manifest. Runs in a worker process. A unit that fails (a truncated .gz, malformed
    JSONL, ...) removes its temporary files and raises."""
    tokenizer = make_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.vocab_size)
    name = _unit_name(index)
    written, skipped = [], []
    counts = {"skipped": skipped}
    temporaries = {split: os.path.join(out_dir, split, name + ".tokens.tmp") for split in SPLITS}
    streams = {}
    starts = {split: [0] for split in SPLITS}
    try:
        for split in SPLITS:
            streams[split] = open(temporaries[split], "wb")
        for split, text in _split_documents(data_config, files, skipped):
            ids = np.asarray(tokenizer.encode(text), dtype)
            streams[split].write(ids.tobytes())
            starts[split].append(starts[split][-1] + ids.size)
        for stream in streams.values():
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        for stream in streams.values():
            stream.close()
        for path in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise
    for stream in streams.values():
        stream.close()
    for split in SPLITS:
        base = os.path.join(out_dir, split, name)
        np.save(base + ".starts.tmp.npy", np.asarray(starts[split], np.int64))
        written.append((base + ".tokens.tmp", base + ".tokens"))
        written.append((base + ".starts.tmp.npy", base + ".starts.npy"))
        counts[split] = {"documents": len(starts[split]) - 1, "tokens": int(starts[split][-1])}
    for temporary, final in written:
        os.replace(temporary, final)
    return counts


def _no_text(data_config, found: str) -> ValueError:
    return ValueError(f"data: {data_config.source} source {data_config.path!r} has no documents "
                      f"with text: {found}; nothing to prepare")


def check_source(data_config, units) -> None:
    """What can be refused without reading the files, before anything is written: a .gz
    file that does not start with the gzip signature, a source whose files are all empty.
    One ValueError line naming the file or saying what was found."""
    files = [path for unit in units for path, _ in unit]
    if data_config.source in ("text", "jsonl"):            # read gunzipped when .gz
        for path in files:
            if path.endswith(".gz"):
                check_gzip_signature(path)
    if data_config.source != "stdlib" and all(os.path.getsize(p) == 0 for p in files):
        raise _no_text(data_config, describe_files(len(files), len(files), []))


def check_has_text(data_config, manifest: dict, units) -> None:
    """A finished preparation without a token in either split (every file empty, not
    UTF-8 or without documents) is refused: one ValueError line saying what the files were."""
    if any(manifest["splits"][split]["tokens"] for split in SPLITS):
        return
    files = [path for unit in units for path, _ in unit]
    empty = sum(os.path.getsize(path) == 0 for path in files)
    raise _no_text(data_config, describe_files(len(files), empty, manifest["skipped_files"]))


def _read_bytes_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _outermost_missing(path: str) -> str | None:
    """The outermost directory of `path` (itself included) that does not exist yet: what a
    makedirs of `path` creates. None when `path` exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


class Undo:
    """Taken before a prepare writes into `out_dir`; `undo(units)` puts the directory back
    as it was: removed with every directory the prepare made when it was not there, else the
    units the prepare started (their shards and temporaries) removed and manifest.json /
    source.json restored. Finished units of earlier commands are kept."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.created = _outermost_missing(out_dir)
        self.saved: dict[str, bytes | None] = {}
        self.splits_existed = {split: os.path.isdir(os.path.join(out_dir, split))
                               for split in SPLITS}
        self.done: set[str] = set()
        if self.created is None:
            for name in (MANIFEST, SOURCE):
                self.saved[name] = _read_bytes_or_none(os.path.join(out_dir, name))
            manifest = read_manifest(out_dir)
            self.done = set(manifest["units"]) if manifest else set()

    def undo(self, units: int) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for split in SPLITS:
            for index in range(units):
                if _unit_name(index) in self.done:
                    continue
                base = os.path.join(self.out_dir, split, _unit_name(index))
                for suffix in (".tokens", ".starts.npy", ".tokens.tmp", ".starts.tmp.npy"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(base + suffix)
            if not self.splits_existed[split]:
                with contextlib.suppress(OSError):           # only if empty
                    os.rmdir(os.path.join(self.out_dir, split))
        for name, data in self.saved.items():
            path = os.path.join(self.out_dir, name)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + ".tmp")
            if data is None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            elif _read_bytes_or_none(path) != data:          # untouched: left as it is
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable manifest ({error})") from None


def _write_json(path: str, value) -> None:
    """Atomically: a reader sees the old file or the new one, never a part."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_manifest(out_dir: str, manifest: dict) -> None:
    _write_json(os.path.join(out_dir, MANIFEST), manifest)


def start_manifest(data_config, tokenizer_spec: str, out_dir: str) -> dict:
    """The manifest to continue: the directory's own (after checking that it was made
    from this source with this tokenizer; a format-1 one is brought to this format), or a
    new one. Creates the directories and source.json."""
    identity = tokenizer_identity(tokenizer_spec)
    description = source_description(data_config)
    summary = source_summary(description)
    manifest = read_manifest(out_dir)
    if manifest is not None:
        check_tokenizer(manifest, tokenizer_spec, out_dir)
        held = manifest.get("source")
        upgrade = manifest["format"] == 1 and held == description   # list to source.json
        if upgrade:
            held = summary
        if held != summary:
            raise ValueError(f"{out_dir} was prepared from another source ({_source_line(held)}); "
                             f"prepare into another data.prepare_dir")
        if upgrade or not os.path.exists(os.path.join(out_dir, SOURCE)):
            _write_json(os.path.join(out_dir, SOURCE), description)
        if upgrade:
            manifest["source"], manifest["format"] = summary, FORMAT_VERSION
            write_manifest(out_dir, manifest)
        return manifest
    vocab = make_tokenizer(tokenizer_spec).vocab_size
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    manifest = {"format": FORMAT_VERSION, "tokenizer": {**identity, "vocab_size": vocab},
                "token_dtype": token_dtype(vocab).name, "source": summary, "units": {},
                "complete": False}
    _write_json(os.path.join(out_dir, SOURCE), description)
    write_manifest(out_dir, manifest)
    return manifest


def check_tokenizer(manifest: dict, tokenizer_spec: str, where: str) -> None:
    """One clear line unless the manifest was made with this tokenizer."""
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{where}: prepared with format {manifest.get('format')}, this version "
                         f"reads formats {', '.join(map(str, READABLE_FORMATS))}; prepare it again")
    identity, saved = tokenizer_identity(tokenizer_spec), manifest["tokenizer"]
    if (saved["kind"], saved["sha256"]) != (identity["kind"], identity["sha256"]):
        raise ValueError(f"{where} was prepared with another tokenizer ({saved['kind']}, sha256 "
                         f"{saved['sha256']}); data.tokenizer {tokenizer_spec!r} is "
                         f"{identity['kind']}, sha256 {identity['sha256']}")


def record_unit(manifest: dict, index: int, counts: dict) -> None:
    manifest["units"][_unit_name(index)] = counts


def finish(manifest: dict, units: int) -> dict:
    """Per-split totals once every unit is done."""
    manifest["splits"] = {split: {key: sum(u[split][key] for u in manifest["units"].values())
                                  for key in ("documents", "tokens")} for split in SPLITS}
    manifest["skipped_files"] = sorted(p for u in manifest["units"].values() for p in u["skipped"])
    manifest["complete"] = len(manifest["units"]) == units
    return manifest


def open_prepared(path: str, split: str, tokenizer_spec: str) -> Corpus:
    """The `split` of the prepared directory `path` as a Corpus read from its files
    (TokenFile; only the document tables are loaded). One
    ValueError line for a missing or incomplete preparation, another tokenizer, or a shard
    file whose size or document table does not match the manifest (naming the file)."""
    manifest = read_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"data.path {path!r}: no {MANIFEST}; run --mode prepare first")
    check_tokenizer(manifest, tokenizer_spec, path)
    if not manifest.get("complete"):
        raise ValueError(f"{path}: the preparation is not complete ({len(manifest['units'])} "
                         f"units done); run --mode prepare again to finish it")
    dtype = np.dtype(manifest["token_dtype"])
    shards = []
    for unit in sorted(manifest["units"]):
        counts = manifest["units"][unit][split]
        if counts["documents"] == 0:
            continue
        base = os.path.join(path, split, unit)
        tokens_file, starts_file = base + ".tokens", base + ".starts.npy"
        for name in (tokens_file, starts_file):
            if not os.path.exists(name):
                raise ValueError(f"{name}: missing (the manifest lists unit {unit})")
        expected = counts["tokens"] * dtype.itemsize
        if os.path.getsize(tokens_file) != expected:
            raise ValueError(f"{tokens_file}: truncated or corrupt: {os.path.getsize(tokens_file)} "
                             f"bytes, the manifest says {expected}")
        try:
            starts = np.load(starts_file)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{starts_file}: corrupt ({error})") from None
        if (starts.shape != (counts["documents"] + 1,) or starts[0] != 0
                or starts[-1] != counts["tokens"] or np.any(np.diff(starts) < 0)):
            raise ValueError(f"{starts_file}: corrupt: its document table does not match the "
                             f"manifest ({counts['documents']} documents, "
                             f"{counts['tokens']} tokens)")
        tokens = (TokenFile(tokens_file, dtype, counts["tokens"]) if expected
                  else np.zeros(0, dtype))
        shards.append(Shard(tokens, starts.astype(np.int64, copy=False), tokens_file))
    if not shards:
        raise ValueError(f"{path}: the {split} split has no documents")
    return Corpus(shards, manifest["tokenizer"]["vocab_size"])
