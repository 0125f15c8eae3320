"""Specification of runs that survive: preemption signals, broken checkpoints, another
cluster on resume, non-finite steps, failing writes, one metrics record per step, and the
same figures twice."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import read_metrics, small_config, train_losses
from train import checkpoint as checkpoint_lib
from configs import workdir_config
from train import trainer
from train.state import build_run
from train.checkpoint import BrokenCheckpoints, restore_newest
from configs.sections import settings as settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "tests/small_config.py", "--config.checkpoint.every_steps=100",
         "--config.eval.lengths=(64,)", "--config.eval.sliding_stride=0",
         "--config.eval.max_batches=1"]


def main_py(*args, devices=8, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_line(process, text, timeout=240):
    """Read the process's stdout until a line contains `text`; returns the lines read."""
    lines, start = [], time.time()
    while time.time() - start < timeout:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed; got {''.join(lines)[-2000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The losses of SMALL trained for 12 steps without interruption (one process, 8 devices)."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, out, err = finish(main_py(*SMALL, "--workdir", str(workdir), "--config.train.steps=12"))
    assert code == 0, err[-3000:]
    return train_losses(workdir)


# ------------------------------------------------------------------ preemption
@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_the_running_step_exits_0_and_resumes_exactly(
        tmp_path, uninterrupted, name):
    workdir = tmp_path / "run"
    args = (*SMALL, "--workdir", str(workdir), "--config.train.steps=12")
    process = main_py(*args)
    wait_for_line(process, "step  5/12")
    process.send_signal(getattr(signal, name))
    code, out, err = finish(process)
    assert code == 0, err[-3000:]
    stopped = re.findall(r"^stopped after step (\d+) \((\w+)\): saved ", out, re.M)
    assert len(stopped) == 1 and stopped[0][1] == name, out[-2000:]
    step = int(stopped[0][0])
    assert os.path.isdir(workdir / "checkpoints" / str(step)) and 5 <= step < 12
    code, out, err = finish(main_py(*args))                   # the same command resumes
    assert code == 0, err[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {step}" in out
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, 13))
    for s in range(1, 13):
        assert losses[s] == pytest.approx(uninterrupted[s], abs=1e-6), s


def test_a_second_sigint_exits_at_once_and_a_first_one_only_asks(monkeypatch, capsys):
    from train import stopping
    exits = []
    monkeypatch.setattr(stopping.os, "_exit", lambda code: exits.append(code))
    # the handler before: Python's default, or SIG_IGN when pytest runs as a background job
    handler_before = signal.getsignal(signal.SIGINT)
    with stopping.StopSignals() as signals:
        assert signals.requested() is None
        os.kill(os.getpid(), signal.SIGINT)                # handled between bytecodes
        time.sleep(0.05)
        assert signals.requested() == "SIGINT" and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert exits == [130]
    assert "second SIGINT: exiting at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler_before   # restored


# ------------------------------------------------------------------ broken checkpoints
def _ocdbt_data_files(step_dir):
    return sorted(p for p in step_dir.glob("state/**/d/*") if p.is_file())


def truncate_a_data_file(step_dir):
    path = max(_ocdbt_data_files(step_dir), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_state(step_dir):
    shutil.rmtree(step_dir / "state")


def empty_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("")


def delete_meta(step_dir):
    shutil.rmtree(step_dir / "meta")


def scramble_a_data_file(step_dir):
    path = max(_ocdbt_data_files(step_dir), key=lambda p: p.stat().st_size)
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size,
                                                             dtype=np.uint8)))


DAMAGE = [truncate_a_data_file, delete_state, empty_metadata, delete_meta, scramble_a_data_file]


