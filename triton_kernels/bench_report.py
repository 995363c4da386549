"""Tables and a plot from the kernel benchmarks' pytest-benchmark JSON (``tests/kernels/bench_segment_attention.py``).

One row per workload: the kernel with the defaults of the benchmarked commit, the fastest configuration of its
tile sweep, the kernel with the other treatment of moved keys than its defaults' (``LaunchConfig.prerotate``
flipped: copied first, or re-rotated in the loop), plain causal SDPA at the
same attended tokens (the goal: >= 90% of its speed), FlexAttention (with and without the gather it needs) and
dense-mask SDPA (the engine's torch backend). TFLOP/s count attended (query, key) pairs only, so every
implementation is charged for the same work.

Usage::

    python -m triton_kernels.bench_report kernel_bench.json --out results/kernels --commit <sha> \\
        --command "bash scripts/gpu_checks.sh ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

IMPLS = {
    "triton": "kernel (defaults then)",
    "triton_prerotate": "kernel, moved keys copied first",
    "triton_in_loop": "kernel, moved keys re-rotated in the loop",
    "sdpa_causal": "causal SDPA, same attended tokens",
    "flex_kernel": "FlexAttention kernel, keys pre-gathered",
    "flex": "FlexAttention + gather",
    "sdpa_dense": "dense-mask SDPA + gather",
}


def _config_label(extra: dict) -> str:
    c = extra["config"]
    loop = (("flat + TMA" if c.get("tma") else "flat, moved keys copied first" if c.get("prerotate") else "flat")
            if c.get("flat", True) else "nested")
    tiles = f"m{c['block_m']} n{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
    if c.get("flat_stages"):  # records from before flat_stages existed ran the flat loop at num_stages
        tiles += f" flat-s{c['flat_stages']}"
    return f"{tiles} {loop}, {extra['num_splits']} split(s)"


def summarize(bench: dict) -> dict:
    """Per workload: ``impls`` ({impl: {seconds, tflops, extra_mem_mib}}), ``sweep`` (every tile configuration
    timed), ``best`` (the fastest of them), ``training`` (forward + backward, {impl: ...}; prefill workloads),
    mask density, attended pairs and device."""
    out: dict[str, dict] = {}
    for b in bench["benchmarks"]:
        e = b["extra_info"]
        if b["name"].startswith("test_segment_attention_speed"):
            w = out.setdefault(b["group"], {"impls": {}, "sweep": []})
            w["impls"][e["impl"]] = {"seconds": e["seconds_per_call"], "tflops": e["tflops"],
                                     "extra_mem_mib": e["peak_extra_mem_mib"]}
            w["density"], w["pairs"], w["device"] = e["mask_density"], e["attended_pairs"], e["device"]
        elif b["name"].startswith("test_segment_attention_training_speed"):
            w = out.setdefault(b["group"].removesuffix(" training"), {"impls": {}, "sweep": []})
            w.setdefault("training", {})[e["impl"]] = {"seconds": e["seconds_per_call"], "tflops": e["tflops"],
                                                      "extra_mem_mib": e["peak_extra_mem_mib"]}
        elif b["name"].startswith("test_finetune_step_speed"):
            w = out.setdefault("finetune step", {"impls": {}, "sweep": []})
            w.setdefault("finetune", {})[e["attention"]] = {
                "seconds": e["seconds_per_step"], "traces": e["traces"], "model": e["model"],
                "peak_mem_mib": e["peak_mem_mib"], "first_loss": e["first_loss"]}
        elif b["name"].startswith("test_segment_attention_backward_tiles"):
            w = out.setdefault(b["group"].removesuffix(" backward tiles"), {"impls": {}, "sweep": []})
            w.setdefault("backward_sweep", []).append({"config": e["backward_tiles"], "seconds": e["seconds_per_call"],
                                                       "tflops": e["tflops"]})
        elif b["name"].startswith("test_segment_attention_vs_base"):
            w = out.setdefault(b["group"].rsplit(" vs base ", 1)[0], {"impls": {}, "sweep": []})
            w.setdefault("vs_base", {}).setdefault(e["mode"], {})[e["which"]] = {
                "seconds": e["seconds_per_call"], "tflops": e["tflops"], "base_commit": e["base_commit"]}
        elif b["name"].startswith("test_segment_attention_tiles"):
            w = out.setdefault(b["group"].removesuffix(" tiles"), {"impls": {}, "sweep": []})
            w["sweep"].append({"config": _config_label(e), "seconds": e["seconds_per_call"], "tflops": e["tflops"],
                               "is_default": bool(e.get("is_default"))})
    for w in out.values():
        if w["sweep"]:
            w["best"] = min(w["sweep"], key=lambda r: r["seconds"])
        if w.get("backward_sweep"):
            w["best_backward"] = min(w["backward_sweep"], key=lambda r: r["seconds"])
    return out


def _us(s: float) -> str:
    return f"{1e6 * s:,.0f} us"


def _tuned(w: dict, default: float) -> float:
    """The defaults' time of the speed test scaled by how much faster the sweep's best configuration ran than the
    defaults in the sweep itself (both timed in one test: a ratio of two timings of different tests would mix
    their clocks and caches). ``default`` when the sweep's best is the defaults, or the sweep did not time them."""
    best = w.get("best")
    timed_default = next((r for r in w["sweep"] if r.get("is_default")), None)
    if best is None or timed_default is None or best.get("is_default"):
        return default
    return default * best["seconds"] / timed_default["seconds"]


