"""``choreo bench``: measure the performance shapes and write ``results/performance/``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..model import Model
from ..repro import PAPER_RESULTS_DIR, RESULTS_DIR, SMOKE_RESULTS_DIR, default_results_dir
from .arms import available_arms, fast_arm, model_heads
from .config import BENCH_PROFILES, memory_arms
from .measure import measure_shape, pass_costs
from .memory import check_memory_model, measure_memory
from .report import write_pass_costs, write_results


def bench(model: Model, *, profile: str, results_dir: Path, model_path: str | None = None,
          command: str | None = None, log: Callable[[str], None] = print, progress: bool = True,
          rss: bool = True) -> dict:
    """Measure every shape of a profile, write ``results_dir/performance/`` (tables, JSON, plots).

    On CPU, peak RSS runs in subprocesses that load ``model_path`` (None: the embedded model), which must be
    ``model`` (a ValueError before anything is measured otherwise: ``check_memory_model``); ``rss=False`` skips
    them, e.g. when ``model`` has random weights. On CUDA the runs record allocated memory themselves."""
    from ..progress import progress_bar

    cfg = BENCH_PROFILES[profile]
    rss = rss and model.spec.device.type == "cpu" and bool(cfg.memory_arms)
    if rss:
        check_memory_model(model, model_path, where="bench", otherwise=", or rss=False")
    arms = available_arms(model.spec.device, **model_heads(model))  # triton only where it runs the model's heads
    out = Path(results_dir) / "performance"
    cost = pass_costs(model, sizes=cfg.pass_sizes) if cfg.pass_sizes else None
    if cost is not None:  # written after the table that uses it (which holds it as data.cost), at the end: an
        # interrupted run changes neither, or leaves a new table beside the old pass_cost.md, never new costs
        # beside a table whose bounds used the old ones
        log(f"pass cost: {1000 * cost['fixed_s']:.1f} ms + {1000 * cost['per_token_s']:.2f} ms x S")
    figures, memory, scaling = {}, {}, {}
    for shape in progress_bar(cfg.shapes, desc="shapes", disable=not progress):
        figures[shape.label] = measure_shape(model, shape, arms, lengths=cfg.lengths, rounds=cfg.rounds,
                                             warmup=cfg.warmup, cost=cost)
        e2e = {a: round(s["e2e"], 2) for a, s in figures[shape.label]["speedups"].items()}
        log(f"{shape.label}: e2e {json.dumps(e2e)}")
    fast = fast_arm(model.spec.device, **model_heads(model))
    for axis, shapes in cfg.scaling.items():
        scaling[axis] = []
        for shape in progress_bar(shapes, desc=f"scaling {axis}", disable=not progress):
            f = measure_shape(model, shape, [fast, "baseline"], lengths=cfg.lengths, rounds=cfg.scaling_rounds,
                              warmup=cfg.warmup, cost=cost)
            scaling[axis].append((dict(shape.size)[axis], f["speedups"]["baseline"]))
    if rss:
        for shape in progress_bar(cfg.shapes, desc="memory", disable=not progress):
            memory[shape.label] = {a: measure_memory(shape, a, cfg.lengths, model_path=model_path)
                                   for a in memory_arms(cfg, model.spec.device, **model_heads(model))}
    write_results(out, model=model, profile=profile, figures=figures, memory=memory, scaling=scaling, cost=cost,
                  command=command)
    if cost is not None:
        write_pass_costs(out, model, cost, command=command)
    return {"figures": figures, "memory": memory, "scaling": scaling, "cost": cost}


def read_bench_table(path: Path) -> dict:
    """``speedups.json`` as ``choreo bench`` wrote it: a JSON object whose ``data`` records one of
    ``BENCH_PROFILES``. Anything else is a ValueError naming the file, what is wrong and the profiles allowed.

    Example: ``read_bench_table(Path("results/performance/speedups.json"))["data"]["profile"]`` -> 'small'.
    """
    where, profiles = f"--memory-only: {str(path)!r}", sorted(BENCH_PROFILES)
    expected = f'expected the object `choreo bench` writes, {{"data": {{"profile": P, ...}}, ...}}, P one of {profiles}'
    try:
        stored = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not JSON ({error}); {expected}") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{where} holds {_kind(stored)}; {expected}")
    if not isinstance(stored.get("data"), dict):
        raise ValueError(f"{where} has {_kind(stored.get('data'))} under \"data\" (keys {sorted(stored)}); {expected}")
    profile = stored["data"].get("profile")
    if not isinstance(profile, str) or profile not in BENCH_PROFILES:
        raise ValueError(f"{where} records profile {profile!r}, not one of {profiles}")
    return stored


def _kind(value) -> str:
    """A JSON value's type, for an error: ``_kind([])`` -> 'a list', ``_kind(None)`` -> 'nothing'."""
    return "nothing" if value is None else f"a {type(value).__name__}"


