"""The synthetic-retrieval mix: retrieval documents shuffled in with the training corpus.

With data.retrieval_fraction f > 0, each epoch of N corpus documents also holds
M = max(1, round(N f / (1 - f))) synthetic documents (data/retrieval_tasks.py): their
lengths drawn for the epoch at once, each document made on demand from (seed, epoch,
index) when the stream (data/stream.py) reads it. Their answer targets weigh
data.retrieval_answer_weight in the loss. Training sample seeds lie in
[2^32, 2^63), evaluation seeds (make_grid) below 2^32: no training sample is an
evaluation sample.
"""
from __future__ import annotations

import dataclasses
import numpy as np

from data import retrieval_tasks

# Training sample seeds lie in [2^32, 2^63); retrieval_tasks.make_grid's are uint32 (< 2^32).
_SYNTHETIC_SEEDS = (1 << 32, 1 << 63)


# Tag of the synthetic documents' random streams (so they do not share the shuffle's).
_SYNTHETIC_STREAM = 0x52455452  # "RETR"


# Seeds make_sample is tried with when checking data.retrieval_min_length (the minimum can
# depend on the seed with tokenizers whose digit tokenization varies), and how many seeds a
# synthetic document may draw before a length that is too short for all of them is an error.
_MINIMUM_PROBES = 8


_SYNTHETIC_ATTEMPTS = 16


@dataclasses.dataclass(frozen=True)
class RetrievalMix:
    """The validated retrieval keys of a data config for one training length.

    fraction    share of the training documents that are synthetic, in (0, 1)
    tasks       retrieval task names, a non-empty subset of retrieval_tasks.TASKS
    min_length  the shortest sample, in tokens (prompt + answer)
    max_length  the longest sample, <= seq_len
    answer_weight  loss weight of a sample's answer targets (every other target: 1)
    task_probabilities  probability of each task, or None: uniform
    """
    fraction: float
    tasks: tuple[str, ...]
    min_length: int
    max_length: int
    answer_weight: float = 1.0
    task_probabilities: tuple[float, ...] | None = None

    def synthetic_per_epoch(self, corpus_documents: int) -> int:
        """M synthetic documents to go with N corpus documents in one epoch: the nearest
        integer to N * f / (1 - f), at least 1, so the share M / (N + M) is about f."""
        return max(1, int(round(corpus_documents * self.fraction / (1.0 - self.fraction))))


def _task_minimum(task: str, tokenizer, length: int) -> int | None:
    """The minimum length of `task` with this tokenizer when `length` is below it (the
    largest over a few seeds), else None."""
    minimum = None
    for probe in range(_MINIMUM_PROBES):
        try:
            retrieval_tasks.make_sample(task, tokenizer, length=length, depth=0.5,
                                        seed=_SYNTHETIC_SEEDS[0] + probe)
        except retrieval_tasks.SampleTooShort as e:
            minimum = max(minimum or 0, e.minimum)
        except ValueError as e:
            raise ValueError(f"data.retrieval_tasks: the {task} task cannot be made with "
                             f"this tokenizer: {e}") from None
    return minimum


def retrieval_mix(data_config, tokenizer, *, seq_len: int,
                  l_max: int | None = None) -> RetrievalMix | None:
    """The synthetic-retrieval mix of data_config for training rows of seq_len tokens, or
    None when data.retrieval_fraction is 0 (the other retrieval keys are then not read).

    data.retrieval_min_length 0 means l_max // 4 (l_max None: seq_len), and
    data.retrieval_max_length 0 means seq_len. Raises ValueError, naming the key, for a
    fraction outside [0, 1), tasks that are empty, repeated or not in retrieval_tasks.TASKS,
    lengths that are negative or not min <= max <= seq_len, or a minimum length below what
    a task needs with this tokenizer (needle + question + answer).
    """
    fraction = getattr(data_config, "retrieval_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)):
        raise ValueError(f"data.retrieval_fraction must be a number in [0, 1), got {fraction!r}")
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.retrieval_fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return None

    tasks = getattr(data_config, "retrieval_tasks", retrieval_tasks.TASKS)
    if isinstance(tasks, str) or not isinstance(tasks, (tuple, list)):
        raise ValueError(f"data.retrieval_tasks must be a tuple of task names from "
                         f"{retrieval_tasks.TASKS}, got {tasks!r}")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in retrieval_tasks.TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"data.retrieval_tasks must be distinct names from "
                         f"{retrieval_tasks.TASKS}, at least one, got {tasks!r}")

    raw = {}
    for key in ("retrieval_min_length", "retrieval_max_length"):
        value = getattr(data_config, key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"data.{key} must be an int >= 0 (0: the default), got {value!r}")
        raw[key] = int(value)
    l_max = seq_len if l_max is None else int(l_max)
    min_length = raw["retrieval_min_length"] or l_max // 4
    max_length = raw["retrieval_max_length"] or seq_len
    described = (f"data.retrieval_min_length {min_length}"
                 + ("" if raw["retrieval_min_length"] else f" (0: l_max // 4, l_max {l_max})")
                 + f", data.retrieval_max_length {max_length}"
                 + ("" if raw["retrieval_max_length"] else " (0: the training seq_len)"))
    if not min_length <= max_length <= seq_len:
        raise ValueError(f"data.retrieval_min_length <= data.retrieval_max_length <= seq_len "
                         f"({seq_len}) does not hold: {described}")
    for task in tasks:
        minimum = _task_minimum(task, tokenizer, min_length)
        if minimum is not None:
            raise ValueError(f"data.retrieval_min_length is too short for the {task} task: "
                             f"{described}, but a {task} sample needs at least {minimum} "
                             f"tokens with this tokenizer; set data.retrieval_min_length >= "
                             f"{minimum} (or leave {task} out of data.retrieval_tasks)")
    answer_weight = getattr(data_config, "retrieval_answer_weight", 1.0)
    if (isinstance(answer_weight, bool) or not isinstance(answer_weight, (int, float, np.number))
            or not 0.0 < float(answer_weight) < float("inf")):
        raise ValueError(f"data.retrieval_answer_weight must be a finite number > 0, got "
                         f"{answer_weight!r}")
    task_weights = getattr(data_config, "retrieval_task_weights", None)
    probabilities = None
    if task_weights is not None:
        numbers = (isinstance(task_weights, (tuple, list))
                   and all(isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
                           for w in task_weights))
        if (not numbers or len(task_weights) != len(tasks)
                or not all(0.0 <= float(w) < float("inf") for w in task_weights)
                or sum(task_weights) <= 0):
            raise ValueError(f"data.retrieval_task_weights must be one finite weight >= 0 per "
                             f"task of data.retrieval_tasks {tasks}, not all 0, got "
                             f"{task_weights!r}")
        total = float(sum(task_weights))
        probabilities = tuple(float(w) / total for w in task_weights)
    return RetrievalMix(fraction=fraction, tasks=tasks, min_length=min_length,
                        max_length=max_length, answer_weight=float(answer_weight),
                        task_probabilities=probabilities)


