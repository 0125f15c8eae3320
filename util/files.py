"""Files a reader never sees half-written."""
from __future__ import annotations

import os


def replace_text(path: str, text: str) -> None:
    """`path` holds `text`, replaced atomically (written beside it, then renamed); left
    untouched when it already says the same, so a command that changes nothing leaves the
    file as it was. The directory is made if missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
