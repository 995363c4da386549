"""The performance tables and scaling plots under ``results/performance/``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..model import Model
from .arms import HF_PROTOCOL, TEACHER
from .config import BENCH_PROFILES
from .shapes import PAPER, PAPER_E2E_TYPICAL

COLUMNS = ["workflow", "end-to-end speed-up vs baseline", "end-to-end vs baseline, prefills fused",
           "TTFT vs baseline, prompts prefilled apart (their passes not in the window)",
           "TTFT vs baseline, prefills fused (the same work in the window)", "end-to-end vs baseline+prefix / hf",
           "paper (A100) e2e / TTFT", "peak memory (+ growth in the run): choreographed vs baseline",
           "peak KV cache: choreographed vs baseline"]


def _x(s: dict, key: str) -> str:
    """``1.72x (tokens 4.3x: 40%; passes 2.0x: 86%)``: a speed-up against its token and pass-cost bounds."""
    value, parts = s[key], []
    if f"{key}_bound" in s:
        parts.append(f"tokens {s[f'{key}_bound']:.1f}x: {100 * value / s[f'{key}_bound']:.0f}%")
    if f"{key}_model" in s:
        parts.append(f"passes {s[f'{key}_model']:.1f}x: {100 * value / s[f'{key}_model']:.0f}%")
    return f"{value:.2f}x" + (f" ({'; '.join(parts)})" if parts else "")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _rss(m: dict | None) -> str:
    return "-" if not m else f"{m['rss_peak'] / 2**20:.0f} MiB (+{m['rss_delta'] / 2**20:.0f})"


def _cuda(runs: list[dict]) -> str:
    """Peak CUDA memory allocated in a run and its growth above the run's start (max over rounds)."""
    if not runs or runs[0].get("cuda_peak_bytes") is None:
        return "-"
    peak = max(r["cuda_peak_bytes"] for r in runs)
    grow = max(r["cuda_peak_bytes"] - (r.get("cuda_base_bytes") or 0) for r in runs)
    return f"{peak / 2**20:.0f} MiB (+{grow / 2**20:.1f})"


def table_rows(figures: dict, memory: dict) -> list[list[str]]:
    """One row per shape: speed-ups of the choreographed arm over each other arm, and peak memory."""
    rows = []
    for label, f in figures.items():
        base = f["speedups"]["baseline"]
        mem = memory.get(label, {})
        paper = PAPER.get(label)
        fused = f.get("fused")
        rows.append([
            label, _x(base, "e2e"), _x(fused, "e2e") if fused else "-",
            _x(base, "ttft"), _x(fused, "ttft") if fused else "-",
            " / ".join(f"{f['speedups'][a]['e2e']:.2f}x" for a in ("baseline+prefix", "hf")
                       if a in f["speedups"]) or "-",
            "-" if paper is None else f"~{PAPER_E2E_TYPICAL:.2f}x (all workflows) / {paper['ttft']:.1f}x",
            " vs ".join(_rss(mem.get(a)) for a in (f["fast"], "baseline")) if mem
            else " vs ".join(_cuda(f["runs"].get(a, [])) for a in (f["fast"], "baseline")),
            " vs ".join(_mib(f["runs"][a][0]["kv_peak_bytes"]) for a in (f["fast"], "baseline")),
        ])
    return rows


