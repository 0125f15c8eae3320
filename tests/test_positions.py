"""Tests for model/positions.py: RoPE and the Hugging Face rope_scaling variants.

Expected values are written out from the formulas in docs/positions.md ("Rotary positions and their
scalings"), independently of the module's code paths; the last tests cross-check against
Hugging Face `transformers`.
"""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from model.positions import apply_rope, normalize_rope_scaling, rope_frequencies


def _reference_inv_freq(d, theta):
    return np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])


def _random(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------- frequencies


def test_default_inv_freq_is_theta_to_minus_2i_over_d():
    inv_freq, factor = rope_frequencies(64, 10_000.0, None, seq_len=128)
    assert inv_freq.shape == (32,) and inv_freq.dtype == np.float64
    np.testing.assert_allclose(inv_freq, _reference_inv_freq(64, 10_000.0), rtol=1e-13)
    assert factor == 1.0
    # rope_type "default" is the same as no scaling.
    same, _ = rope_frequencies(64, 10_000.0, {"rope_type": "default"}, seq_len=128)
    np.testing.assert_array_equal(same, inv_freq)


def test_linear_inv_freq_is_default_divided_by_factor():
    inv_freq, factor = rope_frequencies(64, 10_000.0, {"rope_type": "linear", "factor": 4.0}, 128)
    np.testing.assert_allclose(inv_freq, _reference_inv_freq(64, 10_000.0) / 4.0, rtol=1e-13)
    assert factor == 1.0


def test_linear_rope_at_position_p_equals_default_rope_at_p_over_s():
    s, d = 4.0, 32
    x = jnp.asarray(_random((2, 24, 3, d)))
    positions = jnp.asarray(np.stack([np.arange(24), 5 * np.arange(24) + 3]), jnp.int32)
    linear, _ = rope_frequencies(d, 10_000.0, {"rope_type": "linear", "factor": s}, 128)
    default, _ = rope_frequencies(d, 10_000.0, None, 128)
    got = apply_rope(x, positions, linear)
    want = apply_rope(x, positions.astype(jnp.float32) / s, default)  # fractional positions
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert not np.allclose(got, apply_rope(x, positions, default), atol=1e-2)


def test_dynamic_is_unchanged_up_to_original_length():
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}
    default = _reference_inv_freq(64, 10_000.0)
    for seq_len in (1, 1000, 2048):
        inv_freq, factor = rope_frequencies(64, 10_000.0, scaling, seq_len)
        np.testing.assert_allclose(inv_freq, default, rtol=1e-13)
        assert factor == 1.0


def test_dynamic_beyond_original_length_uses_ntk_base():
    d, theta, s, l0, length = 64, 10_000.0, 2.0, 2048, 8192
    scaling = {"rope_type": "dynamic", "factor": s}
    inv_freq, factor = rope_frequencies(d, theta, scaling, length,
                                        original_max_position_embeddings=l0)
    theta_new = theta * ((s * length / l0) - (s - 1)) ** (d / (d - 2))  # 10000 * 3^(32/31)
    np.testing.assert_allclose(inv_freq, _reference_inv_freq(d, theta_new), rtol=1e-12)
    assert factor == 1.0
    # A longer length gives a larger base: every non-constant frequency gets lower.
    longer, _ = rope_frequencies(d, theta, scaling, 2 * length, original_max_position_embeddings=l0)
    assert np.all(longer[1:] < inv_freq[1:]) and longer[0] == inv_freq[0] == 1.0


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