@pytest.fixture
def damaged_copy(trained_workdir, tmp_path):
    """A copy of the shared trained workdir (checkpoints at steps 4 and 8)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.__name__)
def test_a_broken_newest_checkpoint_is_moved_aside_and_the_older_one_restored(damaged_copy,
                                                                             damage, caplog):
    damage(damaged_copy / "checkpoints" / "8")
    run = build_run(settings_of(small_config()), devices=None)
    state, meta = restore_newest(str(damaged_copy), run, "test")
    assert meta["step"] == 4
    assert os.listdir(damaged_copy / "checkpoints") == ["4"]
    assert os.listdir(damaged_copy / "broken_checkpoints") == ["8"]      # moved, not deleted
    assert any("checkpoint step 8" in r.getMessage() and "broken" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_resuming_past_a_broken_checkpoint_continues_from_the_intact_one(damaged_copy):
    truncate_a_data_file(damaged_copy / "checkpoints" / "8")
    summary = trainer.train(small_config(**{"eval.every_steps": 4}), str(damaged_copy))
    assert summary["step"] == 8
    assert sorted(r["step"] for r in read_metrics(damaged_copy) if "loss" in r) == list(range(1, 9))


@pytest.mark.slow
def test_when_no_checkpoint_is_intact_one_line_names_each_broken_step(damaged_copy):
    delete_state(damaged_copy / "checkpoints" / "8")
    empty_metadata(damaged_copy / "checkpoints" / "4")
    run = build_run(settings_of(small_config()), devices=None)
    with pytest.raises(BrokenCheckpoints, match=r"no intact checkpoint .*step 8 .*; step 4 "):
        restore_newest(str(damaged_copy), run, "test")
    assert sorted(os.listdir(damaged_copy / "broken_checkpoints")) == ["4", "8"]


@pytest.mark.slow
def test_eval_mode_on_a_broken_newest_checkpoint_scores_the_intact_one(damaged_copy):
    empty_metadata(damaged_copy / "checkpoints" / "8")
    code, out, err = finish(main_py("--mode", "eval", "--workdir", str(damaged_copy),
                                    "--config.eval.name=after_damage"))
    assert code == 0, err[-3000:]
    assert "checkpoint step 8" in err and "broken" in err
    written = json.loads((damaged_copy / "eval" / "after_damage" / "perplexity_by_length.json")
                         .read_text())
    assert written["step"] == 4


# ------------------------------------------------------------------ another cluster
@pytest.mark.slow
@pytest.mark.parametrize("devices", [(8, 4), (4, 1), (1, 8)])
def test_a_run_resumes_on_another_number_of_devices_with_the_same_losses(tmp_path, uninterrupted,
                                                                        devices):
    first, second = devices
    workdir = tmp_path / "run"
    args = (*SMALL, "--workdir", str(workdir), "--config.train.steps=12")
    code, _, err = finish(main_py(*args, "--config.train.stop_at_step=6", devices=first))
    assert code == 0, err[-3000:]
    code, out, err = finish(main_py(*args, devices=second))
    assert code == 0, err[-3000:]
    assert "at step 6" in out
    losses = train_losses(workdir)
    for s in range(7, 13):
        assert losses[s] == pytest.approx(uninterrupted[s], abs=1e-5), s


@pytest.mark.parametrize("key, value", [("train.batch_size", 4), ("model.d_model", 32),
                                        ("data.tokenizer", "other.json"),
                                        ("curriculum.l_max", 32)])
def test_a_resume_that_cannot_continue_exactly_is_refused_naming_what_differs(tmp_path, key,
                                                                               value):
    workdir_config.write(small_config(), str(tmp_path))
    changed = small_config()
    section, name = key.split(".")
    changed[section][name] = value
    with pytest.raises(ValueError, match=f"^{key} is .* but {tmp_path} was run with"):
        workdir_config.check_against_workdir(changed, str(tmp_path), "train")
    workdir_config.check_against_workdir(small_config(), str(tmp_path), "train")   # same: fine


def test_switching_gradient_clipping_on_or_off_on_resume_is_refused(tmp_path):
    workdir_config.write(small_config(), str(tmp_path))
    with pytest.raises(ValueError, match="train.grad_clip_norm 0.0 switches gradient clipping off"):
        workdir_config.check_against_workdir(small_config(**{"train.grad_clip_norm": 0.0}),
                                             str(tmp_path), "train")
    workdir_config.check_against_workdir(small_config(**{"train.grad_clip_norm": 0.5}),
                                         str(tmp_path), "train")   # another value: fine


# ------------------------------------------------------------------ non-finite steps
def nan_batches(monkeypatch, steps):
    """Make the stream's batches at the given (1-based) steps carry NaN loss weights."""
    original = trainer.Levels.next_batch
    calls = {"n": 0}

    def next_batch(self, level):
        calls["n"] += 1
        batch = original(self, level)
        if calls["n"] in steps:
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        return batch

    monkeypatch.setattr(trainer.Levels, "next_batch", next_batch)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_counted_and_the_run_continues(tmp_path, monkeypatch,
                                                                   trained_workdir):
    nan_batches(monkeypatch, steps={3})
    workdir = tmp_path / "run"
    summary = trainer.train(small_config(**{"eval.every_steps": 4}), str(workdir))
    assert summary["step"] == 8
    records = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
    assert records[3]["loss"] is None and records[2]["skipped_steps"] == 0
    assert all(records[s]["skipped_steps"] == 1 for s in range(3, 9))
    with open(workdir / "metrics.jsonl") as f:           # strict JSON: no bare NaN
        for line in f:
            json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))
    # nothing was updated at step 3: step 4's loss is that of the step-2 parameters on
    # step 4's batch, not the uninterrupted run's
    assert records[4]["loss"] != pytest.approx(train_losses(trained_workdir)[4], abs=1e-6)


