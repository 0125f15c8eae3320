"""The catalogue of bad inputs to --mode import / --mode export (main.py, cli/hf_workdir.py,
model/hf.py): each is one `error:` line on stderr, exit 2, and nothing created or changed
on disk (not even the workdir lock's file: main.py checks the paths before it locks).

- export never writes into a workdir: an --hf_dir that is the workdir, lies inside it or
  any other workdir, is another workdir or holds one is refused, --overwrite or not;
- --overwrite replaces only a directory that holds an earlier export and nothing else;
- import never writes over its source: a --workdir that is, lies inside or holds --hf_dir
  (real paths) is refused;
- import refuses a checkpoint it cannot take whole: a tensor it has no place for, a NaN or
  inf weight, a bos/eos/pad id outside the vocabulary;
- exported files have the umask's permissions (safetensors alone wrote 0600);
- the errors say the real cause: hidden_size not divisible by the heads, a config.json
  without `architectures`, a Hugging Face directory given as a workdir.

Tiny random transformers models on CPU; the command-line behaviour runs main.py in a
subprocess as a user would, the rest calls the functions.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli import hf_workdir  # noqa: E402
from model import hf  # noqa: E402

from tests.test_hf_cli import LLAMA  # noqa: E402 - vocab 256, no tokenizer.json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_py(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def snapshot(directory):
    """Every entry under `directory` (the lock's file included): a file's sha256, a
    directory's marker, a link's target; None when it does not exist."""
    directory = str(directory)
    if not os.path.lexists(directory):
        return None
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, directory)
            if os.path.islink(path):
                found[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[key] = ("dir",)
            else:
                with open(path, "rb") as f:
                    found[key] = ("file", hashlib.sha256(f.read()).hexdigest())
    return found


def assert_refused(result, *names):
    """Exit 2, no traceback, exactly one stderr line: 'error: ...' naming each of `names`."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def save_llama(path, **config):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **config}))
    model.save_pretrained(str(path))
    return str(path)


def rewrite_json(path, **changes):
    with open(path) as f:
        found = json.load(f)
    for key, value in changes.items():
        if value is None:
            found.pop(key, None)
        else:
            found[key] = value
    with open(path, "w") as f:
        json.dump(found, f)


def rewrite_tensors(path, change):
    """model.safetensors of `path` with `change(dict of numpy arrays)` applied."""
    from safetensors.numpy import load_file, save_file
    file = os.path.join(str(path), "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def workdir_copy(trained_workdir, tmp_path):
    """A copy of the session's trained workdir (conftest.py), to aim exports at."""
    path = tmp_path / "run"
    shutil.copytree(trained_workdir, path)
    return path


# ----------------------------------------------------------------------------- export targets


@pytest.mark.slow
@pytest.mark.parametrize("target, overwrite, names", [
    ("W/checkpoints", True, ["inside the workdir"]),
    ("W", False, ["is the workdir", "itself"]),
    ("W/eval/exported", False, ["inside the workdir"]),
], ids=["its_checkpoints_with_overwrite", "the_workdir_itself", "a_new_directory_inside_it"])
def test_export_refuses_an_hf_dir_in_the_workdir(workdir_copy, target, overwrite, names):
    hf_dir = target.replace("W", str(workdir_copy))
    before = snapshot(workdir_copy)
    assert_refused(main_py("--mode", "export", "--workdir", str(workdir_copy), "--hf_dir", hf_dir,
                           *(["--overwrite"] if overwrite else [])), hf_dir, *names)
    assert snapshot(workdir_copy) == before          # every checkpoint byte; no .lock


@pytest.mark.slow
@pytest.mark.parametrize("target, names", [
    ("other", ["is a workdir", "config.json of a Boundless run"]),
    ("other/checkpoints/8", ["inside the workdir", "other"]),
    ("parent", ["holds the workdir", "parent/other"]),
], ids=["another_workdir", "inside_another_workdir", "a_directory_holding_another_workdir"])
def test_export_with_overwrite_refuses_an_hf_dir_of_another_run(workdir_copy, tmp_path, target,
                                                               names):
    shutil.copytree(workdir_copy, tmp_path / "parent" / "other")
    os.symlink(tmp_path / "parent" / "other", tmp_path / "other")
    before = snapshot(tmp_path)
    assert_refused(main_py("--mode", "export", "--workdir", str(workdir_copy), "--hf_dir",
                           str(tmp_path / target), "--overwrite"), *names)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_overwrite_refuses_a_directory_holding_more_than_an_export(workdir_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    before = snapshot(tmp_path)
    assert_refused(main_py("--mode", "export", "--workdir", str(workdir_copy), "--hf_dir",
                           str(out), "--overwrite"),
                   str(out), "2 entries an export does not write", "'data/'", "'notes.txt'")
    assert snapshot(tmp_path) == before


@pytest.fixture
def exported(workdir_copy, tmp_path):
    """(workdir, an export of it into tmp_path/out)."""
    result = main_py("--mode", "export", "--workdir", str(workdir_copy), "--hf_dir",
                     str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir_copy, tmp_path / "out"


@pytest.mark.slow
def test_exported_files_have_the_umasks_permissions_and_overwrite_replaces_them(exported):
    workdir, out = exported
    umask = os.umask(0o022)
    os.umask(umask)                       # the subprocess inherited this one
    modes = {name: oct(os.stat(out / name).st_mode & 0o777) for name in os.listdir(out)}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    first = snapshot(out)
    result = main_py("--mode", "export", "--workdir", str(workdir), "--hf_dir", str(out),
                     "--overwrite")          # an earlier export: replaced
    assert result.returncode == 0, result.stderr[-3000:]
    assert "previous contents replaced" in result.stdout
    assert snapshot(out) == first


# ----------------------------------------------------------------------------- import paths


@pytest.mark.slow
@pytest.mark.parametrize("hf_dir, workdir, names", [
    ("hf", "link_to_hf", ["is the --hf_dir", "itself"]),
    ("hf", "hf/sub/../w", ["is inside --hf_dir"]),
    ("w/hf", "w", ["is inside --workdir"]),
], ids=["the_hf_dir_through_a_symlink", "inside_the_hf_dir_through_dotdot",
        "a_workdir_that_holds_the_hf_dir"])
def test_import_refuses_a_workdir_that_overlaps_its_hf_dir(tmp_path, hf_dir, workdir, names):
    save_llama(tmp_path / hf_dir)
    if hf_dir == "hf":
        os.symlink(tmp_path / "hf", tmp_path / "link_to_hf")
        (tmp_path / "hf" / "sub").mkdir()
    before = snapshot(tmp_path)
    assert_refused(main_py("--mode", "import", "--hf_dir", str(tmp_path / hf_dir), "--workdir",
                           str(tmp_path / workdir)), *names)
    assert snapshot(tmp_path) == before              # config.json untouched, no .lock


# ----------------------------------------------------------------------------- import contents


@pytest.mark.slow
def test_import_refuses_a_non_finite_weight_and_leaves_no_workdir(tmp_path):
    path = save_llama(tmp_path / "hf")

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan

    rewrite_tensors(path, poison)
    before = snapshot(tmp_path)
    assert_refused(main_py("--mode", "import", "--hf_dir", path, "--workdir",
                           str(tmp_path / "w")),
                   "'model.layers.1.mlp.up_proj.weight'", "NaN", "model.safetensors")
    assert snapshot(tmp_path) == before              # no workdir, no lock file


def test_import_refuses_tensors_it_has_no_place_for_listing_five(tmp_path):
    path = save_llama(tmp_path / "hf")
    extra = [f"model.layers.2.{name}.weight" for name in
             ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
              "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")]

    def add(tensors):
        for name in extra:
            tensors[name] = np.zeros((4,), np.float32)

    rewrite_tensors(path, add)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        hf_workdir.import_workdir(path, str(tmp_path / "w"))
    message = str(info.value)
    assert "\n" not in message and "7 tensors" in message and "and 2 more" in message, message
    assert "'model.layers.2.input_layernorm.weight'" in message
    assert snapshot(tmp_path) == before              # no workdir


@pytest.mark.parametrize("key, where", [("eos_token_id", "generation_config.json"),
                                        ("pad_token_id", "config.json")])
def test_import_refuses_a_token_id_outside_the_vocabulary(tmp_path, key, where):
    """A GPT-2 of 300 tokens that keeps GPT-2's bos/eos 50256 (transformers' defaults, in
    both files); or whose config.json names pad id 300."""
    path = str(tmp_path / "hf")
    ids = {} if key == "eos_token_id" else {"bos_token_id": 1, "eos_token_id": 2}
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=32, **ids)
    ).save_pretrained(path)
    if key == "pad_token_id":
        rewrite_json(os.path.join(path, "config.json"), pad_token_id=300)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        hf_workdir.import_workdir(path, str(tmp_path / "w"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(os.path.join(path, where)), message
    assert key in message and "vocab_size 300" in message, message
    assert snapshot(tmp_path) == before              # no workdir


# ----------------------------------------------------------------------------- the real cause


@pytest.mark.parametrize("config, names", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
      "num_attention_heads": 6, "num_hidden_layers": 1, "intermediate_size": 128,
      "vocab_size": 256}, ["hidden_size 64 is not divisible by num_attention_heads 6",
                           "no head_dim"]),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_head": 3,
      "n_layer": 1, "n_positions": 32, "vocab_size": 256},
     ["n_embd 32 is not divisible by n_head 3"]),
], ids=["llama", "gpt2"])
def test_heads_that_do_not_split_the_width_are_named_not_head_dim(tmp_path, config, names):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        hf.load_config(str(tmp_path))
    for name in names:
        assert name in str(info.value), str(info.value)


