"""configs/workdir_config.py: a run's config.json read back onto configs/base.py."""
import json

import pytest

from configs import workdir_config
from tests.helpers import small_config


@pytest.mark.parametrize("saved, policy", [(True, "full"), (False, "none"), (None, "none"),
                                           ("save_dots", "save_dots")])
def test_an_older_boolean_remat_reads_back_as_its_policy(tmp_path, saved, policy):
    workdir_config.write(small_config(), str(tmp_path))
    path = tmp_path / workdir_config.CONFIG_FILE
    written = json.loads(path.read_text())
    written["model"]["remat"] = saved
    path.write_text(json.dumps(written))
    assert workdir_config.load(str(tmp_path)).model.remat == policy


def test_a_key_the_project_does_not_have_is_one_error(tmp_path):
    workdir_config.write(small_config(), str(tmp_path))
    path = tmp_path / workdir_config.CONFIG_FILE
    written = json.loads(path.read_text())
    written["model"]["colour"] = "blue"
    path.write_text(json.dumps(written))
    with pytest.raises(ValueError, match="unknown key model.colour"):
        workdir_config.load(str(tmp_path))
