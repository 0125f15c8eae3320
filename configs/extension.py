"""Context extension (configs/extend.py): the `extend` section resolved against the source
workdir (train.init_from) into ordinary config keys.

The config file cannot do this itself: `--config.train.init_from=W` is applied after
get_config() runs, so the source's length is only known once the command line is read.
`resolve` runs when a run's config is resolved (train/run_spec.py), right after
train.init_from's model keys are adopted, and the resolved keys are what the run writes to
its config.json (so --mode eval / generate / export of the new workdir need no `extend`
logic).
"""
from __future__ import annotations

import copy
import json

from configs import workdir_config
from model.choices import SEQUENCE_PARALLEL
from model.positions import normalize_rope_scaling

# scalings relative to an original length, raised by setting factor = T / that length
SCALED_FROM_ORIGINAL = ("yarn", "llama3", "longrope")


def trained_length(source) -> int:
    """The longest length the run of config `source` trained at: its longest curriculum
    level (curriculum.lengths, else l_max * 2^(levels - 1))."""
    curriculum = source.curriculum
    if curriculum.lengths:
        return int(max(curriculum.lengths))
    return int(curriculum.l_max) * 2 ** (int(curriculum.levels) - 1)


def resolve(config) -> tuple:
    """(config, changes): a copy of `config` with extend.target_length (T > 0) turned into

      curriculum.l_max = T (one level), L0 being trained_length(source) (`original_length`;
        the trainer records it in the run state);
      RoPE, an unscaled source: model.rope.scaling = {"rope_type": "linear", "factor":
        T / L0}, or with extend.scaling = "yarn" {"rope_type": "yarn", "factor": T / L0,
        "original_max_position_embeddings": L0};
      RoPE, a scaled source keeps its scaling's type (extend.scaling is not used) and
        raises its factor: linear f -> f x T / L0; yarn, llama3 or longrope (e.g. an
        imported Llama 3.x, a DeepSeek-style YaRN with mscale keys, a Phi-3 longrope) with
        original length O -> T / O, its other keys kept (yarn's and longrope's
        attention_factor is recomputed from the new factor; longrope's per-frequency
        factors stay). T must exceed the length the source covers (covered_length);
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
    source = workdir_config.load(config.train.init_from)
    original = trained_length(source)
    reach = covered_length(source)
    if target <= reach:
        raise ValueError(f"extend.target_length ({target}) must exceed the length the model of "
                         f"{config.train.init_from} covers ({reach})")
    if config.curriculum.levels != 1 or config.curriculum.lengths:
        raise ValueError("extend.target_length trains at one length: leave curriculum.levels "
                         "= 1 and curriculum.lengths unset")
    config = copy.deepcopy(config)
    changes = []

    def set_key(node, key, value, name):
        if node[key] != value:
            changes.append(f"{name}: {node[key]!r} -> {value!r}")
            node[key] = value

    set_key(config.curriculum, "l_max", target, "curriculum.l_max")
    position = config.model.position
    if position == "rope":
        if config.curriculum.rope_scalings:
            raise ValueError("extend.target_length sets the RoPE scaling: leave "
                             "curriculum.rope_scalings unset")
        scaling = _extended_scaling(source, config.extend.scaling, original, target,
                                    config.train.init_from)
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
    if config.mesh.seq > 1 and config.model.attention not in SEQUENCE_PARALLEL:
        set_key(config.model, "attention", "ring", "model.attention")
    warmup = int(config.extend.warmup_steps)
    if warmup > 0:
        set_key(config.train, "warmup_fraction", min(1.0, warmup / config.train.steps),
                "train.warmup_fraction")
    return config, changes


def original_length(config) -> int:
    """L0, the length the source of an extension trained at (0 when
    extend.target_length does not extend)."""
    if int(config.extend.target_length) <= 0 or not config.train.init_from:
        return 0
    return trained_length(workdir_config.load(config.train.init_from))


def _source_scaling(source) -> dict | None:
    """The normalised RoPE scaling the source ran with at its last level (None: unscaled)."""
    scalings = source.curriculum.rope_scalings
    return normalize_rope_scaling(scalings[-1] if scalings else source.model.rope.scaling)


def covered_length(source) -> int:
    """The length the source's positions reach: its trained length, or for a scaling with
    an original length (yarn, llama3: Llama 3.x, longrope) that length x factor."""
    scaling = _source_scaling(source)
    if scaling and scaling.get("original_max_position_embeddings") and \
            scaling["rope_type"] in SCALED_FROM_ORIGINAL:
        return max(trained_length(source),
                   round(scaling["original_max_position_embeddings"] * scaling["factor"]))
    return trained_length(source)


def _extended_scaling(source, kind: str, original: int, target: int, name: str) -> dict:
    """The RoPE scaling of the extended run (see `resolve`)."""
    before = _source_scaling(source)
    if before is None:                                   # an unscaled source: PI or YaRN
        scaling = {"rope_type": kind, "factor": target / original}
        if kind != "linear":
            # linear's frequencies are the factor alone, and its dict has no L0 (as in
            # Hugging Face); yarn's depend on L0, whose fallback would be the new l_max
            scaling["original_max_position_embeddings"] = original
        return scaling
    rope_type = before["rope_type"]
    if rope_type == "linear":                            # positions / f, then / (T / L)
        return {"rope_type": "linear", "factor": before["factor"] * target / original}
    if rope_type in SCALED_FROM_ORIGINAL and before.get("original_max_position_embeddings"):
        # yarn's and longrope's attention factors follow from the factor: recomputed
        kept = {k: v for k, v in before.items() if v is not None and k != "attention_factor"}
        return {**kept, "factor": target / before["original_max_position_embeddings"]}
    raise ValueError(f"the model of {name} runs with a {rope_type!r} RoPE scaling, which "
                     "extend cannot raise; supported sources: unscaled, linear, yarn, llama3, "
                     "longrope")


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value
