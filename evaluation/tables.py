"""The one table renderer: a markdown table whose columns are padded to line up, so the
same text reads well on a console, in a log file and in summary.md / compare.md."""
from __future__ import annotations


def _cell(text) -> str:
    """Text made safe for one markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(header, rows) -> str:
    """Lines of a markdown table; numbers (cells that parse as one) are right-aligned,
    text left-aligned, by column."""
    header = [_cell(h) for h in header]
    rows = [[_cell(c) for c in row] + [""] * (len(header) - len(row)) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows] + [3]) for i, h in enumerate(header)]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows if r[i])
               for i in range(len(header))]

    def line(cells):
        padded = (c.rjust(w) if right else c.ljust(w)
                  for c, w, right in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if right else "-")
                          for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True
