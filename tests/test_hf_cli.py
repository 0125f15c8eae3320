"""Specification of --mode import / --mode export (cli/hf_workdir.py) and of evaluating an
imported workdir: a tiny random Llama saved by transformers goes into a workdir and back out
with the same logits."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli import eval_mode  # noqa: E402
from configs import workdir_config  # noqa: E402
from train import trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vocab 256 and no tokenizer.json: the import falls back to the byte tokenizer
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
             tie_word_embeddings=False)


def save_llama(path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def main_py(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_cli")
    original = save_llama(str(root / "hf"))
    result = main_py("--mode", "import", "--hf_dir", str(root / "hf"), "--workdir",
                     str(root / "w"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, original, result.stdout


@pytest.mark.slow
def test_import_writes_the_config_and_a_step_0_checkpoint(imported):
    root, _, stdout = imported
    assert "imported LlamaForCausalLM" in stdout
    config = workdir_config.load(str(root / "w"))
    assert (config.model.d_model, config.model.n_layers, config.model.kv_heads) == (64, 2, 2)
    assert config.curriculum.l_max == 64 and config.data.tokenizer == "bytes"
    assert os.listdir(root / "w" / "checkpoints") == ["0"]


@pytest.mark.slow
def test_export_of_an_imported_workdir_gives_transformers_the_same_logits(imported):
    root, original, _ = imported
    result = main_py("--mode", "export", "--workdir", str(root / "w"), "--hf_dir",
                     str(root / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(root / "out")).eval()
    assert json.loads((root / "out" / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]
    ids = np.random.default_rng(0).integers(0, 256, (2, 32))
    want, got = logits(original, ids), logits(exported, ids)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert transformers.AutoTokenizer.from_pretrained(str(root / "out"))("ab")["input_ids"] == \
        [97, 98]                                        # the byte tokenizer went with it


@pytest.mark.slow
def test_an_imported_workdir_evaluates_like_any_other(imported, tmp_path):
    root, _, _ = imported
    config = workdir_config.load(str(root / "w"), {"eval.lengths": (32, 64),
                                                   "eval.max_batches": 1})
    result = eval_mode.evaluate_workdir(config, str(root / "w"))
    assert result["lengths"] == [32, 64]
    assert all(math.isfinite(p) and p > 1 for p in result["perplexity"])


def test_import_and_export_need_both_directories():
    result = main_py("--mode", "import", "--workdir", "/nonexistent")
    assert result.returncode != 0 and "--hf_dir" in result.stderr


@pytest.mark.slow
def test_eval_mode_without_config_takes_the_workdirs_config_and_the_overrides(imported):
    root, _, _ = imported
    result = main_py("--mode", "eval", "--workdir", str(root / "w"), "--config.eval.lengths=(32,)",
                     "--config.eval.max_batches=1", "--config.eval.name=cli")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((root / "w" / "eval" / "cli" / "perplexity_by_length.json").read_text())
    assert written["lengths"] == [32] and written["l_max"] == 64


@pytest.mark.slow
def test_a_run_initialised_from_an_imported_workdir_adopts_its_model_and_trains(imported,
                                                                                tmp_path):
    from tests.helpers import small_config
    root, _, _ = imported
    config = small_config(**{"train.init_from": str(root / "w"), "train.steps": 2,
                             "eval.lengths": (32,), "eval.sliding_stride": 0})
    # small_config's own model differs in these
    assert (config.model.tie_embeddings, config.model.vocab_size) == (True, 0)
    summary = trainer.train(config, str(tmp_path / "tuned"))
    assert summary["step"] == 2 and math.isfinite(summary["final_loss"])
    saved = workdir_config.load(str(tmp_path / "tuned"))
    assert (saved.model.tie_embeddings, saved.model.vocab_size) == (False, 256)


WORDS = ("<unk> <eos> the a cat dog sat ran on under mat rug and then it was big small red "
         "blue one two three four five six seven eight nine ten").split()


def save_llama_with_tokenizer(path):
    """A random Llama whose directory also holds a word-level tokenizer.json, its
    tokenizer_config.json and a generation_config.json naming two EOS ids."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    model = save_llama(path)
    tokenizer = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                                      unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 255]}, f)
    return model


@pytest.mark.slow
def test_an_imported_tokenizer_and_its_eos_ids_serve_generate_and_go_out_with_export(tmp_path):
    save_llama_with_tokenizer(str(tmp_path / "hf"))
    result = main_py("--mode", "import", "--hf_dir", str(tmp_path / "hf"), "--workdir",
                     str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr[-3000:]
    config = workdir_config.load(str(tmp_path / "w"))
    assert config.data.tokenizer == str(tmp_path / "w" / "tokenizer.json")
    assert tuple(config.generate.eos_ids) == (1, 255)
    assert (tmp_path / "w" / "tokenizer_config.json").exists()
    output = tmp_path / "generated.json"
    result = main_py("--mode", "generate", "--workdir", str(tmp_path / "w"),
                     "--config.generate.prompt=the cat sat on the",
                     "--config.generate.max_new_tokens=8",
                     f"--config.generate.output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert written["prompt_ids"] == [WORDS.index(w) for w in "the cat sat on the".split()]
    ids = written["output_ids"]
    stops = [i for i, token in enumerate(ids) if token in (1, 255)]
    assert stops == ([] if len(ids) == 8 else [len(ids) - 1]), ids   # ends at its first EOS
    result = main_py("--mode", "export", "--workdir", str(tmp_path / "w"), "--hf_dir",
                     str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [1, 255]
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert auto("the dog ran")["input_ids"] == [2, 5, 7] and auto.eos_token == "<eos>"
