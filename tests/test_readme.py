"""The README's API examples run as written, and the command line answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.model
def test_readme_python_examples_run(model, monkeypatch):
    import choreo

    monkeypatch.setattr(choreo, "load_model", lambda *a, **k: model)  # the session's model, already loaded
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    sys_, q1, q2 = (namespace[k] for k in ("sys", "q1", "q2"))
    assert namespace["both"].start == q1.end and q1.start == q2.start  # siblings overlap
    assert namespace["line"].start == sys_.length + q1.length + q2.length  # linearized: back to back
    assert len(namespace["answers"]) == 2 and all(isinstance(a, str) for a in namespace["answers"])
    assert namespace["a"].text.strip() and namespace["b"].text.strip()  # the parallel calls answer


def test_readme_names_exactly_the_two_newcomer_commands():
    text = README.read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["bash scripts/repro.sh", "bash scripts/test.sh"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "choreo.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("choreo ")
    out = subprocess.run([sys.executable, "-m", "choreo.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "repro" in out.stdout


def test_cli_reports_bad_values_by_name():
    out = subprocess.run([sys.executable, "-m", "choreo.cli", "repro", "--only", "nosuchsuite"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "nosuchsuite" in out.stderr
    out = subprocess.run([sys.executable, "-m", "choreo.cli", "demo", "--model", "/no/such/model"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "/no/such/model" in out.stderr


def _command_row(command: str) -> str:
    """The README command table's row whose first cell starts with ``command``."""
    rows = [line for line in README.read_text().splitlines() if line.startswith(f"| `{command}")]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_registers_row_gives_the_command_that_made_the_committed_table():
    import json

    made = json.loads((README.parent / "results" / "kernels" / "registers.json").read_text())["provenance"]["command"]
    assert f"`{made}`" in _command_row("python -m triton_kernels.ptxas_report")


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_the_command_rows_name_every_option(command):
    from choreo.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.choices and command in a.choices).choices
    options = [o for a in commands[command]._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    row = _command_row(f"choreo {command}")
    assert [o for o in options if o not in row] == []
    if command == "bench":
        assert "at `--profile smoke` `results-smoke/performance/`" in row
