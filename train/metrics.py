"""What a run writes about itself: metrics.jsonl and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing, so callers need
no `if process_index == 0` of their own.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time

import jax

from util import json_values


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and the same scalars to
    TensorBoard (tensorboardX). Values must be plain numbers (non-finite ones are written
    as null); `prefix` (e.g. "eval/") is put in front of every name in both.

    `resume_step`: the run continues after that step (resumed from its checkpoint), so the
    records of later steps, which the run is about to redo, are dropped from
    metrics.jsonl (rewritten atomically) and purged from TensorBoard's view: each step is
    recorded once (the event files are rewritten without them too, so every reader sees
    one series)."""

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            events = os.path.join(workdir, "tensorboard")
            if resume_step is not None:
                if os.path.exists(path):
                    _keep_records_until(path, resume_step)
                for events_file in glob.glob(os.path.join(events, "events.out.tfevents.*")):
                    _keep_events_until(events_file, resume_step)
            self._jsonl = open(path, "a", buffering=1)
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(events)

    def write(self, step: int, scalars: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{prefix + k: _plain(v) for k, v in scalars.items()}}
        try:
            self._jsonl.write(json_values.dumps(record) + "\n")
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()      # on disk now: a killed run loses no record
        except OSError as error:
            raise ValueError(f"cannot write the metrics of step {step} to {self._jsonl.name} or "
                             f"its TensorBoard events: {error.strerror or error}") from None

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def keep_history_aside(workdir: str) -> list[str]:
    """Rename metrics.jsonl and tensorboard/ of an earlier run (a run started over) to
    <name>.before_start_over_<UTC time>; returns the new names (nothing is deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = []
    for name in ("metrics.jsonl", "tensorboard"):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            os.replace(path, f"{path}.before_start_over_{stamp}")
            kept.append(f"{name}.before_start_over_{stamp}")
    return kept


def _keep_records_until(path: str, step: int) -> None:
    """Rewrite metrics.jsonl without the records of steps after `step` (and without a
    line a crash cut short)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_events(path: str):
    """The serialized Event records of a TensorBoard event file, in order (a record a crash
    cut short ends the file)."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)                         # uint64 length + its crc
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def _keep_events_until(path: str, step: int) -> None:
    """Rewrite an event file without the events of steps after `step`."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import RecordWriter
    records = list(read_events(path))
    kept = [r for r in records if Event.FromString(r).step <= step]
    if len(kept) == len(records):
        return
    writer = RecordWriter(path + ".tmp")
    for record in kept:
        writer.write(record)
    writer.close()
    os.replace(path + ".tmp", path)


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value
