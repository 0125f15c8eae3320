"""Specification of sliding-window attention (`model.sliding_window`, per layer with
`model.layer_types`): every attention path equals the independent reference with the
window, tiles and ring hops outside the window are skipped (counted), a contiguous ring
makes fewer transfers, decoding attends only to the window, and bad windows get one line.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evaluation.generate import generate
from model.attention import dot_product_attention
from model.blockwise import blockwise_attention, blockwise_tiles
from model.transformer import ModelConfig, Transformer
from train.state import model_config_from
from parallel.mesh import make_mesh
from parallel.ring_attention import make_ring_attention, ring_attention, ring_work
from tests.helpers import random_qkv, small_config
from tests.test_any_length import check_against_reference
from configs.sections import settings as settings_of

WINDOW = 40


def ring_mesh(seq=8):
    return make_mesh(dict(data=1, fsdp=1, seq=seq, tensor=1), jax.devices()[:seq])


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("causal", [True, False])
def test_dense_attention_with_a_window_equals_the_reference(causal):
    def dense(q, k, v, p, s):
        return dot_product_attention(q, k, v, positions=p, segment_ids=s, causal=causal,
                                     sliding_window=WINDOW)

    check_against_reference(dense, 133, causal=causal, seed=1, window=WINDOW, packed=False)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_attention_with_a_window_equals_the_reference_at_an_odd_length(causal,
                                                                                 packed):
    def blockwise(q, k, v, p, s):
        return blockwise_attention(q, k, v, positions=p, segment_ids=s, causal=causal,
                                   sliding_window=WINDOW, block_q=32, block_k=16)

    check_against_reference(blockwise, 333, causal=causal, seed=2 + packed, window=WINDOW,
                            packed=packed)


def visible_tiles(length, block_q, block_k, window, causal=True):
    """Tiles with at least one visible (query, key) pair, counted from the mask in numpy."""
    gap = np.arange(length)[:, None] - np.arange(length)[None, :]
    mask = gap < window if causal else np.abs(gap) < window
    if causal:
        mask &= gap >= 0
    count = 0
    for i in range(0, length, block_q):
        for j in range(0, length, block_k):
            count += bool(mask[i:i + block_q, j:j + block_k].any())
    return count


def test_blockwise_skips_every_tile_outside_the_window():
    q, k, v = random_qkv(4, 1, 512, 4, 2, 16)
    computed, total = blockwise_tiles(q, k, v, sliding_window=WINDOW, block_q=32, block_k=32)
    assert computed == visible_tiles(512, 32, 32, WINDOW) == 16 + 15 + 14 and total == 256
    full, _ = blockwise_tiles(q, k, v, block_q=32, block_k=32)
    assert full == 136                                 # the causal triangle without a window


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_attention_with_a_window_equals_the_reference(layout):
    mesh = ring_mesh()

    def ring(q, k, v, p, s):
        return ring_attention(q, k, v, mesh=mesh, positions=p, segment_ids=s, causal=True,
                              sliding_window=WINDOW, layout=layout, block_q=16, block_k=16)

    # contiguous: the inputs are in sequence order, as the promise requires
    check_against_reference(ring, 333, causal=True, seed=5, window=WINDOW,
                            packed=layout == "zigzag")


@pytest.mark.slow
def test_a_non_causal_ring_with_a_window_equals_the_reference():
    mesh = ring_mesh()

    def ring(q, k, v, p, s):
        return ring_attention(q, k, v, mesh=mesh, positions=p, segment_ids=s, causal=False,
                              sliding_window=WINDOW, layout="contiguous", block_q=16,
                              block_k=16)

    check_against_reference(ring, 200, causal=False, seed=6, window=WINDOW, packed=False)


def count_ppermutes(jaxpr) -> int:
    """ppermute executions of a jaxpr: sub-jaxprs included, scan bodies times their length,
    the larger branch of a cond."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            total += 1
        inner = []
        for param in eqn.params.values():
            for item in (param if isinstance(param, (list, tuple)) else [param]):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    inner.append(count_ppermutes(sub))
        if eqn.primitive.name == "cond":
            total += max(inner, default=0)
        else:
            total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def test_a_contiguous_ring_with_a_window_makes_only_the_hops_the_window_reaches():
    mesh, length = ring_mesh(), 1024                   # 128 tokens per device
    q, k, v = random_qkv(7, 1, length, 4, 2, 16)
    options = dict(mesh=mesh, causal=True, block_q=32, block_k=32)
    short = ring_work(q, k, v, sliding_window=WINDOW, layout="contiguous", **options)
    assert short["hops"] == math.ceil((WINDOW - 1) / 128) == 1 and short["hops_in_full_ring"] == 7

    def transfers(**kw):
        return count_ppermutes(jax.make_jaxpr(
            lambda q, k, v: ring_attention(q, k, v, **options, **kw))(q, k, v).jaxpr)

    # k, v, positions and segment ids travel once per hop
    assert transfers(sliding_window=WINDOW, layout="contiguous") == 4 * 1
    assert transfers(sliding_window=WINDOW) == transfers() == 4 * 7
    # the same tiles either way: the skipped hops held nothing in any window
    zigzag_order = ring_work(q, k, v, sliding_window=WINDOW, **options)
    np.testing.assert_array_equal(short["tiles"], zigzag_order["tiles"])
    assert zigzag_order["hops_computed"].tolist() == [1] + [2] * 7
    assert short["tiles"].sum() == visible_tiles(length, 32, 32, WINDOW)


