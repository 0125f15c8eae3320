"""Specification of the Pallas attention kernels, Triton's (model/pallas_attention.py) and
Mosaic TPU's (model/pallas_tpu_attention.py), each run with interpret=True on the CPU: the
blockwise contract, checked against a float64 reference for the forward pass (out and
log-sum-exp) and against the dense kernel's gradients, with packed rows (PAD_SEGMENT
included), GQA, sliding windows, a query chunk that is not the key chunk (a ring hop), and
lengths from 1 to 1000 that divide no block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import masked_attention
from model.masking import PAD_SEGMENT, attention_mask
from model.blockwise import blockwise_attention, merge_partial_attention
from model.pallas_attention import PALLAS_KERNELS, pallas_attention, pallas_passes

D = 16


def chunk(seed, length, heads, start=0, documents=(), pad=0, dim=D):
    """(x [1, length, heads, dim] float32, positions, segment ids [1, length]): documents of
    the given lengths packed from position `start`, then `pad` PAD_SEGMENT tokens."""
    x = jax.random.normal(jax.random.key(seed), (1, length, heads, dim), jnp.float32)
    positions = np.arange(start, start + length, dtype=np.int32)[None]
    segments = np.zeros((1, length), np.int32)
    at = 0
    for i, n in enumerate(documents):
        segments[0, at:at + n] = i
        at += n
    segments[0, at:] = len(documents) - 1 if documents else 0
    if pad:
        segments[0, length - pad:] = PAD_SEGMENT
    return x, jnp.asarray(positions), jnp.asarray(segments)


def reference_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, window):
    """float64 numpy: out [b, lq, hq, d], lse [b, lq, hq] (-inf, out 0 where nothing seen)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    mask = np.asarray(attention_mask(q_pos, k_pos, q_seg, k_seg, causal, window))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p / np.where(total > 0, total, 1), v)
    lse = np.where(total[..., 0] > 0, np.log(np.maximum(total[..., 0], 1e-300)) + m[..., 0],
                   -np.inf)
    return out, np.swapaxes(lse, 1, 2)


CASES = {
    # name: (lq, lk, hq, hk, q_start, documents, pad, causal, window)
    "one token": (1, 1, 2, 2, 0, (), 0, True, None),
    "length dividing no block": (37, 37, 2, 2, 0, (), 0, True, None),
    "packed rows with padding": (50, 50, 4, 2, 0, (20, 25), 5, True, None),
    "gqa and a window": (70, 70, 4, 1, 0, (), 0, True, 9),
    "a ring hop: later queries": (24, 40, 2, 2, 40, (), 0, True, None),
    "bidirectional with a window": (33, 33, 2, 2, 0, (12, 21), 0, False, 5),
}


def case_inputs(name):
    lq, lk, hq, hk, q_start, documents, pad, causal, window = CASES[name]
    q, q_pos, q_seg = chunk(1, lq, hq, q_start, documents if lq == lk else (), pad)
    k, k_pos, k_seg = chunk(2, lk, hk, 0, documents if lq == lk else (), pad)
    v, _, _ = chunk(3, lk, hk)
    return (q, k, v, q_pos, k_pos, q_seg, k_seg), causal, window


# block sizes each kernel rounds to its own granule (16 for Triton, 128 for Mosaic TPU)
BLOCKS = dict(block_q=16, block_k=16, interpret=True)


def check_forward(kernel, args, causal, window, blocks=BLOCKS):
    forward, _ = pallas_passes(kernel)
    out, lse = forward(*args, causal=causal, window=window, **blocks)
    ref_out, ref_lse = reference_forward(*args, causal, window)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    return out, lse


def check_gradients(kernel, args, causal, window, out, lse, blocks=BLOCKS):
    _, backward = pallas_passes(kernel)
    d_out = jax.random.normal(jax.random.key(9), args[0].shape, jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)
    got = backward(*args, lse, d_out, delta, causal=causal, window=window, **blocks)
    expected = dense_vjp(args, causal, window, d_out)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_the_float64_reference(kernel, name):
    args, causal, window = case_inputs(name)
    check_forward(kernel, args, causal, window)


def dense_vjp(args, causal, window, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg = args
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, causal, window)
    _, vjp = jax.vjp(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v)
    return vjp(d_out)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_the_dense_kernels(kernel, name):
    args, causal, window = case_inputs(name)
    forward, _ = pallas_passes(kernel)
    out, lse = forward(*args, causal=causal, window=window, **BLOCKS)
    check_gradients(kernel, args, causal, window, out, lse)