def plot_scaling(path: Path, *, title: str, axis: str, points: list[tuple[int, dict]]) -> Path:
    """Speed-up of the choreographed arm over the baseline against one size, with its bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    xs = [x for x, _ in points]
    fig, ax = plt.subplots(figsize=(6.6, 3.4))
    for key, marker, color in (("e2e", "o", "tab:blue"), ("ttft", "s", "tab:green")):
        name = "TTFT" if key == "ttft" else key
        what = f"{name} measured" + (" (prompts prefilled apart)" if key == "ttft" else "")
        ax.plot(xs, [s[key] for _, s in points], marker + "-", color=color, label=what)
        ax.plot(xs, [s[f"{key}_bound"] for _, s in points], marker + ":", color=color, alpha=0.5,
                label=f"{name} token bound")
        if all(f"{key}_model" in s for _, s in points):
            ax.plot(xs, [s[f"{key}_model"] for _, s in points], marker + "--", color=color, alpha=0.7,
                    label=f"{name} pass-cost bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(axis)
    ax.set_ylabel("speed-up vs baseline (x)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    from ..report import save_figure

    return save_figure(fig, path)


def _memory_note(device_type: str, memory: dict) -> str:
    """How the table's peak-memory column was measured on a device of ``device_type`` ("cpu" or "cuda")."""
    if device_type == "cuda":
        return ("Peak memory: CUDA memory allocated (torch.cuda.max_memory_allocated, peak reset at the start of each "
                "run, max over rounds); + is the growth above what was allocated when the run began (weights and "
                "every arm's preallocated KV store stay allocated across runs).")
    if not memory:
        return "Peak memory: not measured in this run."
    runs = [m for arms in memory.values() for m in arms.values()]
    threads = sorted({m["threads"] for m in runs if "threads" in m})
    threads = (f"{'/'.join(map(str, threads))} torch thread(s) in the memory subprocesses" if threads else
               "the memory subprocesses' torch threads not recorded (OMP_NUM_THREADS=1 unless set, at the time)")
    unreset = sum(m.get("peak_reset") is False for m in runs)
    if unreset:
        threads += (f"; in {unreset} of {len(runs)} runs VmHWM could not be reset, so their peak is the process's "
                    "whole peak (the priming pass's included)")
    return ("Peak memory: peak RSS of one subprocess per configuration (model loaded, one 2-token priming pass, "
            "free heap pages returned to the system by glibc malloc_trim(0), VmHWM reset, then the executor made, its "
            "KV store with room for 1,024 tokens included, and one run); + is the growth above the RSS before the "
            f"executor was made: every page the executor and the run touched, its KV store included; {threads}.")


def _device_type(data: dict, prov: dict) -> str:
    """"cuda" or "cpu": as recorded, or (tables written before it was) from the runs' CUDA memory figures."""
    if data.get("device_type"):
        return data["device_type"]
    runs = [r for f in data["figures"].values() for rs in f["runs"].values() for r in rs]
    return "cuda" if any(r.get("cuda_peak_bytes") is not None for r in runs) else "cpu"


def _pass_cost_note(cost: dict) -> str:
    """How the pass-cost bounds were computed from ``cost``: by interpolating measured passes, or (tables written
    before the passes were interpolated) by the affine line alone."""
    line = f"t(S) = {1000 * cost['fixed_s']:.1f} ms + {1000 * cost['per_token_s']:.2f} ms x S"
    if cost.get("bound"):
        worst = cost["fit_max_residual"]
        return (f"Pass cost used for the bounds, measured in the same run (this table's JSON, data.cost): each pass "
                f"charged the time "
                f"of a pass of its size, the measured passes of S = {', '.join(map(str, cost['prefill_s']))} tokens "
                f"interpolated piecewise linearly; the affine summary {line} is off the measured passes by up to "
                f"{100 * abs(worst['residual']):.0f}% (S={worst['S']}).")
    return (f"Pass cost used for the bounds: the affine fit {line} over whole prefills (tokenising included) of "
            f"S = {', '.join(map(str, cost['prefill_s']))} tokens, measured in the same run; every pass charged "
            "fixed + per-token x S (before the bounds interpolated measured passes).")


TTFT_NOTE = (
    "TTFT = summed over sequential stages of the slowest call's time to first token; a call's window runs from its "
    "submission to its first token. What each window holds: baseline, one pass over the call's whole serial prompt "
    "(every parent's text, prompts and earlier generated messages, then its header); hf, the same prompt in "
    "Hugging Face's forward, after the decodes of the calls ahead of it in its stage; choreographed with prompts "
    "prefilled apart, only the pass of the calls' headers: the prompt messages they read were encoded when created, "
    "in passes of their own before the call, outside the window (counted end to end); choreographed with prefills "
    "fused, {fused_passes} over the prompt messages created since the last stage together with the calls' headers: "
    "the prompt text the baseline's window also encodes, less the cached generated messages. So only the fused "
    "column compares the same work; below 1x, choreography reaches the first token later than re-encoding.")


