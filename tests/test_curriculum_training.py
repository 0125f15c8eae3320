"""Training through a length curriculum: relayout between levels, exact resume anywhere."""

import pytest

from tests.helpers import plan_table, read_metrics, small_config, train_losses
from train import trainer
from train.curriculum import format_mesh
from train.validate import validate_config
from configs.sections import settings as settings_of


def curriculum_config(**overrides):
    """3 levels on 8 devices: 64 x 8 rows (data 8) -> 128 x 4 (data 4 x seq 2) -> 256 x 2."""
    settings = {"model.attention": "ring", "model.n_layers": 1, "curriculum.levels": 3,
                "train.steps": 8, "checkpoint.every_steps": 100, "eval.batch_size": 2}
    settings.update(overrides)
    return small_config(**settings)


def resume_through(workdir, config_overrides, stops):
    for stop in stops:
        config = curriculum_config(**config_overrides, **{"train.stop_at_step": stop})
        summary = trainer.train(config, str(workdir))
        assert summary["step"] == stop
    trainer.train(curriculum_config(**config_overrides), str(workdir))


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """A workdir trained through curriculum_config() without interruption (read only)."""
    workdir = tmp_path_factory.mktemp("curriculum") / "whole"
    trainer.train(curriculum_config(), str(workdir))
    return workdir


@pytest.mark.slow
def test_levels_train_at_growing_length_with_the_devices_moved_to_seq(whole_run):
    records = [r for r in read_metrics(whole_run) if "loss" in r]
    seen = {(r["level"], r["seq_len"], r["batch_size"], r["layout"]) for r in records}
    assert seen == {(0, 64, 8, "data 8"), (1, 128, 4, "data 4 x seq 2"),
                    (2, 256, 2, "data 2 x seq 4")}
    assert [r["level"] for r in records] == [0, 0, 0, 0, 1, 1, 2, 2]   # 50% / 25% / 25%
    assert len({r["seq_len"] * r["batch_size"] for r in records}) == 1  # same tokens every step


@pytest.mark.slow
def test_resume_mid_level_and_at_a_level_boundary_continues_exactly(whole_run, tmp_path):
    # stop in level 0 (step 3), at the 0 -> 1 boundary (step 4), in level 1 (step 5)
    resume_through(tmp_path / "resumed", {}, stops=[3, 4, 5])
    expected, got = train_losses(whole_run), train_losses(tmp_path / "resumed")
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


@pytest.mark.slow
def test_the_plan_is_printed_as_a_table_before_training(tmp_path, capsys):
    config = curriculum_config(**{"train.stop_at_step": 1})
    trainer.train(config, str(tmp_path))
    out = capsys.readouterr().out
    plan_start = out.index("length curriculum: 3 level(s), order ascending, budget in tokens")
    assert out.index("compiled the step") > plan_start
    curriculum = validate_config(settings_of(config))
    rows = plan_table(out)
    assert len(rows) == len(curriculum.levels) == 3
    for row, level in zip(rows, curriculum.levels):
        assert (row["level"], row["length"], row["batch"], row["steps"], row["mesh"]) == (
            str(level.index), str(level.seq_len), str(level.batch_size), str(level.steps),
            format_mesh(level.mesh))
    assert [(r["length"], r["batch"], r["steps"], r["mesh"]) for r in rows] == [
        ("64", "8", "4", "data 8 x seq 1"), ("128", "4", "2", "data 4 x seq 2"),
        ("256", "2", "2", "data 2 x seq 4")]
    assert f"total: {curriculum.total_steps} steps, {curriculum.total_tokens:,} tokens" in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [("ulysses", {}), ("allgather", {}),
                                            ("hybrid", {"model.ulysses_degree": 2})])
def test_the_relayout_works_with_every_sequence_parallel_strategy(whole_run, tmp_path,
                                                                   strategy, extra):
    """The same curriculum (devices moved from data to seq at levels 1 and 2) with another
    strategy: the losses of the ring's run."""
    workdir = tmp_path / strategy
    trainer.train(curriculum_config(**{"model.attention": strategy, **extra}), str(workdir))
    ring, other = train_losses(whole_run), train_losses(workdir)
    assert sorted(other) == sorted(ring)
    for step, loss in ring.items():
        assert abs(other[step] - loss) <= 1e-4, (step, other[step], loss)