def _timed_parts(stored: dict, path: Path) -> tuple[dict, dict, dict]:
    """The figures, scaling points and provenance of a ``read_bench_table`` table, each checked to be an object
    (the figures holding at least one shape of the recorded profile), for ``remeasure_memory``."""
    data = stored["data"]
    parts = {"data.figures": data.get("figures"), "data.scaling": data.get("scaling"),
             "provenance": stored.get("provenance")}
    for key, value in parts.items():
        if not isinstance(value, dict):
            raise ValueError(f"--memory-only: {str(path)!r} has {_kind(value)} as {key}, not an object; "
                             "run `choreo bench` to write the table again")
    labels = [shape.label for shape in BENCH_PROFILES[data["profile"]].shapes]
    if not any(label in data["figures"] for label in labels):
        raise ValueError(f"--memory-only: {str(path)!r} holds no shape of profile {data['profile']!r} to re-measure "
                         f"(data.figures has {sorted(data['figures'])}; the profile's shapes are {labels})")
    return tuple(parts.values())


def remeasure_memory(out: Path, model: Model, *, model_path: str | None = None, command: str | None = None) -> Path:
    """Peak memory again for every shape in ``out/speedups.json``; timings are kept as measured (their command,
    date, load, commit, device, cores, torch threads, CHOREO_* variables, library versions and protocols stay in the
    provenance as ``timings_command``, ``timings_date``, ... ``timings_versions``, ``timings_protocol``; their
    scaling rounds in ``sample_sizes``). A malformed ``speedups.json`` is a
    ValueError naming it (``read_bench_table``), and so is one whose timings this run's memory cannot join: timed
    on a GPU, with another model, or with other sizes than the profile has now; and so is a ``model_path`` that is
    not ``model`` (``check_memory_model``)."""
    path = Path(out) / "speedups.json"
    stored = read_bench_table(path)
    data = stored["data"]
    figures, scaling, timed = _timed_parts(stored, path)
    _check_joinable(path, data, timed, model)
    check_memory_model(model, model_path, where=f"--memory-only: {str(path)!r}")
    sizes = timed.get("sample_sizes") or {}
    # Scaling points measured before they were warmed up recorded no scaling_warmup: they ran with none.
    scaling_warmup = sizes.get("scaling_warmup", 0)
    cfg = BENCH_PROFILES[data["profile"]]
    memory = {}
    for shape in cfg.shapes:
        if shape.label in figures:
            memory[shape.label] = {a: measure_memory(shape, a, cfg.lengths, model_path=model_path)
                                   for a in memory_arms(cfg, model.spec.device, **model_heads(model))}
    return write_results(Path(out), model=model, profile=data["profile"], figures=figures, memory=memory,
                         scaling={k: [tuple(p) for p in v] for k, v in scaling.items()},
                         cost=data.get("cost"), command=command, scaling_warmup=scaling_warmup,
                         scaling_rounds=sizes.get("scaling_rounds"),
                         timings_command=timed.get("timings_command", timed.get("command")),
                         timings_git_commit=timed.get("timings_git_commit", timed.get("git_commit")),
                         timings_date=timed.get("timings_date", timed.get("date")),
                         timings_load_average=timed.get("timings_load_average", timed.get("load_average")),
                         **{f"timings_{key}": timed.get(f"timings_{key}", timed.get(key))
                            for key in ("device", "cpu_count", "threads", "environment", "versions", "protocol",
                                        "hf_protocol")})


