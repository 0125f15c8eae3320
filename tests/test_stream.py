"""Specification of the training stream (data/stream.py, data/pipeline.py): rows, the
global shuffle of pieces, one stream through the curriculum, per-process rows, resume, and
the synthetic retrieval mix in it."""
import json

import numpy as np
import pytest

from data.corpus import Corpus, shard_from_documents
from data.pipeline import make_train_stream
from data.retrieval_mix import retrieval_mix, synthetic_sample
from data.stream import Documents, TrainStream, pack_rows
from data.tokenizers import make_tokenizer
from data.windows import validation_documents
from tests.helpers import KEYS, assert_batches_equal, segments, text_config, varied_texts

BYTES = make_tokenizer("bytes")


def stream_of(tmp_path, texts, lengths=(32,), seed=0, **overrides):
    config = text_config(tmp_path, texts, validation_percent=0, **overrides)
    return make_train_stream(config, BYTES, lengths=lengths, seed=seed)


def token_corpus(lengths, seed=0, vocab=1000):
    """A corpus of random documents with these token counts."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, n) for n in lengths]
    return Corpus([shard_from_documents(docs, vocab)], vocab), docs


def rows_until_epoch(stream, level, length, rows_per_step, epochs=1):
    """(window plan, row) of every row the level yields until the shared cursor enters
    epoch `epochs` and the level's window of the epoch before is used up."""
    taken = []
    while True:
        batch = stream.next_rows(level, length, rows_per_step)
        taken += batch
        if all(plan.epoch >= epochs for plan, _ in batch):
            return taken


def covered(taken, epoch):
    """(document, pair) for every pair the rows of `epoch` cover, with repeats."""
    pairs = []
    for plan, row in taken:
        if plan.epoch != epoch:
            continue
        for s in range(plan.seg_start[row], plan.seg_start[row + 1]):
            doc, offset, n = int(plan.doc[s]), int(plan.offset[s]), int(plan.length[s])
            pairs += [(doc, offset + i) for i in range(n)]
    return pairs


# ------------------------------------------------------------------ rows
def test_batches_have_the_shapes_and_dtypes(tmp_path):
    batch = stream_of(tmp_path, varied_texts(30)).next_batch(0, 32, 4)
    assert sorted(batch) == sorted(KEYS)
    for key, dtype in KEYS.items():
        assert batch[key].shape == (4, 32) and batch[key].dtype == dtype


def test_targets_are_the_next_token_of_the_same_document(tmp_path):
    texts = varied_texts(30)
    stream = stream_of(tmp_path, texts)
    documents = [t.encode() for t in texts]
    for _ in range(5):
        for tokens, targets, positions in segments(stream.next_batch(0, 32, 4)):
            piece = bytes(np.append(tokens, targets[-1]).astype(np.uint8))
            assert any(piece in d for d in documents)
            np.testing.assert_array_equal(tokens[1:], targets[:-1])
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))


def test_padding_has_segment_zero_and_no_loss(tmp_path):
    batch = stream_of(tmp_path, ["short one", "another short text", "x y z"]).next_batch(0, 32, 4)
    padding = batch["segment_ids"] == 0
    assert padding.any()
    assert (batch["loss_mask"][padding] == 0).all() and (batch["tokens"][padding] == 0).all()
    assert (batch["loss_mask"][~padding] == 1).all()


def test_documents_shorter_than_two_tokens_give_no_rows():
    corpus, _ = token_corpus([1, 1, 0])
    with pytest.raises(ValueError, match="no training document has 2 or more tokens"):
        Documents(corpus)


def test_the_packer_fills_rows_first_fit_and_keeps_full_pieces_alone():
    assert pack_rows(np.array([8, 3, 6, 5, 2, 8]), 8) == [[0], [1, 3], [2, 4], [5]]
    rows = pack_rows(np.random.default_rng(0).integers(1, 9, 500), 8)
    assert sorted(i for row in rows for i in row) == list(range(500))