def test_yarn_keeps_high_frequencies_interpolates_low_and_ramps_between():
    d, theta, s, l0 = 128, 10_000.0, 4.0, 4096
    inv_freq, _ = rope_frequencies(d, theta, YARN, seq_len=16384)
    base = _reference_inv_freq(d, theta)
    # dim(r) = d ln(L0 / (2 pi r)) / (2 ln theta): dim(32) = 20.9 -> 20, dim(1) = 45.0 -> 46.
    low = math.floor(d * math.log(l0 / (2 * math.pi * 32)) / (2 * math.log(theta)))
    high = math.ceil(d * math.log(l0 / (2 * math.pi * 1)) / (2 * math.log(theta)))
    assert (low, high) == (20, 46)
    np.testing.assert_allclose(inv_freq[: low + 1], base[: low + 1], rtol=1e-13)  # kept
    np.testing.assert_allclose(inv_freq[high:], base[high:] / s, rtol=1e-13)  # interpolated
    for i in range(low + 1, high):
        ramp = (i - low) / (high - low)
        np.testing.assert_allclose(inv_freq[i], base[i] / s * ramp + base[i] * (1 - ramp),
                                   rtol=1e-13)
    ratio = base / inv_freq  # grows monotonically from 1 to s across the ramp
    assert np.all(np.diff(ratio) >= -1e-12) and 1 < ratio[30] < s


def test_yarn_attention_factor_is_0_1_ln_s_plus_1():
    for s in (2.0, 4.0, 16.0):
        _, factor = rope_frequencies(128, 10_000.0, dict(YARN, factor=s), 4096)
        assert factor == pytest.approx(0.1 * math.log(s) + 1.0, rel=1e-14)
    _, factor = rope_frequencies(128, 10_000.0, dict(YARN, factor=1.0), 4096)
    assert factor == 1.0


def test_yarn_given_attention_factor_overrides():
    _, factor = rope_frequencies(128, 10_000.0, dict(YARN, attention_factor=1.5), 4096)
    assert factor == 1.5


def test_yarn_mscale_pair_gives_ratio_of_mscales():
    # Hugging Face extension (DeepSeek configs): mscale(s, a) / mscale(s, b).
    scaling = dict(YARN, mscale=1.0, mscale_all_dim=0.5)
    _, factor = rope_frequencies(128, 10_000.0, scaling, 4096)
    ln_s = math.log(4.0)
    assert factor == pytest.approx((0.1 * ln_s + 1) / (0.05 * ln_s + 1), rel=1e-14)


def test_llama3_three_wavelength_regimes():
    d, theta, s, l0, low_ff, high_ff = 128, 500_000.0, 8.0, 8192, 1.0, 4.0
    scaling = {"rope_type": "llama3", "factor": s, "low_freq_factor": low_ff,
               "high_freq_factor": high_ff, "original_max_position_embeddings": l0}
    inv_freq, factor = rope_frequencies(d, theta, scaling, seq_len=131072)
    assert factor == 1.0
    base = _reference_inv_freq(d, theta)
    wavelength = 2 * np.pi / base
    long = wavelength > l0 / low_ff  # > 8192
    short = wavelength < l0 / high_ff  # < 2048
    middle = ~long & ~short
    assert long.sum() > 0 and short.sum() > 0 and middle.sum() > 0
    np.testing.assert_allclose(inv_freq[short], base[short], rtol=1e-13)
    np.testing.assert_allclose(inv_freq[long], base[long] / s, rtol=1e-13)
    t = (l0 / wavelength[middle] - low_ff) / (high_ff - low_ff)
    assert np.all((t > 0) & (t < 1))
    np.testing.assert_allclose(
        inv_freq[middle], (1 - t) * base[middle] / s + t * base[middle], rtol=1e-13
    )
    # Llama 3.1's defaults (low 1, high 4) are filled in when absent.
    defaults, _ = rope_frequencies(d, theta, {"rope_type": "llama3", "factor": s}, 1, l0)
    np.testing.assert_array_equal(defaults, inv_freq)


def test_scalings_needing_original_length_use_the_fallback():
    yarn_l0 = dict(YARN, original_max_position_embeddings=1024)
    with_l0, _ = rope_frequencies(64, 10_000.0, yarn_l0, 1)
    fallback, _ = rope_frequencies(64, 10_000.0, {"rope_type": "yarn", "factor": 4.0}, 1, 1024)
    np.testing.assert_array_equal(with_l0, fallback)
    # A value in the dict wins over the fallback.
    dict_wins, _ = rope_frequencies(64, 10_000.0, yarn_l0, 1, 99)
    np.testing.assert_array_equal(with_l0, dict_wins)


