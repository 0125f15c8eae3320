"""Specification of model/hf.py: Hugging Face checkpoints in and out.

Tiny random models are built with `transformers` itself on CPU (nothing is downloaded),
saved with save_pretrained in float32, and their logits compared with ours: relative error
(to the largest logit) <= 1e-4 on import, <= 1e-5 after export (same weights, same maths).
"""
import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data.tokenizers import ByteTokenizer, HuggingFaceTokenizer, write_byte_tokenizer_json  # noqa: E402
from model import hf  # noqa: E402
from model.transformer import ModelConfig, Transformer  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from parallel import model_on_mesh  # noqa: E402
from parallel.ring_attention import make_ring_attention  # noqa: E402

VOCAB, LENGTH = 128, 32
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def llama_config(**kw):
    return transformers.LlamaConfig(**{**SMALL, "tie_word_embeddings": False, **kw})


def mistral_config(**kw):
    return transformers.MistralConfig(**{**SMALL, "sliding_window": None,
                                         "num_key_value_heads": 4, **kw})


def qwen2_config(**kw):
    return transformers.Qwen2Config(**{**SMALL, "tie_word_embeddings": True, **kw})


def gpt2_config(**kw):
    return transformers.GPT2Config(**{"n_embd": 64, "n_layer": 2, "n_head": 4,
                                      "vocab_size": VOCAB, "n_positions": 64,
                                      "bos_token_id": None, "eos_token_id": None, **kw})


CONFIGS = {"llama": llama_config, "mistral": mistral_config, "qwen2": qwen2_config,
           "gpt2": gpt2_config}


