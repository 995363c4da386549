"""Fixtures and pytest-benchmark hooks of the performance suite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BASELINE_RATIOS = HERE / "baseline_ratios.json"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the device, the libraries and the load the numbers were measured under."""
    import torch

    from choreo.provenance import device_name, library_versions

    machine_info["choreo"] = {
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }


@pytest.fixture(scope="session")
def stored_ratios() -> dict:
    """The committed regression baseline: speed-up ratios per profile and shape (see README)."""
    return json.loads(BASELINE_RATIOS.read_text())