# ------------------------------------------------------------------ the global shuffle
def test_an_epoch_visits_every_pair_of_every_document_exactly_once():
    lengths = [5, 40, 97, 33, 2, 64, 120, 7]
    corpus, _ = token_corpus(lengths)
    stream = TrainStream(Documents(corpus), block=32, seed=3)
    pairs = covered(rows_until_epoch(stream, 0, 32, 3), epoch=0)
    expected = [(d, p) for d, n in enumerate(lengths) for p in range(n - 1)]
    assert sorted(pairs) == sorted(expected)              # all of them, none twice


def test_the_pieces_of_an_epoch_are_shuffled_over_the_whole_corpus():
    """Consecutive rows come from documents far apart, and each epoch in another order."""
    corpus, _ = token_corpus([300] * 200)
    stream = TrainStream(Documents(corpus), block=16, seed=0)
    first_steps = stream.next_rows(0, 16, 64)             # 64 of the 3,800 pieces
    documents = stream.documents_of(first_steps)
    assert len(documents) > 50                            # a window shuffle would see 1-3
    epoch_0 = [int(plan.doc[plan.seg_start[r]]) for plan, r in
               rows_until_epoch(stream, 0, 16, 64) if plan.epoch == 0]
    epoch_1 = [int(plan.doc[plan.seg_start[r]]) for plan, r in stream.next_rows(0, 16, 64)]
    assert epoch_1 != epoch_0[:64]


