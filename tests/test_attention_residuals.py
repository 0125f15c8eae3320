"""Specification of the attention kernels' named residuals (model/blockwise.py): a remat
policy that keeps the kernel's output and log-sum-exp (save_attention_out,
offload_attention) spares the backward pass the kernel's forward pass: a ring sends its
forward K/V once per step, not twice, and the one-device kernel's forward math runs once;
the gradients do not change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.blockwise import blockwise_attention
from parallel.collectives import collective_bytes
from parallel.mesh import make_mesh
from parallel.ring_attention import ring_attention

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 1, 256, 4, 2, 16
POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
            "save_attention_out": jax.checkpoint_policies.save_only_these_names(
                "attention_out", "attention_lse")}


def layer_grad(attention, policy: str):
    """jit(grad) of a toy layer (projections, attention, residual) under `policy`."""
    def layer(x, w):
        q = (x @ w).reshape(BATCH, LENGTH, HEADS, HEAD_DIM)
        kv = (x @ w[:, :KV_HEADS * HEAD_DIM]).reshape(BATCH, LENGTH, KV_HEADS, HEAD_DIM)
        out = attention(q, kv, kv * 0.5)
        return x + out.reshape(BATCH, LENGTH, HEADS * HEAD_DIM)

    body = layer if POLICIES[policy] is None else jax.checkpoint(layer, policy=POLICIES[policy])
    return jax.jit(jax.grad(lambda x, w: jnp.sum(body(x, w) ** 2), argnums=(0, 1)))


def inputs(seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    width = HEADS * HEAD_DIM
    return (jax.random.normal(kx, (BATCH, LENGTH, width)),
            jax.random.normal(kw, (width, width)) / np.sqrt(width))


def ring_on_8():
    mesh = make_mesh(dict(data=1, fsdp=1, seq=8, tensor=1), jax.devices()[:8])
    return lambda q, k, v: ring_attention(q, k, v, mesh=mesh, block_q=16, block_k=16)


def test_keeping_the_residuals_spares_the_ring_its_second_forward_pass():
    x, w = inputs(0)
    sent = {policy: collective_bytes(layer_grad(ring_on_8(), policy).lower(x, w).compile()
                                     .as_text())["attention_traffic"] for policy in POLICIES}
    assert sent["save_attention_out"] == sent["none"]
    # the rerun ring: 6 more hops of K, V (32 tokens x 2 heads x 16, float32) and of the
    # positions and segment ids (its first hop sends what the backward ring's first sends:
    # XLA sends it once)
    assert sent["full"] - sent["none"] == 6 * (2 * 32 * 2 * 16 * 4 + 2 * 32 * 4)


def test_keeping_the_residuals_spares_the_kernel_its_forward_math():
    x, w = inputs(1)

    def attention(q, k, v):
        return blockwise_attention(q, k, v, block_q=16, block_k=16)

    flops = {policy: layer_grad(attention, policy).lower(x, w).compile().cost_analysis()["flops"]
             for policy in POLICIES}
    assert flops["save_attention_out"] < flops["full"]
    assert flops["save_attention_out"] == pytest.approx(flops["none"], rel=0.02)


@pytest.mark.parametrize("kernel", ["ring", "blockwise"])
def test_kept_residuals_give_the_gradients_of_no_remat(kernel):
    x, w = inputs(2)
    attention = ring_on_8() if kernel == "ring" else (
        lambda q, k, v: blockwise_attention(q, k, v, block_q=16, block_k=16))
    expected = layer_grad(attention, "none")(x, w)
    got = layer_grad(attention, "save_attention_out")(x, w)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
