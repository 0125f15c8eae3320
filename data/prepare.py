"""Prepared corpora: a source tokenized once into memory-mapped shards, with a manifest.

Layout of a prepared directory:
  manifest.json             format version, tokenizer identity, source (files, sizes),
                            token dtype, and per finished unit its shards' document and
                            token counts; per split the totals
  train/NNNNN.tokens        the unit's train documents' ids, one after another (raw,
                            little-endian uint16 or uint32)
  train/NNNNN.starts.npy    int64 [documents + 1]: where each document begins
  validation/NNNNN.*        the same for the held-out documents
A unit is a group of source files (text / stdlib: files up to ~UNIT_BYTES of text; jsonl,
parquet: one file each), numbered in the source's sorted order, so a prepare that is killed
and run again redoes only the units its manifest does not list: a unit's files are written
under temporary names and renamed, and the manifest (rewritten atomically) names it, only
once all of them are complete. Training never reads a unit the manifest does not name.

Why flat arrays + offsets read by memory map (as nanoGPT and Levanter do) rather than
ArrayRecord: the training stream needs arbitrary slices of documents (pieces at any
length), which a memory map serves with no per-record decoding, and the format needs
nothing but numpy.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import numpy as np

from data.corpus import Corpus, Shard, token_dtype
from data.sources import SPLITS, file_documents, in_validation, source_files
from data.tokenizers import make_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    """The source as the manifest records it (files with sizes): a prepare into an
    existing directory must come from the same."""
    return {"source": data_config.source, "path": data_config.path,
            "text_field": data_config.text_field,
            "validation_percent": int(data_config.validation_percent),
            "files": [{"name": name, "size": os.path.getsize(path)}
                      for path, name in source_files(data_config)]}


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
    manifest. Runs in a worker process."""
    tokenizer = make_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.vocab_size)
    name = _unit_name(index)
    written, skipped = [], []
    counts = {"skipped": skipped}
    streams = {split: open(os.path.join(out_dir, split, name + ".tokens.tmp"), "wb")
               for split in SPLITS}
    starts = {split: [0] for split in SPLITS}
    try:
        for split, text in _split_documents(data_config, files, skipped):
            ids = np.asarray(tokenizer.encode(text), dtype)
            streams[split].write(ids.tobytes())
            starts[split].append(starts[split][-1] + ids.size)
    finally:
        for stream in streams.values():
            stream.flush()
            os.fsync(stream.fileno())
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


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable manifest ({error})") from None


def write_manifest(out_dir: str, manifest: dict) -> None:
    """Atomically: a reader sees the old manifest or the new one, never a part."""
    path = os.path.join(out_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def start_manifest(data_config, tokenizer_spec: str, out_dir: str) -> dict:
    """The manifest to continue: the directory's own (after checking that it was made
    from this source with this tokenizer), or a new one. Creates the directories."""
    identity = tokenizer_identity(tokenizer_spec)
    source = source_description(data_config)
    manifest = read_manifest(out_dir)
    if manifest is not None:
        check_tokenizer(manifest, tokenizer_spec, out_dir)
        if manifest.get("source") != source:
            raise ValueError(f"{out_dir} was prepared from another source ({manifest['source']['source']} "
                             f"{manifest['source']['path']!r}, {len(manifest['source']['files'])} "
                             f"files); prepare into another data.prepare_dir")
        return manifest
    vocab = make_tokenizer(tokenizer_spec).vocab_size
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    manifest = {"format": FORMAT_VERSION, "tokenizer": {**identity, "vocab_size": vocab},
                "token_dtype": token_dtype(vocab).name, "source": source, "units": {},
                "complete": False}
    write_manifest(out_dir, manifest)
    return manifest


def check_tokenizer(manifest: dict, tokenizer_spec: str, where: str) -> None:
    """One clear line unless the manifest was made with this tokenizer."""
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{where}: prepared with format {manifest.get('format')}, this version "
                         f"reads format {FORMAT_VERSION}; prepare it again")
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
    """The `split` of the prepared directory `path` as a memory-mapped Corpus. One
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
                             f"manifest ({counts['documents']} documents, {counts['tokens']} tokens)")
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        shards.append(Shard(tokens, starts.astype(np.int64), tokens_file))
    if not shards:
        raise ValueError(f"{path}: the {split} split has no documents")
    return Corpus(shards, manifest["tokenizer"]["vocab_size"])
