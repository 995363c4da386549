"""Options and fixtures shared by the library tests (tests/) and the reproduction suites (suites/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU only in the interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from choreo.profiles import DEFAULT_PROFILE, PROFILES

ROOT = Path(__file__).resolve().parent


def default_data_dir() -> str | None:
    """$CHOREO_DATA (checked in ``pytest_configure``), else ../shared/data beside the checkout if it is there."""
    if os.environ.get("CHOREO_DATA"):
        return os.environ["CHOREO_DATA"]
    shared = ROOT.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def _data_dir_source(config) -> str | None:
    """Where an explicit data folder came from: the command line, $CHOREO_DATA, or neither (the optional default)."""
    if any(arg == "--data-dir" or arg.startswith("--data-dir=") for arg in map(str, config.invocation_params.args)):
        return "--data-dir"
    return "$CHOREO_DATA" if os.environ.get("CHOREO_DATA") else None


def pytest_addoption(parser):
    group = parser.getgroup("choreo")
    group.addoption("--profile", default=DEFAULT_PROFILE, choices=PROFILES,
                    help="size of the reproduction suites: smoke (CI), small (CPU, tens of minutes), paper")
    group.addoption("--model", default=None, help="local Hugging Face checkpoint; default: the embedded SmolLM2-135M")
    group.addoption("--results-dir", default=None,
                    help="write result tables here (default: a temporary folder; `choreo repro` uses results/)")
    group.addoption("--data-dir", default=default_data_dir(),
                    help="folder with commongen_hard.jsonl (the blockage BSM suite's concept sets) and/or "
                         "math_test.jsonl (the applications suite's MATH problems); default: $CHOREO_DATA or "
                         "../shared/data; a --data-dir or $CHOREO_DATA without either file is an error")
    group.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    """A data folder named on purpose that the suites would ignore (they fall back to built-in data) is an error."""
    from choreo.repro import check_data_dir

    source, value = _data_dir_source(config), config.getoption("--data-dir")
    if source and value:
        try:
            check_data_dir(value, source=source)
        except FileNotFoundError as error:
            raise pytest.UsageError(str(error)) from None


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def profile(request) -> str:
    return request.config.getoption("--profile")


@pytest.fixture(scope="session")
def data_dir(request) -> Path | None:
    value = request.config.getoption("--data-dir")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def results_dir(request, tmp_path_factory) -> Path:
    value = request.config.getoption("--results-dir")
    return Path(value) if value else tmp_path_factory.mktemp("results")


@pytest.fixture(scope="session")
def model(request):
    """The model under test: --model, else the embedded SmolLM2-135M-Instruct (fp32, CPU)."""
    import choreo

    return choreo.load_model(request.config.getoption("--model"))
