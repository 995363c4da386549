"""Progress bars for choreo's long loops, readable on a terminal and in a log file.

On a terminal a bar redraws in place at tqdm's pace. A log file (CI, ``> log 2>&1``) keeps every redraw, one
carriage return after another, so there a bar redraws at most every ``LOG_INTERVAL_S`` seconds: a few hundred
bytes per bar and minute instead of tens of kilobytes.
"""

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, redrawn at most every ``LOG_INTERVAL_S`` seconds unless the process's standard
    error is a terminal (explicit ``mininterval`` / ``maxinterval`` win). The process's own stream is checked, not
    ``sys.stderr``: pytest's capture replaces that one with a stream that is never a terminal."""
    if not stderr_is_terminal():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
    return tqdm(iterable, **kwargs)


def stderr_is_terminal() -> bool:
    stream = sys.__stderr__
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # closed
        return False
