"""Specification of the Hugging Face families at any length: sliding windows (Mistral,
Qwen2 per layer), longrope and YaRN's full parameter set, each against `transformers`
itself (tiny random float32 models built on CPU), in and out.

Lengths are chosen to divide nothing (333) and to straddle the windows (64) and the
rope scalings' original length (128: 64 tokens below it, 333 beyond it).
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import hf  # noqa: E402
from model.positions import normalize_rope_scaling  # noqa: E402
from model.transformer import ModelConfig  # noqa: E402
from tests.test_hf import (SMALL, VOCAB, hf_logits, llama_config, mistral_config,  # noqa: E402
                           our_logits, qwen2_config, random_model, relative_error, save_hf,
                           tokens)

WINDOW = 64
LONG = 333
# a Llama whose scaling is relative to 128 tokens: 64 below it, 333 beyond it
ORIGINAL = 128
HALF = SMALL["hidden_size"] // SMALL["num_attention_heads"] // 2      # frequencies: head_dim / 2
ROPES = {
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
                 "factor": 4.0,
                 "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                 "long_factor": [1.0 + 1.5 * i for i in range(HALF)]},
    "longrope_phi3_style": {"rope_type": "longrope",     # no factor: the ratio of lengths
                            "short_factor": [1.0] * HALF,
                            "long_factor": [2.0 + i for i in range(HALF)]},
    "yarn_deepseek": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707,
                      "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0,
                      "truncate": False, "original_max_position_embeddings": ORIGINAL},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2,
                              "original_max_position_embeddings": ORIGINAL},
}


def rope_llama(rope):
    scaling = dict(ROPES[rope])
    kw = {}
    if rope == "longrope_phi3_style":
        kw["original_max_position_embeddings"] = ORIGINAL     # Phi-3 puts L0 at the top level
    return llama_config(max_position_embeddings=4 * ORIGINAL,
                        rope_parameters={"rope_theta": 10000.0, **scaling}, **kw)


def assert_logits_match(model, reference, length, tolerance=1e-4, seed=0):
    ids = tokens(seed, batch=2, length=length)
    assert relative_error(our_logits(model, ids), hf_logits(reference, ids)) <= tolerance


# ----------------------------------------------------------------------------- any length


@pytest.mark.parametrize("length", [1, 7, 333])
def test_an_imported_llama_scores_any_length_with_the_blockwise_kernel(tmp_path, length):
    path, reference = save_hf(tmp_path, llama_config(max_position_embeddings=512))
    model = hf.load_model(path, dtype="float32", block_q=256, block_k=256)
    assert_logits_match(model, reference, length)


# ----------------------------------------------------------------------------- windows


def test_mistral_sliding_window_logits_match_transformers(tmp_path):
    path, reference = save_hf(tmp_path, mistral_config(sliding_window=WINDOW,
                                                       max_position_embeddings=512))
    config, _ = hf.load_config(path)
    assert config.sliding_window == WINDOW and config.layer_types is None
    model = hf.load_model(path, dtype="float32", block_q=32, block_k=32)
    assert_logits_match(model, reference, LONG)


def test_mistral_without_a_window_key_gets_transformers_default_of_4096(tmp_path):
    path, _ = save_hf(tmp_path, mistral_config(sliding_window=WINDOW))
    from tests.test_hf import rewrite_config
    rewrite_config(path, sliding_window=None)                # the key removed from config.json
    assert hf.load_config(path)[0].sliding_window == 4096


def test_qwen2_window_on_the_layers_from_max_window_layers_matches_transformers(tmp_path):
    config = qwen2_config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                          max_position_embeddings=512)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    path, reference = save_hf(tmp_path, config)
    ours, _ = hf.load_config(path)
    assert ours.layer_windows() == (None, WINDOW)
    model = hf.load_model(path, dtype="float32", block_q=32, block_k=32)
    assert_logits_match(model, reference, LONG)


def test_qwen2_explicit_layer_types_are_followed(tmp_path):
    config = qwen2_config(use_sliding_window=True, sliding_window=WINDOW,
                          layer_types=["sliding_attention", "full_attention"],
                          max_position_embeddings=512)
    path, reference = save_hf(tmp_path, config)
    assert hf.load_config(path)[0].layer_windows() == (WINDOW, None)
    assert_logits_match(hf.load_model(path, dtype="float32", block_q=32, block_k=32),
                        reference, LONG)


def test_qwen2_without_use_sliding_window_has_no_window(tmp_path):
    path, _ = save_hf(tmp_path, qwen2_config(use_sliding_window=False, sliding_window=WINDOW))
    config, _ = hf.load_config(path)
    assert config.sliding_window is None and config.layer_windows() == (None, None)


@pytest.mark.parametrize("arch,make", [("mistral", lambda: mistral_config(
    sliding_window=WINDOW, max_position_embeddings=512)), ("qwen2", lambda: qwen2_config(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        max_position_embeddings=512))])
def test_windowed_export_writes_the_same_keys_and_transformers_reloads_equal_logits(
        tmp_path, arch, make):
    path, _ = save_hf(tmp_path, make())
    model = hf.load_model(path, dtype="float32", attention="dense")
    out_dir = hf.save_model(model, str(tmp_path / "export"))
    with open(f"{path}/config.json") as f:
        original = json.load(f)
    with open(f"{out_dir}/config.json") as f:
        written = json.load(f)
    keys = ["sliding_window"] + (["use_sliding_window", "layer_types"] if arch == "qwen2" else [])
    assert {k: written[k] for k in keys} == {k: original[k] for k in keys}
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = tokens(4, length=LONG)
    assert relative_error(hf_logits(exported, ids), our_logits(model, ids)) <= 1e-5


def test_a_model_trained_here_with_a_window_exports_as_mistral(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2,
                      head_dim=16, mlp_dim=96, l_max=128, dtype="float32", attention="dense",
                      sliding_window=WINDOW)
    model = random_model(cfg)
    out_dir = hf.save_model(model, str(tmp_path / "export"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(exported).__name__ == "MistralForCausalLM"
    ids = tokens(5, length=LONG)
    assert relative_error(hf_logits(exported, ids), our_logits(model, ids)) <= 1e-5


def test_per_layer_windows_without_qkv_biases_have_no_architecture_to_export_to(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2,
                      head_dim=16, mlp_dim=96, l_max=128, dtype="float32", sliding_window=8,
                      layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(ValueError, match="no Hugging Face architecture computes this model"):
        hf.save_model(random_model(cfg), str(tmp_path / "export"))


@pytest.mark.parametrize("window", [0, -4, 2.5, True])
def test_a_window_that_is_not_a_positive_integer_is_refused_in_one_line(tmp_path, window):
    path, _ = save_hf(tmp_path, mistral_config(sliding_window=WINDOW))
    from tests.test_hf import rewrite_config
    rewrite_config(path, sliding_window=window)
    with pytest.raises(ValueError, match=r"sliding_window .* is not valid; supported") as info:
        hf.load_config(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- rope types


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("length", [64, LONG])
def test_llama_with_each_rope_type_matches_transformers(tmp_path, rope, length):
    path, reference = save_hf(tmp_path, rope_llama(rope))
    model = hf.load_model(path, dtype="float32", block_q=64, block_k=64)
    assert_logits_match(model, reference, length)


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_each_rope_type_round_trips_through_export(tmp_path, rope):
    path, _ = save_hf(tmp_path, rope_llama(rope))
    model = hf.load_model(path, dtype="float32", attention="dense")
    out_dir = hf.save_model(model, str(tmp_path / "export"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    for length in (64, LONG):
        ids = tokens(6, length=length)
        assert relative_error(hf_logits(exported, ids), our_logits(model, ids)) <= 1e-5
    reloaded, _ = hf.load_config(out_dir)
    assert reloaded.rope_scaling == model.cfg.rope_scaling and reloaded.l_max == ORIGINAL


def test_longrope_scaling_normalises_its_defaults():
    scaling = normalize_rope_scaling(ROPES["longrope"])
    assert scaling["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(128)))
    assert normalize_rope_scaling(scaling) == scaling


# ----------------------------------------------------------------------------- main.py


def main_py(*args):
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "main.py", *args], cwd=repo, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    # llama3 relative to 96 tokens: its default evaluation lengths divide no block
    lambda: llama_config(vocab_size=256, max_position_embeddings=384, rope_parameters={
        "rope_theta": 10000.0, "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 96}),
    lambda: mistral_config(vocab_size=256, sliding_window=24, max_position_embeddings=256),
], ids=["llama3_original_96", "mistral_window_24"])
def test_import_then_generate_any_prompt_length_on_one_device_and_a_split_cache(tmp_path, make):
    import json
    path, _ = save_hf(tmp_path, make())
    workdir = str(tmp_path / "w")
    result = main_py("--mode", "import", "--hf_dir", path, "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = json.loads((tmp_path / "w" / "config.json").read_text())["model"]
    assert imported["sliding_window"] == hf.load_config(path)[0].sliding_window
    written = []
    for seq in (1, 4):
        output = tmp_path / f"seq{seq}.json"
        result = main_py("--mode", "generate", "--workdir", workdir,
                         "--config.generate.prompt=an odd prompt of 37 bytes: no blocks!",
                         "--config.generate.max_new_tokens=9", f"--config.generate.seq={seq}",
                         "--config.model.dtype=float32",
                         f"--config.generate.output={output}")
        assert result.returncode == 0, result.stderr[-3000:]
        written.append(json.loads(output.read_text()))
    assert len(written[0]["prompt_ids"]) == 37 and len(written[0]["output_ids"]) == 9
    assert written[0] == written[1]
