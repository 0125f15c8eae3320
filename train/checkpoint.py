"""Orbax checkpoints of a run: train state, data-iterator state and run metadata.

Each step directory holds:
  state     the parameters and optimizer state (sharded arrays; each process writes its shards)
  data_<k>  the position of the grain iterator of curriculum level k (one file per process)
  meta      JSON: step, tokens seen, the resolved config
Orbax writes a step into a temporary directory and renames it when complete, so a save
that is interrupted never becomes the newest step; `latest_step()` only sees finished ones.
"""
from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True,
                 data_names=("data_0",)):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", *data_names))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterators: dict, meta: dict, *,
             force: bool = True) -> bool:
        """Start saving (asynchronously when enabled); returns whether a save began.
        `data_iterators` maps item names ("data_0", ...) to grain iterators."""
        items = {name: grain.checkpoint.CheckpointSave(iterator)
                 for name, iterator in data_iterators.items()}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta), **items)
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterators: dict | None = None):
        """Restore `step`: (state, meta). `abstract_state` gives shapes, dtypes and the
        shardings to restore into. The data iterators, if given, are moved in place to
        their saved positions."""
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     meta=ocp.args.JsonRestore())
        for name, iterator in (data_iterators or {}).items():
            items[name] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
