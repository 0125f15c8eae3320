"""Every check of the settings that can fail before data is read or anything is compiled.

`validate_config` runs once per run (train/run_spec.py) on the typed settings and returns
the curriculum; each failure is a ValueError of one line naming the key. Each key's own
type and range is its rule's (configs/base.py, checked when the settings are made); the
curriculum checks how its keys combine (train/curriculum.py), the model its own
(ModelConfig.validate); this module adds what ties them to a mesh.
"""
from __future__ import annotations

import dataclasses
import os

import jax

from evaluation.lengths import evaluation_lengths
from model.choices import SEQUENCE_PARALLEL
from parallel import mesh as mesh_lib
from parallel import sequence_parallel
from train import curriculum as curriculum_lib


def validate_config(settings, device_count: int | None = None,
                    platform: str | None = None) -> curriculum_lib.Curriculum:
    """Raise ValueError for any setting (configs/sections.py's Settings: each key's own
    type and range already checked) that cannot work on `device_count` devices of
    `platform` (default: this process's devices); return the curriculum."""
    device_count = jax.device_count() if device_count is None else device_count
    platform = jax.devices()[0].platform if platform is None else platform
    if settings.data.tokenizer != "bytes" and not os.path.exists(settings.data.tokenizer):
        raise ValueError(f"data.tokenizer: no file {settings.data.tokenizer!r}")
    sizes = mesh_lib.mesh_shape(dataclasses.asdict(settings.mesh), device_count)  # valid itself
    if sizes["seq"] > 1 and settings.model.attention not in SEQUENCE_PARALLEL:
        raise ValueError(f"mesh seq={sizes['seq']} splits the sequence: set model.attention "
                         f"to one of {SEQUENCE_PARALLEL}")
    if settings.model.attention_kernel in ("cudnn", "pallas"):  # can it run here (auto can)
        sequence_parallel.choose_kernel(
            settings.model.attention_kernel,
            strategy="none" if sizes["seq"] == 1 else settings.model.attention,
            platform=platform, in_order=True, head_dim=settings.model.head_dim,
            dtype=settings.model.dtype)
    curriculum = curriculum_lib.make_curriculum(settings, device_count)
    rows = check_learned_positions(settings)
    for level in (*curriculum.levels, curriculum_lib.eval_level(settings, curriculum)):
        check_sequence_split(settings, level.mesh_dict)
    for level in curriculum.levels:
        check_weight_split(settings.model, level.mesh_dict, f"curriculum level {level.index}")
        check_length(level.seq_len, settings, level.mesh_dict)
        if rows is not None and level.seq_len > rows:
            raise ValueError(f"curriculum level {level.index} trains at length {level.seq_len}, "
                             f"beyond the {rows} rows of the learned-position table: set "
                             f"model.learned_positions_length >= {level.seq_len}")
    eval_sizes = curriculum_lib.eval_level(settings, curriculum).mesh_dict   # evaluation's layout
    row_groups = eval_sizes["data"] * eval_sizes["fsdp"]
    if settings.eval.batch_size % row_groups:
        raise ValueError(f"eval.batch_size: batch of {settings.eval.batch_size} rows is not a "
                         f"multiple of mesh data x fsdp = {row_groups}")
    lengths = evaluation_lengths(settings.eval.lengths, settings.curriculum.l_max)
    for length in lengths + tuple(settings.eval.retrieval_lengths or ()):
        check_length(length, settings, eval_sizes)
    check_hybrid_degree(settings, (*curriculum.levels,
                                   curriculum_lib.eval_level(settings, curriculum)))
    check_position_settings(settings)
    check_ruler_tasks(settings)
    check_host_memory(settings, curriculum, lengths, platform)
    return curriculum


def check_hybrid_degree(settings, levels) -> None:
    """A hybrid's all-to-all group cannot outgrow the seq axis of every level: it would
    run silently as a smaller one."""
    degree = settings.model.ulysses_degree
    if settings.model.attention != "hybrid" or not degree:
        return
    widest = max(level.mesh_dict["seq"] for level in levels)
    if degree > widest:
        raise ValueError(f"model.ulysses_degree={degree} is larger than mesh seq ({widest}) at "
                         f"every level and in evaluation: the hybrid would run with groups of "
                         f"{widest}; set model.ulysses_degree <= {widest} or raise mesh.seq")


# RoPE keys that a model without rotary positions would ignore
ROPE_KEYS = ("model.rope.scaling", "curriculum.rope_scalings", "curriculum.rope_thetas",
             "eval.rope_scaling", "eval.rope_theta")


