"""Notices where behaviour changes: a prompt or an evaluation beyond the trained length
prints one line with the trained length and the positions in effect; within it, none."""
import pytest

from tests.helpers import small_config
from train import curriculum as curriculum_lib
from cli.generate_mode import generate_workdir
from configs.sections import settings as settings_of


def notice(config, lengths):
    curriculum = curriculum_lib.make_curriculum(settings_of(config), 8)
    settings = settings_of(config)
    level = curriculum_lib.eval_level(settings, curriculum)
    return curriculum_lib.beyond_trained_notice(settings, curriculum, level, lengths,
                                                "evaluating at")


def test_no_notice_within_the_trained_length():
    assert notice(small_config(), [32, 64]) is None


def test_lengths_beyond_the_last_level_are_named_with_the_rope_in_effect():
    config = small_config(**{"curriculum.levels": 2, "train.batch_size": 16,
                             "curriculum.relayout": False})             # trained up to 128
    config.eval.rope_scaling = '{"rope_type": "linear", "factor": 4}'
    assert notice(config, [64, 256, 512, 256]) == (
        "note: evaluating at 256, 512 tokens, beyond the trained length 128 "
        "(RoPE theta 10000, scaling linear x4)")


@pytest.mark.slow
def test_a_generation_past_the_trained_length_says_so_once(trained_workdir, capsys):
    config = small_config()
    config.generate.prompt = "The quick brown fox"              # 19 bytes + 64 > l_max 64
    config.generate.max_new_tokens = 64
    generate_workdir(config, trained_workdir)
    out = capsys.readouterr().out
    assert out.count("note: prompt + new tokens reach 83 tokens, beyond the trained length "
                     "64 (RoPE theta 10000, scaling none)") == 1
