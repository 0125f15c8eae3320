"""Orbax checkpoints of a run: train state, data-iterator state and run metadata.

Each step directory holds:
  state     the parameters and optimizer state (sharded arrays; each process writes its shards)
  data      JSON: the training stream's position (data/stream.py; the same on every process)
  meta      JSON: step, tokens seen, the resolved config
Orbax writes a step into a temporary directory and renames it when complete, so a save
that is interrupted never becomes the newest step; `latest_step()` only sees finished ones.

Restoring for a run: restore_newest (eval, generate, export), restore_intact (resume, with
broken steps moved aside), restore_params_from (train.init_from); check_same_model refuses
a checkpoint of another model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from model import positions as pos_lib
from model.transformer import ModelConfig
from parallel import mesh as mesh_lib
from train.state import Run, abstract_state
from util.errors import error_line

log = logging.getLogger("boundless")


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


# How the parameters are laid out in a checkpoint; recorded in its metadata. Before the
# decoder layers were stacked (model/transformer.py) every block had its own parameters.
PARAMETER_LAYOUT = "stacked_layers"


def checkpoint_meta(run: Run, config_json: str, step: int, tokens: int, **extra) -> dict:
    """The metadata saved with a checkpoint of `run`."""
    return {"step": step, "tokens": tokens, "parameter_layout": PARAMETER_LAYOUT,
            "model_config": dataclasses.asdict(run.model_config),
            "config": json.loads(config_json), **extra}


def check_same_model(meta: dict, run: Run, workdir: str, *,
                     resize_positions: bool = False) -> None:
    """Raise unless the checkpoint metadata `meta` describes `run`'s parameters.

    `resize_positions`: the learned-position table may have another number of rows (l_max)
    than the checkpoint's, because the caller interpolates it (restore_params_from)."""
    if meta.get("parameter_layout") != PARAMETER_LAYOUT:
        raise ValueError(f"{workdir} holds checkpoints written before the decoder layers' "
                         "parameters were stacked into one [n_layers, ...] array each; this "
                         "version cannot restore them (train anew, or export them with the "
                         "version that wrote them and --mode import the export)")
    saved = meta.get("model_config")
    current = dataclasses.asdict(run.model_config)
    # may change between levels, evaluations and fine-tuning runs
    ignored = {"rope_theta", "rope_scaling_json", "attention", "block_q", "block_k", "remat",
               "scan_layers", "loss_chunk_tokens", "mlp_chunk_tokens", "remat_group", "dtype"}
    if run.model_config.position != "learned" or resize_positions:
        ignored.add("l_max")              # no parameter depends on it, or it is resized
    # a key the checkpoint predates (e.g. model.norm) had its default then
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING}
    differing = sorted(k for k in current if k not in ignored and saved
                       and saved.get(k, defaults.get(k)) != current[k])
    if differing == ["l_max"] and run.model_config.position == "learned":
        raise ValueError(
            f"{workdir} holds a learned-position table of {saved.get('l_max')} rows, this run's "
            f"has {current['l_max']}: set model.learned_positions_length={current['l_max']} to "
            f"start from its weights with the table interpolated (train.init_from)")
    if differing:
        raise ValueError(f"{workdir} holds checkpoints of a different model (differs in "
                         f"{', '.join(differing)}); use another --workdir")


def restore_newest(workdir: str, run: Run, what: str):
    """(state, meta) of the newest intact checkpoint in `workdir`, in `run`'s shardings;
    broken newer ones are moved aside (restore_intact). `what` names the caller in the
    error when there is none."""
    with _checkpointer(workdir, what) as checkpointer:
        restored = restore_intact(checkpointer, lambda step: run, workdir)
        if restored is None:
            raise ValueError(f"{what}: no checkpoint in {checkpointer.directory}")
        return restored[1], restored[2]


class BrokenCheckpoints(ValueError):
    """Every checkpoint of a workdir failed to restore."""


START_OVER_HINT = ("To start this run over at step 0, give --start_over (metrics.jsonl and the "
                   "broken checkpoints are kept), or train in another --workdir")


def check_nothing_was_lost(workdir: str) -> None:
    """A workdir with no checkpoint left but broken ones set aside is a run that would
    silently start again: one ValueError line instead."""
    broken = os.path.join(workdir, "broken_checkpoints")
    if os.path.isdir(broken) and os.listdir(broken):
        steps = ", ".join(sorted(os.listdir(broken), key=lambda n: (len(n), n)))
        raise ValueError(f"{workdir} has no intact checkpoint: its broken ones (steps {steps}) "
                         f"are in {broken}/, and training now would start again at step 0. "
                         f"{START_OVER_HINT}")


