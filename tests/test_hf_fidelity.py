"""Specification of what --mode import / --mode export keep besides the weights, and of
what they refuse to destroy (cli/hf_workdir.py, model/hf.py):

- the compute dtype follows the checkpoint (config.json's `dtype` / `torch_dtype`, else its
  tensors'), so a float32 import generates transformers' greedy tokens;
- the bos / eos / pad ids of the source go into the workdir (generate.bos_id / eos_ids /
  pad_id) and come back out in config.json and a generation_config.json;
- export never clobbers: a non-empty --hf_dir is refused unless --overwrite, which writes
  beside it and swaps the new directory in (no old file survives; a failed export leaves
  the old directory as it was);
- a safetensors file whose header is garbage is one error line naming the file.

Tiny random transformers models (2 layers, d_model 64, byte vocabulary) on CPU; the
command-line behaviour runs main.py in a subprocess, as a user would.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import hf  # noqa: E402
from cli import hf_workdir  # noqa: E402
from configs import workdir_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vocab 256 and no tokenizer.json: the byte tokenizer, so a prompt's ids are its bytes
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# greedy float32 decoding of this prompt has a top-2 logit gap >= 2.7e-3 of the largest
# logit at every one of its 20 steps (far above float32 rounding); bfloat16 compute departs
# from it (at step 19 on the machine this was written on)
PROMPT, NEW_TOKENS = "the cat sat", 20


def save_llama(path, dtype=torch.float32, **config):
    """A random Llama (weights normal(0, 0.2)) saved by transformers; returns the model."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    return model