# lengths 1 to 1000: block edges of both kernels' granules, and lengths that divide nothing
SWEEP = (1, 2, 15, 16, 17, 127, 128, 129, 300, 511, 640, 999, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
@pytest.mark.parametrize("length", SWEEP)
def test_every_length_to_1000_matches_the_references_packed_windowed_and_grouped(kernel,
                                                                                length):
    """check_packed_grouped_windowed at each length."""
    check_packed_grouped_windowed(kernel, length, seed=length)


def check_packed_grouped_windowed(kernel, length, *, seed, dim=D):
    """Two documents and a padded tail, GQA 4:2, a window of 100, blocks of 64 tokens
    (Mosaic's: 128): forward against float64, gradients against the dense kernel."""
    documents = (length // 2, length // 4) if length >= 4 else ()
    pad = length // 8
    q, q_pos, q_seg = chunk(seed, length, 4, 0, documents, pad, dim=dim)
    k, k_pos, k_seg = chunk(seed + 1, length, 2, 0, documents, pad, dim=dim)
    v, _, _ = chunk(seed + 2, length, 2, dim=dim)
    args = (q, k, v, q_pos, k_pos, q_seg, k_seg)
    blocks = dict(block_q=64, block_k=64, interpret=True)
    out, lse = check_forward(kernel, args, True, 100, blocks)
    check_gradients(kernel, args, True, 100, out, lse, blocks)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
def test_the_backward_pass_adds_into_given_accumulators_and_takes_heads_major_arrays(kernel):
    """What a ring hop uses: (dq, dk, dv) added in place into running sums, with q/k/v,
    d_out, lse and delta already [b, h, l, ...] (transposed once per ring, not per hop)."""
    args, causal, window = case_inputs("packed rows with padding")
    forward, backward = pallas_passes(kernel)
    out, lse = forward(*args, causal=causal, window=window, **BLOCKS)
    d_out = jax.random.normal(jax.random.key(9), out.shape, jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)
    plain = backward(*args, lse, d_out, delta, causal=causal, window=window, **BLOCKS)
    swap = lambda x: jnp.swapaxes(x, 1, 2)                            # noqa: E731
    sums = [jax.random.normal(jax.random.key(i), swap(g).shape) for i, g in enumerate(plain)]
    q, k, v, *ids = args
    added = backward(swap(q), swap(k), swap(v), *ids, swap(lse), swap(d_out), swap(delta),
                     causal=causal, window=window, heads_major=True, accumulators=sums,
                     **BLOCKS)
    for total, start, grad in zip(added, sums, plain):
        np.testing.assert_allclose(total, start + swap(grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
def test_the_backward_pass_adds_into_accumulators_in_the_callers_layout(kernel):
    """Heads of 128, which both kernels read in place ([b, l, h * d], no transposed copy):
    the running sums of a ring hop are added to in that layout too."""
    q, q_pos, q_seg = chunk(11, 150, 4, documents=(90, 60), dim=128)
    k, k_pos, k_seg = chunk(12, 150, 2, documents=(90, 60), dim=128)
    v, _, _ = chunk(13, 150, 2, dim=128)
    args = (q, k, v, q_pos, k_pos, q_seg, k_seg)
    forward, backward = pallas_passes(kernel)
    out, lse = forward(*args, causal=True, window=None, **BLOCKS)
    d_out = jax.random.normal(jax.random.key(9), out.shape, jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)
    plain = backward(*args, lse, d_out, delta, causal=True, window=None, **BLOCKS)
    sums = [jax.random.normal(jax.random.key(i), g.shape) for i, g in enumerate(plain)]
    added = backward(*args, lse, d_out, delta, causal=True, window=None, accumulators=sums,
                     **BLOCKS)
    for total, start, grad in zip(added, sums, plain):
        np.testing.assert_allclose(total, start + grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
@pytest.mark.parametrize("heads_major", [False, True])
def test_the_forward_pass_merges_into_given_accumulators(kernel, heads_major):
    """What a ring hop uses: (out, lse) over earlier key chunks merged in place with this
    chunk's, as merge_partial_attention merges them; padding rows see no key in either."""
    q, q_pos, q_seg = chunk(14, 60, 4, start=60, documents=(10, 45), pad=5)
    first = chunk(15, 60, 2, documents=(30, 30))
    second = chunk(16, 60, 2, start=60, documents=(10, 50))
    values = [chunk(17 + i, 60, 2)[0] for i in range(2)]
    forward, _ = pallas_passes(kernel)
    swap = (lambda x: jnp.swapaxes(x, 1, 2)) if heads_major else (lambda x: x)

    def attend(keys, v, accumulators=None):
        k, k_pos, k_seg = keys
        return forward(swap(q), swap(k), swap(v), q_pos, k_pos, q_seg, k_seg, causal=True,
                       window=None, heads_major=heads_major, accumulators=accumulators,
                       **BLOCKS)

    out_a, lse_a = attend(first, values[0])
    out_b, lse_b = attend(second, values[1])
    merged = attend(second, values[1], accumulators=(out_a, lse_a))
    expected = merge_partial_attention(swap(out_a), swap(lse_a), swap(out_b), swap(lse_b))
    assert np.isneginf(np.asarray(expected[1])[0, -5:]).all()         # the padding rows
    for got, want in zip(merged, expected):
        np.testing.assert_allclose(swap(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
def test_heads_of_128_match_the_references(kernel):
    """Heads of 128, what the accelerators are given: the same contract."""
    check_packed_grouped_windowed(kernel, 300, seed=21, dim=128)


@pytest.mark.parametrize("kernel", sorted(PALLAS_KERNELS))
def test_the_attention_function_gives_the_blockwise_kernels_values_and_gradients(kernel):
    q, positions, segments = chunk(4, 45, 4, documents=(30, 15))
    k, _, _ = chunk(5, 45, 2)
    v, _, _ = chunk(6, 45, 2)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, positions=positions,
                                                 segment_ids=segments, sliding_window=11) ** 2)

    fused = jax.value_and_grad(loss(lambda *a, **kw: pallas_attention(
        *a, **kw, block_q=16, block_k=16, interpret=True, kernel=kernel)),
        argnums=(0, 1, 2))(q, k, v)
    blockwise = jax.value_and_grad(loss(lambda *a, **kw: blockwise_attention(
        *a, **kw, block_q=16, block_k=16)), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(fused[0], blockwise[0], rtol=1e-5)
    for a, b in zip(fused[1], blockwise[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