def restore_intact(checkpointer, run_at, workdir: str, with_data: bool = False,
                   move_broken: bool = True):
    """(step, state, meta[, data state]) of the newest checkpoint that restores, with
    run_at(step) giving the Run to restore into; None when there is no checkpoint.

    A checkpoint whose metadata or arrays fail to read (a truncated or missing file, an
    emptied _METADATA, a deleted state/) is named in a warning and, with `move_broken`,
    moved aside to <workdir>/broken_checkpoints/ (never deleted); the next older one is
    tried. A checkpoint of another model is not broken: that ValueError is raised as it
    is. BrokenCheckpoints (one line) when checkpoints exist but none restores."""
    broken = []
    for step in checkpointer.steps():
        run = run_at(step)
        try:
            meta = checkpointer.restore_meta(step)
        except Exception as error:          # noqa: BLE001 - any read failure means damage
            broken.append(_set_aside(checkpointer, step, error, move_broken))
            continue
        check_same_model(meta, run, workdir)
        try:
            restored = checkpointer.restore(step, abstract_state(run), with_data=with_data)
        except Exception as error:          # noqa: BLE001 - any restore failure means damage
            broken.append(_set_aside(checkpointer, step, error, move_broken))
            continue
        return (step, *restored)
    if broken:
        raise BrokenCheckpoints(f"no intact checkpoint in {checkpointer.directory}: "
                                + "; ".join(broken))
    return None


def _set_aside(checkpointer, step: int, error: Exception, move: bool) -> str:
    reason = error_line(error)
    where = checkpointer.move_aside(step) if move else "left in place"
    log.warning("checkpoint step %d of %s is broken (%s); %s%s", step, checkpointer.directory,
                reason, "moved to " if move else "", where)
    return f"step {step} ({reason})"


@contextlib.contextmanager
def _checkpointer(workdir: str, what: str):
    """A Checkpointer of workdir/checkpoints, closed on exit; one ValueError line naming
    `what` when the directory does not exist (and none is created)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise ValueError(f"{what}: no checkpoint in {os.path.abspath(checkpoints)}")
    checkpointer = Checkpointer(checkpoints, max_to_keep=1, async_save=False)
    try:
        yield checkpointer
    finally:
        checkpointer.close()


@contextlib.contextmanager
def _newest_checkpoint(workdir: str, what: str):
    """(checkpointer, newest step) of `workdir`, closed on exit; one ValueError line naming
    `what` when there is no checkpoint (and no directory is created)."""
    with _checkpointer(workdir, what) as checkpointer:
        latest = checkpointer.latest_step()
        if latest is None:
            raise ValueError(f"{what}: no checkpoint in {checkpointer.directory}")
        yield checkpointer, latest


def restore_params_from(workdir: str, run: Run, what: str, table_rows_set: bool = False):
    """(params, resized) from the newest checkpoint of `workdir`, in `run`'s shardings
    (train.init_from). With learned positions and `table_rows_set`
    (model.learned_positions_length > 0), a checkpoint whose table has another number of
    rows is accepted and its table is interpolated to `run`'s rows
    (positions.interpolate_position_table); `resized` is then (old rows, new rows), else
    None."""
    resize = run.model_config.position == "learned" and table_rows_set
    with _newest_checkpoint(workdir, what) as (checkpointer, latest):
        meta = checkpointer.restore_meta(latest)
        check_same_model(meta, run, workdir, resize_positions=resize)
        rows = run.model_config.l_max
        saved_rows = int((meta.get("model_config") or {}).get("l_max", rows))
        if not resize or saved_rows == rows:
            return checkpointer.restore(latest, abstract_state(run))[0]["params"], None
        # restore the table (and its optimizer moments) with the saved rows, then resize
        abstract = jax.tree_util.tree_map_with_path(
            lambda path, leaf: _with_rows(leaf, saved_rows) if _is_position_table(path, leaf, rows)
            else leaf, abstract_state(run))
        params = checkpointer.restore(latest, abstract)[0]["params"]
    sharding = run.state_shardings["params"]["position_table"]
    if isinstance(sharding, nnx.Variable):
        sharding = sharding.get_value()
    table = params["position_table"]
    with mesh_lib.use_mesh(run.mesh):
        resized = jax.jit(lambda t: pos_lib.interpolate_position_table(t, rows),
                          out_shardings=sharding)(table[...])
    params["position_table"] = table.replace(resized)
    return params, (saved_rows, rows)


def _is_position_table(path, leaf, rows: int) -> bool:
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    return "position_table" in names and len(leaf.shape) == 2 and leaf.shape[0] == rows


def _with_rows(leaf, rows: int):
    return jax.ShapeDtypeStruct((rows,) + tuple(leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)