# The kernel with the other treatment of moved keys than its defaults' (LaunchConfig.prerotate), as the benchmarks
# named it: forced on, where the defaults re-rotated in the loop everywhere; forced off, once prefill defaulted to
# copying the moved keys first.
OTHER_ROTATION = {"triton_prerotate": "copied first", "triton_in_loop": "in the loop"}


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, w in summary.items():
        impls, best = w["impls"], w.get("best")
        if "triton" not in impls:
            continue
        causal = impls.get("sdpa_causal")
        default = impls["triton"]["seconds"]
        other = next((k for k in OTHER_ROTATION if k in impls), None)  # the defaults' other rotation, if timed
        fastest = min([default, _tuned(w, default)] + ([impls[other]["seconds"]] if other else []))
        cell = lambda k: "-" if k not in impls else f"{_us(impls[k]['seconds'])} ({impls[k]['tflops']:.0f})"  # noqa: E731
        # The defaults' ratio, then the fastest configuration's where it is another one.
        both = lambda f: f(default) + ("" if fastest == default else f" ({f(fastest)})")  # noqa: E731
        rows.append([
            name, f"{w['density']:.3f}", cell("triton"),
            "-" if not best else f"{_us(best['seconds'])} ({best['tflops']:.0f}): {best['config']}",
            "-" if not other else f"{cell(other)}: {OTHER_ROTATION[other]}", cell("sdpa_causal"),
            "-" if not causal else both(lambda t: f"{100 * causal['seconds'] / t:.0f}%"),
            cell("flex_kernel"), cell("flex"), cell("sdpa_dense"),
            "-" if "flex" not in impls else both(lambda t: f"{impls['flex']['seconds'] / t:.1f}x"),
        ])
    return rows


def training_rows(summary: dict) -> list[list[str]]:
    """Forward + backward per workload: the kernel, autograd through gather + dense-mask SDPA, causal SDPA."""
    rows = []
    for name, w in summary.items():
        t = w.get("training", {})
        if "triton" not in t:
            continue
        cell = lambda k: "-" if k not in t else f"{_us(t[k]['seconds'])} ({t[k]['tflops']:.0f})"  # noqa: E731
        ratio = lambda k, f: "-" if k not in t else f(t[k]["seconds"], t["triton"]["seconds"])  # noqa: E731
        best = w.get("best_backward")
        rows.append([name, cell("triton"), cell("sdpa_dense"), cell("sdpa_causal"),
                     ratio("sdpa_causal", lambda c, k: f"{100 * c / k:.0f}%"),
                     ratio("sdpa_dense", lambda d, k: f"{d / k:.1f}x"),
                     "-" if "sdpa_dense" not in t else
                     f"{t['triton']['extra_mem_mib']:,.0f} / {t['sdpa_dense']['extra_mem_mib']:,.0f} MiB",
                     "-" if best is None else f"{_us(best['seconds'])} ({best['tflops']:.0f}): {best['config']}"])
    return rows


