"""Length curriculum (train/curriculum.py): pure Python, no compiles."""
import json

import numpy as np
import pytest

from configs import base
from configs.sections import settings as settings_of
from tests.helpers import plan_table
from train import curriculum as curriculum_lib
from train.curriculum import default_shares


def make_curriculum(config, device_count: int):
    """The curriculum of a config, through the typed settings a run resolves it to."""
    return curriculum_lib.make_curriculum(settings_of(config), device_count)


def config(levels=4, steps=1000, batch=32, l_max=1024, **curriculum):
    c = base.get_config()
    c.model.attention = "ring"
    c.curriculum.levels = levels
    c.curriculum.l_max = l_max
    c.train.steps = steps
    c.train.batch_size = batch
    for key, value in curriculum.items():
        setattr(c.curriculum, key, value)
    return c


# ------------------------------------------------------------------ shares and steps
def test_default_shares_halve_and_last_takes_remainder():
    curriculum = make_curriculum(config(), 8)
    assert [lv.share for lv in curriculum.levels] == [0.5, 0.25, 0.125, 0.125]
    assert default_shares(1) == (1.0,)
    assert sum(default_shares(7)) == 1.0


def test_steps_follow_shares_and_sum_to_train_steps():
    curriculum = make_curriculum(config(steps=1000), 8)
    assert [lv.steps for lv in curriculum.levels] == [500, 250, 125, 125]
    curriculum = make_curriculum(config(steps=13), 8)  # rounding: last level absorbs the remainder
    assert sum(lv.steps for lv in curriculum.levels) == 13 == curriculum.total_steps


def test_lengths_double():
    curriculum = make_curriculum(config(l_max=256), 8)
    assert [lv.seq_len for lv in curriculum.levels] == [256, 512, 1024, 2048]


def test_unit_tokens_halves_batch_and_keeps_tokens_per_step():
    c = config(steps=100, batch=32)
    curriculum = make_curriculum(c, 8)
    assert [lv.batch_size for lv in curriculum.levels] == [32, 16, 8, 4]
    assert {lv.seq_len * lv.batch_size for lv in curriculum.levels} == {32 * 1024}
    assert curriculum.total_tokens == 100 * 32 * 1024  # the plain level-0 run's token budget
    assert curriculum.tokens_before(curriculum.total_steps) == curriculum.total_tokens
    assert curriculum.tokens_before(10) == 10 * 32 * 1024


def test_unit_sequences_keeps_batch():
    curriculum = make_curriculum(config(steps=100, unit="sequences"), 8)
    assert [lv.batch_size for lv in curriculum.levels] == [32] * 4
    assert [lv.steps for lv in curriculum.levels] == [50, 25, 13, 12]
    assert curriculum.actual_shares == pytest.approx([0.5, 0.25, 0.13, 0.12])


def test_explicit_shares_and_lengths_are_used():
    curriculum = make_curriculum(config(levels=3, steps=100, batch=16, shares=(0.2, 0.3, 0.5),
                            lengths=(1024, 2048, 8192)), 8)
    assert [lv.share for lv in curriculum.levels] == [0.2, 0.3, 0.5]
    assert [lv.steps for lv in curriculum.levels] == [20, 30, 50]
    assert [lv.seq_len for lv in curriculum.levels] == [1024, 2048, 8192]
    assert [lv.batch_size for lv in curriculum.levels] == [16, 8, 2]


def test_single_level_is_the_plain_run():
    c = config(levels=1, steps=7, batch=16)
    c.mesh.seq = 2
    (level,) = make_curriculum(c, 8).levels
    assert (level.seq_len, level.batch_size, level.steps, level.share) == (1024, 16, 7, 1.0)
    assert level.mesh_dict == {"data": 4, "fsdp": 1, "seq": 2, "tensor": 1}


