"""Specification of eval.retrieval_scoring = "generate": retrieval exact match by greedy
decoding of each prompt (evaluation/retrieval.py generated_exact_match, run by
evaluation/suite.py greedy_generator on one device from the eval mesh's parameters)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import retrieval_tasks
from data.windows import batches_of
from evaluation import retrieval as retrieval_lib
from configs import sections
from evaluation import suite
from evaluation.scoring import Scorer
from model.transformer import Transformer
from parallel import mesh as mesh_lib
from tests.helpers import small_config
from train.curriculum import eval_level
from train.state import build_run, eval_setup_from, init_state
from train.validate import validate_config
from configs.sections import settings as settings_of

LENGTHS, DEPTHS = (128, 160), (0.0, 0.5, 1.0)


class NoProgress:
    def advance(self, *_):
        pass


@pytest.fixture(scope="module")
def setup():
    """A random small model on the 8-device eval mesh (data 8) and a passkey grid."""
    config = small_config(**{"eval.retrieval_tasks": ("passkey",)})
    curriculum = validate_config(settings_of(config))
    run = build_run(settings_of(config), level=eval_level(settings_of(config), curriculum))
    params = init_state(run, seed=0)["params"]
    samples = retrieval_tasks.make_grid("passkey", run.tokenizer, lengths=LENGTHS,
                                        depths=DEPTHS, samples_per_cell=1, seed=0)
    return run, params, samples


def reference_greedy(run, params, prompt, new):
    """The slow reference: a full forward (dense attention, host parameters) over the whole
    sequence per new token, argmax. The sequence has its final length from the start, the
    slots not yet decoded hold 0: causal attention keeps them out of every position read,
    and one compiled forward serves every token."""
    dense = dataclasses.replace(run.model_config, attention="dense", remat="none")
    names = run.mesh.axis_names
    one = jax.sharding.Mesh(np.array(jax.devices()[-1:]).reshape((1,) * len(names)), names)
    with mesh_lib.use_mesh(one):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(dense, rngs=nnx.Rngs(0))),
                                nnx.Param)
        model = nnx.merge(graphdef, jax.device_get(params))
        forward = nnx.jit(lambda model, tokens: model(tokens))
        start = len(prompt)
        sequence = np.zeros((1, start + new), np.int32)      # [1, prompt + new]
        sequence[0, :start] = prompt
        for i in range(new):
            logits = forward(model, jnp.asarray(sequence))
            sequence[0, start + i] = int(jnp.argmax(logits[0, start + i - 1]))
    return sequence[0, start:]


def grids_of(samples, batch_size):
    by_length = {L: batches_of(retrieval_lib.teacher_forced_batch(
        [s for s in samples if s.length == L], L), batch_size) for L in LENGTHS}
    return {"passkey": (samples, by_length)}


@pytest.mark.slow
def test_generated_tokens_equal_the_full_forward_argmax_loop(setup):
    run, params, samples = setup
    generate_fn = suite.greedy_generator(run, params)
    for length in LENGTHS:
        group = [s for s in samples if s.length == length]
        new = group[0].answer.size
        out = generate_fn(np.stack([s.prompt for s in group]), new)
        for row, s in enumerate(group):
            np.testing.assert_array_equal(out[row], reference_greedy(run, params, s.prompt, new))


@pytest.mark.slow
def test_generate_scoring_equals_the_reference_and_agrees_with_teacher_forcing(setup):
    """On the true answers (a random model misses them) and on answers replaced by the
    model's own greedy continuation (teacher-forced exact match holds by construction, so
    generation must hit too); the answer log-probability is the teacher-forced one."""
    run, params, samples = setup
    own = [dataclasses.replace(s, answer=reference_greedy(run, params, s.prompt, s.answer.size))
           for s in samples]
    mixed = [o if i % 2 == 0 else s for i, (s, o) in enumerate(zip(samples, own))]
    expected = np.array([i % 2 == 0 or bool(np.array_equal(o.answer, s.answer))
                         for i, (s, o) in enumerate(zip(samples, own))])
    generate_fn = suite.greedy_generator(run, params)
    assert np.array_equal(retrieval_lib.generated_exact_match(generate_fn, mixed), expected)
    grids = grids_of(mixed, 8)
    forced = retrieval_lib.score_grids(Scorer(run, params), grids, 0.0, NoProgress())["passkey"]
    generated = retrieval_lib.score_grids(Scorer(run, params), grids, 0.0, NoProgress(),
                                          generate_fn)["passkey"]
    assert generated["mean_answer_logprob"] == forced["mean_answer_logprob"]
    # every other sample (in make_grid order) is the model's own continuation: a hit
    assert generated["accuracy"] == forced["accuracy"]
    assert sum(map(sum, generated["accuracy"])) >= len(mixed) // 2
    # teacher-forced exact match on the own-continuation samples, so generation hits them
    own_grid = retrieval_lib.score_grids(Scorer(run, params), grids_of(own, 8), 0.0,
                                         NoProgress(), generate_fn)["passkey"]
    assert own_grid["accuracy"] == [[1.0] * len(DEPTHS)] * len(LENGTHS)


def test_unknown_retrieval_scoring_is_one_clear_error():
    config = small_config(**{"eval.retrieval_scoring": "sampled"})
    with pytest.raises(ValueError, match="eval.retrieval_scoring must be one of"):
        validate_config(settings_of(config))
    with pytest.raises(ValueError, match="eval.retrieval_scoring must be one of"):
        suite.retrieval_scoring(sections.typed(config, "eval"))


@pytest.mark.slow
def test_evaluate_with_generate_scoring_records_it_and_keeps_the_logprob():
    """suite.evaluate end to end on the 8-device eval mesh: "generate" changes only how
    exact match is decided (a random model: the same misses) and is recorded."""
    results = {}
    for scoring in ("teacher_forced", "generate"):
        config = small_config(**{"eval.retrieval_tasks": ("passkey",),
                                 "eval.retrieval_lengths": (128,),
                                 "eval.retrieval_samples": 1,
                                 "eval.sliding_stride": 0,
                                 "eval.retrieval_scoring": scoring})
        curriculum = validate_config(settings_of(config))
        settings = settings_of(config)
        run = build_run(settings, level=eval_level(settings, curriculum))
        data = suite.build_eval_data(eval_setup_from(settings), run.model_config, run.tokenizer)
        results[scoring] = suite.evaluate(run, init_state(run, seed=0)["params"], data)["retrieval"]
    assert [results[s]["scoring"] for s in results] == ["teacher_forced", "generate"]
    forced, generated = (results[s]["tasks"]["passkey"] for s in results)
    assert generated["mean_answer_logprob"] == forced["mean_answer_logprob"]
    assert generated["accuracy"] == forced["accuracy"]
