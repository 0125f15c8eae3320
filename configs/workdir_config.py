"""A run's config as its workdir holds it: written as config.json, read back for the modes
that take their config from a workdir (eval without --config, import's output, export)."""
from __future__ import annotations

import copy
import json
import os

from ml_collections import config_dict

from configs import base
from util.files import replace_text
from model.model_config import COMPUTE_FIELDS, PARAMETER_FIELDS

CONFIG_FILE = "config.json"


def to_json(config) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def write(config, workdir: str) -> None:
    """config.json of `config` (write_text's)."""
    write_text(to_json(config), workdir)


def write_text(config_json: str, workdir: str) -> None:
    """config.json (to_json's text), replaced atomically (a reader never sees half of
    one); left untouched when it already says the same."""
    replace_text(os.path.join(workdir, CONFIG_FILE), config_json)


def check_writable(workdir: str) -> None:
    """One ValueError line unless files can be created in `workdir` (made if missing)."""
    probe = os.path.join(workdir, ".write_probe")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"workdir {workdir} is not writable: {error.strerror or error} "
                         f"({error.filename or workdir})") from None


def exists(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, CONFIG_FILE))


# What a run's workdir fixes: a command on that workdir may not say otherwise.
# (key, modes it binds, why)
_FIXED_BY_WORKDIR = (
    [(f"data.{k}", ("train", "eval", "generate", "lm_eval"), "the corpus and tokenizer") for k in
     ("source", "path", "text_field", "tokenizer", "validation_percent")]
    + [(f"data.{k}", ("train",), "the training stream") for k in
       ("shuffle_seed", "retrieval_fraction", "retrieval_tasks", "retrieval_min_length",
        "retrieval_max_length", "retrieval_answer_weight", "retrieval_task_weights")]
    + [(f"model.{k}", ("train", "eval", "generate", "lm_eval"), "the model's parameters")
       for k in PARAMETER_FIELDS + ("learned_positions_length",)]
    + [(k, ("train",), "the global batch and the curriculum the checkpoints continue") for k in
       ("train.batch_size", "curriculum.l_max", "curriculum.levels", "curriculum.lengths",
        "curriculum.unit", "curriculum.order", "seed")])


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node.to_dict() if isinstance(node, config_dict.ConfigDict) else node


def check_against_workdir(config, workdir: str, mode: str) -> None:
    """One ValueError line when `config` contradicts the run `workdir` holds (its
    config.json) in what the run fixes: the corpus and tokenizer, the model's shape, and
    for train (resuming) the global batch, the curriculum and the data stream; also an
    optimizer of another structure (train.grad_clip_norm switched on or off). Evaluation
    keys are free; eval.data.* scores another corpus. Nothing to check in a new workdir."""
    if not exists(workdir):
        return
    saved = load(workdir)
    for key, modes, what in _FIXED_BY_WORKDIR:
        if mode in modes and _plain(_get(config, key)) != _plain(_get(saved, key)):
            hint = (" (to score another corpus set eval.data.* and eval.name)"
                    if key.startswith("data.") and mode == "eval" else "")
            raise ValueError(f"{key} is {_get(config, key)!r} here but {workdir} was run with "
                             f"{_get(saved, key)!r} ({what}): drop the override or use another "
                             f"--workdir{hint}")
    if mode == "train" and (config.train.grad_clip_norm > 0) != (saved.train.grad_clip_norm > 0):
        raise ValueError(f"train.grad_clip_norm {config.train.grad_clip_norm} switches gradient "
                         f"clipping {'on' if config.train.grad_clip_norm > 0 else 'off'}, which "
                         f"changes the optimizer state {workdir}'s checkpoints hold (it was "
                         f"{saved.train.grad_clip_norm}); keep it "
                         f"{'> 0' if saved.train.grad_clip_norm > 0 else '0'}")


def _plain(value):
    """Lists and tuples compare alike (config.json holds lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load(workdir: str, overrides: dict | None = None) -> config_dict.ConfigDict:
    """configs/base.py's config with every value of workdir/config.json set on it (keys the
    run predates keep their defaults), then `overrides` ({"generate.prompt": "...", ...},
    e.g. the command line's --config.KEY values). One ValueError line for a missing file, a
    run that needs --config, or a key the project does not have."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no {path}: give the run's config with --config (or train / "
                         f"--mode import into {workdir!r} first)")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): it is not a config.json this "
                         f"project wrote") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a run's config "
                         f"(an object of sections)")
    _refuse_hf_model(_hf_model_keys(saved), workdir)
    config = base.get_config()
    _update(config, saved, path, "")
    try:
        base.check(config)              # the file's own values, before any override
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    for key, value in (overrides or {}).items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


# keys of a Hugging Face model's config.json that no run's config.json has
_HF_MODEL_KEYS = ("architectures", "model_type")


