"""Specification of evaluation by length: protocols, baselines, not-evaluable lengths, and
an end-to-end evaluation of a trained checkpoint on 8 simulated devices."""
import json
import os

import jax
import numpy as np
import pytest

from tests.helpers import small_config
from train import evaluate, trainer


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n) for n in lengths]


def test_every_length_scores_the_same_target_tokens():
    windows = evaluate.same_target_windows(documents([300, 90, 200]), [32, 64, 128],
                                           score_tokens=16, max_windows=0)
    scored = {L: rows["targets"][rows["loss_mask"] > 0].tolist() for L, rows in windows.items()}
    assert scored[32] == scored[64] == scored[128]
    assert len(scored[32]) == 2 * 16            # the 90-token document is too short for 128
    assert windows[128]["tokens"].shape == (2, 128)


def test_windows_end_at_the_document_end_and_targets_are_the_next_tokens():
    doc = np.arange(1000)
    rows = evaluate.same_target_windows([doc], [64], score_tokens=8, max_windows=0)[64]
    assert rows["tokens"][0, -1] == 998 and rows["targets"][0, -1] == 999
    np.testing.assert_array_equal(rows["targets"][0, :-1], rows["tokens"][0, 1:])


def test_no_document_long_enough_is_a_clear_error():
    with pytest.raises(ValueError, match="lower eval.lengths"):
        evaluate.same_target_windows(documents([50]), [32, 64], 16, 0)


def test_sliding_windows_score_every_target_exactly_once():
    doc = np.arange(1, 1001)
    rows = evaluate.sliding_windows([doc], length=256, stride=100, max_windows=0)
    scored = rows["targets"][rows["loss_mask"] > 0]
    np.testing.assert_array_equal(scored, doc[1:])
    # every window after the first scores only its last `stride` (new) targets
    assert rows["loss_mask"][1].sum() == 100 and rows["loss_mask"][1, :156].sum() == 0


def test_loss_by_position_averages_in_log2_buckets():
    nll = np.tile(np.arange(1, 9, dtype=float), (2, 1))      # position p has loss p
    buckets = evaluate.position_buckets(nll, np.ones_like(nll))
    assert buckets["bucket_start"] == [1, 2, 4, 8]
    assert buckets["loss"] == [1.0, 2.5, 5.5, 8.0]


def build(config):
    plan = trainer.validate_config(config)
    run = trainer.build_run(config, level=trainer.eval_level(config, plan))
    return run, evaluate.build_eval_data(config, run.model_config, run.tokenizer)


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    config = small_config(**{"eval.lengths": (32, 64), "eval.sliding_max_windows": 2})
    run, data = build(config)
    params = jax.tree.map(np.zeros_like, trainer.init_state(run, seed=0)["params"])  # logits 0
    result = evaluate.evaluate(run, params, data)["perplexity_by_length"]
    assert result["lengths"] == [32, 64]
    np.testing.assert_allclose(result["perplexity"], [256.0, 256.0], rtol=1e-5)
    np.testing.assert_allclose(result["sliding_window"]["perplexity"], [256.0, 256.0], rtol=1e-5)


def test_learned_positions_report_lengths_beyond_l_max_as_not_evaluable():
    config = small_config(**{"model.position": "learned", "eval.lengths": (32, 64, 128, 256)})
    run, data = build(config)
    assert data.lengths == [32, 64]
    assert set(data.not_evaluable) == {"128", "256"}
    assert "l_max=64" in data.not_evaluable["128"]


def test_evaluation_under_another_rope_scaling_is_recorded_and_changes_the_result():
    config = small_config(**{"eval.lengths": (64,), "eval.sliding_stride": 0})
    run, data = build(config)
    params = trainer.init_state(run, seed=0)["params"]
    plain = evaluate.evaluate(run, params, data)["perplexity_by_length"]
    config.eval.rope_scaling = '{"rope_type": "linear", "factor": 4}'
    scaled_run, _ = build(config)
    scaled = evaluate.evaluate(scaled_run, params, data)["perplexity_by_length"]
    assert scaled["rope_scaling"]["rope_type"] == "linear" and plain["rope_scaling"] is None
    assert scaled["perplexity"][0] != pytest.approx(plain["perplexity"][0], rel=1e-6)


@pytest.mark.slow
def test_a_trained_checkpoint_is_evaluated_end_to_end_on_8_devices(tmp_path):
    workdir = str(tmp_path / "run")
    ring = {"model.attention": "ring", "mesh.seq": 2, "mesh.data": 4, "train.steps": 4,
            "eval.lengths": (32, 64, 128), "eval.batch_size": 4}
    trainer.train(small_config(**ring), workdir)
    config = small_config(**ring, **{"eval.name": "grid", "eval.retrieval_tasks": ("passkey",),
                                     "eval.retrieval_lengths": (128, 256)})
    result = trainer.evaluate_workdir(config, workdir)
    out = os.path.join(workdir, "eval", "grid")
    for name in ("perplexity_by_length.json", "perplexity_by_length.csv", "retrieval.json",
                 "perplexity_by_length.png", "retrieval.png", "summary.md"):
        assert os.path.exists(os.path.join(out, name)), name
    assert result["lengths"] == [32, 64, 128] and result["step"] == 4
    grid = json.load(open(os.path.join(out, "retrieval.json")))["tasks"]["passkey"]
    assert grid["lengths"] == [128, 256] and len(grid["accuracy"]) == 2
    assert len(grid["accuracy"][0]) == len(evaluate.DEPTHS)
    assert any("eval/grid/perplexity_64" in line for line in open(os.path.join(workdir, "metrics.jsonl")))
