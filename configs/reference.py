"""The configuration reference, docs/configuration.md, generated from configs/base.py.

    python -m configs.reference > docs/configuration.md

One table per section: each key's default, its rule (type and range, in the words of the
error line) and its meaning, which is the comment on the key's declaring line in
configs/base.py, after the comment block directly above that line. tests/test_config_reference.py
fails when the file and this output differ, or when a key has no comment.
"""
from __future__ import annotations

import io
import json
import os
import tokenize

from configs import base

BASE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py")


def comments_by_line(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without '#')."""
    out = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            out[token.start[0]] = token.string.lstrip("#").strip()
    return out


def documentation(source: str, lines: dict[str, int]) -> dict[str, str]:
    """Key -> its comments, joined into one line: the whole-line comments right above its
    line (section rulers `# --- x ---` excluded), then the one on its line."""
    text_lines = source.splitlines()
    comments = comments_by_line(source)
    out = {}
    for key, line in lines.items():
        above, at = [], line - 1
        while at >= 1 and text_lines[at - 1].lstrip().startswith("#") \
                and not text_lines[at - 1].lstrip().startswith("# ---"):
            above.insert(0, comments[at])
            at -= 1
        out[key] = " ".join(above + ([comments[line]] if line in comments else []))
    return out


def _value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    return "None" if value is None else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/configuration.md's text."""
    config = base.get_config()
    with open(BASE_FILE, encoding="utf-8") as f:
        docs = documentation(f.read(), base.LINES)
    lines = ["# Configuration reference", "",
             "Generated from `configs/base.py` by `python -m configs.reference > "
             "docs/configuration.md`; do not edit by hand. Every key a run reads is here, with "
             "its default, its rule (checked before a run creates anything: one line naming "
             "the key, exit 2) and what it means. Set a key with `--config.KEY=VALUE` (tuples "
             "and dicts as Python or JSON literals, quoted for the shell); a preset in "
             "`configs/` changes some defaults.", ""]
    sections: dict[str, list[str]] = {}
    for key in base.RULES:
        sections.setdefault(key.split(".")[0] if "." in key else "(top level)", []).append(key)
    for section, keys in sections.items():
        lines += [f"## {section}", "", "| key | default | rule | meaning |", "|---|---|---|---|"]
        for key in keys:
            node = config
            for part in key.split("."):
                node = node[part]
            rule = base.RULES[key]
            describe = rule.describe + (" or None" if rule.optional else "")
            lines.append(f"| `{key}` | `{_cell(_value(node))}` | {_cell(describe)} | "
                         f"{_cell(docs[key])} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
