"""Branch-solve-merge story generation: concept coverage of the merged story by condition (blockage at the merge)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from choreo import stats
from choreo.profiles import pick
from choreo.provenance import provenance
from choreo.report import plot_rates, write_table

from ..conftest import logs_read

HERE = Path(__file__).resolve().parent
ALPHA = 0.05
ROWS = ["Baseline", "Choreographed", "Choreographed + Linearization", "Choreographed + Fine-tuning"]
# Equivalence margin for "fine-tuning recovers the baseline's coverage" (TOST, paired): 5 points of coverage, well
# inside the 18-point gap the paper reports for choreographed vs baseline.
COVERAGE_MARGIN = 0.05
RECOVERY = "Fine-tuning - Baseline coverage"


def _mean_pm(xs):
    xs = np.asarray(xs, dtype=float)
    half = 1.96 * xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return float(xs.mean()), float(half)


def _cell(xs):
    m, h = _mean_pm(xs)
    return f"{100 * m:.2f} ± {100 * h:.2f}"


# The table's paired tests: name -> ((row, part), (row, part)), the first minus the second; part "all" is the whole
# set's word coverage, 0 / 1 a branch group's.
TESTS = {
    "Choreographed - Baseline coverage": (("Choreographed", "all"), ("Baseline", "all")),
    "Linearization - Baseline coverage": (("Choreographed + Linearization", "all"), ("Baseline", "all")),
    "Linearization Group 2 - Group 1": (("Choreographed + Linearization", 1), ("Choreographed + Linearization", 0)),
}


# Reported beside the tests, outside the Holm family (no claim rests on them): the baseline's own position bias,
# and how much linearization adds to it (the difference of the two rows' Group 2 - Group 1).
REFERENCE = ("Baseline Group 2 - Group 1", "Linearization - Baseline in Group 2 - Group 1")


def references(runs: dict) -> dict:
    """The ``REFERENCE`` comparisons the runs allow (name -> ``PairedDifference``)."""
    lin, base = "Choreographed + Linearization", "Baseline"
    out = {REFERENCE[0]: stats.paired_mean_difference(series(runs, base, "word", 1), series(runs, base, "word", 0))}
    if lin in runs:
        gaps = {row: np.subtract(series(runs, row, "word", 1), series(runs, row, "word", 0)) for row in (lin, base)}
        out[REFERENCE[1]] = stats.paired_mean_difference(gaps[lin], gaps[base])
    return out


def recovery_caveat(runs: dict, margin: float) -> str | None:
    """Why fine-tuning's equivalence to the baseline within ``margin`` says nothing about recovery, or None: when
    the choreographed arm, without fine-tuning, is equivalent to the baseline within the same margin, there is no
    gap to recover (e.g. every arm near zero coverage)."""
    base, chor = series(runs, "Baseline", "word", "all"), series(runs, "Choreographed", "word", "all")
    t = stats.tost_paired_means(chor, base, margin=margin, alpha=ALPHA)
    if t.pvalue < ALPHA:
        return (f"not read as recovery: the choreographed arm without fine-tuning is equivalent to the baseline "
                f"within the same margin too (p = {t.pvalue:.2g}; baseline coverage {100 * np.mean(base):.1f}%), so "
                f"there is no gap to recover")
    return None


def series(runs: dict, row: str, method: str, part) -> list[float]:
    """Per-instance coverage of one row: the whole set's (``part="all"``) or branch group ``part``'s."""
    if part == "all":
        return [r["coverage"][method] for r in runs[row]]
    return [r["group_coverage"][method][part] for r in runs[row]]


def differing(xs: list[dict], ys: list[dict]) -> int:
    """Instances whose merged stories differ between two rows' paired records."""
    return sum(x["merged"] != y["merged"] for x, y in zip(xs, ys, strict=True))


def vacuity(runs: dict, name: str) -> str | None:
    """Why "no difference detected" in test ``name`` would say nothing, or None when the test could have seen one:
    the two rows' merged stories are the same in every instance (identical arms: the test compares a run with
    itself), or the compared coverages are equal in every instance (every paired difference is 0, so no test can
    reject).

    Example: with the choreographed records a copy of the baseline's, ``vacuity(runs, "Choreographed - Baseline
    coverage")`` says the stories are identical in all n instances.
    """
    (row_x, part_x), (row_y, part_y) = TESTS[name]
    if row_x != row_y and differing(runs[row_x], runs[row_y]) == 0:
        return f"{row_x} and {row_y} have the same merged story in all {len(runs[row_x])} instances"
    if series(runs, row_x, "word", part_x) == series(runs, row_y, "word", part_y):
        return f"the compared coverages are equal in every instance ({row_x} {part_x}, {row_y} {part_y})"
    return None


