"""Specification of configs/rules.py and the rules of configs/base.py: every key has its
type and range declared beside its default, every shipped config satisfies them, and a
value outside them is one line naming the key."""
import ast
import glob
import importlib
import os
import subprocess
import sys

import pytest
from ml_collections import config_dict

from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, config_dict.ConfigDict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_key_has_exactly_one_declared_rule():
    config = base.get_config()
    assert sorted(leaf_keys(config)) == sorted(base.RULES)


# modules of configs/ that hold no config
NOT_CONFIGS = ("__init__", "rules", "reference", "sections", "workdir_config", "extension")


def shipped_configs():
    """Every config of configs/ as `--config` takes it: file, or file:preset."""
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name in NOT_CONFIGS:
            continue
        presets = getattr(importlib.import_module(f"configs.{name}"), "PRESETS", None)
        yield from ([f"{name}:{p}" for p in presets] if presets else [name])


@pytest.mark.parametrize("spec", list(shipped_configs()))
def test_every_shipped_config_satisfies_the_rules(spec):
    name, _, preset = spec.partition(":")
    module = importlib.import_module(f"configs.{name}")
    base.check(module.get_config(preset) if preset else module.get_config())


def test_the_llama_files_are_the_presets_of_configs_llama():
    from configs import llama, llama2_7b, llama3_8b
    assert llama2_7b.get_config() == llama.get_config("llama2_7b")
    assert llama3_8b.get_config() == llama.get_config("llama3_8b")
    assert llama2_7b.get_config() != llama3_8b.get_config()


def test_a_preset_file_without_a_known_preset_fails_with_one_line(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "main.py", "--mode", "plan", "--config",
                             "configs/llama.py:llama9", "--workdir", str(tmp_path / "w")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a preset after a colon" in lines[0], result.stderr
    assert "'llama9'" in lines[0] and not (tmp_path / "w").exists()


@pytest.mark.parametrize("key, value, words", [
    ("train.learning_rate", -1.0, "a finite number > 0"),
    ("train.learning_rate", float("nan"), "a finite number > 0"),
    ("train.min_learning_rate_ratio", 1.5, "<= 1"),
    ("train.steps", 0, "an integer >= 1"),
    ("train.steps", True, "an integer >= 1"),
    ("eval.lengths", (256, 0), "a non-empty tuple of integers >= 1 or None"),
    ("eval.batch_size", 0, "an integer >= 1"),
    ("mesh.seq", 0, "an integer >= 1 or -1"),
    ("data.retrieval_fraction", 1.0, "< 1"),
    ("model.attention", "flash", "one of ("),
    ("model.layer_types", ("sliding_attention", "local"), "values each one of"),
    ("generate.top_p", 0.0, "> 0"),
    ("plan.strategies", ("ring", "tree"), "values each one of"),
    ("curriculum.unit", "bytes", "one of ('tokens', 'sequences')"),
    ("curriculum.order", "random", "one of ('ascending', 'interleaved')"),
    ("extend.scaling", "cubic", "one of ('linear', 'yarn')"),
    ("model.norm", "batchnorm", "one of ('rmsnorm', 'layernorm')"),
    ("mesh.layout", "spiral", "one of ('auto', 'zigzag', 'contiguous')"),
    ("train.steps", 10**20, "at most 10,000,000"),
    ("curriculum.l_max", 2**40, "at most 2,147,483,647"),
    ("generate.max_new_tokens", 10**10, "at most 2,147,483,647"),
    ("eval.batch_size", 2**31, "at most 2,147,483,647"),
    ("eval.lengths", (64, 2**40), "at most 2,147,483,647"),
    ("eval.lengths", (), "a non-empty tuple"),
    ("eval.name", "../../x", "a plain name"),
    ("eval.name", "/tmp/x", "a plain name"),
    ("eval.name", "a/b", "a plain name"),
])
def test_a_value_outside_its_rule_is_one_line_naming_the_key(key, value, words):
    config = base.get_config()
    section, name = key.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=f"^{key} must be ") as refused:
        base.check(config)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_optional_keys_take_none_and_the_minus_one_sentinels_pass():
    config = base.get_config()
    config.model.sliding_window = None
    config.mesh.data = -1
    config.extend.target_length = -1            # configs/extend.py: "give the length"
    base.check(config)


def test_the_retrieval_weight_rules_agree_with_what_the_data_layer_accepts():
    """data/retrieval_mix.py draws a task of weight 0 never and refuses an answer weight of
    0 (tests/test_stream.py): the rules checked before a run say the same."""
    config = base.get_config()
    config.data.retrieval_task_weights = (3.0, 1.0, 0.0)
    base.check(config)
    config.data.retrieval_answer_weight = 0.0
    with pytest.raises(ValueError, match="retrieval_answer_weight must be a finite number > 0"):
        base.check(config)


def test_each_set_of_allowed_values_is_the_owning_rooms_tuple():
    """No rule in configs/base.py spells out its choices: each names the tuple of the room
    that owns them (model/choices.py, parallel/choices.py, data/, evaluation/), or one that
    train/ imports from base.py, so a value added there is allowed here."""
    tree = ast.parse(open(os.path.join(REPO, "configs", "base.py")).read())
    literal = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "text"
               and node.args and isinstance(node.args[0], ast.Tuple)]
    assert literal == [], f"configs/base.py lines with literal choices: {literal}"


def test_the_rooms_choices_are_what_the_rules_allow():
    from data import sources
    from evaluation import retrieval, ruler
    from model import choices
    from parallel import choices as parallel_choices
    config = base.get_config()
    for key, allowed in [("model.norm", choices.NORM_KINDS), ("model.mlp", choices.MLP_KINDS),
                         ("model.position", choices.POSITION_KINDS),
                         ("model.remat", choices.REMAT_POLICIES),
                         ("model.attention", choices.ATTENTION_KINDS),
                         ("model.attention_kernel", parallel_choices.KERNELS),
                         ("data.source", sources.SOURCES + (sources.PREPARED,)),
                         ("eval.retrieval_scoring", retrieval.SCORING_MODES),
                         ("curriculum.unit", base.CURRICULUM_UNITS),
                         ("extend.scaling", base.EXTEND_SCALINGS)]:
        for value in allowed:
            base.RULES[key].check(key, value)                 # each one is accepted
        with pytest.raises(ValueError):
            base.RULES[key].check(key, "not-a-choice")
    assert base.RULES["eval.ruler.tasks"].accepts(ruler.ALL_TASKS)
    assert config.plan.strategies == choices.SEQUENCE_PARALLEL


def test_the_config_rules_load_without_jax():
    """main.py checks the command line against configs/base.py before it imports jax
    quietly: the rooms' choices come from modules that import no jax."""
    code = "import sys, configs.base; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
