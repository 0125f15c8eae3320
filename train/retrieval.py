"""Synthetic long-context retrieval tasks: generation, teacher-forced batches, scoring.

Everything here is pure Python/numpy and generated from a seed (no downloads). A model is
scored on a sample by feeding prompt + answer (teacher forcing) and reading, at the answer's
target positions, the log-probability of the target token and whether it was the argmax:
  exact match     every answer token is the argmax
  answer logprob  the sum of the answer tokens' log-probabilities

Tasks (own wording; the formats are described in REFERENCES.md, "Long-context evaluation
formats"). Shown with an example needle, prompt tail and answer:
  passkey  filler: PASSKEY_FILLER sentences repeated in order.
           needle:   " Important: the pass key is 48213. Keep this number in mind."
           question: "\\nWhat is the pass key? The pass key is"      answer: " 48213"
  kv       filler: lines '"3fa9c2e1": "9b0d77aa",\\n' of random 8-hex-digit keys and values.
           needle:   '"5c01be7f": "d2e4a019",\\n'
           question: '\\nQuestion: which value belongs to the key "5c01be7f"? Answer: "'
                                                                      answer: 'd2e4a019'
  line     filler: lines "line 417093: the number is 30522.\\n" with distinct random 6-digit
           labels (not positions: a label says nothing about where its line is) and random
           5-digit values; at most 450000 lines (half the labels, so drawing stays quick).
           needle:   "line 312577: the number is 48213.\\n"
           question: "\\nWhat is the number in line 312577? The number in line 312577 is"
                                                                      answer: " 48213"
The answer text occurs exactly once in the prompt, inside the needle: keys, values and labels
are drawn so that nothing else contains it.

Layout of a sample of `length` tokens (token indices):
  prompt = context [0, question_start) + question [question_start, len(prompt))
  context = filler units, the needle at [needle_start, needle_start + needle_length)
  len(prompt) + len(answer) == length
The "available context" is A = question_start - needle_length (the context without the
needle); the needle starts as close as the units allow to depth * A: depth 0 puts it at token
0, depth 1 right before the question.

Tokenization. Text is made of pieces, each encoded on its own and the ids concatenated, so
the lengths are exact for any tokenizer and token positions are known without offsets. The
answer is its own piece, in the needle and after the question alike, so the answer's ids
appear verbatim in the needle. Filler lines of kv and line are cut into the same pieces as
their needle, so the needle is not told apart by its tokenization. (With a BPE tokenizer,
piecewise ids can differ from encoding the whole text at once; they are used consistently.)
The context is built by adding whole filler units until the next one would overflow A; the
r tokens left over (fewer than one unit's) are a single repeated pad token (the first of
" ", ".", "\\n" whose encoding is one token), spread evenly over the gaps after the units
(gap i gets floor((i+1) r / m) - floor(i r / m) of them), so that the pad marks no place in
particular, least of all the needle. The needle goes in at the unit boundary nearest
depth * A (before unit k, after the pad of the gap before it): within half a unit plus a
gap of the requested depth, exactly 0 at depth 0 and exactly A at depth 1. (When no unit
fits, the pad is split around the needle at round(depth * A).)

Seeds: make_sample draws everything from numpy's Generator seeded by (seed, task): for one
seed, the key and the filler stream do not depend on length or depth. make_grid gives every
sample its own seed, derived from (seed, length index, depth index, sample index).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

TASKS = ("passkey", "kv", "line")

# Passkey filler: repeated in this order, one sentence per unit.
PASSKEY_FILLER = (
    " The river flows past the old mill.",
    " Birds sing in the tall trees.",
    " The road winds over the green hills.",
    " Rain falls softly on the roof.",
    " A warm wind moves through the fields.",
)
PASSKEY_NEEDLE = (" Important: the pass key is", "{answer}", ". Keep this number in mind.")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

KV_LINE = ('"{key}": "', "{value}", '",\n')          # pieces of one key/value line
KV_QUESTION = '\nQuestion: which value belongs to the key "{key}"? Answer: "'
KV_SPACE = 1 << 32                   # keys and values: distinct random 8-hex-digit strings

LINE_LINE = ("line {label}: the number is", " {value}", ".\n")  # pieces of one numbered line
LINE_QUESTION = "\nWhat is the number in line {label}? The number in line {label} is"
LINE_LABELS = (100000, 1000000)   # labels are distinct random 6-digit numbers
LINE_VALUES = (10000, 100000)     # values are random 5-digit numbers

PAD_CANDIDATES = (" ", ".", "\n")
# Relative tolerance for summarise_grid's accuracy >= threshold test (float rounding only).
_THRESHOLD_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Sample:
    """One retrieval sample. Token ids are int32 numpy arrays.

    prompt          [len(prompt)]  context + question; ends right before the answer
    answer          [len(answer)]  the answer's ids (>= 1 token)
    task, length, depth            as requested; len(prompt) + len(answer) == length
    needle_start    index in prompt where the needle (the line/sentence holding the answer)
                    starts
    needle_length   tokens of the needle
    question_start  index in prompt where the question starts (the context is before it)
    seed            the seed the sample was made from
    """
    prompt: np.ndarray
    answer: np.ndarray
    task: str
    length: int
    depth: float
    needle_start: int
    needle_length: int
    question_start: int
    seed: int

    @property
    def available(self) -> int:
        """Context tokens other than the needle: the span depth is measured on."""
        return self.question_start - self.needle_length


# --- generation ---------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32).reshape(-1)


def pad_token(tokenizer) -> int:
    """The id used to fill the context to an exact length: the first of PAD_CANDIDATES that
    encodes to exactly one token."""
    for text in PAD_CANDIDATES:
        ids = _encode(tokenizer, text)
        if ids.size == 1:
            return int(ids[0])
    raise ValueError(f"retrieval: none of {PAD_CANDIDATES!r} encodes to a single token with "
                     "this tokenizer; cannot pad to an exact length")


def _hex8(rng: np.random.Generator, used: set) -> str:
    """A random 8-hex-digit string not in `used` (and adds it)."""
    if len(used) >= KV_SPACE // 2:
        raise ValueError(f"retrieval: the kv task draws at most {KV_SPACE // 2} distinct keys "
                         "and values; use a shorter length")
    while True:
        text = f"{int(rng.integers(0, KV_SPACE)):08x}"
        if text not in used:
            used.add(text)
            return text


@dataclasses.dataclass
class _Parts:
    needle: list          # list of int32 arrays (pieces)
    question: np.ndarray
    answer: np.ndarray
    units: Iterator[np.ndarray]  # filler units, endless


def _passkey(tokenizer, rng: np.random.Generator) -> _Parts:
    key = int(rng.integers(10000, 100000))
    answer = _encode(tokenizer, f" {key}")
    needle = [_encode(tokenizer, PASSKEY_NEEDLE[0]), answer, _encode(tokenizer, PASSKEY_NEEDLE[2])]
    filler = [_encode(tokenizer, s) for s in PASSKEY_FILLER]

    def units():
        while True:
            yield from filler

    return _Parts(needle, _encode(tokenizer, PASSKEY_QUESTION), answer, units())


def _kv(tokenizer, rng: np.random.Generator) -> _Parts:
    used: set = set()  # every key and value: all distinct, so the answer occurs once
    key, value = _hex8(rng, used), _hex8(rng, used)
    head, tail = KV_LINE[0], _encode(tokenizer, KV_LINE[2])
    answer = _encode(tokenizer, value)
    needle = [_encode(tokenizer, head.format(key=key)), answer, tail]
    question = _encode(tokenizer, KV_QUESTION.format(key=key))

    def units():
        while True:
            k, v = _hex8(rng, used), _hex8(rng, used)
            yield np.concatenate([_encode(tokenizer, head.format(key=k)),
                                  _encode(tokenizer, v), tail])

    return _Parts(needle, question, answer, units())


def _line(tokenizer, rng: np.random.Generator) -> _Parts:
    value = int(rng.integers(*LINE_VALUES))
    answer_text = str(value)
    used_labels: set = set()

    def new_label() -> int:
        if len(used_labels) >= (LINE_LABELS[1] - LINE_LABELS[0]) // 2:
            raise ValueError(f"retrieval: the line task draws at most "
                             f"{(LINE_LABELS[1] - LINE_LABELS[0]) // 2} distinct labels (lines); "
                             "use a shorter length")
        while True:
            label = int(rng.integers(*LINE_LABELS))
            # " 48213" would also occur in "line 482130: ...": keep such labels out.
            if label not in used_labels and not str(label).startswith(answer_text):
                used_labels.add(label)
                return label

    label = new_label()
    head, tail = LINE_LINE[0], _encode(tokenizer, LINE_LINE[2])
    answer = _encode(tokenizer, LINE_LINE[1].format(value=value))
    needle = [_encode(tokenizer, head.format(label=label)), answer, tail]
    question = _encode(tokenizer, LINE_QUESTION.format(label=label))

    def units():
        while True:
            lab = new_label()
            v = int(rng.integers(*LINE_VALUES))
            while v == value:        # the answer occurs once
                v = int(rng.integers(*LINE_VALUES))
            yield np.concatenate([_encode(tokenizer, head.format(label=lab)),
                                  _encode(tokenizer, LINE_LINE[1].format(value=v)), tail])

    return _Parts(needle, question, answer, units())


_BUILDERS: dict[str, Callable[..., _Parts]] = {"passkey": _passkey, "kv": _kv, "line": _line}


def make_sample(task: str, tokenizer, *, length: int, depth: float, seed: int) -> Sample:
    """A sample of `task` with len(prompt) + len(answer) == length exactly.

    depth in [0, 1]: the needle starts at the unit boundary nearest depth * available
    (exactly 0 at depth 0 and exactly `available` at depth 1; see the module docstring).
    Deterministic in (task, length, depth, seed, tokenizer); seed is an int >= 0.
    Raises ValueError for an unknown task, a depth outside [0, 1], a negative seed, or a
    length below this sample's fixed parts (needle + question + answer; the message gives
    the minimum, which can depend on the seed for tokenizers whose digit tokenization varies).
    """
    if task not in TASKS:
        raise ValueError(f"retrieval: unknown task {task!r}; expected one of {TASKS}")
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"retrieval: depth must lie in [0, 1], got {depth}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"retrieval: seed must be an int >= 0, got {seed!r}")
    seed, length = int(seed), int(length)
    rng = np.random.default_rng([seed, TASKS.index(task)])
    parts = _BUILDERS[task](tokenizer, rng)
    needle = np.concatenate(parts.needle)
    if parts.answer.size < 1:
        raise ValueError(f"retrieval: the {task} answer encodes to no token")

    minimum = needle.size + parts.question.size + parts.answer.size
    if length < minimum:
        raise ValueError(f"retrieval: length {length} is too short for the {task} task: "
                         f"needle + question + answer take {minimum} tokens (minimum length "
                         f"{minimum})")
    available = length - minimum

    # Whole filler units until the next would overflow the available context.
    units, sizes, total = [], [0], 0
    for unit in parts.units:
        if total + unit.size > available:
            break
        units.append(unit)
        total += unit.size
        sizes.append(total)
    spare = available - total                              # pad tokens, < one unit if m > 0
    pad = np.int32(pad_token(tokenizer)) if spare else np.int32(0)
    m = len(units)
    if m == 0:   # nothing but the needle and pad: split the pad around the needle
        before = int(round(depth * available))
        pieces = [np.full(before, pad, np.int32), needle,
                  np.full(spare - before, pad, np.int32)]
        needle_start = before
    else:
        # The pad is spread evenly over the gaps after units 0 .. m-1 (0 or a few tokens
        # each), so it marks no place in particular; the needle goes in before unit k.
        cuts = (np.arange(m + 1, dtype=np.int64) * spare) // m   # [m + 1] pad before unit k
        gaps = np.diff(cuts)                                      # [m] pad after unit i
        starts = np.asarray(sizes, dtype=np.int64) + cuts         # [m + 1] start of unit k
        k = int(np.argmin(np.abs(starts - depth * available)))    # first k on ties
        needle_start = int(starts[k])
        pieces = []
        for i, unit in enumerate(units):
            if i == k:
                pieces.append(needle)
            pieces += [unit, np.full(int(gaps[i]), pad, np.int32)]
        if k == m:
            pieces.append(needle)
    context = np.concatenate(pieces).astype(np.int32)
    prompt = np.concatenate([context, parts.question]).astype(np.int32)
    assert prompt.size + parts.answer.size == length
    return Sample(prompt=prompt, answer=parts.answer.astype(np.int32), task=task,
                  length=length, depth=depth, needle_start=needle_start,
                  needle_length=int(needle.size), question_start=int(context.size), seed=seed)


def sample_seed(seed: int, length_index: int, depth_index: int, sample_index: int) -> int:
    """The seed make_grid gives one sample: a hash of its grid coordinates (uint32)."""
    sequence = np.random.SeedSequence([int(seed), length_index, depth_index, sample_index])
    return int(sequence.generate_state(1)[0])


def make_grid(task: str, tokenizer, *, lengths: Sequence[int], depths: Sequence[float],
              samples_per_cell: int, seed: int) -> list[Sample]:
    """samples_per_cell samples for every (length, depth); ordered by length, then depth, then
    sample index. Deterministic; each sample's seed is sample_seed(seed, i, j, s)."""
    lengths, depths = [int(x) for x in lengths], [float(x) for x in depths]
    if not lengths or not depths or samples_per_cell < 1:
        raise ValueError("retrieval: make_grid needs lengths, depths and samples_per_cell >= 1")
    if len(set(lengths)) != len(lengths) or len(set(depths)) != len(depths):
        raise ValueError(f"retrieval: repeated lengths or depths: {lengths}, {depths}")
    return [make_sample(task, tokenizer, length=length, depth=depth,
                        seed=sample_seed(seed, i, j, s))
            for i, length in enumerate(lengths)
            for j, depth in enumerate(depths)
            for s in range(samples_per_cell)]


