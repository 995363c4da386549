"""Progress bars: redrawn in place on a terminal, sparsely in a log file."""

import io
import subprocess
import sys

import pytest

from choreo import progress

LOOP = """
import time
from choreo.progress import progress_bar
for _ in progress_bar(range(200), desc="work"):
    time.sleep(0.005)
"""


def _redraws(tmp_path, code: str) -> int:
    log = tmp_path / "log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60)
    text = log.read_bytes()  # bytes: text mode would read each carriage return as a newline
    assert b"work" in text and b"200/200" in text  # the bar shows, and ends complete
    return text.count(b"\r")


def test_a_log_file_gets_the_first_and_last_draw_only(tmp_path):
    # 1 s of work: tqdm's own pace (every 0.1 s) would redraw about 10 times.
    plain = _redraws(tmp_path, LOOP.replace("progress_bar(range(200), ", "progress_bar(range(200), mininterval=0.1, "))
    assert plain >= 5
    assert _redraws(tmp_path, LOOP) <= 2


@pytest.mark.parametrize("terminal", [True, False])
def test_the_interval_follows_the_process_stderr_not_pytests_capture(monkeypatch, terminal):
    class Stream:
        def isatty(self):
            return terminal

    monkeypatch.setattr(progress.sys, "__stderr__", Stream())
    bar = progress.progress_bar(range(3), file=io.StringIO())
    assert (bar.mininterval, bar.maxinterval) == ((0.1, 10.0) if terminal else (30.0, 30.0))
    explicit = progress.progress_bar(range(3), file=io.StringIO(), mininterval=60.0)
    assert (explicit.mininterval, explicit.maxinterval) == ((60.0, 10.0) if terminal else (60.0, 60.0))


def test_a_closed_or_missing_stderr_counts_as_no_terminal(monkeypatch):
    monkeypatch.setattr(progress.sys, "__stderr__", None)
    assert not progress.stderr_is_terminal()
    closed = open(__file__)
    closed.close()
    monkeypatch.setattr(progress.sys, "__stderr__", closed)
    assert not progress.stderr_is_terminal()
