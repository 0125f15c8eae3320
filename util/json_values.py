"""JSON that stays JSON: non-finite numbers (a NaN loss, an infinite perplexity) are
written as null, never as the bare NaN / Infinity that json.dumps emits by default and
strict readers reject."""
from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **options) -> str:
    return json.dumps(finite(value), allow_nan=False, **options)


def dump(value, file, **options) -> None:
    file.write(dumps(value, **options))
