"""A run's config resolved once: `resolve(config, workdir, ...) -> RunSpec`.

main.py (or a mode's entry) hands the command's ml_collections config here and nothing
below reads it again. Resolving, in order:
  train only: train.init_from's model keys adopted (configs/workdir_config.py) and the
    `extend` section turned into ordinary keys (configs/extension.py);
  train only: the workdir's config.json, when there is one, checked for what it fixes
    (main.py checks it for the other modes before it takes the workdir's lock);
  every key's own rule (configs/base.py), the typed Settings (configs/sections.py);
  what ties the keys to the devices (train/validate.py), giving the curriculum;
  the tokenizer and the ModelConfig; evaluation's level and set-up.
The RunSpec is frozen: what the trainer and the modes take, or the part they need.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from configs import extension, sections, workdir_config
from data.tokenizers import make_tokenizer
from evaluation import suite
from model.model_config import ModelConfig
from train.curriculum import Curriculum, Level, eval_level
from train.state import eval_setup_from, model_config_from
from train.validate import validate_config


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run reads of its config, typed and resolved. The RoPE scalings,
    normalised (model/positions.py), are each level's and evaluation's (Level.rope_scaling:
    model.rope.scaling, curriculum.rope_scalings, eval.rope_scaling)."""
    settings: Any                   # configs/sections.py's Settings: every key, frozen
    config_json: str                # the resolved config as W/config.json holds it
    model_config: ModelConfig       # the model (vocabulary: model.vocab_size or the tokenizer's)
    tokenizer: Any                  # data.tokenizer, loaded (data/tokenizers.py)
    curriculum: Curriculum          # levels, steps and meshes on these devices
    eval_level: Level               # the level evaluation runs on (eval.rope_* applied)
    eval_setup: suite.EvalSetup     # what evaluation reads
    workdir: str
    saved: Any = None               # W/config.json's Settings when W holds a run, else None
    original_length: int = 0        # an extension's L0 (configs/extension.py); 0: none
    adopted: tuple[str, ...] = ()   # "key: old -> new" taken from train.init_from
    extended: tuple[str, ...] = ()  # "key: old -> new" set by extend.target_length


def resolve(config, workdir: str, *, mode: str = "train", device_count: int | None = None,
            platform: str | None = None) -> RunSpec:
    """The RunSpec of `config` (base.py's keys with the command line's values) for `mode`
    in `workdir` on `device_count` devices of `platform` (default: this process's). One
    ValueError line for anything that cannot run, before data is read or anything is
    compiled."""
    adopted = extended = ()
    if mode == "train":
        init_from = sections.typed(config, "train").init_from
        if init_from:   # the weights come with their model section and tokenizer
            config, changes = workdir_config.adopt_model(config, init_from)
            adopted = tuple(changes)
        config, changes = extension.resolve(config)
        extended = tuple(changes)
        workdir_config.check_against_workdir(config, workdir, mode)
    settings = sections.settings(config)
    curriculum = validate_config(settings, device_count, platform)
    tokenizer = make_tokenizer(settings.data.tokenizer)
    saved = (sections.settings(workdir_config.load(workdir))
             if workdir_config.exists(workdir) else None)
    return RunSpec(
        settings=settings, config_json=workdir_config.to_json(config),
        model_config=model_config_from(settings, tokenizer.vocab_size), tokenizer=tokenizer,
        curriculum=curriculum,
        eval_level=eval_level(settings, curriculum), eval_setup=eval_setup_from(settings),
        workdir=workdir, saved=saved, original_length=extension.original_length(config),
        adopted=adopted, extended=extended)
