"""Specification of "any number of tokens": every attention path takes any length >= 1
(the kernel's last block overlaps instead of padding; a ring pads the sequence to whole
slices with tokens no real token sees), and equals an independent reference
(tests.helpers.reference_attention, float64 numpy) on the real tokens: 1e-5 forward,
1e-4 gradients (relative norms), with GQA and packed documents, causal and not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.blockwise import block_plan, blockwise_attention, blockwise_tiles
from model.masking import PAD_SEGMENT, attention_mask
from parallel.layout import apply_layout, layout_length, restore_layout
from parallel.mesh import make_mesh
from parallel.ring_attention import ring_attention
from tests.helpers import packed_segments, random_qkv, reference_attention, reference_grads


def relative(reference, value):
    """|reference - value| / |reference| (Frobenius norms); a zero reference (dq of a
    single token, which sees only itself) is measured against 1."""
    reference, value = np.asarray(reference, np.float64), np.asarray(value, np.float64)
    return float(np.linalg.norm(reference - value) / max(np.linalg.norm(reference), 1.0))


def check_against_reference(attention, length, *, causal, seed, batch=2, window=None,
                            q_heads=8, kv_heads=2, packed=True):
    """`attention(q, k, v, positions, segment_ids)` vs the reference: forward and the
    gradients of a random projection of the output."""
    q, k, v = random_qkv(seed, batch, length, q_heads, kv_heads, 16)
    if packed:
        positions, segments = packed_segments(seed, batch, length)
    else:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        segments = jnp.zeros((batch, length), jnp.int32)
    weights = jax.random.normal(jax.random.key(seed + 1), q.shape)
    options = dict(positions=positions, segment_ids=segments, causal=causal, window=window)
    expected = reference_attention(q, k, v, **{**options})
    expected_grads = reference_grads(q, k, v, weights, **options)

    def run(q, k, v):
        return attention(q, k, v, positions, segments)

    out = jax.jit(run)(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v) * weights),
                             argnums=(0, 1, 2)))(q, k, v)
    assert out.shape == q.shape
    assert relative(expected, out) <= 1e-5
    for name, want, got in zip("qkv", expected_grads, grads):
        assert relative(want, got) <= 1e-4, name


# ----------------------------------------------------------------------------- padding


def test_a_block_plan_covers_the_length_with_less_than_one_block_of_overlap():
    for block in (8, 16, 100, 256):
        for length in list(range(1, 600)) + [32767, 32768, 32769]:
            size, count = block_plan(length, block)
            assert size <= block and size <= length
            assert length <= size * count < length + size, (length, block, size, count)


def test_lengths_of_whole_blocks_keep_the_block_and_others_balance_it():
    assert block_plan(32768, 256) == (256, 128) and block_plan(32767, 256) == (256, 128)
    assert block_plan(100, 256) == (100, 1)            # one block of its own length
    assert block_plan(257, 256) == (136, 2)            # not 256 + a block of 1


def test_layout_padding_sees_nothing_real_and_nothing_real_sees_it():
    positions = jnp.asarray([[0, 1, 2, 0]], jnp.int32)
    segments = jnp.asarray([[0, 0, 1, PAD_SEGMENT]], jnp.int32)
    for causal in (True, False):
        mask = np.asarray(attention_mask(positions, positions, segments, segments, causal))[0]
        assert not mask[3, :3].any() and not mask[:3, 3].any()
        assert mask[:3, :3].any()


def test_an_odd_length_costs_the_blockwise_kernel_no_memory():
    """Compiled temp memory of fwd+bwd at T - 1 is at most that at T (no padded copies)."""
    def temp(length):
        x = jax.ShapeDtypeStruct((1, length, 4, 16), jnp.float32)
        grad = jax.grad(lambda q, k, v: blockwise_attention(q, k, v, block_q=64,
                                                            block_k=64).sum(), (0, 1, 2))
        return jax.jit(grad).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp(2047) <= temp(2048)


# ----------------------------------------------------------------------------- one device


FAST, SLOW = [1, 7, 255, 257], [333, 1000]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_blockwise_equals_the_reference_at_any_length(length, causal):
    def blockwise(q, k, v, p, s):
        return blockwise_attention(q, k, v, positions=p, segment_ids=s, causal=causal,
                                   block_q=64, block_k=32)

    check_against_reference(blockwise, length, causal=causal, seed=length + causal)


def test_blockwise_at_a_length_one_under_whole_blocks_computes_the_same_tiles():
    # causal, one document: T - 1 pads to T, and padding adds no tile
    q, k, v = random_qkv(3, 1, 512, 4, 2, 16)
    full = blockwise_tiles(q, k, v, block_q=64, block_k=64)
    short = blockwise_tiles(q[:, :511], k[:, :511], v[:, :511], block_q=64, block_k=64)
    assert full == short == (36, 64)


# ----------------------------------------------------------------------------- the ring


def ring_mesh(seq=8):
    return make_mesh(dict(data=1, fsdp=1, seq=seq, tensor=1), jax.devices()[:seq])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [7, pytest.param(333, marks=pytest.mark.slow),
                                    pytest.param(1000, marks=pytest.mark.slow)])
def test_ring_of_8_equals_the_reference_at_any_length(length, causal):
    mesh = ring_mesh()

    def ring(q, k, v, p, s):
        return ring_attention(q, k, v, mesh=mesh, positions=p, segment_ids=s, causal=causal,
                              block_q=16, block_k=16)

    check_against_reference(ring, length, causal=causal, seed=length + 10 * causal)


def test_ring_of_8_in_zigzag_layout_equals_the_reference_at_333():
    """The trainer's path: the input layout pads 333 to 336 and permutes; the ring then
    pads only inside each device."""
    mesh, length, seq = ring_mesh(), 333, 8
    assert layout_length(length, "zigzag", seq) == 336

    def zigzag_ring(q, k, v, p, s):
        laid = apply_layout({"q": q, "k": k, "v": v, "p": p, "segment_ids": s}, "zigzag", seq)
        out = ring_attention(laid["q"], laid["k"], laid["v"], mesh=mesh, positions=laid["p"],
                             segment_ids=laid["segment_ids"], causal=True, block_q=16,
                             block_k=16)
        return restore_layout({"out": out}, "zigzag", seq, length)["out"]

    check_against_reference(zigzag_ring, length, causal=True, seed=5)


def test_a_ring_with_more_devices_than_tokens_still_works():
    mesh = ring_mesh()

    def ring(q, k, v, p, s):
        return ring_attention(q, k, v, mesh=mesh, positions=p, segment_ids=s, causal=True,
                              block_q=16, block_k=16)

    check_against_reference(ring, 3, causal=True, seed=3, packed=False)


def test_a_ring_of_4_with_a_data_axis_and_gqa_takes_an_odd_length():
    mesh = make_mesh(dict(data=2, fsdp=1, seq=4, tensor=1), jax.devices())

    def ring(q, k, v, p, s):
        return ring_attention(q, k, v, mesh=mesh, positions=p, segment_ids=s, causal=True,
                              block_q=8, block_k=8)

    check_against_reference(ring, 57, causal=True, seed=57, batch=4)
