"""configs/sections.py: each section of configs/base.py as a frozen dataclass, the typed
piece the rooms below train/ receive instead of the ConfigDict."""
import dataclasses
import pickle

import pytest

from configs import base, sections
from tests.helpers import small_config


def _declared(path: str) -> set[str]:
    base.get_config()
    prefix = path + "."
    return {key[len(prefix):].split(".")[0] for key in base.RULES if key.startswith(prefix)}


@pytest.mark.parametrize("path", ["model", "data", "train", "curriculum", "mesh", "checkpoint",
                                  "eval", "eval.data", "eval.ruler", "generate", "lm_eval",
                                  "plan", "extend"])
def test_a_section_class_has_exactly_the_keys_declared_in_base(path):
    fields = {f.name for f in dataclasses.fields(sections.section_class(path))}
    assert fields == _declared(path)


def test_typed_values_are_the_configs_after_overrides():
    config = small_config(**{"data.validation_percent": 7, "eval.lengths": [64, 32]})
    config.eval.ruler.tasks = ("vt",)
    data, settings = sections.typed(config, "data"), sections.typed(config, "eval")
    assert data.validation_percent == 7 and data.source == config.data.source
    assert settings.lengths == (64, 32)                 # lists become tuples
    assert settings.ruler.tasks == ("vt",)              # nested sections are dataclasses
    assert dataclasses.is_dataclass(settings.data)


def test_a_dict_valued_key_becomes_a_plain_dict():
    config = small_config()
    config.eval.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    assert sections.typed(config, "eval").rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert type(sections.typed(config, "eval").rope_scaling) is dict


def test_a_typed_section_is_frozen():
    data = sections.typed(small_config(), "data")
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.source = "text"


def test_a_typed_section_pickles_for_worker_processes():
    data = sections.typed(small_config(), "data")
    assert pickle.loads(pickle.dumps(data)) == data


def test_field_types_follow_the_rules():
    fields = {f.name: f.type for f in dataclasses.fields(sections.section_class("eval"))}
    assert fields["batch_size"] is int and fields["retrieval_threshold"] is float
    assert fields["name"] is str


def test_an_undeclared_section_is_refused():
    with pytest.raises(KeyError, match="declares no section 'nope'"):
        sections.section_class("nope")


def test_plain_gives_the_section_as_a_dict_of_its_typed_values():
    config = small_config(**{"mesh.seq": 4})
    assert sections.plain(config, "mesh") == {"data": -1, "fsdp": 1, "seq": 4, "tensor": 1,
                                              "layout": config.mesh.layout}