def save_hf(tmp_path, config, seed=0, std=0.2, dtype=torch.float32, name="hf"):
    """A random `transformers` model of `config` saved to tmp_path/name; (path, model)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    model = model.to(dtype)
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path, model


def tokens(seed=0, batch=2, length=LENGTH):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids):
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def relative_error(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def rewrite_config(path, **changes):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(config_path, "w") as f:
        json.dump(config, f)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_imported_logits_match_transformers(tmp_path, arch):
    path, reference = save_hf(tmp_path, CONFIGS[arch]())
    model = hf.load_model(path, attention="dense")
    ids = tokens()
    assert relative_error(our_logits(model, ids), hf_logits(reference, ids)) <= 1e-4


def test_config_mapping_of_each_architecture(tmp_path):
    expected = {
        "llama": ("LlamaForCausalLM", dict(kv_heads=2, tie_embeddings=False, qkv_bias=False,
                                           position="rope", norm="rmsnorm", mlp="swiglu")),
        "mistral": ("MistralForCausalLM", dict(kv_heads=4, tie_embeddings=False, qkv_bias=False)),
        "qwen2": ("Qwen2ForCausalLM", dict(kv_heads=2, tie_embeddings=True, qkv_bias=True,
                                           attention_out_bias=False, mlp_bias=False)),
        "gpt2": ("GPT2LMHeadModel", dict(kv_heads=4, tie_embeddings=True, qkv_bias=True,
                                         attention_out_bias=True, mlp_bias=True, l_max=64,
                                         position="learned", norm="layernorm", mlp="gelu_tanh",
                                         mlp_dim=256, norm_eps=1e-5)),
    }
    for arch, (name, fields) in expected.items():
        path, _ = save_hf(tmp_path, CONFIGS[arch](), name=arch)
        config, architecture = hf.load_config(path)
        assert architecture == name
        assert (config.vocab_size, config.d_model, config.n_layers, config.q_heads,
                config.head_dim, config.param_dtype) == (VOCAB, 64, 2, 4, 16, "float32")
        assert {k: getattr(config, k) for k in fields} == fields, arch


def test_llama_attention_and_mlp_biases_map_onto_the_bias_options(tmp_path):
    path, reference = save_hf(tmp_path, llama_config(attention_bias=True, mlp_bias=True))
    config, _ = hf.load_config(path)
    assert (config.qkv_bias, config.attention_out_bias, config.mlp_bias) == (True, True, True)
    model = hf.load_model(path, attention="dense")
    ids = tokens()
    assert relative_error(our_logits(model, ids), hf_logits(reference, ids)) <= 1e-4


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("rope", list(ROPE_CASES))
def test_each_rope_type_matches_transformers_beyond_the_original_length(tmp_path, rope):
    # max_position_embeddings 16 < LENGTH: dynamic rescales, yarn / llama3 interpolate.
    kw = {"max_position_embeddings": 16 if rope in ("default", "linear", "dynamic") else 64,
          "rope_theta": 500.0}
    if ROPE_CASES[rope]:
        kw["rope_scaling"] = dict(ROPE_CASES[rope])
    path, reference = save_hf(tmp_path, llama_config(**kw))
    config, _ = hf.load_config(path)
    assert config.l_max == 16 and config.rope_theta == 500.0
    assert (config.rope_scaling or {"rope_type": "default"})["rope_type"] == rope
    model = hf.load_model(path, attention="dense")
    ids = tokens()
    assert relative_error(our_logits(model, ids), hf_logits(reference, ids)) <= 1e-4


def test_older_rope_theta_and_rope_scaling_style_reads_the_same(tmp_path):
    scaling = ROPE_CASES["llama3"]
    path, _ = save_hf(tmp_path, llama_config(rope_theta=500.0, rope_scaling=dict(scaling)))
    with open(os.path.join(path, "config.json")) as f:
        written = json.load(f)
    assert written["rope_parameters"]["rope_type"] == "llama3"   # what transformers 5 writes
    new_style, _ = hf.load_config(path)
    rewrite_config(path, rope_parameters=None, rope_theta=500.0,
                   rope_scaling={**{k: v for k, v in scaling.items() if k != "rope_type"},
                                 "type": "llama3"})
    old_style, _ = hf.load_config(path)
    assert old_style == new_style


def test_blockwise_attention_matches_transformers(tmp_path):
    path, reference = save_hf(tmp_path, qwen2_config())
    model = hf.load_model(path, attention="blockwise", block_q=8, block_k=8)
    ids = tokens()
    assert relative_error(our_logits(model, ids), hf_logits(reference, ids)) <= 1e-4


def test_a_checkpoint_sharded_by_transformers_loads(tmp_path):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(llama_config()).eval()
    path = str(tmp_path / "sharded")
    reference.save_pretrained(path, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    model = hf.load_model(path, attention="dense")
    ids = tokens()
    assert relative_error(our_logits(model, ids), hf_logits(reference, ids)) <= 1e-4


def test_parameter_dtype_follows_the_checkpoint_unless_given(tmp_path):
    path, reference = save_hf(tmp_path, llama_config(), dtype=torch.bfloat16)
    model = hf.load_model(path, dtype="float32", attention="dense")
    assert model.embedding[...].dtype == jnp.bfloat16 and model.cfg.param_dtype == "bfloat16"
    wide = hf.load_model(path, param_dtype="float32", attention="dense")
    assert wide.blocks.attention.wq[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide.embedding[...]),
                                  np.asarray(model.embedding[...]).astype(np.float32))
    # bf16 weights, float32 compute on both sides.
    ids = tokens()
    assert relative_error(our_logits(wide, ids), hf_logits(reference.float(), ids)) <= 1e-4


def load_on_mesh(path, mesh, attention, attention_fn=None):
    """The checkpoint's model placed on `mesh` by the one builder, its weights read into
    those shardings (what --mode import does)."""
    config, _ = hf.load_config(path)
    config = dataclasses.replace(config, dtype="float32", attention=attention)
    graphdef, abstract, shardings = model_on_mesh.abstract_model(config, mesh, attention_fn)
    return nnx.merge(graphdef, hf.load_params(path, abstract, shardings))


@pytest.mark.slow
def test_sharded_load_on_a_mesh_gives_the_same_parameters_and_ring_attention_logits(tmp_path):
    path, reference = save_hf(tmp_path, llama_config())
    single = hf.load_model(path, attention="dense")
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "seq": 4, "tensor": 2})
    model = load_on_mesh(path, mesh, attention="ring",
                         attention_fn=make_ring_attention(mesh, block_q=8, block_k=8))
    wq = model.blocks.attention.wq[...]
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    single_params = nnx.to_flat_state(nnx.state(single, nnx.Param))
    for (path_, a), (_, b) in zip(single_params, nnx.to_flat_state(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path_))
    ids = tokens()
    with jax.set_mesh(mesh):
        out = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert relative_error(out, hf_logits(reference, ids)) <= 1e-4


def test_fsdp_sharded_gpt2_load_reads_slices_of_the_packed_tensors(tmp_path):
    path, _ = save_hf(tmp_path, gpt2_config())
    single = hf.load_model(path, attention="dense")
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "seq": 2, "tensor": 2})
    model = load_on_mesh(path, mesh, attention="dense")
    assert not model.blocks.attention.wq[...].sharding.is_fully_replicated
    for (name, a), (_, b) in zip(nnx.to_flat_state(nnx.state(single, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(name))


# ----------------------------------------------------------------------------- refusals


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


def write_config(tmp_path, config):
    """config.json alone (the refusals come before any weights are read)."""
    path = tmp_path / "refused"
    path.mkdir()
    config.save_pretrained(str(path))
    rewrite_config(str(path), architectures=[ARCHITECTURES[config.model_type]])
    return str(path)


@pytest.mark.parametrize("config,found", [
    (lambda: transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=VOCAB),
     "GPTNeoXForCausalLM"),
    (lambda: llama_config(hidden_act="gelu"), "'gelu'"),
    (lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx=True"),
])
def test_unsupported_configs_raise_one_line_naming_what_was_found(tmp_path, config, found):
    path = write_config(tmp_path, config())
    with pytest.raises(ValueError, match=re.escape(found) + ".*; supported: ") as info:
        hf.load_config(path)
    assert "\n" not in str(info.value), str(info.value)


def test_unknown_rope_type_is_refused(tmp_path):
    path = write_config(tmp_path, llama_config())
    rewrite_config(path, rope_parameters={"rope_theta": 10000.0, "rope_type": "proportional",
                                          "factor": 2.0})
    with pytest.raises(ValueError,
                       match=r"unsupported rope type 'proportional'; supported: default"):
        hf.load_config(path)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, arch):
    path, _ = save_hf(tmp_path, CONFIGS[arch]())
    model = hf.load_model(path, attention="dense")
    out_dir = hf.save_model(model, str(tmp_path / "export"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(exported).__name__ == model.hf_architecture
    ids = tokens(1)
    ours = our_logits(model, ids)
    assert relative_error(hf_logits(exported, ids), ours) <= 1e-5
    # The round trip gives back the checkpoint's tensors bit for bit.
    original, written = read_safetensors(path), read_safetensors(out_dir)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def read_safetensors(path):
    from safetensors.numpy import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("rope", ["linear", "dynamic", "yarn", "llama3"])
def test_export_of_a_model_trained_here_round_trips_each_rope_scaling(tmp_path, rope):
    scaling = {"linear": {"rope_type": "linear", "factor": 2.0},
               "dynamic": {"rope_type": "dynamic", "factor": 2.0},
               "yarn": {"rope_type": "yarn", "factor": 4.0},
               "llama3": {"rope_type": "llama3", "factor": 8.0}}[rope]
    from model.positions import normalize_rope_scaling
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2,
                      head_dim=16, mlp_dim=96, l_max=16, rope_theta=500.0, dtype="float32",
                      rope_scaling_json=json.dumps(normalize_rope_scaling(scaling, 16),
                                                   sort_keys=True),
                      attention="dense", tie_embeddings=(rope == "yarn"))
    model = random_model(cfg)
    out_dir = hf.save_model(model, str(tmp_path / "export"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    ids = tokens(2)
    ours = our_logits(model, ids)
    assert relative_error(hf_logits(exported, ids), ours) <= 1e-5
    reloaded, _ = hf.load_config(out_dir)
    assert reloaded.rope_scaling == cfg.rope_scaling and reloaded.l_max == 16


def random_model(cfg, seed=3, scale=0.2):
    """A Transformer of `cfg` with normal(0, scale) parameters (numpy draws: building it
    abstractly and filling it compiles nothing)."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(state):
        variable.set_value(jnp.asarray(scale * rng.standard_normal(variable.shape),
                                       variable.dtype))
    return nnx.merge(graphdef, state)


