"""The commit recorded with every result says whether uncommitted code produced it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from choreo.provenance import git_commit

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
    assert git_commit(tmp_path) == head + "+dirty"


def test_git_commit_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHOREO_GIT_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"


def test_git_commit_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("CHOREO_GIT_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None
