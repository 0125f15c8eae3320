"""Greedy generation parity with Hugging Face transformers: tiny random Llama, Qwen2 and
GPT-2 models built with `transformers` (nothing downloaded), imported with
model.hf.load_model(dtype="float32"), and evaluation.generate.generate at temperature 0
must give exactly the tokens of transformers' `generate(do_sample=False)`, on one device and
with the prompt and KV cache split over seq = 4.
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evaluation.generate import generate  # noqa: E402
from model import hf  # noqa: E402
from parallel.mesh import make_mesh  # noqa: E402

VOCAB, PROMPT, NEW = 128, 16, 32
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**{**SMALL, "tie_word_embeddings": False}),
    "qwen2": lambda: transformers.Qwen2Config(**{**SMALL, "tie_word_embeddings": True}),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                            n_positions=64, bos_token_id=None,
                                            eos_token_id=None, pad_token_id=None),
}


def save_hf(tmp_path, config, seed=0, std=0.5):
    """A random `transformers` model of `config` saved to tmp_path/hf; (path, model)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    return path, model


def hf_greedy(model, prompt):
    """transformers' greedy continuation of `prompt` [batch, length]: NEW tokens, never
    stopped early (no EOS id anywhere)."""
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0    # only used to pad finished rows: none finish
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt),
                             attention_mask=torch.ones_like(torch.tensor(prompt)),
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    return out[:, prompt.shape[1]:].numpy()


# the fast set keeps Llama; CI runs every architecture
@pytest.mark.parametrize("arch", [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(CONFIGS)])
def test_greedy_generation_matches_transformers(tmp_path, arch):
    path, reference = save_hf(tmp_path, CONFIGS[arch]())
    model = hf.load_model(path, dtype="float32")
    prompt = np.random.default_rng(1).integers(0, VOCAB, (2, PROMPT))
    expected = hf_greedy(reference, prompt)
    assert expected.shape == (2, NEW)
    assert len(np.unique(expected)) >= 3, f"degenerate reference continuation {expected}"
    ours = generate(model, prompt, NEW, temperature=0.0)
    np.testing.assert_array_equal(ours, expected)
    single = generate(model, prompt[1], NEW, temperature=0.0, prefill_chunk=5)
    np.testing.assert_array_equal(single, expected[1])


@pytest.mark.parametrize("arch", [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(CONFIGS)])
def test_greedy_generation_on_seq_4_matches_transformers(tmp_path, arch):
    """The prompt prefilled with ring attention over 4 devices, the cache split over them."""
    path, reference = save_hf(tmp_path, CONFIGS[arch]())
    model = hf.load_model(path, dtype="float32")
    prompt = np.random.default_rng(2).integers(0, VOCAB, (2, PROMPT))
    mesh = make_mesh(dict(data=1, fsdp=1, seq=4, tensor=1), jax.devices()[:4])
    np.testing.assert_array_equal(generate(model, prompt, NEW, mesh=mesh),
                                  hf_greedy(reference, prompt))


def test_generation_stops_at_an_eos_id_where_transformers_stops(tmp_path):
    path, reference = save_hf(tmp_path, CONFIGS["llama"]())
    model = hf.load_model(path, dtype="float32")
    prompt = np.random.default_rng(3).integers(0, VOCAB, (1, PROMPT))
    free = hf_greedy(reference, prompt)[0]
    eos = [int(free[6]), VOCAB - 1]                 # one id it reaches, one it may not
    reference.generation_config.eos_token_id = eos
    with torch.no_grad():
        expected = reference.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=NEW,
                                      attention_mask=torch.ones_like(torch.tensor(prompt)))
    expected = expected[0, PROMPT:].numpy()
    assert len(expected) < NEW and expected[-1] in eos
    np.testing.assert_array_equal(generate(model, prompt[0], NEW, eos_id=eos), expected)
