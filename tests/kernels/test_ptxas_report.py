"""The default tiles compile for sm_90 without spilling registers (Triton's ahead-of-time compiler and the ptxas
in its wheel; no GPU needed). A kernel that spills pays local-memory traffic in its inner loop whatever its tiles,
so a change that makes the defaults spill is a performance regression this machine can see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# Register allocation, and the compiler's Python API, change between Triton releases: the budgets below are
# those of the pinned 3.7 line.
pytestmark = pytest.mark.skipif(not triton.__version__.startswith("3.7."),
                                reason=f"spill budgets recorded for Triton 3.7, this is {triton.__version__}")
ROOT = Path(__file__).resolve().parents[2]

# Bytes of spill stores tolerated per kernel: the forward's prefill tile spills 12 bytes with Triton 3.7 (a few
# registers kept across its loop); anything beyond a handful of registers is a regression.
MAX_SPILL = 64


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("registers")


@pytest.fixture(scope="module")
def default_stats(report_dir):
    if not PTXAS.is_file():
        pytest.skip(f"no ptxas in the Triton wheel ({PTXAS})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for a GPU, not interpret
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", "--json", "--dtype", "bf16", "fp32",
                          "--head-dim", "64", "128", "--out", str(report_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_report_table_carries_provenance(default_stats, report_dir):
    data = json.loads((report_dir / "registers.json").read_text())
    assert len(data["rows"]) == len(default_stats)
    assert "sm_90" in data["provenance"]["device"] and data["provenance"]["versions"]["triton"] == triton.__version__
    assert "ptxas_report" in data["provenance"]["command"]
    assert "spilled bytes" in (report_dir / "registers.md").read_text()


def test_default_tiles_do_not_spill(default_stats):
    labels = {(s["label"], s["dtype"], s["head_dim"]) for s in default_stats}
    assert len(labels) == 2 * 2 * 6  # dtypes x head dims x (forward, dq, dkdv) x (prefill, decode)
    spilling = [s for s in default_stats if s["spill_bytes"] > MAX_SPILL]
    assert not spilling, "\n".join(f"{s['label']} {s['dtype']} D={s['head_dim']} m{s['block_m']} n{s['block_n']} "
                                   f"w{s['num_warps']}: {s['spill_bytes']} B spilled" for s in spilling)
    assert all(s["shared_bytes"] <= 227 * 1024 for s in default_stats)  # an H100's shared memory per block


def test_refuses_to_compile_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "TRITON_INTERPRET" in run.stderr


def test_tensor_descriptor_loads_compile_for_hopper():
    """The forward's opt-in TMA loads (``LaunchConfig.tma``) compile for sm_90 to bulk tensor copies, spill-free."""
    if not PTXAS.is_file():
        pytest.skip(f"no ptxas in the Triton wheel ({PTXAS})")
    code = ("import dataclasses, json; from triton_kernels.ptxas_report import compile_stats; print(json.dumps("
            "dataclasses.asdict(compile_stats('fwd', 'bf16', 128, block_m=64, block_n=64, num_warps=4, "
            "num_stages=3, tma=True))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.splitlines()[-1])
    assert stats["tma"] and stats["spill_bytes"] <= MAX_SPILL, stats