def test_rope_frequencies_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        rope_frequencies(63, 10_000.0, None, 128)


# ----------------------------------------------------------------------------- apply_rope


def test_apply_rope_rotate_half_layout():
    # A unit vector on dimension i must rotate into dimension i + d/2 (Hugging Face Llama).
    d, i, p = 16, 3, 5
    inv_freq, _ = rope_frequencies(d, 10_000.0, None, 8)
    x = np.zeros((1, 1, 1, d), np.float32)
    x[..., i] = 1.0
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.array([[p]], jnp.int32), inv_freq))[0, 0, 0]
    angle = p * inv_freq[i]
    expected = np.zeros(d)
    expected[i], expected[i + d // 2] = math.cos(angle), math.sin(angle)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_apply_rope_preserves_norm_of_each_pair():
    d = 32
    x = _random((2, 40, 4, d), seed=1)
    positions = np.tile(np.arange(40, dtype=np.int32) * 37, (2, 1))
    inv_freq, _ = rope_frequencies(d, 10_000.0, None, 2048)
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))

    def pair_norm(a):
        return np.hypot(a[..., : d // 2], a[..., d // 2:])

    np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, x, atol=1e-2)  # it did rotate


def test_apply_rope_attention_factor_scales_output():
    d = 16
    x = jnp.asarray(_random((1, 8, 2, d), seed=2))
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    inv_freq, _ = rope_frequencies(d, 10_000.0, None, 8)
    np.testing.assert_allclose(
        apply_rope(x, positions, inv_freq, attention_factor=1.3),
        1.3 * apply_rope(x, positions, inv_freq), rtol=1e-6, atol=1e-6)


def test_apply_rope_scores_depend_only_on_relative_position():
    d, delta = 64, 11
    q = _random((d,), seed=3)
    k = _random((d,), seed=4)
    inv_freq, _ = rope_frequencies(d, 10_000.0, None, 4096)
    shifts = np.array([0, 1, 7, 100, 1000], np.int32)

    def rotate(vec, pos):  # the same vector at several positions: [1, n, 1, d]
        x = jnp.asarray(np.tile(vec, (1, len(pos), 1, 1)))
        return np.asarray(apply_rope(x, jnp.asarray(pos)[None], inv_freq))[0, :, 0]

    scores = np.sum(rotate(q, shifts + delta) * rotate(k, shifts), axis=-1)
    np.testing.assert_allclose(scores, scores[0], atol=2e-3 * np.linalg.norm(q) * np.linalg.norm(k))
    other = np.sum(rotate(q, shifts + delta + 5) * rotate(k, shifts), axis=-1)
    assert abs(other[0] - scores[0]) > 0.05  # a different offset gives a different score


def test_apply_rope_reads_positions_not_indices():
    d = 16
    x = _random((2, 12, 3, d), seed=5)
    rng = np.random.default_rng(6)
    positions = np.stack([rng.permutation(100)[:12] for _ in range(2)]).astype(np.int32)
    perm = rng.permutation(12)
    inv_freq, _ = rope_frequencies(d, 10_000.0, None, 100)
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))
    out_perm = np.asarray(apply_rope(jnp.asarray(x[:, perm]), jnp.asarray(positions[:, perm]),
                                     inv_freq))
    np.testing.assert_allclose(out_perm, out[:, perm], rtol=1e-6, atol=1e-6)


def test_apply_rope_keeps_dtype_and_jits():
    d = 16
    inv_freq, _ = rope_frequencies(d, 10_000.0, None, 8)
    x = jnp.asarray(_random((1, 8, 2, d), seed=7))
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    out = jax.jit(lambda a, p: apply_rope(a, p, inv_freq))(x.astype(jnp.bfloat16), positions)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    np.testing.assert_allclose(out.astype(jnp.float32), apply_rope(x, positions, inv_freq),
                               atol=5e-2)


