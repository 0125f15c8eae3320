"""Specification of context extension: configs/extend.py (Position Interpolation from a
trained workdir, resolved by configs/extension.py) and the interpolated learned-position table
(model.learned_positions_length)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import extend as extend_config_file
from evaluation.lengths import evaluable
from model.positions import interpolate_position_table, normalize_rope_scaling
from tests.helpers import read_metrics, small_config, train_losses
from configs import extension as extend_lib
from train import run_state
from configs import workdir_config
from train import trainer
from train.state import build_run
from train.checkpoint import restore_newest, restore_params_from
from configs.sections import settings as settings_of

LN_VOCAB = math.log(256)   # the loss of a random init on bytes


def extend_config(source, target, **overrides):
    """configs/extend.py from `source` to `target`, shrunk to seconds on a CPU: the keys
    train.init_from does not adopt get small_config's values, 3 steps of 8 rows."""
    config = extend_config_file.get_config()
    small = small_config()
    config.model.dtype = small.model.dtype
    config.model.block_q, config.model.block_k = small.model.block_q, small.model.block_k
    config.train.init_from = str(source)
    config.extend.target_length = target
    config.extend.warmup_steps = 1
    config.train.steps = 3
    config.train.batch_size = 8
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = False
    config.eval.batch_size = 8
    config.eval.max_batches = 1
    config.eval.lengths = (64, target)
    config.eval.sliding_stride = 0
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def saved_config(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ Position Interpolation
@pytest.fixture(scope="module")
def rope_source(tmp_path_factory):
    """(workdir, final training loss) of small_config() (RoPE, l_max 64) trained for 24
    steps: far enough from a random init's loss to tell the two apart."""
    workdir = str(tmp_path_factory.mktemp("rope") / "run")
    summary = trainer.train(small_config(**{"train.steps": 24, "train.log_every_steps": 4,
                                            "checkpoint.every_steps": 24,
                                            "eval.sliding_stride": 0}), workdir)
    return workdir, summary["final_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("factor, seq, kind", [(2, 1, "linear"), (4, 2, "linear"), (4, 1, "yarn")])
def test_extend_config_fine_tunes_the_source_at_the_target_length_with_its_scaling(
        rope_source, tmp_path, factor, seq, kind):
    source, source_loss = rope_source
    target = 64 * factor
    out = str(tmp_path / "extended")
    summary = trainer.train(extend_config(source, target, **{"mesh.seq": seq,
                                                            "extend.scaling": kind}), out)
    assert summary["step"] == 3 and not summary["stopped"]

    # the run's config: the scaling relative to the source's l_max, at the target length
    saved = saved_config(out)
    scaling = {"rope_type": kind, "factor": float(factor)}       # linear has no L0 key
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = 64
    assert saved["model"]["rope"]["scaling"] == scaling
    scaling = normalize_rope_scaling(scaling, target)
    assert run_state.load(out).original_length == 64                # L0, recorded
    assert saved["curriculum"]["l_max"] == target
    assert saved["train"]["learning_rate"] == 2e-5 and saved["train"]["weight_decay"] == 0.0
    assert saved["model"]["attention"] == ("ring" if seq > 1 else "blockwise")
    # ... and its model: the evaluation reports the normalised scaling it ran with
    assert summary["eval"]["rope_scaling"] == scaling

    # trained at the target length (over the seq axis when mesh.seq > 1)
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["seq_len"] for r in records] == [target] * 3
    if seq > 1:
        assert all(f"seq {seq}" in r["layout"] for r in records)

    # from the source's weights: the first loss (before any update) is near the source's
    # last training loss, far below a random init's ln(256)
    first = train_losses(out)[1]
    assert source_loss < LN_VOCAB - 1.5
    assert abs(first - source_loss) < 0.4, (first, source_loss)

    # evaluated up to the target
    assert summary["eval"]["lengths"] == [64, target]
    assert not summary["eval"]["not_evaluable"]
    assert all(np.isfinite(summary["eval"]["perplexity"]))


def write_source(path, **overrides):
    """A workdir holding only the config.json of small_config(**overrides) (resolve reads
    nothing else)."""
    workdir_config.write(small_config(**overrides), str(path))
    return str(path)


def test_resolve_sets_yarn_ring_and_warmup_and_is_idempotent(tmp_path):
    source = write_source(tmp_path / "src")
    config = extend_config(source, 256, **{"mesh.seq": 4, "train.steps": 40})
    config.extend.scaling = "yarn"
    config.extend.warmup_steps = 20
    resolved, changes = extend_lib.resolve(config)
    assert resolved.curriculum.l_max == 256
    assert dict(resolved.model.rope.scaling) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert resolved.model.attention == "ring"
    assert resolved.train.warmup_fraction == pytest.approx(0.5)
    assert extend_lib.original_length(config) == 64
    assert any(c.startswith("model.rope.scaling") for c in changes)
    assert config.curriculum.l_max != 256           # the input is not changed
    again, more = extend_lib.resolve(resolved)
    assert more == [] and again.to_dict() == resolved.to_dict()


def test_resolve_takes_the_original_length_from_the_sources_longest_level(tmp_path):
    source = write_source(tmp_path / "src", **{"curriculum.levels": 2})   # 64, 128
    config = extend_config(source, 512)
    resolved, _ = extend_lib.resolve(config)
    assert dict(resolved.model.rope.scaling) == {"rope_type": "linear", "factor": 4.0}
    assert extend_lib.original_length(config) == 128


def test_resolve_with_learned_positions_sets_the_table_length(tmp_path):
    source = write_source(tmp_path / "src", **{"model.position": "learned"})
    config, _ = workdir_config.adopt_model(extend_config(source, 128), source)
    resolved, _ = extend_lib.resolve(config)
    assert resolved.model.learned_positions_length == 128
    assert resolved.model.rope.scaling is None


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.train, "init_from", ""), "needs train.init_from"),
    (lambda c: setattr(c.extend, "target_length", 64), "must exceed"),
    (lambda c: setattr(c.extend, "target_length", -1), "give the new context length"),
    (lambda c: setattr(c.model.rope, "scaling", '{"rope_type": "linear", "factor": 8}'),
     "leave model.rope.scaling unset"),
    (lambda c: setattr(c.model.rope, "scaling", '{"rope_type": "yarn", "factor": 4}'),
     "leave model.rope.scaling unset"),
    (lambda c: setattr(c.curriculum, "levels", 2), "one length"),
])
def test_resolve_refuses_what_it_cannot_extend(tmp_path, change, message):
    config = extend_config(write_source(tmp_path / "src"), 256)
    change(config)
    with pytest.raises(ValueError, match=message):
        extend_lib.resolve(config)


