"""Typed sections: a section of configs/base.py as a frozen dataclass, and the whole
config as one (`Settings`), for everything below main.py and configs/, which never reads
the ml_collections config itself.

    settings = sections.settings(config)       # checked (base.check), typed, frozen
    settings.train.batch_size, settings.seed    # attributes, as in the config
    data = sections.typed(config, "data")      # one section

The dataclasses are generated from base.py's declarations (the field types are the
rules' types), so each key stays declared once: a key added there is a field here. Nested
sections (eval.data, eval.ruler) are nested dataclasses; tuples stay tuples, dict values
(RoPE scalings) become plain dicts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

from ml_collections import config_dict

from configs import base


def _rules() -> dict:
    if not base.RULES:
        base.get_config()
    return base.RULES


@functools.cache
def section_class(path: str) -> type:
    """The frozen dataclass of section `path` ("data", "eval.ruler"; "" the whole config,
    `Settings`): one field per key, typed by its rule (Optional when None is allowed), a
    nested dataclass per subsection."""
    fields, seen = [], set()
    prefix = path + "." if path else ""
    for key, rule in _rules().items():
        if not key.startswith(prefix):
            continue
        name, _, rest = key[len(prefix):].partition(".")
        if name in seen:
            continue
        seen.add(name)
        if rest:
            fields.append((name, section_class(prefix + name)))
        else:
            fields.append((name, Optional[rule.kind] if rule.optional else rule.kind))
    if not fields:
        raise KeyError(f"configs/base.py declares no section {path!r}")
    name = ("".join(part.title() for part in path.replace("_", ".").split(".")) + "Section"
            if path else "Settings")
    return dataclasses.make_dataclass(name, fields, frozen=True)


def _plain(value: Any) -> Any:
    if isinstance(value, config_dict.ConfigDict):
        return value.to_dict()
    if isinstance(value, list):
        return tuple(value)
    return value


def typed(config, path: str):
    """Section `path` of `config` (a ConfigDict with base.py's keys, already checked by
    base.check) as its section_class instance."""
    node = config
    for part in path.split(".") if path else ():
        node = node[part]
    values = {}
    for field in dataclasses.fields(section_class(path)):
        if dataclasses.is_dataclass(field.type):
            values[field.name] = typed(config, f"{path}.{field.name}" if path else field.name)
        else:
            values[field.name] = _plain(node[field.name])
    return section_class(path)(**values)


def settings(config):
    """The whole `config` (base.py's keys, with the command line's and config.json's values)
    checked by base.check and frozen as `Settings`: one field per section, and seed."""
    base.check(config)
    return typed(config, "")


def replace(settings, changes: dict):
    """A copy of `settings` (or of a section) with {"mesh.seq": 1, ...} set: dotted keys
    relative to it. Values are not checked; a key it does not have is a KeyError."""
    for key in changes:
        node = settings
        for name in key.split("."):
            if not dataclasses.is_dataclass(node) or not hasattr(node, name):
                raise KeyError(f"no key {key!r} in {type(settings).__name__}")
            node = getattr(node, name)
    here, nested = {}, {}
    for key, value in changes.items():
        name, _, rest = key.partition(".")
        if rest:
            nested.setdefault(name, {})[rest] = value
        else:
            here[name] = value
    for name, inner in nested.items():
        here[name] = replace(getattr(settings, name), inner)
    return dataclasses.replace(settings, **here)


def plain(config, path: str) -> dict:
    """Section `path` of `config` as a plain dict of its typed values (e.g. the mesh sizes
    that parallel/mesh.py takes)."""
    return dataclasses.asdict(typed(config, path))


def _publish_every_section() -> None:
    """Every section class as a module attribute (DataSection, EvalRulerSection, ...), so
    that instances pickle (e.g. to --mode prepare's worker processes)."""
    for key in _rules():
        parts = key.split(".")
        for depth in range(len(parts)):
            cls = section_class(".".join(parts[:depth]))
            cls.__module__ = __name__
            globals()[cls.__name__] = cls


_publish_every_section()
