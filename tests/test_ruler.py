"""RULER tasks (evaluation/ruler.py): structure against RULER's definitions, length budget,
determinism, scorers and the effective-length rule. Fast: no model."""
import re
from collections import Counter

import pytest

from data.tokenizers import ByteTokenizer
from evaluation import ruler
from tests.helpers import assert_drawn_png

TOK = ByteTokenizer()


def count(text):
    return len(TOK.encode(text))


HAYSTACK = ("Rivers carry water to the sea. Mountains rise slowly over long ages. People build "
            "towns near rivers! Why do birds sing at dawn? Nobody knows for certain. ") * 40


def sample(task, length=4096, seed=0, index=0):
    return ruler.make_sample(task, length, seed=seed, index=index, count_tokens=count,
                             haystack=HAYSTACK)


NIAH_COUNTS = {  # task: (keys in prompt as needles, values per key, queries)
    "niah_single_1": (1, 1, 1), "niah_single_2": (1, 1, 1), "niah_single_3": (1, 1, 1),
    "niah_multikey_1": (4, 1, 1), "niah_multikey_2": (1, 1, 1), "niah_multikey_3": (1, 1, 1),
    "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4),
}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest.mark.parametrize("task", sorted(NIAH_COUNTS))
def test_niah_structure(task):
    keys, values, queries = NIAH_COUNTS[task]
    spec = ruler.NIAH[task]
    s = sample(task)
    info = s["info"]
    assert len(info["keys"]) == keys and all(len(v) == values for v in info["values"])
    assert len(info["queries"]) == queries and info["needles"] == keys * values
    assert len(s["answers"]) == queries * values
    assert s["max_new_tokens"] == 128
    prompt = s["prompt"]
    kind = spec["value"] if queries * values > 1 else spec["value"][:-1]
    for key, vals in zip(info["keys"], info["values"]):
        for v in vals:      # every needle is in the prompt, in RULER's wording
            assert f"One of the special magic {spec['value']} for {key} is: {v}." in prompt
    for a in s["answers"]:
        assert a in prompt
    verb = "is" if queries * values == 1 else "are"
    assert prompt.endswith(f" mentioned in the provided text {verb}")
    assert f"special magic {kind} for" in prompt
    if spec["value"] == "numbers":
        assert all(re.fullmatch(r"\d{7}", a) for a in s["answers"])
    else:
        assert all(re.fullmatch(UUID, a) for a in s["answers"])
    if spec["key"] == "uuids":
        assert all(re.fullmatch(UUID, k) for k in info["keys"])
    else:
        assert all(k in ruler.KEY_WORDS for k in info["keys"])
    if spec["haystack"] == "noise":
        assert prompt.count(ruler.NOISE) == s["haystack_size"]
    elif spec["haystack"] == "essay":
        assert "Rivers carry water" in prompt and ruler.NOISE not in prompt
    else:                           # needle haystack: haystack lines are needles too
        assert prompt.count("One of the special magic") == s["haystack_size"] + keys * values


def test_niah_singular_wording():
    p = sample("niah_single_1")["prompt"]
    assert p.startswith("A special magic number is hidden within the following text.")
    assert "What is the special magic number for" in p
    p = sample("niah_multivalue")["prompt"]
    assert p.startswith("Some special magic numbers are hidden")


def test_vt_structure():
    s = sample("vt")
    assert s["max_new_tokens"] == 30
    (chain,) = s["info"]["chains"]        # 1 chain of 4 hops = 5 variables
    assert len(chain) == 5 and len(s["answers"]) == 5
    value = chain[0].split("=")[-1].strip()
    assert re.fullmatch(r"\d{5}", value)
    names = s["answers"]
    assert all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert f"VAR {names[0]} = {value}" in s["prompt"]
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}" in s["prompt"]
    assert s["prompt"].endswith(f"5 variables are assigned the value {value}, they are: ")
    # one in-context example before the question, with its own answer
    assert s["prompt"].count("Memorize and track the chain(s)") == 2


def cwe_list(prompt):
    """The words of the question's list (after the in-context example)."""
    text = prompt.split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion:")[0]
    return re.findall(r"\d+\. (\S+)", text)


