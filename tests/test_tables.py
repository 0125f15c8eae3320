"""Specification of the one table renderer (util/tables.py)."""
from util.tables import format_table
from tests.helpers import parse_markdown_table


def test_columns_are_aligned_on_every_line():
    rows = [["a", "short"], ["a much longer name", "x"]]
    lines = format_table(["name", "note"], rows).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert len({tuple(i for i, c in enumerate(line) if c == "|") for line in lines}) == 1


def test_numeric_columns_are_right_aligned_and_text_left_aligned():
    lines = format_table(["run", "tokens", "ppl"],
                         [["a", "1,024", "9.5"], ["bbbbbb", "65,536", "10.25"], ["c", "", "7"]]
                         ).splitlines()
    assert lines[0] == "| run    |   tokens |   ppl |"
    assert lines[1] == "|:-------|---------:|------:|"      # where the ":" is: the alignment
    assert lines[2] == "| a      |    1,024 |   9.5 |"
    assert lines[4] == "| c      |          |     7 |"      # blank cells do not make text


def test_a_column_with_any_text_is_left_aligned():
    lines = format_table(["length", "perplexity"], [["64", "9.000"], ["128", "n/e"]]).splitlines()
    assert lines[2] == "|       64 | 9.000        |"
    assert lines[1].endswith("|:-------------|")


def test_pipes_in_cells_are_escaped():
    text = format_table(["a|b", "c"], [["x | y", "1"]])
    assert "a\\|b" in text and "x \\| y" in text
    rows = [line.replace("\\|", "/") for line in text.splitlines()]
    header, cells = parse_markdown_table(rows)
    assert header == ["a/b", "c"] and cells == [["x / y", "1"]]


def test_short_rows_are_padded_with_blank_cells():
    header, rows = parse_markdown_table(format_table(["a", "b", "c"], [["1"]]).splitlines())
    assert rows == [["1", "", ""]]