def test_a_ring_with_a_window_skips_the_backward_hops_too():
    """Gradients through a shortened ring return home: they equal the full ring's."""
    mesh = ring_mesh(4)
    q, k, v = random_qkv(8, 1, 256, 4, 2, 16)
    weights = jax.random.normal(jax.random.key(9), q.shape)

    def grads(layout):
        def loss(q, k, v):
            return jnp.sum(ring_attention(q, k, v, mesh=mesh, sliding_window=70, layout=layout,
                                          block_q=16, block_k=16) * weights)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for short, full in zip(grads("contiguous"), grads("zigzag")):
        np.testing.assert_allclose(short, full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the model


SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2, head_dim=8,
                    mlp_dim=64, l_max=64, dtype="float32", block_q=16, block_k=16,
                    attention="blockwise", init_std=0.2, sliding_window=12)


def build(cfg, attention_fn=None):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(0), attention_fn=attention_fn)


@pytest.mark.parametrize("layer_types", [None, ("full_attention", "sliding_attention")])
def test_a_windowed_model_gives_the_same_logits_dense_blockwise_and_on_a_ring(layer_types):
    cfg = dataclasses.replace(SMALL, layer_types=layer_types)
    tokens = jax.random.randint(jax.random.key(1), (2, 77), 0, 64)
    dense = build(dataclasses.replace(cfg, attention="dense"))(tokens)
    blockwise = build(cfg)(tokens)
    mesh = ring_mesh(4)
    ring_model = build(dataclasses.replace(cfg, attention="ring"),
                       make_ring_attention(mesh, layout="contiguous", block_q=16, block_k=16))
    ring = jax.jit(lambda t: ring_model(t))(tokens)
    np.testing.assert_allclose(blockwise, dense, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ring, dense, atol=1e-5, rtol=0)
    # and the window matters: without it the logits differ
    assert not np.allclose(build(dataclasses.replace(cfg, sliding_window=None))(tokens), dense,
                           atol=1e-3)


def test_layer_types_put_the_window_on_the_named_layers_only():
    cfg = dataclasses.replace(SMALL, layer_types=("sliding_attention", "full_attention"))
    assert cfg.layer_windows() == (12, None)
    assert SMALL.layer_windows() == (12, 12)
    assert dataclasses.replace(SMALL, sliding_window=None).layer_windows() == (None, None)


def slow_greedy(model, prompt, new_tokens):
    """Re-run the whole sequence for every new token (no cache): the argmax at its end."""
    sequence = np.asarray(prompt)
    forward = jax.jit(lambda t: model(t))
    for _ in range(new_tokens):
        token = np.asarray(jnp.argmax(forward(jnp.asarray(sequence))[:, -1], -1))
        sequence = np.concatenate([sequence, token[:, None]], axis=1)
    return sequence[:, prompt.shape[1]:]


@pytest.mark.parametrize("layer_types", [None, ("full_attention", "sliding_attention")])
def test_decoding_attends_only_to_the_window_on_one_device_and_on_a_split_cache(layer_types):
    model = build(dataclasses.replace(SMALL, attention="dense", layer_types=layer_types))
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (2, 29), 0, 64))
    expected = slow_greedy(model, prompt, 10)
    assert len(np.unique(expected)) >= 3, f"degenerate continuation {expected}"
    np.testing.assert_array_equal(generate(model, prompt, 10, prefill_chunk=8), expected)
    np.testing.assert_array_equal(generate(model, prompt, 10, mesh=ring_mesh(4)), expected)


# ----------------------------------------------------------------------------- bad windows


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_a_window_that_is_not_a_positive_integer_is_one_line(window):
    with pytest.raises(ValueError, match=r"model.sliding_window must be None or an integer >= 1"):
        dataclasses.replace(SMALL, sliding_window=window).validate()


def test_layer_types_of_the_wrong_length_or_kind_are_one_line():
    for types in (("sliding_attention",), ("sliding_attention", "local")):
        with pytest.raises(ValueError, match="model.layer_types must be None or one of"):
            dataclasses.replace(SMALL, layer_types=types).validate()


@pytest.mark.slow
def test_main_refuses_a_zero_window_in_one_line_before_compiling(tmp_path):
    import subprocess
    import sys
    result = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
         "--config.model.sliding_window=0"], capture_output=True, text=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "model.sliding_window" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_the_config_key_reaches_the_model():
    config = small_config()
    config.model.sliding_window = 24
    config.model.layer_types = ("full_attention", "sliding_attention")
    cfg = model_config_from(settings_of(config), 256)
    assert cfg.layer_windows() == (None, 24)
