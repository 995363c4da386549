"""The commit recorded with every result says whether uncommitted code produced it, and which code computed the
logged records a table was rendered from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from choreo.provenance import git_commit, provenance
from choreo.report import provenance_line
from choreo.results import JsonlLog, logs_written

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_marks_uncommitted_code_but_not_results(tmp_path, monkeypatch):
    monkeypatch.delenv("CHOREO_GIT_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "table.md").write_text("| a |\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "results" / "table.md").write_text("| b |\n")  # a result being rewritten: still that commit's code
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    dirty = git_commit(tmp_path)
    assert dirty.startswith(head + "+dirty.") and len(dirty) == len(head) + len("+dirty.") + 12
    assert git_commit(tmp_path) == dirty  # the same uncommitted code, the same digest ...
    (tmp_path / "code.py").write_text("x = 3\n")
    assert git_commit(tmp_path).startswith(head + "+dirty.") and git_commit(tmp_path) != dirty  # ... other code not
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == dirty


def test_an_untracked_source_file_marks_the_code_dirty_but_not_untracked_results(tmp_path, monkeypatch):
    """A new module the run imports is uncommitted code: the recorded commit cannot reproduce it. Results written
    (results/, results-*/), files outside the source folders and files of a kind not tracked there do not count."""
    monkeypatch.delenv("CHOREO_GIT_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "choreo").mkdir()
    (tmp_path / "choreo" / "engine.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    for name in ("results/performance/speedups.json", "results-smoke/t.json", "notes.py", "choreo/scratch.xyz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "choreo" / "new_module.py").write_text("y = 1\n")
    dirty = git_commit(tmp_path)
    assert dirty.startswith(head + "+dirty.") and len(dirty) == len(head) + len("+dirty.") + 12
    (tmp_path / "choreo" / "new_module.py").write_text("y = 2\n")
    assert git_commit(tmp_path).startswith(head + "+dirty.") and git_commit(tmp_path) != dirty  # its content counts
    import choreo.provenance

    def unlisted(root):
        raise subprocess.SubprocessError("ls-files failed")

    monkeypatch.setattr(choreo.provenance, "_untracked_sources", unlisted)
    assert git_commit(tmp_path) == head + "+dirty.unknown"  # HEAD kept; whether it is all the code, unknown


def test_provenance_records_the_commit_the_run_imported_not_the_one_at_writing(monkeypatch):
    """A long run's checkout may change under it (an edit, a commit): the table names the code that ran, and says
    what the checkout held when it was written."""
    import choreo.provenance

    monkeypatch.setattr(choreo.provenance, "COMMIT_AT_START", "aaa111")
    monkeypatch.setattr(choreo.provenance, "git_commit", lambda root=None: "bbb222")
    prov = provenance(None)
    assert prov["git_commit"] == "aaa111" and prov["git_commit_at_write"] == "bbb222"
    assert "commit aaa111 (the checkout held bbb222 when this was written)" in provenance_line(prov)
    monkeypatch.setattr(choreo.provenance, "git_commit", lambda root=None: "aaa111")
    assert "git_commit_at_write" not in provenance(None)


def test_git_commit_from_the_environment_only_outside_a_repository(monkeypatch, tmp_path):
    """$CHOREO_GIT_COMMIT names the code of a copy without its .git; in a checkout git's answer wins."""
    monkeypatch.setenv("CHOREO_GIT_COMMIT", "abc123")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) == "abc123"
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path).startswith(head + "+dirty.")


