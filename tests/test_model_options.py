"""Specification of the architecture options: model.norm, model.mlp and the bias switches
(the options Hugging Face GPT-2 and Qwen2 checkpoints need), and that the defaults are
today's Llama-style model, parameter for parameter."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from model import positions as pos_lib
from model.attention import Attention, dot_product_attention
from model.layers import GeluMLP, LayerNorm, SwiGLU
from model.transformer import ModelConfig, Transformer
from train.state import model_config_from
from train.optimizer import weight_decay_mask
from train.checkpoint import PARAMETER_LAYOUT, check_same_model
from configs.sections import settings as settings_of

SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2, head_dim=8,
                    mlp_dim=64, l_max=32, dtype="float32", block_q=8, block_k=8,
                    attention="blockwise")
GPT2_STYLE = dataclasses.replace(SMALL, norm="layernorm", mlp="gelu_tanh", qkv_bias=True,
                                 attention_out_bias=True, mlp_bias=True, position="learned",
                                 tie_embeddings=True)
ALL_BIASES = dataclasses.replace(SMALL, qkv_bias=True, attention_out_bias=True, mlp_bias=True)

# The parameters of SMALL as they were before the options existed (paths and shapes; the
# two layers' block parameters stacked [2, ...]).
DEFAULT_PARAMETERS = {
    "embedding": (64, 32),
    "final_norm/scale": (32,),
    **{f"blocks/{name}": (2, *shape) for name, shape in {
        "attention_norm/scale": (32,),
        "attention/wq": (32, 4, 8),
        "attention/wk": (32, 2, 8),
        "attention/wv": (32, 2, 8),
        "attention/wo": (4, 8, 32),
        "mlp_norm/scale": (32,),
        "mlp/w_gate": (32, 64),
        "mlp/w_up": (32, 64),
        "mlp/w_down": (64, 32),
    }.items()},
}


def make(cfg=SMALL, seed=0):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def build(module_class, *args, **kwargs):
    with nnx.use_eager_sharding(False):
        return module_class(*args, **kwargs)


def parameters(module) -> dict[str, jax.Array]:
    """'blocks/attention/wq' -> value, for every parameter of `module`."""
    return {"/".join(str(key) for key in path): variable[...]
            for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def set_random(module, seed: int, scale: float = 0.5):
    """Give every parameter of `module` random values (biases included), in place."""
    for i, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(module, nnx.Param))):
        key = jax.random.fold_in(jax.random.key(seed), i)
        variable[...] = scale * jax.random.normal(key, variable.shape, variable.dtype)
    nnx.update(module, nnx.state(module, nnx.Param))


def random_tokens(seed, batch=2, length=32, vocab=64):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def tanh_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_layernorm_matches_numpy_reference():
    norm = build(LayerNorm, 16, 1e-5, jnp.float32, nnx.Rngs(0))
    set_random(norm, seed=1)
    x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 16)) * 3.0 + 1.5)
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(variance + 1e-5) * np.asarray(norm.scale[...]) \
        + np.asarray(norm.bias[...])
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_starts_as_scale_one_bias_zero_and_keeps_the_input_dtype():
    norm = build(LayerNorm, 16, 1e-5, jnp.float32, nnx.Rngs(0))
    np.testing.assert_array_equal(norm.scale[...], np.ones(16))
    np.testing.assert_array_equal(norm.bias[...], np.zeros(16))
    assert norm(jnp.ones((2, 16), jnp.bfloat16)).dtype == jnp.bfloat16


def test_gelu_mlp_matches_numpy_reference_with_tanh_gelu():
    mlp = build(GeluMLP, 16, 40, 0.02, jnp.float32, jnp.float32, nnx.Rngs(0), bias=True)
    set_random(mlp, seed=3)
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 7, 16)))
    p = {name: np.asarray(value) for name, value in parameters(mlp).items()}
    expected = tanh_gelu(x @ p["w_in"] + p["in_bias"]) @ p["w_out"] + p["out_bias"]
    np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_with_biases_matches_numpy_reference():
    mlp = build(SwiGLU, 16, 40, 0.02, jnp.float32, jnp.float32, nnx.Rngs(0), bias=True)
    set_random(mlp, seed=5)
    x = np.asarray(jax.random.normal(jax.random.key(6), (2, 7, 16)))
    p = {name: np.asarray(value) for name, value in parameters(mlp).items()}
    gate = x @ p["w_gate"] + p["gate_bias"]
    up = x @ p["w_up"] + p["up_bias"]
    expected = (gate / (1.0 + np.exp(-gate)) * up) @ p["w_down"] + p["down_bias"]
    np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def reference_attention(x, p, rotate, positions, q_heads, kv_heads):
    """Causal grouped-query attention in numpy, biases added before the rotation."""
    q = np.einsum("bld,dhk->blhk", x, p["wq"]) + p.get("q_bias", 0.0)
    k = np.einsum("bld,dhk->blhk", x, p["wk"]) + p.get("k_bias", 0.0)
    v = np.einsum("bld,dhk->blhk", x, p["wv"]) + p.get("v_bias", 0.0)
    q = np.asarray(rotate(jnp.asarray(q), positions))
    k = np.asarray(rotate(jnp.asarray(k), positions))
    length, head_dim = x.shape[1], q.shape[-1]
    kv_of_head = np.arange(q_heads) // (q_heads // kv_heads)
    k, v = k[:, :, kv_of_head], v[:, :, kv_of_head]                   # one K/V per query head
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("blhk,hkd->bld", out, p["wo"]) + p.get("out_bias", 0.0)


@pytest.mark.parametrize("qkv_bias,out_bias", [(True, False), (True, True), (False, True)])
def test_attention_with_biases_matches_numpy_reference(qkv_bias, out_bias):
    d_model, q_heads, kv_heads, head_dim, length = 16, 4, 2, 8, 9
    layer = build(Attention, d_model, q_heads, kv_heads, head_dim,
                  attention_fn=dot_product_attention, init_std=0.02, dtype=jnp.float32,
                  param_dtype=jnp.float32, rngs=nnx.Rngs(0), qkv_bias=qkv_bias,
                  out_bias=out_bias)
    set_random(layer, seed=7)
    p = {name: np.asarray(value) for name, value in parameters(layer).items()}
    assert ("q_bias" in p) == qkv_bias and ("out_bias" in p) == out_bias
    x = np.asarray(jax.random.normal(jax.random.key(8), (2, length, d_model)))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
    segments = jnp.zeros((2, length), jnp.int32)
    inv_freq, factor = pos_lib.rope_frequencies(head_dim, 10000.0, None, seq_len=length)

    def rotate(t, pos):
        return pos_lib.apply_rope(t, pos, inv_freq, factor)

    expected = reference_attention(x, p, rotate, positions, q_heads, kv_heads)
    out = layer(jnp.asarray(x), positions, segments, rotate)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_default_model_parameters_are_unchanged():
    params = parameters(make())
    assert {name: tuple(value.shape) for name, value in params.items()} == DEFAULT_PARAMETERS


@pytest.mark.parametrize("option,added,removed", [
    ({"qkv_bias": True},
     {"attention/q_bias": (4, 8), "attention/k_bias": (2, 8), "attention/v_bias": (2, 8)}, set()),
    ({"attention_out_bias": True}, {"attention/out_bias": (32,)}, set()),
    ({"mlp_bias": True},
     {"mlp/gate_bias": (64,), "mlp/up_bias": (64,), "mlp/down_bias": (32,)}, set()),
    ({"norm": "layernorm"}, {"attention_norm/bias": (32,), "mlp_norm/bias": (32,)}, set()),
    ({"mlp": "gelu_tanh"}, {"mlp/w_in": (32, 64), "mlp/w_out": (64, 32)},
     {"mlp/w_gate", "mlp/w_up", "mlp/w_down"}),
    ({"mlp": "gelu_tanh", "mlp_bias": True},
     {"mlp/w_in": (32, 64), "mlp/w_out": (64, 32), "mlp/in_bias": (64,),
      "mlp/out_bias": (32,)}, {"mlp/w_gate", "mlp/w_up", "mlp/w_down"}),
])
def test_each_option_adds_and_removes_exactly_its_parameters(option, added, removed):
    shapes = {name: tuple(value.shape)
              for name, value in parameters(make(dataclasses.replace(SMALL, **option))).items()}
    expected = {name: shape for name, shape in DEFAULT_PARAMETERS.items()
                if name.removeprefix("blocks/") not in removed}
    expected.update({f"blocks/{name}": (2, *shape) for name, shape in added.items()})
    if option.get("norm") == "layernorm":
        expected["final_norm/bias"] = (32,)
    assert shapes == expected


@pytest.mark.slow
def test_biases_start_at_zero_and_leave_the_random_weights_and_logits_as_they_were():
    default, biased = make(), make(ALL_BIASES)
    default_params, biased_params = parameters(default), parameters(biased)
    for name, value in biased_params.items():
        if name in default_params:
            np.testing.assert_array_equal(value, default_params[name], err_msg=name)
        else:
            assert "bias" in name
            np.testing.assert_array_equal(value, np.zeros(value.shape), err_msg=name)
    tokens = random_tokens(9)
    np.testing.assert_array_equal(biased(tokens), default(tokens))


def test_layernorm_model_draws_the_same_weights_as_the_rmsnorm_model():
    rms, layer = parameters(make()), parameters(make(dataclasses.replace(SMALL, norm="layernorm")))
    for name, value in rms.items():
        np.testing.assert_array_equal(layer[name], value, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_gpt2_style_model_runs_and_every_gradient_is_finite_and_reaches_the_biases(attention):
    model = make(dataclasses.replace(GPT2_STYLE, attention=attention))
    assert not hasattr(model, "lm_head") and model.position_table.shape == (32, 32)
    tokens = random_tokens(10)
    logits = model(tokens)
    assert logits.shape == (2, 32, 64) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    grads = {"/".join(map(str, path)): g[...]
             for path, g in nnx.to_flat_state(jax.grad(loss)(params))}
    assert set(grads) == set(parameters(model))
    for name, g in grads.items():
        assert bool(jnp.all(jnp.isfinite(g))), name
        if "bias" in name:
            assert float(jnp.abs(g).max()) > 0, f"{name} gets no gradient"


def test_dense_and_blockwise_gpt2_style_models_agree():
    tokens = random_tokens(11)
    ref = make(dataclasses.replace(GPT2_STYLE, attention="dense"))
    out = make(dataclasses.replace(GPT2_STYLE, attention="blockwise"))
    set_random(ref, seed=12, scale=0.1)
    nnx.update(out, nnx.state(ref, nnx.Param))
    np.testing.assert_allclose(out(tokens), ref(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_with_every_option_keeps_float32_parameters_and_logits():
    cfg = dataclasses.replace(GPT2_STYLE, dtype="bfloat16")
    model = make(cfg)
    assert all(x.dtype == jnp.float32 for x in parameters(model).values())
    ref = make(GPT2_STYLE)(random_tokens(13))
    out = model(random_tokens(13))
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 0.05


@pytest.mark.parametrize("key,value", [("norm", "batchnorm"), ("mlp", "relu"),
                                       ("qkv_bias", "yes"), ("attention_out_bias", 1),
                                       ("mlp_bias", None)])
def test_invalid_option_values_raise_value_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"model\.{key} must be"):
        dataclasses.replace(SMALL, **{key: value}).validate()


def test_model_config_from_reads_the_options_and_defaults_to_todays_model():
    config = base.get_config()
    default = model_config_from(settings_of(config), vocab_size=256)
    assert (default.norm, default.mlp, default.qkv_bias, default.attention_out_bias,
            default.mlp_bias) == ("rmsnorm", "swiglu", False, False, False)
    config.model.norm, config.model.mlp = "layernorm", "gelu_tanh"
    config.model.qkv_bias = config.model.attention_out_bias = config.model.mlp_bias = True
    gpt2 = model_config_from(settings_of(config), vocab_size=256)
    assert (gpt2.norm, gpt2.mlp, gpt2.qkv_bias, gpt2.attention_out_bias,
            gpt2.mlp_bias) == ("layernorm", "gelu_tanh", True, True, True)
    config.model.norm = "groupnorm"
    with pytest.raises(ValueError, match=r"model\.norm must be one of"):
        model_config_from(settings_of(config), vocab_size=256)


def test_biases_get_no_weight_decay_and_the_default_model_decays_only_its_matrices():
    def decayed(cfg):
        mask = weight_decay_mask(nnx.state(make(cfg), nnx.Param))
        return {"/".join(map(str, path)) for path, decays in nnx.to_flat_state(mask)
                if decays.get_value()}

    matrices = {f"blocks/{name}" for name in (
        "attention/wq", "attention/wk", "attention/wv", "attention/wo")}
    assert decayed(SMALL) == matrices | {f"blocks/mlp/{w}" for w in ("w_gate", "w_up", "w_down")}
    assert decayed(GPT2_STYLE) == matrices | {f"blocks/mlp/{w}" for w in ("w_in", "w_out")}


@pytest.mark.parametrize("option", [{"norm": "layernorm"}, {"mlp": "gelu_tanh"},
                                    {"qkv_bias": True}, {"attention_out_bias": True},
                                    {"mlp_bias": True}])
def test_options_define_the_model_for_checkpoints_and_older_checkpoints_read_as_defaults(option):
    old_meta = {"parameter_layout": PARAMETER_LAYOUT,
                "model_config": {k: v for k, v in dataclasses.asdict(SMALL).items()
                                 if k not in ("norm", "mlp", "qkv_bias", "attention_out_bias",
                                              "mlp_bias")}}
    check_same_model(old_meta, types.SimpleNamespace(model_config=SMALL), "workdir")
    changed = dataclasses.replace(SMALL, **option)
    with pytest.raises(ValueError, match=f"differs in {next(iter(option))}"):
        check_same_model(old_meta, types.SimpleNamespace(model_config=changed), "workdir")
    check_same_model({"parameter_layout": PARAMETER_LAYOUT,
                      "model_config": dataclasses.asdict(changed)},
                     types.SimpleNamespace(model_config=changed), "workdir")


def test_a_checkpoint_from_before_the_stacked_layers_is_refused_with_the_reason():
    meta = {"model_config": dataclasses.asdict(SMALL)}       # no parameter_layout
    with pytest.raises(ValueError, match="before the decoder layers' parameters were stacked"):
        check_same_model(meta, types.SimpleNamespace(model_config=SMALL), "workdir")
