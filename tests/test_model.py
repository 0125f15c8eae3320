"""Specification of the decoder: shapes, options, masks from data, position kinds."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.layers import param
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
    assert model.blocks.attention.wq.shape == (2, 32, 4, 8)       # [n_layers, ...]
    assert model.blocks.attention.wk.shape == (2, 32, 2, 8)


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


def loss_and_grads(cfg, tokens, seed=0):
    """(sum of logits, gradients of every parameter) of a fresh model of `cfg` (jitted)."""
    model = make(cfg, seed)
    graphdef, params = nnx.split(model, nnx.Param)
    loss = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(tokens).sum()))
    value, grads = loss(params)
    return value, jax.tree.leaves(grads)


@pytest.mark.parametrize("policy", ["full", pytest.param("save_dots", marks=pytest.mark.slow),
                                    pytest.param("save_attention_out", marks=pytest.mark.slow),
                                    pytest.param("offload", marks=pytest.mark.slow),
                                    pytest.param("offload_attention", marks=pytest.mark.slow)])
def test_each_remat_policy_gives_the_gradients_of_no_remat(policy):
    tokens = random_tokens(3)
    value, expected = loss_and_grads(SMALL, tokens)
    got_value, got = loss_and_grads(dataclasses.replace(SMALL, remat=policy), tokens)
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="model.remat must be one of"):
        make(dataclasses.replace(SMALL, remat="some"))


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_scanned_layers_give_the_logits_and_gradients_of_the_python_loop(attention):
    cfg = dataclasses.replace(SMALL, attention=attention, n_layers=3)
    tokens = random_tokens(8)
    looped = dataclasses.replace(cfg, scan_layers=False)
    np.testing.assert_allclose(make(cfg)(tokens), make(looped)(tokens), rtol=1e-5, atol=1e-5)
    value, expected = loss_and_grads(looped, tokens)
    got_value, got = loss_and_grads(cfg, tokens)
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_layers_parameters_are_stacked_with_an_unsharded_layer_axis():
    from parallel import mesh as mesh_lib   # only for the logical-axis rules
    cfg = dataclasses.replace(SMALL, n_layers=3)
    with mesh_lib.use_mesh(mesh_lib.make_mesh(dict(data=1, fsdp=4, seq=1, tensor=2))):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    assert abstract.blocks.attention.wq.shape == (3, 32, 4, 8)
    assert (specs["blocks"]["attention"]["wq"].get_value()
            == P(None, ("fsdp", "seq"), "tensor", None))
    assert specs["embedding"].get_value() == P("tensor", ("fsdp", "seq"))


def test_stacked_layers_hold_the_parameters_a_list_of_blocks_draws():
    """The layer axis is built from blocks made one after another (same random draws as
    before the stacking): layer i's slice is the i-th such block."""
    from model.attention import attention_function
    from model.transformer import Block
    model = make(dataclasses.replace(SMALL, n_layers=3), seed=5)
    rngs = nnx.Rngs(5)
    with nnx.use_eager_sharding(False):
        param(rngs, (SMALL.vocab_size, SMALL.d_model), ("vocab", "embed"),   # the embedding's draw
              nnx.initializers.normal(SMALL.init_std), jnp.float32)
        blocks = [Block(SMALL, attention_function("blockwise"), rngs) for _ in range(3)]
    for i, block in enumerate(blocks):
        np.testing.assert_array_equal(model.blocks.mlp.w_up[...][i], block.mlp.w_up[...])
        np.testing.assert_array_equal(model.blocks.attention.wq[...][i], block.attention.wq[...])


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


