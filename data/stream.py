"""The training stream: one shuffled pass per epoch over the whole corpus, shared by every
curriculum level, each global row a pure function of the stream's small state.

Blocks. A document of n tokens has n - 1 (input, target) pairs, cut into blocks of B pairs
(B = the longest training length; the last block of a document is shorter). Epoch e visits
every block once, in an order drawn from (seed, e) over the whole corpus (grain's
random-access index shuffle: nothing is materialised), synthetic retrieval documents
(data/retrieval_mix.py) included as blocks of their own.

Windows. A level of length L takes the next `count` blocks from the shared cursor (about
WINDOW_ROWS rows' worth), cuts them into pieces of L pairs, shuffles the pieces, packs
them into rows of L (a full piece is a row; shorter pieces, document tails, share rows
first-fit) and shuffles the rows, all from (seed, epoch, first block): the plan of a
window is metadata (document, offset, length per segment) and costs no token reads. A
level keeps its open window while others run (interleaved curricula); a block belongs to
one window only, so within an epoch no block is seen twice, whatever the levels do. The
rows of a window a run leaves unfinished (at the end of a level) are not seen that epoch.

Rows. A step at a level takes its next `rows` rows. Every process plans the same windows
and reads the tokens of its own rows only; the global batch is the same for any number of
processes. `state()` (a few integers per level) resumes the stream exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import grain
import numpy as np

WINDOW_ROWS = 8192           # rows a window holds, about (blocks x B / L)
_STREAM_TAG = 0x53545245     # "STRE": the random streams of windows


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """The rows of one window: row r has segments seg_start[r] .. seg_start[r + 1] - 1,
    each (document, first pair, pairs)."""
    epoch: int
    first: int
    count: int
    seg_start: np.ndarray     # [rows + 1] int64
    doc: np.ndarray           # [segments] int64
    offset: np.ndarray        # [segments] int64
    length: np.ndarray        # [segments] int64

    @property
    def rows(self) -> int:
        return len(self.seg_start) - 1


class Documents:
    """The stream's documents: the corpus, then each epoch's synthetic documents.

    `synthetic` (None or a RetrievalMix provider with .per_epoch, .lengths(epoch) and
    .sample(epoch, j) -> (ids, answer_tokens))."""

    def __init__(self, corpus, synthetic=None):
        self.corpus, self.synthetic = corpus, synthetic
        if synthetic is None and not any((chunk >= 2).any() for chunk in corpus.length_chunks()):
            raise ValueError("data: no training document has 2 or more tokens")

    def __len__(self) -> int:
        """Documents of an epoch (the synthetic ones included)."""
        return len(self.corpus) + (0 if self.synthetic is None else self.synthetic.per_epoch)

    def pair_chunks(self, epoch: int):
        """Pairs per document of `epoch` in consecutive chunks (new arrays): corpus
        documents shard by shard, then the synthetic ones. Nothing per document is kept
        here: the corpus holds its starts, the stream its block table."""
        chunks = self.corpus.length_chunks()
        if self.synthetic is not None:
            chunks = itertools.chain(chunks, [np.array(self.synthetic.lengths(epoch), np.int64)])
        for lengths in chunks:
            lengths -= 1
            yield np.maximum(lengths, 0, out=lengths)

    def pairs_of(self, epoch: int, docs: np.ndarray) -> np.ndarray:
        """pairs(epoch)[docs], reading the lengths of those documents only."""
        docs = np.asarray(docs, np.int64)
        lengths = np.empty(len(docs), np.int64)
        own = docs < len(self.corpus)
        lengths[own] = self.corpus.lengths_of(docs[own])
        if not own.all():
            lengths[~own] = self.synthetic.lengths(epoch)[docs[~own] - len(self.corpus)]
        lengths -= 1
        return np.maximum(lengths, 0, out=lengths)

    def read(self, epoch: int, doc: int, start: int, pairs: int):
        """(token ids [pairs + 1] from `start`, loss weights of those pairs' targets)."""
        weights = np.ones(pairs, np.float32)
        if doc < len(self.corpus):
            return self.corpus.read(doc, start, start + pairs + 1), weights
        ids, answer_tokens = self.synthetic.sample(epoch, doc - len(self.corpus))
        # the answer is the document's last `answer_tokens` targets
        first_answer = len(ids) - 1 - answer_tokens
        target_index = np.arange(start, start + pairs)
        weights[target_index >= first_answer] = self.synthetic.answer_weight
        return ids[start:start + pairs + 1], weights


class TrainStream:
    """The rows of every level of a run: `next_batch(level, length, rows, row_offset,
    local_rows)` -> this process's rows [local_rows, length] of the level's next `rows`
    global rows (dict of arrays in data/pipeline.py's row format)."""

    def __init__(self, documents: Documents, block: int, seed: int,
                 window_rows: int = WINDOW_ROWS):
        self.documents, self.block, self.seed = documents, int(block), int(seed)
        self.window_rows = int(window_rows)
        self._cursor = {"epoch": 0, "next_block": 0}
        self._levels: dict[str, dict] = {}           # str(level) -> its window position
        self._plans: dict[str, WindowPlan] = {}
        self._epoch_tables: dict[int, tuple] = {}

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"cursor": dict(self._cursor),
                "levels": {k: dict(v) for k, v in self._levels.items()}}

    def set_state(self, state: dict) -> None:
        self._cursor = dict(state["cursor"])
        self._levels = {k: dict(v) for k, v in state["levels"].items()}
        self._plans = {}

    # ------------------------------------------------------------------ blocks of an epoch
    def _epoch_table(self, epoch: int):
        """(cumulative blocks per document [docs + 1] int64, block order): the one array
        per document the stream holds."""
        if epoch not in self._epoch_tables:
            self._epoch_tables = {}                                         # keep one epoch
            cumulative = np.zeros(len(self.documents) + 1, np.int64)
            at = 0
            for blocks in self.documents.pair_chunks(epoch):              # chunk by chunk
                blocks += self.block - 1
                blocks //= self.block                                       # ceil, 0 if empty
                part = cumulative[at + 1:at + 1 + len(blocks)]
                np.cumsum(blocks, out=part)
                part += cumulative[at]
                at += len(blocks)
            assert at == len(self.documents)
            order = grain.MapDataset.range(int(cumulative[-1])).shuffle(
                seed=int(np.random.default_rng([self.seed, epoch]).integers(1 << 31)))
            self._epoch_tables = {epoch: (cumulative, order)}
        return self._epoch_tables[epoch]

    def _blocks(self, epoch: int, first: int, count: int):
        """(doc, offset, pairs) [count] of the epoch's blocks first .. first + count - 1."""
        cumulative, order = self._epoch_table(epoch)
        index = np.fromiter((order[i] for i in range(first, first + count)), np.int64, count)
        doc = np.searchsorted(cumulative, index, side="right") - 1
        offset = (index - cumulative[doc]) * self.block
        return doc, offset, np.minimum(self.block, self.documents.pairs_of(epoch, doc) - offset)

    def _open_window(self, length: int) -> dict:
        """The next window for a level of `length`, taken from the shared cursor."""
        epoch, first = self._cursor["epoch"], self._cursor["next_block"]
        total = int(self._epoch_table(epoch)[0][-1])
        if first >= total:
            epoch, first = epoch + 1, 0
            total = int(self._epoch_table(epoch)[0][-1])
        count = min(total - first, max(1, math.ceil(self.window_rows * length / self.block)))
        self._cursor = {"epoch": epoch, "next_block": first + count}
        return {"epoch": epoch, "first": first, "count": count, "row": 0}

    # ------------------------------------------------------------------ windows
    def plan(self, length: int, epoch: int, first: int, count: int) -> WindowPlan:
        """The rows of a window (see the module docstring); pure in its arguments."""
        doc, offset, pairs = self._blocks(epoch, first, count)
        pieces_per_block = -(-pairs // length)
        piece_doc = np.repeat(doc, pieces_per_block)
        within = np.arange(len(piece_doc)) - np.repeat(
            np.cumsum(pieces_per_block) - pieces_per_block, pieces_per_block)
        piece_offset = np.repeat(offset, pieces_per_block) + within * length
        piece_end = np.repeat(offset + pairs, pieces_per_block)
        piece_length = np.minimum(length, piece_end - piece_offset)
        rng = np.random.default_rng([self.seed, epoch, first, length, _STREAM_TAG])
        shuffled = rng.permutation(len(piece_doc))
        rows = pack_rows(piece_length[shuffled], length)                # [[piece, ...], ...]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        members = np.asarray([shuffled[p] for row in rows for p in row], np.int64)
        seg_start = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
        return WindowPlan(epoch, first, count, seg_start, piece_doc[members],
                          piece_offset[members], piece_length[members])

    def _window(self, key: str, length: int) -> tuple[dict, WindowPlan]:
        position = self._levels.get(key)
        plan = self._plans.get(key)
        if position is None or (plan is not None and position["row"] >= plan.rows):
            position, plan = self._open_window(length), None
            self._levels[key] = position
        if plan is None:
            plan = self.plan(length, position["epoch"], position["first"], position["count"])
            self._plans[key] = plan
        if position["row"] >= plan.rows:          # an empty window (no pieces): the next
            self._levels.pop(key)
            return self._window(key, length)
        return position, plan

    def next_rows(self, level: int, length: int, rows: int) -> list[tuple[WindowPlan, int]]:
        """The level's next `rows` global rows as (window plan, row) pairs; advances."""
        key, taken = str(level), []
        while len(taken) < rows:
            position, plan = self._window(key, length)
            take = min(rows - len(taken), plan.rows - position["row"])
            taken += [(plan, position["row"] + i) for i in range(take)]
            position["row"] += take
        return taken

    def next_batch(self, level: int, length: int, rows: int, row_offset: int = 0,
                   local_rows: int | None = None) -> dict[str, np.ndarray]:
        """This process's rows [row_offset, row_offset + local_rows) of the level's next
        `rows` global rows, as arrays [local_rows, length]."""
        local_rows = rows if local_rows is None else local_rows
        chosen = self.next_rows(level, length, rows)[row_offset:row_offset + local_rows]
        return stack_rows([self.materialize(plan, row, length) for plan, row in chosen])

    def materialize(self, plan: WindowPlan, row: int, length: int) -> dict[str, np.ndarray]:
        """One row [length] of a window: its segments' tokens read and laid side by side."""
        out = empty_row(length)
        at = 0
        for segment, s in enumerate(range(plan.seg_start[row], plan.seg_start[row + 1]), 1):
            pairs = int(plan.length[s])
            ids, weights = self.documents.read(plan.epoch, int(plan.doc[s]),
                                               int(plan.offset[s]), pairs)
            out["tokens"][at:at + pairs] = ids[:-1]
            out["targets"][at:at + pairs] = ids[1:]
            out["positions"][at:at + pairs] = np.arange(pairs)
            out["segment_ids"][at:at + pairs] = segment
            out["loss_mask"][at:at + pairs] = weights
            at += pairs
        return out

    def documents_of(self, taken: Sequence[tuple[WindowPlan, int]]) -> set[int]:
        """The documents (corpus numbering) the given rows draw from."""
        return {int(plan.doc[s]) for plan, row in taken
                for s in range(plan.seg_start[row], plan.seg_start[row + 1])}


OPEN_ROWS = 64     # partial rows the packer keeps open (as grain's first-fit packer's bins)


def pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Piece indices per row, in order: a full piece is a row of its own; a shorter one goes
    into the first of at most OPEN_ROWS open rows with room for it, else opens a row (the
    fullest open row is closed when OPEN_ROWS are open)."""
    rows, open_rows, room = [], [], []          # open_rows[i] indexes rows; room[i] its space
    for index, size in enumerate(int(n) for n in lengths):
        if size >= capacity:
            rows.append([index])
            continue
        slot = next((i for i, r in enumerate(room) if r >= size), None)
        if slot is None:
            if len(open_rows) == OPEN_ROWS:
                fullest = int(np.argmin(room))
                open_rows.pop(fullest)
                room.pop(fullest)
            open_rows.append(len(rows))
            room.append(capacity)
            rows.append([])
            slot = len(open_rows) - 1
        rows[open_rows[slot]].append(index)
        room[slot] -= size
        if room[slot] == 0:
            open_rows.pop(slot)
            room.pop(slot)
    return rows


def empty_row(length: int) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0, no loss)."""
    row = {key: np.zeros(length, np.int32) for key in
           ("tokens", "targets", "positions", "segment_ids")}
    row["loss_mask"] = np.zeros(length, np.float32)
    return row


def stack_rows(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
