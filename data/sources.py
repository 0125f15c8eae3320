"""Document sources: the text of every document of a split, in a fixed order.

Sources (`data.source`): "stdlib" (the interpreter's standard-library *.py files), "text"
(one document per file), "jsonl" (one per line, field `data.text_field`), "parquet" (one per
row, column `data.text_field`). `data.path` is a file or a glob; .gz files are read
gunzipped (one that is not gzip, is truncated or is corrupt is a ValueError naming it). A
document is held out for validation by a stable hash of its identity. Files that are not
valid UTF-8 are skipped (counted, and a warning); a split without a document with text is
a ValueError saying what the files were (all empty, all skipped as not UTF-8, ...).
"""
from __future__ import annotations

import glob as glob_lib
import gzip
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")


SOURCES = ("stdlib", "text", "jsonl", "parquet")   # read as texts
PREPARED = "prepared"          # tokens data/prepare.py wrote (data.source's other value)


class DocumentList(list):
    """The document texts of a split (a plain list of str), plus `skipped_files`: the files
    of that split that were not valid UTF-8 and were left out."""

    def __init__(self, texts: Sequence[str] = (), skipped_files: Sequence[str] = ()):
        super().__init__(texts)
        self.skipped_files = list(skipped_files)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)


def in_validation(identity: str, validation_percent: int) -> bool:
    """Whether the document named `identity` is held out: a stable hash (not Python's
    salted hash()) of the name, taken modulo 100, is below validation_percent."""
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < validation_percent


def _wanted(identity: str, split: str, validation_percent: int) -> bool:
    return in_validation(identity, validation_percent) == (split == "validation")


def _stdlib_files() -> list[tuple[str, str]]:
    """(absolute path, relative path) of the interpreter's standard-library *.py files,
    sorted by relative path, without site-packages / dist-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                files.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(files, key=lambda f: f[1])


def _glob_root(pattern: str) -> str:
    """The directory part of `pattern` before its first wildcard: names are made relative
    to it, so the split does not depend on where the corpus lies on disk."""
    parts = pattern.split(os.sep)
    for i, part in enumerate(parts):
        if glob_lib.has_magic(part):
            return os.sep.join(parts[:i]) or "."
    return os.path.dirname(pattern) or "."


def _matched_files(pattern: str) -> list[tuple[str, str]]:
    """(path, name relative to the glob's root) of the files `pattern` matches, sorted.
    Raises when the pattern is empty, names a missing file or matches nothing."""
    if not pattern:
        raise ValueError("data.path is empty: give a file or a glob of files")
    if not glob_lib.has_magic(pattern):
        if os.path.isdir(pattern):
            raise ValueError(f"data.path {pattern!r} is a directory: give a glob such as "
                             f"'{os.path.join(pattern, '**', '*.txt')}'")
        if not os.path.isfile(pattern):
            raise FileNotFoundError(f"data.path: no such file {pattern!r}")
    paths = sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"data.path: the glob {pattern!r} matches no file")
    root = _glob_root(pattern)
    return sorted(((p, os.path.relpath(p, root).replace(os.sep, "/")) for p in paths),
                  key=lambda f: f[1])


GZIP_SIGNATURE = b"\x1f\x8b"


def check_gzip_signature(path: str) -> None:
    """A ValueError naming `path` (a .gz file) unless it is empty or starts as gzip does:
    a cheap check, before anything is read or written, that catches a file misnamed .gz
    (a truncated or corrupt stream shows only when it is read: _read_bytes)."""
    with open(path, "rb") as f:
        head = f.read(len(GZIP_SIGNATURE))
    if head and head != GZIP_SIGNATURE:
        raise ValueError(f"{path}: not a gzip file: its name ends in .gz but it does not start "
                         f"with the gzip signature 1f 8b (it starts {head!r})")


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped if its name ends in .gz: a .gz file that is not gzip, is
    truncated (a download or copy cut short) or is corrupt is one ValueError line naming it
    (gzip raises EOFError, BadGzipFile or zlib.error, none of which names the file)."""
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise ValueError(f"{path}: truncated gzip file: the compressed stream ends before its "
                         f"end-of-stream marker (a download or copy cut short?)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        check_gzip_signature(path)
        cause = (": what follows its gzip stream is not gzip"       # gzip reads on: members
                 if str(error).startswith("Not a gzipped") else "")
        raise ValueError(f"{path}: corrupt gzip file{cause} ({_first_line(error)})") from None


def _read_utf8(path: str) -> str | None:
    """The file's text (gunzipped if it ends in .gz), or None if it is not valid UTF-8."""
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_texts(path: str, name: str, text: str, field: str) -> Iterator[tuple[str, str]]:
    """(identity "name:line", text) of each non-blank line of a JSONL file."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{line_number}: no field {field!r} (data.text_field)")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{line_number}: field {field!r} is "
                             f"{type(value).__name__}, not a string")
        yield f"{name}:{line_number}", value


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _parquet_texts(path: str, name: str, field: str) -> Iterator[tuple[str, str]]:
    """(identity "name:row", text) of each row of a Parquet file (rows from 0; nulls are
    empty documents). A file that is not Parquet (or is damaged) is one ValueError line
    naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None
    if field not in parquet_file.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (data.text_field); columns: "
                         f"{', '.join(parquet_file.schema_arrow.names)}")
    try:
        column = parquet_file.read(columns=[field]).column(field).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None
    for row, value in enumerate(column):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: row {row} of column {field!r} is "
                             f"{type(value).__name__}, not a string")
        yield f"{name}:{row}", value or ""


