"""A run's config as its workdir holds it: written as config.json, read back for the modes
that take their config from a workdir (eval without --config, import's output, export)."""
from __future__ import annotations

import copy
import json
import os

from ml_collections import config_dict

from configs import base
from model.remat import policy_name

CONFIG_FILE = "config.json"


def to_json(config) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def write(config, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(to_json(config))


def load(workdir: str, overrides: dict | None = None) -> config_dict.ConfigDict:
    """configs/base.py's config with every value of workdir/config.json set on it (keys the
    run predates keep their defaults), then `overrides` ({"generate.prompt": "...", ...},
    e.g. the command line's --config.KEY values). One ValueError line for a missing file, a
    run that needs --config, or a key the project does not have."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no {path}: give the run's config with --config (or train / "
                         f"--mode import into {workdir!r} first)")
    with open(path) as f:
        saved = json.load(f)
    config = base.get_config()
    _update(config, saved, path, "")
    for key, value in (overrides or {}).items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


# keys whose saved form changed: the function turns an older value into today's
_UPGRADES = {"model.remat": policy_name}     # a bool before the remat policies


def _update(node: config_dict.ConfigDict, saved: dict, path: str, prefix: str) -> None:
    for key, value in saved.items():
        if key not in node:
            raise ValueError(f"{path}: unknown key {prefix}{key} (written by another version?)")
        if isinstance(node[key], config_dict.ConfigDict) and isinstance(value, dict):
            _update(node[key], value, path, f"{prefix}{key}.")
        else:
            node[key] = _UPGRADES.get(prefix + key, _from_json)(value)


def _from_json(value):
    """JSON lists back to the tuples the config holds."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


# The model keys that fix the parameters (and the RoPE base the weights were trained with):
# a run that starts from another workdir's weights (train.init_from) takes them from it.
ADOPTED_MODEL_KEYS = ("vocab_size", "d_model", "n_layers", "q_heads", "kv_heads", "head_dim",
                      "mlp_dim", "position", "tie_embeddings", "norm_eps", "norm", "mlp",
                      "qkv_bias", "attention_out_bias", "mlp_bias")


def adopt_model(config, workdir: str) -> tuple[config_dict.ConfigDict, list[str]]:
    """A copy of `config` with the parameter-defining model keys, model.rope.theta and
    data.tokenizer of the run in `workdir`; and the "key: old -> new" changes made."""
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