@pytest.fixture(scope="module")
def table(bsm_study, model, results_dir):
    st = bsm_study
    runs, n = st["runs"], len(st["sets"])
    measured = [r for r in ROWS if r in runs]

    tests = {name: stats.paired_mean_difference(series(runs, x, "word", part_x), series(runs, y, "word", part_y))
             for name, ((x, part_x), (y, part_y)) in TESTS.items()}
    holm = stats.holm_by_name({name: t.t_pvalue for name, t in tests.items()}, alpha=ALPHA)
    tuned = "Choreographed + Fine-tuning"
    equivalence = {} if tuned not in runs else {RECOVERY: stats.tost_paired_means(
        series(runs, tuned, "word", "all"), series(runs, "Baseline", "word", "all"), margin=COVERAGE_MARGIN,
        alpha=ALPHA)}
    caveat = recovery_caveat(runs, COVERAGE_MARGIN) if equivalence else None
    reference = references(runs)
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    rows = []
    for row in ROWS:
        p = paper[row]
        ref = f"{p['Avg Coverage']:.1f} / {p['Group1']:.1f} / {p['Group 2']:.1f}"
        if row not in runs:
            rows.append([row, "not run", "not run", "not run", "not run", ref])
            continue
        parsed = sum(r["parsed"] for r in runs[row])
        rows.append([row, *(_cell(series(runs, row, "word", part)) for part in ("all", 0, 1)),
                     _cell(series(runs, row, "substring", "all")) + f" ({parsed}/{n} parsed)", ref])
    notes = [f"n = {n} concept sets ({st['source']}), profile {st['profile']}; "
             f"sampling T = {st['config'].temperature}, "
             f"seeds {st['seeds'][0]}..{st['seeds'][-1]} paired across conditions; token caps (branch, solve, merge) = "
             f"{st['sizes']['tokens']}.",
             "Branch step: " + ("the model writes only the topic, and the two groups are the concept set's first and "
                                "second halves (BSMConfig(branch='halves'), the reduced CPU profiles)"
                                if st["config"].branch == "halves" else
                                "the model writes the topic and both concept groups in a fixed format, parsed") + ".",
             "Coverage in %, mean ± 1.96 SE over concept sets (the paper's ± matches a binomial interval over "
             "concepts instead, e.g. its baseline 81.00 ± 1.99 = 1.96 sqrt(0.81 x 0.19 / 1500) for 50 sets of 30 "
             "concepts: narrower, as it treats the concepts of one story as independent); Avg/Group columns use "
             "whole-word matching with "
             "regular inflections (the concept or the concept plus one regular suffix, regularly spelled: running, "
             "cities, danced; no irregular forms: choreo.data.concepts.inflections), the 'substring' column the "
             "original plain substring match. A branch answer that does not parse scores 0 (parse counts in brackets).",
             "Merged stories that differ from the baseline's (same instance and seeds): " + ", ".join(
                 f"{row} {differing(runs[row], runs['Baseline'])}/{n}" for row in measured if row != "Baseline") + ".",
             *[f"{name}: difference {t.mean_difference:+.3f} [{t.low:+.3f}, {t.high:+.3f}], "
               f"paired t p = {t.t_pvalue:.2g}, "
               f"Holm p = {holm[name]:.2g}" for name, t in tests.items()],
             *[f"{name} (reference, outside the Holm family): difference {t.mean_difference:+.3f} "
               f"[{t.low:+.3f}, {t.high:+.3f}], paired t p = {t.t_pvalue:.2g}" for name, t in reference.items()],
             *[f"{name}: equivalence within ±{100 * COVERAGE_MARGIN:.0f} points (paired TOST, outside the Holm "
               f"family): difference {t.difference:+.3f}, {100 * (1 - 2 * ALPHA):.0f}% interval [{t.low:+.3f}, "
               f"{t.high:+.3f}], p = {t.pvalue:.2g}: {'equivalent' if t.equivalent else 'equivalence not shown'}"
               + (f"; {caveat}" if caveat else "")
               for name, t in equivalence.items()],
             st["finetune_note"],
             f"Wall time in this session {st['wall_s']:.0f} s for all conditions and judging (records already logged "
             f"in runs/ are reused, not recomputed; shared, contended CPU: not a benchmark)."]
    data = {"n": n, "profile": st["profile"], "source": st["source"], "config": str(st["config"]),
            "coverage": {row: {f"{method}/{part}": _mean_pm(series(runs, row, method, part))
                               for method in ("word", "substring") for part in ("all", 0, 1)} for row in measured},
            "parsed": {row: sum(r["parsed"] for r in runs[row]) for row in measured},
            "differs_from_baseline": {row: differing(runs[row], runs["Baseline"]) for row in measured},
            "tests": {name: {"difference": t.mean_difference, "low": t.low, "high": t.high, "pvalue": t.t_pvalue,
                             "holm": holm[name]} for name, t in tests.items()},
            "equivalence": {name: {"difference": t.difference, "low": t.low, "high": t.high, "pvalue": t.pvalue,
                                   "margin": COVERAGE_MARGIN, "read_as_recovery": caveat is None, "caveat": caveat}
                            for name, t in equivalence.items()},
            "reference": {name: {"difference": t.mean_difference, "low": t.low, "high": t.high, "pvalue": t.t_pvalue}
                          for name, t in reference.items()},
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
               groups={g: {row: bar(series(runs, row, "word", part)) for row in measured}
                       for g, part in (("all", "all"), ("group 1", 0), ("group 2", 1))})
    return {"runs": runs, "tests": tests, "holm": holm, "equivalence": equivalence, "caveat": caveat,
            "profile": st["profile"], "n": n, "text": (out / "bsm_coverage.md").read_text()}


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_bsm_coverage(table, row):
    text = table["text"]
    if row not in table["runs"]:
        pytest.skip(f"{row}: not run at this profile (reported in the table notes)")
    rs = table["runs"][row]
    assert len(rs) == table["n"], text
    assert all(0 <= r["coverage"][m] <= 1 for r in rs for m in ("word", "substring")), text
    assert all(r["parsed"] or r["merged"] == "" for r in rs), text  # an unparsed branch leaves no story
    if table["profile"] == "smoke":
        return
    claims = pick(CLAIMS, table["profile"]).get(row, ())
    for name, direction in claims:
        if direction == "equivalent":
            e = table["equivalence"][name]
            assert table["caveat"] is None, f"{name}: {table['caveat']}\n{text}"
            assert e.pvalue < ALPHA, f"{name}: not shown equivalent within ±{COVERAGE_MARGIN}\n{text}"
            continue
        t = table["tests"][name]
        if direction == "less":
            assert t.mean_difference < 0 and table["holm"][name] < ALPHA, f"{name}\n{text}"
        elif direction == "greater":
            assert t.mean_difference > 0 and table["holm"][name] < ALPHA, f"{name}\n{text}"
        else:  # "not detected": the paper's difference does not reproduce on this model at this size
            why = vacuity(table["runs"], name)
            assert why is None, f"{name}: 'not detected' would hold whatever the conditions do: {why}\n{text}"
            assert t.t_pvalue >= ALPHA, f"{name}\n{text}"  # the raw p: Holm only makes "not detected" easier


