"""Tests of data/retrieval_tasks.py (synthetic retrieval samples) and evaluation/retrieval.py
(teacher-forced rows, scores)."""
import re

import numpy as np
import pytest

from data import retrieval_tasks
from data.retrieval_tasks import SampleTooShort
from data.tokenizers import make_tokenizer
from evaluation import retrieval

BYTES = make_tokenizer("bytes")
LENGTHS = (180, 257, 1000, 4096)

# The needle as text (bytes tokenizer: token index == character index); group 1 = answer.
NEEDLE = {
    "passkey": re.compile(r" Important: the pass key is( \d{5})\. Keep this number in mind\."),
    "kv": re.compile(r'"([0-9a-f]{8})": "([0-9a-f]{8})",\n'),
    "line": re.compile(r"line (\d+): the number is( \d{5})\.\n"),
}
ANSWER_GROUP = {"passkey": 1, "kv": 2, "line": 2}


def text(ids):
    return BYTES.decode(ids)


def needle_match(sample):
    needle = text(sample.prompt[sample.needle_start:sample.needle_start + sample.needle_length])
    match = NEEDLE[sample.task].fullmatch(needle)
    assert match, f"no {sample.task} needle at needle_start: {needle!r}"
    return match


def max_unit_tokens(task):
    """The longest filler unit in bytes."""
    if task == "passkey":
        return max(len(s) for s in retrieval_tasks.PASSKEY_FILLER)
    if task == "kv":
        return len('"01234567": "89abcdef",\n')
    return len("line 123456: the number is 12345.\n")


class ChunkTokenizer:
    """A toy tokenizer unlike bytes: runs of up to 3 characters are one token, and text that
    is only whitespace encodes to nothing (as SentencePiece does with " ")."""

    def __init__(self):
        self.vocab, self.pieces = {}, []

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text):
        if not text.strip():
            return np.zeros(0, np.int32)
        ids = []
        for i in range(0, len(text), 3):
            piece = text[i:i + 3]
            if piece not in self.vocab:
                self.vocab[piece] = len(self.pieces)
                self.pieces.append(piece)
            ids.append(self.vocab[piece])
        return np.asarray(ids, np.int32)

    def decode(self, ids):
        return "".join(self.pieces[int(i)] for i in ids)


# --- make_sample --------------------------------------------------------------------------

@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_total_length_is_exact(task):
    for length in LENGTHS:
        for depth in (0.0, 0.37, 1.0):
            sample = retrieval_tasks.make_sample(task, BYTES, length=length, depth=depth, seed=5)
            assert sample.prompt.size + sample.answer.size == length
            assert sample.prompt.dtype == np.int32 and sample.answer.dtype == np.int32
            assert sample.answer.size >= 1


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_total_length_is_exact_with_another_tokenizer(task):
    tokenizer = ChunkTokenizer()  # " " encodes to nothing: the pad is "." here
    for length in (150, 333, 2000):
        sample = retrieval_tasks.make_sample(task, tokenizer, length=length, depth=0.6, seed=2)
        assert sample.prompt.size + sample.answer.size == length
    assert retrieval_tasks.pad_token(tokenizer) == tokenizer.vocab["."]


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_same_seed_same_sample_other_seed_different(task):
    def make(seed):
        return retrieval_tasks.make_sample(task, BYTES, length=1000, depth=0.5, seed=seed)

    a, b, c = make(11), make(11), make(12)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    np.testing.assert_array_equal(a.answer, b.answer)
    assert a.needle_start == b.needle_start
    assert not np.array_equal(a.answer, c.answer)


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_is_at_the_requested_depth(task, depth):
    for length in LENGTHS:
        sample = retrieval_tasks.make_sample(task, BYTES, length=length, depth=depth, seed=3)
        available = sample.question_start - sample.needle_length
        assert sample.available == available > 0
        needle_match(sample)
        tolerance = max_unit_tokens(task) / available
        assert abs(sample.needle_start / available - depth) <= tolerance


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_depth_zero_and_one_are_the_ends_of_the_context(task):
    first = retrieval_tasks.make_sample(task, BYTES, length=1000, depth=0.0, seed=4)
    last = retrieval_tasks.make_sample(task, BYTES, length=1000, depth=1.0, seed=4)
    assert first.needle_start == 0
    assert last.needle_start + last.needle_length == last.question_start


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_answer_occurs_once_in_the_prompt_inside_the_needle(task):
    for seed in range(4):
        for length in LENGTHS:
            sample = retrieval_tasks.make_sample(task, BYTES, length=length, depth=0.3, seed=seed)
            prompt, answer = text(sample.prompt), text(sample.answer)
            assert prompt.count(answer) == 1
            at = prompt.index(answer)
            assert sample.needle_start <= at
            assert at + len(answer) <= sample.needle_start + sample.needle_length
            assert needle_match(sample).group(ANSWER_GROUP[task]) == answer


