"""Length curriculum: which sequence length, batch and mesh layout at which step.

`make_curriculum(settings, device_count)` turns the `curriculum` section of the settings
(configs/sections.py's Settings) into a `Curriculum`:
K levels with their length (default l_max * 2^k), batch, step count (share of the budget,
rounded half up; the last level takes the rest), mesh (devices moved from `data` to `seq`
with `curriculum.relayout`) and per-level RoPE / learning-rate overrides, plus the level of
every step (`ascending` or seeded `interleaved`). Pure functions and frozen dataclasses;
nothing here touches devices. The rules are in docs/usage.md ("Length curriculum").
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np

from model.choices import SEQUENCE_PARALLEL
from model.positions import normalize_rope_scaling
from parallel.mesh import MESH_AXES, mesh_shape
from util.tables import format_table

SHARE_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Level:
    """One length of the curriculum and everything a step at that length needs."""
    index: int
    seq_len: int
    batch_size: int        # global rows per step at this level
    steps: int
    share: float           # the budget share requested for this level
    mesh: tuple            # ((axis, size), ...) for data, fsdp, seq, tensor, in that order
    rope_theta: float
    rope_scaling_json: str  # json.dumps(normalised scaling, sort_keys=True) or "null"
    lr_multiplier: float

    @property
    def tokens(self) -> int:
        """Tokens this level trains on: seq_len x batch_size x steps."""
        return self.seq_len * self.batch_size * self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def mesh_dict(self) -> dict[str, int]:
        """{"data": .., "fsdp": .., "seq": .., "tensor": ..}, e.g. for `parallel.mesh.make_mesh`."""
        return dict(self.mesh)

    @property
    def rope_scaling(self) -> dict | None:
        """The normalised RoPE scaling dict (None: plain RoPE)."""
        return json.loads(self.rope_scaling_json)

    @property
    def rows_per_device(self) -> int:
        """Rows each batch shard (data x fsdp group) holds at every step."""
        mesh = self.mesh_dict
        return self.batch_size // (mesh["data"] * mesh["fsdp"])

    @property
    def local_len(self) -> int:
        """Tokens of each row a device holds (the length split over `seq`)."""
        return self.seq_len // self.mesh_dict["seq"]


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """The whole curriculum: the levels and the level of every step.

    Contracts: `len(schedule) == total_steps == sum(level.steps)`; `schedule` holds each
    level index exactly `levels[k].steps` times; steps are 0-based.
    """
    levels: tuple[Level, ...]
    order: str
    unit: str
    schedule: tuple[int, ...]   # the level index of every step

    @property
    def total_steps(self) -> int:
        return len(self.schedule)

    @property
    def total_tokens(self) -> int:
        return sum(level.tokens for level in self.levels)

    @property
    def actual_shares(self) -> tuple[float, ...]:
        """Each level's part of the budget as planned (after rounding steps), in `unit`."""
        if self.unit == "tokens":
            amounts = [level.tokens for level in self.levels]
        else:
            amounts = [level.batch_size * level.steps for level in self.levels]
        total = sum(amounts)
        return tuple(a / total for a in amounts)

    def _check_step(self, step: int) -> int:
        step = int(step)
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the curriculum's {self.total_steps} steps")
        return step

    @functools.cached_property
    def _index_in_level(self) -> np.ndarray:
        """For every step, how many steps of its level precede it."""
        schedule = np.asarray(self.schedule, dtype=np.int64)
        out = np.empty(len(schedule), dtype=np.int64)
        for k in range(len(self.levels)):
            where = np.flatnonzero(schedule == k)
            out[where] = np.arange(len(where))
        return out

    @functools.cached_property
    def _tokens_cumulative(self) -> np.ndarray:
        per_level = np.array([level.tokens_per_step for level in self.levels], dtype=np.int64)
        per_step = per_level[np.asarray(self.schedule, dtype=np.int64)]
        return np.concatenate([[0], np.cumsum(per_step)])

    def level_at(self, step: int) -> Level:
        """The level that step `step` (0-based, < total_steps) trains at."""
        return self.levels[self.schedule[self._check_step(step)]]

    def steps_done_in_level(self, step: int) -> int:
        """How many steps of `level_at(step)`'s level come before `step` (resume bookkeeping)."""
        return int(self._index_in_level[self._check_step(step)])

    def tokens_before(self, step: int) -> int:
        """Tokens trained on by steps 0 .. step-1 (0 <= step <= total_steps)."""
        step = int(step)
        if not 0 <= step <= self.total_steps:
            raise IndexError(f"step {step} is outside 0 .. {self.total_steps}")
        return int(self._tokens_cumulative[step])

    def format(self) -> str:
        """The plan as a table: one row per level, then the totals."""
        header = ("level", "length", "batch", "steps", "tokens", "share", "actual",
                  "mesh", "rope theta", "rope scaling", "lr x")
        rows = [(level.index, level.seq_len, level.batch_size, level.steps, f"{level.tokens:,}",
                 f"{level.share:.4g}", f"{actual:.4g}", format_mesh(level.mesh),
                 _format_number(level.rope_theta), _format_scaling(level.rope_scaling),
                 f"{level.lr_multiplier:g}")
                for level, actual in zip(self.levels, self.actual_shares)]
        return "\n".join([
            f"length curriculum: {len(self.levels)} level(s), order {self.order}, "
            f"budget in {self.unit}",
            format_table(header, rows),
            f"total: {self.total_steps} steps, {self.total_tokens:,} tokens"])