def _ttft_note(data: dict) -> str:
    """``TTFT_NOTE`` for the windows these runs recorded: whether any fused stage took more than one pass
    (``engine.first_chunk_passes``; the engine ran every stage's first chunks in one pass before it existed)."""
    split = any(len(stage) > 1 for figure in data.get("figures", {}).values()
                for arm, runs in figure.get("runs", {}).items() if arm.endswith("+fused")
                for run in runs for stage in run.get("stage_tokens", ()))
    return TTFT_NOTE.format(fused_passes="one pass, or a few where their lengths differ much "
                                         "(engine.first_chunk_passes; the pass-cost bound charges each)" if split
                            else "one pass")


def _hf_note(data: dict) -> str:
    """Why the hf arm's TTFT has no bounds; where the stored figures hold some anyway (tables written before
    ``speedups`` left them out), that they are not shown and do not bound it."""
    note = ("hf runs a stage's calls one after another and its TTFT counts from the stage's submission, so it "
            "includes the decodes of the calls ahead; no token or pass-cost bound counts them, so ")
    stored = any("ttft_bound" in (f.get("speedups") or {}).get("hf", {}) for f in data.get("figures", {}).values())
    if stored:
        return note + ("the hf TTFT bounds this table's JSON holds (computed before they were left out) do not bound "
                       "it and are not shown (its end-to-end bounds stand).")
    return note + "the hf arm has no TTFT bounds (its end-to-end bounds stand)."


def render_notes(data: dict, prov: dict) -> list[str]:
    """The notes of a speedups table, from what it stored: its ``data`` and ``provenance`` (``rerender``)."""
    cfg, cost, memory = BENCH_PROFILES[data["profile"]], data.get("cost"), data.get("memory") or {}
    sizes = prov.get("sample_sizes") or {}
    threads = prov.get("timings_threads", prov.get("threads"))
    cores = prov.get("timings_cpu_count", prov.get("cpu_count"))
    cores = "an unrecorded number of" if cores is None else cores
    threads = "an unrecorded number of" if threads is None else threads
    load, timed_load = prov.get("load_average") or [float("nan")], prov.get("timings_load_average")
    # where memory was re-measured, the timings' own protocols (timings_*) are what the speed-ups ran under
    protocol = prov.get("timings_protocol", prov.get("protocol", TEACHER))
    hf_protocol = prov.get("timings_hf_protocol", prov.get("hf_protocol", HF_PROTOCOL))
    notes = [
        f"Protocol: {protocol}; {sizes.get('prompt_words', cfg.lengths.prompt_words)}-word "
        f"synthetic prompts, {sizes.get('content_tokens', cfg.lengths.content_tokens)} content tokens per call. "
        f"hf arm: {hf_protocol}.",
        "Speed-ups are medians over rounds of ratios measured side by side in the same round (arms interleaved).",
        "Bounds: tokens = tokens the baseline encodes / tokens the choreographed arm encodes (end-to-end: all "
        "forward-pass tokens; TTFT: tokens encoded in each TTFT window, as each executor counted them, so "
        "baseline+prefix is charged only the prompt past the prefix it reuses); passes = the same ratio of the "
        "times the pass cost (last note) predicts for those passes, which charges every pass its per-pass cost as "
        "well as its tokens. The percentage is measured / bound.",
        _hf_note(data),
        _ttft_note(data),
        _memory_note(_device_type(data, prov), memory) + " Peak KV: the store's peak rows in use x bytes per token.",
        (f"1-min load average {timed_load[0]:.1f} on {cores} cores at the end of the timed run ({load[0]:.1f} at the "
         f"end of the memory re-measurement), " if timed_load else
         f"1-min load average {load[0]:.1f} on {cores} cores at the end of the run, ")
        + f"{threads} torch threads in the timing process.",
    ]
    if prov.get("timings_git_commit"):
        versions = f" with {prov['timings_versions']}" if prov.get("timings_versions") else ""
        notes.append(f"Timings measured at commit {prov['timings_git_commit']}{versions}; memory re-measured at the "
                     "commit in the provenance below.")
    if data.get("scaling"):
        rounds = ("rounds not recorded" if sizes.get("scaling_rounds") is None else
                  f"{sizes['scaling_rounds']} timed round(s) after {sizes.get('scaling_warmup', 0)} warm-up round(s) "
                  "per point")
        notes.append(f"Scaling plots: the choreographed arm (prompts prefilled apart) vs baseline only, {rounds}, "
                     "arms interleaved within each round. Their TTFT is the unfused one: not the same work as the "
                     "baseline's window (see TTFT above); their end-to-end speed-ups compare the same work.")
    if cost is not None:
        notes.append(_pass_cost_note(cost))
    return notes


