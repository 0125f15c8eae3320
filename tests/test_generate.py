"""Generation: KV-cache decoding against the full forward, greedy and sampled generation,
EOS, and `main.py --mode generate` on a trained workdir."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evaluation.generate import generate, sample_next
from model.positions import normalize_rope_scaling
from model.transformer import ModelConfig, Transformer
from tests.helpers import small_config
from cli.generate_mode import check_generate_config
from configs.workdir_config import load as workdir_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# float32, GQA (4 query / 2 key-value heads); init_std 0.2 spreads the logits so that
# argmaxes are far from ties
SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2, head_dim=8,
                    mlp_dim=64, l_max=32, dtype="float32", block_q=8, block_k=8,
                    attention="blockwise", init_std=0.2)
# the same parameters (the attention kind draws none); the slow reference of generation
# re-runs sequences of every length, which the blockwise kernel's blocks do not divide
DENSE = dataclasses.replace(SMALL, attention="dense")


def scaling_json(scaling):
    return json.dumps(normalize_rope_scaling(scaling, SMALL.l_max), sort_keys=True)


VARIANTS = {
    "rope": {},
    "rope_linear_x4": {"rope_scaling_json": scaling_json({"rope_type": "linear", "factor": 4})},
    # final length 48 > l_max 32: the frequencies differ from plain RoPE's
    "rope_dynamic_x2": {"rope_scaling_json": scaling_json({"rope_type": "dynamic", "factor": 2})},
    "learned": {"position": "learned"},
    "no_positions": {"position": "none"},
    "multi_head": {"kv_heads": 4},
    "multi_query": {"kv_heads": 1},
    "gpt2_options": {"position": "learned", "norm": "layernorm", "mlp": "gelu_tanh",
                     "qkv_bias": True, "attention_out_bias": True, "mlp_bias": True,
                     "tie_embeddings": False},
}


def make(cfg=SMALL, seed=0):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def tokens(seed, batch=2, length=24):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, SMALL.vocab_size,
                              jnp.int32)


# the fast set keeps plain RoPE; CI runs every variant
@pytest.mark.parametrize("variant", [v if v == "rope" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in sorted(VARIANTS)])
def test_cached_decode_logits_equal_the_full_forward_at_every_step(variant):
    cfg = dataclasses.replace(SMALL, **VARIANTS[variant])
    model = make(cfg)
    length = 32 if cfg.position == "learned" else 48     # learned positions end at l_max
    sequence = tokens(1, length=length)
    full = model(sequence)                                # [2, length, vocab], no cache
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda state, t, cache: nnx.merge(graphdef, state)(t, cache=cache))
    prompt = 8
    cache = model.init_cache(2, length)
    logits, cache = decode(state, sequence[:, :prompt], cache)           # prefill
    np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-5, rtol=0)
    for i in range(prompt, length):                                      # one token a step
        logits, cache = decode(state, sequence[:, i:i + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5, rtol=0,
                                   err_msg=f"position {i}")
    assert int(cache.length) == length


@pytest.mark.slow
def test_logits_without_a_cache_equal_those_before_the_kv_cache():
    """tests/data/logits_before_kv_cache.npz holds the no-cache logits computed by commit
    49eb4f2 (before the cache existed, and before the layers were stacked) for these four
    models and this input. The layers run as a Python loop (model.scan_layers = False),
    eagerly as then: the stacked parameters hold the very values the list of blocks drew.
    Matmuls accumulate in float32, which rounds differently on other CPUs (an AMD EPYC:
    1e-6 of the largest logit, 94% of the elements; a KVM "Intel Xeon Processor": the
    bfloat16 case 2.4e-7, one float32 ulp, in 15% of them), so every case compares to 1e-5
    of the largest logit: still far below any change of the model's maths (bfloat16's own
    rounding is 4e-3)."""
    golden = np.load(os.path.join(REPO, "tests", "data", "logits_before_kv_cache.npz"))
    cases = {
        "rope_dense_f32": dict(position="rope", attention="dense", dtype="float32"),
        "rope_blockwise_bf16": dict(position="rope", attention="blockwise", dtype="bfloat16"),
        "learned_blockwise_f32": dict(position="learned", attention="blockwise", dtype="float32"),
        "yarn_dense_f32": dict(position="rope", attention="dense", dtype="float32",
                               rope_scaling_json=json.dumps(normalize_rope_scaling(
                                   {"rope_type": "yarn", "factor": 4}, 16), sort_keys=True)),
    }
    assert sorted(golden.files) == sorted(cases)
    sequence = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)
    for name, options in cases.items():
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2,
                          head_dim=8, mlp_dim=64, l_max=32, block_q=8, block_k=8,
                          init_std=0.2, scan_layers=False, **options)
        logits = np.asarray(make(cfg)(sequence))
        np.testing.assert_allclose(logits, golden[name], rtol=0,
                                   atol=1e-5 * np.abs(golden[name]).max(), err_msg=name)


def slow_greedy(model, prompt, new_tokens):
    """The reference: re-run the whole sequence (no cache) for every token and take the
    argmax at its last position. The sequence sits in a buffer of the final length (one
    compile); causal attention makes the unfilled tail invisible to it."""
    batch, prompt_len = prompt.shape
    buffer = np.zeros((batch, prompt_len + new_tokens), np.int32)
    buffer[:, :prompt_len] = prompt
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
    for length in range(prompt_len, prompt_len + new_tokens):
        logits = forward(state, jnp.asarray(buffer))[:, length - 1]
        buffer[:, length] = np.asarray(jnp.argmax(logits, -1))
    return buffer[:, prompt_len:]


@pytest.mark.slow
def test_greedy_generate_equals_the_argmax_of_a_full_forward_per_token():
    model = make(DENSE)
    prompt = np.asarray(tokens(2, length=8))
    out = generate(model, prompt, 16)
    assert out.shape == (2, 16) and out.dtype == np.int32
    np.testing.assert_array_equal(out, slow_greedy(model, prompt, 16))
    np.testing.assert_array_equal(generate(model, prompt[0], 16), out[0])   # 1-D prompt


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 3, 7])
def test_the_prompt_prefilled_in_pieces_gives_the_tokens_of_one_prefill(chunk):
    model = make(DENSE)
    prompt = np.asarray(tokens(2, length=8))
    np.testing.assert_array_equal(generate(model, prompt, 6, prefill_chunk=chunk),
                                  generate(model, prompt, 6, prefill_chunk=8))


def test_sampling_is_the_same_for_a_seed_and_changes_with_the_seed():
    model = make(DENSE)
    prompt = np.asarray(tokens(3, length=8))
    first = generate(model, prompt, 16, temperature=1.0, top_p=0.95, seed=7)
    np.testing.assert_array_equal(generate(model, prompt, 16, temperature=1.0, top_p=0.95,
                                           seed=7), first)
    assert not np.array_equal(generate(model, prompt, 16, temperature=1.0, top_p=0.95,
                                       seed=8), first)
    assert not np.array_equal(first, generate(model, prompt, 16))          # not greedy


def test_a_tiny_top_p_keeps_only_the_most_likely_token_so_it_equals_greedy():
    model = make(DENSE)
    prompt = np.asarray(tokens(4, length=8))
    np.testing.assert_array_equal(generate(model, prompt, 16, temperature=1.0, top_p=1e-6,
                                           seed=3), generate(model, prompt, 16))


def test_temperature_zero_is_greedy_whatever_top_p_and_seed():
    model = make(DENSE)
    prompt = np.asarray(tokens(5, length=8))
    greedy = generate(model, prompt, 16)
    for top_p, seed in ((0.5, 1), (0.01, 2), (1.0, 3)):
        np.testing.assert_array_equal(generate(model, prompt, 16, temperature=0.0, top_p=top_p,
                                               seed=seed), greedy)


def test_nucleus_sampling_draws_only_from_the_smallest_set_reaching_top_p():
    probs = jnp.asarray([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(probs)
    for top_p, allowed in ((0.5, {1}), (0.7, {1, 3}), (0.8, {1, 3}), (0.81, {1, 2, 3}),
                           (1.0, {0, 1, 2, 3})):
        drawn = {int(sample_next(logits, jax.random.key(i), 1.0, top_p, greedy=False,
                                 nucleus=top_p < 1)[0]) for i in range(200)}
        assert drawn == allowed, (top_p, drawn)


def test_generation_stops_at_eos_and_includes_it():
    model = make(DENSE)
    prompt = np.asarray(tokens(6, length=8))[0]
    free = generate(model, prompt, 16)
    eos = int(free[5])
    first = int(np.flatnonzero(free == eos)[0])
    stopped = generate(model, prompt, 16, eos_id=eos)
    np.testing.assert_array_equal(stopped, free[:first + 1])


def test_a_row_that_reached_eos_is_filled_with_eos_until_every_row_stops():
    model = make(DENSE)
    prompt = np.asarray(tokens(7, length=8))
    free = generate(model, prompt, 16)
    eos = int(free[0, 2])
    assert eos not in free[1, :4], "pick another seed: row 1 must run longer"
    out = generate(model, prompt, 16, eos_id=eos)
    first = int(np.flatnonzero(free[0] == eos)[0])
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == eos).all()
    ends = [int(np.flatnonzero(row == eos)[0]) if eos in row else 15 for row in free]
    assert out.shape[1] == max(ends) + 1
    np.testing.assert_array_equal(out[1], free[1, :out.shape[1]])


def test_learned_positions_cannot_generate_beyond_l_max():
    model = make(dataclasses.replace(SMALL, position="learned"))
    with pytest.raises(ValueError, match="l_max=32"):
        generate(model, np.zeros(8, np.int32), 25)


def test_impossible_generate_settings_fail_with_one_line():
    config = small_config()
    with pytest.raises(ValueError, match="generate.prompt"):
        check_generate_config(config.generate)
    config.generate.prompt = "x"
    config.generate.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        check_generate_config(config.generate)


def test_the_run_config_is_read_back_from_config_json_with_overrides(tmp_path):
    config = small_config()
    config.model.rope.scaling = {"rope_type": "linear", "factor": 2.0}
    config.eval.lengths = (32, 64)
    saved = json.loads(config.to_json_best_effort())
    del saved["generate"]["seed"]                      # a key the run predates: its default
    (tmp_path / "config.json").write_text(json.dumps(saved))
    read = workdir_config(str(tmp_path), {"generate.prompt": "hello", "generate.top_p": 0.5})
    expected = config.to_dict()
    expected["generate"].update(prompt="hello", top_p=0.5)
    got = read.to_dict()
    got["model"]["rope"]["scaling"] = dict(got["model"]["rope"]["scaling"])
    assert got == expected


def run_generate(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", "--mode", "generate", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_main_generate_writes_prompt_ids_output_ids_and_text(trained_workdir, tmp_path):
    output = tmp_path / "out" / "generated.json"
    result = run_generate("--workdir", trained_workdir, "--config.generate.prompt=def main(",
                          "--config.generate.max_new_tokens=12",
                          f"--config.generate.output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert sorted(written) == ["output_ids", "prompt_ids", "text"]
    assert written["prompt_ids"] == list(b"def main(")                 # byte tokenizer
    assert len(written["output_ids"]) == 12                            # no EOS for bytes
    assert written["text"] == bytes(written["output_ids"]).decode("utf-8", errors="replace")
    assert written["text"] in result.stdout


@pytest.mark.slow
def test_main_generate_with_an_explicit_config_matches_the_workdirs_config_json(
        trained_workdir, tmp_path):
    outputs = []
    for i, config_args in enumerate(([], ["--config", "tests/small_config.py"])):
        output = tmp_path / f"{i}.json"
        result = run_generate("--workdir", trained_workdir, *config_args,
                              "--config.generate.prompt=import os", "--config.generate.seed=3",
                              "--config.generate.max_new_tokens=6",
                              "--config.generate.temperature=0.8",
                              f"--config.generate.output={output}")
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(json.loads(output.read_text()))
    assert outputs[0] == outputs[1]


def test_main_generate_without_a_workdir_config_says_so(tmp_path):
    result = run_generate("--workdir", str(tmp_path), "--config.generate.prompt=x")
    assert result.returncode == 2
    assert "config.json" in result.stderr and "--config" in result.stderr


def test_generation_stops_at_the_first_of_several_eos_ids():
    model = make(DENSE)
    prompt = np.asarray(tokens(6, length=8))[0]
    free = generate(model, prompt, 16)
    eos = [int(free[9]), int(free[4])]
    first = min(int(np.flatnonzero(free == e)[0]) for e in eos)
    np.testing.assert_array_equal(generate(model, prompt, 16, eos_id=eos), free[:first + 1])


@pytest.mark.slow
def test_main_generate_on_four_devices_writes_the_tokens_of_one_device(trained_workdir, tmp_path):
    """generate.seq = 4: the prompt prefilled with ring attention, the cache split over 4."""
    written = []
    for seq in (1, 4):
        output = tmp_path / f"seq{seq}.json"
        result = run_generate("--workdir", trained_workdir, "--config.generate.prompt=import os",
                              "--config.generate.max_new_tokens=10", f"--config.generate.seq={seq}",
                              f"--config.generate.output={output}")
        assert result.returncode == 0, result.stderr[-3000:]
        written.append(json.loads(output.read_text()))
    assert written[0] == written[1]


@pytest.mark.slow
def test_main_generate_stops_at_the_configured_eos_ids(trained_workdir, tmp_path):
    free = tmp_path / "free.json"
    result = run_generate("--workdir", trained_workdir, "--config.generate.prompt=def f(x):",
                          "--config.generate.max_new_tokens=12", f"--config.generate.output={free}")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = json.loads(free.read_text())["output_ids"]
    stopped = tmp_path / "stopped.json"
    result = run_generate("--workdir", trained_workdir, "--config.generate.prompt=def f(x):",
                          "--config.generate.max_new_tokens=12",
                          f"--config.generate.eos_ids=({ids[5]},)",
                          f"--config.generate.output={stopped}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(stopped.read_text())["output_ids"] == ids[:ids.index(ids[5]) + 1]


@pytest.mark.parametrize("variant", ["rope", "learned", "rope_linear_x4"])
@pytest.mark.parametrize("length,pad_to", [(5, 8), (8, 8), (9, 24), (1, 7)])
def test_a_prompt_padded_to_a_bucket_generates_the_tokens_of_the_exact_prompt(
        variant, length, pad_to):
    model = make(dataclasses.replace(DENSE, **VARIANTS[variant]))
    prompt = np.asarray(tokens(11 + length, length=length))
    for options in ({}, {"temperature": 0.9, "top_p": 0.8, "seed": 3}):
        np.testing.assert_array_equal(generate(model, prompt, 6, pad_to=pad_to, **options),
                                      generate(model, prompt, 6, **options))


def test_prompts_padded_to_one_bucket_share_one_compiled_function():
    from evaluation.generate import _generate
    model = make(DENSE)
    generate(model, np.asarray(tokens(20, length=3)), 4, pad_to=16)
    compiled = _generate._cache_size()
    for length in (4, 9, 15):
        generate(model, np.asarray(tokens(20 + length, length=length)), 4, pad_to=16)
    assert _generate._cache_size() == compiled


def test_padding_under_the_dynamic_rope_scaling_or_below_the_prompt_is_refused():
    dynamic = make(dataclasses.replace(DENSE, **VARIANTS["rope_dynamic_x2"]))
    with pytest.raises(ValueError, match="dynamic RoPE scaling"):
        generate(dynamic, np.asarray(tokens(1, length=4)), 4, pad_to=8)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        generate(make(DENSE), np.asarray(tokens(1, length=9)), 4, pad_to=8)
