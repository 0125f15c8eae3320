"""Specification of train/schedule.py: a resume that would re-plan the learning rate is
refused with one line naming the key, and with train.allow_schedule_change the rate
continues from where the run was (no jump) and ends where the new schedule ends."""
import pytest

from configs.sections import settings as settings_of
from tests.helpers import read_metrics, small_config
from train import curriculum as curriculum_lib
from train import run_state, schedule, trainer


def settings(**values):
    """small_config with `values`, as the typed settings a run resolves it to."""
    return settings_of(small_config(**values))


def curriculum_of(settings):
    return curriculum_lib.make_curriculum(settings, 8)


def test_a_bridged_schedule_starts_at_the_old_rate_and_ends_at_the_new_one():
    old = settings(**{"train.steps": 20})
    new = settings(**{"train.steps": 40, "train.allow_schedule_change": True})
    old_curriculum, new_curriculum = curriculum_of(old), curriculum_of(new)
    step = 12
    tokens = old_curriculum.tokens_before(step)
    bridge = schedule.bridge(new, new_curriculum, old, old_curriculum, step, tokens)
    assert schedule.rate(new, new_curriculum, step, tokens, bridge) == pytest.approx(
        schedule.rate(old, old_curriculum, step, tokens), rel=1e-9)
    end = new_curriculum.total_steps - 1
    end_tokens = new_curriculum.tokens_before(new_curriculum.total_steps)
    assert schedule.rate(new, new_curriculum, end, end_tokens, bridge) == pytest.approx(
        schedule.rate(new, new_curriculum, end, end_tokens), rel=1e-9)


def test_a_second_change_bridges_from_the_rate_the_first_bridge_gave():
    """Two schedule changes in a row: the second starts where the bridged rate was."""
    first, second, third = (settings(**{"train.steps": n}) for n in (20, 40, 60))
    curricula = [curriculum_of(s) for s in (first, second, third)]
    bridge = schedule.bridge(second, curricula[1], first, curricula[0], 8,
                             curricula[0].tokens_before(8))
    tokens = curricula[1].tokens_before(16)
    again = schedule.bridge(third, curricula[2], second, curricula[1], 16, tokens, bridge)
    assert schedule.rate(third, curricula[2], 16, tokens, again) == pytest.approx(
        schedule.rate(second, curricula[1], 16, tokens, bridge), rel=1e-9)


def test_changed_keys_names_only_what_the_schedule_depends_on():
    saved = settings()
    changed = settings(**{"train.learning_rate": 1e-3, "train.log_every_steps": 5})
    assert schedule.changed_keys(changed, saved) == ["train.learning_rate"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 8 steps stopped (with its checkpoint) after step 4."""
    workdir = tmp_path_factory.mktemp("schedule") / "run"
    trainer.train(small_config(**{"train.stop_at_step": 4}), str(workdir))
    return workdir


@pytest.mark.slow
def test_resuming_with_another_step_budget_is_refused_with_the_key(stopped_run):
    before = (stopped_run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"^train.steps is 16 but "
                                         r".*--config.train.allow_schedule_change=True"):
        trainer.train(small_config(**{"train.steps": 16}), str(stopped_run))
    assert (stopped_run / "config.json").read_text() == before


@pytest.mark.slow
def test_an_allowed_schedule_change_continues_without_a_jump(stopped_run, tmp_path):
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    trainer.train(small_config(**{"train.steps": 16, "train.allow_schedule_change": True,
                                  "eval.lengths": (64,)}), str(workdir))
    rates = {r["step"]: r["lr"] for r in read_metrics(workdir) if "lr" in r}
    assert sorted(rates) == list(range(1, 17))
    bridge = run_state.load(str(workdir)).schedule_bridge     # beside the config, not in it
    assert bridge is not None and bridge[0] == curriculum_of(settings()).tokens_before(4)
    # the old schedule's rate at step 5 (tokens after 4 steps), not the new one's
    old, new = settings(), settings(**{"train.steps": 16})
    tokens = curriculum_of(old).tokens_before(4)
    old_rate = schedule.rate(old, curriculum_of(old), 4, tokens)
    new_rate = schedule.rate(new, curriculum_of(new), 4, tokens)
    assert rates[5] == pytest.approx(old_rate, rel=1e-6)
    assert rates[5] != pytest.approx(new_rate, rel=1e-3)
    steps = [rates[s + 1] - rates[s] for s in range(4, 16)]
    assert max(abs(d) for d in steps) <= 2 * abs(rates[4] - rates[3]) + 1e-12
