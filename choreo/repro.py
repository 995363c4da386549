"""``choreo repro``: run the reproduction suites and print the tables this run writes to ``results/``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .cli import output_dir
from .data.concepts import FILE_NAME as CONCEPTS_FILE
from .data.math import FILE_NAME as MATH_FILE
from .profiles import PROFILES
from .report import profile_of

ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = ROOT / "suites"
RESULTS_DIR = ROOT / "results"  # the checkout's results/, wherever the command runs from
# The committed tables are the small profile's. Smoke runs check the mechanics on a few instances, paper runs take
# the paper's sizes (a GPU's hours): by default their tables go to folders of their own (git-ignored), so that no
# run replaces the committed tables of another profile (``check_table_profiles`` refuses one that would).
SMOKE_RESULTS_DIR = ROOT / "results-smoke"
PAPER_RESULTS_DIR = ROOT / "results-paper"


def default_results_dir(profile: str | None) -> Path:
    """Where tables go without ``--results-dir``: ``SMOKE_RESULTS_DIR`` at profile smoke, ``PAPER_RESULTS_DIR`` at
    paper, else ``RESULTS_DIR``."""
    return {"smoke": SMOKE_RESULTS_DIR, "paper": PAPER_RESULTS_DIR}.get(profile, RESULTS_DIR)
# Environment variables that change what a suite runs (suites/leakage/conftest.py reads them with ``env_flag`` and
# ``env_count``), checked here before pytest starts: a bad one is one line, not an error in every test that reads it.
ENV_FLAGS = ("CHOREO_LEAKAGE_FINETUNE", "CHOREO_MATH_RENDER_ONLY")
ENV_COUNTS = {"CHOREO_LEAKAGE_GAMES": 2, "CHOREO_LEAKAGE_CANARY": 2}  # the smallest count each accepts (games)


def available_suites() -> list[str]:
    if not SUITES_DIR.is_dir():
        return []
    return sorted(p.name for p in SUITES_DIR.iterdir() if p.is_dir() and any(p.rglob("test_*.py")))


def register(sub) -> None:
    p = sub.add_parser("repro", help="reproduce the paper's tables (writes results/<suite>/; results-smoke/<suite>/ "
                                     "at --profile smoke, results-paper/<suite>/ at paper)")
    p.add_argument("--profile", default="small", choices=PROFILES, help="suite size (default: small)")
    p.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--only", action="append", default=None, metavar="SUITE", help="run only this suite (repeatable)")
    p.add_argument("--results-dir", default=None,
                   help=f"tables go to RESULTS_DIR/<suite>/ (default: the checkout's {RESULTS_DIR}; at --profile "
                        f"smoke {SMOKE_RESULTS_DIR}, at paper {PAPER_RESULTS_DIR}, so that no run replaces the "
                        f"committed tables of the small profile)")
    p.add_argument("--data-dir", default=None,
                   help=f"folder holding {CONCEPTS_FILE} (CommonGen-Hard concept sets for the blockage BSM suite) "
                        f"and/or {MATH_FILE} (MATH problems for the applications suite); default: $CHOREO_DATA "
                        "(checked like --data-dir), else ../shared/data beside the checkout, else built-in concepts "
                        "and problems")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after -- (e.g. `choreo repro --only "
                                                  "leakage -- -k canary -x`)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run the chosen suites under pytest, print the tables this run wrote; the exit status is pytest's."""
    import pytest

    chosen = _chosen_suites(args.only)
    _check_passed_through(args.pytest_args, getattr(args, "argv", None))
    if args.model is not None:
        from .model import check_checkpoint  # imports torch: only for a --model to check

        check_checkpoint(args.model, source="--model")
    check_env()
    if args.data_dir is not None:
        check_data_dir(args.data_dir, source="--data-dir")
    elif os.environ.get("CHOREO_DATA"):  # the suites read it (conftest.py): a mistyped one must not fall back quietly
        check_data_dir(os.environ["CHOREO_DATA"], source="$CHOREO_DATA")
    results = output_dir(args.results_dir or default_results_dir(args.profile), option="--results-dir")
    check_table_profiles(results, chosen, args.profile, given=args.results_dir is not None)
    if "applications" in chosen:
        check_math_logs(results)
    argv = [str(SUITES_DIR / name) for name in chosen]
    # -ra: a line per test that did not pass (-rA would print every passing test's output a second time);
    # tee-sys: progress bars and logs show as they happen, and a failing test's report still holds its output.
    argv += ["--profile", args.profile, "--results-dir", str(results), "-p", "no:cacheprovider", "-q", "-ra",
             "--capture=tee-sys", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
    if args.model:
        argv += ["--model", args.model]
    if args.data_dir is not None:
        argv += ["--data-dir", args.data_dir]
    before = table_stamps(results, chosen)
    code = pytest.main(argv + list(args.pytest_args))
    print_new_tables(results, chosen, before)
    return int(code)


# Options of repro's own that would bypass its checks (and its list of the tables written) if given to pytest.
OWN_OPTIONS = ("--profile", "--results-dir", "--model", "--data-dir")


def _check_passed_through(pytest_args, typed: list[str] | None = None) -> None:
    """Refuse pytest arguments typed without ``--`` (``choreo repro suites/leakage`` would run every suite and that
    one's tests twice), and one of ``OWN_OPTIONS`` after ``--``: repro passes its own, checked, and would report on
    another folder than the one pytest wrote to. Example: ``choreo repro -- --results-dir /x`` -> 'give
    --results-dir before --'. ``typed``: the command line as typed (None: not known, as in a call from Python)."""
    if pytest_args and typed is not None and "--" not in typed:
        raise ValueError(f"unexpected argument {pytest_args[0]!r}: choose suites with --only SUITE; pytest "
                         "arguments go after -- (choreo repro --only leakage -- -k canary)")
    for arg in pytest_args:
        option = arg.split("=", 1)[0]
        if option in OWN_OPTIONS:
            raise ValueError(f"{option} is an option of choreo repro: give it before --, not to pytest after it "
                             f"(got {arg!r})")


def _chosen_suites(only: list[str] | None) -> list[str]:
    suites = available_suites()
    for name in only or ():
        if name not in suites:
            raise ValueError(f"unknown suite {name!r}; available: {', '.join(suites) or '(none)'}")
    if not suites:
        raise FileNotFoundError(f"no reproduction suites found under {SUITES_DIR} (run from a checkout of choreo)")
    return only or suites


def check_data_dir(path: str, *, source: str) -> Path:
    """The data folder ``source`` (``--data-dir`` or ``$CHOREO_DATA``) names, if the suites would read it: a folder
    holding CONCEPTS_FILE and/or MATH_FILE. Without either the suites quietly use built-in data, so that is an error
    here. Example: ``check_data_dir("../shared/data", source="--data-dir")``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{source} {path!r} is not a directory")
    if not any((folder / name).is_file() for name in (CONCEPTS_FILE, MATH_FILE)):
        raise FileNotFoundError(f"{source} {path!r} has no {CONCEPTS_FILE} or {MATH_FILE}")
    return folder


def check_table_profiles(results: Path, suites: list[str], profile: str, *, given: bool = True) -> None:
    """Refuse a run at ``profile`` into a folder whose tables (``choreo.report.write_table``) record another
    profile: the suites would replace them (``given``: the folder was named by --results-dir, not the default).
    Example: ``--profile smoke --results-dir results`` over the committed tables -> "... results/leakage/canary
    holds a table of profile 'small' (canary.json) ..."."""
    for name in suites:
        for table in sorted((results / name).rglob("*.json")):
            recorded = table_profile(table)
            if recorded is not None and recorded != profile:
                folder = f"--results-dir {str(results)!r}" if given else f"the default results folder {str(results)!r}"
                raise ValueError(f"{folder}: {str(table.parent)!r} holds a table of profile {recorded!r} "
                                 f"({table.name}), which --profile {profile!r} would replace; choose another "
                                 f"--results-dir")


def check_math_logs(results: Path) -> None:
    """With ``CHOREO_MATH_RENDER_ONLY=1`` the applications suite re-renders the MATH table from its logs: a results
    folder with none is refused before a model loads. (A log that lacks records stops the suite, in one line.)"""
    runs = results / "applications" / "math" / "runs"
    if env_flag("CHOREO_MATH_RENDER_ONLY") and not any(runs.glob("*.jsonl")):
        raise FileNotFoundError(f"CHOREO_MATH_RENDER_ONLY=1 re-renders the MATH table from its logs, and "
                                f"{str(runs)!r} holds none (--results-dir {str(results)!r})")


def table_profile(path: Path) -> str | None:
    """The profile recorded in the table ``path`` (a .json that ``write_table`` wrote beside its .md), or None
    for any other file (run logs, adapters, a table that records none)."""
    if not path.with_suffix(".md").is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("provenance"), dict):
        return None
    return profile_of(stored.get("data"), stored["provenance"])


