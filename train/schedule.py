"""The learning rate of every step, and what a resume may change about it.

The rate is the token-driven warmup + cosine of train/optimizer.py times the level's
multiplier. A resume whose config changes what the rate depends on (SCHEDULE_KEYS) is
refused, unless train.allow_schedule_change is set; then the run continues from the rate
it had reached: a bridge (tokens, difference), kept in the run state
(W/run_state.json, train/run_state.py), adds the difference between the old and the new
rate at the resume point, shrinking linearly to 0 at the end of the new budget, so the rate
never jumps and ends where the new schedule ends.
"""
from __future__ import annotations

from train import curriculum as curriculum_lib
from train.optimizer import learning_rate_at

SCHEDULE_KEYS = ("train.steps", "train.learning_rate", "train.warmup_fraction",
                 "train.min_learning_rate_ratio", "curriculum.shares",
                 "curriculum.lr_multipliers")


def rate(settings, curriculum: curriculum_lib.Curriculum, step: int, tokens: int,
         bridge=None) -> float:
    """The learning rate of step `step` (0-based), after `tokens` tokens (`bridge`: the
    run state's schedule bridge, or None)."""
    train = settings.train
    step = min(step, curriculum.total_steps - 1)
    value = curriculum.level_at(step).lr_multiplier * learning_rate_at(
        tokens, curriculum.total_tokens, train.learning_rate, train.warmup_fraction,
        train.min_learning_rate_ratio)
    if bridge:
        start, difference = bridge
        remaining = max(curriculum.total_tokens - start, 1)
        value += difference * max(0.0, 1.0 - (tokens - start) / remaining)
    return value


def _value(settings, key: str):
    node = settings
    for part in key.split("."):
        node = getattr(node, part)
    return tuple(node) if isinstance(node, (list, tuple)) else node


def changed_keys(settings, saved) -> list[str]:
    """The SCHEDULE_KEYS whose value in `settings` differs from the run's `saved` ones
    (both configs/sections.py's Settings)."""
    return [key for key in SCHEDULE_KEYS if _value(settings, key) != _value(saved, key)]


def check_resume(settings, saved, workdir: str) -> list[str]:
    """Before a resume of `workdir` (whose config.json, as Settings, is `saved`): the
    changed schedule keys; one ValueError line when there are any and
    train.allow_schedule_change is not set. Unchanged, the run keeps the bridge it has."""
    changed = changed_keys(settings, saved)
    if changed and not settings.train.allow_schedule_change:
        key = changed[0]
        raise ValueError(f"{key} is {_value(settings, key)!r} but {workdir} was trained with "
                         f"{_value(saved, key)!r}: resuming would re-plan the learning-rate "
                         f"schedule mid-run; keep it, or set "
                         f"--config.train.allow_schedule_change=True to continue from the "
                         f"current rate")
    return changed


def bridge(settings, curriculum, saved, saved_curriculum, step: int, tokens: int,
           saved_bridge=None) -> tuple[int, float]:
    """(tokens, difference) that makes the new schedule start at the rate the `saved`
    schedule (with its own bridge, `saved_bridge`) had reached at (step, tokens)."""
    return (int(tokens), rate(saved, saved_curriculum, step, tokens, saved_bridge)
            - rate(settings, curriculum, step, tokens))
