"""Bad command-line values fail with one line naming the value, before any model loads; where output goes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from choreo.cli import main
from choreo.repro import RESULTS_DIR


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every check here must come first."""
    import choreo.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(choreo.model, "load_model", refuse)
    monkeypatch.setattr(choreo.model, "random_model", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("device", ["nonsense", "cuda:x", "meta"])
def test_bench_rejects_a_device_by_name(no_model, capsys, device):
    assert main(["bench", "--device", device]) == 2
    assert repr(device) in _error_line(capsys)


def test_bench_on_cuda_without_cuda_says_so(no_model, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    err = _error_line(capsys)
    assert "'cuda'" in err and ("without CUDA" in err or "no CUDA device" in err)


def test_bench_random_weights_cannot_remeasure_memory(no_model, capsys):
    assert main(["bench", "--random-weights", "--memory-only"]) == 2
    assert "--random-weights" in _error_line(capsys)


def test_bench_writes_to_the_checkouts_results_by_default(monkeypatch, tmp_path, capsys):
    """As ``choreo repro`` does, whatever the working directory."""
    import choreo.model
    import choreo.perf.cli as perf_cli

    written = {}

    def write_pass_costs(out, model, cost, *, command):
        written.update(out=out, command=command)
        (tmp_path / "pass_cost.md").write_text("table")
        return tmp_path / "pass_cost.md"

    monkeypatch.setattr(choreo.model, "load_model", lambda *args, **kwargs: "model")
    monkeypatch.setattr(perf_cli, "pass_costs", lambda model: {})
    monkeypatch.setattr(perf_cli, "write_pass_costs", write_pass_costs)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--passes-only"]) == 0
    assert written == {"out": RESULTS_DIR / "performance", "command": "choreo bench --profile small --passes-only"}
    assert str(RESULTS_DIR / "performance") in capsys.readouterr().err
    assert main(["bench", "--passes-only", "--results-dir", "elsewhere"]) == 0
    assert str(written["out"]) == "elsewhere/performance" and "--results-dir elsewhere" in written["command"]


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_bench_and_repro_default_to_the_same_results_folder(capsys):
    assert (RESULTS_DIR.parent / "pyproject.toml").is_file()  # the checkout's results/
    from choreo.cli import build_parser

    assert build_parser().parse_args(["repro"]).results_dir == str(RESULTS_DIR)
    assert str(RESULTS_DIR) in _help(capsys, "bench") and str(RESULTS_DIR) in _help(capsys, "repro")


@pytest.mark.parametrize("data_dir, message", [("no/such/folder", "is not a directory"),
                                               (".", "has no commongen_hard.jsonl or math_test.jsonl")],
                         ids=["missing", "no-file"])
def test_repro_rejects_a_data_dir_it_would_ignore(capsys, tmp_path, monkeypatch, data_dir, message):
    monkeypatch.chdir(tmp_path)
    assert main(["repro", "--data-dir", data_dir]) == 2
    err = _error_line(capsys)
    assert repr(data_dir) in err and message in err


def test_repro_data_dir_help_names_the_files_the_suites_read(capsys):
    from choreo.data.concepts import FILE_NAME as CONCEPTS
    from choreo.data.math import FILE_NAME as MATH

    text = _help(capsys, "repro")
    assert CONCEPTS in text and MATH in text


@pytest.mark.parametrize("name", ["commongen_hard.jsonl", "math_test.jsonl"])
def test_repro_accepts_a_data_dir_with_either_file(tmp_path, monkeypatch, name):
    import pytest as pytest_module

    seen = []
    monkeypatch.setattr(pytest_module, "main", lambda argv: seen.append(argv) or 0)
    (tmp_path / name).write_text("")
    assert main(["repro", "--profile", "smoke", "--data-dir", str(tmp_path), "--results-dir", str(tmp_path)]) == 0
    assert seen and seen[0][seen[0].index("--data-dir") + 1] == str(tmp_path)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--rounds", "-1"], ["--max-tokens", "0"], ["--rounds", "two"]],
                         ids=["rounds-0", "rounds-negative", "max-tokens-0", "rounds-text"])
def test_demo_rejects_non_positive_counts(no_model, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *argv])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {argv[0]}" in last and argv[1] in last


def test_python_dash_m_choreo_is_the_choreo_command():
    out = subprocess.run([sys.executable, "-m", "choreo", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("choreo ")
    out = subprocess.run([sys.executable, "-m", "choreo", "bench", "--device", "nonsense"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        "choreo bench: error: --device 'nonsense' is not a device name; use cpu, cuda or cuda:N")


def test_python_dash_m_choreo_perf_reports_errors_in_one_line():
    out = subprocess.run([sys.executable, "-m", "choreo.perf", "bench", "--device", "nonsense"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "'nonsense'" in out.stderr