def scaled_source(path, scaling, l_max=64):
    config = small_config(**{"curriculum.l_max": l_max})
    config.model.rope.scaling = scaling
    workdir_config.write(config, str(path))
    return str(path)


@pytest.mark.parametrize("scaling, l_max, target, expected", [
    # a PI run (x4 from 64, trained at 256) extended to 1024: positions / 4, then / 4 again
    ({"rope_type": "linear", "factor": 4.0}, 256, 1024, {"rope_type": "linear", "factor": 16.0}),
    # a YaRN run keeps its original length: factor = target / 64
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, 1024,
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64}),
    # an imported Llama 3.x (l_max = its original 64, llama3 x 8 covers 512) extended to 1024
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 64, 1024,
     {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 64,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    # a DeepSeek-style YaRN: mscale keys kept, the attention factor recomputed from them
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
      "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "truncate": False}, 256, 1024,
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
      "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "truncate": False}),
    # a Phi-3-style longrope (x4 from 64 covers 256): its per-frequency factors kept
    ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 64,
      "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]}, 64, 1024,
     {"rope_type": "longrope", "factor": 16.0, "original_max_position_embeddings": 64,
      "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]}),
])
def test_a_scaled_source_keeps_its_scaling_type_and_raises_the_factor(tmp_path, scaling, l_max,
                                                                      target, expected):
    source = scaled_source(tmp_path / "src", scaling, l_max)
    resolved, _ = extend_lib.resolve(extend_config(source, target))
    got = {k: v for k, v in dict(resolved.model.rope.scaling).items() if v is not None}
    want = {k: v for k, v in normalize_rope_scaling(expected, target).items() if v is not None}
    assert {k: v for k, v in normalize_rope_scaling(got, target).items() if v is not None} == want
    assert resolved.curriculum.l_max == target
    # and the resolved config builds a model (the longrope lists fit head_dim 16)
    from train.state import model_config_from
    model_config_from(settings_of(resolved), 256)


