"""Specification of the console progress line (util/progress.py)."""
import io
import types

import pytest

from util import progress as progress_lib
from util.progress import Progress, format_duration


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for util/progress.py: set clock.now to move time."""
    fake = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(progress_lib, "time", types.SimpleNamespace(time=lambda: fake.now))
    return fake


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(clock, updates, **kwargs):
    """Feed (time, done, text) updates to a Progress on a StringIO; return what it wrote."""
    stream = kwargs.pop("stream", None) or io.StringIO()
    total = max(done for _, done, _ in updates)
    progress = Progress(total, "eval", stream=stream, enabled=True, **kwargs)
    for now, done, text in updates:
        clock.now = now
        progress.update(done, text)
    return stream.getvalue()


def test_not_a_terminal_gets_whole_lines_without_carriage_returns(clock):
    out = run(clock, [(0, 0, "a"), (1, 1, "b"), (10, 3, "c"), (13, 5, "e")], interval_s=10)
    assert "\r" not in out and out.endswith("\n")
    assert out.splitlines() == ["eval 0/5 | a", "eval 3/5 | c | ETA 0m06s",
                                "eval 5/5 | e | ETA 0m00s"]


def test_not_a_terminal_gets_at_most_one_line_per_interval_and_the_final_one(clock):
    # 200 updates 0.5 s apart: lines at 0.5 s, 10.5 s, ..., 90.5 s, then the last at 100 s
    out = run(clock, [(0.5 * i, i, "") for i in range(1, 201)], interval_s=10)
    lines = out.splitlines()
    assert len(lines) == 11
    assert lines[0].startswith("eval   1/200") and lines[1].startswith("eval  21/200")
    assert lines[-1].startswith("eval 200/200")


def test_eta_appears_once_there_is_a_rate(clock):
    lines = run(clock, [(0, 0, "x"), (30, 1, "x"), (60, 2, "x"), (70, 4, "x")],
                every_line=True).splitlines()
    assert "ETA" not in lines[0]                         # nothing done yet: no rate
    assert lines[1] == "eval 1/4 | x | ETA 1m30s"         # 30 s per unit, 3 to go
    assert lines[2].endswith("ETA 1m00s")


def test_restart_clock_leaves_the_compile_out_of_the_rate(clock):
    stream = io.StringIO()
    progress = Progress(10, "step", every_line=True, stream=stream, enabled=True)
    clock.now = 100.0                                   # the first step compiled for 100 s
    progress.update(1)
    progress.restart_clock(1)
    clock.now = 101.0
    progress.update(2)
    assert stream.getvalue().splitlines()[-1] == "step  2/10 | ETA 0m08s"


def test_every_line_prints_every_update(clock):
    out = run(clock, [(0, i, f"loss {i}") for i in range(1, 6)], every_line=True)
    assert out.splitlines() == [f"eval {i}/5 | loss {i} | ETA 0m00s" for i in range(1, 6)]


def test_every_line_prints_whole_lines_even_on_a_terminal(clock):
    out = run(clock, [(0, 1, ""), (1, 2, "")], every_line=True, stream=Terminal())
    assert "\r" not in out and out.count("\n") == 2


def test_a_terminal_gets_one_line_redrawn_in_place(clock):
    out = run(clock, [(0, 1, "a"), (0.1, 2, "b"), (0.2, 3, "c")], stream=Terminal())
    assert out.count("\r") == 3 and out.count("\n") == 1 and out.endswith("\n")


def test_disabled_progress_prints_nothing(clock):
    stream = io.StringIO()
    progress = Progress(3, "eval", stream=stream, enabled=False)
    progress.advance("x")
    assert stream.getvalue() == "" and progress.done == 1


@pytest.mark.parametrize("seconds,text", [(0, "0m00s"), (65, "1m05s"), (3599, "59m59s"),
                                          (3720, "1h02m"), (-5, "0m00s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
