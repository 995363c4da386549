"""What an interrupted or damaged run leaves behind is found and redone, or named: an adapter whose training was cut
off is trained again (not played as if trained), a torn training-traces file is run again, a log or data file that
is not UTF-8 or lacks a field is an error naming its file and line, JSON files never hold NaN, and the leakage
suite's environment variables are read as meant or refused. No model: fakes and temporary folders."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from choreo.results import JsonlLog, read_jsonl, resumable, write_json
from choreo.trace import TraceEvent
from choreo.workflows.prisoners import STRATEGIES
from suites.applications.math import test_math as math_suite
from suites.leakage import conftest as leakage

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ leakage: the fine-tuned arm's adapters
@pytest.fixture
def fake_training(monkeypatch):
    """train_adapter, use_adapter and run_games replaced: training writes best/ then history.json (as the real one
    does, history last); games record which adapter folder was on the model. Returns the calls made."""
    import choreo.finetune
    import choreo.workflows.prisoners

    calls = {"trained": [], "played": []}

    def train_adapter(model, *, strategy, out_dir, **kwargs):
        out_dir = Path(out_dir)
        assert not (out_dir / "stale.bin").exists(), "an interrupted run's files were left in place"
        calls["trained"].append(strategy)
        (out_dir / "best").mkdir(parents=True)
        (out_dir / "fluency.json").write_text(json.dumps({"games": []}))
        (out_dir / "history.json").write_text(json.dumps({"best_step": 1}))

    @contextlib.contextmanager
    def use_adapter(model, folder):
        calls["adapter"] = Path(folder)
        yield

    def run_games(model, *, strategies, seeds, **kwargs):
        calls["played"].append((strategies[0], calls["adapter"]))
        return {(s, seed): {"seed": seed} for s in strategies for seed in seeds}

    monkeypatch.setattr(choreo.workflows.prisoners, "train_adapter", train_adapter)
    monkeypatch.setattr(choreo.finetune, "use_adapter", use_adapter)
    monkeypatch.setattr(leakage, "run_games", run_games)
    return calls


def _arm(folder: Path) -> dict:
    records = {}
    leakage.finetuned_arm(object(), leakage.FINETUNE_REDUCED, records, seeds=[0, 1], log=None, config=None,
                          plans={}, folder=folder)
    return records


def test_an_adapter_whose_training_was_cut_off_is_trained_again(tmp_path, fake_training):
    """``train`` writes best/ at step 0 and history.json last: best/ without history.json is an interrupted run,
    whose untrained adapter must not play the fine-tuned games."""
    variant = tmp_path / leakage.plan_variant(leakage.FINETUNE_REDUCED)
    cut, done = STRATEGIES[0], STRATEGIES[1:]
    (variant / cut / "best").mkdir(parents=True)
    (variant / cut / "stale.bin").write_text("step 0")
    for s in done:  # finished earlier: reused as they are
        (variant / s / "best").mkdir(parents=True)
        (variant / s / "history.json").write_text("{}")
    with pytest.warns(UserWarning, match="did not finish there"):
        records = _arm(tmp_path)
    assert fake_training["trained"] == [cut]
    assert [s for s, _ in fake_training["played"]] == list(STRATEGIES)
    assert all(adapter == variant / s / "best" for s, adapter in fake_training["played"])
    assert (variant / cut / "history.json").exists() and not (variant / cut / "stale.bin").exists()
    assert sorted(records["finetuned"]) == sorted(STRATEGIES)


def test_finished_adapters_are_not_trained_again(tmp_path, fake_training):
    _arm(tmp_path)
    assert fake_training["trained"] == list(STRATEGIES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _arm(tmp_path)
    assert fake_training["trained"] == list(STRATEGIES)  # no more training


def test_the_note_reads_a_history_whose_losses_were_not_numbers():
    """``write_json`` writes NaN as null: the note says "n/a" rather than failing on None."""
    chosen = {s: {"kept_train": 1, "kept_dev": 1, "best_step": 2, "last_step": 3, "dev_metric": "kl",
                  "dev_loss_start": None, "best_dev_loss": math.nan} for s in STRATEGIES}
    note = leakage.finetune_note(leakage.FINETUNE_REDUCED, chosen, {s: 0 for s in STRATEGIES}, n=2)
    assert "kl n/a -> n/a" in note


# ------------------------------------------------------------------------------------- leakage: environment variables
@pytest.mark.parametrize("value", ["true", "yes", "TRUE", " 1", "2"])
def test_a_finetune_flag_other_than_0_or_1_is_refused(monkeypatch, value):
    """"true" used to run nothing while the provenance recorded it as if it had taken effect."""
    monkeypatch.setenv("CHOREO_LEAKAGE_FINETUNE", value)
    with pytest.raises(ValueError, match=rf"CHOREO_LEAKAGE_FINETUNE must be 1 \(on\) or 0 \(off\), got '{value}'"):
        leakage.finetune_plan("small")


def test_a_finetune_flag_of_0_is_off(monkeypatch):
    monkeypatch.setenv("CHOREO_LEAKAGE_FINETUNE", "0")
    assert leakage.finetune_plan("small") is None and leakage.finetune_plan("paper")["preset"] == "paper"


@pytest.mark.parametrize("var", ["CHOREO_LEAKAGE_GAMES", "CHOREO_LEAKAGE_CANARY"])
@pytest.mark.parametrize("value", ["abc", "\u00b2", "\u0663", "1", "-3", "1e3", "8 "],
                         ids=["letters", "superscript-2", "arabic-3", "one", "negative", "exponent", "space"])
def test_a_game_count_that_is_not_ascii_digits_of_at_least_2_is_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=rf"\${var} must be an integer >= 2 \(ASCII digits\), got {value!r}"):
        leakage.sizes("small")


def test_game_counts_override_the_profile(monkeypatch):
    monkeypatch.setenv("CHOREO_LEAKAGE_GAMES", "8")
    monkeypatch.delenv("CHOREO_LEAKAGE_CANARY", raising=False)
    out = leakage.sizes("small")
    assert out["games"] == 8 and out["reduced_from"] == {"games": 32} and out["canary"] == 64


def test_the_leakage_variables_are_the_ones_repro_checks():
    from choreo.repro import ENV_COUNTS, ENV_FLAGS

    assert set(leakage.ENV_VARS) <= set(ENV_FLAGS) | set(ENV_COUNTS)


def test_pytest_on_the_leakage_suite_refuses_a_bad_variable_before_any_test(tmp_path):
    import os

    env = {**os.environ, "CHOREO_LEAKAGE_FINETUNE": "true"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "suites/leakage"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "$CHOREO_LEAKAGE_FINETUNE must be 1 (on) or 0 (off), got 'true'" in out.stderr


# ------------------------------------------------------------------------------------------- MATH: training traces
def _fake_workflow(monkeypatch, n_calls: list):
    def run_workflow(model, texts, **kwargs):
        n_calls.append(len(texts))
        events = [TraceEvent(kind="prefill", group=0, role="user", parents=(), text=t) for t in texts]
        return [{"final": f"answer {t}"} for t in texts], [[e] for e in events]

    monkeypatch.setattr(math_suite, "run_workflow", run_workflow)


def _train(tmp_path):
    problems = [SimpleNamespace(id=f"p{j}", problem=f"problem {j}") for j in range(3)]
    out = math_suite._train_runs(None, "ToT", train_problems=problems, configs=None, key="k", folder=tmp_path,
                                 progress=False)
    return out, math_suite._train_path("ToT", train_problems=problems, key="k", folder=tmp_path)


def test_a_torn_training_traces_file_is_run_again(tmp_path, monkeypatch):
    """A write cut off in a line used to fail every later run (``load_traces`` refuses a torn line)."""
    ran = []
    _fake_workflow(monkeypatch, ran)
    (records, traces), path = _train(tmp_path)
    whole = path.read_text()
    path.write_text(whole[: whole.index("\n") + 40])  # one whole line, then a torn one
    with pytest.warns(UserWarning, match=f"{path.name}:2: malformed JSON line"):
        again, _ = _train(tmp_path)
    assert ran == [3, 3] and again == (records, traces) and path.read_text().count("\n") == 3
    assert [r["index"] for _, r in read_jsonl(path)] == [0, 1, 2] and all("written" in r for _, r in read_jsonl(path))
    assert _train(tmp_path)[0] == (records, traces) and ran == [3, 3]  # the whole file is read back


def test_a_training_traces_file_with_too_few_traces_is_run_again(tmp_path, monkeypatch):
    ran = []
    _fake_workflow(monkeypatch, ran)
    _, path = _train(tmp_path)
    path.write_text(path.read_text().split("\n", 1)[0] + "\n")
    with pytest.warns(UserWarning, match="1 training traces where 3 are expected"):
        _train(tmp_path)
    assert ran == [3, 3] and path.read_text().count("\n") == 3


def test_training_traces_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import choreo.results

    _fake_workflow(monkeypatch, [])

    def cut(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(choreo.results.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path)
    assert not list(tmp_path.iterdir())  # neither part of the file nor a temporary one


# ------------------------------------------------------------------------------- JSON-lines readers name file:line
def test_read_jsonl_names_the_line_of_a_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"q": "' + b"x" * 20000 + b'\xff"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: not UTF-8 \(byte 0xff at byte 20008 of the line"):
        list(read_jsonl(path))


def test_a_log_line_that_is_not_utf8_is_named_unless_it_is_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1, "t": "\xff"}\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not UTF-8"):
        list(JsonlLog(path, key="index").records())
    path.write_bytes('{"index": 0}\n{"index": 1, "t": "é'.encode()[:-1])  # cut inside a two-byte character
    assert [r["index"] for r in JsonlLog(path, key="index").records()] == [0]


@pytest.mark.parametrize("line, message", [
    ('{"index": 1}', r"log.jsonl:2: the record of index 1 has no 'result'"),
    ('{"index": "0", "result": 1}', r"log.jsonl:2: index '0' is not an integer >= 0"),
    ('{"index": null, "result": 1}', r"log.jsonl:2: index None is not an integer >= 0"),
    ('{"index": true, "result": 1}', r"log.jsonl:2: index True is not an integer >= 0"),
    ('{"index": -1, "result": 1}', r"log.jsonl:2: index -1 is not an integer >= 0"),
    ('["index"]', r"log.jsonl:2: record without the key field 'index'"),
], ids=["no-result", "index-text", "index-null", "index-bool", "index-negative", "not-an-object"])
def test_a_run_log_record_without_result_or_integer_index_is_named(tmp_path, line, message):
    from choreo.results import logged_results

    path = tmp_path / "log.jsonl"
    path.write_text('{"index": 0, "result": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        resumable(path, [0, 1], lambda todo, on_result: None)
    with pytest.raises(ValueError, match=message):
        logged_results(path)


def test_logged_results_keeps_the_last_record_of_an_index(tmp_path):
    from choreo.results import logged_results

    path = tmp_path / "log.jsonl"
    assert logged_results(path) == {}
    path.write_text('{"index": 0, "result": "a"}\n{"index": 0, "result": "b"}\n{"index": 3, "result": null}\n')
    assert logged_results(path) == {0: "b", 3: None}


def test_jsonl_log_write_replaces_the_log_with_stamped_records(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"index": 9}\n')
    JsonlLog(path, key="index").write([{"index": 0, "x": 1}, {"index": 1, "x": 2}])
    records = list(JsonlLog(path, key="index").records())
    assert [r["index"] for r in records] == [0, 1] and all(set(r["written"]) == {"git_commit", "date"}
                                                           for r in records)
    with pytest.raises(ValueError, match="record lacks the key field 'index'"):
        JsonlLog(path, key="index").write([{"x": 1}])
    assert [r["index"] for r in JsonlLog(path, key="index").records()] == [0, 1]  # left as it was


# --------------------------------------------------------------------------------------- write_json: no NaN in JSON
def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_nan_and_infinities_as_null(tmp_path):
    from choreo.finetune import TrainResult

    result = TrainResult(best_adapter=tmp_path, best_step=0, best_dev_loss=math.inf, history=[{"dev_loss": math.nan}],
                         steps=0, seconds_per_step=float("nan"), peak_rss_mb=1.0)
    path = write_json(tmp_path / "s.json", {"summary": result.summary(), "pair": (1.5, -math.inf), "n": 3})
    data = _strict(path.read_text())
    assert data["summary"]["seconds_per_step"] is None and data["summary"]["best_dev_loss"] is None
    assert data["summary"]["history"] == [{"dev_loss": None}] and data["pair"] == [1.5, None] and data["n"] == 3


def test_the_math_note_reads_a_summary_whose_losses_were_not_numbers():
    summary = {"config": {"lora_rank": 8, "loss": "kl", "lr": 1e-3}, "history": [{"step": 0, "dev_loss": None},
                                                                                {"step": 2, "dev_loss": 0.5}],
               "train_problems": 4, "empty_outputs": 0, "outputs": 8, "train_traces": 3, "dev_traces": 1,
               "steps": 2, "best_step": 2, "seconds": 1.0}
    assert "n/a (step 0), 0.500 (step 2)" in math_suite.finetune_note("ToT After", summary)


@pytest.mark.parametrize("name", ["ToT", "MAD", "MADpar"])
def test_math_render_only_reads_the_files_a_run_writes(monkeypatch, name):
    """Rendering only must name every log and training file as running does: it once read the MAD rows' files of
    an earlier stopping rule and re-rendered the table from debates a rerun had replaced."""
    problems = [SimpleNamespace(id=f"p{j}") for j in range(3)]
    plan = math_suite.FINETUNE["small"]
    names = {}
    for render_only in (False, True):
        monkeypatch.setattr(math_suite, "RENDER_ONLY", render_only)
        ft = math_suite._ft_config(plan, name)
        names[render_only] = (
            math_suite._train_path(name, train_problems=problems, key="k", folder=Path("runs")),
            math_suite._stem("x", plan=plan, key="k", train_problems=problems, ft_config=ft, name=name))
    assert names[True] == names[False]


def test_numpy_and_torch_numbers_are_written_as_numbers_and_nan_as_null(tmp_path):
    import numpy as np
    import torch

    values = {"f32": np.float32(0.25), "i64": np.int64(3), "yes": np.bool_(True), "t": torch.tensor(1.5),
              "nan32": np.float32("nan"), "array": np.arange(3), "nested": [{"x": float("inf")}], "path": tmp_path}
    expected = {"f32": 0.25, "i64": 3, "yes": True, "t": 1.5, "nan32": None, "array": [0, 1, 2],
                "nested": [{"x": None}], "path": str(tmp_path)}
    assert json.loads(write_json(tmp_path / "a.json", values).read_text()) == expected
    log = JsonlLog(tmp_path / "log.jsonl", key="k")
    log.append({"k": 1, **values})
    log.write([{"k": 2, **values}])  # the same rule for a log written whole
    log.append({"k": 3, **values})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    for line in lines:  # strict JSON: no NaN / Infinity tokens, which other readers refuse
        record = json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in {line}"))
        assert {k: record[k] for k in expected} == expected


def test_a_resumed_result_equals_the_fresh_one(tmp_path):
    """Records hold Python numbers, so a table built from resumed records reads what a fresh run returned."""
    import numpy as np

    def run(todo, on_result):
        for j, i in enumerate(todo):
            on_result(j, {"n": np.int64(i), "acc": np.float32(0.5)})

    fresh = resumable(tmp_path / "runs.jsonl", [0, 1], run)
    resumed = resumable(tmp_path / "runs.jsonl", [0, 1], lambda todo, on_result: pytest.fail("recomputed"))
    assert resumed == [{"n": 0, "acc": 0.5}, {"n": 1, "acc": 0.5}] == fresh
    assert all(type(r["n"]) is int and type(r["acc"]) is float for r in resumed)