def base_rows(summary: dict) -> list[list[str]]:
    """This commit's kernel against another commit's, per workload and pass (``test_segment_attention_vs_base``)."""
    rows = []
    for name, w in summary.items():
        for mode, pair in w.get("vs_base", {}).items():
            if {"base", "head"} <= set(pair):
                base, head = pair["base"], pair["head"]
                rows.append([name, "forward" if mode == "forward" else "forward + backward",
                             f"{_us(base['seconds'])} ({base['tflops']:.0f})",
                             f"{_us(head['seconds'])} ({head['tflops']:.0f})",
                             f"{base['seconds'] / head['seconds']:.2f}x"])
    return rows


BASE_COLUMNS = ["workload", "pass", "base commit: time (TFLOP/s)", "this commit", "speed-up"]

TRAINING_COLUMNS = ["workload", "kernel fwd + bwd: time (TFLOP/s)", "dense-mask SDPA + gather, autograd",
                    "causal SDPA fwd + bwd", "kernel speed / causal SDPA", "kernel speed-up vs dense-mask SDPA",
                    "extra memory, kernel / dense-mask", "kernel, best of backward-tile sweep"]

COLUMNS = ["workload", "mask density", "kernel, defaults then: time (TFLOP/s)", "kernel, best of sweep",
           "kernel, other rotation of moved keys", "causal SDPA",
           "kernel speed / causal SDPA: defaults (fastest)", "Flex kernel, keys pre-gathered", "Flex + gather",
           "dense-mask SDPA + gather", "kernel speed-up vs Flex + gather: defaults (fastest)"]


