"""The catalogue of bad inputs: each gives one line naming the key or file on stderr, a
non-zero exit, and leaves the workdir as it was (main.py, 8 simulated devices)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "tests/small_config.py"]


def run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(directory):
    """Every path under `directory` with its size and modification time."""
    if not os.path.exists(directory):
        return None
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            if name == ".lock":        # the workdir lock's file (cli/workdir_lock.py)
                continue
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = (os.path.getsize(path),
                                                       os.path.getmtime(path))
    return found


def assert_one_line(result, *names):
    """Exit non-zero; no traceback; exactly one 'error:' line, naming each of `names`."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def corpora(tmp_path):
    root = tmp_path / "corpora"
    (root / "empty").mkdir(parents=True)
    (root / "blank").mkdir()
    (root / "blank" / "a.txt").write_text("")
    (root / "binary").mkdir()
    for i in range(3):
        (root / "binary" / f"{i}.txt").write_bytes(
            bytes(np.random.default_rng(i).integers(128, 256, 4096, dtype=np.uint8)))
    (root / "bad.json").write_text("{not a tokenizer")
    return root


def text_source(path):
    return ["--config.data.source=text", f"--config.data.path={path}"]


# name -> (root of the corpora, workdir) -> (arguments, what the error line names)
CASES = {
    "misspelled key": lambda r, w: ([*TINY, "--config.train.stepz=3"],
                                    ["train.stepz", "train.steps"]),
    "wrongly typed key": lambda r, w: ([*TINY, "--config.train.steps=abc"], ["train.steps"]),
    "negative batch": lambda r, w: ([*TINY, "--config.train.batch_size=-4"], ["batch_size"]),
    "zero width": lambda r, w: ([*TINY, "--config.model.d_model=0"], ["d_model"]),
    "impossible mesh": lambda r, w: ([*TINY, "--config.mesh.seq=3"], ["mesh"]),
    "negative learning rate": lambda r, w: ([*TINY, "--config.train.learning_rate=-1"],
                                            ["train.learning_rate", "> 0"]),
    "infinite learning rate": lambda r, w: ([*TINY, "--config.train.learning_rate=inf"],
                                            ["train.learning_rate", "finite"]),
    "probability above one": lambda r, w: ([*TINY, "--config.data.retrieval_fraction=1.5"],
                                           ["data.retrieval_fraction"]),
    "zero evaluation length": lambda r, w: ([*TINY, "--config.eval.lengths=(0,)"],
                                            ["eval.lengths", ">= 1"]),
    "zero evaluation batch": lambda r, w: ([*TINY, "--config.eval.batch_size=0"],
                                           ["eval.batch_size", ">= 1"]),
    "zero mesh axis": lambda r, w: ([*TINY, "--config.mesh.fsdp=0"], ["mesh.fsdp"]),
    "unknown attention": lambda r, w: ([*TINY, "--config.model.attention=flash"],
                                       ["model.attention", "ulysses"]),
    "malformed rope scaling": lambda r, w: ([*TINY, "--config.model.rope.scaling={bad"],
                                            ["model.rope.scaling", "JSON"]),
    "a flag given twice": lambda r, w: ([*TINY, "--config.eval.lengths=(64,)",
                                         "--config.eval.lengths=(128,)"],
                                        ["--config.eval.lengths", "twice"]),
    "unknown key in a mode that reads the workdir": lambda r, w: (
        ["--mode", "eval", "--workdir", str(w), "--config.eval.needles.tasks=(1,)"],
        ["eval.needles.tasks", "no key 'needles'"]),
    "zero window": lambda r, w: ([*TINY, "--config.model.sliding_window=0"],
                                 ["model.sliding_window"]),
    "heads and all-to-all": lambda r, w: ([*TINY, "--config.mesh.seq=8", "--config.mesh.data=1",
                                           "--config.model.attention=ulysses"],
                                          ["model.attention=ulysses", "mesh.seq = 8"]),
    "batch and devices": lambda r, w: ([*TINY, "--config.train.batch_size=12"], ["batch"]),
    "empty corpus": lambda r, w: ([*TINY, *text_source(r / "empty" / "*.txt")],
                                  ["matches no file"]),
    "blank corpus": lambda r, w: ([*TINY, *text_source(r / "blank" / "*.txt")],
                                  ["2 or more tokens"]),
    "missing corpus": lambda r, w: ([*TINY, *text_source(r / "none.txt")], ["none.txt"]),
    "binary corpus": lambda r, w: ([*TINY, *text_source(r / "binary" / "*.txt")], ["UTF-8"]),
    "missing tokenizer": lambda r, w: ([*TINY, f"--config.data.tokenizer={r / 'gone.json'}"],
                                       ["gone.json"]),
    "corrupt tokenizer": lambda r, w: ([*TINY, f"--config.data.tokenizer={r / 'bad.json'}"],
                                       ["bad.json"]),
    "unknown mode": lambda r, w: ([*TINY, "--mode=bogus"], ["--mode"]),
    "missing config file": lambda r, w: (["--config", "configs/nonexistent.py"],
                                         ["nonexistent.py"]),
    "unwritable workdir": lambda r, w: ([*TINY, "--workdir", str(r / "bad.json" / "run")],
                                        ["not writable"]),
    "eval without a checkpoint": lambda r, w: (["--mode", "eval", "--workdir", str(w)],
                                               ["config.json"]),
    "export without a checkpoint": lambda r, w: (["--mode", "export", "--workdir", str(w),
                                                  "--hf_dir", str(r / "out")], ["config.json"]),
    "import of no model": lambda r, w: (["--mode", "import", "--hf_dir", str(r / "empty"),
                                         "--workdir", str(r / "imported")], ["config.json"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_input_gives_one_line_and_changes_nothing(tmp_path, corpora, name):
    workdir = tmp_path / "run"
    workdir.mkdir()
    args, names = CASES[name](corpora, workdir)
    if "--workdir" not in args:
        args = [*args, "--workdir", str(workdir)]
    before = snapshot(workdir), snapshot(corpora)
    assert_one_line(run(*args), *names)
    assert (snapshot(workdir), snapshot(corpora)) == before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained 2 steps on a small text corpus (its own config.json)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "corpus").mkdir()
    for i in range(40):
        (root / "corpus" / f"{i}.txt").write_text(f"document {i} " * 60)
    workdir = root / "run"
    result = run(*TINY, "--workdir", str(workdir), "--config.data.source=text",
                 f"--config.data.path={root / 'corpus' / '*.txt'}", "--config.train.steps=2",
                 "--config.eval.lengths=(64,)", "--config.eval.sliding_stride=0",
                 "--config.eval.max_batches=1", "--config.data.validation_percent=40")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("args, names", [
    # the workdir was trained on a text corpus: --config's stdlib data section contradicts it
    (["--mode", "eval", *TINY], ["data.source", "stdlib", "text"]),
    (["--mode", "eval", "--config.data.path=/elsewhere/*.txt"], ["data.path"]),
    # a resume with another model (the same corpus), another batch, clipping switched off
    ([*TINY, "SAME_DATA", "--config.model.d_model=32"], ["model.d_model"]),
    (["--config.train.batch_size=16"], ["train.batch_size"]),
    (["--config.train.grad_clip_norm=0"], ["train.grad_clip_norm"]),
])
def test_a_command_that_contradicts_the_workdir_is_refused(trained, args, names):
    before = snapshot(trained)
    same_data = ["--config.data.source=text",
                 f"--config.data.path={trained.parent / 'corpus' / '*.txt'}",
                 "--config.data.validation_percent=40"]
    args = [a for arg in args for a in (same_data if arg == "SAME_DATA" else [arg])]
    assert_one_line(run(*args, "--workdir", str(trained)), *names)
    assert snapshot(trained) == before


@pytest.mark.slow
def test_another_corpus_is_scored_only_under_its_own_eval_name(trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        (other / f"{i}.txt").write_text(f"another text {i} " * 50)
    score = ["--mode", "eval", "--workdir", str(trained), "--config.eval.data.source=text",
             f"--config.eval.data.path={other / '*.txt'}",
             "--config.eval.data.validation_percent=100"]
    assert_one_line(run(*score), "eval.name")
    result = run(*score, "--config.eval.name=other")
    assert result.returncode == 0, result.stderr[-3000:]
    corpus = json.loads((trained / "eval" / "other" / "corpus.json").read_text())
    assert corpus["path"] == str(other / "*.txt")
    # the run's own results are not touched; the other corpus never lands in eval/
    corpus = json.loads((trained / "eval" / "corpus.json").read_text())
    assert corpus["path"].endswith("corpus/*.txt")
    assert_one_line(run("--mode", "eval", "--workdir", str(trained), "--config.eval.name=other"),
                    "another corpus")


@pytest.mark.slow
def test_a_corpus_of_one_huge_line_trains(tmp_path):
    with open(tmp_path / "one.jsonl", "w") as f:
        f.write(json.dumps({"text": "word " * 400_000}) + "\n")
        for i in range(30):
            f.write(json.dumps({"text": f"short document {i} " * 20}) + "\n")
    result = run(*TINY, "--workdir", str(tmp_path / "run"), "--config.data.source=jsonl",
                 f"--config.data.path={tmp_path / 'one.jsonl'}", "--config.train.steps=2",
                 "--config.eval.lengths=(64,)", "--config.eval.sliding_stride=0",
                 "--config.eval.max_batches=1", "--config.data.validation_percent=50")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_workdir_resumes_and_evaluates_without_config(trained):
    """--workdir alone: train resumes from config.json (two more steps: a longer schedule,
    said so), eval reads it."""
    result = run("--workdir", str(trained), "--config.train.steps=4",
                 "--config.train.allow_schedule_change=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step 4/4" in result.stdout
    result = run("--mode", "eval", "--workdir", str(trained), "--config.eval.name=again")
    assert result.returncode == 0, result.stderr[-3000:]
