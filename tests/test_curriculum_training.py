"""Training through a length curriculum: relayout between levels, exact resume anywhere."""
import json
import os

import pytest

from tests.helpers import read_metrics, small_config, train_losses
from train import trainer


def curriculum_config(**overrides):
    """3 levels on 8 devices: 64 x 8 rows (data 8) -> 128 x 4 (data 4 x seq 2) -> 256 x 2."""
    settings = {"model.attention": "ring", "model.n_layers": 1, "curriculum.levels": 3,
                "train.steps": 8, "checkpoint.every_steps": 100, "eval.batch_size": 2}
    settings.update(overrides)
    return small_config(**settings)


def resume_through(workdir, config_overrides, stops):
    for stop in stops:
        summary = trainer.train(curriculum_config(**config_overrides, **{"train.stop_at_step": stop}),
                                str(workdir))
        assert summary["step"] == stop
    trainer.train(curriculum_config(**config_overrides), str(workdir))


@pytest.mark.slow
def test_levels_train_at_growing_length_with_the_devices_moved_to_seq(tmp_path):
    trainer.train(curriculum_config(), str(tmp_path))
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    seen = {(r["level"], r["seq_len"], r["batch_size"], r["layout"]) for r in records}
    assert seen == {(0, 64, 8, "data 8"), (1, 128, 4, "data 4 x seq 2"), (2, 256, 2, "data 2 x seq 4")}
    assert [r["level"] for r in records] == [0, 0, 0, 0, 1, 1, 2, 2]   # 50% / 25% / 25%
    assert len({r["seq_len"] * r["batch_size"] for r in records}) == 1  # same tokens every step


@pytest.mark.slow
def test_resume_mid_level_and_at_a_level_boundary_continues_exactly(tmp_path):
    trainer.train(curriculum_config(), str(tmp_path / "whole"))
    # stop in level 0 (step 3), at the 0 -> 1 boundary (step 4), in level 1 (step 5)
    resume_through(tmp_path / "resumed", {}, stops=[3, 4, 5])
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.slow
def test_resume_in_interleaved_order_continues_exactly(tmp_path):
    interleaved = {"curriculum.order": "interleaved"}
    trainer.train(curriculum_config(**interleaved), str(tmp_path / "whole"))
    levels = [r["level"] for r in read_metrics(tmp_path / "whole") if "loss" in r]
    assert sorted(levels) == [0, 0, 0, 0, 1, 1, 2, 2] and levels != sorted(levels)
    resume_through(tmp_path / "resumed", interleaved, stops=[5])
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_the_plan_is_printed_before_training(tmp_path, capsys):
    trainer.train(curriculum_config(**{"train.stop_at_step": 1}), str(tmp_path))
    out = capsys.readouterr().out
    plan_start = out.index("length")
    assert out.index("compiled the step") > plan_start
    for length, batch in ((64, 8), (128, 4), (256, 2)):
        assert str(length) in out and str(batch) in out
