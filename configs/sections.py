"""Typed sections: a section of configs/base.py as a frozen dataclass, for the rooms below
train/ (data/, evaluation/, ...), which never read the ml_collections config itself.

    data = sections.typed(config, "data")      # after the command line and config.json
    data.source, data.validation_percent        # attributes, checked by base.check

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
    """The frozen dataclass of section `path` ("data", "eval.ruler"): one field per key,
    typed by its rule (Optional when None is allowed), a nested dataclass per subsection."""
    fields, seen = [], set()
    prefix = path + "."
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
    name = "".join(part.title() for part in path.replace("_", ".").split(".")) + "Section"
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
    for part in path.split("."):
        node = node[part]
    values = {}
    for field in dataclasses.fields(section_class(path)):
        if dataclasses.is_dataclass(field.type):
            values[field.name] = typed(config, f"{path}.{field.name}")
        else:
            values[field.name] = _plain(node[field.name])
    return section_class(path)(**values)


def plain(config, path: str) -> dict:
    """Section `path` of `config` as a plain dict of its typed values (e.g. the mesh sizes
    that parallel/mesh.py takes)."""
    return dataclasses.asdict(typed(config, path))


def _publish_every_section() -> None:
    """Every section class as a module attribute (DataSection, EvalRulerSection, ...), so
    that instances pickle (e.g. to --mode prepare's worker processes)."""
    for key in _rules():
        parts = key.split(".")
        for depth in range(1, len(parts)):
            cls = section_class(".".join(parts[:depth]))
            cls.__module__ = __name__
            globals()[cls.__name__] = cls


_publish_every_section()
