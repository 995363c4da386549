"""The performance suite's helpers (suites/performance): rounds under a disabled benchmark, the device in
machine_info, the model the memory subprocesses load, what the decode-throughput benchmark times, when its
tables are written (and under which names), and how ``choreo bench --memory-only`` reads a stored table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from choreo import perf
from suites.performance import conftest as performance
from suites.performance import test_engine_bench as engine_bench
from suites.performance import test_performance as performance_table


class FakeBenchmark:
    """What ``timed_rounds`` uses of pytest-benchmark's fixture."""

    def __init__(self, disabled: bool):
        self.disabled, self.pedantic_calls = disabled, []

    def pedantic(self, target, *, setup, rounds, warmup_rounds, iterations):
        """Enabled: every round (untimed here); disabled: one setup and target, as pytest-benchmark does."""
        self.pedantic_calls.append((rounds, warmup_rounds, iterations))
        out = None
        for _ in range(1 if self.disabled else warmup_rounds + rounds):
            setup()
            out = target()
        return out


@pytest.mark.parametrize("disabled", [False, True], ids=["enabled", "disabled"])
def test_timed_rounds_runs_every_round_when_the_benchmark_is_disabled(disabled):
    """--benchmark-disable and xdist make pedantic run once, cold: the side-by-side ratios need all rounds."""
    calls = []
    bench = FakeBenchmark(disabled)
    out = performance.timed_rounds(bench, lambda: calls.append("target") or len(calls),
                                   setup=lambda: calls.append("setup"), rounds=3, warmup=1)
    assert calls == ["setup", "target"] * 4 and out == 8
    assert bench.pedantic_calls == [(3, 1, 1)]  # the fixture is used either way (no "not used" warning)


def test_machine_info_names_the_models_device_not_a_present_gpu(monkeypatch):
    """The suite's model runs on the CPU: a visible GPU must not be named as the device."""
    from choreo.provenance import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = types.SimpleNamespace(stash=pytest.Stash())
    config.stash[performance.MODEL_DEVICES] = {"cpu"}
    info = {}
    performance.pytest_benchmark_update_machine_info(config, info)
    assert info["choreo"]["device"] == device_name("cpu") and info["choreo"]["model_devices"] == ["cpu"]
    empty = {}
    performance.pytest_benchmark_update_machine_info(types.SimpleNamespace(stash=pytest.Stash()), empty)
    assert empty["choreo"]["device"] == "no model loaded"


def test_suite_memory_loads_the_suites_model(monkeypatch):
    """Peak RSS is measured on --model's checkpoint, not on the embedded model."""
    seen = []
    monkeypatch.setattr(perf, "measure_memory", lambda shape, arm, lengths, *, model_path=None:
                        seen.append((arm, model_path)) or {})
    cfg = perf.BenchConfig(lengths=perf.Lengths(), memory_arms=("choreographed", "baseline"))
    out = performance_table.peak_memory(perf.make_shape("multiqa", k=2), cfg, torch.device("cpu"), "/ckpt")
    assert set(out) == {"choreographed[torch]", "baseline"}
    assert seen == [("choreographed[torch]", "/ckpt"), ("baseline", "/ckpt")]


def test_decode_throughput_times_no_prefill(tiny_gqa):
    """The prompt is encoded before the timed run: the Runner's run processes the calls' own tokens only."""
    ex = perf.StepwiseChoreographer(tiny_gqa)
    prompt = ex.prefill("Tell me something.", role="user")
    teacher = perf.Synth(tiny_gqa.tokenizer, perf.Lengths(content_tokens=4)).tokens("decode")
    alone = ex.decode(parents=[prompt], teacher_tokens=teacher)  # header + teacher + footer
    ex.free(alone)
    rate, stats = engine_bench.decode_rate(ex, prompt, teacher, 3)
    assert rate > 0 and stats.tokens_processed == 3 * alone.length
    assert stats.forward_passes == len(teacher) + 1  # header pass, len - 1 steps, closing pass: all 3 batched
    assert ex.memory()["tokens_used"] == prompt.length  # the calls' messages are freed; the prompt stays


