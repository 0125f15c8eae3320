"""Every check of a config that can fail before data is read or anything is compiled.

`validate_config` runs once per run and returns the curriculum plan; each failure is a
ValueError of one line naming the key. The plan checks its own keys (train/curriculum.py),
the model its own (ModelConfig.validate); this module adds what ties them to a mesh.
"""
from __future__ import annotations

import os

import jax

from evaluation.lengths import evaluation_lengths
from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train import curriculum as curriculum_lib


def validate_config(config, device_count: int | None = None) -> curriculum_lib.Plan:
    """Raise ValueError for any setting that cannot work on `device_count` devices (default:
    all); return the curriculum plan."""
    device_count = jax.device_count() if device_count is None else device_count
    if config.mesh.layout not in layout_lib.LAYOUTS:
        raise ValueError(f"mesh.layout must be one of {layout_lib.LAYOUTS}, got {config.mesh.layout!r}")
    if config.data.tokenizer != "bytes" and not os.path.exists(config.data.tokenizer):
        raise ValueError(f"data.tokenizer: no file {config.data.tokenizer!r}")
    sizes = mesh_lib.mesh_shape(config.mesh, device_count)      # the config's own mesh is valid
    if sizes["seq"] > 1 and config.model.attention != "ring":
        raise ValueError(f"mesh seq={sizes['seq']} splits the sequence: set "
                         f"model.attention='ring'")
    plan = curriculum_lib.make_plan(config, device_count)
    rows = check_learned_positions(config)
    for level in plan.levels:
        check_weight_split(config.model, level.mesh_dict, f"curriculum level {level.index}")
        check_length(level.seq_len, config, level.mesh_dict)
        if rows is not None and level.seq_len > rows:
            raise ValueError(f"curriculum level {level.index} trains at length {level.seq_len}, "
                             f"beyond the {rows} rows of the learned-position table: set "
                             f"model.learned_positions_length >= {level.seq_len}")
    eval_sizes = curriculum_lib.eval_level(config, plan).mesh_dict   # evaluation's layout
    row_groups = eval_sizes["data"] * eval_sizes["fsdp"]
    if config.eval.batch_size % row_groups:
        raise ValueError(f"eval.batch_size: batch of {config.eval.batch_size} rows is not a "
                         f"multiple of mesh data x fsdp = {row_groups}")
    scoring = config.eval.get("retrieval_scoring", "teacher_forced")
    if scoring not in ("teacher_forced", "generate"):
        raise ValueError(f"eval.retrieval_scoring must be one of ('teacher_forced', 'generate'), "
                         f"got {scoring!r}")
    for length in evaluation_lengths(config) + tuple(config.eval.retrieval_lengths or ()):
        check_length(length, config, eval_sizes)
    return plan


def check_learned_positions(config) -> int | None:
    """The rows of the learned-position table (None without learned positions);
    model.learned_positions_length must be 0 (curriculum.l_max rows) or positive."""
    length = config.model.learned_positions_length
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"model.learned_positions_length must be 0 or a positive integer, "
                         f"got {length!r}")
    if config.model.position != "learned":
        return None
    return length or config.curriculum.l_max


def check_weight_split(model, sizes: dict, what: str) -> None:
    """The model's weights must split over mesh `sizes`: heads and MLP width over tensor,
    d_model over fsdp x seq."""
    if model.q_heads % sizes["tensor"] or model.kv_heads % sizes["tensor"]:
        raise ValueError(f"model.q_heads ({model.q_heads}) and model.kv_heads "
                         f"({model.kv_heads}) must be multiples of mesh.tensor ({sizes['tensor']})")
    if model.mlp_dim % sizes["tensor"]:
        raise ValueError(f"model.mlp_dim ({model.mlp_dim}) must be a multiple of mesh.tensor")
    weight_split = sizes["fsdp"] * sizes["seq"]
    if model.d_model % weight_split:
        raise ValueError(f"{what}: model.d_model ({model.d_model}) must be a multiple of mesh "
                         f"fsdp x seq ({weight_split}), which shard the weights")


def check_length(length: int, config, sizes: dict) -> None:
    """Any length of at least one token runs on any mesh (kernels and the input layout pad
    internally); only a length below 1 cannot."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"lengths must be integers >= 1, got {length!r}")
