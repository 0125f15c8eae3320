"""Specification of evaluation by length: protocols, baselines, not-evaluable lengths, and
an end-to-end evaluation of a trained checkpoint on 8 simulated devices."""
import json
import os

import jax
import numpy as np
import pytest

from data.windows import same_target_windows, sliding_windows
from evaluation import suite
from evaluation.lengths import default_top_length, evaluation_lengths, memory_budget_bytes
from evaluation.perplexity import position_buckets
from evaluation.scoring import memory_fits, scoring_bytes
from tests.helpers import read_metrics, small_config
from train.curriculum import eval_level
from train.state import abstract_state, build_run, eval_setup_from, init_state
from cli.eval_mode import evaluate_workdir
from train.validate import validate_config
from configs.sections import settings as settings_of


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n) for n in lengths]


def test_every_length_scores_the_same_target_tokens():
    windows = same_target_windows(documents([300, 90, 200]), [32, 64, 128],
                                  score_tokens=16, max_windows=0)
    scored = {L: rows["targets"][rows["loss_mask"] > 0].tolist() for L, rows in windows.items()}
    assert scored[32] == scored[64] == scored[128]
    assert len(scored[32]) == 2 * 16            # the 90-token document is too short for 128
    assert windows[128]["tokens"].shape == (2, 128)


def test_windows_end_at_the_document_end_and_targets_are_the_next_tokens():
    doc = np.arange(1000)
    rows = same_target_windows([doc], [64], score_tokens=8, max_windows=0)[64]
    assert rows["tokens"][0, -1] == 998 and rows["targets"][0, -1] == 999
    np.testing.assert_array_equal(rows["targets"][0, :-1], rows["tokens"][0, 1:])


def test_no_document_long_enough_is_a_clear_error():
    with pytest.raises(ValueError, match="lower eval.lengths"):
        same_target_windows(documents([50]), [32, 64], 16, 0)


def test_sliding_windows_score_every_target_exactly_once():
    doc = np.arange(1, 1001)
    rows = sliding_windows([doc], length=256, stride=100, max_windows=0)
    scored = rows["targets"][rows["loss_mask"] > 0]
    np.testing.assert_array_equal(scored, doc[1:])
    # every window after the first scores only its last `stride` (new) targets
    assert rows["loss_mask"][1].sum() == 100 and rows["loss_mask"][1, :156].sum() == 0


def test_loss_by_position_averages_in_log2_buckets():
    nll = np.tile(np.arange(1, 9, dtype=float), (2, 1))      # position p has loss p
    buckets = position_buckets(nll, np.ones_like(nll))
    assert buckets["bucket_start"] == [1, 2, 4, 8]
    assert buckets["loss"] == [1.0, 2.5, 5.5, 8.0]


def build(config):
    curriculum = validate_config(settings_of(config))
    settings = settings_of(config)
    run = build_run(settings, level=eval_level(settings, curriculum))
    return run, suite.build_eval_data(eval_setup_from(settings), run.model_config, run.tokenizer)


@pytest.mark.slow
def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    config = small_config(**{"eval.lengths": (32, 64), "eval.sliding_max_windows": 2})
    run, data = build(config)
    params = jax.tree.map(np.zeros_like, init_state(run, seed=0)["params"])  # logits 0
    result = suite.evaluate(run, params, data)["perplexity_by_length"]
    assert result["lengths"] == [32, 64]
    np.testing.assert_allclose(result["perplexity"], [256.0, 256.0], rtol=1e-5)
    np.testing.assert_allclose(result["sliding_window"]["perplexity"], [256.0, 256.0], rtol=1e-5)


def test_learned_positions_report_lengths_beyond_l_max_as_not_evaluable():
    config = small_config(**{"model.position": "learned", "eval.lengths": (32, 64, 128, 256)})
    run, data = build(config)
    assert data.lengths == [32, 64]
    assert set(data.not_evaluable) == {"128", "256"}
    assert "l_max=64" in data.not_evaluable["128"]


@pytest.mark.slow
def test_evaluation_under_another_rope_scaling_is_recorded_and_changes_the_result():
    config = small_config(**{"eval.lengths": (64,), "eval.sliding_stride": 0})
    run, data = build(config)
    params = init_state(run, seed=0)["params"]
    plain = suite.evaluate(run, params, data)["perplexity_by_length"]
    config.eval.rope_scaling = '{"rope_type": "linear", "factor": 4}'
    scaled_run, _ = build(config)
    scaled = suite.evaluate(scaled_run, params, data)["perplexity_by_length"]
    assert scaled["rope_scaling"]["rope_type"] == "linear" and plain["rope_scaling"] is None
    assert scaled["perplexity"][0] != pytest.approx(plain["perplexity"][0], rel=1e-6)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
def test_every_hugging_face_scaling_can_replace_the_trained_rope_at_evaluation(rope_type):
    config = small_config(**{"eval.rope_scaling": f'{{"rope_type": "{rope_type}", "factor": 4}}'})
    level = eval_level(settings_of(config), validate_config(settings_of(config)))
    scaling = json.loads(level.rope_scaling_json)
    assert scaling["rope_type"] == rope_type and scaling["factor"] == 4.0