def _check_joinable(path: Path, data: dict, timed: dict, model: Model) -> None:
    """Refuse (ValueError naming ``path``) to join this run's memory to timings measured on a GPU, of another
    model, or at other sizes than ``data``'s profile has now: the table would describe one run it never was."""
    from .report import _device_type, timed_sizes

    where = f"--memory-only: {str(path)!r}"
    device = _device_type(data, timed)
    if device != "cpu" or model.spec.device.type != "cpu":
        raise ValueError(f"{where} was timed on {timed.get('device', device)!r}; peak memory is measured on CPU, "
                         f"beside CPU timings only: run `choreo bench` to time and measure together")
    recorded = timed.get("model") or {}
    if (recorded.get("name"), recorded.get("sha256")) != (model.spec.name, model.spec.sha256):
        raise ValueError(f"{where} timed model {recorded.get('name')!r} (sha256 {recorded.get('sha256')!r}), not "
                         f"{model.spec.name!r} (sha256 {model.spec.sha256!r}): pass the model it timed (--model, "
                         f"--random-weights) or run `choreo bench`")
    cfg = BENCH_PROFILES[data["profile"]]
    now = timed_sizes(cfg) | ({"scaling_rounds": cfg.scaling_rounds} if data.get("scaling") else {})
    sizes = timed.get("sample_sizes") or {}
    changed = {k: (sizes[k], v) for k, v in now.items() if k in sizes and sizes[k] != v}
    if changed:
        raise ValueError(f"{where} was timed at other sizes than profile {data['profile']!r} has now ("
                         + ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in changed.items())
                         + "): run `choreo bench` to time it again")


DEFAULT_PROFILE = "small"


def register(sub) -> None:
    """Add ``bench`` to an argparse subparsers object."""
    p = sub.add_parser("bench", help="time to first token, end-to-end time and peak memory per workflow shape")
    p.add_argument("--profile", default=None, choices=sorted(BENCH_PROFILES),
                   help=f"sizes (default: {DEFAULT_PROFILE}; with --passes-only, its pass sizes; not with "
                        "--memory-only, which re-measures the profile recorded in speedups.json)")
    p.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--results-dir", default=None,
                   help=f"tables and plots go to RESULTS_DIR/performance/ (default: the checkout's {RESULTS_DIR}; at "
                        f"--profile smoke {SMOKE_RESULTS_DIR}, at paper {PAPER_RESULTS_DIR})")
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture and tokenizer with seeded random weights (timings only; for "
                        "machines without the weights: teacher-forced work does not depend on them)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--passes-only", action="store_true",
                      help="only measure the cost of one forward pass (at the pass sizes of --profile small or paper)")
    only.add_argument("--memory-only", action="store_true",
                      help="re-measure peak RSS (CPU only) for the shapes of an existing speedups.json and rewrite the "
                           "table; the profile is the one recorded there")
    p.set_defaults(func=_bench_command)


def _profile(args) -> str | None:
    """The profile a bench command uses: none with ``--memory-only`` (it reads the one in speedups.json)."""
    return None if args.memory_only else args.profile or DEFAULT_PROFILE


def _command(args) -> str:
    """The command line that reproduces ``args`` (for provenance): the options as used, the profile resolved."""
    profile = _profile(args)
    parts = ["choreo", "bench"] + (["--profile", profile] if profile else [])
    parts += [x for k in ("results_dir", "model", "device") if getattr(args, k)
              for x in (f"--{k.replace('_', '-')}", getattr(args, k))]
    parts += [f"--{k.replace('_', '-')}" for k in ("random_weights", "passes_only", "memory_only")
              if getattr(args, k, False)]
    return " ".join(shlex.quote(str(p)) for p in parts)