def _hf_model_keys(saved) -> str | None:
    """"architectures [...], model_type '...'" when the parsed config.json `saved` is a
    Hugging Face model's, else None."""
    found = [key for key in _HF_MODEL_KEYS if isinstance(saved, dict) and key in saved]
    return ", ".join(f"{key} {saved[key]!r}" for key in found) or None


def _refuse_hf_model(named: str | None, workdir: str) -> None:
    """One ValueError line when `named` (_hf_model_keys) marks workdir's config.json as a
    Hugging Face model's."""
    if named:
        raise ValueError(f"{workdir} looks like a Hugging Face model directory (its config.json "
                         f"names {named}), not a Boundless workdir; import it first: python "
                         f"main.py --mode import --hf_dir {workdir} --workdir W (a new "
                         "directory), then use --workdir W")


def hf_model_keys(workdir: str) -> str | None:
    """What marks `workdir`'s config.json as a Hugging Face model's ("architectures [...],
    model_type '...'"), or None (no config.json, or a run's)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return _hf_model_keys(json.load(f))
    except (OSError, ValueError):
        return None              # load() names what is wrong with it


def check_not_hf_model(workdir: str) -> None:
    """The same line as load() for a Hugging Face model directory given as a workdir, for a
    command that must refuse it before it writes anything (its lock file)."""
    _refuse_hf_model(hf_model_keys(workdir), workdir)


# keys whose saved form changed: the function turns an older value into today's
def _remat_policy(value):
    """model.remat was a bool (or None) before the remat policies had names."""
    if value is True:
        return "full"
    return "none" if value is False or value is None else value


_UPGRADES = {"model.remat": _remat_policy}


def _update(node: config_dict.ConfigDict, saved: dict, path: str, prefix: str) -> None:
    for key, value in saved.items():
        if prefix + key in RUN_STATE_KEYS:
            continue                    # an older run's state: train/run_state.py reads it
        if key not in node:
            raise ValueError(f"{path}: unknown key {prefix}{key} (written by another version?)")
        if isinstance(node[key], config_dict.ConfigDict) and isinstance(value, dict):
            _update(node[key], value, path, f"{prefix}{key}.")
        elif isinstance(node[key], config_dict.ConfigDict):
            raise ValueError(f"{path}: {prefix}{key} must be a section (a JSON object), got "
                             f"{value!r}")
        else:
            try:
                node[key] = _UPGRADES.get(prefix + key, _from_json)(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {prefix}{key} = {value!r} has the wrong type (the "
                                 f"default is {node[key]!r})") from None


# Keys older runs wrote into config.json that are run state now (W/run_state.json)
RUN_STATE_KEYS = ("train.schedule_bridge", "extend.original_length")


def _from_json(value):
    """JSON lists back to the tuples the config holds."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


# The model keys that fix the parameters and what the model computes with them (its sliding
# window; and the RoPE base the weights were trained with):
# a run that starts from another workdir's weights (train.init_from) takes them from it.
ADOPTED_MODEL_KEYS = PARAMETER_FIELDS + COMPUTE_FIELDS


def config_of_model(model_config, *, tokenizer: str, dtype: str, token_ids: dict):
    """configs/base.py's config with the model section of `model_config` (a ModelConfig,
    e.g. an imported Hugging Face model's) computing in `dtype`, its length as
    curriculum.l_max, `tokenizer`, and generation's token ids ({"eos": [...], "bos": id or
    None, "pad": id or None})."""
    config = base.get_config()
    for key in ADOPTED_MODEL_KEYS:
        config.model[key] = getattr(model_config, key)
    config.model.rope.theta = float(model_config.rope_theta)
    config.model.rope.scaling = model_config.rope_scaling
    config.model.dtype = dtype
    config.curriculum.l_max = model_config.l_max
    config.data.tokenizer = tokenizer
    config.generate.eos_ids = token_ids["eos"]
    config.generate.bos_id, config.generate.pad_id = token_ids["bos"], token_ids["pad"]
    return config


def adopt_model(config, workdir: str) -> tuple[config_dict.ConfigDict, list[str]]:
    """A copy of `config` with the parameter-defining model keys, model.rope.theta and
    data.tokenizer of the run in `workdir`; and the "key: old -> new" changes made."""
    if not os.path.isdir(workdir):
        raise ValueError(f"train.init_from={workdir}: no such directory")
    if not exists(workdir) and not hf_model_keys(workdir):
        raise ValueError(f"train.init_from={workdir} is not a workdir (it has no config.json): "
                         f"give a run's directory, or one --mode import wrote")
    source = load(workdir)
    config = copy.deepcopy(config)
    changes = []
    pairs = [(config.model, source.model, key, f"model.{key}") for key in ADOPTED_MODEL_KEYS]
    pairs += [(config.model.rope, source.model.rope, "theta", "model.rope.theta"),
              (config.data, source.data, "tokenizer", "data.tokenizer")]
    for target, origin, key, name in pairs:
        if target[key] != origin[key]:
            changes.append(f"{name}: {target[key]!r} -> {origin[key]!r}")
            target[key] = origin[key]
    return config, changes
