"""The executor a workflow condition runs on (the re-encoding baseline or the choreographer), and what the
workflows' ``run_condition`` functions share: their instances' seeds and how they run them."""

from __future__ import annotations

from ..baseline import Baseline
from ..cache import CapacityError
from ..checks import check_int
from ..choreographer import Choreographer

__all__ = ["EXECUTORS", "instance_seeds", "make_executor", "run_instances"]

EXECUTORS = ("baseline", "choreographed")


def make_executor(model, kind: str, *, capacity: int = 65536) -> Baseline | Choreographer:
    """``choreo.Baseline`` for "baseline", ``choreo.Choreographer`` for "choreographed".

    ``capacity``: the KV store's token cap. The choreographer keeps every message of a live instance; the baseline
    reserves each call's whole re-encoded prompt while the call runs (a parallel step's calls together) and frees
    it when the call ends, so many concurrent instances need more. Example: ``Runner(make_executor(model,
    "baseline"))``.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(map(repr, EXECUTORS))}")
    return Baseline(model, capacity=capacity) if kind == "baseline" else Choreographer(model, capacity=capacity)


def instance_seeds(seed, seeds, n: int, *, maximum: int, what: str) -> list[int]:
    """The seeds of ``n`` instances: ``seed + i`` for instance i, or ``seeds[i]``, each in 0..``maximum`` (the
    largest instance seed whose call seeds all fit a ``choreo.Call``). Errors name the argument given and its value.

    Example: ``instance_seeds(5, None, 3, maximum=10, what="problems")`` is ``[5, 6, 7]``; ``seed=9`` raises
    ``ValueError("seed must be an integer in 0..8, got 9")`` (its third instance would take seed 11).
    """
    if seeds is None:
        seed = check_int("seed", seed, minimum=0, maximum=maximum - max(n - 1, 0))
        return [seed + i for i in range(n)]
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} {what}")
    return [check_int(f"seeds[{i}]", s, minimum=0, maximum=maximum) for i, s in enumerate(seeds)]


def run_instances(runner, workflows, *, capacity: int, on_result=None) -> list:
    """``runner.run(workflows)``, where a CapacityError also names the ``run_condition`` arguments that fix it
    (``batch``, the runner's ``max_concurrent``, and ``capacity``), with their values."""
    try:
        return runner.run(workflows, on_result=on_result)
    except CapacityError as error:
        raise CapacityError(f"{error}; to run_condition, pass a lower batch= (now {runner.max_concurrent}) or a "
                            f"larger capacity= (now {capacity})") from error
