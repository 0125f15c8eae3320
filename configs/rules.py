"""The type and range of each config key, declared beside its default in configs/base.py.

    train = root.section("train")
    train.learning_rate = 3e-4, number(above=0)      # default, rule

`check(config)` tests every declared key of a config (after the command line and the
workdir's config.json are applied) and raises one ValueError line naming the first key out
of range. Rules hold what a key alone must satisfy; what ties keys together (a batch that
splits over the mesh, heads over the all-to-all) is checked by train/validate.py.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable

from ml_collections import config_dict


@dataclasses.dataclass(frozen=True)
class Rule:
    kind: type                         # the value's type (a None default's placeholder type)
    describe: str                      # "an integer >= 1", as the error line says it
    accepts: Callable[[Any], bool]
    optional: bool = False             # None allowed
    ceiling: int | None = None         # integers above it are refused with their own line

    def check(self, key: str, value) -> None:
        if value is None and self.optional:
            return
        if not self.accepts(value):
            values = value if isinstance(value, (tuple, list)) else (value,)
            if self.ceiling is not None and any(_is_int(v) and v > self.ceiling for v in values):
                raise ValueError(f"{key} must be at most {self.ceiling:,}, got {value!r}")
            also = " or None" if self.optional else ""
            raise ValueError(f"{key} must be {self.describe}{also}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _bounds(low, high, above, below) -> tuple[str, Callable[[Any], bool]]:
    words, tests = [], []
    for bound, word, test in ((low, ">=", lambda v, b: v >= b), (above, ">", lambda v, b: v > b),
                              (high, "<=", lambda v, b: v <= b), (below, "<", lambda v, b: v < b)):
        if bound is not None:
            words.append(f"{word} {bound}")
            tests.append(lambda v, b=bound, t=test: t(v, b))
    return " and ".join(words), lambda v: all(t(v) for t in tests)


# No integer key goes beyond int32: steps, lengths and ids reach JAX arrays, and larger
# values fail deep inside (an OverflowError) instead of here.
INT32_MAX = 2**31 - 1


def integer(low=None, high=None, *, also=(), optional=False) -> Rule:
    """An int in [low, high] (either bound may be open; never above INT32_MAX), or one of
    `also`."""
    words, inside = _bounds(low, high, None, None)
    describe = "an integer" + (f" {words}" if words else "")
    if also:
        describe += " or " + " or ".join(str(a) for a in also)
    ceiling = INT32_MAX if high is None else min(high, INT32_MAX)
    return Rule(int, describe,
                lambda v: _is_int(v) and ((inside(v) and v <= ceiling) or v in also),
                optional, ceiling)


def number(low=None, high=None, *, above=None, below=None, also=(), optional=False) -> Rule:
    """A finite int or float within the bounds (low/high closed, above/below open), or one
    of `also`."""
    words, inside = _bounds(low, high, above, below)
    describe = "a finite number" + (f" {words}" if words else "")
    if also:
        describe += " or " + " or ".join(str(a) for a in also)
    return Rule(float, describe, lambda v: _is_number(v) and (inside(v) or v in also),
                optional)


def flag() -> Rule:
    return Rule(bool, "True or False", lambda v: isinstance(v, bool))


def text(choices=None, *, optional=False) -> Rule:
    """A string, one of `choices` when given."""
    if choices is None:
        return Rule(str, "a string", lambda v: isinstance(v, str), optional)
    return Rule(str, f"one of {tuple(choices)}", lambda v: v in tuple(choices), optional)


def plain_name(*, optional=False) -> Rule:
    """A name for a file or directory inside the workdir: "" or letters, digits, '.', '_'
    and '-', not starting with '.' (no path separators, no '..')."""
    def accepts(value):
        return isinstance(value, str) and (
            value == "" or (not value.startswith(".") and
                            all(c.isalnum() or c in "._-" for c in value)))
    return Rule(str, "a plain name (letters, digits, '.', '_' and '-', not starting with "
                     "'.'; no path separators)", accepts, optional)


def items(item: Rule, *, optional=False, nonempty=False) -> Rule:
    """A tuple (or list) whose every element satisfies `item` (None elements only when
    `item` is optional)."""
    def accepts(value):
        if not isinstance(value, (tuple, list)) or (nonempty and not value):
            return False
        return all((v is None and item.optional) or item.accepts(v) for v in value)
    each = (f"values each {item.describe}" if item.describe.startswith("one of")
            else _plural(item.describe))
    describe = f"a {'non-empty ' if nonempty else ''}tuple of {each}"
    return Rule(tuple, describe, accepts, optional, item.ceiling)


def anything(*, optional=True) -> Rule:
    """Checked where it is read (e.g. a RoPE scaling dict by model/positions.py)."""
    return Rule(object, "a value", lambda v: True, optional)


def _plural(describe: str) -> str:
    for article in ("an ", "a "):
        if describe.startswith(article):
            noun, _, rest = describe[len(article):].partition(" ")
            return f"{noun}s {rest}".strip()
    return describe


class Section:
    """A ConfigDict being declared: `section.key = default, rule` sets the default (a
    placeholder of the rule's type for None) and records the rule under the key's path."""

    def __init__(self, node: config_dict.ConfigDict, path: str, rules: dict,
                 lines: dict | None = None):
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_rules", rules)
        object.__setattr__(self, "_lines", {} if lines is None else lines)

    def __setattr__(self, name: str, declared) -> None:
        default, rule = declared
        if not isinstance(rule, Rule):
            raise TypeError(f"{self._path}{name}: declare as `key = default, rule`")
        self.node[name] = config_dict.placeholder(rule.kind) if default is None else default
        self._rules[self._path + name] = rule
        # the declaring line, whose comments are the key's documentation (configs/reference.py)
        self._lines[self._path + name] = sys._getframe(1).f_lineno

    def section(self, name: str) -> "Section":
        self.node[name] = config_dict.ConfigDict()
        return Section(self.node[name], f"{self._path}{name}.", self._rules, self._lines)


def check(config, rules: dict) -> None:
    """One ValueError line for the first key of `config` outside its rule."""
    for key, rule in rules.items():
        node = config
        for part in key.split("."):
            node = node[part]
        rule.check(key, node)