TITLE = "Performance: choreographed vs re-encoding vs Hugging Face (teacher-forced)"


def timed_sizes(cfg) -> dict:
    """The sizes a ``BenchConfig``'s timings depend on, as the provenance records them (``sample_sizes``)."""
    return {"rounds": cfg.rounds, "warmup": cfg.warmup, **dataclasses.asdict(cfg.lengths)}


def write_results(out: Path, *, model: Model, profile: str, figures: dict, memory: dict, scaling: dict,
                  cost: dict | None = None, command: str | None = None, scaling_warmup: int | None = None,
                  scaling_rounds: int | None = None, name: str = "speedups", **extra) -> Path:
    """``<name>.md``/``.json`` (one row per shape) and ``scaling_<axis>.png`` under ``out``; returns the ``.md``.

    ``name``: the tables' file stem, ``speedups`` for ``choreo bench`` (the table ``--memory-only`` re-measures),
    ``speedups_suite`` for the performance suite, which has no scaling plots to go with it.
    ``scaling_warmup``, ``scaling_rounds``: warm-up and timed rounds of the scaling points (default: the
    profile's ``warmup`` and ``scaling_rounds``, as ``bench`` runs them; ``remeasure_memory`` passes those
    stored). ``extra`` goes into the provenance (e.g. where re-measured memory joins earlier timings).
    Rows and notes are rendered from the stored data and provenance alone (``rerender`` redoes them).

    Example: ``write_results(Path("results/performance"), model=model, profile="smoke", figures=figures,
    memory={}, scaling={}, name="speedups_suite")`` -> ``results/performance/speedups_suite.md``.
    """
    from ..provenance import provenance

    cfg = BENCH_PROFILES[profile]
    scaling_warmup = cfg.warmup if scaling_warmup is None else scaling_warmup
    sizes = timed_sizes(cfg)
    if scaling:
        sizes.update(scaling_rounds=cfg.scaling_rounds if scaling_rounds is None else scaling_rounds,
                     scaling_warmup=scaling_warmup)
    prov = provenance(model, seeds=None, sample_sizes=sizes,
                      command=command, protocol=TEACHER, hf_protocol=HF_PROTOCOL, load_average=os.getloadavg(),
                      threads=torch.get_num_threads(), cpu_count=os.cpu_count(), **extra)
    data = {"figures": figures, "memory": memory, "scaling": scaling, "profile": profile, "cost": cost,
            "device_type": model.spec.device.type}
    path = _render(out, name, data, prov)
    _plot_scalings(out, scaling)
    return path


def _plot_scalings(out: Path, scaling: dict) -> None:
    """``scaling_<axis>.png`` for each axis of ``scaling`` (axis -> [(size, speed-ups)])."""
    titles = {"B": "tree of thoughts, V=4: proposals B", "V": "tree of thoughts, B=4: voters V",
              "A": "parallel debate, 3 rounds: agents A"}
    for axis, points in scaling.items():
        plot_scaling(out / f"scaling_{axis}.png", title=titles.get(axis, axis), axis=axis,
                     points=[tuple(p) for p in points])


