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

COLUMNS = ["workflow", "end-to-end speed-up vs baseline", "TTFT speed-up vs baseline",
           "end-to-end vs baseline, prefills fused", "end-to-end vs baseline+prefix / hf", "paper (A100) e2e / TTFT",
           "peak memory (+ growth in the run): choreographed vs baseline", "peak KV cache: choreographed vs baseline"]


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
        rows.append([
            label, _x(base, "e2e"), _x(base, "ttft"),
            _x(f["fused"], "e2e") if f.get("fused") else "-",
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
        ax.plot(xs, [s[key] for _, s in points], marker + "-", color=color, label=f"{key} measured")
        ax.plot(xs, [s[f"{key}_bound"] for _, s in points], marker + ":", color=color, alpha=0.5,
                label=f"{key} token bound")
        if all(f"{key}_model" in s for _, s in points):
            ax.plot(xs, [s[f"{key}_model"] for _, s in points], marker + "--", color=color, alpha=0.7,
                    label=f"{key} pass-cost bound")
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


def _memory_note(device: torch.device, *, measured: bool) -> str:
    """How the table's peak-memory column was measured on ``device``."""
    if device.type == "cuda":
        return ("Peak memory: CUDA memory allocated (torch.cuda.max_memory_allocated, peak reset at the start of each "
                "run, max over rounds); + is the growth above what was allocated when the run began (weights and "
                "every arm's preallocated KV store stay allocated across runs).")
    if not measured:
        return "Peak memory: not measured in this run."
    return ("Peak memory: peak RSS of one subprocess per configuration (model loaded, one 2-token priming pass, "
            "free heap pages returned to the system by glibc malloc_trim(0), VmHWM reset, then the executor made, its "
            "KV store with room for 1,024 tokens included, and one run); + is the growth above the RSS before the "
            "executor was made: every page the executor and the run touched, its KV store included.")


def write_results(out: Path, *, model: Model, profile: str, figures: dict, memory: dict, scaling: dict,
                  cost: dict | None = None, command: str | None = None, scaling_warmup: int | None = None,
                  name: str = "speedups", **extra) -> Path:
    """``<name>.md``/``.json`` (one row per shape) and ``scaling_<axis>.png`` under ``out``; returns the ``.md``.

    ``name``: the tables' file stem, ``speedups`` for ``choreo bench`` (the table ``--memory-only`` re-measures),
    ``speedups_suite`` for the performance suite, which has no scaling plots to go with it.
    ``scaling_warmup``: warm-up rounds of the scaling points (default: the profile's ``warmup``, as ``bench``
    runs them). ``extra`` goes into the provenance (e.g. where re-measured memory joins earlier timings).

    Example: ``write_results(Path("results/performance"), model=model, profile="smoke", figures=figures,
    memory={}, scaling={}, name="speedups_suite")`` -> ``results/performance/speedups_suite.md``.
    """
    from ..provenance import provenance
    from ..report import write_table

    cfg = BENCH_PROFILES[profile]
    load = os.getloadavg()
    scaling_warmup = cfg.warmup if scaling_warmup is None else scaling_warmup
    sizes = {"rounds": cfg.rounds, "warmup": cfg.warmup, **dataclasses.asdict(cfg.lengths)}
    if scaling:
        sizes.update(scaling_rounds=cfg.scaling_rounds, scaling_warmup=scaling_warmup)
    prov = provenance(model, seeds=None, sample_sizes=sizes,
                      command=command, protocol=TEACHER, hf_protocol=HF_PROTOCOL, load_average=load,
                      threads=torch.get_num_threads(), **extra)
    notes = [
        f"Protocol: {TEACHER}; {cfg.lengths.prompt_words}-word synthetic prompts, "
        f"{cfg.lengths.content_tokens} content tokens per call. hf arm: {HF_PROTOCOL}.",
        "Speed-ups are medians over rounds of ratios measured side by side in the same round (arms interleaved).",
        "Bounds: tokens = tokens the baseline encodes / tokens the choreographed arm encodes (end-to-end: all "
        "forward-pass tokens; TTFT: tokens encoded before each stage's first tokens, as each executor counted them, "
        "so baseline+prefix is charged only the prompt past the prefix it reuses); passes = the same ratio of "
        "times predicted by the affine cost of one forward pass (pass_cost.md), which charges every pass its fixed "
        "part. The percentage is measured / bound.",
        "hf runs a stage's calls one after another and its TTFT counts from the stage's submission, so it includes "
        "the decodes of the calls ahead; no token or pass-cost bound counts them, so the hf arm has no TTFT bounds "
        "(its end-to-end bounds stand).",
        "TTFT = summed over sequential stages of the slowest call's time to first token. Choreographed prompt "
        "messages are encoded when created, in passes of their own, counted in end-to-end time but not in TTFT; "
        "'prefills fused' encodes them in the first pass of the call that reads them (the Runner's default).",
        _memory_note(model.spec.device, measured=bool(memory)) + " Peak KV: the store's peak rows in use x bytes "
        "per token.",
        (f"1-min load average {extra['timings_load_average'][0]:.1f} on {os.cpu_count()} cores at the end of the "
         f"timed run ({load[0]:.1f} at the end of the memory re-measurement), "
         if extra.get("timings_load_average") else
         f"1-min load average {load[0]:.1f} on {os.cpu_count()} cores at the end of the run, ")
        + f"{torch.get_num_threads()} torch threads.",
    ]
    if extra.get("timings_git_commit"):
        notes.append(f"Timings measured at commit {extra['timings_git_commit']}; memory re-measured at the commit "
                     "in the provenance below.")
    if scaling:
        notes.append(f"Scaling plots: the choreographed arm vs baseline only, {cfg.scaling_rounds} timed round(s) "
                     f"after {scaling_warmup} warm-up round(s) per point, arms interleaved within each round.")
    if cost is not None:
        notes.append(f"Pass cost used for the bounds: t(S) = {1000 * cost['fixed_s']:.1f} ms + "
                     f"{1000 * cost['per_token_s']:.2f} ms x S, measured in the same run.")
    write_table(out, name, title="Performance: choreographed vs re-encoding vs Hugging Face (teacher-forced)",
                columns=COLUMNS, rows=table_rows(figures, memory),
                data={"figures": figures, "memory": memory, "scaling": scaling, "profile": profile, "cost": cost},
                provenance=prov, notes=notes)
    titles = {"B": "tree of thoughts, V=4: proposals B", "V": "tree of thoughts, B=4: voters V",
              "A": "parallel debate, 3 rounds: agents A"}
    for axis, points in scaling.items():
        plot_scaling(out / f"scaling_{axis}.png", title=titles.get(axis, axis), axis=axis, points=points)
    return out / f"{name}.md"


def write_pass_costs(out: Path, model: Model, costs: dict, *, command: str | None = None) -> Path:
    """``pass_cost.md``/``.json``: measured pass times against the affine fit."""
    from ..provenance import provenance
    from ..report import write_table

    fit = lambda s: costs["fixed_s"] + costs["per_token_s"] * s
    rows = [[f"prefill, S={s}", f"{1000 * t:.1f} ms", f"{1000 * fit(s):.1f} ms"] for s, t in costs["prefill_s"].items()]
    rows += [[f"decode step, B={b} calls", f"{1000 * t:.1f} ms", f"{1000 * fit(b):.1f} ms"]
             for b, t in costs["decode_step_s"].items()]
    where = ("on CPU, mostly streaming the weights from memory" if model.spec.device.type == "cpu" else
             f"on {model.spec.device.type}: reading the weights, launching kernels, the host's Python")
    worst = max(costs["prefill_s"].items(), key=lambda st: abs(st[1] / fit(st[0]) - 1), default=None)
    pulled = ("" if worst is None or abs(worst[1] / fit(worst[0]) - 1) <= 0.25 else
              f" One prefill is off the fit by more than 25% (S={worst[0]}: {1000 * worst[1]:.1f} ms measured, "
              f"{1000 * fit(worst[0]):.1f} ms fitted) and pulls it: read the measured rows.")
    notes = [f"Least-squares fit over the prefills: t(S) = {1000 * costs['fixed_s']:.1f} ms + "
             f"{1000 * costs['per_token_s']:.2f} ms x S. The fixed part is paid by every forward pass ({where}), so "
             "a choreographed call that encodes a few header tokens cannot be faster than it, whatever the token "
             f"bound says.{pulled} A decode step of B calls encodes B tokens: "
             + costs.get("decode_step_method", "the mean pass of a decode of up to 8 tokens, its header and closing "
                                               "passes included (measured before the difference method)") + ".",
             f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
             f"{costs.get('threads', torch.get_num_threads())} torch threads."]
    title = f"Cost of one forward pass (choreographed engine, {costs['attention']} attention)"
    return write_table(out, "pass_cost", title=title,
                       columns=["pass", "measured (min of repeats)", "affine fit"], rows=rows, data=costs,
                       provenance=provenance(model, seeds=None, sample_sizes={"repeats": costs.get("repeats")},
                                             command=command), notes=notes)