@pytest.mark.parametrize("ratio, goal, expected", [
    (19.26, 20.0, "not met (-3.7%, within run-to-run spread)"), (21.0, 20.0, "met (+5.0%, within run-to-run spread)"),
    (22.0, 20.0, "met (+10.0%, within run-to-run spread)"), (22.1, 20.0, "met"), (17.9, 20.0, "not met"),
    (10.8, 5.0, "met"), (4.4, 5.0, "not met")])
def test_a_ratio_below_its_goal_reads_not_met_even_within_the_run_to_run_spread(ratio, goal, expected):
    """The run's own ratio decides; the spread between runs of the same code is an explanation beside it."""
    assert engine_bench.verdict(ratio, goal) == expected
    assert engine_bench.measured(21.014, [20.68, 21.014, 21.22], 2) == "21.01x (rounds 20.68-21.22x)"


def test_engine_table_rerenders_its_verdicts_from_the_stored_rounds(tmp_path):
    """engine.md's 'met' column is recomputed from the rounds engine.json keeps; nothing is measured."""
    from choreo.perf.report import rerender_engine

    stored = json.loads((ROOT / "results" / "performance" / "engine.json").read_text())
    (tmp_path / "engine.json").write_text(json.dumps(stored))
    text = rerender_engine(tmp_path).read_text()
    assert "not met (-3.7%, within run-to-run spread)" in text and "at the goal" not in text
    again = json.loads((tmp_path / "engine.json").read_text())
    assert again["provenance"] == stored["provenance"] and again["data"]["raw"] == stored["data"]["raw"]


@pytest.mark.parametrize("prov, machine", [
    ({"load_average": [1.5], "cpu_count": 16, "threads": 8, "device": "Some CPU (8 threads)"},
     "Some CPU (8 threads), 16 cores, 8 torch threads: 1-min load average 1.5 at the end"),
    ({"load_average": [0.7]}, "Cores and torch threads not recorded: 1-min load average 0.7 at the end"),
], ids=["recorded", "written-before-they-were"])
def test_engine_notes_name_the_machine_the_provenance_records(prov, machine):
    from choreo.perf.report import engine_notes

    assert engine_notes(prov)[0].startswith(machine)


@pytest.mark.parametrize("now, low", [
    ({"unfused": {"ttft": 3.0, "e2e": 0.9}, "fused": {"ttft": 1.0, "e2e": 1.0}}, []),
    ({"unfused": {"ttft": 3.0, "e2e": 0.9}, "fused": {"ttft": 0.4, "e2e": 1.0}}, ["fused ttft"]),
    ({"unfused": {"ttft": 1.0, "e2e": 0.9}, "fused": {"ttft": 1.0, "e2e": 1.0}}, ["unfused ttft"]),
    ({"unfused": {"ttft": 3.0, "e2e": 0.9}}, ["fused ttft", "fused e2e"]),
], ids=["within", "fused-ttft-low", "unfused-ttft-low", "fused-not-measured"])
def test_the_regression_gate_checks_the_fused_ratios_too(now, low):
    stored = {"unfused": {"ttft": 3.1, "e2e": 0.67}, "fused": {"ttft": 0.95, "e2e": 0.9}}
    assert list(performance_table.gate_failures(now, stored)) == low


def test_the_stored_ratios_gate_both_arms_of_every_smoke_shape():
    stored = json.loads(performance.BASELINE_RATIOS.read_text())
    for label in SMOKE_SHAPES:
        assert set(stored["smoke"][label]) == {"unfused", "fused"}, label
        assert all(set(r) == {"ttft", "e2e"} for r in stored["smoke"][label].values()), label


def test_memory_subprocesses_run_with_the_timing_process_threads(monkeypatch):
    """The memory runs use this process's torch thread count (not OMP_NUM_THREADS=1), and record their own."""
    from choreo.perf import memory

    seen = {}

    def fake_run(argv, *, env, **kwargs):
        seen.update(env=env, spec=json.loads(argv[-1]))
        return types.SimpleNamespace(returncode=0, stdout=json.dumps({"threads": int(env["OMP_NUM_THREADS"])}))

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    out = memory.measure_memory(perf.make_shape("multiqa", k=2), "baseline", perf.Lengths())
    assert seen["env"]["OMP_NUM_THREADS"] == str(torch.get_num_threads()) == str(seen["spec"]["threads"])
    assert out["threads"] == torch.get_num_threads()


