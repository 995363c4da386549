"""Bad command-line values fail with one line naming the value, before any model loads; where output goes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from choreo.cli import main
from choreo.repro import RESULTS_DIR


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
    monkeypatch.setattr(perf_cli, "pass_costs", lambda model, *, sizes: {})
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


def test_bench_and_repro_default_to_the_same_results_folder():
    """The checkout's results/, except at the smoke and paper profiles: no run may replace the committed tables
    (the small profile's)."""
    assert (RESULTS_DIR.parent / "pyproject.toml").is_file()  # the checkout's results/
    from choreo.repro import PAPER_RESULTS_DIR, SMOKE_RESULTS_DIR, default_results_dir

    assert default_results_dir("small") == default_results_dir(None) == RESULTS_DIR
    assert default_results_dir("smoke") == SMOKE_RESULTS_DIR != RESULTS_DIR
    assert default_results_dir("paper") == PAPER_RESULTS_DIR not in (RESULTS_DIR, SMOKE_RESULTS_DIR)
    from choreo.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.choices and "repro" in a.choices).choices
    for command in ("bench", "repro"):  # the help strings themselves (a formatted help may wrap a path at a hyphen)
        text = next(a.help for a in commands[command]._actions if "--results-dir" in a.option_strings)
        assert str(RESULTS_DIR) in text and f"smoke {SMOKE_RESULTS_DIR}" in text
        assert f"paper {PAPER_RESULTS_DIR}" in text
    for folder in (SMOKE_RESULTS_DIR, PAPER_RESULTS_DIR):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / "x.md")], cwd=RESULTS_DIR.parent)
        assert ignored.returncode == 0  # git-ignored


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


# ---------------------------------------------------------------------------------------- paths the system refuses
@pytest.mark.parametrize("error", [NotADirectoryError(20, "Not a directory", "/a/file/x"),
                                   IsADirectoryError(21, "Is a directory", "/a/folder"),
                                   FileExistsError(17, "File exists", "/a/file"),
                                   PermissionError(13, "Permission denied", "/root/x")],
                         ids=lambda e: type(e).__name__)
def test_an_os_error_is_one_line_naming_the_path_and_the_reason(capsys, error):
    import argparse

    from choreo.cli import run_command

    def fail(args):
        raise error

    assert run_command(argparse.Namespace(command="bench", func=fail)) == 2
    assert _error_line(capsys) == f"choreo bench: error: {error.filename!r}: {error.strerror}"


def _a_file(tmp_path, name="a_file"):
    path = tmp_path / name
    path.write_text("")
    return str(path)


@pytest.mark.parametrize("verb", ["bench", "bench-memory", "bench-passes", "repro"])
def test_a_results_dir_that_is_a_file_fails_before_any_work(no_model, capsys, tmp_path, monkeypatch, verb):
    import pytest as pytest_module

    monkeypatch.setattr(pytest_module, "main", lambda argv: pytest.fail("the suites ran"))
    command, *flags = verb.split("-")
    argv = [command, "--results-dir", _a_file(tmp_path)] + [f"--{flag}-only" for flag in flags]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert "--results-dir" in err and str(tmp_path / "a_file") in err


def test_a_results_dir_under_a_file_names_it_and_the_reason(no_model, capsys, tmp_path):
    below = tmp_path / "a_file" / "below"
    _a_file(tmp_path)
    assert main(["bench", "--results-dir", str(below)]) == 2
    assert f"--results-dir {str(below / 'performance')!r}: cannot write there (Not a directory)" in _error_line(capsys)


@pytest.mark.parametrize("argv, bad", [
    (["collect", "--n", "1", "--out", "{dir}"], "--out '{dir}' is a folder, not a file"),
    (["collect", "--n", "1", "--out", "{file}/traces.jsonl"], "--out '{file}/traces.jsonl': cannot write there"),
    (["train", "--traces", "{dir}", "--out", "run"], "--traces '{dir}' is a folder, not a file"),
    (["train", "--traces", "{file}", "--dev-traces", "{dir}", "--out", "run"], "--dev-traces '{dir}' is a folder"),
    (["train", "--traces", "{file}", "--out", "{file}"], "--out '{file}' is a file, not a folder"),
    (["recovery", "--out", "{file}"], "--out '{file}' is a file, not a folder"),
    (["recovery", "--out", "{dir}/ok", "--runs", "{file}"], "--runs '{file}' is a file, not a folder"),
], ids=["collect-out-folder", "collect-out-under-file", "train-traces-folder", "train-dev-traces-folder",
        "train-out-file", "recovery-out-file", "recovery-runs-file"])
