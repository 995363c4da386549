"""``choreo repro``: run the reproduction suites and print the tables they write to ``results/``."""

from __future__ import annotations

import sys
from pathlib import Path

from .data.concepts import FILE_NAME as CONCEPTS_FILE
from .data.math import FILE_NAME as MATH_FILE
from .profiles import PROFILES

ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = ROOT / "suites"
RESULTS_DIR = ROOT / "results"  # the checkout's results/, wherever the command runs from


def available_suites() -> list[str]:
    if not SUITES_DIR.is_dir():
        return []
    return sorted(p.name for p in SUITES_DIR.iterdir() if p.is_dir() and any(p.rglob("test_*.py")))


def register(sub) -> None:
    p = sub.add_parser("repro", help="reproduce the paper's tables (writes results/<suite>/)")
    p.add_argument("--profile", default="small", choices=PROFILES, help="suite size (default: small)")
    p.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--only", action="append", default=None, metavar="SUITE", help="run only this suite (repeatable)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR),
                   help=f"tables go to RESULTS_DIR/<suite>/ (default: the checkout's {RESULTS_DIR})")
    p.add_argument("--data-dir", default=None,
                   help=f"folder holding {CONCEPTS_FILE} (CommonGen-Hard concept sets for the blockage BSM suite) "
                        f"and/or {MATH_FILE} (MATH problems for the applications suite); default: $CHOREO_DATA, else "
                        "../shared/data beside the checkout, else built-in concepts and problems")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=run)


def run(args) -> int:
    import pytest

    suites = available_suites()
    for name in args.only or ():
        if name not in suites:
            raise ValueError(f"unknown suite {name!r}; available: {', '.join(suites) or '(none)'}")
    if not suites:
        raise FileNotFoundError(f"no reproduction suites found under {SUITES_DIR} (run from a checkout of choreo)")
    chosen = args.only or suites
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"model path {args.model!r} is not a directory")
    if args.data_dir is not None:  # the suites fall back to built-in data without the file: say so here
        if not Path(args.data_dir).is_dir():
            raise FileNotFoundError(f"data folder {args.data_dir!r} is not a directory")
        if not any((Path(args.data_dir) / f).is_file() for f in (CONCEPTS_FILE, MATH_FILE)):
            raise FileNotFoundError(f"data folder {args.data_dir!r} has no {CONCEPTS_FILE} or {MATH_FILE}")
    results = Path(args.results_dir)
    argv = [str(SUITES_DIR / name) for name in chosen]
    argv += ["--profile", args.profile, "--results-dir", str(results), "-p", "no:cacheprovider", "-q", "-rA"]
    argv += ["--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
    if args.model:
        argv += ["--model", args.model]
    if args.data_dir is not None:
        argv += ["--data-dir", args.data_dir]
    code = pytest.main(argv + list(args.pytest_args))
    for name in chosen:
        for table in sorted((results / name).rglob("*.md")):
            print(f"\n## {table.relative_to(results)}\n")
            print(table.read_text())
    print(f"results written to {results}", file=sys.stderr)
    return int(code)