# ------------------------------------------------------------------- the suite's tables: when, and under which name
ROOT = Path(__file__).resolve().parents[1]
SMOKE_SHAPES = [s.label for s in perf.BENCH_PROFILES["smoke"].shapes]


def _request(*, shouldstop=False, shouldfail=False, exitstatus=pytest.ExitCode.OK):
    """What a module fixture's teardown reads of ``request``: the session's state when pytest tears it down."""
    return types.SimpleNamespace(session=types.SimpleNamespace(shouldstop=shouldstop, shouldfail=shouldfail,
                                                               exitstatus=exitstatus))


# How a run ends, and the rows it measured by then: Ctrl-C (pytest sets exitstatus INTERRUPTED before it tears the
# session's fixtures down), -x after a failure (fixtures torn down with shouldfail set), a -k subset.
ENDINGS = {
    "ctrl-c after one row": (dict(exitstatus=pytest.ExitCode.INTERRUPTED), 1),
    "ctrl-c after every row": (dict(exitstatus=pytest.ExitCode.INTERRUPTED), None),
    "-x after a failure": (dict(shouldfail="stopping after 1 failures"), 1),
    "-k subset": ({}, 1),
}


def _finish_suite_table(request, rows: list[str], results_dir, *, model="model", profile="smoke", figure=None):
    """Run the ``collected`` fixture as pytest would: the benchmarks fill in ``rows``, then its teardown runs."""
    fixture = performance_table.collected.__wrapped__(request, model, profile, results_dir, None)
    box = next(fixture)
    for label in rows:
        box["figures"][label] = figure(label) if figure else {}
    assert next(fixture, "done") == "done"


def _finish_engine_table(request, rows, results_dir):
    """Run the ``engine_rows`` fixture as pytest would: the benchmarks fill in ``rows``, then its teardown runs."""
    fixture = engine_bench.engine_rows.__wrapped__(request, "model", "smoke", results_dir, {})
    table = next(fixture)
    for key in rows:
        table[key] = [key, "1x", "goal", "met", ""]
    assert next(fixture, "done") == "done"


SESSION = """
import pytest
from pathlib import Path
from choreo import perf
from suites.performance.test_performance import collected  # noqa: F401  (the suite's fixture, under test)

# Each write of the table appends its file stem to this file.
perf.write_results = lambda out, *, name="speedups", **kwargs: Path("written").open("a").write(name + "\\n")


@pytest.fixture(scope="module")
def profile():
    return "smoke"


@pytest.fixture(scope="module")
def model(): ...


@pytest.fixture(scope="module")
def results_dir():
    return Path("results")


@pytest.fixture(scope="module")
def cost(): ...


@pytest.mark.parametrize("label", [s.label for s in perf.BENCH_PROFILES["smoke"].shapes])
def test_shape(collected, label, request):
    if label == request.config.getoption("--stop-at", None):
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a benchmark
    collected["figures"][label] = {}
"""