def format_mesh(mesh) -> str:
    """"data 8 x seq 1", plus fsdp / tensor when they are > 1."""
    sizes = dict(mesh)
    parts = [f"{axis} {sizes[axis]}" for axis in MESH_AXES
             if axis in ("data", "seq") or sizes[axis] > 1]
    return " x ".join(parts)


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _format_scaling(scaling: dict | None) -> str:
    if scaling is None:
        return "none"
    factor = scaling.get("factor")
    return scaling["rope_type"] + (f" x{factor:g}" if factor is not None else "")


# ------------------------------------------------------------------------ building a plan
def default_shares(levels: int) -> tuple[float, ...]:
    """2^-(k+1) for k < K-1; the last level takes the remainder 2^-(K-1) (sum exactly 1)."""
    shares = [2.0 ** -(k + 1) for k in range(levels - 1)]
    return tuple(shares + [1.0 - sum(shares)])


def _per_level(value, levels: int, key: str) -> tuple | None:
    """A per-level override as a tuple of length `levels`, or None when not given."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"curriculum.{key} must be a list with one entry per level, got {value!r}")
    value = tuple(value)
    if len(value) != levels:
        raise ValueError(f"curriculum.{key} has {len(value)} entries but curriculum.levels is "
                         f"{levels}")
    return value


def _positive_floats(value, levels: int, key: str) -> tuple[float, ...] | None:
    value = _per_level(value, levels, key)
    if value is None:
        return None
    out = []
    for k, x in enumerate(value):
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"curriculum.{key}[{k}] must be a number, got {x!r}") from None
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"curriculum.{key}[{k}] must be positive, got {x!r}")
        out.append(x)
    return tuple(out)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _relayout_factor(seq_len: int, l_max: int, data: int) -> int:
    """Largest power of two dividing both the length factor len/l_max and `data`."""
    if seq_len % l_max:
        return 1
    common = math.gcd(seq_len // l_max, data)
    return common & -common   # lowest set bit: the largest power of two dividing it


def make_curriculum(settings, device_count: int) -> Curriculum:
    """The curriculum that `settings` (configs/sections.py's Settings) asks for on
    `device_count` devices.

    Reads `curriculum`, `train.steps / batch_size / grad_accum_steps`, `mesh`,
    `model.position / attention / rope`, `seed`.
    `levels == 1` gives one level equal to the plain run (l_max, batch_size, steps, mesh).

    Raises ValueError (one line, naming the key or level; each key's own range is
    base.check's, already run) for:
    shares that are not positive, not one per level or do not sum to 1 (within 1e-6);
    lengths that are not positive increasing integers, one per level, starting at l_max;
    overrides without one entry per level, non-positive thetas / multipliers, invalid
    scalings; a level whose batch is not a whole number of rows, or gets 0 steps, or whose
    batch does not split over its data x fsdp devices and grad_accum_steps; learned
    positions with lengths beyond l_max; a relayout onto seq > 1 without ring attention.
    """
    section, train = settings.curriculum, settings.train
    K = int(section.levels)
    l_max = int(section.l_max)
    S, B = int(train.steps), int(train.batch_size)
    unit, order = section.unit, section.order    # each key's own range: base.check, run

    # shares
    shares = _per_level(section.shares, K, "shares")
    if shares is None:
        shares = default_shares(K)
    else:
        shares = _positive_floats(shares, K, "shares")
        if abs(sum(shares) - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"curriculum.shares must sum to 1, got {sum(shares):.8g} "
                             f"from {list(shares)}")

    # lengths
    lengths = _per_level(section.lengths, K, "lengths")
    if lengths is None:
        lengths = tuple(l_max * 2 ** k for k in range(K))
    else:
        for k, x in enumerate(lengths):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
                raise ValueError(f"curriculum.lengths[{k}] must be a positive integer, got {x!r}")
        lengths = tuple(int(x) for x in lengths)
        if any(b <= a for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"curriculum.lengths must increase, got {list(lengths)}")
        if lengths[0] != l_max:
            raise ValueError(f"curriculum.lengths[0] ({lengths[0]}) must equal "
                             f"curriculum.l_max ({l_max}), the length of level 0")
    if settings.model.position == "learned" and lengths[-1] > l_max:
        raise ValueError(f"model.position='learned' covers l_max={l_max} tokens but the "
                         f"curriculum goes to {lengths[-1]}: use model.position='rope'")

    # per-level overrides
    thetas = _positive_floats(section.rope_thetas, K, "rope_thetas")
    if thetas is None:
        thetas = (float(settings.model.rope.theta),) * K
    scalings = _per_level(section.rope_scalings, K, "rope_scalings")
    names = [f"curriculum.rope_scalings[{k}]" for k in range(K)]
    if scalings is None:                  # the model's own at every level
        scalings, names = (settings.model.rope.scaling,) * K, ["model.rope.scaling"] * K
    scaling_json = []
    for k, scaling in enumerate(scalings):
        try:
            normal = normalize_rope_scaling(scaling, original_max_position_embeddings=l_max)
        except ValueError as e:
            raise ValueError(f"{names[k]}: {e}") from None
        scaling_json.append(json.dumps(normal, sort_keys=True))
    multipliers = _positive_floats(section.lr_multipliers, K, "lr_multipliers")
    if multipliers is None:
        multipliers = (1.0,) * K

    # batches
    if unit == "tokens":
        batches = []
        for k, length in enumerate(lengths):
            if (B * l_max) % length:
                raise ValueError(
                    f"curriculum level {k}: length {length} does not divide the step's "
                    f"{B} x {l_max} = {B * l_max} tokens into whole rows; raise "
                    f"train.batch_size to a multiple of {length // math.gcd(length, l_max)}")
            batches.append(B * l_max // length)
    else:
        batches = [B] * K

    # steps: round(share x S) for all but the last level, which takes the rest
    steps = [_round_half_up(share * S) for share in shares[:-1]]
    steps.append(S - sum(steps))
    for k, n in enumerate(steps):
        if n <= 0:
            raise ValueError(f"curriculum level {k} gets {max(n, 0)} steps of {S}; raise "
                             f"train.steps (or its share)")

    # meshes
    accum = int(train.grad_accum_steps)
    if accum < 1:
        raise ValueError(f"train.grad_accum_steps must be >= 1, got {accum}")
    base = mesh_shape(dataclasses.asdict(settings.mesh), device_count)
    levels = []
    for k in range(K):
        sizes = dict(base)
        if section.relayout:
            m = _relayout_factor(lengths[k], l_max, sizes["data"])
            sizes["data"] //= m
            sizes["seq"] *= m
        if sizes["seq"] > 1 and sizes["seq"] != base["seq"] and \
                settings.model.attention not in SEQUENCE_PARALLEL:
            raise ValueError(f"curriculum level {k} moves devices onto mesh.seq "
                             f"({sizes['seq']}, curriculum.relayout): set model.attention to "
                             f"one of {SEQUENCE_PARALLEL} or curriculum.relayout=False")
        row_groups = sizes["data"] * sizes["fsdp"]
        if batches[k] % row_groups:
            raise ValueError(
                f"curriculum level {k} (length {lengths[k]}): batch {batches[k]} does not split "
                f"over data x fsdp = {sizes['data']} x {sizes['fsdp']} devices; raise "
                f"train.batch_size"
                + ("" if section.relayout else " or set curriculum.relayout=True"))
        if (batches[k] // row_groups) % accum:
            raise ValueError(f"curriculum level {k} (length {lengths[k]}): train.grad_accum_steps "
                             f"({accum}) does not divide its {batches[k] // row_groups} rows "
                             f"per data shard")
        levels.append(Level(
            index=k, seq_len=lengths[k], batch_size=batches[k], steps=steps[k],
            share=float(shares[k]), mesh=tuple((axis, sizes[axis]) for axis in MESH_AXES),
            rope_theta=thetas[k], rope_scaling_json=scaling_json[k],
            lr_multiplier=multipliers[k]))

    schedule = np.repeat(np.arange(K), steps)
    if order == "interleaved":
        schedule = np.random.default_rng(settings.seed).permutation(schedule)
    return Curriculum(levels=tuple(levels), order=order, unit=unit,
                schedule=tuple(int(x) for x in schedule))


def beyond_trained_notice(settings, curriculum: Curriculum, level: Level, lengths,
                          what: str) -> str | None:
    """One notice line when any of `lengths` exceeds the longest length the run trained at
    (its last level), naming the positions in effect at `level`; None otherwise."""
    trained = curriculum.levels[-1].seq_len
    beyond = sorted({int(n) for n in lengths if int(n) > trained})
    if not beyond:
        return None
    if settings.model.position == "rope":
        positions = f"RoPE theta {_format_number(level.rope_theta)}, scaling " + \
            _format_scaling(level.rope_scaling)
    else:
        positions = f"position {settings.model.position}"
    return (f"note: {what} {', '.join(map(str, beyond))} tokens, beyond the trained length "
            f"{trained} ({positions})")


def eval_level(settings, curriculum: Curriculum) -> Level:
    """The level evaluation runs on: the last (most sequence-parallel) one, with the RoPE
    overrides of eval.rope_scaling / eval.rope_theta applied."""
    level = curriculum.levels[-1]
    evaluation = settings.eval
    if evaluation.rope_scaling is not None:
        try:
            scaling = normalize_rope_scaling(evaluation.rope_scaling,
                                             original_max_position_embeddings=settings.curriculum.l_max)
        except ValueError as error:
            raise ValueError(f"eval.rope_scaling: {error}") from None
        level = dataclasses.replace(level, rope_scaling_json=json.dumps(scaling, sort_keys=True))
    if evaluation.rope_theta:
        level = dataclasses.replace(level, rope_theta=float(evaluation.rope_theta))
    return level
