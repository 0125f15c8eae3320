"""Generation on a mesh: the prompt prefilled with ring attention over `seq`, the KV cache
split over `seq`, and decoding attention over the split cache (parallel/sharded_cache.py)
against the one-device cache attention and one-device generation."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evaluation.generate import cache_slots_on_mesh, generate, prefill
from model.attention import cached_attention
from model.kv_cache import KVCache
from model.positions import normalize_rope_scaling
from model.transformer import ModelConfig, Transformer
from parallel import mesh as mesh_lib
from parallel.sharded_cache import cache_sharding, sharded_cached_attention

# float32, GQA; init_std 0.2 spreads the logits so that argmaxes are far from ties
SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2, head_dim=8,
                    mlp_dim=64, l_max=64, dtype="float32", block_q=8, block_k=8,
                    attention="blockwise", init_std=0.2)
MESHES = {"seq4": dict(data=1, fsdp=1, seq=4, tensor=1),
          "seq2_tensor2": dict(data=1, fsdp=1, seq=2, tensor=2),
          "data2_seq4": dict(data=2, fsdp=1, seq=4, tensor=1)}


def mesh(name):
    shape = MESHES[name]
    count = shape["data"] * shape["seq"] * shape["tensor"]
    return mesh_lib.make_mesh(shape, jax.devices()[:count])


def make(cfg=SMALL, seed=0):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def prompts(seed, batch=2, length=37):
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0,
                                         SMALL.vocab_size))


def random_cache_inputs(seed, t, start, layers=3, slots=32, batch=2, q_heads=4, kv_heads=2,
                        head_dim=8):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (batch, t, q_heads, head_dim))
    k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim))
    shape = (layers, batch, slots, kv_heads, head_dim)
    cache = KVCache(jax.random.normal(keys[3], shape), jax.random.normal(keys[4], shape),
                    jnp.int32(start))
    return q, k, v, cache


@pytest.mark.parametrize("mesh_name", ["seq4", "seq2_tensor2"])
@pytest.mark.parametrize("t,start", [(1, 0), (1, 13), (1, 31), (5, 6), (6, 26)])
def test_attention_over_a_split_cache_equals_the_one_device_cache_attention(mesh_name, t, start):
    """New tokens that fall into one shard or straddle two (slots 6..10 with parts of 8),
    the very first and very last slot, in the middle layer of three; outputs and the
    written cache both compared."""
    q, k, v, cache = random_cache_inputs(seed=t * 100 + start, t=t, start=start)
    expected_out, expected_cache = cached_attention(q, k, v, cache, 1)
    the_mesh = mesh(mesh_name)
    split = cache._replace(k=jax.device_put(cache.k, cache_sharding(the_mesh)),
                           v=jax.device_put(cache.v, cache_sharding(the_mesh)))
    attend = jax.jit(sharded_cached_attention(the_mesh))
    out, new_cache = attend(q, k, v, split, jnp.int32(1))
    np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(new_cache.k, expected_cache.k)
    np.testing.assert_array_equal(new_cache.v, expected_cache.v)
    assert int(new_cache.length) == start
    assert new_cache.k.sharding.is_equivalent_to(cache_sharding(the_mesh), 5)


def test_the_cache_slots_on_a_mesh_are_the_total_rounded_up_to_whole_slots_per_device():
    for total, seq, expected in ((49, 4, 52), (10, 4, 12), (32, 4, 32), (7, 2, 8), (7, 8, 8),
                                 (300, 2, 300)):
        assert cache_slots_on_mesh(total, seq) == expected


def test_a_prefill_on_seq_4_leaves_each_device_a_quarter_of_the_cache():
    model, the_mesh = make(), mesh("seq4")
    prompt = jnp.asarray(prompts(1))                              # 37 tokens, 12 new: 49 -> 52
    logits, cache = prefill(model, prompt, total=49, mesh=the_mesh)
    assert logits.shape == (2, SMALL.vocab_size) and int(cache.length) == 37
    for array in (cache.k, cache.v):
        assert array.shape == (SMALL.n_layers, 2, 52, SMALL.kv_heads, SMALL.head_dim)
        assert {shard.data.shape[2] for shard in array.addressable_shards} == {13}
    # the cache's prompt slots hold what a one-device prefill writes
    _, reference = prefill(model, prompt, total=49)
    np.testing.assert_allclose(cache.k[:, :, :37], reference.k[:, :, :37], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.v[:, :, :37], reference.v[:, :, :37], atol=1e-5, rtol=0)


def scaling(rope_scaling):
    return json.dumps(normalize_rope_scaling(rope_scaling, 32), sort_keys=True)


VARIANTS = {
    "rope": {},
    # learned positions: the padded cache (52 slots) is longer than prompt + new tokens
    # (49 <= l_max 56): padding must stay inside the position table
    "learned": {"position": "learned", "l_max": 56},
    # final length 49 > L0 32: dynamic's frequencies are those of 49, not of the 52 slots
    "rope_dynamic_x2": {"rope_scaling_json": scaling({"rope_type": "dynamic", "factor": 2})},
    "gpt2_options": {"position": "learned", "norm": "layernorm", "mlp": "gelu_tanh",
                     "qkv_bias": True, "attention_out_bias": True, "mlp_bias": True,
                     "tie_embeddings": False},
}


# the fast set keeps plain RoPE on seq=4; CI runs every variant and mesh
@pytest.mark.parametrize("mesh_name", ["seq4", pytest.param("seq2_tensor2", marks=pytest.mark.slow),
                                       pytest.param("data2_seq4", marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", [v if v == "rope" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in sorted(VARIANTS)])
def test_a_prompt_on_a_mesh_generates_the_greedy_tokens_of_one_device(variant, mesh_name):
    model = make(dataclasses.replace(SMALL, **VARIANTS[variant]))
    prompt = prompts(2)
    expected = generate(model, prompt, 12)
    assert len(np.unique(expected)) >= 3, f"degenerate continuation {expected}"
    np.testing.assert_array_equal(generate(model, prompt, 12, mesh=mesh(mesh_name)), expected)


@pytest.mark.slow
def test_sampling_on_seq_4_draws_the_tokens_of_one_device_for_a_seed():
    model = make()
    prompt = prompts(3)
    expected = generate(model, prompt, 12, temperature=0.8, top_p=0.9, seed=5)
    np.testing.assert_array_equal(
        generate(model, prompt, 12, temperature=0.8, top_p=0.9, seed=5, mesh=mesh("seq4")),
        expected)


def test_generation_on_seq_4_stops_at_eos_as_on_one_device():
    model = make()
    prompt = prompts(4)[0]
    free = generate(model, prompt, 12)
    eos = int(free[4])
    np.testing.assert_array_equal(generate(model, prompt, 12, eos_id=eos, mesh=mesh("seq4")),
                                  generate(model, prompt, 12, eos_id=eos))


def test_a_batch_that_does_not_split_over_the_mesh_rows_is_refused():
    with pytest.raises(ValueError, match="data x fsdp = 2"):
        generate(make(), prompts(5, batch=3), 4, mesh=mesh("data2_seq4"))


def test_a_padded_prompt_on_seq_4_generates_the_tokens_of_the_exact_prompt_on_one_device():
    model = make()
    prompt = prompts(6, length=29)
    np.testing.assert_array_equal(generate(model, prompt, 12, pad_to=40, mesh=mesh("seq4")),
                                  generate(model, prompt, 12))
