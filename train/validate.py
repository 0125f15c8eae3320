"""Every check of a config that can fail before data is read or anything is compiled.

`validate_config` runs once per run and returns the curriculum plan; each failure is a
ValueError of one line naming the key. The plan checks its own keys (train/curriculum.py),
the model its own (ModelConfig.validate); this module adds what ties them to a mesh.
"""
from __future__ import annotations

import os

import jax

from configs import base, sections
from evaluation.lengths import evaluation_lengths
from model.attention import SEQUENCE_PARALLEL
from parallel import mesh as mesh_lib
from parallel import sequence_parallel
from train import curriculum as curriculum_lib


def validate_config(config, device_count: int | None = None,
                    platform: str | None = None) -> curriculum_lib.Curriculum:
    """Raise ValueError for any setting that cannot work on `device_count` devices of
    `platform` (default: this process's devices); return the curriculum plan."""
    base.check(config)            # each key's own type and range (configs/base.py)
    device_count = jax.device_count() if device_count is None else device_count
    platform = jax.devices()[0].platform if platform is None else platform
    if config.mesh.layout not in sequence_parallel.LAYOUT_SETTINGS:
        raise ValueError(f"mesh.layout must be one of {sequence_parallel.LAYOUT_SETTINGS}, "
                         f"got {config.mesh.layout!r}")
    if config.data.tokenizer != "bytes" and not os.path.exists(config.data.tokenizer):
        raise ValueError(f"data.tokenizer: no file {config.data.tokenizer!r}")
    sizes = mesh_lib.mesh_shape(sections.plain(config, "mesh"), device_count)  # valid itself
    if sizes["seq"] > 1 and config.model.attention not in SEQUENCE_PARALLEL:
        raise ValueError(f"mesh seq={sizes['seq']} splits the sequence: set model.attention "
                         f"to one of {SEQUENCE_PARALLEL}")
    if config.model.attention_kernel == "cudnn":     # can it run here at all (auto always can)
        sequence_parallel.choose_kernel(
            "cudnn", strategy="none" if sizes["seq"] == 1 else config.model.attention,
            platform=platform, in_order=True)
    elif config.model.attention_kernel not in sequence_parallel.KERNELS:
        raise ValueError(f"model.attention_kernel must be one of {sequence_parallel.KERNELS}, "
                         f"got {config.model.attention_kernel!r}")
    plan = curriculum_lib.make_curriculum(config, device_count)
    rows = check_learned_positions(config)
    for level in (*plan.levels, curriculum_lib.eval_level(config, plan)):
        check_sequence_split(config, level.mesh_dict)
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
    lengths = evaluation_lengths(config.eval.lengths, config.curriculum.l_max)
    for length in lengths + tuple(config.eval.retrieval_lengths or ()):
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


def check_sequence_split(config, sizes: dict) -> None:
    """The strategy's all-to-all must split the heads over the mesh `sizes` (Ulysses over
    seq, the hybrid over model.ulysses_degree, which must divide seq); an explicit cudnn
    kernel must be able to run on these devices."""
    m = config.model
    if m.attention not in SEQUENCE_PARALLEL or sizes["seq"] == 1:
        return
    degree = sequence_parallel.check_degree(m.attention, sizes["seq"], m.ulysses_degree)
    sequence_parallel.check_heads(m.attention, m.q_heads, m.kv_heads, degree, sizes["tensor"])


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
