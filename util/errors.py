"""One-line renderings of errors and messages, for tables, warnings and `error:` lines."""
from __future__ import annotations


def first_line(text: str, limit: int | None = 200) -> str:
    """The first line of `text` cut to `limit` characters (None: uncut); "" for ""."""
    lines = text.splitlines()
    return lines[0][:limit] if lines else ""


def error_line(error: BaseException, limit: int | None = 200) -> str:
    """"ErrorClass: first line of the message" (the message cut to `limit` characters;
    None: uncut), or "ErrorClass" alone when the message is empty."""
    text = first_line(str(error), limit)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
