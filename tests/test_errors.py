"""Specification of util/errors.py: errors and messages as one line."""
from util.errors import error_line, first_line


def test_first_line_is_the_first_line_cut_to_the_limit():
    assert first_line("abcdef\nsecond", 3) == "abc"
    assert first_line("abcdef\nsecond", None) == "abcdef"
    assert first_line("") == ""


def test_error_line_names_the_class_and_the_first_line_of_the_message():
    assert error_line(ValueError("bad value\ntraceback-like detail"), 5) == "ValueError: bad v"
    assert error_line(OSError("x" * 300)) == "OSError: " + "x" * 200


def test_error_line_of_an_empty_message_is_the_class_alone():
    assert error_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert error_line(RuntimeError("\nsecond line only")) == "RuntimeError"