def main_py(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def snapshot(directory):
    """{file name: bytes} of a directory (flat)."""
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


def save_other_model(path):
    """Another model's directory, of only the files an export writes (what --overwrite
    replaces; tests/test_bad_inputs_hf.py: anything else is refused): a GPT-2 in 4 shards
    with an index and a generation_config.json (eos 7)."""
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=32, bos_token_id=7,
        eos_token_id=7)).save_pretrained(path, max_shard_size="50KB")
    assert len([f for f in os.listdir(path) if f.startswith("model-0")]) > 1


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(root, transformers model, import stdout): root/hf a float32 Llama with bos 1, eos 2,
    pad 0; root/w its import; root/out its export into an empty directory."""
    root = tmp_path_factory.mktemp("fidelity")
    model = save_llama(str(root / "hf"))
    result = main_py("--mode", "import", "--hf_dir", str(root / "hf"), "--workdir",
                     str(root / "w"))
    assert result.returncode == 0, result.stderr[-3000:]
    os.makedirs(root / "out")
    export = main_py("--mode", "export", "--workdir", str(root / "w"), "--hf_dir",
                     str(root / "out"))
    assert export.returncode == 0, export.stderr[-3000:]
    return root, model, result.stdout


# ----------------------------------------------------------------------------- dtype


@pytest.mark.slow
def test_a_float32_import_computes_in_float32_and_says_so(imported):
    root, _, stdout = imported
    assert workdir_config.load(str(root / "w")).model.dtype == "float32"
    assert "compute dtype float32 (the checkpoint's config.json dtype)" in stdout


@pytest.mark.slow
def test_generate_of_a_float32_import_gives_transformers_greedy_tokens(imported):
    root, model, _ = imported
    output = root / "generated.json"
    result = main_py("--mode", "generate", "--workdir", str(root / "w"),
                     f"--config.generate.prompt={PROMPT}",
                     f"--config.generate.max_new_tokens={NEW_TOKENS}",
                     f"--config.generate.output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    prompt_ids = list(PROMPT.encode())
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                              max_new_tokens=NEW_TOKENS)[0, len(prompt_ids):].tolist()
    written = json.loads(output.read_text())
    assert written["prompt_ids"] == prompt_ids
    assert written["output_ids"] == want


@pytest.mark.slow
def test_a_bfloat16_checkpoint_imports_with_compute_dtype_bfloat16(tmp_path):
    save_llama(str(tmp_path / "hf"), dtype=torch.bfloat16)
    result = main_py("--mode", "import", "--hf_dir", str(tmp_path / "hf"), "--workdir",
                     str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert workdir_config.load(str(tmp_path / "w")).model.dtype == "bfloat16"
    assert "compute dtype bfloat16" in result.stdout


def test_the_compute_dtype_is_the_one_config_json_names_dtype_or_torch_dtype(tmp_path):
    save_llama(str(tmp_path), dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"            # what transformers 5 writes
    assert hf.compute_dtype(str(tmp_path))[0] == "bfloat16"
    del config["dtype"]
    config["torch_dtype"] = "float16"               # older transformers; float16 is kept
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.compute_dtype(str(tmp_path)) == ("float16", "the checkpoint's config.json "
                                                          "torch_dtype")


def test_without_a_dtype_in_config_json_the_compute_dtype_is_the_tensors(tmp_path):
    save_llama(str(tmp_path), dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.compute_dtype(str(tmp_path)) == ("bfloat16", "the checkpoint's tensors")


# ----------------------------------------------------------------------------- special ids


@pytest.mark.slow
def test_import_records_the_bos_eos_and_pad_ids(imported):
    root, _, _ = imported
    g = workdir_config.load(str(root / "w")).generate
    assert (g.bos_id, tuple(g.eos_ids), g.pad_id) == (1, (2,), 0)


@pytest.mark.slow
def test_export_writes_the_ids_to_config_json_and_generation_config_json(imported):
    root, _, _ = imported
    config = json.loads((root / "out" / "config.json").read_text())
    generation = json.loads((root / "out" / "generation_config.json").read_text())
    for written in (config, generation):
        assert (written["bos_token_id"], written["eos_token_id"],
                written["pad_token_id"]) == (1, 2, 0)


@pytest.mark.slow
def test_transformers_reads_the_exported_ids_back(imported):
    root, _, _ = imported
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "out"))
    generation = transformers.GenerationConfig.from_pretrained(str(root / "out"))
    assert (model.config.bos_token_id, model.config.eos_token_id,
            model.config.pad_token_id) == (1, 2, 0)
    for g in (generation, model.generation_config):
        assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (1, 2, 0)


def test_special_ids_come_from_generation_config_json_before_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}))
    assert hf.special_token_ids(str(tmp_path)) == {"bos": 1, "eos": (2,), "pad": None}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 8}))
    assert hf.special_token_ids(str(tmp_path)) == {"bos": 5, "eos": (6, 7), "pad": 8}


def test_an_id_the_source_does_not_have_is_exported_as_null(tmp_path):
    save_llama(str(tmp_path / "hf"), pad_token_id=None)
    out = hf.save_model(hf.load_model(str(tmp_path / "hf")), str(tmp_path / "out"),
                        eos_token_ids=(2,), bos_token_id=1, pad_token_id=None)
    assert json.loads(open(os.path.join(out, "config.json")).read())["pad_token_id"] is None
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id,
            generation.pad_token_id) == (1, 2, None)


# ----------------------------------------------------------------------------- no clobbering


@pytest.mark.slow
def test_export_into_an_empty_directory_needs_no_overwrite(imported):
    root, _, _ = imported                   # the fixture exported into an empty root/out
    assert {"config.json", "model.safetensors", "generation_config.json"} <= \
        set(os.listdir(root / "out"))


@pytest.mark.slow
def test_export_into_a_directory_holding_another_model_is_refused_untouched(imported):
    root, _, _ = imported
    other = root / "other_refused"
    save_other_model(str(other))
    before = snapshot(other)
    result = main_py("--mode", "export", "--workdir", str(root / "w"), "--hf_dir", str(other))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(other) in lines[0], \
        result.stderr
    assert snapshot(other) == before


@pytest.mark.slow
def test_export_with_overwrite_leaves_exactly_a_fresh_export_and_no_old_file(imported):
    root, _, _ = imported
    other = root / "other_replaced"
    save_other_model(str(other))
    result = main_py("--mode", "export", "--workdir", str(root / "w"), "--hf_dir", str(other),
                     "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    # the same files, byte for byte, as the export into an empty directory: no old shard,
    # index or generation_config.json (eos 7) survives
    assert snapshot(other) == snapshot(root / "out")
    assert [n for n in os.listdir(root) if n.startswith("other_replaced")] == \
        ["other_replaced"]                  # no staging or old directory left beside it


@pytest.mark.slow
def test_overwrite_refuses_a_directory_that_holds_the_workdir(imported):
    root, _, _ = imported
    result = main_py("--mode", "export", "--workdir", str(root / "w"), "--hf_dir", str(root),
                     "--overwrite")
    assert result.returncode == 2 and "holds the workdir" in result.stderr
    assert os.path.isdir(root / "w" / "checkpoints")


@pytest.mark.slow
def test_an_export_that_fails_with_overwrite_leaves_the_old_directory_whole(imported,
                                                                           monkeypatch):
    root, _, _ = imported
    other = root / "other_kept"
    save_other_model(str(other))
    before = snapshot(other)
    save_model = hf.save_model

    def failing_save_model(model, out_dir, **kw):
        save_model(model, out_dir, **kw)
        raise OSError(f"{out_dir}: disk full (simulated)")

    monkeypatch.setattr(hf, "save_model", failing_save_model)
    with pytest.raises(OSError, match="simulated"):
        hf_workdir.export_workdir(str(root / "w"), str(other), overwrite=True)
    assert snapshot(other) == before
    assert [n for n in os.listdir(root) if n.startswith("other_kept")] == ["other_kept"]


# ----------------------------------------------------------------------------- bad files


@pytest.mark.slow
@pytest.mark.parametrize("garbage", ["huge_header_length", "header_not_json", "random_bytes"])
def test_a_garbage_safetensors_file_is_one_error_line_naming_it(tmp_path, garbage):
    save_llama(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "model.safetensors"
    data = {"huge_header_length": (2**62).to_bytes(8, "little") + b"\0" * 64,
            "header_not_json": (16).to_bytes(8, "little") + b"\xff{not json at all" + b"\0" * 64,
            "random_bytes": np.random.default_rng(0).bytes(4096)}[garbage]
    path.write_bytes(data)
    result = main_py("--mode", "import", "--hf_dir", str(tmp_path / "hf"), "--workdir",
                     str(tmp_path / "w"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], \
        result.stderr