def test_a_target_the_scaled_source_already_covers_is_refused(tmp_path):
    source = scaled_source(tmp_path / "src", {"rope_type": "llama3", "factor": 8.0,
                                              "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match=r"must exceed the length .* covers \(512\)"):
        extend_lib.resolve(extend_config(source, 512))


def test_a_dynamic_scaled_source_is_refused(tmp_path):
    source = scaled_source(tmp_path / "src", {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic' RoPE scaling, which extend cannot raise"):
        extend_lib.resolve(extend_config(source, 256))


# ------------------------------------------------------------------ learned positions
def test_interpolate_position_table_is_linear_along_positions_with_the_endpoints_kept():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(7, 5)).astype(np.float32)
    for rows in (13, 28, 7, 4):
        x = np.arange(rows) * (7 - 1) / (rows - 1)
        reference = np.stack([np.interp(x, np.arange(7), table[:, c]) for c in range(5)], 1)
        out = interpolate_position_table(table, rows)
        assert out.shape == (rows, 5) and out.dtype == np.float32
        np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[0], table[0])
        np.testing.assert_array_equal(out[-1], table[-1])
        jitted = jax.jit(lambda t: interpolate_position_table(t, rows))(jnp.asarray(table))
        np.testing.assert_allclose(np.asarray(jitted), reference, rtol=1e-6, atol=1e-6)
    # doubling: even rows of the new table sit between old rows, in proportion
    doubled = interpolate_position_table(table, 13)
    np.testing.assert_allclose(doubled[1], (table[0] + table[1]) / 2, rtol=1e-6)


@pytest.fixture(scope="module")
def learned_source(tmp_path_factory):
    """A learned-positions workdir trained at l_max 64 (table of 64 rows)."""
    workdir = str(tmp_path_factory.mktemp("learned") / "run")
    trainer.train(small_config(**{"model.position": "learned", "train.steps": 24,
                                  "train.log_every_steps": 4, "checkpoint.every_steps": 24,
                                  "eval.sliding_stride": 0}), workdir)
    return workdir


def learned_extension(source, **overrides):
    return small_config(**{"model.position": "learned", "train.init_from": source,
                           "curriculum.l_max": 128, "train.steps": 2,
                           "eval.lengths": (64, 128), "eval.sliding_stride": 0, **overrides})


@pytest.mark.slow
def test_learned_positions_extended_by_interpolation_train_and_evaluate_at_the_new_length(
        learned_source, tmp_path):
    out = str(tmp_path / "extended")
    config = learned_extension(learned_source, **{"model.learned_positions_length": 128})
    summary = trainer.train(config, out)
    assert [r["seq_len"] for r in read_metrics(out) if "loss" in r] == [128, 128]
    assert summary["eval"]["lengths"] == [64, 128] and not summary["eval"]["not_evaluable"]
    assert all(np.isfinite(summary["eval"]["perplexity"]))
    assert saved_config(out)["model"]["learned_positions_length"] == 128
    assert build_run(settings_of(config)).model_config.l_max == 128        # the table's rows
    assert train_losses(out)[1] < LN_VOCAB - 1.0              # started from the source

    # what train.init_from loaded: the source's parameters, its table interpolated
    run = build_run(settings_of(config))
    loaded, resized = restore_params_from(learned_source, run, "test", table_rows_set=True)
    assert resized == (64, 128)
    source = restore_newest(learned_source, build_run(settings_of(small_config(
        **{"model.position": "learned"}))), "test")[0]["params"]
    table = np.asarray(source["position_table"][...])
    np.testing.assert_allclose(np.asarray(loaded["position_table"][...]),
                               interpolate_position_table(table, 128), rtol=1e-6, atol=1e-7)
    flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]:
        if "position_table" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(np.asarray(flat_loaded[path]), np.asarray(leaf))


@pytest.mark.slow
def test_without_learned_positions_length_the_longer_length_stays_not_evaluable(
        learned_source, tmp_path):
    source_model = build_run(
        settings_of(small_config(**{"model.position": "learned"}))).model_config
    assert "l_max=64" in evaluable(source_model, 128)
    assert evaluable(source_model, 64) is None
    extended = build_run(settings_of(learned_extension(learned_source, **{
        "model.learned_positions_length": 128}))).model_config
    assert evaluable(extended, 128) is None
    # starting a longer learned run from the 64-row table without the key is refused
    with pytest.raises(ValueError, match="learned_positions_length"):
        trainer.train(learned_extension(learned_source), str(tmp_path / "refused"))


@pytest.mark.parametrize("overrides, message", [
    ({"model.learned_positions_length": 32}, "beyond the 32 rows"),
    ({"model.learned_positions_length": -1}, "learned_positions_length must be an integer >= 0"),
])
def test_a_learned_run_longer_than_its_table_is_refused_before_training(overrides, message):
    from train.validate import validate_config
    config = small_config(**{"model.position": "learned", **overrides})
    with pytest.raises(ValueError, match=message):
        validate_config(settings_of(config))
