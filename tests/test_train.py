"""Specification of the trainer: exact resume, accumulation, schedule, files, errors."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parallel import mesh as mesh_lib
from tests.helpers import read_metrics, small_config, train_losses
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from cli import eval_mode
from train import trainer
from train.optimizer import (learning_rate_at, make_optimizer, weight_decay_mask,
                             with_learning_rate)
from train.state import abstract_state, build_run, init_state
from train.checkpoint import restore_newest
from train.step import make_train_step, put_batch
from configs.sections import settings as settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {"step", "tokens", "final_loss", "stopped", "eval", "retrieval"}


def one_device(config):
    return build_run(settings_of(config), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """(workdir, summary) of small_config() stopped by train.stop_at_step = 5 (checkpoints
    at steps 4 and 5). Copy it before resuming: other tests reuse it."""
    workdir = str(tmp_path_factory.mktemp("stopped") / "run")
    summary = trainer.train(small_config(**{"train.stop_at_step": 5}), workdir)
    return workdir, summary


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    peak, total = 1.0, 1000
    assert learning_rate_at(0, total, peak, 0.1, 0.1) == pytest.approx(0.01)
    assert learning_rate_at(49, total, peak, 0.1, 0.1) == pytest.approx(0.5)
    assert learning_rate_at(100, total, peak, 0.1, 0.1) == pytest.approx(1.0)
    assert learning_rate_at(550, total, peak, 0.1, 0.1) == pytest.approx(0.55)  # half-way
    assert learning_rate_at(1000, total, peak, 0.1, 0.1) == pytest.approx(0.1)
    assert learning_rate_at(5000, total, peak, 0.1, 0.1) == pytest.approx(0.1)


def hand_written_learning_rate(t, total, peak, warmup_fraction, min_ratio):
    """The schedule as it was written before optax: the reference."""
    warmup = max(1, warmup_fraction * total)
    if t < warmup:
        return peak * (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("total,peak,warmup_fraction,min_ratio", [
    (1000, 1.0, 0.1, 0.1), (12345, 3e-4, 0.03, 0.0), (600 * 16 * 256, 2e-3, 0.03, 0.1),
    (10**10, 1e-3, 0.01, 0.05), (100, 1.0, 0.0, 0.1), (7, 5e-3, 0.5, 1.0)])
def test_learning_rate_at_equals_the_hand_written_formula_in_float32(total, peak,
                                                                     warmup_fraction, min_ratio):
    warmup = max(1, warmup_fraction * total)
    edges = {0, int(warmup) - 1, int(warmup), int(warmup) + 1, math.ceil(warmup), total - 1,
             total, total + 1, 2**24 + 1, 2**31 + 5}
    grid = sorted({int(t) for t in np.linspace(0, 1.5 * total, 97)} | {t for t in edges if t >= 0})
    for t in grid:
        got = learning_rate_at(t, total, peak, warmup_fraction, min_ratio)
        expected = hand_written_learning_rate(t, total, peak, warmup_fraction, min_ratio)
        assert np.float32(got) == np.float32(expected), (t, got, expected)


def test_optimizer_update_equals_clip_adam_decay_and_scale_chained_by_hand():
    train_config = small_config().train
    assert train_config.grad_clip_norm > 0 and train_config.weight_decay > 0
    rng = np.random.default_rng(0)

    def draw(shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    params = {"blocks": {"wq": draw((8, 4)), "norm": {"scale": draw((4,))}},
              "embedding": draw((16, 4))}
    mask = weight_decay_mask(params, train_config.decay_norms_and_embeddings)
    assert mask == {"blocks": {"wq": True, "norm": {"scale": False}}, "embedding": False}

    def reference(learning_rate):
        return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm),
                           optax.scale_by_adam(train_config.beta1, train_config.beta2, eps=1e-8),
                           optax.add_decayed_weights(train_config.weight_decay, mask),
                           optax.scale(-learning_rate))

    optimizer = make_optimizer(train_config, params)
    state, ref_state = optimizer.init(params), reference(0.0).init(params)
    ours = theirs = params
    for learning_rate in (1e-3, 2e-3, 5e-4, 3e-3):
        grads = jax.tree.map(lambda p: draw(p.shape, 3.0), params)  # norm > clip: clipped
        learning_rate = jnp.float32(learning_rate)
        updates, state = optimizer.update(grads, with_learning_rate(state, learning_rate), ours)
        ref_updates, ref_state = reference(learning_rate).update(grads, ref_state, theirs)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
            np.testing.assert_array_equal(a, b)
        ours, theirs = optax.apply_updates(ours, updates), optax.apply_updates(theirs, ref_updates)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_skips_norms_and_embeddings_by_default():
    run = one_device(small_config())
    params = abstract_state(run)["params"]
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(path): value
            for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(v for k, v in flat.items() if "norm" in k or "embedding" in k)
    assert all(v for k, v in flat.items() if "wq" in k or "w_gate" in k)
    assert all(jax.tree.leaves(weight_decay_mask(params, decay_norms_and_embeddings=True)))


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch_step():
    config = small_config()
    run = one_device(config)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (8, 64)), "targets": rng.integers(0, 256, (8, 64)),
             "positions": np.tile(np.arange(64), (8, 1)),
             "segment_ids": np.ones((8, 64)), "loss_mask": (rng.random((8, 64)) > 0.2)}
    batch = {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32)
             for k, v in batch.items()}
    results = []
    for accum in (1, 4):
        state = init_state(run, seed=0)
        step = make_train_step(run, accum)
        device_batch = put_batch(batch, run.mesh, 8, "zigzag")
        with mesh_lib.use_mesh(run.mesh):
            state, metrics = step(state, device_batch, np.float32(1e-3))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                        jax.tree.leaves(state["params"])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    # Adam's first update is ~lr * sign(grad); 1e-5 is far below lr = 1e-3
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_stopped_and_resumed_run_has_the_losses_of_an_uninterrupted_run(trained_workdir,
                                                                        stopped_run, tmp_path):
    assert trained_workdir.summary["step"] == 8          # the uninterrupted run
    stopped, first = stopped_run
    assert first["step"] == 5 and first["stopped"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(stopped, resumed)
    trainer.train(small_config(), resumed)                    # resumes from step 5
    expected, got = train_losses(trained_workdir), train_losses(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(6, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)


@pytest.mark.slow
def test_optimizer_state_in_host_memory_trains_and_resumes_as_on_the_device(trained_workdir,
                                                                            tmp_path):
    """train.optimizer_memory=host: AdamW's state lives in pinned host memory between steps
    (an Orbax checkpoint of it restores there); the losses are those of the device run."""
    workdir = str(tmp_path / "host")
    host = {"train.optimizer_memory": "host"}
    first = trainer.train(small_config(**host, **{"train.stop_at_step": 5}), workdir)
    assert first["step"] == 5 and first["stopped"]
    run = one_device(small_config(**host))
    state, _ = restore_newest(workdir, run, "test")
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["opt_state"])} == \
        {"pinned_host"}
    trainer.train(small_config(**host), workdir)                # resumes from step 5
    expected, got = train_losses(trained_workdir), train_losses(workdir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)


@pytest.mark.slow
def test_train_returns_the_same_keys_stopped_early_or_finished(trained_workdir, stopped_run):
    finished, (_, stopped) = trained_workdir.summary, stopped_run
    assert set(finished) == set(stopped) == SUMMARY_KEYS
    assert (stopped["step"], stopped["stopped"], stopped["eval"], stopped["retrieval"]) == \
        (5, True, None, None)
    assert stopped["tokens"] == 5 * 8 * 64 and stopped["final_loss"] > 0
    assert finished["stopped"] is False and finished["eval"]["lengths"] == [64]
    assert finished["retrieval"] is None                   # no eval.retrieval_tasks
    assert finished["step"] == 8 and finished["tokens"] == 8 * 8 * 64


@pytest.mark.slow
def test_workdir_holds_config_metrics_tensorboard_checkpoints_and_eval(trained_workdir):
    workdir, summary = trained_workdir, trained_workdir.summary   # eval.every_steps = 4
    assert json.load(open(os.path.join(workdir, "config.json")))["curriculum"]["l_max"] == 64
    record = read_metrics(workdir)[1]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "seq_len", "batch_size",
                "tokens_per_sec", "step_time_s"):
        assert key in record
    eval_steps = [r["step"] for r in read_metrics(workdir) if "eval/perplexity_64" in r]
    assert eval_steps == [4, 8]                          # every eval.every_steps and at the end
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    evaluation = json.load(open(os.path.join(workdir, "eval", "perplexity_by_length.json")))
    assert evaluation["lengths"] == [64]
    assert evaluation["perplexity"][0] == pytest.approx(summary["eval"]["perplexity"][0])
    assert os.path.exists(os.path.join(workdir, "eval", "perplexity_by_length.csv"))


@pytest.mark.slow
def test_training_prints_one_progress_line_per_logged_step(trained_workdir):
    """Lines like "step 2/8 | loss 5.5432 | lr 2.00e-03 | 4.2k tok/s | ETA 0m03s" (one level:
    no "| L="), with an ETA from the second step on (the first step's compile is left out of
    the rate)."""
    pattern = re.compile(r"step (\d+)/8 \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| "
                         r"(\d+\.\dk tok/s|compiled)( \| ETA \d+m\d\ds)?")
    lines = trained_workdir.output.splitlines()
    matches = [pattern.fullmatch(line) for line in lines if line.startswith("step ")]
    assert all(matches), [line for line in lines if line.startswith("step ")]
    assert [int(m.group(1)) for m in matches] == list(range(1, 9))   # log_every_steps = 1
    assert [m.group(2) == "compiled" for m in matches] == [True] + [False] * 7
    assert [bool(m.group(3)) for m in matches] == [False] + [True] * 7
    assert lines.count("evaluation at step 4 (perplexity by length; sliding window and "
                       "retrieval run at the end)") == 1


@pytest.mark.slow
def test_the_step_that_compiled_reports_its_compile_time_not_a_throughput(trained_workdir):
    records = [r for r in read_metrics(trained_workdir) if "loss" in r]
    first, steady = records[0], records[1:]
    assert first["step"] == 1 and first["compile_s"] > 0
    assert "tokens_per_sec" not in first and "step_time_s" not in first
    assert all("compile_s" not in r for r in steady)
    # steady steps of one shape run at one speed: no outlier of a compile left out
    speeds = sorted(r["tokens_per_sec"] for r in steady)
    assert speeds[-1] < 5 * speeds[len(speeds) // 2]


@pytest.mark.slow
def test_periodic_evaluations_log_under_eval_name_prefix(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    trainer.train(small_config(**{"model.n_layers": 1, "train.steps": 4, "eval.every_steps": 2,
                                  "eval.name": "periodic", "checkpoint.every_steps": 4}),
                  workdir)
    records = read_metrics(workdir)
    named = [r["step"] for r in records if "eval/periodic/perplexity_64" in r]
    assert named == [2, 4]                      # at step 2 (periodic) and at the end
    assert not [k for r in records for k in r if k.startswith("eval/perplexity")]
    assert os.path.exists(os.path.join(workdir, "eval", "periodic", "perplexity_by_length.json"))
    out = capsys.readouterr().out
    assert out.count("evaluation at step 2 (perplexity by length; sliding window and "
                     "retrieval run at the end)") == 1


@pytest.mark.slow
def test_writer_and_checkpointer_are_closed_when_a_step_raises(tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    config = small_config(**{"model.n_layers": 1, "train.steps": 4, "checkpoint.every_steps": 2,
                             "checkpoint.async_save": True})
    closed = []
    for cls in (metrics_lib.MetricsWriter, checkpoint_lib.Checkpointer):
        def spy(self, _close=cls.close, _name=cls.__name__):
            _close(self)
            closed.append(_name)
        monkeypatch.setattr(cls, "close", spy)
    calls = []

    def failing_put_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step 3 failed")
        return put_batch(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "put_batch", failing_put_batch)
        with pytest.raises(RuntimeError, match="step 3 failed"):
            trainer.train(config, workdir)
    assert sorted(closed) == ["Checkpointer", "MetricsWriter"]
    assert sorted(train_losses(workdir)) == [1, 2]                 # written out and complete
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert f.read().endswith("\n")
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]   # the async save finished
    capsys.readouterr()
    summary = trainer.train(config, workdir)                         # resumes cleanly
    assert "at step 2" in capsys.readouterr().out
    assert summary["step"] == 4 and not summary["stopped"]
    assert sorted(train_losses(workdir)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_eval_mode_scores_the_newest_checkpoint_at_each_length(trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)                  # it writes eval/ and metrics
    again = eval_mode.evaluate_workdir(small_config(), workdir)    # the end-of-training protocol
    assert again["step"] == 8
    assert again["perplexity"][0] == pytest.approx(
        trained_workdir.summary["eval"]["perplexity"][0], rel=1e-5)
    result = eval_mode.evaluate_workdir(small_config(**{"eval.lengths": (32, 64),
                                                      "eval.name": "short"}), workdir)
    assert result["lengths"] == [32, 64] and len(result["perplexity"]) == 2


@pytest.mark.slow
def test_eval_with_other_lengths_never_overwrites_the_run_s_eval(trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    before = open(os.path.join(workdir, "eval", "perplexity_by_length.json")).read()
    with pytest.raises(ValueError, match=r"holds results for eval.lengths = \[64\], not "
                                         r"\[32, 64\]: set --config.eval.name=NAME"):
        eval_mode.evaluate_workdir(small_config(**{"eval.lengths": (32, 64)}), workdir)
    assert open(os.path.join(workdir, "eval", "perplexity_by_length.json")).read() == before
    eval_mode.evaluate_workdir(small_config(**{"eval.lengths": (32, 64), "eval.name": "short"}),
                             workdir)
    assert json.load(open(os.path.join(workdir, "eval", "short",
                                       "perplexity_by_length.json")))["lengths"] == [32, 64]
    assert open(os.path.join(workdir, "eval", "perplexity_by_length.json")).read() == before


@pytest.mark.slow
def test_an_unfinished_checkpoint_is_never_resumed_from(stopped_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run[0], workdir)                  # stopped at step 5
    # what an interrupted save of step 6 leaves behind: a temporary directory, not a step
    os.makedirs(workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234" / "state")
    summary = trainer.train(small_config(), str(workdir))
    assert summary["step"] == 8
    assert sorted(train_losses(workdir)) == list(range(1, 9))  # resumed at 5, not 6


def run_main(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_misspelled_config_key_is_rejected_on_the_command_line(tmp_path):
    result = run_main("--config", "configs/tiny.py", "--config.train.stepz=3",
                      "--workdir", str(tmp_path))
    assert result.returncode != 0
    assert "stepz" in result.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.seq=3", "devices"),
    ("--config.model.kv_heads=3", "multiple of model.kv_heads"),
    ("--config.eval.batch_size=3", "multiple of mesh data x fsdp"),   # a physical rule
    ("--config.data.path=/no/such/dir/*.txt", "no file"),
])
def test_impossible_settings_fail_with_one_clear_line_before_compiling(tmp_path, override, message):
    source = ["--config.data.source=text"] if "data.path" in override else []
    result = run_main("--config", "configs/tiny.py", override, *source, "--workdir", str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.splitlines()[-1]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unigram_baseline_is_the_exponentiated_entropy_of_the_scored_targets():
    from evaluation.perplexity import unigram_perplexity_of_targets
    batch = {"targets": np.array([[1, 1, 2, 2, 7]]), "loss_mask": np.array([[1, 1, 1, 1, 0.0]])}
    assert unigram_perplexity_of_targets([batch], 256) == pytest.approx(2.0)  # two equal tokens


@pytest.mark.slow
def test_init_from_starts_a_longer_run_from_trained_weights_with_a_fresh_optimizer(
        trained_workdir, tmp_path):
    base = str(trained_workdir)
    tuned = small_config(**{"train.steps": 2, "train.init_from": base, "curriculum.l_max": 128,
                            "train.batch_size": 8, "eval.lengths": (128,)})
    tuned.model.rope.scaling = '{"rope_type": "linear", "factor": 2}'
    summary = trainer.train(tuned, str(tmp_path / "tuned"))
    fresh = small_config(**{"train.steps": 2, "curriculum.l_max": 128, "train.batch_size": 8,
                            "eval.lengths": (128,)})
    untrained = trainer.train(fresh, str(tmp_path / "fresh"))

    def first_loss(workdir):
        return train_losses(workdir)[1]

    assert first_loss(tmp_path / "tuned") < first_loss(tmp_path / "fresh") - 0.2
    assert summary["step"] == 2 and untrained["step"] == 2
    # the parameters train.init_from loads into the longer run are exactly the base run's
    loaded = restore_newest(base, build_run(settings_of(tuned)), "train.init_from")[0]["params"]
    saved = restore_newest(base, build_run(settings_of(small_config())), "test")[0]["params"]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