def test_apply_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(jnp.zeros((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32), np.ones(2))


# ----------------------------------------------------------------------------- normalize


def test_normalize_none_and_default_give_none():
    assert normalize_rope_scaling(None) is None
    assert normalize_rope_scaling({"rope_type": "default"}) is None
    assert normalize_rope_scaling('{"type": "default"}') is None
    assert normalize_rope_scaling("null") is None


def test_normalize_accepts_old_type_key():
    assert (normalize_rope_scaling({"type": "linear", "factor": 2})
            == {"rope_type": "linear", "factor": 2.0})


def test_normalize_accepts_json_string_and_configdict():
    want = {"rope_type": "linear", "factor": 4.0}
    assert normalize_rope_scaling('{"rope_type": "linear", "factor": 4.0}') == want
    assert normalize_rope_scaling(ml_collections.ConfigDict(want)) == want


def test_normalize_fills_defaults_and_is_idempotent():
    out = normalize_rope_scaling({"rope_type": "yarn", "factor": 4},
                                 original_max_position_embeddings=2048)
    assert out == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                   "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 0.1 * math.log(4) + 1,
                   "mscale": None, "mscale_all_dim": None, "truncate": True}
    assert normalize_rope_scaling(out) == out
    assert json.loads(json.dumps(out)) == out  # plain, serializable


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "ntk-by-magic", "factor": 2.0}, "unknown or unsupported rope_type"),
    ({"rope_type": "su", "factor": 2.0}, "unknown or unsupported rope_type"),
    ({"rope_type": "longrope", "factor": 2.0}, "needs a 'short_factor'"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [], "long_factor": [1.0]},
     "short_factor must be a non-empty list"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}, "truncate must be true or false"),
    ({"rope_type": "yarn", "factor": 2.0, "mscale": "1"}, "mscale must be a number"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0}, "attention_factor must be a "
     "positive number"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": -1}, "low_freq_factor must be a "
     "positive number"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0, 2.0],
      "long_factor": [1.0]}, "differ in length"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0, -2.0],
      "long_factor": [1.0, 1.0]}, "positive numbers"),
    ({"factor": 2.0}, "needs a 'rope_type'"),
    ({"rope_type": "linear"}, "needs a 'factor'"),
    ({"rope_type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ({"rope_type": "yarn", "factor": 0.9}, "factor must be a number >= 1"),
    ({"rope_type": "llama3", "factor": "8"}, "factor must be a number >= 1"),
    ({"rope_type": "dynamic", "factor": float("nan")}, "factor must be a number >= 1"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 8}, "unknown keys"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, "model.rope.theta"),
    ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "conflicting"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 32}, "beta_fast"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1},
     "high_freq_factor"),
    ('{"rope_type": "linear", factor: 2}', "not valid JSON"),
    ("[1, 2]", "must be None, a dict"),
])
def test_normalize_rejects_invalid_scaling(scaling, message):
    with pytest.raises(ValueError, match=message):
        normalize_rope_scaling(scaling, original_max_position_embeddings=1024)


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "llama3"])
def test_original_length_is_required_where_needed(rope_type):
    scaling = {"rope_type": rope_type, "factor": 2.0}
    # normalize alone leaves L0 open for the caller's fallback ...
    assert normalize_rope_scaling(scaling)["original_max_position_embeddings"] is None
    assert normalize_rope_scaling(scaling, 512)["original_max_position_embeddings"] == 512
    # ... and computing frequencies without any L0 is an error.
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_frequencies(64, 10_000.0, scaling, seq_len=4096)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        normalize_rope_scaling(dict(scaling, original_max_position_embeddings=0))


# ----------------------------------------------------------------------------- Hugging Face


def _transformers():
    try:
        import torch  # noqa: F401 - only to skip where it is missing
        import transformers
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: F401 - ditto
    except ImportError:
        pytest.skip("transformers not installed")
    import transformers
    return transformers


def _hf_config(transformers, head_dim, theta, rope_scaling, max_position_embeddings):
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rope_theta=theta,
        rope_scaling=None if rope_scaling is None else dict(rope_scaling))


LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 4096,
            "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.6, 3.1],
            "long_factor": [1.0, 1.2, 1.9, 3.5, 7.0, 12.0, 20.0, 31.0]}