# Profile -> row -> [(test, outcome)]. `paper`: the paper's claims (Llama-3.1-8B, n = 50): choreographed coverage
# 18 points below baseline (62.95 vs 81.00), linearization too (65.09) with group 1 favoured (80.52 vs 52.97), and
# fine-tuning back at the baseline's (81.55). `small`: what the embedded model showed (n = 24, measured first; see
# README): SmolLM2-135M keeps only ~5% of the concepts in any merge, so no coverage gap is detectable, and its
# position bias runs the other way: the later story's concepts survive the merge (recency), as in the baseline
# (``REFERENCE``: the baseline's own Group 2 - Group 1, and what linearization adds to it, not significant).
CLAIMS = {
    "smoke": {},  # mechanics only
    "small": {
        "Choreographed": [("Choreographed - Baseline coverage", "not detected")],
        "Choreographed + Linearization": [("Linearization - Baseline coverage", "not detected"),
                                          ("Linearization Group 2 - Group 1", "greater")],
    },
    "paper": {
        "Choreographed": [("Choreographed - Baseline coverage", "less")],
        "Choreographed + Linearization": [("Linearization - Baseline coverage", "less"),
                                          ("Linearization Group 2 - Group 1", "less")],
        "Choreographed + Fine-tuning": [(RECOVERY, "equivalent")],
    },
}