def test_model_trained_here_exports_as_llama_with_the_byte_tokenizer(tmp_path):
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=1, q_heads=4, kv_heads=1, head_dim=8,
                      mlp_dim=64, l_max=32, dtype="float32", attention="dense")
    model = random_model(cfg)
    tokenizer_path = write_byte_tokenizer_json(str(tmp_path / "tokenizer.json"))
    out_dir = hf.save_model(model, str(tmp_path / "export"), tokenizer_path=tokenizer_path)
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors", "tokenizer.json",
                                           "tokenizer_config.json"]
    text = "Grüße, ☃!\n\tbytes"
    auto = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = auto(text, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode(text).tolist()
    assert HuggingFaceTokenizer(os.path.join(out_dir, "tokenizer.json")).decode(ids) == text
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    ids = np.asarray([ids])
    assert relative_error(hf_logits(exported, ids), our_logits(model, ids)) <= 1e-5


def test_sharded_export_writes_an_index_that_both_sides_load(tmp_path):
    path, _ = save_hf(tmp_path, llama_config())
    model = hf.load_model(path, attention="dense")
    out_dir = hf.save_model(model, str(tmp_path / "export"), max_shard_bytes=64 * 1024)
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == files
    assert all(os.path.getsize(os.path.join(out_dir, f)) < 64 * 1024 + 4096 or
               len([k for k, v in index["weight_map"].items() if v == f]) == 1 for f in files)
    reloaded = hf.load_model(out_dir, attention="dense")
    for (name, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(reloaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(name))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = tokens(3)
    assert relative_error(hf_logits(exported, ids), our_logits(model, ids)) <= 1e-5


def test_export_refuses_a_model_no_architecture_computes(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, q_heads=4, kv_heads=4,
                      head_dim=8, mlp_dim=64, l_max=32, position="none", dtype="float32")
    with pytest.raises(ValueError, match=r"no Hugging Face architecture computes this model "
                                         r"\(position=none.*; supported: "):
        hf.save_model(random_model(cfg), str(tmp_path / "export"))


# ----------------------------------------------------------------------------- EOS ids


def test_eos_ids_come_from_generation_config_json_before_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert hf.eos_token_ids(str(tmp_path)) == (7,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11]}))
    assert hf.eos_token_ids(str(tmp_path)) == (9, 11)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": None}))
    assert hf.eos_token_ids(str(tmp_path)) == ()


@pytest.mark.parametrize("eos,written", [((), None), ((5,), 5), ((5, 6), [5, 6])])
def test_export_writes_the_eos_ids_as_config_json_eos_token_id(tmp_path, eos, written):
    path, _ = save_hf(tmp_path, llama_config())
    out_dir = hf.save_model(hf.load_model(path), str(tmp_path / "export"), eos_token_ids=eos)
    assert json.loads(open(os.path.join(out_dir, "config.json")).read())["eos_token_id"] == written
    assert hf.eos_token_ids(out_dir) == eos
