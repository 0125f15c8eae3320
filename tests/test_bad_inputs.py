"""The catalogue of bad inputs: each gives one line naming the key or file on stderr, a
non-zero exit, and leaves the workdir as it was (main.py, 8 simulated devices)."""
import json
import os
import shutil
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
    # numbers that pass a type check but cannot run
    "steps beyond any run": lambda r, w: ([*TINY, "--config.train.steps=100000000000000000000"],
                                          ["train.steps", "at most 10,000,000"]),
    "a length beyond int32": lambda r, w: ([*TINY, "--config.curriculum.l_max=4294967296"],
                                           ["curriculum.l_max", "at most 2,147,483,647"]),
    "a length no host holds": lambda r, w: ([*TINY, "--config.curriculum.l_max=2147483647"],
                                            ["curriculum level 0", "GiB", "host"]),
    "a batch no host holds": lambda r, w: ([*TINY, "--config.train.batch_size=1073741824"],
                                           ["train.batch_size", "host"]),
    "an evaluation batch no host holds": lambda r, w: (
        [*TINY, "--config.eval.batch_size=1073741824"], ["eval.batch_size", "host"]),
    "no evaluation lengths": lambda r, w: ([*TINY, "--config.eval.lengths=()"],
                                           ["eval.lengths", "non-empty"]),
    "an evaluation name that climbs out": lambda r, w: ([*TINY, "--config.eval.name=../../x"],
                                                        ["eval.name", "plain name"]),
    "an absolute evaluation name": lambda r, w: ([*TINY, f"--config.eval.name={r / 'x'}"],
                                                 ["eval.name", "plain name"]),
    "a hybrid degree above seq": lambda r, w: (
        [*TINY, "--config.mesh.seq=2", "--config.model.attention=hybrid",
         "--config.model.ulysses_degree=4"], ["model.ulysses_degree=4", "mesh seq (2)"]),
    "a rope scaling on learned positions": lambda r, w: (
        [*TINY, "--config.model.position=learned",
         '--config.model.rope.scaling={"rope_type": "linear", "factor": 2.0}'],
        ["model.rope.scaling", "'learned'"]),
    "a ruler qa task without its questions": lambda r, w: (
        [*TINY, '--config.eval.ruler.tasks=("qa_1",)'], ["qa_1", "eval.ruler.qa_path"]),
    # flags
    "an empty workdir": lambda r, w: ([*TINY, "--workdir", ""], ["--workdir is empty"]),
    "a flag train does not use": lambda r, w: ([*TINY, "--hf_dir", str(r / "out")],
                                               ["--mode train does not use --hf_dir"]),
    "overwrite in train": lambda r, w: ([*TINY, "--overwrite"], ["does not use --overwrite"]),
    "a config for compare": lambda r, w: (["--mode", "compare", "--workdirs", str(w), *TINY],
                                          ["--mode compare does not use --config"]),
    # a workdir's config.json that this project did not write
    "a garbage config.json": lambda r, w: (
        ["--mode", "eval", "--workdir", str(write_config(w, "{garbage"))],
        [f"{w / 'config.json'} is not valid JSON"]),
    "a config.json of a list": lambda r, w: (
        ["--mode", "eval", "--workdir", str(write_config(w, "[1, 2]"))],
        ["config.json holds a JSON list"]),
    "a wrongly typed value in config.json": lambda r, w: (
        ["--mode", "eval", "--workdir", str(write_config(w, '{"train": {"steps": "abc"}}'))],
        [f"{w / 'config.json'}: train.steps = 'abc' has the wrong type"]),
    "a value out of range in config.json": lambda r, w: (
        ["--workdir", str(write_config(w, '{"train": {"steps": -3}}'))],
        [f"{w / 'config.json'}: train.steps must be"]),
    "a missing init_from": lambda r, w: ([*TINY, f"--config.train.init_from={r / 'gone'}"],
                                         ["train.init_from", "no such directory"]),
    "an init_from that is no run": lambda r, w: (
        [*TINY, f"--config.train.init_from={r / 'empty'}"],
        ["train.init_from", "is not a workdir"]),
}


def write_config(workdir, text):
    (workdir / "config.json").write_text(text)
    return workdir


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