def source_files(data_config) -> list[tuple[str, str]]:
    """(path, name) of the files of the configured source, sorted by name; the name (the
    path relative to the glob's root) is what the validation split hashes."""
    source = data_config.source
    if source == "stdlib":
        return _stdlib_files()
    if source in ("text", "jsonl", "parquet"):
        return _matched_files(data_config.path)
    raise ValueError(f"data.source {source!r} is not one of {', '.join(SOURCES + ('prepared',))}")


def file_documents(data_config, path: str, name: str) -> Iterator[tuple[str, str]] | None:
    """(identity, text) of every document of one source file, in file order, both splits
    (`in_validation(identity, ...)` tells them apart); None for a text file that is not
    valid UTF-8. Raises ValueError for malformed JSONL or a missing column / field."""
    source, field = data_config.source, data_config.text_field
    if source == "parquet":
        return _parquet_texts(path, name, field)
    text = _read_utf8(path)
    if text is None:
        return None
    if source == "jsonl":
        return _jsonl_texts(path, name, text, field)
    return iter([(name, text)])


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def describe_files(files: int, empty: int, skipped: Sequence[str], elsewhere: int = 0,
                   validation_percent: int | None = None) -> str:
    """What the `files` read of a source without text were, for its error line: "3 files,
    all empty", "2 files, all failed to decode as UTF-8 and were skipped (binary?), e.g.
    ...", or the mix ("4 files: 1 empty, 2 skipped as not valid UTF-8 (...), 1 with text
    in the other split only (validation_percent=10)"). `empty`: files of 0 bytes (the
    other files without text, blank lines or empty fields, are "without text");
    `elsewhere`: files whose text is all in the other split."""
    skipped = list(skipped)
    if files == empty:
        return _count(files, "file") + (", all empty" if files > 1 else ", empty")
    if files == len(skipped):
        were = "were" if files > 1 else "was"
        return (_count(files, "file") + (", all" if files > 1 else ",") + " failed to decode "
                f"as UTF-8 and {were} skipped (binary?), e.g. {skipped[0]}")
    parts = [f"{empty} empty"] if empty else []
    if skipped:
        parts.append(f"{len(skipped)} skipped as not valid UTF-8 (failed to decode, e.g. "
                     f"{skipped[0]})")
    rest = files - empty - len(skipped) - elsewhere
    if elsewhere:
        parts.append(f"{elsewhere} with text in the other split only"
                     + ("" if validation_percent is None
                        else f" (validation_percent={validation_percent})"))
    if rest == files:
        return _count(files, "file") + (", all" if files > 1 else ",") + " without text"
    if rest:
        parts.append(f"{rest} without text")
    return f"{_count(files, 'file')}: {', '.join(parts)}"


def list_documents(data_config, split: str) -> DocumentList:
    """The document texts of `split` ("train" or "validation") of the configured source, in
    a deterministic order (files sorted by relative path, rows in file order).

    A document goes to validation when a hash of its identity (relative path of a file;
    "path:line" of a JSONL line, "path:row" of a Parquet row) modulo 100 is below
    data_config.validation_percent. Files that are not valid UTF-8 are left out, counted in
    the result's `skipped_files` and logged as a warning. Raises ValueError or
    FileNotFoundError, with one line naming the problem, for an unknown source, a missing
    path, a glob that matches nothing, a .gz file that is not gzip, truncated or corrupt,
    malformed JSONL, a missing column/field, or a split without a document with text (its
    files all empty, all failed to decode, ...: the line says what they were).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    source, percent = data_config.source, data_config.validation_percent
    texts, skipped = [], []
    files = source_files(data_config)
    read = empty = elsewhere = 0
    for path, name in files:
        if source in ("stdlib", "text") and not _wanted(name, split, percent):
            continue                      # one document per file: skip without reading it
        read += 1
        documents = file_documents(data_config, path, name)
        if documents is None:
            skipped.append(path)
            continue
        has_text = has_text_here = False
        for identity, text in documents:
            has_text = has_text or bool(text)
            if _wanted(identity, split, percent):
                texts.append(text)
                has_text_here = has_text_here or bool(text)
        empty += not has_text and os.path.getsize(path) == 0
        elsewhere += has_text and not has_text_here

    where = "the standard library" if source == "stdlib" else repr(data_config.path)
    if skipped:
        log.warning("data: skipped %d file(s) of %s (%s split) that are not valid UTF-8, "
                    "e.g. %s", len(skipped), where, split, skipped[0])
    if not any(texts):
        if not read:
            found = (f"none of its {_count(len(files), 'file')} falls in it "
                     f"(validation_percent={percent})")
        else:
            found = describe_files(read, empty, skipped, elsewhere, percent)
        what = "no documents" if not texts else "only empty documents (none with 2 or more tokens)"
        raise ValueError(f"data: {source} source {where} has {what} in the {split} split: "
                         f"{found}")
    return DocumentList(texts, skipped)