# --- batches and scores -------------------------------------------------------------------

def teacher_forced_batch(samples: Sequence[Sample], length: int) -> dict[str, np.ndarray]:
    """Rows [n, length] that feed prompt + answer to a causal LM, in train/data.py's format.

    Every sample must have exactly `length` tokens (prompt + answer). Row i is
      tokens      = (prompt + answer)[:-1], then one pad token 0        int32
      targets     = (prompt + answer)[1:],  then 0                      int32
      positions   = 0 .. length - 2, then 0                             int32
      segment_ids = 1 on the length - 1 real tokens, 0 on the pad       int32
      loss_mask   = 1.0 on every real target, 0.0 on the pad            float32
      answer_mask = 1.0 exactly on the len(answer) targets that are answer tokens, i.e.
                    columns [len(prompt) - 1, length - 1)               float32
    """
    if not samples:
        raise ValueError("retrieval: teacher_forced_batch got no samples")
    n = len(samples)
    out = {key: np.zeros((n, length), np.int32)
           for key in ("tokens", "targets", "positions", "segment_ids")}
    out["loss_mask"] = np.zeros((n, length), np.float32)
    out["answer_mask"] = np.zeros((n, length), np.float32)
    for i, sample in enumerate(samples):
        sequence = np.concatenate([sample.prompt, sample.answer]).astype(np.int32)
        if sequence.size != length:
            raise ValueError(f"retrieval: sample {i} has {sequence.size} tokens, the batch "
                             f"length is {length}; they must be equal")
        real = length - 1
        out["tokens"][i, :real] = sequence[:-1]
        out["targets"][i, :real] = sequence[1:]
        out["positions"][i, :real] = np.arange(real, dtype=np.int32)
        out["segment_ids"][i, :real] = 1
        out["loss_mask"][i, :real] = 1.0
        out["answer_mask"][i, sample.prompt.size - 1:real] = 1.0
    return out


