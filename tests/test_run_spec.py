"""Specification of train/run_spec.py: a config is resolved once into a frozen RunSpec."""
import dataclasses

import pytest

from configs import sections
from tests.helpers import small_config
from train.run_spec import RunSpec, resolve


def test_the_spec_is_frozen_and_holds_typed_settings_not_the_config(tmp_path):
    spec = resolve(small_config(), str(tmp_path / "run"), device_count=8, platform="cpu")
    assert isinstance(spec, RunSpec)
    assert type(spec.settings).__name__ == "Settings"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.settings.train.batch_size = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.curriculum = None
    assert "ConfigDict" not in {type(getattr(spec, f.name)).__name__
                                for f in dataclasses.fields(spec)}


def test_the_spec_holds_what_the_run_reads(tmp_path):
    config = small_config()
    config.model.rope.scaling = {"type": "linear", "factor": 2.0}
    spec = resolve(config, str(tmp_path / "run"), device_count=8, platform="cpu")
    assert spec.settings.train.batch_size == config.train.batch_size
    assert spec.curriculum.total_steps == config.train.steps
    assert spec.eval_level == spec.curriculum.levels[-1]
    assert spec.eval_level.rope_scaling == {"rope_type": "linear", "factor": 2.0}  # normalised
    assert spec.model_config.d_model == config.model.d_model
    assert spec.model_config.vocab_size == spec.tokenizer.vocab_size    # model.vocab_size 0
    assert spec.saved is None and spec.original_length == 0


def test_a_bad_key_is_refused_while_resolving(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size"):
        resolve(small_config(**{"train.batch_size": 0}), str(tmp_path / "run"),
                device_count=8, platform="cpu")


def test_settings_replace_sets_dotted_keys_and_leaves_the_original():
    settings = sections.settings(small_config())
    moved = sections.replace(settings, {"mesh.seq": 4, "model.rope.theta": 5e5})
    assert (moved.mesh.seq, moved.model.rope.theta) == (4, 5e5)
    assert settings.mesh.seq != 4 or settings.model.rope.theta != 5e5
    with pytest.raises(KeyError, match="mesh.sequence"):
        sections.replace(settings, {"mesh.sequence": 4})