@pytest.mark.parametrize("args, code, written", [
    ([], 0, "speedups_suite\n"),
    (["-k", "test_shape and multiqa"], 0, None),
    (["-p", "stop_at", "--stop-at", SMOKE_SHAPES[1]], 2, None),
], ids=["whole run", "-k subset", "ctrl-c after one row"])
def test_a_real_session_writes_the_table_only_when_whole(tmp_path, args, code, written):
    """A pytest session with the suite's ``collected`` fixture (the model and the benchmarks faked) that runs every
    shape, a -k subset, or raises KeyboardInterrupt in the second shape's test, as Ctrl-C does: pytest then still
    tears the module's fixtures down, and the old teardown wrote a one-row table over the stored one."""
    (tmp_path / "test_session.py").write_text(SESSION)
    (tmp_path / "stop_at.py").write_text("def pytest_addoption(parser):\n    parser.addoption('--stop-at')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_session.py", *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == code, run.stdout + run.stderr
    mark = tmp_path / "written"
    assert (mark.read_text() if mark.exists() else None) == written, run.stdout


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_an_interrupted_or_partial_run_keeps_the_speedups_table(monkeypatch, tmp_path, ending):
    """Ctrl-C after the first shape replaced the full table with a one-row one: pytest tears module fixtures down
    on KeyboardInterrupt too. Only a run that measured every shape of its profile, to its end, writes."""
    state, measured = ENDINGS[ending]
    written = []
    monkeypatch.setattr(perf, "write_results", lambda out, **kwargs: written.append(kwargs))
    with pytest.warns(performance.TableKept, match="speedups_suite.md/.json not written"):
        _finish_suite_table(_request(**state), SMOKE_SHAPES[:measured], tmp_path)
    assert written == []


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_an_interrupted_or_partial_run_keeps_the_engine_table(monkeypatch, tmp_path, ending):
    """engine.md: the same rule as the speedups table, over its three benchmarks."""
    import choreo.provenance
    import choreo.report

    state, measured = ENDINGS[ending]
    written = []
    monkeypatch.setattr(choreo.provenance, "provenance", lambda *args, **kwargs: {})
    monkeypatch.setattr(choreo.report, "write_table", lambda folder, name, **kwargs: written.append(name))
    with pytest.warns(performance.TableKept, match="engine.md/.json not written"):
        _finish_engine_table(_request(**state), list(engine_bench.ROWS)[:measured], tmp_path)
    assert written == []
    _finish_engine_table(_request(), engine_bench.ROWS, tmp_path)  # a whole run still writes it
    assert written == ["engine"]


def test_a_run_that_measured_nothing_warns_of_nothing(monkeypatch, tmp_path, recwarn):
    monkeypatch.setattr(perf, "write_results", lambda out, **kwargs: pytest.fail("wrote a table of no rows"))
    _finish_suite_table(_request(exitstatus=pytest.ExitCode.INTERRUPTED), [], tmp_path)
    assert not [w for w in recwarn if issubclass(w.category, performance.TableKept)]


def test_the_suites_table_does_not_replace_choreo_benchs(tiny_gqa, monkeypatch, tmp_path):
    """``choreo bench`` writes speedups.md/.json (six shapes, scaling plots, memory; --memory-only re-measures it);
    the suite, which measures neither scaling nor, at smoke, memory, writes speedups_suite.md/.json beside it."""
    shape = perf.make_shape("multiqa", k=2)
    lengths = perf.Lengths(prompt_words=4, content_tokens=3)
    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", perf.BenchConfig(lengths=lengths, shapes=(shape,), rounds=1,
                                                                       warmup=0, memory_arms=(), pass_sizes=()))
    out = tmp_path / "performance"
    out.mkdir()
    bench_table = {name: out / name for name in ("speedups.md", "speedups.json", "scaling_B.png")}
    for path in bench_table.values():
        path.write_text(f"choreo bench's {path.name}")
    measure = lambda label: perf.measure_shape(tiny_gqa, shape, ["choreographed[torch]", "baseline"], lengths=lengths,
                                               rounds=1, warmup=0)
    _finish_suite_table(_request(), [shape.label], tmp_path, model=tiny_gqa, profile="tiny", figure=measure)
    assert {p.name: p.read_text() for p in bench_table.values()} == {p.name: f"choreo bench's {p.name}"
                                                                     for p in bench_table.values()}
    stored = json.loads((out / "speedups_suite.json").read_text())
    assert list(stored["data"]["figures"]) == [shape.label] and stored["data"]["scaling"] == {}
    assert stored["provenance"]["command"].startswith(("pytest", "python -m pytest"))  # the command as run
    assert shape.label in (out / "speedups_suite.md").read_text()


# ------------------------------------------------------------- choreo bench --memory-only: a malformed stored table
PROFILES = str(sorted(perf.BENCH_PROFILES))


