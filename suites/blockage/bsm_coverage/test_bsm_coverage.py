"""Branch-solve-merge story generation: concept coverage of the merged story by condition (blockage at the merge)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from choreo import stats
from choreo.provenance import provenance
from choreo.report import plot_rates, write_table

from ..conftest import logs_read

HERE = Path(__file__).resolve().parent
ALPHA = 0.05
ROWS = ["Baseline", "Choreographed", "Choreographed + Linearization", "Choreographed + Fine-tuning"]


def _mean_pm(xs):
    xs = np.asarray(xs, dtype=float)
    half = 1.96 * xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return float(xs.mean()), float(half)


def _cell(xs):
    m, h = _mean_pm(xs)
    return f"{100 * m:.2f} ± {100 * h:.2f}"


@pytest.fixture(scope="module")
def table(bsm_study, model, results_dir):
    st = bsm_study
    runs, n = st["runs"], len(st["sets"])
    measured = [r for r in ROWS if r in runs]

    def series(row, method, part):
        rs = runs[row]
        if part == "all":
            return [r["coverage"][method] for r in rs]
        return [r["group_coverage"][method][part] for r in rs]

    tests = {
        "Choreographed - Baseline coverage": stats.paired_mean_difference(series("Choreographed", "word", "all"),
                                                                          series("Baseline", "word", "all")),
        "Linearization - Baseline coverage": stats.paired_mean_difference(
            series("Choreographed + Linearization", "word", "all"), series("Baseline", "word", "all")),
        "Linearization Group 2 - Group 1": stats.paired_mean_difference(
            series("Choreographed + Linearization", "word", 1), series("Choreographed + Linearization", "word", 0)),
    }
    holm = dict(zip(tests, stats.adjust_pvalues([t.t_pvalue for t in tests.values()], method="holm",
                                                alpha=ALPHA).adjusted.tolist()))
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    rows = []
    for row in ROWS:
        p = paper[row]
        ref = f"{p['Avg Coverage']:.1f} / {p['Group1']:.1f} / {p['Group 2']:.1f}"
        if row not in runs:
            rows.append([row, "not run", "not run", "not run", "not run", ref])
            continue
        parsed = sum(r["parsed"] for r in runs[row])
        rows.append([row, _cell(series(row, "word", "all")), _cell(series(row, "word", 0)),
                     _cell(series(row, "word", 1)), _cell(series(row, "substring", "all")) + f" ({parsed}/{n} parsed)",
                     ref])
    notes = [f"n = {n} concept sets ({st['source']}), profile {st['profile']}; sampling T = {st['config'].temperature}, "
             f"seeds {st['seeds'][0]}..{st['seeds'][-1]} paired across conditions; token caps (branch, solve, merge) = "
             f"{st['sizes']['tokens']}.",
             "Coverage in %, mean ± 1.96 SE over concept sets; Avg/Group columns use whole-word matching with "
             "regular inflections, the 'substring' column the original plain substring match. A branch answer "
             "that does not parse scores 0 (parse counts in brackets).",
             *[f"{name}: difference {t.mean_difference:+.3f} [{t.low:+.3f}, {t.high:+.3f}], paired t p = {t.t_pvalue:.2g}, "
               f"Holm p = {holm[name]:.2g}" for name, t in tests.items()],
             st["finetune_note"],
             f"Wall time in this session {st['wall_s']:.0f} s for all conditions and judging (records already logged "
             f"in runs/ are reused, not recomputed; shared, contended CPU: not a benchmark)."]
    data = {"n": n, "profile": st["profile"], "source": st["source"], "config": str(st["config"]),
            "coverage": {row: {f"{method}/{part}": _mean_pm(series(row, method, part))
                               for method in ("word", "substring") for part in ("all", 0, 1)} for row in measured},
            "parsed": {row: sum(r["parsed"] for r in runs[row]) for row in measured},
            "tests": {name: {"difference": t.mean_difference, "low": t.low, "high": t.high, "pvalue": t.t_pvalue,
                             "holm": holm[name]} for name, t in tests.items()},
            "paper": paper, "records": f"runs/*-{st['key']}.jsonl", "wall_s": st["wall_s"]}
    prov = provenance(model, seeds=st["seeds"], sample_sizes={"concept_sets": n}, profile=st["profile"],
                      logs=logs_read(results_dir / "blockage" / "bsm" / "runs"))
    out = results_dir / "blockage" / "bsm"
    write_table(out, "bsm_coverage", title=f"Branch-solve-merge: concept coverage of the merged story (%, n = {n})",
                columns=["Implementation", "Avg Coverage", "Group1", "Group 2", "Avg (substring)",
                         "Paper Avg / G1 / G2"], rows=rows, data=data, provenance=prov, notes=notes)

    def bar(xs):
        m, h = _mean_pm(xs)
        return (m, max(0.0, m - h), min(1.0, m + h))

    plot_rates(out / "bsm_coverage.png", title=f"Branch-solve-merge coverage (n = {n})", ylabel="coverage",
               groups={g: {row: bar(series(row, "word", part)) for row in measured}
                       for g, part in (("all", "all"), ("group 1", 0), ("group 2", 1))})
    return {"runs": runs, "tests": tests, "holm": holm, "profile": st["profile"], "n": n,
            "text": (out / "bsm_coverage.md").read_text()}


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_bsm_coverage(table, row):
    text = table["text"]
    if row not in table["runs"]:
        pytest.skip(f"{row}: not run at this profile (reported in the table notes)")
    rs = table["runs"][row]
    assert len(rs) == table["n"], text
    assert all(0 <= r["coverage"][m] <= 1 for r in rs for m in ("word", "substring")), text
    assert all((r["merged"] != "") == r["parsed"] or not r["parsed"] for r in rs), text
    if table["profile"] == "smoke":
        return
    claims = CLAIMS.get(row, ())
    for name, direction in claims:
        t = table["tests"][name]
        if direction == "less":
            assert t.mean_difference < 0 and table["holm"][name] < ALPHA, f"{name}\n{text}"
        elif direction == "greater":
            assert t.mean_difference > 0 and table["holm"][name] < ALPHA, f"{name}\n{text}"
        else:  # "not detected": the paper's difference does not reproduce on this model at this size
            assert table["holm"][name] >= ALPHA, f"{name}\n{text}"


# What the embedded model showed at `small` (n = 24, measured first; see README), row -> [(test, outcome)].
# The paper: choreographed coverage 18 points below baseline, and linearization favouring group 1 (80.5 vs
# 53.0). SmolLM2-135M keeps only ~5% of the concepts in any merge, so no coverage gap is detectable, and its
# position bias runs the other way: the later story's concepts survive the merge (recency), as in the baseline.
CLAIMS = {
    "Choreographed": [("Choreographed - Baseline coverage", "not detected")],
    "Choreographed + Linearization": [("Linearization - Baseline coverage", "not detected"),
                                      ("Linearization Group 2 - Group 1", "greater")],
}