def chunked_loss_and_grads(cfg, tokens, targets):
    from model.loss import token_loss_sums
    model = make(cfg, seed=2)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {"tokens": tokens, "targets": targets,
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
             "segment_ids": jnp.zeros_like(tokens), "loss_mask": jnp.ones(tokens.shape)}

    def mean_loss(params):
        total, count = token_loss_sums(graphdef, params, batch)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_the_chunked_loss_equals_the_full_loss_and_its_gradients(chunk):
    tokens, targets = random_tokens(9), random_tokens(10)
    full_loss, full_grads = chunked_loss_and_grads(SMALL, tokens, targets)
    loss, grads = chunked_loss_and_grads(dataclasses.replace(SMALL, loss_chunk_tokens=chunk),
                                         tokens, targets)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(full_grads)):
        scale = float(jnp.abs(b[...]).max())
        np.testing.assert_allclose(a[...], b[...], rtol=0, atol=1e-6 * scale, err_msg=str(path))


def test_chunked_scores_put_every_token_back_in_its_place():
    from model.loss import head_scores
    model = make(dataclasses.replace(SMALL, loss_chunk_tokens=8))
    hidden = jax.random.normal(jax.random.key(3), (2, 32, SMALL.d_model))
    targets = random_tokens(11)
    nll, hits = head_scores(model, hidden, targets)
    logits = model.logits(hidden)
    expected = (jax.nn.logsumexp(logits, -1)
                - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(nll, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hits, jnp.argmax(logits, -1) == targets)


def test_chunk_counts_prefer_a_divisor_of_the_length_and_otherwise_pad():
    from model.chunks import chunk_count
    assert chunk_count(32, 8) == 4 and chunk_count(32, 0) == 1 and chunk_count(32, 64) == 1
    assert chunk_count(32, 12) == 4            # 3 chunks would not divide 32: 4 of 8 tokens
    assert chunk_count(333, 64) == 9           # 6..12 chunks: 9 of 37 tokens divide it
    assert chunk_count(337, 64) == 6           # a prime: 6 chunks of 57, padded to 342


@pytest.mark.parametrize("length,chunk", [(37, 8), (30, 12)])
def test_a_chunked_loss_at_a_length_the_chunk_does_not_divide_equals_the_full_loss(length, chunk):
    tokens, targets = random_tokens(14, length=length), random_tokens(15, length=length)
    full_loss, full_grads = chunked_loss_and_grads(SMALL, tokens, targets)
    cfg = dataclasses.replace(SMALL, loss_chunk_tokens=chunk, mlp_chunk_tokens=chunk)
    loss, grads = chunked_loss_and_grads(cfg, tokens, targets)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(full_grads)):
        scale = float(jnp.abs(b[...]).max())
        np.testing.assert_allclose(a[...], b[...], rtol=0, atol=1e-6 * scale, err_msg=str(path))


def test_the_chunked_loss_over_a_sequence_split_on_seq_4_equals_the_one_device_loss():
    from model.loss import token_loss_sums
    from parallel import mesh as mesh_lib
    from parallel.ring_attention import make_ring_attention
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, seq=4, tensor=1), jax.devices()[:4])
    tokens, targets = random_tokens(12, length=64), random_tokens(13, length=64)
    batch = {"tokens": tokens, "targets": targets,
             "positions": jnp.broadcast_to(jnp.arange(64), tokens.shape),
             "segment_ids": jnp.zeros_like(tokens), "loss_mask": jnp.ones(tokens.shape)}
    reference = make()
    graphdef, params = nnx.split(reference, nnx.Param)
    expected = token_loss_sums(graphdef, params, batch)[0]
    ring = dataclasses.replace(SMALL, attention="ring", loss_chunk_tokens=16)
    with nnx.use_eager_sharding(False):
        model = Transformer(ring, rngs=nnx.Rngs(0),
                            attention_fn=make_ring_attention(mesh, block_q=8, block_k=8))
    ring_graphdef, _ = nnx.split(model, nnx.Param)
    rows = mesh_lib.batch_sharding(mesh)
    sharded = {k: jax.device_put(v, rows) for k, v in batch.items()}
    with mesh_lib.use_mesh(mesh):
        got = jax.jit(lambda p, b: token_loss_sums(ring_graphdef, p, b)[0])(params, sharded)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