def test_git_commit_of_a_folder_inside_another_repository_is_not_that_repositorys(tmp_path, monkeypatch):
    """choreo installed as a copy into a venv that lies in someone's project: their HEAD is not choreo's code."""
    monkeypatch.delenv("CHOREO_GIT_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    site = tmp_path / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    assert git_commit(site) is None
    monkeypatch.setenv("CHOREO_GIT_COMMIT", "abc123")
    assert git_commit(site) == "abc123"
    assert git_commit(tmp_path) == _git(tmp_path, "rev-parse", "HEAD")


def test_provenance_names_the_libraries_that_compute_or_grade_results():
    versions = provenance()["versions"]
    assert {"python", "torch", "transformers", "tokenizers", "safetensors", "peft", "triton", "numpy", "scipy",
            "math-verify", "gguf", "cuda"} <= set(versions)
    assert versions["torch"] and versions["transformers"] and versions["math-verify"]


def test_git_commit_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("CHOREO_GIT_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None


def test_logged_records_carry_the_commit_that_computed_them(tmp_path, monkeypatch):
    import choreo.provenance

    monkeypatch.setattr(choreo.provenance, "COMMIT_AT_START", "abc123")
    _git(tmp_path, "init", "-q")
    path = tmp_path / "games.jsonl"
    path.write_text('{"key": 0, "coop": true}\n')  # a record from before records were stamped
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "games")
    committed = _git(tmp_path, "log", "-1", "--format=%h")
    log = JsonlLog(path, key="key")
    log.append({"key": 1, "coop": False})
    monkeypatch.setattr(choreo.provenance, "COMMIT_AT_START", "def456")
    JsonlLog(path, key="key").append({"key": 2, "coop": True})
    records = list(log.records())
    assert [r.get("written", {}).get("git_commit") for r in records] == [None, "abc123", "def456"]
    summary = log.written_summary()
    assert summary["records"] == 3 and summary["unstamped"] == 1
    assert summary["git_commits"] == ["abc123", "def456"] and summary["first"] <= summary["last"]
    assert summary["file_last_committed"].startswith(committed)
    assert logs_written([path, tmp_path / "missing.jsonl"]) == [summary]
    line = provenance_line(provenance(None, seeds=[0], logs=[summary]))
    assert line.startswith("no model, device ")
    assert "log games.jsonl: records computed at abc123, def456; 1 of 3 from before records carried their commit " \
           f"(file last committed at {committed}" in line


def test_provenance_records_the_choreo_environment(monkeypatch):
    monkeypatch.setenv("CHOREO_LEAKAGE_FINETUNE", "1")
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")
    env = provenance(None)["environment"]
    assert env["CHOREO_LEAKAGE_FINETUNE"] == "1" and "UNRELATED_VARIABLE" not in env
    assert "environment {" in provenance_line(provenance(None))


@pytest.mark.parametrize("tail,kept", [
    ('{"index": 2, "result": "c"}', [0, 1, 2]),  # whole, only its newline lost: read as done, so it must stay
    ('{"index": 2, "result": "c', [0, 1]),       # torn: redone on resume
    ("", [0, 1]),
], ids=["whole-without-newline", "torn", "clean"])
def test_resuming_keeps_every_record_it_counted_as_done(tmp_path, tail, kept):
    from choreo.results import resumable

    path = tmp_path / "log.jsonl"
    path.write_text('{"index": 0, "result": "a"}\n{"index": 1, "result": "b"}\n' + tail)
    assert sorted(JsonlLog(path, key="index").keys()) == kept
    ran = []

    def run(todo, on_result):
        for j, item in enumerate(todo):
            ran.append(item)
            on_result(j, f"new {item}")

    out = resumable(path, [0, 1, 2, 3], run)
    assert ran == [i for i in range(4) if i not in kept]
    assert out == ["a", "b", "c" if 2 in kept else "new 2", "new 3"]
    records = list(JsonlLog(path, key="index").records())
    assert [r["index"] for r in records] == [0, 1, 2, 3] and path.read_text().endswith("\n")


def test_read_jsonl_splits_lines_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028, U+0085 or a form feed, which str.splitlines would cut at."""
    from choreo.results import read_jsonl

    path = tmp_path / "q.jsonl"
    records = [{"q": "line\u2028separator"}, {"q": "next\x85line\x0cfeed"}, {"q": "plain"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n", encoding="utf-8")
    assert [r for _, r in read_jsonl(path)] == records
    assert [n for n, _ in read_jsonl(path)] == [1, 2, 3]


@pytest.mark.parametrize("argv0, want", [("/venv/bin/choreo", ["choreo"]),
                                         ("/src/choreo/__main__.py", ["python", "-m", "choreo"]),
                                         ("/venv/bin/pytest", ["pytest"]),
                                         ("/venv/lib/site-packages/pytest/__main__.py", ["python", "-m", "pytest"]),
                                         ("/usr/bin/other", ["/usr/bin/other"])])
def test_the_command_names_the_entry_point_as_typed(monkeypatch, argv0, want):
    from choreo.provenance import command_argv

    monkeypatch.setattr(sys, "argv", [argv0, "repro", "--profile", "small"])
    assert command_argv() == want + ["repro", "--profile", "small"]
