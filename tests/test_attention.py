"""Specification of the attention functions: blockwise equals the dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import dot_product_attention
from model.blockwise import blockwise_attention, blockwise_forward, merge_partial_attention
from tests.helpers import packed_segments, random_qkv, relative_error


def blockwise_small_blocks(q, k, v, **kw):
    return blockwise_attention(q, k, v, block_q=16, block_k=8, **kw)


def outputs_and_grads(fn, q, k, v, **kw):
    weights = jax.random.normal(jax.random.key(99), q.shape, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * weights)

    return fn(q, k, v, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 1), (4, 4),
                                              pytest.param(8, 2, marks=pytest.mark.slow)])
def test_blockwise_matches_dense_forward_and_gradients(causal, packed, q_heads, kv_heads):
    seed = q_heads * 10 + kv_heads + 2 * causal + packed
    q, k, v = random_qkv(seed, q_heads=q_heads, kv_heads=kv_heads)
    kw = dict(causal=causal)
    if packed:
        kw["positions"], kw["segment_ids"] = packed_segments(seed, q.shape[0], q.shape[1])
    ref_out, ref_grads = outputs_and_grads(dot_product_attention, q, k, v, **kw)
    out, grads = outputs_and_grads(blockwise_small_blocks, q, k, v, **kw)
    assert relative_error(ref_out, out) <= 1e-5
    for ref_g, g in zip(ref_grads, grads):
        assert relative_error(ref_g, g) <= 1e-5


def test_blockwise_bfloat16_inputs_stay_close_to_float32_reference():
    q, k, v = random_qkv(3)
    ref = dot_product_attention(q, k, v)
    out = blockwise_small_blocks(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                 v.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert relative_error(ref, out) <= 1e-2


def test_masks_come_from_positions_not_array_order():
    """Permuting tokens together with their positions permutes the output the same way."""
    q, k, v = random_qkv(4, batch=1, length=32)
    positions = jnp.arange(32, dtype=jnp.int32)[None]
    perm = np.random.default_rng(0).permutation(32)
    for fn in (dot_product_attention, blockwise_small_blocks):
        out = fn(q, k, v, positions=positions)
        out_perm = fn(q[:, perm], k[:, perm], v[:, perm], positions=positions[:, perm])
        np.testing.assert_allclose(out[:, perm], out_perm, atol=1e-5)


def test_query_rows_that_see_no_key_give_zeros_not_nan():
    q, k, v = random_qkv(5, batch=1, length=16)
    q_pos = jnp.zeros((1, 16), jnp.int32)
    k_pos = jnp.arange(1, 17, dtype=jnp.int32)[None]          # every key after every query
    seg = jnp.zeros((1, 16), jnp.int32)
    out, lse, tiles = blockwise_forward(q, k, v, q_pos, k_pos, seg, seg, causal=True, block_q=8,
                                        block_k=8)
    assert not jnp.isnan(out).any()
    assert jnp.all(out == 0)
    assert jnp.all(jnp.isneginf(lse))
    assert int(tiles) == 0  # nothing visible: no tile computed


def test_merging_two_key_halves_equals_attention_over_all_keys():
    q, k, v = random_qkv(6, batch=1, length=32)
    pos = jnp.arange(32, dtype=jnp.int32)[None]
    seg = jnp.zeros((1, 32), jnp.int32)
    full, _, _ = blockwise_forward(q, k, v, pos, pos, seg, seg, causal=True, block_q=8, block_k=8)
    out_a, lse_a, _ = blockwise_forward(q, k[:, :16], v[:, :16], pos, pos[:, :16], seg, seg[:, :16],
                                     causal=True, block_q=8, block_k=8)
    out_b, lse_b, _ = blockwise_forward(q, k[:, 16:], v[:, 16:], pos, pos[:, 16:], seg, seg[:, 16:],
                                     causal=True, block_q=8, block_k=8)
    merged, _ = merge_partial_attention(out_a, lse_a, out_b, lse_b)
    assert relative_error(full, merged) <= 1e-6


def all_intermediate_shapes(jaxpr):
    """Shapes of every value computed anywhere in a jaxpr, sub-jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                shapes += all_intermediate_shapes(inner)
    return shapes


def test_gqa_never_repeats_kv_heads_forward_or_backward():
    """With 4 query heads sharing 1 K/V head and key blocks of 8, no value shaped like a
    key block expanded to 4 heads ([.., 8, 4, 16]) is ever computed."""
    q, k, v = random_qkv(7, batch=1, length=64, q_heads=4, kv_heads=1, head_dim=16)

    def fn(q, k, v):
        return blockwise_attention(q, k, v, block_q=32, block_k=8).sum()

    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v).jaxpr
    shapes = all_intermediate_shapes(jaxpr)
    assert any(shape[-3:] == (8, 1, 16) for shape in shapes)      # key blocks exist
    assert not any(shape[-3:] == (8, 4, 16) for shape in shapes)  # never repeated per q head


def test_q_heads_not_a_multiple_of_kv_heads_is_a_clear_error():
    q, k, v = random_qkv(9, q_heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        dot_product_attention(q, k, v)


def test_causal_blockwise_computes_only_tiles_on_or_below_the_diagonal():
    q, k, v = random_qkv(10, batch=1, length=64)
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    seg = jnp.zeros((1, 64), jnp.int32)
    _, _, tiles = blockwise_forward(q, k, v, pos, pos, seg, seg, causal=True, block_q=16,
                                    block_k=16)
    assert int(tiles) == 4 * 5 // 2          # 4 x 4 tiles, lower triangle with diagonal
    _, _, tiles = blockwise_forward(q, k, v, pos, pos, seg, seg, causal=False, block_q=16,
                                    block_k=16)
    assert int(tiles) == 16
