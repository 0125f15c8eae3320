"""Specification of train/run_state.py: what the trainer records beside a run's config
(W/run_state.json), and the config.json of older runs that held it as config keys."""
import json

from configs import workdir_config
from tests.helpers import small_config
from train import run_state


def test_a_new_workdir_has_an_empty_run_state(tmp_path):
    assert run_state.load(str(tmp_path)) == run_state.RunState()


def test_the_run_state_reads_back_what_was_written(tmp_path):
    state = run_state.RunState(schedule_bridge=(4096, -1.5e-4), original_length=64)
    run_state.write(state, str(tmp_path))
    assert run_state.load(str(tmp_path)) == state
    assert json.loads((tmp_path / run_state.FILE).read_text())["original_length"] == 64


def test_an_older_runs_config_json_keys_become_its_run_state(tmp_path):
    """config.json written when the bridge and L0 were config keys: it still loads as a
    config, and its values are the run state."""
    workdir_config.write(small_config(), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["train"]["schedule_bridge"] = [2048, 0.001]
    saved["extend"]["original_length"] = 128
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = workdir_config.load(str(tmp_path))
    assert "schedule_bridge" not in config.train and "original_length" not in config.extend
    assert run_state.load(str(tmp_path)) == run_state.RunState(
        schedule_bridge=(2048, 0.001), original_length=128)


def test_writing_the_same_state_leaves_the_file_untouched(tmp_path):
    state = run_state.RunState(original_length=64)
    run_state.write(state, str(tmp_path))
    before = (tmp_path / run_state.FILE).stat().st_ino      # a rewrite is a new file
    run_state.write(state, str(tmp_path))
    assert (tmp_path / run_state.FILE).stat().st_ino == before