def test_the_stream_depends_on_the_seed(tmp_path):
    texts = varied_texts(40)
    a, b, c = (stream_of(tmp_path / name, texts, seed=seed)
               for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    first, again, other = (s.next_batch(0, 32, 8) for s in (a, b, c))
    assert_batches_equal([first], [again])
    assert not np.array_equal(first["tokens"], other["tokens"])


# ------------------------------------------------------------------ one stream, many levels
def test_levels_share_one_epoch_and_no_pair_repeats_across_them():
    corpus, _ = token_corpus([200] * 60 + [40] * 30)
    stream = TrainStream(Documents(corpus), block=64, seed=1, window_rows=8)
    taken = []
    for step in range(400):                                # interleaved 16 / 32 / 64
        level, length = [(0, 16), (1, 32), (2, 64)][step % 3]
        taken += stream.next_rows(level, length, 2)
    pairs = covered(taken, epoch=0)
    assert len(pairs) == len(set(pairs))                  # nothing twice within the epoch
    assert any(plan.epoch == 1 for plan, _ in taken)      # and the epoch did end


def test_a_new_level_continues_at_the_blocks_the_previous_level_left():
    corpus, _ = token_corpus([100] * 400)
    stream = TrainStream(Documents(corpus), block=64, seed=2, window_rows=16)
    level_0 = stream.next_rows(0, 32, 4)
    after = stream.state()["cursor"]["next_block"]
    level_1 = stream.next_rows(1, 64, 4)
    assert level_1[0][0].first == after == level_0[-1][0].first + level_0[-1][0].count


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_the_rows_of_every_process_assemble_to_the_same_global_batch(tmp_path, processes):
    texts = varied_texts(60, max_len=150)
    whole = stream_of(tmp_path / "one", texts, lengths=(16, 32))
    parts = [stream_of(tmp_path / f"p{p}", texts, lengths=(16, 32)) for p in range(processes)]
    for step in range(6):
        level, length, rows = (0, 16, 8) if step % 2 == 0 else (1, 32, 4)
        expected = whole.next_batch(level, length, rows)
        local = rows // processes
        pieces = [part.next_batch(level, length, rows, row_offset=p * local, local_rows=local)
                  for p, part in enumerate(parts)]
        assert_batches_equal([expected], [{k: np.concatenate([x[k] for x in pieces])
                                           for k in expected}])


@pytest.mark.parametrize("restore_at", [3, 10, 23])   # mid-level, at a switch, interleaved
def test_a_restored_stream_continues_exactly(tmp_path, restore_at):
    texts = varied_texts(30, max_len=200)
    schedule = [(0, 16, 8)] * 10 + [(1, 32, 4), (0, 16, 8)] * 10

    def run(stream, steps):
        return [stream.next_batch(*schedule[s]) for s in steps]

    expected = run(stream_of(tmp_path / "a", texts, lengths=(16, 32)), range(len(schedule)))
    first = stream_of(tmp_path / "b", texts, lengths=(16, 32))
    run(first, range(restore_at))
    state = json.loads(json.dumps(first.state()))         # what a checkpoint holds
    second = stream_of(tmp_path / "c", texts, lengths=(16, 32))
    second.set_state(state)
    assert_batches_equal(run(second, range(restore_at, len(schedule))), expected[restore_at:])


# ------------------------------------------------------------------ the retrieval mix
def mix_config(tmp_path, count=40, **overrides):
    keys = dict(retrieval_fraction=0.5, retrieval_tasks=("passkey", "kv", "line"),
                retrieval_min_length=110, retrieval_max_length=160, validation_percent=0)
    keys.update(overrides)
    return text_config(tmp_path, varied_texts(count), **keys)


def synthetic_rows(stream, taken):
    corpus_docs = len(stream.documents.corpus)
    return [(plan, row) for plan, row in taken if plan.doc[plan.seg_start[row]] >= corpus_docs]


def test_synthetic_documents_take_their_share_of_the_epoch(tmp_path):
    config = mix_config(tmp_path, count=60, retrieval_fraction=0.3)
    stream = make_train_stream(config, BYTES, lengths=[160], seed=0)
    synthetic = stream.documents.synthetic
    assert synthetic.per_epoch == round(60 * 0.3 / 0.7)
    lengths = synthetic.lengths(0)
    assert lengths.min() >= 110 and lengths.max() <= 160 and len(set(lengths)) > 10
    docs = {int(plan.doc[s]) for plan, row in rows_until_epoch(stream, 0, 160, 8)
            if plan.epoch == 0 for s in range(plan.seg_start[row], plan.seg_start[row + 1])}
    assert docs == set(range(60 + synthetic.per_epoch))   # each corpus and synthetic doc


def test_a_synthetic_sample_is_one_segment_with_its_answer_weighted(tmp_path):
    config = mix_config(tmp_path, retrieval_answer_weight=5.0)
    stream = make_train_stream(config, BYTES, lengths=[160], seed=4)
    mix = retrieval_mix(config, BYTES, seq_len=160)
    corpus_docs = len(stream.documents.corpus)
    found = 0
    for _ in range(6):
        taken = stream.next_rows(0, 160, 8)
        for plan, row in synthetic_rows(stream, taken):
            doc = int(plan.doc[plan.seg_start[row]]) - corpus_docs
            sample = synthetic_sample(mix, BYTES, seed=4, epoch=plan.epoch, index=doc,
                                      length=int(stream.documents.synthetic.lengths(plan.epoch)[doc]))
            out = stream.materialize(plan, row, 160)
            where = out["segment_ids"] == out["segment_ids"][0]
            p, a = sample.prompt.size, sample.answer.size
            np.testing.assert_array_equal(out["tokens"][where][:p], sample.prompt)
            np.testing.assert_array_equal(out["targets"][where][p - 1:p - 1 + a], sample.answer)
            weights = np.ones(where.sum(), np.float32)
            weights[-a:] = 5.0
            np.testing.assert_array_equal(out["loss_mask"][where], weights)
            found += 1
    assert found >= 5


def test_a_restored_stream_with_the_mix_continues_exactly(tmp_path):
    config = mix_config(tmp_path, count=12)
    first = make_train_stream(config, BYTES, lengths=[160], seed=7)
    for _ in range(6):
        first.next_batch(0, 160, 4)
    state = json.loads(json.dumps(first.state()))
    expected = [first.next_batch(0, 160, 4) for _ in range(3)]
    second = make_train_stream(config, BYTES, lengths=[160], seed=7)
    second.set_state(state)
    assert_batches_equal([second.next_batch(0, 160, 4) for _ in range(3)], expected)


@pytest.mark.parametrize("overrides, key", [
    (dict(retrieval_fraction=1.0), "retrieval_fraction"),
    (dict(retrieval_fraction=-0.1), "retrieval_fraction"),
    (dict(retrieval_tasks=("passkey", "haystack")), "retrieval_tasks"),
    (dict(retrieval_tasks=()), "retrieval_tasks"),
    (dict(retrieval_min_length=170), "retrieval_min_length"),              # min > max
    (dict(retrieval_max_length=200), "retrieval_max_length"),              # max > seq_len
    (dict(retrieval_min_length=-1), "retrieval_min_length"),
    (dict(retrieval_min_length=50), "retrieval_min_length"),               # below the tasks'
    (dict(retrieval_min_length=0), "retrieval_min_length"),                # 0: 160 // 4 = 40
    (dict(retrieval_answer_weight=0.0), "retrieval_answer_weight"),
    (dict(retrieval_answer_weight=float("inf")), "retrieval_answer_weight"),
])
def test_bad_retrieval_keys_are_errors(tmp_path, overrides, key):
    config = mix_config(tmp_path, count=5, **overrides)
    with pytest.raises(ValueError, match=f"data.{key}"):
        make_train_stream(config, BYTES, lengths=[160], seed=0)


def test_too_short_minimum_names_the_task_minimum():
    from tests.helpers import data_config
    config = data_config(retrieval_fraction=0.5, retrieval_tasks=("passkey",),
                         retrieval_min_length=0)
    with pytest.raises(ValueError, match=r"l_max // 4.*passkey sample needs at least 104"):
        retrieval_mix(config, BYTES, seq_len=512, l_max=256)
    mix = retrieval_mix(config, BYTES, seq_len=512, l_max=512)
    assert (mix.min_length, mix.max_length) == (128, 512)


def test_zero_retrieval_fraction_leaves_the_stream_unchanged(tmp_path):
    texts = varied_texts(40)
    plain = stream_of(tmp_path / "a", texts, seed=1)
    zero = stream_of(tmp_path / "b", texts, seed=1, retrieval_fraction=0.0,
                     retrieval_tasks=("kv",), retrieval_min_length=999)
    assert zero.documents.synthetic is None
    assert_batches_equal([zero.next_batch(0, 32, 4) for _ in range(4)],
                         [plain.next_batch(0, 32, 4) for _ in range(4)])


def test_the_validation_split_stays_pure_corpus_with_the_mix(tmp_path):
    config = mix_config(tmp_path, validation_percent=100)
    pure = mix_config(tmp_path / "pure", validation_percent=100, retrieval_fraction=0.0)
    for a, b in zip(validation_documents(config, BYTES), validation_documents(pure, BYTES)):
        np.testing.assert_array_equal(a, b)


def test_task_weights_set_each_task_share_of_the_synthetic_documents(tmp_path):
    config = mix_config(tmp_path, retrieval_task_weights=(3, 1, 0))
    mix = retrieval_mix(config, BYTES, seq_len=160)
    tasks = [synthetic_sample(mix, BYTES, seed=0, epoch=0, index=j, length=150).task
             for j in range(400)]
    assert tasks.count("line") == 0                          # weight 0: never drawn
    assert abs(tasks.count("passkey") / 400 - 0.75) < 0.06   # 3 : 1
    uniform = retrieval_mix(mix_config(tmp_path / "u"), BYTES, seq_len=160)
    assert uniform.task_probabilities is None


@pytest.mark.parametrize("weights", [(1, 1), (1, -1, 1), (0, 0, 0), ("a", 1, 1)])
def test_bad_task_weights_are_errors(tmp_path, weights):
    config = mix_config(tmp_path, count=5, retrieval_task_weights=weights)
    with pytest.raises(ValueError, match="data.retrieval_task_weights"):
        retrieval_mix(config, BYTES, seq_len=160)
