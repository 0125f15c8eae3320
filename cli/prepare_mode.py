"""`--mode prepare`: tokenize the configured source once into data.prepare_dir.

Units of source files (data/prepare.py) are tokenized by a pool of worker processes (one
per core, data.prepare_workers to change it), each unit's shards written and renamed by
its worker, the manifest updated by this process as units finish, with a progress line and
ETA. Run again after an interruption, it continues: finished units are kept. Train from
the result with data.source = "prepared", data.path = the directory.

A refused prepare (a ValueError or OSError: one `error:` line from main.py, exit 2) leaves
data.prepare_dir as it was before the command, and does not create it: the source is
checked before anything is written (data/prepare.py check_source), and what only reading
finds (a truncated or corrupt .gz, malformed JSONL, a corpus without text) is undone
(data/prepare.py Undo). An interruption (Ctrl-C, a kill) keeps the finished units.
"""
from __future__ import annotations

import multiprocessing
import os
import time

from configs import sections
from data import prepare as prepare_lib
from util.progress import Progress


def _prepare_unit(job):
    data_config, tokenizer_spec, out_dir, index, files = job
    return index, prepare_lib.prepare_unit(data_config, tokenizer_spec, out_dir, index, files)


def _prepare(data, out_dir: str, units) -> dict:
    """The units not done yet, by a pool of workers; the finished manifest (written only
    when the corpus has text)."""
    manifest = prepare_lib.start_manifest(data, data.tokenizer, out_dir)
    done = {int(name) for name in manifest["units"]}
    pending = [(data, data.tokenizer, out_dir, i, files) for i, files in enumerate(units)
               if i not in done]
    workers = int(data.prepare_workers or os.cpu_count() or 1)
    print(f"prepare: {len(units)} units of {data.source} {data.path or ''} into {out_dir} "
          f"({len(done)} already done), {min(workers, max(1, len(pending)))} worker processes",
          flush=True)
    progress = Progress(len(units), "unit")
    progress.update(len(done))
    if pending:
        context = multiprocessing.get_context("spawn")   # no JAX state forked into workers
        with context.Pool(min(workers, len(pending))) as pool:
            for index, counts in pool.imap_unordered(_prepare_unit, pending):
                prepare_lib.record_unit(manifest, index, counts)
                prepare_lib.write_manifest(out_dir, manifest)
                progress.update(len(manifest["units"]))
    manifest = prepare_lib.finish(manifest, len(units))
    prepare_lib.check_has_text(data, manifest, units)
    prepare_lib.write_manifest(out_dir, manifest)
    return manifest


def prepare_workdir(config) -> dict:
    """Prepare config.data's source into config.data.prepare_dir; returns the manifest."""
    data = sections.typed(config, "data")
    out_dir = data.prepare_dir
    if not out_dir:
        raise ValueError("--mode prepare needs --config.data.prepare_dir=DIR (where the shards go)")
    if data.source == "prepared":
        raise ValueError("data.source is 'prepared': give the source to prepare "
                         "(stdlib, text, jsonl or parquet)")
    units = prepare_lib.work_units(data)
    prepare_lib.check_source(data, units)          # nothing is written before this
    undo = prepare_lib.Undo(out_dir)
    start = time.time()
    try:
        manifest = _prepare(data, out_dir, units)
    except (ValueError, OSError):
        undo.undo(len(units))
        raise
    splits = manifest["splits"]
    if manifest["skipped_files"]:
        print(f"prepare: left out {len(manifest['skipped_files'])} file(s) that are not valid "
              f"UTF-8, e.g. {manifest['skipped_files'][0]}", flush=True)
    print(f"prepared {splits['train']['documents']} train documents ({splits['train']['tokens']:,} "
          f"tokens) and {splits['validation']['documents']} validation documents "
          f"({splits['validation']['tokens']:,} tokens) in {time.time() - start:.1f} s; train "
          f"with --config.data.source=prepared --config.data.path={out_dir}", flush=True)
    return manifest