# (head_dim, theta, scaling, seq_len, L0). For Hugging Face, "dynamic" reads L0 from
# max_position_embeddings; yarn/llama3 read original_max_position_embeddings.
HF_CASES = {
    "default": (128, 500_000.0, None, 4096, 4096),
    "linear": (64, 10_000.0, {"rope_type": "linear", "factor": 4.0}, 4096, 1024),
    "linear-old-type-key": (64, 10_000.0, {"type": "linear", "factor": 2.5}, 4096, 1024),
    "dynamic-short": (64, 10_000.0, {"rope_type": "dynamic", "factor": 2.0}, 1024, 2048),
    "dynamic-long": (64, 10_000.0, {"rope_type": "dynamic", "factor": 2.0}, 8192, 2048),
    "yarn": (128, 10_000.0, {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 4096}, 16384, 4096),
    "yarn-betas-attention": (64, 1e6, {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                       "beta_slow": 2, "attention_factor": 1.25,
                                       "original_max_position_embeddings": 2048}, 16384, 2048),
    "yarn-mscale": (64, 10_000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                   "mscale_all_dim": 0.707,
                                   "original_max_position_embeddings": 4096}, 163840, 4096),
    "yarn-no-truncate": (64, 150_000.0, {"rope_type": "yarn", "factor": 32.0, "truncate": False,
                                         "original_max_position_embeddings": 4096}, 131072, 4096),
    "llama3.1": (128, 500_000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}, 131072, 8192),
    "llama3-other": (64, 10_000.0, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                    "high_freq_factor": 8.0,
                                    "original_max_position_embeddings": 2048}, 8192, 2048),
    # Phi-3 style: short factors up to L0, long ones beyond; the attention factor from factor
    "longrope-short": (16, 10_000.0, dict(LONGROPE, factor=32.0), 4096, 4096),
    "longrope-long": (16, 10_000.0, dict(LONGROPE, factor=32.0), 4097, 4096),
    "longrope-attention-factor": (16, 10_000.0, dict(LONGROPE, factor=8.0, attention_factor=1.3),
                                  20000, 4096),
    "yarn-deepseek": (64, 10_000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                     "original_max_position_embeddings": 4096}, 163840, 4096),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_inv_freq_and_attention_factor_match_hugging_face(case):
    transformers = _transformers()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta, scaling, seq_len, l0 = HF_CASES[case]
    ours, our_factor = rope_frequencies(head_dim, theta, scaling, seq_len,
                                        original_max_position_embeddings=l0)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        config = _hf_config(transformers, head_dim, theta, None, l0)
        hf_inv_freq, hf_factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
            .compute_default_rope_parameters(config)
    else:
        # max_position_embeddings: the dynamic L0 for HF; the extended length otherwise.
        config = _hf_config(transformers, head_dim, theta, scaling,
                            l0 if rope_type == "dynamic" else max(seq_len, l0 + 1))
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    np.testing.assert_allclose(ours, hf_inv_freq.double().numpy(), rtol=2e-6)  # HF is float32
    assert our_factor == pytest.approx(float(hf_factor), rel=1e-12)


def test_apply_rope_matches_hugging_face_llama_rotary_embedding():
    transformers = _transformers()
    import torch
    from transformers.models.llama import modeling_llama

    head_dim, theta = 32, 10_000.0
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    config = _hf_config(transformers, head_dim, theta, scaling, 2048)
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 16, 3, head_dim)).astype(np.float32)
    positions = np.stack([np.arange(16) * 97, np.arange(16) + 1000]).astype(np.int32)

    inv_freq, factor = rope_frequencies(head_dim, theta, scaling, 2048)
    ours = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(positions), inv_freq, factor))

    q_t = torch.from_numpy(q).transpose(1, 2)  # HF: [batch, heads, length, head_dim]
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(q_t, torch.from_numpy(positions).long())
    theirs, _ = modeling_llama.apply_rotary_pos_emb(q_t, q_t, cos, sin)
    np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), atol=2e-4)