def test_cwe_structure():
    s = sample("cwe", 16384)
    assert s["max_new_tokens"] == 120 and len(s["answers"]) == 10
    words = cwe_list(s["prompt"])
    counts = Counter(words)
    assert all(counts[a] == 30 for a in s["answers"])
    assert all(c == 3 for w, c in counts.items() if w not in s["answers"])
    assert len(counts) == s["info"]["words"]
    assert s["prompt"].count("Below is a numbered list of words.") == 2


def test_cwe_below_4096_uses_6_and_1():
    s = ruler.make_sample("cwe", 8192, seed=0, count_tokens=lambda t: count(t) // 4)
    assert s["length"] == 8192
    s = ruler.make_sample("cwe", 2048, seed=0, count_tokens=lambda t: count(t) // 4)
    words = cwe_list(s["prompt"])
    counts = Counter(words)
    assert all(counts[a] == 6 for a in s["answers"])
    assert all(c == 1 for w, c in counts.items() if w not in s["answers"])


def test_fwe_structure():
    s = sample("fwe")
    assert s["max_new_tokens"] == 50 and len(s["answers"]) == 3
    counts = s["info"]["counts"]
    vocab = list(counts)
    assert vocab[0] == "..." and s["answers"] == vocab[1:4]
    assert len(vocab) == (4096 - 50) // 50
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in vocab[1:])
    text = Counter(s["prompt"].split("coded words. ")[1].split("\nQuestion:")[0].split(" "))
    assert [text[w] for w in vocab[:4]] == [counts[w] for w in vocab[:4]]
    assert counts[vocab[1]] > counts[vocab[2]] > counts[vocab[3]] > 0   # zeta(2) ranks


@pytest.mark.parametrize("length", [256, 1024, 4096])
@pytest.mark.parametrize("task", ruler.SYNTHETIC_TASKS)
def test_length_budget(task, length):
    try:
        s = sample(task, length)
    except ruler.RulerTooShort as error:
        assert str(length) in str(error)
        # byte tokens: nothing fits 256; vt's in-context example and cwe's lists need more
        assert length == 256 or task in ("vt", "cwe")
        return
    budget = length - s["max_new_tokens"]
    assert s["tokens"] == count(s["prompt"])
    assert 0.75 * budget <= s["tokens"] <= budget
    assert s["length"] == length and s["task"] == task


def test_budget_with_coarse_tokenizer():
    # a tokenizer with 4 bytes a token: every task fits 4096 and fills 75%-100%
    for task in ruler.SYNTHETIC_TASKS:
        s = ruler.make_sample(task, 4096, seed=1, count_tokens=lambda t: -(-count(t) // 4),
                              haystack=HAYSTACK)
        budget = 4096 - s["max_new_tokens"]
        assert 0.75 * budget <= s["tokens"] <= budget, task


@pytest.mark.parametrize("task", ruler.SYNTHETIC_TASKS)
def test_deterministic(task):
    a, b = sample(task, 8192, seed=3, index=1), sample(task, 8192, seed=3, index=1)
    assert a == b
    c = sample(task, 8192, seed=4, index=1)
    d = sample(task, 8192, seed=3, index=2)
    assert c["prompt"] != a["prompt"] and d["prompt"] != a["prompt"]


def test_essay_needs_haystack_and_qa_skipped():
    with pytest.raises(ValueError, match="haystack"):
        ruler.make_sample("niah_single_2", 4096, seed=0, count_tokens=count)
    tasks, skipped = ruler.resolve_tasks(("all",), None)
    assert tasks == list(ruler.SYNTHETIC_TASKS)
    assert set(skipped) == {"qa_1", "qa_2"} and "qa_path" in skipped["qa_1"]
    tasks, _ = ruler.resolve_tasks(("all",), "/some/squad.json")
    assert tasks == list(ruler.ALL_TASKS)
    with pytest.raises(ValueError, match=r"^unknown RULER task 'nope'; known: "):
        ruler.resolve_tasks(("nope",), None)
    samples, skipped = ruler.make_samples(["niah_single_1", "vt"], [256, 4096], 2, seed=0,
                                          count_tokens=count)
    assert [(s["task"], s["length"]) for s in samples] == [("niah_single_1", 4096)] * 2 + \
        [("vt", 4096)] * 2
    assert set(skipped) == {"niah_single_1@256", "vt@256"}


def test_qa_from_local_squad(tmp_path):
    import json
    data = {"data": [{"paragraphs": [
        {"context": f"Paragraph {i} says the colour of box {i} is shade{i}.",
         "qas": [{"question": f"What colour is box {i}?", "is_impossible": False,
                  "answers": [{"text": f"shade{i}"}]}]} for i in range(200)]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    s = ruler.make_sample("qa_1", 2048, seed=0, count_tokens=count, qa_path=str(path))
    assert s["max_new_tokens"] == 32 and len(s["answers"]) == 1
    assert 0.75 * (2048 - 32) <= s["tokens"] <= 2048 - 32
    box = s["answers"][0][len("shade"):]
    assert f"the colour of box {box} is shade{box}" in s["prompt"]
    assert s["prompt"].endswith(f"Question: What colour is box {box}? Answer:")


def test_scorers():
    refs = [["1234567", "7654321"], ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]]
    preds = ["the numbers are 1234567 and 42", "abcde fghij klmno pqrst"]
    assert ruler.string_match_all(preds, refs) == 75.0          # (1/2 + 4/4) / 2
    assert ruler.string_match_part(preds, refs) == 100.0
    assert ruler.string_match_part(["nothing"], [["a1", "b2"]]) == 0.0
    assert ruler.score_sample("qa_1", "It is Paris.", ["paris", "Lyon"]) == 100.0
    assert ruler.score_sample("niah_multivalue", "1 2", ["1", "2", "3", "4"]) == 50.0


def test_effective_length():
    mean = {"1024": 99.0, "2048": 90.0, "4096": 86.0, "8192": 80.0, "16384": 95.0}
    assert ruler.effective_length(mean) == 4096                 # 16384 passes but 8192 fails
    assert ruler.effective_length(mean, threshold=90.0) == 1024  # > threshold, strictly
    assert ruler.effective_length({"1024": 85.6, "2048": 99.0}) is None
    assert ruler.effective_length({1024: 99.0, 2048: None, 4096: 99.0}) == 1024
    assert ruler.effective_length({}) is None


def test_summarise():
    records = [dict(task="niah_single_1", length=L, answers=["1234567"], prediction=p)
               for L, p in [(64, "1234567"), (64, "no"), (128, "x")]]
    records += [dict(task="vt", length=L, answers=["AB", "CD"], prediction="AB CD")
                for L in (64, 128)]
    out = ruler.summarise(records, [64, 128], ["niah_single_1", "vt"], {"qa_1": "why"})
    assert out["tasks"] == {"niah_single_1": {"64": 50.0, "128": 0.0},
                            "vt": {"64": 100.0, "128": 100.0}}
    assert out["mean"] == {"64": 75.0, "128": 50.0}
    assert out["effective_length"] is None and out["threshold"] == 85.6
    assert out["skipped"] == {"qa_1": "why"}


def test_config_task_names_match():
    from configs import base
    assert base.RULER_TASKS == ruler.ALL_TASKS
    r = base.get_config().eval.ruler
    assert tuple(r.tasks) == () and r.lengths is None and r.threshold == 85.6


RULER_JSON = {"tasks": {"niah_single_1": {"1024": 100.0, "2048": 90.0, "4096": None},
                        "vt": {"1024": 80.0, "2048": 50.0, "4096": None}},
              "mean": {"1024": 90.0, "2048": 70.0, "4096": None}, "effective_length": 1024,
              "threshold": 85.6, "skipped": {"qa_1": "no file", "vt@4096": "too short"}}


def test_report_writes_ruler_plots_summary_and_compare(tmp_path):
    import json
    import os

    from evaluation import report
    runs = []
    for name in ("a", "b"):
        eval_dir = tmp_path / name / "eval"
        eval_dir.mkdir(parents=True)
        (eval_dir / "perplexity_by_length.json").write_text(
            json.dumps({"lengths": [64], "perplexity": [10.0], "l_max": 64}))
        (eval_dir / "ruler.json").write_text(json.dumps(RULER_JSON))
        runs.append(str(tmp_path / name))
    paths = report.write_plots(runs[0] + "/eval")
    assert {os.path.basename(p) for p in paths} >= {"ruler_heatmap.png", "ruler_by_length.png"}
    for path in paths:
        assert_drawn_png(path)
    summary = report.write_summary(runs[0] + "/eval")
    assert "## RULER" in summary and "Effective length: 1024" in summary
    assert re.search(r"\| niah_single_1\s+\|\s+100\.0 \|\s+90\.0 \|\s+\|", summary)
    assert re.search(r"\| \*\*mean\*\*\s+\|\s+90\.000 \|\s+70\.000 \|", summary)
    assert "skipped vt@4096: too short" in summary
    markdown = report.compare(runs, str(tmp_path / "out"))
    assert "## RULER mean score by length" in markdown
    assert len(re.findall(r"\|\s+1024 \|\s+90\.000 \|\s+70\.000 \|", markdown)) == 2
    tasks, lengths, matrix = report.ruler_matrix(RULER_JSON)
    assert lengths == [1024, 2048, 4096] and matrix.shape == (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [
    {"model.attention": "ring", "mesh.seq": 2, "mesh.data": 4,   # ring prefill over seq
     "eval.batch_size": 4},
    {},                                      # the run's data-parallel mesh: one-device decode
], ids=["ring_seq2", "one_device"])
def test_ruler_end_to_end_on_the_trained_workdir(trained_workdir, tmp_path, mesh):
    """--mode eval with eval.ruler set on a copy of the shared workdir. Byte tokens:
    RULER's templates do not fit 64 or 128 tokens (skipped with the reason), 1024 is
    scored."""
    import json
    import os
    import shutil

    from tests.helpers import small_config
    from cli.eval_mode import evaluate_workdir
    work = str(tmp_path / "run")
    shutil.copytree(trained_workdir, work)
    config = small_config(**mesh, **{"eval.name": "ruler"})
    config.eval.ruler.tasks = ("niah_single_1", "fwe")
    config.eval.ruler.samples = 1
    config.eval.ruler.lengths = (64, 128, 1024)
    evaluate_workdir(config, work)
    out = os.path.join(work, "eval", "ruler")
    for name in ("ruler.json", "ruler_samples.jsonl", "ruler_heatmap.png",
                 "ruler_by_length.png", "summary.md"):
        assert os.path.exists(os.path.join(out, name)), name
    result = json.load(open(os.path.join(out, "ruler.json")))
    assert set(result["tasks"]) == {"niah_single_1", "fwe"}
    for row in result["tasks"].values():
        assert list(row) == ["64", "128", "1024"]
        assert row["64"] is None and row["128"] is None and 0 <= row["1024"] <= 100
    assert set(result["mean"]) == {"64", "128", "1024"} and result["threshold"] == 85.6
    assert result["effective_length"] is None          # the shortest lengths have no score
    assert {"niah_single_1@64", "fwe@128"} <= set(result["skipped"])
    records = [json.loads(line) for line in open(os.path.join(out, "ruler_samples.jsonl"))]
    assert [(r["task"], r["length"]) for r in records] == [("niah_single_1", 1024),
                                                           ("fwe", 1024)]
    for r in records:
        assert set(r) == {"task", "length", "tokens", "prompt", "answers", "prediction", "score"}
        assert r["tokens"] <= 1024 and isinstance(r["prediction"], str)
        assert r["score"] == ruler.score_sample(r["task"], r["prediction"], r["answers"])
    assert "## RULER" in open(os.path.join(out, "summary.md")).read()


def test_qa_from_local_hotpotqa(tmp_path):
    import json
    data = [{"question": f"Who owns box {i}?", "answer": f"owner{i}",
             "context": [[f"Box {i}", [f"Box {i} belongs to owner{i}.", " It is red."]],
                         [f"Shelf {i}", [f"Shelf {i} holds box {i}."]]]} for i in range(100)]
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(data))
    s = ruler.make_sample("qa_2", 4096, seed=0, count_tokens=count, qa_path=str(path))
    box = s["answers"][0][len("owner"):]
    assert f"Box {box}\nBox {box} belongs to owner{box}. It is red." in s["prompt"]
    assert f"Shelf {box}\nShelf {box} holds box {box}." in s["prompt"]
    assert 0.75 * (4096 - 32) <= s["tokens"] <= 4096 - 32
    assert ruler.score_sample("qa_2", f"It is owner{box}", s["answers"]) == 100.0