def test_a_config_without_architectures_is_read_by_its_model_type(tmp_path):
    path = save_llama(tmp_path / "hf")
    rewrite_json(os.path.join(path, "config.json"), architectures=None)
    assert hf.load_config(path)[1] == "LlamaForCausalLM"


@pytest.mark.parametrize("model_type, names", [
    ("bert", ["no `architectures`", "model_type 'bert'", "llama", "LlamaForCausalLM"]),
    (None, ["neither `architectures` nor `model_type`", "LlamaForCausalLM"]),
])
def test_a_config_without_architectures_of_another_model_type_says_so(tmp_path, model_type,
                                                                       names):
    config = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 256}
    if model_type:
        config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        hf.load_config(str(tmp_path))
    assert "unsupported Hugging Face architecture" not in str(info.value)
    for name in names:
        assert name in str(info.value), str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "export"])
def test_a_hugging_face_directory_given_as_a_workdir_says_so(tmp_path, mode):
    path = save_llama(tmp_path / "hf")
    before = snapshot(tmp_path)
    extra = ["--hf_dir", str(tmp_path / "out")] if mode == "export" else []
    line = assert_refused(main_py("--mode", mode, "--workdir", path, *extra),
                          f"{path} looks like a Hugging Face model directory",
                          f"--mode import --hf_dir {path} --workdir W")
    assert "unknown key" not in line
    assert snapshot(tmp_path) == before              # no .lock, no eval/, no out/


def test_import_refuses_a_workdir_that_holds_another_hugging_face_model(tmp_path):
    save_llama(tmp_path / "hf")
    other = save_llama(tmp_path / "other")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"--workdir .*other holds a Hugging Face model .*"
                                         r"LlamaForCausalLM.*would write over it"):
        hf_workdir.check_import_paths(str(tmp_path / "hf"), other)
    assert snapshot(tmp_path) == before


def test_a_checkpoints_folder_or_lock_file_above_an_export_is_no_workdir(tmp_path):
    """Only a run's config.json or Orbax steps mark a directory above --hf_dir as a
    workdir: a home's own checkpoints/ folder, or pytest's .lock, do not."""
    (tmp_path / "checkpoints" / "model.pt").mkdir(parents=True)
    (tmp_path / ".lock").write_text("another tool's")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "w").mkdir()
    assert hf_workdir.check_export_target(str(tmp_path / "w"), str(tmp_path / "exports" / "m"),
                                          overwrite=False) is False
