"""Orbax checkpoints of a run: train state, data-iterator state and run metadata.

Each step directory holds:
  state     the parameters and optimizer state (sharded arrays; each process writes its shards)
  data      JSON: the training stream's position (data/stream.py; the same on every process)
  meta      JSON: step, tokens seen, the resolved config
Orbax writes a step into a temporary directory and renames it when complete, so a save
that is interrupted never becomes the newest step; `latest_step()` only sees finished ones.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None, meta: dict, *,
             force: bool = True) -> bool:
        """Start saving (asynchronously when enabled); returns whether a save began.
        `data_state`: the training stream's state (None: none, e.g. an import)."""
        items = {} if data_state is None else {"data": ocp.args.JsonSave(data_state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta), **items)
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, with_data: bool = False):
        """Restore `step`: (state, meta), or with `with_data` (state, meta, data state).
        `abstract_state` gives shapes, dtypes and the shardings to restore into."""
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     meta=ocp.args.JsonRestore())
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if with_data:
            return restored["state"], restored["meta"], restored["data"]
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