def check_position_settings(settings) -> None:
    """RoPE settings on a model with learned or no positions are refused, not ignored."""
    if settings.model.position == "rope":
        return
    for key in ROPE_KEYS:
        node = settings
        for part in key.split("."):
            node = getattr(node, part)
        if node:
            raise ValueError(f"{key} is set, but model.position={settings.model.position!r} has no "
                             f"rotary positions to scale: drop it, or use model.position='rope'")


QA_TASKS = ("qa_1", "qa_2")


def check_ruler_tasks(settings) -> None:
    """A RULER qa task named explicitly needs its question file (with "all" the qa tasks
    join only when ruler.qa_path is given, as documented)."""
    named = [task for task in settings.eval.ruler.tasks if task in QA_TASKS]
    if named and not settings.eval.ruler.qa_path:
        raise ValueError(f"eval.ruler.tasks names {', '.join(named)}: the qa tasks take their "
                         f"questions from eval.ruler.qa_path (a local SQuAD / HotpotQA JSON), "
                         f"which is not set; set it, or drop the task")


BYTES_PER_BATCH_TOKEN = 16   # tokens, targets, positions, segment ids: int32 each


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_memory(settings, curriculum, eval_lengths, platform: str,
                      available: int | None = None) -> None:
    """Refuse, before anything is read or compiled, a batch or a cache that cannot fit in
    this host's memory at all (a lower bound: a training batch's input arrays, and on the CPU
    its residual stream too; an evaluation batch's inputs; generation's key-value cache on
    the CPU): one line with the figures, not an allocation failure later."""
    available = host_memory_bytes() if available is None else available
    share = max(1, jax.process_count())            # each process holds its rows
    on_host = platform == "cpu"                     # the devices' memory is the host's
    per_token = BYTES_PER_BATCH_TOKEN + (4 * settings.model.d_model if on_host else 0)
    needs = [(f"curriculum level {level.index}: a batch of {level.batch_size} x "
              f"{level.seq_len} tokens (train.batch_size, the level's length)",
              level.batch_size * level.seq_len * per_token // share) for level in curriculum.levels]
    longest = max((*eval_lengths, *(settings.eval.retrieval_lengths or ())), default=0)
    needs.append((f"evaluation: a batch of {settings.eval.batch_size} x {longest} tokens "
                  f"(eval.batch_size, eval.lengths)",
                  settings.eval.batch_size * longest * per_token // share))
    for what, size in needs:
        _refuse_above(what, size, available)
    check_generation_memory(settings, settings.generate.max_new_tokens + 1, platform, available)


def check_generation_memory(settings, tokens: int, platform: str,
                            available: int | None = None) -> None:
    """On the CPU, generation's key-value cache of `tokens` (prompt + generate.max_new_tokens)
    must fit in the host's memory: one line otherwise."""
    if platform != "cpu":
        return
    model_settings = settings.model
    itemsize = 2 if model_settings.dtype in ("bfloat16", "float16") else 4
    cache = (2 * model_settings.n_layers * model_settings.kv_heads * model_settings.head_dim
             * itemsize * tokens)                                     # keys and values
    _refuse_above(f"generation: a key-value cache of {tokens:,} tokens (the prompt and "
                  f"generate.max_new_tokens)", cache,
                  host_memory_bytes() if available is None else available)


def _refuse_above(what: str, size: int, available: int) -> None:
    if size > available:
        raise ValueError(f"{what} needs at least {size / 2**30:,.1f} GiB, more than this "
                         f"host's {available / 2**30:,.1f} GiB of memory")


def check_learned_positions(settings) -> int | None:
    """The rows of the learned-position table (None without learned positions);
    model.learned_positions_length must be 0 (curriculum.l_max rows) or positive."""
    length = settings.model.learned_positions_length
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"model.learned_positions_length must be 0 or a positive integer, "
                         f"got {length!r}")
    if settings.model.position != "learned":
        return None
    return length or settings.curriculum.l_max


def check_sequence_split(settings, sizes: dict) -> None:
    """The strategy's all-to-all must split the heads over the mesh `sizes` (Ulysses over
    seq, the hybrid over model.ulysses_degree, which must divide seq); an explicit cudnn
    kernel must be able to run on these devices."""
    model_settings = settings.model
    if model_settings.attention not in SEQUENCE_PARALLEL or sizes["seq"] == 1:
        return
    degree = sequence_parallel.check_degree(model_settings.attention, sizes["seq"],
                                            model_settings.ulysses_degree)
    sequence_parallel.check_heads(model_settings.attention, model_settings.q_heads,
                                  model_settings.kv_heads, degree, sizes["tensor"])


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


def check_length(length: int, settings, sizes: dict) -> None:
    """Any length of at least one token runs on any mesh (kernels and the input layout pad
    internally); only a length below 1 cannot."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"lengths must be integers >= 1, got {length!r}")
