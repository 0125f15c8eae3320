"""Context extension (configs/extend.py): the `extend` section resolved against the source
workdir (train.init_from) into ordinary config keys.

The config file cannot do this itself: `--config.train.init_from=W` is applied after
get_config() runs, so the source's length is only known to the trainer. `resolve` runs in
train() right after train.init_from's model keys are adopted, and the resolved keys are what
the run writes to its config.json (so --mode eval / generate / export of the new workdir
need no `extend` logic).
"""
from __future__ import annotations

import copy
import json

from model.positions import normalize_rope_scaling
from train import workdir_config

SCALINGS = ("linear", "yarn")


def trained_length(source) -> int:
    """The longest length the run of config `source` trained at: its longest curriculum
    level (curriculum.lengths, else l_max * 2^(levels - 1))."""
    curriculum = source.curriculum
    if curriculum.lengths:
        return int(max(curriculum.lengths))
    return int(curriculum.l_max) * 2 ** (int(curriculum.levels) - 1)


def resolve(config) -> tuple:
    """(config, changes): a copy of `config` with extend.target_length (T > 0) turned into

      extend.original_length = L0 = trained_length(source) (a record);
      curriculum.l_max = T (one level);
      RoPE: model.rope.scaling = {"rope_type": "linear", "factor": T / L0}, or with
        extend.scaling = "yarn" {"rope_type": "yarn", "factor": T / L0,
        "original_max_position_embeddings": L0};
      learned positions: model.learned_positions_length = T (the table is interpolated from
        the source's rows when the weights are loaded);
      model.attention = "ring" when mesh.seq > 1;
      train.warmup_fraction = extend.warmup_steps / train.steps when warmup_steps > 0;

    and the "key: old -> new" changes made. Unchanged (and no changes) when T = 0. Running
    it on its own output changes nothing. One ValueError line for what cannot be extended.
    """
    target = int(config.extend.target_length)
    if target == 0:
        return config, []
    if target < 0:
        raise ValueError(f"extend.target_length: give the new context length, e.g. "
                         f"--config.extend.target_length=1024 (got {target})")
    if not config.train.init_from:
        raise ValueError("extend.target_length needs train.init_from: the workdir whose model "
                         "is extended")
    if config.extend.scaling not in SCALINGS:
        raise ValueError(f"extend.scaling must be one of {SCALINGS}, got {config.extend.scaling!r}")
    source = workdir_config.load(config.train.init_from)
    original = trained_length(source)
    if target <= original:
        raise ValueError(f"extend.target_length ({target}) must exceed the length the model of "
                         f"{config.train.init_from} trained at ({original})")
    if config.curriculum.levels != 1 or config.curriculum.lengths:
        raise ValueError("extend.target_length trains at one length: leave curriculum.levels "
                         "= 1 and curriculum.lengths unset")
    config = copy.deepcopy(config)
    changes = []

    def set_key(node, key, value, name):
        if node[key] != value:
            changes.append(f"{name}: {node[key]!r} -> {value!r}")
            node[key] = value

    set_key(config.extend, "original_length", original, "extend.original_length")
    set_key(config.curriculum, "l_max", target, "curriculum.l_max")
    position = config.model.position
    if position == "rope":
        source_scalings = [source.model.rope.scaling, *(source.curriculum.rope_scalings or ())]
        if any(normalize_rope_scaling(s) is not None for s in source_scalings):
            raise ValueError(f"the model of {config.train.init_from} already has a RoPE scaling "
                             f"({source.model.rope.scaling!r}); extend scales an unscaled model")
        if config.curriculum.rope_scalings:
            raise ValueError("extend.target_length sets the RoPE scaling: leave "
                             "curriculum.rope_scalings unset")
        scaling = {"rope_type": config.extend.scaling, "factor": target / original}
        if config.extend.scaling != "linear":
            # linear's frequencies are the factor alone, and its dict has no L0 (as in
            # Hugging Face); yarn's depend on L0, whose fallback would be the new l_max
            scaling["original_max_position_embeddings"] = original
        given = config.model.rope.scaling
        if given is not None:
            if normalize_rope_scaling(given) != normalize_rope_scaling(scaling):
                raise ValueError(
                    f"model.rope.scaling is set ({json.dumps(_plain(given))}) but "
                    f"extend.target_length sets {json.dumps(scaling)}: leave model.rope.scaling "
                    f"unset (extend.scaling picks linear or yarn)")
        else:
            changes.append(f"model.rope.scaling: None -> {json.dumps(scaling)}")
            config.model.rope.scaling = scaling
    elif position == "learned":
        rows = config.model.learned_positions_length
        if rows == 0:
            set_key(config.model, "learned_positions_length", target,
                    "model.learned_positions_length")
        elif rows < target:
            raise ValueError(f"model.learned_positions_length ({rows}) is shorter than "
                             f"extend.target_length ({target}); leave it 0")
    if config.mesh.seq > 1:
        set_key(config.model, "attention", "ring", "model.attention")
    warmup = int(config.extend.warmup_steps)
    if warmup > 0:
        set_key(config.train, "warmup_fraction", min(1.0, warmup / config.train.steps),
                "train.warmup_fraction")
    return config, changes


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value
