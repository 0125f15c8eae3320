"""Notices a process prints once, however often it is told them (a fallback chosen per
compiled call, for instance, is said at the first call only)."""
from __future__ import annotations

_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Print `message` the first time this process is told it."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, flush=True)