def env_flag(name: str) -> bool:
    """The switch ``$name``: "1" is on; "0", empty or unset is off. Anything else ("true", "yes") is a ValueError
    naming the variable and its value, rather than a switch that silently stays off.

    Example: with CHOREO_LEAKAGE_FINETUNE=1, ``env_flag("CHOREO_LEAKAGE_FINETUNE")`` -> True.
    """
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"${name} must be 1 (on) or 0 (off), got {value!r}")
    return value == "1"


def env_count(name: str, *, minimum: int) -> int | None:
    """The count ``$name`` (None when empty or unset): ASCII digits of a number >= ``minimum``; anything else
    ("abc", "-3", "²", "1e3") is a ValueError naming the variable and its value.

    Example: with CHOREO_LEAKAGE_GAMES=8, ``env_count("CHOREO_LEAKAGE_GAMES", minimum=2)`` -> 8.
    """
    value = os.environ.get(name, "")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < minimum:
        raise ValueError(f"${name} must be an integer >= {minimum} (ASCII digits), got {value!r}")
    return int(value)


def check_env() -> None:
    """Every variable of ``ENV_FLAGS`` and ``ENV_COUNTS`` that is set, checked as the suites read it."""
    for name in ENV_FLAGS:
        env_flag(name)
    for name, minimum in ENV_COUNTS.items():
        env_count(name, minimum=minimum)


def table_stamps(results: Path, suites: list[str]) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every markdown table under ``results/<suite>/``: a table written later differs in one
    (``write_text`` replaces the file), so a table left from an earlier run can be told from a fresh one."""
    stamps = {}
    for name in suites:
        for table in (results / name).rglob("*.md"):
            info = table.stat()
            stamps[table] = (info.st_ino, info.st_mtime_ns)
    return stamps


def print_new_tables(results: Path, suites: list[str], before: dict[Path, tuple[int, int]]) -> list[Path]:
    """Print the tables written since ``before`` (``table_stamps``), or say that none were."""
    new = sorted(table for table, stamp in table_stamps(results, suites).items() if before.get(table) != stamp)
    for table in new:
        print(f"\n## {table.relative_to(results)}\n")
        print(table.read_text())
    print(f"results written to {results}" if new else f"no results written to {results}", file=sys.stderr)
    return new
