"""Specification of the trainer: exact resume, accumulation, schedule, files, errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import read_metrics, small_config, train_losses
from train import trainer
from train.optimizer import learning_rate_at, weight_decay_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device(config):
    return trainer.build_run(config, devices=jax.devices()[:1])


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    peak, total = 1.0, 1000
    assert learning_rate_at(0, total, peak, 0.1, 0.1) == pytest.approx(0.01)
    assert learning_rate_at(49, total, peak, 0.1, 0.1) == pytest.approx(0.5)
    assert learning_rate_at(100, total, peak, 0.1, 0.1) == pytest.approx(1.0)
    assert learning_rate_at(550, total, peak, 0.1, 0.1) == pytest.approx(0.55)  # half-way
    assert learning_rate_at(1000, total, peak, 0.1, 0.1) == pytest.approx(0.1)
    assert learning_rate_at(5000, total, peak, 0.1, 0.1) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_embeddings_by_default():
    run = one_device(small_config())
    params = trainer.abstract_state(run)["params"]
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(path): value
            for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(v for k, v in flat.items() if "norm" in k or "embedding" in k)
    assert all(v for k, v in flat.items() if "wq" in k or "w_gate" in k)
    assert all(jax.tree.leaves(weight_decay_mask(params, decay_norms_and_embeddings=True)))


def test_gradient_accumulation_equals_the_full_batch_step():
    config = small_config()
    run = one_device(config)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (8, 64)), "targets": rng.integers(0, 256, (8, 64)),
             "positions": np.tile(np.arange(64), (8, 1)),
             "segment_ids": np.ones((8, 64)), "loss_mask": (rng.random((8, 64)) > 0.2)}
    batch = {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32) for k, v in batch.items()}
    results = []
    for accum in (1, 4):
        state = trainer.init_state(run, seed=0)
        step = trainer.make_train_step(run, accum)
        device_batch = trainer.put_batch(batch, run.mesh, 8, "zigzag")
        with trainer.mesh_lib.use_mesh(run.mesh):
            state, metrics = step(state, device_batch, np.float32(1e-3))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                        jax.tree.leaves(state["params"])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    # Adam's first update is ~lr * sign(grad); 1e-5 is far below lr = 1e-3
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_stopped_and_resumed_run_has_the_losses_of_an_uninterrupted_run(tmp_path):
    config = small_config()
    whole = trainer.train(config, str(tmp_path / "whole"))
    assert whole["step"] == 8
    first = trainer.train(small_config(**{"train.stop_at_step": 5}), str(tmp_path / "resumed"))
    assert first["step"] == 5 and first["stopped"]
    trainer.train(config, str(tmp_path / "resumed"))          # resumes from step 5
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 9))
    for step in range(6, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)


@pytest.mark.slow
def test_workdir_holds_config_metrics_tensorboard_checkpoints_and_eval(tmp_path):
    workdir = str(tmp_path / "run")
    summary = trainer.train(small_config(**{"eval.every_steps": 4}), workdir)
    assert json.load(open(os.path.join(workdir, "config.json")))["curriculum"]["l_max"] == 64
    record = read_metrics(workdir)[0]
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
def test_eval_mode_scores_the_newest_checkpoint_at_each_length(tmp_path):
    workdir = str(tmp_path / "run")
    trained = trainer.train(small_config(), workdir)
    again = trainer.evaluate_workdir(small_config(), workdir)    # the end-of-training protocol
    assert again["step"] == 8
    assert again["perplexity"][0] == pytest.approx(trained["eval"]["perplexity"][0], rel=1e-5)
    result = trainer.evaluate_workdir(small_config(**{"eval.lengths": (32, 64)}), workdir)
    assert result["lengths"] == [32, 64] and len(result["perplexity"]) == 2


@pytest.mark.slow
def test_an_unfinished_checkpoint_is_never_resumed_from(tmp_path):
    workdir = tmp_path / "run"
    trainer.train(small_config(**{"train.stop_at_step": 4}), str(workdir))
    # what an interrupted save of step 6 leaves behind: a temporary directory, not a step
    os.makedirs(workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234" / "state")
    summary = trainer.train(small_config(), str(workdir))
    assert summary["step"] == 8
    assert sorted(train_losses(workdir)) == list(range(1, 9))  # resumed at 4, not 6


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
    ("--config.curriculum.l_max=200", "multiple of model.block_q"),
    ("--config.data.path=/no/such/dir/*.txt", "no file"),
])
def test_impossible_settings_fail_with_one_clear_line_before_compiling(tmp_path, override, message):
    source = ["--config.data.source=text"] if "data.path" in override else []
    result = run_main("--config", "configs/tiny.py", override, *source, "--workdir", str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.splitlines()[-1]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unigram_baseline_is_the_exponentiated_entropy_of_the_scored_targets():
    from train.evaluate import unigram_perplexity_of_targets
    batch = {"targets": np.array([[1, 1, 2, 2, 7]]), "loss_mask": np.array([[1, 1, 1, 1, 0.0]])}
    assert unigram_perplexity_of_targets([batch], 256) == pytest.approx(2.0)  # two equal tokens


@pytest.mark.slow
def test_init_from_starts_a_longer_run_from_trained_weights_with_a_fresh_optimizer(tmp_path):
    base = str(tmp_path / "base")
    trainer.train(small_config(), base)
    tuned = small_config(**{"train.steps": 2, "train.init_from": base, "curriculum.l_max": 128,
                            "train.batch_size": 8, "eval.lengths": (128,)})
    tuned.model.rope.scaling = '{"rope_type": "linear", "factor": 2}'
    summary = trainer.train(tuned, str(tmp_path / "tuned"))
    fresh = small_config(**{"train.steps": 2, "curriculum.l_max": 128, "train.batch_size": 8,
                            "eval.lengths": (128,)})
    untrained = trainer.train(fresh, str(tmp_path / "fresh"))
    first_loss = lambda d: train_losses(d)[1]
    assert first_loss(tmp_path / "tuned") < first_loss(tmp_path / "fresh") - 0.2
    assert summary["step"] == 2 and untrained["step"] == 2
    # the loaded parameters are exactly the base run's final ones
    run = trainer.build_run(tuned)
    loaded = trainer.load_params(base, run)
    saved = trainer.restore_newest(base, trainer.build_run(small_config()), "test")[0]["params"]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
