"""The executor a workflow condition runs on: the re-encoding baseline or the choreographer."""

from __future__ import annotations

from ..baseline import Baseline
from ..choreographer import Choreographer

__all__ = ["EXECUTORS", "make_executor"]

EXECUTORS = ("baseline", "choreographed")


def make_executor(model, kind: str, *, capacity: int = 65536) -> Baseline | Choreographer:
    """``choreo.Baseline`` for "baseline", ``choreo.Choreographer`` for "choreographed".

    ``capacity``: the KV store's token cap (the baseline keeps every re-encoded prompt of a live instance, so many
    concurrent instances need more). Example: ``Runner(make_executor(model, "baseline"))``.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(map(repr, EXECUTORS))}")
    return Baseline(model, capacity=capacity) if kind == "baseline" else Choreographer(model, capacity=capacity)