def synthetic_lengths(mix: RetrievalMix, *, seed: int, epoch: int, count: int) -> np.ndarray:
    """The lengths (tokens) of `epoch`'s `count` synthetic documents: uniform in
    [min_length, max_length], drawn together from (seed, epoch), so the stream knows every
    document's size without making it."""
    rng = np.random.default_rng([int(seed) & ((1 << 64) - 1), int(epoch), _SYNTHETIC_STREAM, 1])
    return rng.integers(mix.min_length, mix.max_length + 1, size=count).astype(np.int64)


def synthetic_sample(mix: RetrievalMix, tokenizer, *, seed: int, epoch: int, index: int,
                     length: int) -> retrieval_tasks.Sample:
    """Synthetic document `index` of `epoch` of the training stream of `seed`, `length`
    tokens long: task (by mix.task_probabilities, else uniform) and depth (uniform) drawn
    from a random stream keyed by (seed, epoch, index), then retrieval_tasks.make_sample
    with a sample seed in [2^32, 2^63) from the same stream. If the length is too short for
    that seed (tokenizers whose digit tokenization varies), a new sample seed is drawn,
    deterministically."""
    key = [int(seed) & ((1 << 64) - 1), int(epoch), int(index), _SYNTHETIC_STREAM]
    rng = np.random.default_rng(key)
    if mix.task_probabilities is None:
        task = mix.tasks[int(rng.integers(len(mix.tasks)))]
    else:
        task = mix.tasks[int(rng.choice(len(mix.tasks), p=mix.task_probabilities))]
    depth = float(rng.random())
    for _ in range(_SYNTHETIC_ATTEMPTS):
        sample_seed = int(rng.integers(*_SYNTHETIC_SEEDS))
        try:
            return retrieval_tasks.make_sample(task, tokenizer, length=int(length), depth=depth,
                                               seed=sample_seed)
        except retrieval_tasks.SampleTooShort as e:
            error = e
    raise ValueError(f"data: synthetic document {index} of epoch {epoch}: {error} (for "
                     f"{_SYNTHETIC_ATTEMPTS} seeds); raise data.retrieval_min_length")


class SyntheticDocuments:
    """The synthetic documents of every epoch of a training stream (data/stream.py's
    `synthetic`): mix.synthetic_per_epoch(N) per epoch, their lengths drawn per epoch and
    each made on demand from (seed, epoch, index)."""

    def __init__(self, mix: RetrievalMix, tokenizer, seed: int, corpus_documents: int):
        self.mix, self.tokenizer, self.seed = mix, tokenizer, int(seed)
        self.per_epoch = mix.synthetic_per_epoch(corpus_documents)
        self.answer_weight = mix.answer_weight
        self._lengths: dict[int, np.ndarray] = {}

    def lengths(self, epoch: int) -> np.ndarray:
        if epoch not in self._lengths:
            self._lengths = {epoch: synthetic_lengths(self.mix, seed=self.seed, epoch=epoch,
                                                      count=self.per_epoch)}
        return self._lengths[epoch]

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, int]:
        """(ids [length] int32: prompt then answer, answer tokens) of one document."""
        sample = synthetic_sample(self.mix, self.tokenizer, seed=self.seed, epoch=epoch,
                                  index=index, length=int(self.lengths(epoch)[index]))
        ids = np.concatenate([sample.prompt, sample.answer]).astype(np.int32)
        return ids, int(sample.answer.size)