def score_answers(target_logprob, is_argmax, answer_mask) -> dict[str, np.ndarray]:
    """Per-sample scores from per-target arrays, each [n, length]:
    target_logprob (log p of the target token), is_argmax (the target was the argmax),
    answer_mask (nonzero on answer targets). Returns
      exact_match    bool    [n]  every answer token is the argmax (False if no answer token)
      answer_logprob float64 [n]  sum of target_logprob over the answer tokens
      answer_tokens  int32   [n]  number of answer tokens
    Values off the answer mask are ignored (even NaN)."""
    logprob = np.asarray(target_logprob, dtype=np.float64)
    argmax = np.asarray(is_argmax).astype(bool)
    mask = np.asarray(answer_mask) != 0
    if not logprob.shape == argmax.shape == mask.shape or logprob.ndim != 2:
        raise ValueError(f"retrieval: score_answers needs three [n, length] arrays of one shape, "
                         f"got {logprob.shape}, {argmax.shape}, {mask.shape}")
    tokens = mask.sum(axis=1).astype(np.int32)
    return {
        "exact_match": np.all(argmax | ~mask, axis=1) & (tokens > 0),
        "answer_logprob": np.where(mask, logprob, 0.0).sum(axis=1),
        "answer_tokens": tokens,
    }


def summarise_grid(samples: Sequence[Sample], exact_match, answer_logprob, *,
                   threshold: float) -> dict:
    """JSON-ready summary of one task's grid (samples as from make_grid, in any order, with
    their per-sample scores):
      task, lengths (ascending), depths (ascending), samples_per_cell, threshold
      accuracy            [len(lengths)][len(depths)]  exact-match rate per cell
      mean_answer_logprob [len(lengths)][len(depths)]
      length_accuracy     [len(lengths)]  mean over depths of the cells' accuracy
      depth_accuracy      [len(depths)]   mean over lengths
      k_max  the largest length L such that every length <= L has length_accuracy >=
             threshold (None if the shortest fails): a later pass after a failure does not
             count.
    Raises ValueError unless all samples share one task and every (length, depth) cell has
    the same number of samples."""
    exact_match = np.asarray(exact_match).astype(bool).reshape(-1)
    answer_logprob = np.asarray(answer_logprob, dtype=np.float64).reshape(-1)
    if not samples or not len(samples) == exact_match.size == answer_logprob.size:
        raise ValueError(f"retrieval: summarise_grid needs one score per sample, got "
                         f"{len(samples)} samples, {exact_match.size} and "
                         f"{answer_logprob.size} scores")
    tasks = sorted({s.task for s in samples})
    if len(tasks) != 1:
        raise ValueError(f"retrieval: summarise_grid takes one task at a time, got {tasks}")
    lengths = sorted({int(s.length) for s in samples})
    depths = sorted({float(s.depth) for s in samples})
    cells: dict[tuple[int, float], list[int]] = {(l, d): [] for l in lengths for d in depths}
    for i, s in enumerate(samples):
        cells[(int(s.length), float(s.depth))].append(i)
    counts = {len(v) for v in cells.values()}
    if len(counts) != 1:
        raise ValueError("retrieval: summarise_grid needs the same number of samples in every "
                         f"(length, depth) cell, got counts {sorted(counts)}")
    accuracy = [[float(exact_match[cells[(l, d)]].mean()) for d in depths] for l in lengths]
    logprob = [[float(answer_logprob[cells[(l, d)]].mean()) for d in depths] for l in lengths]
    table = np.asarray(accuracy, dtype=np.float64)    # [lengths, depths]
    length_accuracy = table.mean(axis=1)
    k_max = None
    for length, acc in zip(lengths, length_accuracy):
        if acc < threshold - _THRESHOLD_EPS:
            break
        k_max = length
    return {
        "task": tasks[0],
        "lengths": lengths,
        "depths": depths,
        "accuracy": accuracy,
        "mean_answer_logprob": logprob,
        "length_accuracy": [float(a) for a in length_accuracy],
        "depth_accuracy": [float(a) for a in table.mean(axis=0)],
        "samples_per_cell": counts.pop(),
        "k_max": k_max,
        "threshold": float(threshold),
    }
