"""The training loop (and the evaluation it runs, which `--mode eval` reuses: cli/eval_mode.py).

train() reads top to bottom: set up, restore or init, the loop (step, log, maybe evaluate,
maybe checkpoint), final evaluation. One step function is compiled per curriculum level
and reused. The learning rate follows the tokens seen (train/optimizer.py), so it does not
depend on how many steps a length takes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp

from configs import workdir_config
from data.pipeline import make_train_stream
from evaluation import report, suite
from model.transformer import count_parameters
from parallel import mesh as mesh_lib
from train import checkpoint as checkpoint_lib
from train import curriculum as curriculum_lib
from train import run_spec
from train import run_state as run_state_lib
from train import schedule
from train.checkpoint import checkpoint_meta, restore_intact, restore_params_from
from train.metrics import MetricsWriter, keep_history_aside
from train.state import abstract_state, build_run, init_state
from train.step import make_train_step, put_batch
from train.stopping import StopSignals
from util.progress import Progress

log = logging.getLogger("boundless")


class Levels:
    """Per curriculum level its Run (mesh + model variant); and the one data stream every
    level draws its rows from (data/stream.py)."""

    def __init__(self, settings, curriculum, tokenizer):
        self.curriculum = curriculum
        self.runs = [build_run(settings, level=level, tokenizer=tokenizer)
                     for level in curriculum.levels]
        data = settings.data
        self.stream = make_train_stream(data, tokenizer,
                                        lengths=[level.seq_len for level in curriculum.levels],
                                        seed=data.shuffle_seed, l_max=settings.curriculum.l_max)

    def run_at(self, step: int):
        return self.runs[self.curriculum.level_at(step).index]

    def next_batch(self, level):
        """This process's rows of the level's next global batch."""
        _, _, local_rows, offset = mesh_lib.data_shard(self.runs[level.index].mesh,
                                                       level.batch_size)
        return self.stream.next_batch(level.index, level.seq_len, level.batch_size,
                                      row_offset=offset, local_rows=local_rows)


def train(config, workdir: str, start_over: bool = False) -> dict:
    """Train (resuming from the newest checkpoint in workdir/checkpoints if any) and
    evaluate at the end. Returns {"step", "tokens", "final_loss", "stopped", "eval",
    "retrieval"}; "stopped" is True when train.stop_at_step or a preemption ended the run
    early, and then "eval" and "retrieval" are None. A workdir whose checkpoints are all
    broken is refused unless `start_over` (then its metrics are kept under another name
    and the run starts at step 0)."""
    # ------------------------------------------------------------------ set up
    is_writer = jax.process_index() == 0
    spec = run_spec.resolve(config, workdir)
    settings, curriculum = spec.settings, spec.curriculum
    if is_writer:
        if spec.adopted:
            print(f"train.init_from {settings.train.init_from}: adopted "
                  + "; ".join(spec.adopted), flush=True)
        if spec.extended:
            print(f"extend.target_length {settings.extend.target_length}: "
                  + "; ".join(spec.extended), flush=True)
        workdir_config.check_writable(workdir)
        print(curriculum.format(), flush=True)
    tokenizer = spec.tokenizer
    levels = Levels(settings, curriculum, tokenizer)
    eval_run = build_run(settings, level=spec.eval_level, tokenizer=tokenizer,
                         rows_in_order=True)
    suite.check_eval_directory(suite.eval_directory(workdir, settings.eval.name),
                               spec.eval_setup)
    final_eval = suite.prepare(spec.eval_setup, eval_run, tokenizer,
                               abstract_state(eval_run)["params"])
    say_beyond_trained(settings, curriculum, spec.eval_level, final_eval)
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=settings.checkpoint.max_to_keep,
        async_save=settings.checkpoint.async_save)
    saved = spec.saved
    schedule_changes = []
    saved_bridge = None
    if saved is not None and checkpointer.steps():       # a resume: the schedule holds
        schedule_changes = schedule.check_resume(settings, saved, workdir)
        saved_bridge = run_state_lib.load(workdir).schedule_bridge
        reached = checkpointer.steps()[0]
        if curriculum.total_steps < reached:
            raise ValueError(f"train.steps={settings.train.steps} ends the run before step "
                             f"{reached}, where {workdir} already is: give train.steps >= "
                             f"{reached}, or train in another --workdir")
    # what the run records beside its config; an unchanged schedule keeps its bridge
    run_state = run_state_lib.RunState(
        schedule_bridge=None if schedule_changes else saved_bridge,
        original_length=spec.original_length)
    if is_writer:
        workdir_config.write_text(spec.config_json, workdir)
        run_state_lib.write(run_state, workdir)
    writer = None
    try:
        # -------------------------------------------------------------- restore or init
        state, step, tokens = _restore_or_init(settings, workdir, checkpointer, levels,
                                               start_over)
        if schedule_changes and step > 0:
            saved_curriculum = curriculum_lib.make_curriculum(saved, jax.device_count())
            run_state = dataclasses.replace(run_state, schedule_bridge=schedule.bridge(
                settings, curriculum, saved, saved_curriculum, step, tokens, saved_bridge))
            if is_writer:
                run_state_lib.write(run_state, workdir)
                reached_rate = schedule.rate(saved, saved_curriculum, step, tokens, saved_bridge)
                print(f"schedule changed ({', '.join(schedule_changes)}): the learning rate "
                      f"continues from {reached_rate:.3g} "
                      f"and joins the new schedule by step {curriculum.total_steps}", flush=True)
        writer = MetricsWriter(workdir, resume_step=step)   # the steps after it are redone
        if is_writer:
            print(f"model: {count_parameters(state['params']) / 1e6:.2f}M parameters; "
                  f"{curriculum.total_steps} steps, {curriculum.total_tokens} tokens; "
                  f"workdir {workdir}",
                  flush=True)

        # -------------------------------------------------------------- the loop
        progress = Progress(curriculum.total_steps, "step", every_line=True)
        compiled = {}
        current_run = levels.run_at(min(step, curriculum.total_steps - 1))
        last_log_time, last_log_step = time.time(), step
        compile_seconds = None        # of the step compiled since the last record
        final_loss = None
        skips = SkipCounter(settings.train.max_skipped_steps)
        with StopSignals() as signals:
            while step < curriculum.total_steps:
                level = curriculum.level_at(step)
                run = levels.runs[level.index]
                if run is not current_run:
                    # relayout: the same parameters, resharded device-to-device for this level
                    state = jax.device_put(state, run.state_shardings)
                    current_run = run
                batch = put_batch(levels.next_batch(level), run.mesh, level.batch_size,
                                  run.layout, run.layout_parts)
                learning_rate = schedule.rate(settings, curriculum, step, tokens,
                                              run_state.schedule_bridge)
                with mesh_lib.use_mesh(run.mesh):
                    if level.index not in compiled:
                        compile_start = time.time()
                        compiled[level.index] = make_train_step(
                            run, settings.train.grad_accum_steps, level.seq_len)
                        state, metrics = compiled[level.index](state, batch,
                                                               jnp.float32(learning_rate))
                        jax.block_until_ready(metrics)
                        if is_writer:
                            print(f"compiled the step for level {level.index} (length "
                                  f"{level.seq_len}, batch {level.batch_size}, "
                                  f"{_layout_name(run.mesh)}) in "
                                  f"{time.time() - compile_start:.1f}s (incl. its first step)",
                                  flush=True)
                        # throughput counts steady steps only: not this one, which compiled
                        compile_seconds = time.time() - compile_start
                        last_log_time, last_log_step = time.time(), step + 1
                        progress.restart_clock(step + 1)
                    else:
                        state, metrics = compiled[level.index](state, batch,
                                                               jnp.float32(learning_rate))
                step += 1
                tokens += level.seq_len * level.batch_size
                skips.add(step, metrics["skipped"])
                _check_saves(checkpointer)

                # log
                if step % settings.train.log_every_steps == 0 or step == curriculum.total_steps:
                    values = jax.device_get(metrics)
                    now = time.time()
                    record = {"tokens": tokens, "loss": float(values["loss"]),
                              "lr": learning_rate, "grad_norm": float(values["grad_norm"]),
                              "seq_len": level.seq_len, "batch_size": level.batch_size,
                              "level": level.index, "layout": _layout_name(run.mesh),
                              "skipped_steps": skips.total()}
                    speed = ""
                    if step > last_log_step:     # steady steps since the last record
                        step_time = (now - last_log_time) / (step - last_log_step)
                        record["step_time_s"] = step_time
                        record["tokens_per_sec"] = level.seq_len * level.batch_size / step_time
                        speed = f" | {record['tokens_per_sec'] / 1e3:.1f}k tok/s"
                    if compile_seconds is not None:
                        record["compile_s"], compile_seconds = compile_seconds, None
                        speed += " | compiled"
                    last_log_time, last_log_step = now, step
                    final_loss = record["loss"]
                    writer.write(step, record)
                    progress.update(step, f"loss {record['loss']:.4f} | lr {learning_rate:.2e}"
                                    + speed
                                    + (f" | L={level.seq_len}"
                                       if len(curriculum.levels) > 1 else "")
                                    + (f" | skipped {skips.total()}" if skips.total() else ""))
                    skips.check(checkpointer)

                # maybe evaluate (perplexity only: the final evaluation runs everything)
                if (settings.eval.every_steps and step % settings.eval.every_steps == 0
                        and step < curriculum.total_steps):
                    if is_writer:
                        print(f"evaluation at step {step} (perplexity by length; sliding "
                              "window and retrieval run at the end)", flush=True)
                    evaluate_and_report(settings.eval.name, eval_run, state,
                                        suite.perplexity_only(final_eval), step, writer,
                                        workdir=None)

                # maybe checkpoint, maybe stop
                stopped_by = signals.requested() or (
                    "a preemption notice" if checkpointer.reached_preemption(step) else None)
                stopping = stopped_by is not None or step == settings.train.stop_at_step
                if (step % settings.checkpoint.every_steps == 0 or step == curriculum.total_steps
                        or stopping):
                    skips.check(checkpointer)
                    _save(checkpointer, step, state, levels.stream.state(),
                          checkpoint_meta(current_run, spec.config_json, step, tokens))
                if stopping and step < curriculum.total_steps:
                    checkpointer.wait_until_finished()
                    _check_saves(checkpointer)
                    if is_writer:
                        print(f"stopped after step {step} ({stopped_by or 'train.stop_at_step'}):"
                              f" saved {os.path.join(checkpointer.directory, str(step))}; run the "
                              "same command to resume", flush=True)
                    return {"step": step, "tokens": tokens, "final_loss": final_loss,
                            "stopped": True, "eval": None, "retrieval": None}

        # -------------------------------------------------------------- final evaluation
        checkpointer.wait_until_finished()
        _check_saves(checkpointer)
        outcome = evaluate_and_report(settings.eval.name, eval_run, state, final_eval, step, writer,
                                      workdir=workdir)
        return {"step": step, "tokens": tokens, "final_loss": final_loss, "stopped": False,
                "eval": outcome["perplexity_by_length"], "retrieval": outcome["retrieval"]}
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()


class SkipCounter:
    """Steps whose update was skipped (non-finite loss or gradients), read from the step
    metrics lazily (no device sync per step): `total()` so far, and `check()` stops the run
    after `limit` consecutive ones."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._pending = []                  # (step, skipped flag on device)
        self._total = self._consecutive = 0
        self._first = None

    def _settle(self):
        for step, flag in self._pending:
            if bool(jax.device_get(flag)):
                self._total += 1
                self._consecutive += 1
                self._first = self._first or step
            else:
                self._consecutive, self._first = 0, None
        self._pending = []

    def add(self, step: int, flag) -> None:
        self._pending.append((step, flag))

    def total(self) -> int:
        self._settle()
        return self._total

    def check(self, checkpointer) -> None:
        self._settle()
        if self.limit and self._consecutive >= self.limit:
            latest = checkpointer.latest_step()
            raise ValueError(f"training stopped: the loss or the gradients were not finite at "
                             f"{self._consecutive} consecutive steps from step {self._first} "
                             f"(train.max_skipped_steps = {self.limit}); nothing was updated at "
                             f"those steps and the checkpoints (newest: step {latest}) are "
                             "intact: lower train.learning_rate or check the data")


