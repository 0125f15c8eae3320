"""Specification of ring attention: equal to the dense reference on every mesh shape, and
balanced causal work with the zigzag layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import dot_product_attention
from parallel.layout import from_zigzag, to_zigzag, zigzag_order
from parallel.mesh import make_mesh
from parallel.ring_attention import ring_attention, ring_tiles_per_device
from tests.helpers import packed_segments, random_qkv, relative_error


def seq_mesh(seq, data=1):
    return make_mesh(dict(data=data, fsdp=1, seq=seq, tensor=1), jax.devices()[: seq * data])


def compare_with_dense(mesh, *, seed, batch=2, length=128, q_heads=4, kv_heads=1,
                       causal=True, packed=True, layout="zigzag", dtype=jnp.float32):
    """Relative errors (output, dq, dk, dv) of ring vs dense on the same random inputs."""
    q, k, v = random_qkv(seed, batch, length, q_heads, kv_heads, 16)
    if packed:
        positions, segments = packed_segments(seed, batch, length)
    else:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        segments = jnp.zeros((batch, length), jnp.int32)
    weights = jax.random.normal(jax.random.key(seed + 1), q.shape)
    seq = mesh.shape["seq"]
    if layout == "zigzag" and seq > 1:
        z = to_zigzag({"q": np.asarray(q), "k": np.asarray(k), "v": np.asarray(v),
                       "p": np.asarray(positions), "s": np.asarray(segments),
                       "w": np.asarray(weights)}, seq)
        zq, zk, zv, zp, zs, zw = (jnp.asarray(z[n]) for n in "q k v p s w".split())
    else:
        zq, zk, zv, zp, zs, zw = q, k, v, positions, segments, weights

    def loss(fn, q, k, v, p, s, w):
        out = fn(q, k, v, positions=p, segment_ids=s, causal=causal)
        return jnp.sum(out.astype(jnp.float32) * w)

    def ring(q, k, v, **kw):
        return ring_attention(q, k, v, mesh=mesh, block_q=8, block_k=8, **kw)

    def cast(x):
        return x.astype(dtype)

    ref_out = dot_product_attention(q, k, v, positions=positions, segment_ids=segments,
                                    causal=causal)
    ref_grads = jax.grad(loss, argnums=(1, 2, 3))(dot_product_attention, q, k, v, positions,
                                                  segments, weights)
    out = jax.jit(lambda q, k, v: ring(q, k, v, positions=zp, segment_ids=zs, causal=causal))(
        cast(zq), cast(zk), cast(zv))
    grads = jax.jit(jax.grad(lambda q, k, v: loss(ring, q, k, v, zp, zs, zw),
                             argnums=(0, 1, 2)))(cast(zq), cast(zk), cast(zv))
    if layout == "zigzag" and seq > 1:  # back to the original order
        def restore(x):
            return jnp.asarray(from_zigzag({"x": np.asarray(x.astype(jnp.float32))}, seq)["x"])
        out, grads = restore(out), tuple(restore(g) for g in grads)
    return [relative_error(ref_out, out)] + [relative_error(r, g) for r, g in zip(ref_grads, grads)]


@pytest.mark.parametrize("seq", [1, 2, 4, 8])
def test_ring_equals_dense_for_every_ring_size(seq):
    errors = compare_with_dense(seq_mesh(seq), seed=seq)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("causal,packed,q_heads,kv_heads,layout", [
    (False, True, 4, 1, "zigzag"),       # non-causal
    pytest.param(True, True, 4, 4, "zigzag", marks=pytest.mark.slow),  # GQA 1:1
    (True, False, 4, 1, "zigzag"),       # one document per row
    (True, True, 4, 1, "contiguous"),    # plain ring
    (False, False, 4, 4, "contiguous"),
])
def test_ring_equals_dense_across_options(causal, packed, q_heads, kv_heads, layout):
    errors = compare_with_dense(seq_mesh(4), seed=11, causal=causal, packed=packed,
                                q_heads=q_heads, kv_heads=kv_heads, layout=layout)
    assert max(errors) <= 1e-5, errors


@pytest.mark.slow
def test_ring_equals_dense_with_a_data_axis_and_batch_above_one():
    errors = compare_with_dense(seq_mesh(4, data=2), seed=12, batch=4)
    assert max(errors) <= 1e-5, errors


def test_ring_bfloat16_inputs_with_float32_accumulation():
    errors = compare_with_dense(seq_mesh(8), seed=13, dtype=jnp.bfloat16)
    assert max(errors) <= 1e-2, errors


def test_zigzag_gives_device_i_chunks_i_and_2n_minus_1_minus_i():
    order = zigzag_order(16, 4)                 # 8 chunks of 2 tokens
    slices = order.reshape(4, 4)                # one row per device
    np.testing.assert_array_equal(slices[0], [0, 1, 14, 15])
    np.testing.assert_array_equal(slices[3], [6, 7, 8, 9])


def test_zigzag_inverse_restores_the_original_order():
    batch = {"tokens": np.arange(64).reshape(2, 32), "positions": np.arange(64).reshape(2, 32) % 7}
    back = from_zigzag(to_zigzag(batch, 4), 4)
    for name in batch:
        np.testing.assert_array_equal(back[name], batch[name])


def _tiles(layout, block):
    q, k, v = random_qkv(15, 1, 256, 4, 1, 16)
    positions = np.arange(256)[None]
    if layout == "zigzag":
        z = to_zigzag({"q": np.asarray(q), "k": np.asarray(k), "p": positions}, 4)
        q, k, positions = jnp.asarray(z["q"]), jnp.asarray(z["k"]), z["p"]
    return np.asarray(ring_tiles_per_device(q, k, k, mesh=seq_mesh(4),
                                            positions=jnp.asarray(positions),
                                            block_q=block, block_k=block))


def test_contiguous_causal_ring_gives_the_last_device_n_times_the_first_devices_work():
    # one tile per (device, hop): device i computes the i + 1 hops it can see
    np.testing.assert_array_equal(_tiles("contiguous", block=64), [1, 2, 3, 4])


def test_zigzag_causal_ring_gives_every_device_the_same_work():
    for block in (64, 16):
        tiles = _tiles("zigzag", block)
        assert len(set(tiles.tolist())) == 1, tiles
    assert _tiles("zigzag", 16).sum() == _tiles("contiguous", 16).sum()  # same total work
