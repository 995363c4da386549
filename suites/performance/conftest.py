"""Fixtures, helpers and pytest-benchmark hooks of the performance suite."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import pytest

HERE = Path(__file__).resolve().parent
BASELINE_RATIOS = HERE / "baseline_ratios.json"
MODEL_DEVICES = pytest.StashKey[set]()  # the devices the suite's model ran on, for machine_info


class TableKept(UserWarning):
    """A module's table was not written (interrupted run, or not every row measured): the one on disk stays."""


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the device the suite's model ran on (not merely one that is present), the libraries and the load the
    numbers were measured under."""
    import torch

    from choreo.provenance import device_name, library_versions

    devices = sorted(config.stash.get(MODEL_DEVICES, set()))
    machine_info["choreo"] = {
        "device": ", ".join(device_name(d) for d in devices) or "no model loaded",
        "model_devices": devices,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }


@pytest.fixture(autouse=True)
def _model_device(request):
    """The device of the suite's model (``model.spec.device``): into machine_info, and each benchmark's extra_info."""
    if "model" not in request.fixturenames:
        return
    from choreo.provenance import device_name

    device = request.getfixturevalue("model").spec.device
    request.config.stash.setdefault(MODEL_DEVICES, set()).add(str(device))
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["device"] = device_name(device)


@pytest.fixture(scope="session")
def model_path(request) -> str | None:
    """The checkpoint the ``model`` fixture loaded (--model; None: the embedded model), for subprocesses."""
    return request.config.getoption("--model")


@pytest.fixture(scope="session")
def stored_ratios() -> dict:
    """The committed regression baseline: speed-up ratios per profile and shape (see README)."""
    return json.loads(BASELINE_RATIOS.read_text())


def timed_rounds(benchmark, target: Callable, *, setup: Callable | None = None, rounds: int, warmup: int):
    """``benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup)``, also when the benchmark is
    disabled (--benchmark-disable, xdist): pedantic then runs setup and target once, cold, but the side-by-side
    ratios need every round, so the others run here first, untimed. Returns target's last result.

    Example: ``timed_rounds(benchmark, lambda: run(32), setup=lambda: run(1), rounds=3, warmup=1)``.
    """
    if benchmark.disabled:
        for _ in range(warmup + rounds - 1):
            if setup is not None:
                setup()
            target()
    return benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)


def stopped_early(session) -> str | None:
    """Why the session stopped before its selected tests had all run (Ctrl-C, ``-x``/``--maxfail``), or None.

    pytest still tears module fixtures down then: at Ctrl-C it sets ``exitstatus`` to INTERRUPTED before the
    session's fixtures are torn down; on ``-x`` it tears them down right after the failing test, ``shouldfail`` set.
    """
    if session.shouldstop or session.shouldfail:
        return str(session.shouldstop or session.shouldfail)
    if getattr(session, "exitstatus", pytest.ExitCode.OK) == pytest.ExitCode.INTERRUPTED:
        return "interrupted"
    return None


def table_complete(request, measured: Iterable[str], expected: Iterable[str], *, table: str) -> bool:
    """Whether a module fixture may write ``table`` at its teardown: the session ran to its end and every
    ``expected`` row was ``measured``. Otherwise the table already on disk is kept (a Ctrl-C or a ``-k`` subset
    must not replace a full table with a partial one) and a ``TableKept`` warning says why.

    Example: ``table_complete(request, figures, [s.label for s in cfg.shapes], table="speedups_suite")``.
    """
    measured = list(measured)
    missing = [row for row in expected if row not in measured]
    why = stopped_early(request.session)
    if why is None and missing:
        why = f"rows not measured in this session: {missing}"
    if why and measured:
        warnings.warn(f"{table}.md/.json not written, any earlier one is kept: {why}", TableKept, stacklevel=2)
    return not why
