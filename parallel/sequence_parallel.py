"""Sequence-parallel attention: one entry point, four ways to split a sequence over the
mesh axis `seq` (P devices).

- "ring": K/V slices travel the ring (parallel/ring_attention.py).
- "ulysses" (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns each device's
  [b, T/P, H, d] into [b, T, H/P, d] (every token, a subset of heads), the device attends
  over the whole sequence with the kernel of its platform, and a second all-to-all turns
  the output back. When P exceeds the key/value heads, each KV head is repeated so that
  every device gets the one its query heads read (DeepSpeed's KV replication).
- "allgather" (Llama 3's and MaxText's context parallelism): K/V (KV heads only) are
  gathered over the axis, the local queries attend to all of them; the backward pass
  reduce-scatters dK/dV (the transpose of the gather). With the zigzag layout every device
  does the same causal work.
- "hybrid" (USP, Fang & Zhao 2024): all-to-all inside groups of `ulysses_degree`
  neighbouring devices (the same host in `jax.devices()` order), ring across the groups.

Every strategy has `ring_attention`'s contract (shapes, GQA, packed documents, any token
order, any length, sliding windows). Positions and segment ids travel with the tokens, so
masks stay exact whatever a strategy gathers. Per-device kernels: "blockwise" (everywhere)
or "cudnn" (NVIDIA GPUs, whole-sequence calls on rows that are one document in sequence
order: model/fused_attention.py); `choose_kernel` resolves "auto".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from model.blockwise import blockwise_attention, blockwise_chunk_attention, window_argument
from model.fused_attention import fused_attention
from model.masking import PAD_SEGMENT, check_shapes, default_positions_and_segments, \
    pad_axis1, padded_length
from model.pallas_attention import PALLAS_KERNELS, pallas_attention, pallas_chunk_attention
from model.choices import SEQUENCE_PARALLEL
from parallel.choices import KERNELS, LAYOUT_SETTINGS, LAYOUTS
from util.notices import say_once
from parallel.mesh import BATCH_AXES, heads_spec
from parallel.ring_attention import (interpret_kernels, local_ring, on_each_device,
                                     ring_attention, ring_hops)

STRATEGIES = SEQUENCE_PARALLEL
# What `auto` gives the fused kernels (their tiles are tuned for, and compiled on the h100
# and v5p targets with, 16-bit activations and these head widths); else the blockwise loop
FUSED_DTYPES = ("bfloat16", "float16")
FUSED_HEAD_DIMS = (64, 128, 256)
# The layout each strategy wants its tokens in (parallel/layout.py): the ring and the
# all-gather balance causal work with zigzag; Ulysses sees the whole sequence on each
# device, where sequence order lets the kernel skip the causal upper triangle by block.
STRATEGY_LAYOUTS = {"ring": "zigzag", "allgather": "zigzag", "ulysses": "contiguous",
                    "hybrid": "zigzag"}




def batch_layout(attention: str, setting: str, seq: int, ulysses_degree=None
                 ) -> tuple[str, int]:
    """(layout, zigzag parts) of the batches for model.attention `attention` over `seq`
    devices: mesh.layout "auto" takes the strategy's (STRATEGY_LAYOUTS), "zigzag" or
    "contiguous" as set; the zigzag balances `parts` units (zigzag_devices)."""
    if setting not in LAYOUT_SETTINGS:
        raise ValueError(f"mesh.layout must be one of {LAYOUT_SETTINGS}, got {setting!r}")
    layout = STRATEGY_LAYOUTS.get(attention, "zigzag") if setting == "auto" else setting
    parts = zigzag_devices(attention, seq, ulysses_degree) if layout == "zigzag" else 1
    if attention == "ulysses" and layout == "zigzag":
        parts = seq                                   # asked for: any order works
    return layout, max(parts, 1)


def zigzag_devices(strategy: str, seq: int, ulysses_degree: int | None) -> int:
    """Over how many parts the zigzag layout balances the sequence: every device for the
    ring and the all-gather, the groups for the hybrid (the ring runs across them; a
    group's all-to-all gathers its part whole), 1 for Ulysses."""
    if strategy == "hybrid":
        return seq // check_degree(strategy, seq, ulysses_degree)
    return 1 if strategy == "ulysses" else seq


# ----------------------------------------------------------------------------- kernels


def _cudnn_reason(strategy: str, platform: str, in_order: bool) -> str | None:
    """Why cuDNN's kernel cannot run this call (None: it can)."""
    if platform != "gpu":
        return f"cudnn attention needs an NVIDIA GPU (this platform: {platform})"
    if strategy not in ("none", "ulysses"):
        return (f"model.attention={strategy} has no whole-sequence call per device (cudnn "
                "applies on one device and with ulysses)")
    if not in_order:
        return ("these rows are packed documents or in a permuted layout, masks cudnn "
                "cannot take (it needs one document per row in sequence order)")
    return None


def choose_kernel(requested: str, *, strategy: str, platform: str, in_order: bool,
                  head_dim: int, dtype: str, say=say_once) -> str:
    """The per-device kernel `requested` (auto | blockwise | cudnn | pallas) resolves to:
    "blockwise", "cudnn", "pallas" (Triton) or "pallas_tpu" (Mosaic TPU).

    pallas: the platform's Pallas kernel, in every strategy: Triton's on a GPU, Mosaic
    TPU's on a TPU, Triton's in Pallas' interpreter elsewhere (slow; there for numerics).
    cudnn: an NVIDIA GPU and a whole-sequence call on rows that are one document in
    sequence order (`in_order`: one device or Ulysses); elsewhere a one-line ValueError.
    auto: on a GPU cudnn where it applies and pallas otherwise; on a TPU pallas; off
    accelerators blockwise; and blockwise for heads the fused kernels do not take
    (FUSED_DTYPES, FUSED_HEAD_DIMS), saying why once (`say`)."""
    if requested not in KERNELS:
        raise ValueError(f"model.attention_kernel must be one of {KERNELS}, got {requested!r}")
    if requested == "blockwise":
        return "blockwise"
    if requested == "pallas":
        return "pallas_tpu" if platform == "tpu" else "pallas"
    reason = _cudnn_reason(strategy, platform, in_order)
    if requested == "cudnn":
        if reason is not None:
            raise ValueError(f"model.attention_kernel=cudnn: {reason}")
        return "cudnn"
    if platform not in ("gpu", "tpu"):    # no fused kernel to miss: no notice
        return "blockwise"
    if dtype not in FUSED_DTYPES or head_dim not in FUSED_HEAD_DIMS:
        say(f"model.attention_kernel=auto: blockwise, because the fused kernels take "
            f"{' or '.join(FUSED_DTYPES)} heads of {', '.join(map(str, FUSED_HEAD_DIMS))} "
            f"(this model: {dtype}, head_dim {head_dim})")
        return "blockwise"
    if platform == "tpu":
        return "pallas_tpu"
    return "cudnn" if reason is None else "pallas"


def local_attention(kernel: str, *, causal: bool, static_window, block_q: int,
                    block_k: int, implementation: str = "cudnn", interpret: bool = False):
    """fn(q, k, v, positions, segment_ids, window) -> out for one device's whole sequence
    (`window`: the sliding window, None or traced; cudnn takes `static_window`, an int;
    `interpret`: run the Pallas kernel in Pallas' interpreter)."""
    if kernel in PALLAS_KERNELS:
        return lambda q, k, v, positions, segments, window: pallas_attention(
            q, k, v, positions=positions, segment_ids=segments, causal=causal,
            sliding_window=window, block_q=block_q, block_k=block_k, interpret=interpret,
            kernel=kernel)
    if kernel == "cudnn":
        return lambda q, k, v, positions, segments, window: fused_attention(
            q, k, v, causal=causal, sliding_window=static_window,
            implementation=implementation)
    return lambda q, k, v, positions, segments, window: blockwise_attention(
        q, k, v, positions=positions, segment_ids=segments, causal=causal,
        sliding_window=window, block_q=block_q, block_k=block_k)


def local_kernel_function(kernel: str, mesh: Mesh, *, block_q: int = 256,
                          block_k: int = 256):
    """The attention-function form (q, k, v, *, positions, segment_ids, causal,
    sliding_window) of `kernel` over whole sequences on `mesh` (no seq axis): cudnn as the
    compiler partitions it (rows in order: choose_kernel checked that), a Pallas kernel on
    each device's rows and heads (`on_each_device`)."""
    def attention(q, k, v, *, positions=None, segment_ids=None, causal=True,
                  sliding_window=None):
        positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
        call = local_attention(kernel, causal=causal, static_window=sliding_window,
                               block_q=block_q, block_k=block_k,
                               interpret=interpret_kernels(mesh, kernel))
        if kernel in PALLAS_KERNELS:
            call = on_each_device(call, mesh)
        return call(q, k, v, positions, segment_ids, sliding_window)
    return attention


# ----------------------------------------------------------------------------- validation


def check_heads(strategy: str, q_heads: int, kv_heads: int, degree: int,
                tensor: int = 1) -> None:
    """One ValueError line unless each device's heads split over the all-to-all of
    `degree` devices: query heads evenly, KV heads evenly or (degree a multiple of them)
    by replication."""
    if strategy not in ("ulysses", "hybrid") or degree == 1:
        return
    hq, hkv = q_heads // tensor, kv_heads // tensor
    what = "mesh.seq" if strategy == "ulysses" else "model.ulysses_degree"
    if hq % degree:
        raise ValueError(f"model.attention={strategy}: {hq} query heads per device do not "
                         f"split over {what} = {degree} (the all-to-all gives each device "
                         f"q_heads / {degree})")
    if hkv % degree and degree % hkv:
        raise ValueError(f"model.attention={strategy}: {hkv} key-value heads per device "
                         f"neither split over {what} = {degree} nor divide it (for "
                         "replication)")


def check_degree(strategy: str, seq: int, ulysses_degree) -> int:
    """The all-to-all group size: seq for ulysses, ulysses_degree (dividing seq) for
    hybrid; one ValueError line otherwise. A seq axis smaller than the degree that
    divides it (a curriculum level before the devices move to seq) is one whole group."""
    if strategy == "ulysses":
        return seq
    if strategy != "hybrid":
        return 1
    if not isinstance(ulysses_degree, int) or isinstance(ulysses_degree, bool) or \
            ulysses_degree < 1 or (seq % ulysses_degree and ulysses_degree % seq):
        raise ValueError(f"model.ulysses_degree must be a positive divisor of mesh.seq "
                         f"({seq}) for model.attention=hybrid, got {ulysses_degree!r}")
    return min(ulysses_degree, seq)


# ----------------------------------------------------------------------------- strategies


def _groups(seq: int, degree: int):
    """axis_index_groups of the all-to-all: `degree` neighbouring devices each (None: all)."""
    if degree == seq:
        return None
    return [list(range(g * degree, (g + 1) * degree)) for g in range(seq // degree)]


def _heads_to_sequence(x, axis_name: str, groups, degree: int):
    """[b, t, h, d] (t tokens of the group's member) -> [b, degree t, h / degree, d]."""
    return jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True, axis_index_groups=groups)


def _sequence_to_heads(x, axis_name: str, groups):
    """The inverse all-to-all: [b, degree t, h / degree, d] -> [b, t, h, d]."""
    return jax.lax.all_to_all(x, axis_name, 1, 2, tiled=True, axis_index_groups=groups)


def _gather_tokens(x, axis_name: str, groups):
    """[b, t] -> [b, degree t]: the group's positions or segment ids."""
    return jax.lax.all_gather(x, axis_name, axis=1, tiled=True, axis_index_groups=groups)


def _replicate_kv(k, degree: int):
    """[b, t, hk, d] -> [b, t, max(hk, degree), d]: each KV head repeated so that an
    all-to-all over `degree` devices gives each device the head its query heads read."""
    hk = k.shape[2]
    return k if hk % degree == 0 else jnp.repeat(k, degree // hk, axis=2)


def _ulysses_local(options, kernel_fn):
    axis, seq, degree = options["axis_name"], options["axis_size"], options["degree"]
    groups = _groups(seq, degree)

    def local(q, k, v, positions, segments, *window):
        window = window[0] if window else None
        q = _heads_to_sequence(q, axis, groups, degree)               # [b, T, hq / P, d]
        k = _heads_to_sequence(_replicate_kv(k, degree), axis, groups, degree)
        v = _heads_to_sequence(_replicate_kv(v, degree), axis, groups, degree)
        positions = _gather_tokens(positions, axis, groups)           # [b, T]
        segments = _gather_tokens(segments, axis, groups)
        out = kernel_fn(q, k, v, positions, segments, window)          # [b, T, hq / P, d]
        return _sequence_to_heads(out, axis, groups)                   # [b, T / P, hq, d]
    return local


def _allgather_local(options):
    axis = options["axis_name"]
    causal, block_q, block_k = options["causal"], options["block_q"], options["block_k"]
    chunk_attention = blockwise_chunk_attention
    if options["kernel"] in PALLAS_KERNELS:
        chunk_attention = functools.partial(pallas_chunk_attention, kernel=options["kernel"],
                                            interpret=options["interpret"])

    def local(q, k, v, positions, segments, *window):
        window = window[0] if window else None
        # only K/V heads travel; the transpose of this gather reduce-scatters dK/dV
        k_all, v_all = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
        k_pos, k_seg = (jax.lax.all_gather(x, axis, axis=1, tiled=True)
                        for x in (positions, segments))
        return chunk_attention(q, k_all, v_all, positions, k_pos, segments, k_seg,
                               causal=causal, sliding_window=window, block_q=block_q,
                               block_k=block_k)
    return local


def _hybrid_local(options):
    """All-to-all in each group, then the ring across groups (stride = group size)."""
    ring = local_ring(dict(axis_name=options["axis_name"], axis_size=options["axis_size"],
                           hops=options["hops"], causal=options["causal"],
                           block_q=options["block_q"], block_k=options["block_k"],
                           stride=options["degree"],
                           kernel=options["kernel"], interpret=options["interpret"]))

    def ring_kernel(q, k, v, positions, segments, window):
        return ring(q, k, v, positions, segments, positions, segments, window)

    return _ulysses_local(options, ring_kernel)


def sequence_attention(q, k, v, *, mesh: Mesh, strategy: str, ulysses_degree=None,
                       positions=None, segment_ids=None, causal: bool = True,
                       sliding_window=None, layout: str | None = None,
                       kernel: str = "blockwise", axis_name: str = "seq",
                       block_q: int = 256, block_k: int = 256,
                       fused_implementation: str = "cudnn"):
    """Attention with the sequence split over `axis_name` of `mesh`, by `strategy`.

    Same contract as `parallel.ring_attention.ring_attention` (q [batch, length, q_heads,
    head_dim], k/v [batch, length, kv_heads, head_dim], positions/segment_ids [batch,
    length]; any length; returns [batch, length, q_heads, head_dim]). `ulysses_degree`:
    the all-to-all group of "hybrid" (a divisor of the axis). `kernel`: "blockwise" or
    "cudnn" (resolved already: `choose_kernel`; cudnn only where it applies), for the
    whole-sequence call of one device or of Ulysses; `fused_implementation` lets the tests
    run that path with XLA's implementation on a CPU. `layout="contiguous"` promises
    slices in sequence order (a causal sliding window then shortens the ring).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; expected one of "
                         f"{STRATEGIES}")
    if strategy == "ring":
        return ring_attention(q, k, v, mesh=mesh, axis_name=axis_name, positions=positions,
                              segment_ids=segment_ids, causal=causal,
                              sliding_window=sliding_window, layout=layout, block_q=block_q,
                              block_k=block_k, kernel=kernel)
    check_shapes(q, k, v)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be None or one of {LAYOUTS}, got {layout!r}")
    seq = mesh.shape[axis_name]
    degree = check_degree(strategy, seq, ulysses_degree)
    tensor = mesh.shape.get("tensor", 1)
    check_heads(strategy, q.shape[2], k.shape[2], degree, tensor)
    rows = 1
    for axis in BATCH_AXES:
        rows *= mesh.shape.get(axis, 1)
    if q.shape[0] % rows:
        raise ValueError(f"sequence attention: batch {q.shape[0]} is not divisible by the "
                         f"mesh's data x fsdp = {rows}")
    interpret = interpret_kernels(mesh, kernel)
    kernel_fn = local_attention(kernel, causal=causal, static_window=sliding_window,
                                block_q=block_q, block_k=block_k,
                                implementation=fused_implementation, interpret=interpret)
    if seq == 1:
        positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
        if kernel in PALLAS_KERNELS:
            kernel_fn = on_each_device(kernel_fn, mesh)
        return kernel_fn(q, k, v, positions, segment_ids, sliding_window)
    length = q.shape[1]
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    padded = padded_length(length, seq)
    positions = pad_axis1(positions.astype(jnp.int32), padded)
    segment_ids = pad_axis1(segment_ids.astype(jnp.int32), padded, PAD_SEGMENT)
    members = seq // degree
    options = dict(axis_name=axis_name, axis_size=seq, degree=degree, causal=bool(causal),
                   block_q=block_q, block_k=block_k, kernel=kernel, interpret=interpret,
                   hops=ring_hops(members, padded // members, causal=causal,
                                  sliding_window=sliding_window, layout=layout))
    if strategy == "ulysses":
        local = _ulysses_local(options, kernel_fn)
    elif strategy == "allgather":
        local = _allgather_local(options)
    else:
        local = _hybrid_local(options)
    heads, rows_spec = heads_spec(mesh, axis_name), P(heads_spec(mesh)[0], axis_name)
    window = window_argument(sliding_window)
    windows = () if window is None else (window,)        # a traced window rides along
    sharded = jax.shard_map(local, mesh=mesh,
                            in_specs=(heads, heads, heads, rows_spec, rows_spec)
                            + (P(),) * len(windows),
                            out_specs=heads, check_vma=False)
    q, k, v = (pad_axis1(x, padded) for x in (q, k, v))
    return sharded(q, k, v, positions, segment_ids, *windows)[:, :length]


@functools.lru_cache(maxsize=None)
def make_sequence_attention(mesh: Mesh, strategy: str, *, ulysses_degree=None,
                            layout: str | None = None, kernel: str = "blockwise",
                            axis_name: str = "seq", block_q: int = 256, block_k: int = 256):
    """`sequence_attention` bound to a mesh and a strategy, with the attention-function
    signature the model layer calls: fn(q, k, v, *, positions, segment_ids, causal,
    sliding_window). One function object per argument set (cached)."""
    return functools.partial(sequence_attention, mesh=mesh, strategy=strategy,
                             ulysses_degree=ulysses_degree, layout=layout, kernel=kernel,
                             axis_name=axis_name, block_q=block_q, block_k=block_k)