def check_device(text: str | None) -> torch.device:
    """The device ``--device`` names, if this torch can run the benchmarks on it (default: CPU)."""
    from ..cli import parse_device

    return parse_device("cpu" if text is None else text, who="the benchmarks run")


def _bench_command(args) -> int:
    from ..cli import output_dir
    from ..model import load_model, random_model

    device = _check_options(args)  # every check before the model loads
    results = Path(args.results_dir) if args.results_dir else default_results_dir(_profile(args))
    if args.memory_only:
        _check_stored_profile(results)
    out, command = output_dir(results / "performance", option="--results-dir"), _command(args)
    load = random_model if args.random_weights else load_model
    model = load(args.model, device=device)
    if args.memory_only:
        remeasure_memory(out, model, model_path=args.model, command=command)
        print((out / "speedups.md").read_text())
    elif args.passes_only:
        sizes = BENCH_PROFILES[_profile(args)].pass_sizes
        print(write_pass_costs(out, model, pass_costs(model, sizes=sizes), command=command).read_text())
    else:
        bench(model, profile=_profile(args), results_dir=results, model_path=args.model, command=command,
              rss=not args.random_weights)
        print((out / "speedups.md").read_text())
    print(f"results written to {out}", file=sys.stderr)
    return 0


def _check_options(args) -> torch.device:
    """The device to run on, after checking that every option given takes effect (none is silently ignored)."""
    if args.random_weights and args.memory_only:
        raise ValueError("--random-weights cannot re-measure memory: the memory subprocesses load real weights")
    if args.memory_only and args.profile is not None:
        raise ValueError(f"--profile {args.profile!r} has no effect with --memory-only: it re-measures the shapes "
                         "of the profile recorded in speedups.json")
    if args.passes_only and not BENCH_PROFILES[_profile(args)].pass_sizes:
        usable = sorted(name for name, cfg in BENCH_PROFILES.items() if cfg.pass_sizes)
        raise ValueError(f"--profile {_profile(args)!r} measures no pass cost; --passes-only takes one of {usable}")
    if args.model is not None and args.random_weights:
        _check_architecture(args.model)
    elif args.model is not None:
        from ..model import check_checkpoint

        check_checkpoint(args.model, source="--model")
    device = check_device(args.device)
    if args.memory_only and device.type != "cpu":
        raise ValueError(f"--device {args.device!r}: --memory-only measures peak RSS in CPU subprocesses; on CUDA, "
                         "a full `choreo bench` run records allocated memory with the timings")
    return device


def _check_architecture(path: str) -> None:
    """``--model`` with ``--random-weights``: a folder holding the config.json that ``random_model`` reads (with the
    tokenizer; the weights are not read). Example: ``--model /no/such`` -> "--model '/no/such' does not exist"."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path!r} " + ("is not a directory" if folder.exists() else "does not exist"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {path!r} has no config.json (--random-weights reads the architecture "
                                "there)")


def _check_stored_profile(results: Path) -> None:
    """``--memory-only`` re-measures an existing ``results/performance/speedups.json`` whose profile measures memory."""
    stored = results / "performance" / "speedups.json"
    if not stored.is_file():
        raise FileNotFoundError(f"--results-dir {str(results)!r} holds no performance/speedups.json for --memory-only "
                                "to re-measure; run `choreo bench` there first")
    profile = read_bench_table(stored)["data"]["profile"]
    if not BENCH_PROFILES[profile].memory_arms:
        raise ValueError(f"--memory-only: {str(stored)!r} holds profile {profile!r}, which measures no memory")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m choreo.perf bench ...`` (the same as ``choreo bench ...``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m choreo.perf")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    render = sub.add_parser("render", help="re-render speedups*.md and engine.md from their JSON (nothing measured)")
    render.add_argument("folder", nargs="?", default=str(RESULTS_DIR / "performance"))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "render":
        args.func = _render_folder
    from ..cli import run_command

    return run_command(args, prog=parser.prog)


def _render_folder(args) -> int:
    from .report import rerender_all

    for path in rerender_all(Path(args.folder)):
        print(path)
    return 0
