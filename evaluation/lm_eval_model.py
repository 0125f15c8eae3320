"""An lm-evaluation-harness model (`lm_eval.api.model.LM`) over plain callables: the
project's teacher-forced scorer (evaluation/scoring.py `Scorer`), a generation function
(evaluation/generate.py `generate` bound to a model) and the run's tokenizer.

Nothing here opens a workdir (that needs train/: cli/lm_eval_mode.py builds the pieces
from a workdir's newest checkpoint and registers the model as "boundless").

  loglikelihood          sum of log p(continuation | context) and whether every
                         continuation token is the argmax (lm-eval's (float, bool))
  loglikelihood_rolling  the text's log-likelihood in disjoint windows of `max_length`
                         (lm_eval.utils.get_rolling_token_windows, context_len 1), the
                         first token conditioned on `prefix_id`
  generate_until         greedy (temperature 0 / do_sample False) or temperature + top_p
                         sampling, at most max_gen_toks tokens, cut at the first `until`
                         string

Contexts are encoded as lm-eval's Hugging Face model does: trailing whitespace of the
context moves to the continuation, and the continuation's tokens are those of
encode(context + continuation) after encode(context)'s; an empty context is `prefix_id`.
Sequences longer than `max_length` keep their last `max_length` tokens.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

# scored rows are padded to a multiple of this many tokens, so that requests of nearby
# lengths share one compiled scoring function
LENGTH_BUCKET = 64


def bucket_length(length: int, max_length: int) -> int:
    """`length` rounded up to a multiple of LENGTH_BUCKET (the next power of two below
    it), never beyond max(length, max_length)."""
    step = min(LENGTH_BUCKET, 1 << max(0, (length - 1).bit_length()))
    return min(-(-length // step) * step, max(length, max_length))


def score_rows(score: Callable, rows: list[tuple[np.ndarray, int]], max_length: int,
               rows_multiple: int = 1) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, all greedy) of the last `n` targets of each
    (tokens, n) in `rows` (tokens: the whole sequence, its first token only a context),
    scored in one [len(rows) rounded up to rows_multiple, bucket] host batch by `score`
    (batch dict -> (nll, is_argmax), as a Scorer)."""
    lengths = [len(tokens) - 1 for tokens, _ in rows]
    length = bucket_length(max(lengths), max_length)
    count = -(-len(rows) // rows_multiple) * rows_multiple
    batch = {"tokens": np.zeros((count, length), np.int32),
             "targets": np.zeros((count, length), np.int32),
             "positions": np.zeros((count, length), np.int32),
             "segment_ids": np.zeros((count, length), np.int32),
             "loss_mask": np.zeros((count, length), np.float32)}
    for i in range(count):
        tokens, n = rows[min(i, len(rows) - 1)]     # filler rows repeat the last one
        size = len(tokens) - 1
        batch["tokens"][i, :size] = tokens[:-1]
        batch["targets"][i, :size] = tokens[1:]
        batch["positions"][i, :size] = np.arange(size)
        batch["segment_ids"][i, :size] = 1
        batch["loss_mask"][i, size - n:size] = 1
    nll, hit = score(batch)
    out = []
    for i, (tokens, n) in enumerate(rows):
        size = len(tokens) - 1
        out.append((-float(np.sum(nll[i, size - n:size])), bool(np.all(hit[i, size - n:size]))))
    return out


class BoundlessLM(LM):
    """lm-eval's LM over `score` (host batch -> (nll, is_argmax) [rows, length], e.g.
    evaluation.scoring.Scorer), `generate` ((prompt ids [batch, length], max_new_tokens,
    temperature, top_p, seed) -> new ids [batch, <= max_new_tokens]; None: generate_until
    is refused) and `tokenizer` (encode / decode).

    max_length: the longest sequence scored or generated (lm_eval.max_length, by default
    the trained length);
    prefix_id: the token before a text with no context (loglikelihood_rolling's first
    window, an empty context); eos_ids: ids whose text also ends a generation;
    batch_size: requests per scoring batch; rows_multiple: scoring batches are padded to a
    multiple of this many rows (data x fsdp of the scoring mesh)."""

    def __init__(self, score: Callable, generate: Callable | None, tokenizer, max_length: int,
                 prefix_id: int = 0, eos_ids=(), batch_size: int = 1, rows_multiple: int = 1,
                 seed: int = 0):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"lm_eval: max_length must be >= 2, got {max_length}")
        self._score, self._generate, self.tokenizer = score, generate, tokenizer
        self.max_length, self.prefix_id = int(max_length), int(prefix_id)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.batch_size, self.rows_multiple = max(1, int(batch_size)), max(1, int(rows_multiple))
        self.seed = int(seed)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        return [int(i) for i in np.asarray(self.tokenizer.encode(text)).reshape(-1)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's HFLM splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        if not context:
            return [self.prefix_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return whole[:len(context_ids)], whole[len(context_ids):]

    # ------------------------------------------------------------------ scoring
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context ids, continuation ids): the
        continuation keeps its last max_length tokens and the context what room is left."""
        rows = []
        for context, continuation in pairs:
            if not continuation:
                rows.append(None)
                continue
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((np.asarray(whole, np.int32), min(len(continuation), len(whole) - 1)))
        results: list = [(0.0, True)] * len(pairs)
        # longest first: a batch's rows have similar lengths
        order = sorted((i for i, row in enumerate(rows) if row is not None),
                       key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, result in zip(chunk, score_rows(self._score, [rows[i] for i in chunk],
                                                   self.max_length, self.rows_multiple)):
                results[i] = result
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        results = self.score_pairs(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The disjoint (context, continuation) windows lm-eval scores `text` in."""
        return [make_disjoint_window(window) for window in get_rolling_token_windows(
            token_list=self.encode(text), prefix_token=self.prefix_id,
            max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows = [self.rolling_windows(request.args[0]) for request in requests]
        flat = [window for text_windows in windows for window in text_windows]
        scores = iter(self.score_pairs(flat))
        results = [float(sum(next(scores)[0] for _ in text_windows)) for text_windows in windows]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    # ------------------------------------------------------------------ generation
    def generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, float]:
        """(until strings, max_gen_toks, temperature, top_p) of lm-eval's gen_kwargs."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        until = [u for u in until if u]
        for eos in self.eos_ids:
            text = self.tokenizer.decode([eos])
            if text and text not in until:
                until.append(text)
        max_gen_toks = int(kwargs.pop("max_gen_toks", 256))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        return until, max_gen_toks, temperature, min(max(top_p, 1e-6), 1.0)

    def generate_until(self, requests) -> list[str]:
        if self._generate is None:
            raise ValueError("lm_eval: this model was built without a generate function")
        prepared = []
        for request in requests:
            context, gen_kwargs = request.args
            until, max_gen_toks, temperature, top_p = self.generation_settings(gen_kwargs)
            max_gen_toks = max(1, min(max_gen_toks, self.max_length - 1))
            prompt = (self.encode(context) or [self.prefix_id])[-(self.max_length - max_gen_toks):]
            prepared.append((prompt, until, max_gen_toks, temperature, top_p))
        # requests with equal prompt lengths and settings share one generate call
        groups: dict = {}
        for i, (prompt, until, max_gen_toks, temperature, top_p) in enumerate(prepared):
            groups.setdefault((len(prompt), max_gen_toks, temperature, top_p), []).append(i)
        results: list = [""] * len(requests)
        for (_, max_gen_toks, temperature, top_p), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = np.asarray([prepared[i][0] for i in chunk], np.int32)
                new = np.asarray(self._generate(prompts, max_gen_toks, temperature, top_p,
                                                self.seed))
                for row, i in enumerate(chunk):
                    results[i] = cut_at_stops(self.tokenizer.decode(new[row]), prepared[i][1])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, result)
        return results


def cut_at_stops(text: str, until) -> str:
    """`text` up to (not including) the earliest occurrence of any string of `until`."""
    cut = len(text)
    for stop in until:
        where = text.find(stop)
        if where != -1:
            cut = min(cut, where)
    return text[:cut]