@pytest.mark.parametrize("args, names", [
    (["--mode", "compare"], ["--mode compare needs --workdirs"]),
    (["--mode", "export", "--workdir", "W"], ["needs --workdir and --hf_dir"]),
    (["--config", os.path.join(REPO, "tests", "small_config.py"), "--distributed=explicit"],
     ["--coordinator_address", "given together"]),
    (["--mode", "eval"], ["--mode eval needs --workdir"]),
])
def test_a_usage_error_is_one_line_that_points_to_help(tmp_path, args, names):
    result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args],
                            cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    line = assert_one_line(result, *names)
    if args[:2] != ["--mode", "eval"]:               # a usage error, not a missing run
        assert "--help" in line
    assert os.listdir(tmp_path) == []


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
    (root / "stdout.txt").write_text(result.stdout)
    return workdir


@pytest.mark.slow
def test_the_main_job_ends_with_where_its_results_are(trained):
    last = (trained.parent / "stdout.txt").read_text().strip().splitlines()[-1]
    summary = trained / "eval" / "summary.md"
    assert last.startswith(f"results: {summary} ") and summary.is_file()
    assert str(trained / "metrics.jsonl") in last


@pytest.mark.slow
def test_a_refused_evaluation_leaves_nothing_and_the_corrected_one_runs(trained):
    before = snapshot(trained)
    refused = run("--mode", "eval", "--workdir", str(trained), "--config.eval.name=fixed",
                  "--config.eval.lengths=(2147483647,)")
    assert_one_line(refused, "eval.batch_size", "host")
    assert snapshot(trained) == before
    result = run("--mode", "eval", "--workdir", str(trained), "--config.eval.name=fixed",
                 "--config.eval.lengths=(64,)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((trained / "eval" / "fixed" / "settings.json").read_text())["lengths"] == [64]


@pytest.mark.slow
def test_generation_beyond_the_hosts_memory_is_one_line(trained):
    before = snapshot(trained)
    result = run("--mode", "generate", "--workdir", str(trained), "--config.generate.prompt=ab",
                 "--config.generate.max_new_tokens=2147483647")
    assert_one_line(result, "generate.max_new_tokens", "GiB", "host")
    assert snapshot(trained) == before


@pytest.mark.slow
def test_a_run_whose_checkpoints_are_all_broken_stops_until_told_to_start_over(trained,
                                                                              tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for step in (workdir / "checkpoints").iterdir():
        shutil.rmtree(step / "state")                  # every checkpoint loses its arrays
    history = (workdir / "metrics.jsonl").read_bytes()
    first = run("--workdir", str(workdir))
    assert_one_line(first, "no intact checkpoint", "--start_over")
    assert sorted(os.listdir(workdir / "broken_checkpoints"))
    assert not os.listdir(workdir / "checkpoints")
    before = snapshot(workdir)
    again = run("--workdir", str(workdir))             # nothing left to restore: still refused
    assert_one_line(again, "no intact checkpoint", "broken_checkpoints", "--start_over")
    assert snapshot(workdir) == before
    assert (workdir / "metrics.jsonl").read_bytes() == history
    over = run("--workdir", str(workdir), "--start_over")
    assert over.returncode == 0, over.stderr[-3000:]
    [kept] = [name for name in os.listdir(workdir) if name.startswith("metrics.jsonl.before")]
    assert (workdir / kept).read_bytes() == history
    assert sorted(os.listdir(workdir / "broken_checkpoints"))
    assert '"step": 1' in (workdir / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("args, names", [
    # the workdir was trained on a text corpus: --config's stdlib data section contradicts it
    (["--mode", "eval", *TINY], ["data.source", "stdlib", "text"]),
    (["--mode", "eval", "--config.data.path=/elsewhere/*.txt"], ["data.path"]),
    # a resume with another model (the same corpus), another batch, clipping switched off
    ([*TINY, "SAME_DATA", "--config.model.d_model=32"], ["model.d_model"]),
    (["--config.train.batch_size=16"], ["train.batch_size"]),
    (["--config.train.grad_clip_norm=0"], ["train.grad_clip_norm"]),
    # a shorter schedule that ends before the step the run has reached
    (["--config.train.steps=1", "--config.train.allow_schedule_change=True"],
     ["train.steps=1", "already is"]),
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
