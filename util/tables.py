"""The one table renderer: a markdown table whose columns are padded to line up, so the
same text reads well on a console, in a log file and in summary.md / compare.md."""
from __future__ import annotations

from tabulate import tabulate


def _cell(text) -> str:
    """Text made safe for one markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(header, rows) -> str:
    """Lines of a markdown table (tabulate's "pipe" format); numbers (cells that parse as
    one, commas allowed) are right-aligned, text left-aligned, by column. Cells are taken
    as text, so they print exactly as given ("4.00" stays "4.00")."""
    header = [_cell(h) for h in header]
    rows = [[_cell(c) for c in row] + [""] * (len(header) - len(row)) for row in rows]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows if r[i])
               for i in range(len(header))]
    return tabulate(rows, headers=header, tablefmt="pipe", disable_numparse=True,
                    colalign=["right" if right else "left" for right in numeric])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True
