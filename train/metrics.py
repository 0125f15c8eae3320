"""What a run writes about itself: metrics.jsonl and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing, so callers need
no `if process_index == 0` of their own.
"""
from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and the same scalars to
    TensorBoard (tensorboardX). Values must be plain numbers; `prefix` (e.g. "eval/")
    is put in front of every name in both."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{prefix + k: _plain(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value
