"""lm-evaluation-harness (the `lm-eval` package): the BoundlessLM's log-likelihoods equal
the model's own teacher-forced log-probabilities, rolling log-likelihoods are the sum over
lm-eval's windows, generation stops at `until`, and `main.py --mode lm_eval` runs local
multiple-choice and generation tasks (task YAMLs over local JSON files) end to end."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from data.tokenizers import ByteTokenizer
from evaluation.lm_eval_model import BoundlessLM, bucket_length, cut_at_stops
from parallel import mesh as mesh_lib
from tests.helpers import small_config
from cli import lm_eval_mode
from train.state import init_state
from configs.sections import settings as settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L_MAX = 64      # small_config's trained length


@pytest.fixture(scope="module")
def built():
    """(lm, run, params) of a freshly initialised small model on one device."""
    config = small_config()
    config.lm_eval.batch_size = 3
    run, generation_config = lm_eval_mode.model_pieces(settings_of(config), jax.devices()[:1])
    params = init_state(run, 0)["params"]
    lm = lm_eval_mode.make_lm(settings_of(config), run, generation_config, params, L_MAX)
    return lm, run, params


def reference_loglikelihood(run, params, tokens, n):
    """sum of log p(tokens[-n:]) from the model's logits over the whole sequence, and
    whether each of those tokens is the argmax."""
    with mesh_lib.use_mesh(run.mesh):
        model = nnx.merge(run.graphdef, params)
        logits = np.asarray(model(np.asarray(tokens[:-1], np.int32)[None]))[0]
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.asarray(tokens[1:])
    picked = logp[np.arange(len(targets)), targets][-n:]
    greedy = np.all(logits.argmax(-1)[-n:] == targets[-n:])
    return float(picked.sum()), bool(greedy)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.mark.slow
def test_loglikelihood_equals_the_models_teacher_forced_log_probabilities(built):
    lm, run, params = built
    pairs = [("The quick brown", " fox"), ("def main(", "):\n    return 0"),
             ("", "hello"), ("x" * 90, " tail beyond the trained length")]
    got = lm.loglikelihood([request("loglikelihood", c, t) for c, t in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            whole = list((context + continuation).encode())
        else:
            whole = [lm.prefix_id] + list(continuation.encode())
        whole = whole[-(L_MAX + 1):]
        expected, expected_greedy = reference_loglikelihood(
            run, params, whole, len(continuation.encode()))
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy
        assert logprob < 0


def test_the_continuation_takes_the_contexts_trailing_space():
    lm = BoundlessLM(score=None, generate=None, tokenizer=ByteTokenizer(), max_length=L_MAX,
                     prefix_id=7)
    assert lm.encode_pair("Answer: ", "yes") == (list(b"Answer:"), list(b" yes"))
    assert lm.encode_pair("", "ab") == ([7], list(b"ab"))
    assert lm.rolling_windows("abcdef") == [([7], list(b"abcdef"))]


@pytest.mark.slow
def test_loglikelihood_rolling_is_the_sum_over_lm_evals_windows(built):
    lm, run, params = built
    text = "rolling windows over a text longer than the trained length. " * 3   # 180 bytes
    windows = lm.rolling_windows(text)
    assert len(windows) == 3
    assert sum(len(continuation) for _, continuation in windows) == len(text.encode())
    expected = sum(reference_loglikelihood(run, params, list(context) + list(continuation),
                                           len(continuation))[0]
                   for context, continuation in windows)
    [got] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert got == pytest.approx(expected, rel=1e-5)
    # a text within one window is the plain log-likelihood after the prefix token
    short = "short text"
    [rolled] = lm.loglikelihood_rolling([request("loglikelihood_rolling", short)])
    [(plain, _)] = lm.loglikelihood([request("loglikelihood", "", short)])
    assert rolled == pytest.approx(plain, rel=1e-6)


@pytest.mark.slow
def test_generate_until_is_greedy_and_cut_at_the_until_string(built):
    lm, run, params = built
    prompt = "abc"
    [full] = lm.generate_until([request("generate_until", prompt, {"until": [],
                                                                   "max_gen_toks": 12})])
    # greedy: the argmax continuation, token by token, from full forward passes
    tokens = list(prompt.encode())
    with mesh_lib.use_mesh(run.mesh):
        model = nnx.merge(run.graphdef, params)
        forward = jax.jit(lambda ids: model(ids))
        for _ in range(12):         # causal: zeros after the sequence change nothing before
            padded = np.zeros((1, 16), np.int32)
            padded[0, :len(tokens)] = tokens
            tokens.append(int(np.asarray(forward(padded))[0, len(tokens) - 1].argmax()))
    greedy = bytes(tokens[3:]).decode("utf-8", errors="replace")
    assert full == greedy
    stop = full[4:6]
    assert stop and stop in full
    [cut] = lm.generate_until([request("generate_until", prompt,
                                       {"until": [stop], "max_gen_toks": 12,
                                        "do_sample": False})])
    assert cut == full[:full.find(stop)]
    assert stop not in cut
    # sampling: the seed makes it repeatable; two requests of one length share a batch
    sampled = {"until": [], "max_gen_toks": 8, "temperature": 1.0, "top_p": 0.9,
               "do_sample": True}
    first = lm.generate_until([request("generate_until", "xyz", sampled),
                               request("generate_until", "uvw", sampled)])
    again = lm.generate_until([request("generate_until", "xyz", sampled)])
    assert first[0] == again[0] and all(len(t.encode("utf-8", "replace")) >= 1 for t in first)


def test_cut_at_stops_and_length_buckets():
    assert cut_at_stops("a, b. c", [".", ","]) == "a"
    assert cut_at_stops("abc", ["x"]) == "abc"
    assert bucket_length(5, 64) == 8 and bucket_length(65, 64) == 65
    assert bucket_length(100, 1024) == 128 and bucket_length(33, 64) == 64


# ------------------------------------------------------------------ main.py, local tasks
MC_DOCS = [{"question": "Q: the opposite of up?\nA:", "choices": [" down", " left"], "answer": 0},
           {"question": "Q: 2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
           {"question": "Q: def main(", "choices": ["):", "]]"], "answer": 0}]
GEN_DOCS = [{"prompt": "import ", "answer": "os"}, {"prompt": "def ", "answer": "main"}]


def write_local_tasks(directory):
    """A multiple-choice and a generation task over local JSON files, as task YAMLs."""
    os.makedirs(directory, exist_ok=True)
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in docs)
    header = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    with open(os.path.join(directory, "boundless_mc.yaml"), "w") as f:
        f.write("task: boundless_mc\n" + header.format(os.path.join(directory, "mc.jsonl"))
                + textwrap.dedent("""\
                    output_type: multiple_choice
                    doc_to_text: "{{question}}"
                    doc_to_choice: "{{choices}}"
                    doc_to_target: "{{answer}}"
                    metric_list:
                      - metric: acc
                    """))
    with open(os.path.join(directory, "boundless_gen.yaml"), "w") as f:
        f.write("task: boundless_gen\n" + header.format(os.path.join(directory, "gen.jsonl"))
                + textwrap.dedent("""\
                    output_type: generate_until
                    doc_to_text: "{{prompt}}"
                    doc_to_target: "{{answer}}"
                    generation_kwargs:
                      until: ["\\n", " "]
                      max_gen_toks: 6
                      do_sample: false
                    metric_list:
                      - metric: exact_match
                    """))
    return directory


@pytest.mark.slow
def test_main_lm_eval_runs_local_tasks_and_writes_the_results(trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    tasks = write_local_tasks(str(tmp_path / "tasks"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "main.py", "--mode", "lm_eval", "--workdir", workdir,
         "--config.lm_eval.tasks=boundless_mc,boundless_gen",
         f"--config.lm_eval.include_path={tasks}", "--config.lm_eval.batch_size=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "run" / "eval" / "lm_eval.json").read_text())
    assert set(written["results"]) == {"boundless_mc", "boundless_gen"}
    assert 0 <= written["results"]["boundless_mc"]["acc,none"] <= 1
    assert 0 <= written["results"]["boundless_gen"]["exact_match,none"] <= 1
    assert written["boundless"]["step"] == 8 and written["boundless"]["max_length"] == L_MAX
    assert "boundless_mc" in result.stdout and "acc" in result.stdout     # the table


def test_the_window_is_the_trained_length_unless_max_length_says_otherwise(built):
    _, run, _ = built
    config = small_config()
    assert lm_eval_mode.window_length(settings_of(config), run.model_config) == (L_MAX, None)
    config.lm_eval.max_length = 4 * L_MAX
    length, notice = lm_eval_mode.window_length(settings_of(config), run.model_config)
    assert length == 4 * L_MAX
    assert notice.startswith(f"note: lm-eval requests may reach {4 * L_MAX} tokens, beyond "
                             f"the trained length {L_MAX}")


def test_a_window_beyond_a_learned_position_table_is_refused():
    config = small_config()
    config.model.position = "learned"
    config.lm_eval.max_length = 2 * L_MAX
    run, _ = lm_eval_mode.model_pieces(settings_of(config), jax.devices()[:1])
    with pytest.raises(ValueError, match=r"lm_eval.max_length = 128: learned absolute "
                                         r"positions stop at l_max=64"):
        lm_eval_mode.window_length(settings_of(config), run.model_config)


@pytest.mark.slow
def test_main_lm_eval_without_tasks_is_one_line(trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    result = subprocess.run(
        [sys.executable, "main.py", "--mode", "lm_eval", "--workdir", workdir],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2
    assert "lm_eval.tasks is empty" in result.stderr


@pytest.mark.slow
def test_scores_and_generations_on_two_sequence_devices_match_one(built):
    """generate.seq = 2: scoring by ring attention over 2 devices, generation with a ring
    prefill and a split cache; the same numbers as on one device."""
    lm, run, params = built
    config = small_config()
    config.lm_eval.batch_size = 3
    run2, generation_config = lm_eval_mode.model_pieces(settings_of(config), jax.devices()[:2])
    assert run2.mesh.shape["seq"] == 2 and run2.model_config.attention == "ring"
    params2 = jax.device_put(jax.device_get(params), run2.state_shardings["params"])
    lm2 = lm_eval_mode.make_lm(settings_of(config), run2, generation_config, params2, L_MAX)
    pairs = [request("loglikelihood", "The quick brown", " fox jumps"),
             request("loglikelihood", "y" * 70, " over the lazy dog")]
    for (one, greedy_one), (two, greedy_two) in zip(lm.loglikelihood(pairs),
                                                    lm2.loglikelihood(pairs)):
        assert two == pytest.approx(one, rel=1e-5, abs=1e-4) and greedy_one == greedy_two
    text = "a rolling text over two windows of the trained length. " * 2
    [rolled] = lm2.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert rolled == pytest.approx(
        lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0], rel=1e-5)
    generation = request("generate_until", "def main(", {"until": [], "max_gen_toks": 10})
    assert lm2.generate_until([generation]) == lm.generate_until([generation])


@pytest.mark.slow
def test_main_lm_eval_with_an_unknown_task_is_one_line(trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    tasks = write_local_tasks(str(tmp_path / "tasks"))
    result = subprocess.run(
        [sys.executable, "main.py", "--mode", "lm_eval", "--workdir", workdir,
         "--config.lm_eval.tasks=boundless_mcq", f"--config.lm_eval.include_path={tasks}"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2
    assert "no task 'boundless_mcq'; did you mean boundless_mc" in result.stderr
    assert not os.path.exists(os.path.join(workdir, "eval", "lm_eval.json"))


@pytest.mark.slow
def test_main_lm_eval_names_a_task_yaml_that_does_not_parse(trained_workdir, tmp_path):
    """lm-eval skips a task file it cannot read; its task must not then look unknown."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    tasks = write_local_tasks(str(tmp_path / "tasks"))
    broken = os.path.join(tasks, "boundless_broken.yaml")
    with open(broken, "w") as f:
        f.write("task: boundless_broken\noutput_type: [multiple_choice\n")
    result = subprocess.run(
        [sys.executable, "main.py", "--mode", "lm_eval", "--workdir", workdir,
         "--config.lm_eval.tasks=boundless_broken", f"--config.lm_eval.include_path={tasks}"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "'boundless_broken'" in line and broken in line and "not valid YAML" in line
    assert not os.path.exists(os.path.join(workdir, "eval", "lm_eval.json"))