# ------------------------------------------------------------------ invalid configs
@pytest.mark.parametrize("shares", [(0.5, 0.5, 0.1, -0.1), (0.5, 0.25, 0.25),
                                    (0.5, 0.25, 0.125, 0.1), (0.4, 0.3, 0.2, 0.0)])
def test_bad_shares_raise(shares):
    with pytest.raises(ValueError, match="curriculum.shares"):
        make_curriculum(config(shares=shares), 8)


@pytest.mark.parametrize("lengths", [(1024, 2048, 2048, 4096), (1024, 2048, 4096),
                                     (512, 1024, 2048, 4096), (1024, 2048.0, 4096, 8192),
                                     (1024, 2048, 4096, -1)])
def test_bad_lengths_raise(lengths):
    with pytest.raises(ValueError, match="curriculum.lengths"):
        make_curriculum(config(lengths=lengths), 8)


@pytest.mark.parametrize("key,value", [
    ("rope_thetas", (1e4, 1e5)),
    ("rope_thetas", (1e4, 1e5, 0.0, 1e6)),
    ("lr_multipliers", (1.0, 1.0, 1.0)),
    ("lr_multipliers", (1.0, 1.0, 1.0, -2.0)),
    ("rope_scalings", (None, None)),
    ("rope_scalings", (None, None, None, {"rope_type": "nope", "factor": 2.0})),
])
def test_bad_overrides_raise(key, value):
    with pytest.raises(ValueError, match=f"curriculum.{key}"):
        make_curriculum(config(**{key: value}), 8)


def test_level_with_zero_steps_raises():
    with pytest.raises(ValueError, match="level 2 gets 0 steps.*raise train.steps"):
        make_curriculum(config(steps=3), 8)


def test_batch_that_cannot_halve_raises_naming_level():
    with pytest.raises(ValueError, match=r"level 3\b.*raise train.batch_size"):
        make_curriculum(config(batch=4), 1)


# ------------------------------------------------------------------ order
def test_interleaved_keeps_per_level_steps():
    c = config(order="interleaved")
    curriculum, ascending = make_curriculum(c, 8), make_curriculum(config(), 8)
    counts = np.bincount(curriculum.schedule, minlength=4)
    assert counts.tolist() == [lv.steps for lv in ascending.levels] == [500, 250, 125, 125]


def test_interleaved_is_deterministic_for_a_seed_and_differs_across_seeds():
    c = config(order="interleaved")
    first, again = make_curriculum(c, 8).schedule, make_curriculum(c, 8).schedule
    c.seed = 1
    other = make_curriculum(c, 8).schedule
    assert first == again
    assert first != other


def test_interleaved_mixes_levels():
    schedule = make_curriculum(config(order="interleaved"), 8).schedule
    assert list(schedule) != sorted(schedule)
    assert set(schedule[:100]) == {0, 1, 2, 3}  # every level shows up early


def test_ascending_runs_stages_short_to_long():
    schedule = make_curriculum(config(steps=16), 8).schedule
    assert schedule == (0,) * 8 + (1,) * 4 + (2,) * 2 + (3,) * 2