@pytest.mark.parametrize("task", ["kv", "line"])
def test_answer_stays_unique_when_draws_collide(task, monkeypatch):
    # Tiny value spaces make repeated keys, values and labels certain but for the guards.
    monkeypatch.setattr(retrieval_tasks, "KV_SPACE", 64)
    monkeypatch.setattr(retrieval_tasks, "LINE_VALUES", (10000, 10003))
    monkeypatch.setattr(retrieval_tasks, "LINE_LABELS", (100000, 100400))
    for seed in range(10):
        sample = retrieval_tasks.make_sample(task, BYTES, length=300 if task == "kv" else 1500,
                                             depth=0.5, seed=seed)
        prompt = text(sample.prompt)
        assert prompt.count(text(sample.answer)) == 1
        # keys and values (kv), labels (line) are all distinct
        names = re.findall(r'"[0-9a-f]{8}"' if task == "kv" else r"line (\d+):",
                           prompt[:sample.question_start])
        assert len(names) == len(set(names)) > 5


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_answer_ids_appear_verbatim_in_the_needle(task):
    tokenizer = ChunkTokenizer()
    sample = retrieval_tasks.make_sample(task, tokenizer, length=800, depth=0.5, seed=9)
    needle = sample.prompt[sample.needle_start:sample.needle_start + sample.needle_length]
    n = sample.answer.size
    windows = [needle[i:i + n] for i in range(needle.size - n + 1)]
    assert any(np.array_equal(w, sample.answer) for w in windows)


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_question_is_at_the_end_of_the_prompt(task):
    sample = retrieval_tasks.make_sample(task, BYTES, length=1000, depth=0.2, seed=6)
    match = needle_match(sample)
    expected = {
        "passkey": "\nWhat is the pass key? The pass key is",
        "kv": f'\nQuestion: which value belongs to the key "{match.group(1)}"? Answer: "',
        "line": (f"\nWhat is the number in line {match.group(1)}? "
                 f"The number in line {match.group(1)} is"),
    }[task]
    assert text(sample.prompt[sample.question_start:]) == expected


@pytest.mark.parametrize("task", retrieval_tasks.TASKS)
def test_too_short_length_raises_with_the_minimum(task):
    sample = retrieval_tasks.make_sample(task, BYTES, length=1000, depth=0.5, seed=8)
    question = sample.prompt.size - sample.question_start
    minimum = sample.needle_length + question + sample.answer.size
    fits = retrieval_tasks.make_sample(task, BYTES, length=minimum, depth=0.5, seed=8)
    assert fits.prompt.size + fits.answer.size == minimum
    message = (f"length {minimum - 1} is too short for the {task} task: needle + question + "
               f"answer take {minimum} tokens")
    with pytest.raises(SampleTooShort, match=re.escape(message)) as raised:
        retrieval_tasks.make_sample(task, BYTES, length=minimum - 1, depth=0.5, seed=8)
    assert raised.value.minimum == minimum
    assert isinstance(raised.value, ValueError)


def test_bad_task_depth_or_seed_raises():
    with pytest.raises(ValueError, match="unknown task"):
        retrieval_tasks.make_sample("needle", BYTES, length=500, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        retrieval_tasks.make_sample("kv", BYTES, length=500, depth=1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        retrieval_tasks.make_sample("kv", BYTES, length=500, depth=0.5, seed=-1)


def test_pad_does_not_pile_up_next_to_the_needle():
    sample = retrieval_tasks.make_sample("passkey", BYTES, length=4096, depth=0.5, seed=1)
    prompt = text(sample.prompt)
    end = sample.needle_start + sample.needle_length
    assert "   " not in prompt[sample.needle_start - 3:end + 3]


# --- make_grid ----------------------------------------------------------------------------

def test_make_grid_order_count_and_determinism():
    kwargs = dict(lengths=[300, 600], depths=[0.0, 0.5, 1.0], samples_per_cell=2, seed=7)
    grid = retrieval_tasks.make_grid("kv", BYTES, **kwargs)
    again = retrieval_tasks.make_grid("kv", BYTES, **kwargs)
    assert len(grid) == 2 * 3 * 2
    assert [(s.length, s.depth) for s in grid[::2]] == [
        (300, 0.0), (300, 0.5), (300, 1.0), (600, 0.0), (600, 0.5), (600, 1.0)]
    for a, b in zip(grid, again):
        np.testing.assert_array_equal(a.prompt, b.prompt)
    assert len({text(s.answer) for s in grid}) == len(grid)  # a fresh seed per sample
    assert grid[3].seed == retrieval_tasks.sample_seed(7, 0, 1, 1)


# --- teacher_forced_batch -----------------------------------------------------------------

def test_teacher_forced_batch_rows():
    length = 400
    samples = [retrieval_tasks.make_sample(task, BYTES, length=length, depth=0.5, seed=1)
               for task in retrieval_tasks.TASKS]
    batch = retrieval.teacher_forced_batch(samples, length)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        **{k: ((3, length), np.int32)
           for k in ("tokens", "targets", "positions", "segment_ids")},
        **{k: ((3, length), np.float32) for k in ("loss_mask", "answer_mask")}}
    for i, sample in enumerate(samples):
        full = np.concatenate([sample.prompt, sample.answer])
        np.testing.assert_array_equal(batch["tokens"][i, :-1], full[:-1])
        np.testing.assert_array_equal(batch["targets"][i, :-2], batch["tokens"][i, 1:-1])
        assert batch["targets"][i, -2] == full[-1]
        np.testing.assert_array_equal(batch["positions"][i, :-1], np.arange(length - 1))
        # the last column is the one pad token
        assert batch["segment_ids"][i, -1] == 0 and batch["loss_mask"][i, -1] == 0
        assert batch["segment_ids"][i, :-1].min() == 1 and batch["loss_mask"][i, :-1].min() == 1


def test_answer_mask_marks_the_answer_targets_at_the_end():
    length = 500
    samples = [retrieval_tasks.make_sample(task, BYTES, length=length, depth=0.2, seed=2)
               for task in retrieval_tasks.TASKS]
    batch = retrieval.teacher_forced_batch(samples, length)
    for i, sample in enumerate(samples):
        n = sample.answer.size
        mask = batch["answer_mask"][i]
        assert mask.sum() == n
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(length - 1 - n, length - 1))
        np.testing.assert_array_equal(batch["targets"][i][mask > 0], sample.answer)


