"""Specification of the decoder: shapes, options, masks from data, position kinds."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.transformer import ModelConfig, Transformer, count_parameters

SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2, head_dim=8,
                    mlp_dim=64, l_max=32, dtype="float32", block_q=8, block_k=8,
                    attention="blockwise")


def make(cfg=SMALL, seed=0):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def random_tokens(seed, batch=2, length=32, vocab=64):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


@pytest.mark.slow
def test_logits_have_batch_length_vocab_shape_in_float32():
    logits = make()(random_tokens(0))
    assert logits.shape == (2, 32, 64) and logits.dtype == jnp.float32


def test_grouped_query_attention_has_fewer_key_value_heads():
    model = make()
    assert model.blocks[0].attention.wq.shape == (32, 4, 8)
    assert model.blocks[0].attention.wk.shape == (32, 2, 8)


def test_untied_head_has_its_own_weights_and_tied_has_none():
    assert not hasattr(make(), "lm_head")
    untied = make(dataclasses.replace(SMALL, tie_embeddings=False))
    assert untied.lm_head.shape == (32, 64)


def test_count_parameters_of_a_module_equals_that_of_its_parameter_arrays():
    model = make()
    params = nnx.state(model, nnx.Param)
    # embedding 64 x 32; per block: wq, wk, wv, wo, SwiGLU (3 x 32 x 64), 2 norms; final norm
    per_block = 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64 + 2 * 32
    assert count_parameters(model) == count_parameters(params) == 64 * 32 + 2 * per_block + 32
    abstract = jax.eval_shape(lambda: params)                # arrays or shapes alike
    assert count_parameters(abstract) == count_parameters(model)


def test_bfloat16_compute_keeps_float32_parameters():
    model = make(dataclasses.replace(SMALL, dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = make()(random_tokens(1))
    out = model(random_tokens(1))
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 0.05


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_dense_and_blockwise_models_agree(attention):
    tokens = random_tokens(2)
    ref = make(dataclasses.replace(SMALL, attention="dense"))(tokens)
    out = make(dataclasses.replace(SMALL, attention=attention))(tokens)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_rematerialisation_gives_the_same_gradients():
    tokens = random_tokens(3)

    def grads(cfg):
        model = make(cfg)
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: nnx.merge(graphdef, p)(tokens).sum()
        return jax.tree.leaves(jax.grad(loss)(params))

    for a, b in zip(grads(SMALL), grads(dataclasses.replace(SMALL, remat=True))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_changing_one_packed_document_never_changes_another(position, attention):
    """Row = doc A (10 tokens) | doc B (12) | doc C (10). Changing B leaves A and C alone."""
    cfg = dataclasses.replace(SMALL, position=position, attention=attention)
    model = make(cfg)
    segments = jnp.asarray([[1] * 10 + [2] * 12 + [3] * 10], jnp.int32)
    positions = jnp.asarray([list(range(10)) + list(range(12)) + list(range(10))], jnp.int32)
    tokens = random_tokens(4, batch=1)
    other = tokens.at[0, 10:22].set(random_tokens(5, batch=1)[0, 10:22])
    a = model(tokens, positions, segments)
    b = model(other, positions, segments)
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
    np.testing.assert_allclose(a[0, 22:], b[0, 22:], atol=1e-6)
    assert float(jnp.abs(a[0, 10:22] - b[0, 10:22]).max()) > 1e-3  # B itself did change


def test_rope_logits_depend_only_on_relative_positions():
    model = make()
    tokens = random_tokens(6, batch=1)
    positions = jnp.arange(32, dtype=jnp.int32)[None]
    np.testing.assert_allclose(model(tokens, positions), model(tokens, positions + 1000),
                               rtol=1e-4, atol=1e-4)


def test_learned_positions_beyond_l_max_raise_a_clear_error():
    model = make(dataclasses.replace(SMALL, position="learned"))
    with pytest.raises(ValueError, match="l_max=32"):
        model(random_tokens(7, length=64))


def test_invalid_head_counts_are_rejected():
    with pytest.raises(ValueError, match="multiple of"):
        make(dataclasses.replace(SMALL, q_heads=6, kv_heads=4))