def test_finetune_paths_are_checked_before_the_model_loads(no_model, capsys, tmp_path, argv, bad):
    paths = {"dir": str(tmp_path), "file": _a_file(tmp_path)}
    assert main(["finetune"] + [a.format(**paths) for a in argv]) == 2
    assert bad.format(**paths) in _error_line(capsys)


@pytest.mark.parametrize("argv", [["collect", "--n", "0"], ["recovery", "--n-train", "-1"],
                                  ["recovery", "--n-eval", "0"]])
def test_finetune_counts_must_be_positive(no_model, capsys, tmp_path, argv):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune"] + argv + ["--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and f"argument {argv[1]}: expected an integer >= 1" in capsys.readouterr().err


def test_finetune_collect_checks_the_pool_size_before_the_model_loads(no_model, capsys, tmp_path):
    assert main(["finetune", "collect", "--n", "100000", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "--n: n must be in 1..992 for the 'train' pool, got 100000" in _error_line(capsys)


def test_finetune_collect_names_a_negative_seed(no_model, capsys, tmp_path):
    """numpy refuses a negative seed; its error used to come out as one about --n."""
    assert main(["finetune", "collect", "--seed", "-1", "--n", "4", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "--seed must be an integer >= 0, got -1" in _error_line(capsys)


def test_finetune_recovery_needs_two_held_out_pairs_before_the_model_loads(no_model, capsys, tmp_path):
    """The before/after tests pair held-out pairs: one pair used to fail after the collection and training."""
    assert main(["finetune", "recovery", "--n-train", "4", "--n-eval", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--n-eval must be an integer >= 2 (the before/after tests pair held-out pairs), got 1" \
        in _error_line(capsys)


# ------------------------------------------------------------------------------ bench: every option takes effect
def test_bench_memory_only_and_passes_only_exclude_each_other(no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--memory-only", "--passes-only"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_bench_memory_only_refuses_a_profile_it_would_ignore(no_model, capsys):
    assert main(["bench", "--memory-only", "--profile", "paper"]) == 2
    assert "--profile 'paper' has no effect with --memory-only" in _error_line(capsys)


def test_bench_passes_only_refuses_a_profile_without_pass_sizes(no_model, capsys):
    assert main(["bench", "--passes-only", "--profile", "smoke"]) == 2
    assert "--profile 'smoke' measures no pass cost" in _error_line(capsys)


def test_bench_passes_only_measures_the_profiles_pass_sizes(monkeypatch, tmp_path):
    import choreo.model
    import choreo.perf.cli as perf_cli
    from choreo.perf.config import BENCH_PROFILES

    seen = {}
    monkeypatch.setattr(choreo.model, "load_model", lambda *args, **kwargs: "model")
    monkeypatch.setattr(perf_cli, "pass_costs", lambda model, *, sizes: seen.update(sizes=sizes) or {})
    monkeypatch.setattr(perf_cli, "write_pass_costs",
                        lambda out, model, cost, *, command: seen.update(command=command) or Path(_a_file(tmp_path)))
    assert main(["bench", "--passes-only", "--profile", "paper", "--results-dir", str(tmp_path)]) == 0
    assert seen["sizes"] == BENCH_PROFILES["paper"].pass_sizes
    assert seen["command"].startswith("choreo bench --profile paper ")


def _stored_bench(tmp_path, profile: str) -> Path:
    out = tmp_path / "performance"
    out.mkdir()
    (out / "speedups.json").write_text(json.dumps({"data": {"profile": profile}}))
    (out / "speedups.md").write_text("table")
    return out


def test_bench_memory_only_records_the_options_it_used(monkeypatch, tmp_path, capsys):
    import choreo.model
    import choreo.perf.cli as perf_cli

    seen = {}
    _stored_bench(tmp_path, "small")
    monkeypatch.setattr(choreo.model, "load_model", lambda *args, **kwargs: "model")
    monkeypatch.setattr(perf_cli, "remeasure_memory", lambda out, model, **kwargs: seen.update(kwargs))
    assert main(["bench", "--memory-only", "--results-dir", str(tmp_path)]) == 0
    assert seen["command"] == f"choreo bench --results-dir {tmp_path} --memory-only"  # no --profile: not used


@pytest.mark.parametrize("stored, message", [(None, "--results-dir {results!r} holds no performance/speedups.json"),
                                             ("smoke", "{table!r} holds profile 'smoke', which measures no memory")])
def test_bench_memory_only_needs_a_stored_table_that_measures_memory(no_model, capsys, tmp_path, stored, message):
    if stored:
        _stored_bench(tmp_path, stored)
    assert main(["bench", "--memory-only", "--results-dir", str(tmp_path)]) == 2
    table = str(tmp_path / "performance" / "speedups.json")
    assert message.format(results=str(tmp_path), table=table) in _error_line(capsys)


def test_bench_memory_only_refuses_a_cuda_device(no_model, capsys, monkeypatch):
    """Peak RSS is measured in CPU subprocesses: the CUDA arm (triton) would fail in them."""
    import torch

    import choreo.perf.cli as perf_cli

    monkeypatch.setattr(perf_cli, "check_device", lambda text: torch.device(text))
    assert main(["bench", "--memory-only", "--device", "cuda"]) == 2
    err = _error_line(capsys)
    assert "--device 'cuda'" in err and "CPU" in err


# ------------------------------------------------------------------------------------ repro: what it runs, prints
def _fake_pytest(monkeypatch, *, code: int, writes=()):
    """pytest.main replaced: records its argv, writes the given tables (under --results-dir), returns ``code``."""
    import pytest as pytest_module

    seen = []

    def fake_main(argv):
        seen.append(argv)
        results = Path(argv[argv.index("--results-dir") + 1])
        for name in writes:
            (results / name).parent.mkdir(parents=True, exist_ok=True)
            (results / name).write_text(f"fresh {name}")
        return code

    monkeypatch.setattr(pytest_module, "main", fake_main)
    return seen


def test_repro_prints_only_the_tables_this_run_wrote(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CHOREO_DATA", raising=False)
    (tmp_path / "performance").mkdir()
    (tmp_path / "performance" / "old.md").write_text("stale table")
    _fake_pytest(monkeypatch, code=0, writes=["performance/new.md"])
    assert main(["repro", "--profile", "smoke", "--only", "performance", "--results-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "fresh performance/new.md" in out and "stale table" not in out
    assert f"results written to {tmp_path}" in err


def test_repro_with_nothing_run_says_no_results_and_keeps_pytests_status(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CHOREO_DATA", raising=False)
    (tmp_path / "performance").mkdir()
    (tmp_path / "performance" / "old.md").write_text("stale table")
    seen = _fake_pytest(monkeypatch, code=5)  # pytest: no tests collected
    assert main(["repro", "--profile", "smoke", "--only", "performance", "--results-dir", str(tmp_path),
                 "--", "-k", "nosuch"]) == 5
    out, err = capsys.readouterr()
    assert "stale table" not in out and f"no results written to {tmp_path}" in err
    assert seen[0][-2:] == ["-k", "nosuch"]


def test_repro_shows_progress_live_and_reports_once(monkeypatch, tmp_path):
    monkeypatch.delenv("CHOREO_DATA", raising=False)
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--profile", "smoke", "--only", "performance", "--results-dir", str(tmp_path)]) == 0
    assert "--capture=tee-sys" in seen[0] and "-ra" in seen[0] and "-rA" not in seen[0]


# ------------------------------------------------------------------------------------------------- $CHOREO_DATA
@pytest.mark.parametrize("value, message", [("no/such/folder", "is not a directory"),
                                            (".", "has no commongen_hard.jsonl or math_test.jsonl")],
                         ids=["missing", "no-file"])
def test_repro_checks_choreo_data_as_it_checks_data_dir(capsys, tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHOREO_DATA", value)
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--profile", "smoke", "--results-dir", str(tmp_path)]) == 2
    err = _error_line(capsys)
    assert f"$CHOREO_DATA {value!r} {message}" in err and not seen


def test_repro_accepts_a_choreo_data_with_a_data_file(monkeypatch, tmp_path):
    (tmp_path / "math_test.jsonl").write_text("")
    monkeypatch.setenv("CHOREO_DATA", str(tmp_path))
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--profile", "smoke", "--only", "performance", "--results-dir", str(tmp_path)]) == 0
    assert seen


def test_pytest_refuses_a_mistyped_choreo_data(tmp_path):
    """The suites' own option default ($CHOREO_DATA) gets the same check, as a pytest usage error."""
    import os

    env = {**os.environ, "CHOREO_DATA": str(tmp_path / "typo")}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env, cwd=RESULTS_DIR.parent)
    assert out.returncode == 4 and f"$CHOREO_DATA {str(tmp_path / 'typo')!r} is not a directory" in out.stderr


# ------------------------------------------------------------------------------------------ --model: a checkpoint
def _checkpoint(folder: Path, *, config: bool = True, weights: str | None = "whole") -> Path:
    """A folder with config.json and/or model.safetensors (whole, or cut in half as an interrupted copy leaves it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights is not None:
        import torch
        from safetensors.torch import save_file

        file = folder / "model.safetensors"
        save_file({"w": torch.zeros(64, 64)}, str(file))
        if weights == "truncated":
            data = file.read_bytes()
            file.write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda f: _checkpoint(f, config=False, weights=None), "has no config.json"),
    (lambda f: _checkpoint(f, weights=None), "has no weight files (*.safetensors, *.bin)"),
    (lambda f: _checkpoint(f, weights="truncated"), "model.safetensors is not a readable safetensors file"),
], ids=["empty", "no-weights", "truncated"])
def test_repro_checks_the_model_folder_before_pytest_starts(no_model, capsys, tmp_path, monkeypatch, make, message):
    """An empty --model folder used to give an error in every test of the suite (1,329 lines)."""
    folder = make(tmp_path / "model")
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--only", "leakage", "--model", str(folder), "--results-dir", str(tmp_path / "r")]) == 2
    err = _error_line(capsys)
    assert f"--model {str(folder)!r}" in err and message in err and not seen


def test_demo_names_a_truncated_weights_file_in_one_line(capsys, tmp_path):
    folder = _checkpoint(tmp_path / "model", weights="truncated")
    assert main(["demo", "--model", str(folder)]) == 2
    err = _error_line(capsys)
    assert f"--model {str(folder)!r}" in err and "model.safetensors" in err


def test_load_model_names_the_folder_and_files_it_could_not_load(tmp_path, monkeypatch):
    from choreo.model import load_model

    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "cache"))
    folder = _checkpoint(tmp_path / "model")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model path '.*model': cannot load config.json and model.safetensors "
                                         r"\(OSError: .*\)$"):
        load_model(folder)


# ------------------------------------------------------------------------------- the leakage suite's variables
@pytest.mark.parametrize("var, value, message", [
    ("CHOREO_LEAKAGE_FINETUNE", "true", "$CHOREO_LEAKAGE_FINETUNE must be 1 (on) or 0 (off), got 'true'"),
    ("CHOREO_LEAKAGE_GAMES", "abc", "$CHOREO_LEAKAGE_GAMES must be an integer >= 2 (ASCII digits), got 'abc'"),
    ("CHOREO_LEAKAGE_CANARY", "\u00b2", "$CHOREO_LEAKAGE_CANARY must be an integer >= 2 (ASCII digits), got '\u00b2'"),
], ids=["finetune-true", "games-letters", "canary-superscript"])
def test_repro_checks_the_leakage_variables_before_pytest_starts(no_model, capsys, tmp_path, monkeypatch, var, value,
                                                                message):
    monkeypatch.setenv(var, value)
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--only", "leakage", "--results-dir", str(tmp_path)]) == 2
    assert message in _error_line(capsys) and not seen


def test_repro_accepts_the_leakage_variables_as_documented(tmp_path, monkeypatch):
    monkeypatch.delenv("CHOREO_DATA", raising=False)
    for var, value in (("CHOREO_LEAKAGE_FINETUNE", "0"), ("CHOREO_LEAKAGE_GAMES", "8"), ("CHOREO_LEAKAGE_CANARY", "")):
        monkeypatch.setenv(var, value)
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--only", "leakage", "--results-dir", str(tmp_path)]) == 0 and seen


@pytest.mark.parametrize("passed", [["--results-dir", "/x"], ["--profile=paper"], ["-k", "bsm", "--model", "/m"]])
def test_repro_refuses_its_own_options_after_the_double_dash(no_model, capsys, passed):
    """They would reach pytest unchecked, and repro would list the tables of another folder than pytest wrote."""
    assert main(["repro", "--only", "blockage", "--", *passed]) == 2
    option = next(a for a in passed if a.startswith("--")).split("=")[0]
    assert f"{option} is an option of choreo repro: give it before --" in _error_line(capsys)


def test_a_defect_keeps_its_traceback_and_choreo_debug_shows_a_bad_values(capsys, monkeypatch):
    """Only bad values and refused paths become one line: a KeyError from inside a run is a defect, and
    CHOREO_DEBUG=1 turns the one line back into the traceback."""
    import argparse

    from choreo.cli import run_command

    def missing(args):
        return {}["e2e"]

    def bad_value(args):
        raise ValueError("--rounds 3 is too many")

    with pytest.raises(KeyError):
        run_command(argparse.Namespace(command="demo", func=missing))
    assert run_command(argparse.Namespace(command="demo", func=bad_value)) == 2
    assert _error_line(capsys) == "choreo demo: error: --rounds 3 is too many"
    monkeypatch.setenv("CHOREO_DEBUG", "1")
    with pytest.raises(ValueError, match="too many"):
        run_command(argparse.Namespace(command="demo", func=bad_value))


def test_perf_render_refuses_a_folder_without_tables_in_one_line(tmp_path):
    def render(folder):
        out = subprocess.run([sys.executable, "-m", "choreo.perf", "render", str(folder)], capture_output=True,
                             text=True)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        return out.stderr

    assert "is not a folder" in render(tmp_path / "no_such")
    assert "holds none of speedups.json" in render(tmp_path)
    (tmp_path / "speedups.json").write_text('{"data": ')
    assert "speedups.json' is not JSON" in render(tmp_path)
    (tmp_path / "speedups.json").write_text('{"data": {}}')
    assert "lacks provenance" in render(tmp_path)
    assert (tmp_path / "speedups.json").read_text() == '{"data": {}}' and not (tmp_path / "speedups.md").exists()
    (tmp_path / "speedups.json").write_text('{"data": {"figures": {}}, "provenance": {}}')
    assert "lacks data.profile (one of the bench profiles)" in render(tmp_path)
    (tmp_path / "speedups.json").unlink()
    (tmp_path / "engine.json").write_text('{"data": {"rows": {}, "raw": {}}, "provenance": {}, "title": "t", '
                                          '"columns": ["benchmark"]}')
    assert "engine.json' lacks a 'met' column" in render(tmp_path)


@pytest.mark.parametrize("argv", [["repro", "suites/leakage"], ["repro", "--only", "leakage", "canary"]],
                         ids=["suite-path", "stray-word"])
def test_repro_refuses_pytest_arguments_typed_without_the_separator(no_model, capsys, monkeypatch, argv):
    import pytest as pytest_module

    monkeypatch.setattr(pytest_module, "main", lambda argv: pytest.fail("the suites ran"))
    assert main(argv) == 2
    err = _error_line(capsys)
    assert repr(argv[-1]) in err and "--only SUITE" in err and "after --" in err


def test_repro_passes_arguments_after_the_separator_to_pytest(no_model, monkeypatch, tmp_path):
    import pytest as pytest_module

    seen = []
    monkeypatch.setattr(pytest_module, "main", lambda argv: seen.append(argv) or 0)
    assert main(["repro", "--profile", "smoke", "--only", "leakage", "--results-dir", str(tmp_path), "--",
                 "-k", "canary"]) == 0
    assert seen[0][-2:] == ["-k", "canary"]


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_a_model_path_is_named_as_the_option_before_any_work(no_model, capsys, tmp_path, command):
    argv = [command, "--model", str(tmp_path / "no_such")]
    if command == "bench":
        argv += ["--results-dir", str(tmp_path / "res")]
    assert main(argv) == 2
    assert f"--model {str(tmp_path / 'no_such')!r} is not a directory" in _error_line(capsys)
    assert not (tmp_path / "res").exists()


def test_demo_with_triton_attention_without_cuda_fails_before_the_model_loads(no_model, capsys, monkeypatch):
    """Without CUDA the default device is the CPU, where the kernel runs only under the interpreter."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["demo", "--attention", "triton"]) == 2
    assert _error_line(capsys) == (
        "choreo demo: error: --attention 'triton' cannot run with --device 'cpu' (the default: this torch finds no "
        "CUDA device): the kernel needs --device cuda (or TRITON_INTERPRET=1 on the CPU, about 400x slower than torch)")


@pytest.mark.parametrize("command", [["demo"], ["finetune", "train", "--traces", "t.jsonl", "--out", "run"]],
                         ids=["demo", "finetune-train"])
def test_triton_attention_on_a_cpu_device_names_both_values_before_the_model_loads(no_model, capsys, monkeypatch,
                                                                                   tmp_path, command):
    """On a CUDA machine too: --device cpu with --attention triton is refused at once, not after the model loaded."""
    import torch

    monkeypatch.chdir(tmp_path)  # finetune train's --out 'run' is not created: the device is checked first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main([*command, "--attention", "triton", "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert "--attention 'triton' cannot run with --device 'cpu': the kernel needs --device cuda" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["demo"], ["finetune", "train", "--traces", "t.jsonl", "--out", "run"]],
                         ids=["demo", "finetune-train"])
@pytest.mark.parametrize("device, message", [
    ("nonsense", "--device 'nonsense' is not a device name; use cpu, cuda or cuda:N"),
    ("meta", "--device 'meta': choreo runs models on cpu or cuda only"),
    ("cuda", "--device 'cuda': this torch"),
], ids=["not-a-device", "meta", "cuda-without-cuda"])
def test_the_model_device_is_checked_before_the_model_loads(no_model, capsys, monkeypatch, tmp_path, command, device,
                                                            message):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", device]) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize("cuda, expected", [(False, "cpu"), (True, "cuda")], ids=["no-cuda", "cuda"])
def test_demo_loads_the_model_on_the_device_it_runs(monkeypatch, cuda, expected):
    """The default device is cuda where this torch finds one, else cpu; the model loads there (its dtype is
    load_model's default: fp32 on cpu, bf16 on cuda)."""
    import torch

    import choreo.demo
    import choreo.model

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(choreo.model, "load_model", lambda source, **kw: seen.update(kw, source=source) or "model")
    monkeypatch.setattr(choreo.demo, "run_demo", lambda model, **kw: seen.update(kw, model=model))
    assert main(["demo", "--rounds", "2"]) == 0
    assert seen == {"device": torch.device(expected), "source": None, "model": "model", "rounds": 2,
                    "max_tokens": 40, "attention": None}
    assert main(["demo", "--device", "cpu", "--attention", "reference"]) == 0
    assert seen["device"] == torch.device("cpu") and seen["attention"] == "reference"


def test_repro_refuses_to_replace_tables_of_another_profile(no_model, capsys, tmp_path, monkeypatch):
    """A smoke run with --results-dir results replaced the committed small tables (canary.json said "small")."""
    from choreo.report import write_table

    write_table(tmp_path / "leakage" / "canary", "canary", title="t", columns=["a"], rows=[[1]],
                data={"n": 1}, provenance={"profile": "small"})
    before = (tmp_path / "leakage" / "canary" / "canary.json").read_text()
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--profile", "smoke", "--only", "leakage", "--results-dir", str(tmp_path), "--",
                 "-k", "canary"]) == 2
    err = _error_line(capsys)
    assert repr(str(tmp_path / "leakage" / "canary")) in err and "'small'" in err and "--profile 'smoke'" in err
    assert not seen and (tmp_path / "leakage" / "canary" / "canary.json").read_text() == before
    # the same profile, or a suite whose folder holds no table of another profile, runs
    assert main(["repro", "--profile", "small", "--only", "leakage", "--results-dir", str(tmp_path)]) == 0
    assert main(["repro", "--profile", "smoke", "--only", "blockage", "--results-dir", str(tmp_path)]) == 0
    assert len(seen) == 2


def test_repro_at_the_paper_profile_writes_a_folder_of_its_own(no_model, capsys, monkeypatch, tmp_path):
    """The committed tables are the small profile's: a paper run goes to results-paper/ by default (it was refused
    over results/), and a default folder that would be replaced is named as the default."""
    import choreo.repro as repro

    assert repro.default_results_dir("paper") == repro.ROOT / "results-paper"
    monkeypatch.setattr(repro, "PAPER_RESULTS_DIR", tmp_path / "results-paper")  # not the checkout's, in a test
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--profile", "paper", "--only", "leakage"]) == 0
    assert seen and str(tmp_path / "results-paper") in seen[-1]
    with pytest.raises(ValueError, match=r"^the default results folder '.*results': .* holds a table of profile "
                                         r"'small' \(.*\), which --profile 'paper' would replace; choose another "
                                         r"--results-dir$"):
        repro.check_table_profiles(repro.RESULTS_DIR, ["leakage"], "paper", given=False)


def test_repro_render_only_needs_the_math_logs(no_model, capsys, tmp_path, monkeypatch):
    """CHOREO_MATH_RENDER_ONLY=1 on a folder without logs printed 644 lines of tracebacks (exit 1)."""
    monkeypatch.delenv("CHOREO_DATA", raising=False)
    monkeypatch.setenv("CHOREO_MATH_RENDER_ONLY", "1")
    seen = _fake_pytest(monkeypatch, code=0)
    assert main(["repro", "--only", "applications", "--profile", "smoke", "--results-dir", str(tmp_path)]) == 2
    err = _error_line(capsys)
    assert "CHOREO_MATH_RENDER_ONLY=1" in err and repr(str(tmp_path / "applications" / "math" / "runs")) in err
    assert not seen
    assert main(["repro", "--only", "leakage", "--profile", "smoke", "--results-dir", str(tmp_path)]) == 0 and seen


@pytest.mark.model
def test_math_render_only_stops_in_one_line_where_a_log_lacks_records(tmp_path):
    """A log the suite would have to extend stops the session with one line and exit status 2, not an error with
    its traceback in every test of the module."""
    import os

    runs = tmp_path / "applications" / "math" / "runs"
    runs.mkdir(parents=True)
    (runs / "other.jsonl").write_text("")
    env = {**os.environ, "CHOREO_MATH_RENDER_ONLY": "1"}
    env.pop("CHOREO_DATA", None)
    out = subprocess.run([sys.executable, "-m", "choreo.cli", "repro", "--only", "applications", "--profile", "smoke",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "CHOREO_MATH_RENDER_ONLY=1: math Direct would run 2 problems; the logs lack them" in text
    assert "Traceback" not in text and "RuntimeError" not in text and len(text.splitlines()) < 10, text


@pytest.mark.parametrize("make, message", [
    (lambda folder: None, "does not exist"),
    (lambda folder: folder.write_text("x"), "is not a directory"),
    (lambda folder: folder.mkdir(), "has no config.json (--random-weights reads the architecture there)"),
], ids=["missing", "file", "no-config"])
def test_bench_random_weights_names_the_model_option_before_any_folder(no_model, capsys, tmp_path, make, message):
    """With --random-weights, a missing --model read "model path '/no/such' has no config.json", after an empty
    performance folder was made."""
    folder = tmp_path / "model"
    make(folder)
    assert main(["bench", "--random-weights", "--model", str(folder), "--passes-only",
                 "--results-dir", str(tmp_path / "res")]) == 2
    assert f"--model {str(folder)!r} {message}" in _error_line(capsys)
    assert not (tmp_path / "res").exists()