def test_teacher_forced_batch_rejects_a_wrong_length():
    sample = retrieval_tasks.make_sample("line", BYTES, length=300, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="300 tokens"):
        retrieval.teacher_forced_batch([sample], 301)


# --- score_answers ------------------------------------------------------------------------

def test_score_answers_by_hand():
    answer_mask = np.array([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], np.float32)
    is_argmax = np.array([[0, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]], bool)
    logprob = np.array([[np.nan, -0.5, -0.25, -9.0], [-1.0, -1.0, -2.0, -0.5],
                        [-1.0, -1.0, -1.0, -1.0]])
    scores = retrieval.score_answers(logprob, is_argmax, answer_mask)
    np.testing.assert_array_equal(scores["exact_match"], [True, False, False])
    np.testing.assert_allclose(scores["answer_logprob"], [-0.75, -2.5, 0.0])
    np.testing.assert_array_equal(scores["answer_tokens"], [2, 2, 0])


# --- summarise_grid -----------------------------------------------------------------------

def fake_grid(lengths, depths, per_cell, task="passkey"):
    one = np.zeros(1, np.int32)
    return [retrieval_tasks.Sample(prompt=one, answer=one, task=task, length=length, depth=d,
                                   needle_start=0, needle_length=1, question_start=0, seed=0)
            for length in lengths for d in depths for _ in range(per_cell)]


def scores_for(samples, accuracy_by_length):
    """Exact match per sample so that each length's cells have the given accuracy."""
    seen = {}
    out = []
    for s in samples:
        index = seen[(s.length, s.depth)] = seen.get((s.length, s.depth), -1) + 1
        out.append(index < round(accuracy_by_length[s.length] * 4))  # 4 samples per cell
    return np.array(out)


def test_summarise_grid_k_max_stops_at_the_first_failure():
    lengths, depths = [256, 512, 1024, 2048], [0.0, 0.5, 1.0]
    samples = fake_grid(lengths, depths, 4)
    exact = scores_for(samples, {256: 1.0, 512: 0.75, 1024: 0.25, 2048: 1.0})
    summary = retrieval.summarise_grid(samples, exact, np.zeros(len(samples)), threshold=0.5)
    assert summary["k_max"] == 512
    assert summary["accuracy"] == [[1.0] * 3, [0.75] * 3, [0.25] * 3, [1.0] * 3]
    assert summary["lengths"] == lengths and summary["depths"] == depths
    assert summary["samples_per_cell"] == 4 and summary["threshold"] == 0.5


def test_summarise_grid_k_max_none_when_the_shortest_fails():
    samples = fake_grid([256, 512], [0.5], 4)
    exact = scores_for(samples, {256: 0.25, 512: 1.0})
    assert retrieval.summarise_grid(samples, exact, np.zeros(8), threshold=0.5)["k_max"] is None


def test_summarise_grid_means_per_cell_and_depth():
    samples = fake_grid([100, 200], [0.0, 1.0], 2, task="line")
    exact = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)       # cells: 1, .5, 0, 0
    logprob = np.array([-1, -3, -2, -2, -4, -6, 0, -1], float)
    summary = retrieval.summarise_grid(samples, exact, logprob, threshold=0.7)
    assert summary["task"] == "line"
    assert summary["accuracy"] == [[1.0, 0.5], [0.0, 0.0]]
    assert summary["mean_answer_logprob"] == [[-2.0, -2.0], [-5.0, -0.5]]
    assert summary["length_accuracy"] == [0.75, 0.0]
    assert summary["depth_accuracy"] == [0.5, 0.25]
    assert summary["k_max"] == 100


def test_summarise_grid_rejects_uneven_cells():
    samples = fake_grid([100, 200], [0.5], 2)[:-1]
    with pytest.raises(ValueError, match="same number"):
        retrieval.summarise_grid(samples, np.ones(3, bool), np.zeros(3), threshold=0.5)