def _save(checkpointer, step: int, state, data_state: dict, meta: dict) -> None:
    """Save a checkpoint, unless the parameters are not finite (then stop: one line)."""
    if not bool(_all_finite(state["params"])):
        raise ValueError(f"training stopped at step {step}: the parameters are not finite; "
                         f"the checkpoint was not written (newest intact: step "
                         f"{checkpointer.latest_step()})")
    try:
        checkpointer.save(step, state, data_state, meta)
    except Exception as error:              # noqa: BLE001 - any cause stops the run here
        raise ValueError(f"a checkpoint save failed (step {step}, or the save before it): "
                         f"{_first_line(error)}; training stopped, earlier checkpoints are "
                         "intact") from None


def _check_saves(checkpointer) -> None:
    """Stop at once (one line) if an asynchronous save failed."""
    try:
        checkpointer.check_for_errors()
    except Exception as error:              # noqa: BLE001 - any cause stops the run here
        raise ValueError(f"a checkpoint save failed: {_first_line(error)}; training stopped, "
                         "earlier checkpoints are intact") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


@jax.jit
def _all_finite(params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def say_beyond_trained(settings, curriculum, level, data) -> None:
    """One notice when evaluation (on `level`) runs beyond the longest trained length."""
    lengths = list(data.lengths) + [n for _, by_length in data.retrieval.values()
                                    for n in by_length]
    notice = curriculum_lib.beyond_trained_notice(
        settings, curriculum, level, lengths, "evaluating at")
    if notice and jax.process_index() == 0:
        print(notice, flush=True)


def _restore_or_init(settings, workdir: str, checkpointer, levels: Levels, start_over: bool):
    """(state, step, tokens): the newest checkpoint's, with the data stream moved to its
    saved position; else a fresh state (parameters from train.init_from if set). With no
    intact checkpoint but broken ones set aside, a fresh start needs `start_over`."""
    curriculum = levels.curriculum
    is_writer = jax.process_index() == 0
    try:
        restored = restore_intact(checkpointer,
                                  lambda s: levels.run_at(min(s, curriculum.total_steps - 1)),
                                  workdir, with_data=True)
    except checkpoint_lib.BrokenCheckpoints as error:
        if not start_over:
            raise ValueError(f"{error}. {checkpoint_lib.START_OVER_HINT}") from None
        restored = None
    if restored is not None and start_over:
        raise ValueError(f"--start_over: {checkpointer.directory} holds an intact checkpoint "
                         f"(step {restored[0]}); resume without --start_over, or train in "
                         f"another --workdir")
    if restored is None:
        if not start_over:
            checkpoint_lib.check_nothing_was_lost(workdir)
        elif is_writer:
            kept = keep_history_aside(workdir)
            print(f"--start_over: starting at step 0; the earlier run's "
                  f"{' and '.join(kept) or 'history'} kept beside it", flush=True)
    if restored is not None:
        _, state, meta, data_state = restored
        levels.stream.set_state(data_state)
        step, tokens = int(meta["step"]), int(meta["tokens"])
        if is_writer:
            print(f"resumed from {checkpointer.directory} at step {step} ({tokens} tokens)",
                  flush=True)
        return state, step, tokens
    run = levels.run_at(0)
    state = init_state(run, settings.seed)
    if settings.train.init_from:
        state["params"], resized = restore_params_from(
            settings.train.init_from, run, "train.init_from",
            table_rows_set=settings.model.learned_positions_length > 0)
        if is_writer:
            print(f"initialised the parameters from {settings.train.init_from}"
                  + (f" (learned-position table interpolated from {resized[0]} to {resized[1]} "
                     f"rows)" if resized else ""), flush=True)
    return state, 0, 0


def evaluate_and_report(name: str, eval_run, state, data, step: int, writer, *,
                        workdir: str | None) -> dict:
    """Score the state's parameters on `data`, log the scalars under eval[/<name>]/ (name:
    eval.name), print the table; with `workdir`, also write workdir/eval[/<name>]/."""
    params = jax.device_put(state["params"], eval_run.state_shardings["params"])
    outcome = suite.evaluate(eval_run, params, data, step=step, name=name)
    writer.write(step, suite.scalars(outcome), prefix=f"eval/{name}/" if name else "eval/")
    is_writer = jax.process_index() == 0
    if workdir is not None:
        eval_dir = suite.eval_directory(workdir, name)
        suite.record_eval_settings(eval_dir, data.setup, is_writer)
        suite.write_results(outcome, eval_dir, is_writer)
    if is_writer:
        print(report.perplexity_table(outcome["perplexity_by_length"]), flush=True)
        for task, grid in ((outcome.get("retrieval") or {}).get("tasks") or {}).items():
            accuracy = ", ".join(f"{L}: {a:.2f}"
                                 for L, a in zip(grid["lengths"], grid["length_accuracy"]))
            print(f"retrieval {task}: accuracy by length {accuracy}; k_max {grid['k_max']}",
                  flush=True)
        ruler = outcome.get("ruler")
        if ruler:
            means = ", ".join(f"{L}: {'-' if m is None else f'{m:.1f}'}"
                              for L, m in ruler["mean"].items())
            print(f"RULER mean by length {means}; effective length "
                  f"{ruler['effective_length']} (threshold {ruler['threshold']})", flush=True)
    return outcome


def _layout_name(mesh) -> str:
    return (" x ".join(f"{axis} {size}" for axis, size in mesh.shape.items() if size > 1)
            or "1 device")
