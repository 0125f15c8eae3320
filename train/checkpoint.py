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

import jax
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

    def steps(self) -> list[int]:
        """Every finished step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def move_aside(self, step: int) -> str:
        """Move step's directory out of the checkpoints (to ../broken_checkpoints/, never
        deleted) so that no later restore sees it; returns where it went. Process 0 moves,
        every process waits for it."""
        target = os.path.join(os.path.dirname(self.directory), "broken_checkpoints", str(step))
        suffix = 1
        while os.path.exists(target + (f".{suffix}" if suffix > 1 else "")):
            suffix += 1
        target += f".{suffix}" if suffix > 1 else ""
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"boundless: moved checkpoint {step} aside")
        self.manager.reload()
        return target

    def check_for_errors(self) -> None:
        """Raise the error of a failed asynchronous save, if one failed."""
        self.manager.check_for_errors()

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

    def wait_until_finished(self) -> None:
        """Block until the asynchronous save in flight, if any, is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