@pytest.mark.parametrize("text, what", [
    ('{"data": {"profile": "sm', "is not JSON (Unterminated string"),
    (b"\xff\xfe{}", "is not JSON ("),
    ("[]", "holds a list; expected the object `choreo bench` writes"),
    ('{"rows": []}', "has nothing under \"data\" (keys ['rows'])"),
    ('{"data": [1]}', "has a list under \"data\""),
    ('{"data": {"profile": "huge"}}', "records profile 'huge', not one of"),
    ('{"data": {"profile": ["small"]}}', "records profile ['small'], not one of"),
], ids=["truncated", "not-utf8", "a-list", "no-data", "data-a-list", "unknown-profile", "profile-a-list"])
def test_memory_only_names_a_malformed_stored_table(no_model, capsys, tmp_path, text, what):
    """One line naming the file, what is wrong with it and the profiles allowed; not 'error: 'data'' (a KeyError's
    message) or a TypeError's traceback."""
    from choreo.cli import main

    path = tmp_path / "performance" / "speedups.json"
    path.parent.mkdir()
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    assert main(["bench", "--memory-only", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"choreo bench: error: --memory-only: {str(path)!r} ") and what in err and PROFILES in err


@pytest.mark.parametrize("data, provenance, what", [
    ({"profile": "small"}, {}, "has nothing as data.figures, not an object"),
    ({"profile": "small", "figures": [], "scaling": {}}, {}, "has a list as data.figures, not an object"),
    ({"profile": "small", "figures": {"tree_of_thoughts B=8 V=4": {}}}, {}, "has nothing as data.scaling"),
    ({"profile": "small", "figures": {"tree_of_thoughts B=8 V=4": {}}, "scaling": {}}, None,
     "has nothing as provenance"),
    ({"profile": "small", "figures": {"multiqa k=99": {}}, "scaling": {}}, {},
     "holds no shape of profile 'small' to re-measure (data.figures has ['multiqa k=99']"),
], ids=["no-figures", "figures-a-list", "no-scaling", "no-provenance", "no-shape-of-the-profile"])
def test_remeasure_memory_names_what_the_stored_table_lacks(monkeypatch, tmp_path, data, provenance, what):
    """What only remeasure_memory reads (after the model loads) is checked before any memory is measured."""
    from choreo.perf import cli

    assert "tree_of_thoughts B=8 V=4" in [s.label for s in perf.BENCH_PROFILES["small"].shapes]
    monkeypatch.setattr(cli, "measure_memory", lambda *args, **kwargs: pytest.fail("measured a malformed table"))
    path = tmp_path / "speedups.json"
    path.write_text(json.dumps({"data": data} | ({} if provenance is None else {"provenance": provenance})))
    with pytest.raises(ValueError) as error:
        cli.remeasure_memory(tmp_path, model=None)
    assert str(error.value).startswith(f"--memory-only: {str(path)!r} ") and what in str(error.value)


# ------------------------------------------------------ python -m choreo.perf render: a stored table it cannot render
def _committed_table(tmp_path, edit) -> Path:
    stored = json.loads((Path(__file__).resolve().parents[1] / "results" / "performance" / "speedups.json").read_text())
    edit(stored)
    (tmp_path / "speedups.json").write_text(json.dumps(stored))
    return tmp_path / "speedups.json"


def _drop_figure_key(key):
    def edit(stored):
        del next(iter(stored["data"]["figures"].values()))[key]
    return edit


@pytest.mark.parametrize("edit, what", [
    (_drop_figure_key("speedups"), 'lacks speedups["baseline"]'),
    (_drop_figure_key("runs"), "lacks runs of its fast arm and of baseline"),
    (_drop_figure_key("fast"), "lacks fast (the choreographed arm), runs of its fast arm and of baseline"),
], ids=["no-speedups", "no-runs", "no-fast"])
def test_render_names_the_figure_it_cannot_render(capsys, tmp_path, edit, what):
    """One line naming the file and the figure, exit 2; not a KeyError's traceback."""
    from choreo.perf.cli import main

    path = _committed_table(tmp_path, edit)
    assert main(["render", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m choreo.perf render: error: {str(path)!r}: data.figures['prisoners_dilemma ")
    assert what in err


def test_render_takes_a_table_without_memory_as_one_that_measured_none(capsys, tmp_path):
    from choreo.perf.cli import main

    _committed_table(tmp_path, lambda stored: stored["data"].pop("memory"))
    assert main(["render", str(tmp_path)]) == 0
    assert "Peak memory: not measured in this run." in (tmp_path / "speedups.md").read_text()