def plot(path: Path, summary: dict, device: str) -> Path | None:
    """Horizontal bars: TFLOP/s per implementation, one group per workload (log scale); None, and no file, where
    nothing was timed forward (a run of the tile sweeps or the training benchmarks alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"kernel, best of sweep": lambda w: w.get("best", {}).get("tflops")}
    series.update({label: (lambda w, k=k: w["impls"].get(k, {}).get("tflops")) for k, label in IMPLS.items()})
    names = [n for n, w in summary.items() if w["impls"]]  # workloads timed forward (not the fine-tuning step)
    series = {label: get for label, get in series.items() if any(get(summary[n]) for n in names)}  # timed ones
    if not series:
        path.unlink(missing_ok=True)  # not an earlier run's plot beside this run's tables
        return None
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.75 * len(names)))
    height = 0.8 / len(series)
    for k, (label, get) in enumerate(series.items()):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(names))]
        xs = [get(summary[n]) or 0 for n in names]
        ax.barh(ys, xs, height, label=label)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("TFLOP/s over attended (query, key) pairs (higher is better)")
    ax.set_title(f"Segment attention vs PyTorch attention, bf16, {device}", fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    from choreo.report import save_figure

    return save_figure(fig, path)


def _input_sets_note(bench: dict) -> str:
    """How many input sets the timed calls cycled through (``input_sets`` in the records; records from before
    the benchmarks rotated inputs have none: every call then re-read one store, possibly from the L2 cache)."""
    counts = sorted({b["extra_info"]["input_sets"] for b in bench["benchmarks"] if "input_sets" in b["extra_info"]})
    if not counts:
        return "; every call on one input set"
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"; the calls cycle through {span} independent input sets per workload (together at least 4x the "
            f"GPU's L2), so that the store is read from device memory")


class BenchFileError(ValueError):
    """A file that is not a pytest-benchmark JSON of the kernel benchmarks (the message names what is wrong)."""


def load_bench(path: str | Path) -> dict:
    """The pytest-benchmark JSON at ``path``, checked to hold benchmark records with ``extra_info`` and a device."""
    try:
        bench = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchFileError(f"{path}: cannot read it as JSON ({e})") from None
    records = bench.get("benchmarks") if isinstance(bench, dict) else None
    if not isinstance(records, list) or not records:
        raise BenchFileError(f"{path}: no 'benchmarks' records (a pytest-benchmark JSON of "
                             f"tests/kernels/bench_*.py is expected)")
    for i, b in enumerate(records):
        if not isinstance(b, dict) or not isinstance(b.get("extra_info"), dict) or "name" not in b:
            raise BenchFileError(f"{path}: benchmarks[{i}] has no 'name' and 'extra_info'")
    if "device" not in records[0]["extra_info"]:
        raise BenchFileError(f"{path}: benchmarks[0].extra_info has no 'device'")
    return bench


def write_report(bench_json: Path, out: Path, *, commit: str | None, command: str | None,
                 name: str = "segment_attention", extra_notes: Sequence[str] = (),
                 training_notes: Sequence[str] = (), base_notes: Sequence[str] = ()) -> Path:
    """``out/<name>.{md,json,png}`` (the forward table, with ``extra_notes``), ``out/<name>_training.{md,json}``
    (forward + backward, with ``training_notes``), ``out/<name>_vs_base.{md,json}`` (this commit's kernel against
    another commit's, with ``base_notes``; where the JSON has those records) and a copy of the raw
    pytest-benchmark JSON (``<name>_raw.json``, replaced atomically). A companion table that this JSON has no
    records for is removed where an earlier render left one: it would describe another benchmark run."""
    from choreo.report import write_table
    from choreo.results import write_bytes

    bench = load_bench(bench_json)
    summary = summarize(bench)
    first = bench["benchmarks"][0]["extra_info"]
    device = first["device"]
    info = bench.get("commit_info") or {}
    recorded = (str(info["id"])[:7] + ("+dirty" if info.get("dirty") else "")) if info.get("id") else None
    this_commit = commit or recorded  # the commit given, else the one pytest-benchmark recorded (its dirty flag)
    sets = sorted({b["extra_info"]["input_sets"] for b in bench["benchmarks"] if "input_sets" in b["extra_info"]})
    calls = sorted({b["extra_info"]["calls_per_round"] for b in bench["benchmarks"]
                    if "calls_per_round" in b["extra_info"]})
    provenance = {
        "model": None, "device": device,
        # input set i of a workload is drawn with seed i (``input_sets``)
        "seeds": list(range(sets[-1])) if sets else [0], "sample_sizes": None,
        "versions": {k: first.get(k) for k in ("torch", "triton", "cuda")} | {
            "python": bench.get("machine_info", {}).get("python_version")},
        "git_commit": this_commit, "date": bench.get("datetime"),
        "command": command or "not recorded (the report was made without --command)",
        "timing": "pytest-benchmark pedantic: 10 rounds after 2 warm-up rounds; a round is "
                  + ("/".join(map(str, calls)) if calls else "20 (decode) or 5 (prefill)")
                  + " calls then one synchronisation; median round / calls" + _input_sets_note(bench),
    }
    out.mkdir(parents=True, exist_ok=True)
    # what the notes describe is what this JSON timed: workloads and columns it has no records for are not told
    names = set(summary)
    timed = {impl for w in summary.values() for impl in w["impls"]}
    swept = {n: len(w["sweep"]) for n, w in summary.items() if w["sweep"]}
    workloads = ["the one-segment workload reads one 4k-token message instead"] if any(
        "one-segment" in n for n in names) else []
    if any("one-delta" in n for n in names):
        workloads.append("the one-delta workload moves the same messages by one common delta (one re-rotation per "
                         "call instead of one per message)")
    if any("unmoved" in n for n in names):
        workloads.append("the unmoved workload reads the same messages where they were encoded (no re-rotation): "
                         "kernel and causal SDPA only")
    sweep_sizes = sorted(set(swept.values()))
    notes = [
        "Each cell: median time per call (TFLOP/s over attended (query, key) pairs: 4 * D flops per pair and "
        "query head). Workloads: H=32 query heads, Hkv=8, D=128, bf16; B calls attend to randomly chosen 128-token "
        "messages of a cache twice as large as what they read, moved back to back by position deltas, then "
        "causally to their own tokens" + "".join(f"; {w}" for w in workloads) + ".",
        "'defaults then': the kernel's default tiles and split count at the benchmarked commit; 'best of sweep': "
        "the fastest of the tile / loop / split-K configurations timed in the same run "
        "(test_segment_attention_tiles"
        + (f": {'/'.join(map(str, sweep_sizes))} configurations per workload, '-' where none ran" if swept else
           ": not run")
        + ")" + ("; 'other rotation of moved keys': the default tiles with LaunchConfig.prerotate flipped, prefill "
                 "only: 'copied first' (a pass that copies the moved keys, moved, before the main loop; its time "
                 "included) where the defaults re-rotate them in the loop, 'in the loop' where the defaults copy "
                 "them first" if timed & set(OTHER_ROTATION) else "; 'other rotation of moved keys': not timed in "
                 "this run")
        + ". The "
        "speed relative to causal SDPA and Flex is the defaults', then in brackets the fastest's where that is "
        "another configuration: the other rotation (timed in the same test as causal SDPA), or the "
        "sweep's best, as the defaults' time scaled by best / defaults within the sweep (a configuration chosen "
        "after timing it: an upper bound of what tuning gives).",
        "Causal SDPA runs over contiguous keys of the same count with no gather and no re-rotation: the speed of "
        "light for this much attention. FlexAttention cannot re-rotate moved keys inside its kernel, so as a "
        "backend it needs the gather ('Flex + gather'); 'Flex kernel' times its kernel alone on keys gathered "
        "before timing.",
    ]
    info = bench.get("commit_info") or {}
    if commit and info.get("id") == "unversioned":  # pytest-benchmark's id for a tree without git metadata
        notes.append(f"The benchmark ran in a copy of the files of commit {commit} without git metadata (the raw "
                     f"JSON's commit_info reads 'unversioned'); the commit is the one given to the report.")
    elif commit and info.get("id") and not str(info["id"]).startswith(commit):
        dirty = " (dirty)" if info.get("dirty") else ""
        notes.append(f"The raw JSON's commit_info names {str(info['id'])[:7]}{dirty}: "
                     f"the git metadata of the tree the benchmark ran in, whose files were those of commit {commit} "
                     f"(the benchmarked commit, given to the report).")
    write_table(out, name, title=f"Segment attention kernel vs PyTorch attention ({device})", columns=COLUMNS,
                rows=table_rows(summary), data=summary, provenance=provenance, notes=notes + list(extra_notes))
    plot(out / f"{name}.png", summary, device)
    written = {name}
    training = training_rows(summary)
    step = summary.get("finetune step", {}).get("finetune", {})
    if {"torch", "triton"} <= set(step):
        t, k = step["torch"], step["triton"]
        training_notes = list(training_notes) + [
            f"One LoRA optimizer step of blockage fine-tuning ({k['traces']} traces, {k['model']}, "
            f"tests/kernels/bench_finetune_step.py): torch backend {t['seconds']:.3f} s, kernel {k['seconds']:.3f} s "
            f"({t['seconds'] / k['seconds']:.2f}x); peak memory {t['peak_mem_mib']:,.0f} / {k['peak_mem_mib']:,.0f} "
            f"MiB; first-step loss {t['first_loss']:.4f} / {k['first_loss']:.4f}."]
    if training:
        written.add(f"{name}_training")
        write_table(out, f"{name}_training", title=f"Segment attention forward + backward vs PyTorch ({device})",
                    columns=TRAINING_COLUMNS, rows=training,
                    data={k: w["training"] for k, w in summary.items() if "training" in w}, provenance=provenance,
                    notes=[notes[0].replace("4 * D flops per pair and query head", "3.5 x 4 * D flops per pair and "
                                            "query head, forward + backward"),
                           "Gradients to q and to the whole store (keys and values), as a LoRA step through the "
                           "cache needs. 'dense-mask SDPA + gather' is the engine's torch backend under autograd "
                           "(the gather's backward scatters into the store); 'extra memory' is the peak CUDA memory "
                           "above the inputs during one step."] + list(training_notes))
    compared = base_rows(summary)
    if compared:
        base_commit = next(p["base"]["base_commit"] for w in summary.values() for p in w.get("vs_base", {}).values()
                           if "base" in p)
        written.add(f"{name}_vs_base")
        title = f"Segment attention: commit {this_commit} vs {base_commit} ({device})"
        write_table(out, f"{name}_vs_base", title=title,
                    columns=BASE_COLUMNS, rows=compared,
                    data={k: w["vs_base"] for k, w in summary.items() if "vs_base" in w}, provenance=provenance,
                    notes=[f"Both commits' kernels at their own default tiles and split counts, timed back to back "
                           f"on the same GPU in one run (test_segment_attention_vs_base: {base_commit}'s "
                           f"triton_kernels package imported beside this commit's); the workloads and the timing "
                           f"are the forward table's. Forward + backward: gradients to q and to the whole store, "
                           f"TFLOP/s charging 3.5x the forward's flops. Before timing, the two commits' outputs "
                           f"(and gradients) were checked to agree."] + list(base_notes))
    _remove_stale(out, name, written)
    raw = out / f"{name}_raw.json"
    if not raw.exists() or not raw.samefile(bench_json):  # re-rendering from the committed copy keeps it
        write_bytes(raw, Path(bench_json).read_bytes())  # atomic: an interrupted copy leaves the old one whole
    return out / f"{name}.md"


COMPANIONS = ("_training", "_vs_base")  # the tables ``write_report`` writes beside ``<name>`` when it has records


def _remove_stale(out: Path, name: str, written: set[str]) -> None:
    """Remove ``out/<name><companion>.{md,json}`` that this render did not write: left by a render of another JSON,
    they would sit beside the new tables and raw copy as if they came from the same run."""
    for suffix in COMPANIONS:
        if f"{name}{suffix}" not in written:
            for ext in (".md", ".json"):
                (out / f"{name}{suffix}{ext}").unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    from choreo.cli import output_dir

    parser = argparse.ArgumentParser(prog="python -m triton_kernels.bench_report", description=__doc__.split("\n")[0])
    parser.add_argument("bench_json", type=Path, help="pytest-benchmark JSON of bench_segment_attention.py")
    parser.add_argument("--out", type=Path, default=Path("results/kernels"))
    parser.add_argument("--name", default="segment_attention",
                        help="file stem of the tables: NAME.md, NAME_training.md, NAME_vs_base.md")
    parser.add_argument("--commit", default=None, help="commit the benchmark ran")
    parser.add_argument("--command", default=None, help="command that produced the JSON")
    parser.add_argument("--note", action="append", default=[], help="a line added to the forward table's notes")
    parser.add_argument("--training-note", action="append", default=[],
                        help="a line added to the forward + backward table's notes")
    parser.add_argument("--base-note", action="append", default=[],
                        help="a line added to the notes of the table against another commit's kernel")
    args = parser.parse_args(argv)
    if not args.bench_json.is_file():
        parser.error(f"no such file: {args.bench_json}")
    try:  # before any table is written: a file named as the folder fails here, in one line
        output_dir(args.out, option="--out")
    except ValueError as e:
        parser.error(str(e))
    try:
        report = write_report(args.bench_json, args.out, commit=args.commit, command=args.command, name=args.name,
                              extra_notes=args.note, training_notes=args.training_note, base_notes=args.base_note)
    except BenchFileError as e:
        parser.error(str(e))
    except KeyError as e:
        parser.error(f"{args.bench_json}: a benchmark record lacks the field {e} (a record of another version of "
                     f"tests/kernels/bench_*.py?)")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
