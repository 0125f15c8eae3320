"""Synthetic long-context retrieval tasks (passkey, kv, line): samples made from a seed.

`make_sample(task, tokenizer, length=, depth=, seed=)` returns a Sample of exactly `length`
tokens: prompt (filler context with the needle at `depth` of it, then the question) +
answer, whose ids occur in the prompt only inside the needle. Text is encoded piece by
piece, so lengths are exact for any tokenizer. Everything is drawn from numpy's Generator
seeded by (seed, task); `make_grid` gives each (length, depth, sample) cell its own seed.
The formats and the layout rules are in docs/evaluation.md ("Retrieval tasks").
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


class SampleTooShort(ValueError):
    """make_sample's length cannot hold needle + question + answer; `minimum` is the
    shortest length that can (for this tokenizer and seed)."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum


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
    (exactly 0 at depth 0 and exactly `available` at depth 1; see docs/evaluation.md,
    "Retrieval tasks").
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
        raise SampleTooShort(f"retrieval: length {length} is too short for the {task} task: "
                             f"needle + question + answer take {minimum} tokens", minimum)
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