# ------------------------------------------------------------------ mesh
def test_relayout_moves_data_to_seq_keeping_work_per_device():
    curriculum = make_curriculum(config(batch=32), 8)
    assert [(lv.mesh_dict["data"], lv.mesh_dict["seq"]) for lv in curriculum.levels] == \
        [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert {lv.rows_per_device for lv in curriculum.levels} == {4}
    assert {lv.local_len for lv in curriculum.levels} == {1024}
    assert {lv.rows_per_device * lv.local_len for lv in curriculum.levels} == {4 * 1024}


def test_relayout_leaves_rest_of_factor_on_device_when_data_runs_out():
    c = config(batch=32)
    c.mesh.data, c.mesh.seq = 2, 4
    curriculum = make_curriculum(c, 8)
    assert [(lv.mesh_dict["data"], lv.mesh_dict["seq"]) for lv in curriculum.levels] == \
        [(2, 4), (1, 8), (1, 8), (1, 8)]
    assert [lv.local_len for lv in curriculum.levels] == [256, 256, 512, 1024]


def test_relayout_false_keeps_the_mesh():
    curriculum = make_curriculum(config(batch=64, relayout=False), 8)
    assert {lv.mesh for lv in curriculum.levels} == {(("data", 8), ("fsdp", 1), ("seq", 1),
                                                ("tensor", 1))}


def test_relayout_false_raises_when_batch_no_longer_splits():
    with pytest.raises(ValueError, match="level 3 .*data x fsdp"):
        make_curriculum(config(batch=32, relayout=False), 8)


def test_relayout_onto_seq_needs_a_sequence_parallel_attention():
    c = config()
    c.model.attention = "blockwise"
    with pytest.raises(ValueError, match="level 1 .*set model.attention to one of"):
        make_curriculum(c, 8)


def test_learned_positions_cannot_go_past_l_max():
    c = config()
    c.model.position = "learned"
    with pytest.raises(ValueError, match="learned"):
        make_curriculum(c, 8)


# ------------------------------------------------------------------ lookups and display
@pytest.mark.parametrize("order", ["ascending", "interleaved"])
def test_level_at_and_steps_done_match_schedule(order):
    curriculum = make_curriculum(config(steps=64, order=order), 8)
    seen = [0] * 4
    for step, k in enumerate(curriculum.schedule):
        assert curriculum.level_at(step) is curriculum.levels[k]
        assert curriculum.steps_done_in_level(step) == seen[k]
        seen[k] += 1
    assert seen == [lv.steps for lv in curriculum.levels]
    with pytest.raises(IndexError, match="step 64 is outside the curriculum's 64 steps"):
        curriculum.level_at(64)


def test_format_lists_every_level():
    curriculum = make_curriculum(config(steps=100, rope_thetas=(1e4, 1e5, 1e6, 5e7)), 8)
    text = curriculum.format()
    rows = plan_table(text)
    assert len(rows) == len(curriculum.levels)
    for level, row in zip(curriculum.levels, rows):
        assert [row["level"], row["length"], row["batch"], row["steps"]] == [
            str(level.index), str(level.seq_len), str(level.batch_size), str(level.steps)]
    assert "data 8 x seq 1" in text and "data 1 x seq 8" in text
    assert "50000000" in text


def test_overrides_land_in_levels():
    scalings = (None, '{"rope_type": "linear", "factor": 2.0}',
                {"rope_type": "yarn", "factor": 4.0}, None)
    curriculum = make_curriculum(config(rope_thetas=(1e4, 1e5, 1e6, 1e7), rope_scalings=scalings,
                            lr_multipliers=(1.0, 0.5, 0.25, 0.125)), 8)
    assert [lv.rope_theta for lv in curriculum.levels] == [1e4, 1e5, 1e6, 1e7]
    assert [lv.lr_multiplier for lv in curriculum.levels] == [1.0, 0.5, 0.25, 0.125]
    assert curriculum.levels[0].rope_scaling_json == "null"
    assert json.loads(curriculum.levels[1].rope_scaling_json) == {"rope_type": "linear",
                                                                  "factor": 2.0}
    yarn = json.loads(curriculum.levels[2].rope_scaling_json)
    assert yarn["rope_type"] == "yarn" and yarn["original_max_position_embeddings"] == 1024


def test_defaults_come_from_the_model():
    c = config()
    c.model.rope.theta = 5e5
    c.model.rope.scaling = {"rope_type": "linear", "factor": 4.0}
    curriculum = make_curriculum(c, 8)
    assert {lv.rope_theta for lv in curriculum.levels} == {5e5}
    assert {lv.rope_scaling_json for lv in curriculum.levels} == \
        {json.dumps({"factor": 4.0, "rope_type": "linear"}, sort_keys=True)}
    assert {lv.lr_multiplier for lv in curriculum.levels} == {1.0}