def _render(out: Path, name: str, data: dict, prov: dict) -> Path:
    from ..report import write_table

    return write_table(out, name, title=TITLE, columns=COLUMNS,
                       rows=table_rows(data["figures"], data.get("memory") or {}),
                       data=data, provenance=prov, notes=render_notes(data, prov))


def rerender_all(out: Path) -> list[Path]:
    """``rerender`` every speedups table and ``rerender_engine`` the engine table found in ``out`` (``python -m
    choreo.perf render DIR``); returns the ``.md`` files rewritten."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is not a folder")
    names = [name for name in ("speedups", "speedups_suite", "engine") if (out / f"{name}.json").is_file()]
    if not names:
        raise ValueError(f"{str(out)!r} holds none of speedups.json, speedups_suite.json, engine.json")
    for name in names:  # every file is read before any is rewritten
        _stored(out, name)
    return [rerender_engine(out) if name == "engine" else rerender(out, name) for name in names]


def _stored(out: Path, name: str) -> dict:
    """``out/<name>.json`` as a table writer stored it; a ValueError naming the file says what is wrong with it."""
    import json

    path = Path(out) / f"{name}.json"
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not JSON ({error})") from None
    missing = [key for key in ("data", "provenance") + (("columns", "title") if name == "engine" else ())
               if not isinstance(stored, dict) or key not in stored]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: not a table `choreo bench` wrote")
    data = stored["data"]
    if not isinstance(data, dict) or not isinstance(stored["provenance"], dict):
        raise ValueError(f"{str(path)!r}: data and provenance must be JSON objects")
    if name == "engine":
        wanted = {"data.rows": isinstance(data.get("rows"), dict), "data.raw": isinstance(data.get("raw"), dict),
                  "a 'met' column": isinstance(stored["columns"], list) and "met" in stored["columns"]}
    else:
        wanted = {"data.profile (one of the bench profiles)": data.get("profile") in BENCH_PROFILES,
                  "data.figures": isinstance(data.get("figures"), dict),
                  "data.memory": isinstance(data.get("memory", {}), dict)}
    lacking = [what for what, ok in wanted.items() if not ok]
    if lacking:
        raise ValueError(f"{str(path)!r} lacks {', '.join(lacking)}: not a table `choreo bench` wrote")
    if name != "engine":
        for label, figure in data["figures"].items():
            _check_figure(path, label, figure)
    return stored


def _check_figure(path: Path, label: str, figure) -> None:
    """A stored figure holds what ``table_rows`` reads: its fast arm, the runs of that arm and the baseline, and
    the speed-ups over the baseline; a ValueError naming the file and the figure says what it lacks."""
    runs = figure.get("runs") if isinstance(figure, dict) else None
    speedups = figure.get("speedups") if isinstance(figure, dict) else None
    wanted = {"fast (the choreographed arm)": isinstance(figure, dict) and isinstance(figure.get("fast"), str),
              "runs of its fast arm and of baseline": isinstance(runs, dict) and all(
                  isinstance(runs.get(a), list) and runs[a] and isinstance(runs[a][0], dict)
                  for a in (figure.get("fast"), "baseline")),
              'speedups["baseline"]': isinstance(speedups, dict) and isinstance(speedups.get("baseline"), dict)}
    lacking = [what for what, ok in wanted.items() if not ok]
    if lacking:
        raise ValueError(f"{str(path)!r}: data.figures[{label!r}] lacks {', '.join(lacking)}: not a figure "
                         "`choreo bench` wrote")


def rerender(out: Path, name: str = "speedups") -> Path:
    """Rewrite ``out/<name>.md`` and ``.json`` from the stored ``.json`` (its data and provenance kept as they are,
    rows and notes rendered by this code), and its scaling plots from the points it stored: nothing is measured.
    Returns the ``.md``.

    Example: ``rerender(Path("results/performance"))`` after a change of the table's columns or notes.
    """
    stored = _stored(out, name)
    path = _render(Path(out), name, stored["data"], stored["provenance"])
    _plot_scalings(Path(out), stored["data"].get("scaling") or {})
    return path


def write_pass_costs(out: Path, model: Model, costs: dict, *, command: str | None = None) -> Path:
    """``pass_cost.md``/``.json``: measured pass times, the affine summary line and how far it is off them."""
    from ..provenance import provenance
    from ..report import write_table

    fit = lambda s: costs["fixed_s"] + costs["per_token_s"] * s
    off = lambda t, s: f"{100 * (fit(s) / t - 1):+.0f}%"
    rows = [[f"pass, S={s} tokens", f"{1000 * t:.1f} ms", f"{1000 * fit(int(s)):.1f} ms", off(t, int(s))]
            for s, t in costs["prefill_s"].items()]
    rows += [[f"decode step, B={b} calls", f"{1000 * t:.1f} ms", f"{1000 * fit(int(b)):.1f} ms", off(t, int(b))]
             for b, t in costs["decode_step_s"].items()]
    # the conditions of the timings, recorded with them (the notes read them from here, never from this machine now)
    prov = provenance(model, seeds=None, sample_sizes={"repeats": costs.get("repeats")}, command=command,
                      load_average=os.getloadavg(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    where = ("on CPU, mostly streaming the weights from memory" if model.spec.device.type == "cpu" else
             f"on {model.spec.device.type}: reading the weights, launching kernels, the host's Python")
    sizes = [int(s) for s in costs["prefill_s"]]
    worst = max(costs["prefill_s"].items(), key=lambda st: abs(fit(int(st[0])) / st[1] - 1), default=None)
    small = [(int(s), t) for s, t in costs["prefill_s"].items() if int(s) <= 32]
    small_worst = max((abs(fit(s) / t - 1) for s, t in small), default=None)
    residual = ("" if worst is None else
                f" Over the measured range S = {min(sizes)}-{max(sizes)} the affine line is off the measured passes by "
                f"up to {100 * abs(fit(int(worst[0])) / worst[1] - 1):.0f}% (S={worst[0]}: {1000 * worst[1]:.1f} ms "
                f"measured, {1000 * fit(int(worst[0])):.1f} ms on the line)"
                + (f"; over S <= 32, where choreographed TTFT passes lie, by up to {100 * small_worst:.0f}%"
                   if small_worst is not None else "") + ".")
    method = costs.get("pass_method", "a whole prefill call (tokenising and message bookkeeping included)")
    notes = [f"Passes: {method}. The pass-cost bounds of speedups.md charge each pass the measured time of its size, "
             "interpolated piecewise linearly in S between the measured sizes (extrapolated along the last segment "
             f"above them). Least-squares summary line: t(S) = {1000 * costs['fixed_s']:.1f} ms + "
             f"{1000 * costs['per_token_s']:.2f} ms x S; 'affine off by' = line / measured - 1.{residual}",
             f"What every pass pays ({where}) is what the smallest pass costs"
             + (f" (S={min(sizes)}: {1000 * costs['prefill_s'][min(costs['prefill_s'], key=int)]:.1f} ms)"
                if sizes else "")
             + ", so a choreographed call that encodes a few header tokens cannot be faster than that, whatever the "
             "token bound says; the line's intercept is an extrapolation, not that floor.",
             "A decode step of B calls encodes B tokens: "
             + costs.get("decode_step_method", "the mean pass of a decode of up to 8 tokens, its header and closing "
                                               "passes included (measured before the difference method)") + ".",
             _pass_conditions(costs, prov)]
    title = f"Cost of one forward pass (choreographed engine, {costs['attention']} attention)"
    return write_table(out, "pass_cost", title=title,
                       columns=["pass", "measured (min of repeats)", "affine line", "affine off by"], rows=rows,
                       data=costs, provenance=prov, notes=notes)


def _pass_conditions(costs: dict, prov: dict) -> str:
    """The machine's state when the passes were timed, as the provenance recorded it at the end of the run (a
    table written before it did says what is not recorded, rather than reading the machine it is rendered on)."""
    load, cores = prov.get("load_average"), prov.get("cpu_count")
    threads = costs.get("threads", prov.get("threads"))
    where = ("load average not recorded" if load is None else f"1-min load average {load[0]:.1f}") + (
        "" if cores is None else f" on {cores} cores")
    return where + ", " + ("torch threads not recorded" if threads is None else f"{threads} torch threads") + "."


# ------------------------------------------------------------------------------------ engine.md (test_engine_bench)
# Runs of the same code on this shared machine have differed by more than the rounds of one run do (TTFT: 19.3x,
# 19.7x, 19.96x and 21.0x, a spread of 8.7% of the goal): a verdict within this share of its goal says so.
RUN_TO_RUN = 0.10
ENGINE_GOALS = {"ttft": 20.0, "throughput": 5.0}  # engine.md's rows with a goal: the ratio each must reach
DECODE_TIMED = ("generated tokens / the Runner's wall time for the calls alone: each call's header pass, one decode "
                "step per teacher token and a closing pass, over a prompt prefilled (and cached) before timing")


def verdict(ratio: float, goal: float) -> str:
    """'met' or 'not met' by the run's own ratio, with how far from the goal when within ``RUN_TO_RUN`` of it.

    Example: ``verdict(19.26, 20.0)`` -> 'not met (-3.7%, within run-to-run spread)'; ``verdict(10.8, 5.0)`` ->
    'met'."""
    word, off = ("met" if ratio >= goal else "not met"), ratio / goal - 1
    return f"{word} ({off:+.1%}, within run-to-run spread)" if abs(off) <= RUN_TO_RUN + 1e-12 else word


def engine_notes(prov: dict) -> list[str]:
    """The notes of engine.md, from its provenance: the 1-min load average at the end of the run, the machine's
    cores and the torch threads (each said to be unrecorded in a table written before they were)."""
    load = (prov.get("load_average") or [float("nan")])[0]
    cores, threads = prov.get("cpu_count"), prov.get("threads")
    machine = ("Cores and torch threads not recorded" if cores is None else
               f"{prov.get('device', 'CPU')}, {cores} cores, {threads} torch threads")
    return [f"{machine}: 1-min load average {load:.1f} at the end; ratios are measured side by side "
            "(setup/target of one pytest-benchmark round).",
            "met: whether one run's median of per-round ratios reaches the goal. Runs of the same code on this "
            f"machine have differed by up to {RUN_TO_RUN:.0%} of the goal (suites/performance/README.md), so a "
            "ratio that close to it is marked 'within run-to-run spread': another run may land on the other side.",
            f"(b) decode tokens/s = {DECODE_TIMED}.",
            "(c) RSS: free heap pages are returned to the system (glibc malloc_trim(0)) before the RSS is read and "
            "its peak reset, so the growth counts every page the run touched."]


def engine_ratios(raw: dict) -> dict[str, float]:
    """The median per-round ratio of each goal row of engine.json's ``raw`` (baseline / choreographed TTFT;
    concurrent / single tokens per second)."""
    import statistics

    pairs = {"ttft": raw["ttft"]["rounds_baseline_choreographed_s"],
             "throughput": raw["throughput"]["rounds_tokens_per_s_1_and_concurrent"]}
    return {k: statistics.median(b / a if k == "throughput" else a / b for a, b in v) for k, v in pairs.items()}


def rerender_engine(out: Path) -> Path:
    """Rewrite ``out/engine.md``/``.json`` from the stored ``engine.json``: the 'met' column recomputed from the
    rounds it keeps, the notes by this code, data and provenance as stored. Nothing is measured."""
    from ..report import write_table

    stored = _stored(out, "engine")
    data, rows = stored["data"], stored["data"]["rows"]
    met = stored["columns"].index("met")
    for key, ratio in engine_ratios(data["raw"]).items():
        rows[key][met] = verdict(ratio, ENGINE_GOALS[key])
    return write_table(out, "engine", title=stored["title"], columns=stored["columns"], rows=list(rows.values()),
                       data=data, provenance=stored["provenance"], notes=engine_notes(stored["provenance"]))