def test_eval_rope_scaling_none_evaluates_a_scaled_model_without_its_scaling():
    config = small_config(**{"eval.rope_scaling": "none"})
    config.model.rope.scaling = '{"rope_type": "linear", "factor": 2}'
    level = eval_level(settings_of(config), validate_config(settings_of(config)))
    assert json.loads(level.rope_scaling_json) is None


@pytest.mark.slow
def test_a_trained_checkpoint_is_evaluated_end_to_end_on_8_devices(trained_workdir):
    """The shared checkpoint (trained with blockwise attention on data 8) scored with ring
    attention on data 4 x seq 2, beyond l_max, with a retrieval grid, under its own name."""
    ring = {"model.attention": "ring", "mesh.seq": 2, "mesh.data": 4,
            "eval.lengths": (32, 64, 128), "eval.batch_size": 4}
    config = small_config(**ring, **{"eval.name": "grid", "eval.retrieval_tasks": ("passkey",),
                                     "eval.retrieval_lengths": (128, 256)})
    result = evaluate_workdir(config, trained_workdir)
    out = os.path.join(trained_workdir, "eval", "grid")
    for name in ("perplexity_by_length.json", "perplexity_by_length.csv", "retrieval.json",
                 "perplexity_by_length.png", "retrieval.png", "summary.md"):
        assert os.path.exists(os.path.join(out, name)), name
    assert result["lengths"] == [32, 64, 128] and result["step"] == 8
    grid = json.load(open(os.path.join(out, "retrieval.json")))["tasks"]["passkey"]
    assert grid["lengths"] == [128, 256] and len(grid["accuracy"]) == 2
    assert len(grid["accuracy"][0]) == len(suite.DEPTHS)
    assert [r["step"] for r in read_metrics(trained_workdir)
            if "eval/grid/perplexity_64" in r] == [8]


# ------------------------------------------------------------------ default lengths
def test_default_lengths_double_from_half_l_max_to_the_probed_top():
    l_max = 64
    assert evaluation_lengths(None, l_max) == (32, 64, 128, 256, 512)
    assert evaluation_lengths(None, l_max, top=2048)[-1] == 2048
    assert evaluation_lengths(None, l_max, top=100)[-1] == 512    # never below 8 l_max


def test_set_lengths_are_taken_sorted_whatever_the_probe():
    assert evaluation_lengths((256, 64), 64, top=4096) == (64, 256)


def test_default_top_length_is_the_largest_power_of_two_that_fits():
    def fits(length):
        return True if length <= 4096 else f"{length} too big"

    top = default_top_length(64, [10**6] * 8, rows=8, fits=fits)
    assert top.length == 4096 and "8192 too big" in top.reason


def test_default_top_length_needs_a_batch_of_long_enough_documents():
    # 8 rows: the 8th longest document (2000 tokens) allows 1024 but not 2048
    docs = [10**6] * 7 + [2000]
    top = default_top_length(64, docs, rows=8, fits=None)
    assert top.length == 1024 and "fewer than eval.batch_size = 8" in top.reason


def test_default_top_length_respects_eval_max_length():
    top = default_top_length(64, [10**6] * 8, rows=8, max_length=2048)
    assert top.length == 2048 and "eval.max_length 2048" in top.reason


def test_default_top_length_keeps_8_l_max_and_says_why_when_it_does_not_fit():
    top = default_top_length(64, [10**6] * 8, rows=8, fits=lambda n: "no memory")
    assert top.length == 512 and top.reason.startswith("8 l_max kept although no memory")


@pytest.mark.slow
def test_scoring_memory_grows_with_length_and_decides_the_top():
    config = small_config(**{"eval.lengths": None})
    run = build_run(settings_of(config), jax.devices()[:1])
    params = abstract_state(run)["params"]
    small, large = (scoring_bytes(run, params, 8, n) for n in (512, 2048))
    assert large > 2 * small                                 # activations and logits grow
    budget = (small + large) // 2
    fits = memory_fits(run, params, 8, budget)
    assert fits(512) is True and "over the budget" in fits(2048)
    top = default_top_length(64, [10**6] * 8, rows=8, fits=fits)
    assert top.length == 1024                    # between the two measured lengths


def test_memory_budget_comes_from_the_config_first():
    assert memory_budget_bytes(jax.devices(), 300) == (300 * 2**20, "eval.memory_budget_mib")
    budget, source = memory_budget_bytes(jax.devices())
    assert budget > 0 and "host memory / 8 local devices" == source   # CPU: no bytes_limit


@pytest.mark.slow
def test_evaluation_probes_the_default_lengths_and_prints_why_it_stopped(capsys):
    # 8 validation documents of 1025+ tokens exist, and a budget that fits 1024 but not 2048
    config = small_config(**{"eval.lengths": None, "eval.max_batches": 1})
    curriculum = validate_config(settings_of(config))
    run = build_run(settings_of(config), level=eval_level(settings_of(config), curriculum))
    params = abstract_state(run)["params"]
    budget = sum(scoring_bytes(run, params, 8, n) for n in (1024, 2048)) // 2
    config.eval.memory_budget_mib = budget / 2**20
    data = suite.prepare(eval_setup_from(settings_of(config)), run, run.tokenizer, params)
    assert data.lengths == [32, 64, 128, 256, 512, 1024]
    assert "eval lengths up to 1024 (stopped: scoring [8, 2048] needs" in capsys.readouterr().out