@pytest.mark.slow
def test_too_many_consecutive_non_finite_steps_stop_the_run_with_checkpoints_intact(
        tmp_path, monkeypatch):
    nan_batches(monkeypatch, steps=set(range(6, 20)))
    workdir = tmp_path / "run"
    config = small_config(**{"train.steps": 20, "train.max_skipped_steps": 3,
                             "checkpoint.every_steps": 5})
    with pytest.raises(ValueError, match="not finite at 3 consecutive steps from step 6 "
                                         ".*newest: step 5"):
        trainer.train(config, str(workdir))
    checkpointer = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), max_to_keep=3,
                                               async_save=False)
    assert checkpointer.steps() == [5]
    checkpointer.close()


# ------------------------------------------------------------------ writes that fail
@pytest.mark.slow
def test_a_save_that_fails_stops_the_run_at_once_with_the_earlier_checkpoint_intact(tmp_path):
    """Files may grow to 96 KB: the config, metrics and the step-2 checkpoint's pieces fit,
    the next checkpoint's state does not (the arrays are several 100 KB)."""
    import resource
    workdir = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a failed write, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, 96 * 1024))

    args = ["--config", "tests/small_config.py", "--workdir", str(workdir),
            "--config.model.d_model=32", "--config.model.mlp_dim=64",
            "--config.model.head_dim=8", "--config.train.steps=12",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=True"]
    code, out, err = finish(main_py(*args, preexec_fn=limit))
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "checkpoint" in lines[0] and "stopped" in lines[0], err[-3000:]
    # library errors are one line each: no tracebacks, no pages of them
    assert "Traceback" not in err and len(err.splitlines()) < 30, err


# ------------------------------------------------------------------ one record per step
@pytest.mark.slow
def test_after_a_kill_and_a_resume_every_step_is_recorded_once(tmp_path):
    workdir = tmp_path / "run"
    args = ("--config", "tests/small_config.py", "--workdir", str(workdir),
            "--config.train.steps=10", "--config.checkpoint.every_steps=4",
            "--config.checkpoint.async_save=False", "--config.eval.lengths=(64,)",
            "--config.eval.sliding_stride=0", "--config.eval.max_batches=1")
    process = main_py(*args)
    wait_for_line(process, "step  6/10")
    process.kill()                                         # steps 5 and 6 logged, not saved
    process.communicate()
    assert sorted(r["step"] for r in read_metrics(workdir) if "loss" in r)[-1] >= 6
    code, out, err = finish(main_py(*args))
    assert code == 0, err[-3000:]
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps == list(range(1, 11))                      # once each, in order
    assert scalar_steps(workdir / "tensorboard", "loss") == list(range(1, 11))


def scalar_steps(directory, tag):
    """The steps of `tag`'s scalars in every event file of a TensorBoard directory."""
    from tensorboardX.proto.event_pb2 import Event
    from train.metrics import read_events
    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for record in read_events(str(path)):
            event = Event.FromString(record)
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


# ------------------------------------------------------------------ reproducible
@pytest.mark.slow
def test_the_same_config_twice_gives_the_same_losses_and_perplexities(tmp_path):
    results = []
    for name in ("a", "b"):
        summary = trainer.train(small_config(), str(tmp_path / name))
        results.append((train_losses(tmp_path / name), summary["eval"]["perplexity"]))
    assert results[0] == results[1]


# ------------------------------------------------------------------ chaos
@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_with_the_parameters_of_an_uninterrupted_one(
        tmp_path, capsys):
    from benchmarks import chaos
    # a quarter of the tiny step (8 rows of 128 tokens) keeps the five launches cheap
    chaos.main(["--kills", "3", "--steps", "40", "--workdir", str(tmp_path),
                "--set", "train.batch_size=8", "--set", "curriculum.l_max=128"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("|") and "---" not in line][-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[0]) == 3                               # every kill happened
    assert "all clean" in cells[3] and cells[5] == "yes" and cells[6] == "40 / 40"
    assert float(cells[7]) <= 1e-6
