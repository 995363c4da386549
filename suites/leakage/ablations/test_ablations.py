"""Table 2 (leakage ablations): each copy of a public message the other agent sees is encoded seeing exactly
one channel of its author: the system prompt only (Leak System) or the plan only (Leak Plan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choreo import stats
from choreo.report import markdown_table, plot_rates, write_table

from ..conftest import (ALPHA, ARM_NAMES, PARSE_NOTE, RATE_NOTE, ROWS, STRATEGY_OF, choice_counts, mean_cell,
                        parsed_cell, parsed_json, parsed_mcnemar, rate_cell, rate_json)
from ..cooperation.test_cooperation import P_MARGIN, RATE_MARGIN, p_coop_note, run_notes

HERE = Path(__file__).resolve().parent
ARMS = ("baseline", "choreographed", "leak_system", "leak_plan")
ABLATIONS = ("choreographed", "leak_system", "leak_plan")


@pytest.fixture(scope="module")
def table(games, model, profile, results_dir):
    return build(games, model, profile, results_dir)


def build(games, model, profile, results_dir) -> dict:
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    results, rows = {}, []
    for row in ROWS:
        s = STRATEGY_OF[row]
        base, pb = games.bob("baseline", s), games.bob("baseline", s, "p_cooperate")
        cb = games.bob("baseline", s, "choice")
        res = {"n": len(base)}
        for arm in ABLATIONS:
            x, px, cx = games.bob(arm, s), games.bob(arm, s, "p_cooperate"), games.bob(arm, s, "choice")
            shift = stats.paired_mean_difference(px, pb, alpha=ALPHA)
            res[arm] = {"rate": sum(x) / len(x), "wilson": rate_json(x),
                        "choices": choice_counts(cx), "parsed": parsed_json(cx),
                        "mcnemar": stats.mcnemar_exact(x, base).pvalue,
                        "mcnemar_parsed": parsed_mcnemar(cx, cb),
                        "tost_rate": stats.tost_paired_proportions(x, base, margin=RATE_MARGIN, alpha=ALPHA).pvalue,
                        "p_coop": sum(px) / len(px), "shift": shift.mean_difference,
                        "shift_ci": [shift.low, shift.high],
                        "shift_p": shift.t_pvalue,
                        "tost_p_coop": stats.tost_paired_means(px, pb, margin=P_MARGIN, alpha=ALPHA).pvalue}
        res["baseline"] = {"rate": sum(base) / len(base), "wilson": rate_json(base), "p_coop": sum(pb) / len(pb),
                           "choices": choice_counts(cb), "parsed": parsed_json(cb)}
        results[row] = res
    holm = stats.holm_by_name({(row, arm): results[row][arm]["shift_p"] for row in ROWS for arm in ABLATIONS},
                              alpha=ALPHA)
    for (row, arm), p in holm.items():
        results[row][arm]["shift_p_holm"] = p
    for row in ROWS:
        s, res = STRATEGY_OF[row], results[row]
        rows.append([row, res["n"]] + [rate_cell(games.bob(a, s)) for a in ARMS]
                    + [" / ".join(str(res[a]["choices"]["unparsable"]) for a in ARMS),
                       " / ".join(parsed_cell(games.bob(a, s, "choice"), interval=False) for a in ARMS)]
                    + [mean_cell(games.bob(a, s, "p_cooperate")) for a in ARMS]
                    + [f"{100 * res[a]['shift']:+.1f} [{100 * res[a]['shift_ci'][0]:+.1f}, "
                       f"{100 * res[a]['shift_ci'][1]:+.1f}] (Holm p {res[a]['shift_p_holm']:.2g})" for a in ABLATIONS]
                    + [" / ".join(paper[row][a].split(" ")[0] for a in ARMS)])
    columns = (["Strategy", "n"] + [f"{ARM_NAMES[a]} Cooperate" if a == "baseline" else ARM_NAMES[a] for a in ARMS]
               + ["Unparsable " + " / ".join(ARM_NAMES[a] for a in ARMS),
                  "Cooperate among parsed " + " / ".join(ARM_NAMES[a] for a in ARMS)]
               + [f"P(C) {ARM_NAMES[a]}" for a in ARMS] + [f"ΔP(C) {ARM_NAMES[a]} pts" for a in ABLATIONS]
               + ["paper: " + " / ".join(ARM_NAMES[a] for a in ARMS)])
    notes = [
        "Do better than the original: each ablation's copy attends to exactly the channel it names -- the author's "
        "system prompt alone, or the author's plan re-encoded alone -- never to the original cached message.",
        "Rate columns: Bob's sampled decision by the paper's rule (cooperate iff the text contains COOPERATE, so an "
        "unparsable decision counts as defect). " + RATE_NOTE,
        PARSE_NOTE + " Unparsable: Bob's unparsable decisions of n per arm. Cooperate among parsed: his cooperate "
        "decisions among his parsed ones (cooperate/parsed; Wilson intervals in the JSON); each arm's denominator is "
        "its own parsed games.",
        "P(C): Bob's probability of COOPERATE at the decision point; ΔP(C): paired mean difference vs baseline "
        f"(t interval), its p Holm-adjusted across the {len(holm)} comparisons. " + p_coop_note(games, model),
        "Sampled rates vs baseline, per arm (not in the table; raw p-values, not adjusted): exact McNemar p and TOST "
        f"p for equivalence within ±{100 * RATE_MARGIN:.0f} pts on the paper-style rates, and exact McNemar p on "
        "cooperate-among-parsed restricted to the games whose decisions parse in both arms ('parsed', with that "
        "number of pairs; a population selected by parsing) (a large McNemar p alone is not evidence of no "
        "difference): " + rate_tests(results) + ".",
    ] + run_notes(games)
    folder = Path(results_dir) / "leakage" / "ablations"
    write_table(folder, "ablations", title="Table 2: ablations -- which channel leaks (Bob's cooperation)",
                columns=columns, rows=rows, data=results, provenance=games.provenance(model, profile), notes=notes)
    groups = {row: {ARM_NAMES[a]: _interval(games.bob(a, STRATEGY_OF[row], "p_cooperate")) for a in ARMS}
              for row in ROWS}
    plot_rates(folder / "ablations.png", title="Bob's P(COOPERATE) at the decision point", groups=groups,
               ylabel="mean P(COOPERATE)")
    return {"results": results, "text": markdown_table(columns, rows) + "\n" + "\n".join(notes), "profile": profile}


def rate_tests(results: dict) -> str:
    """Per strategy and arm: "Leak Plan McNemar 0.25 / TOST 0.43 / parsed 0.5 of 60"."""
    def arm(res, a):
        parsed = res[a]["mcnemar_parsed"]
        return (f"{ARM_NAMES[a]} McNemar {res[a]['mcnemar']:.2g} / TOST {res[a]['tost_rate']:.2g} / parsed "
                f"{parsed['pvalue']:.2g} of {parsed['n_pairs']}")
    return "; ".join(f"{row}: " + ", ".join(arm(res, a) for a in ABLATIONS) for row, res in results.items())


def _interval(values):
    mean = sum(values) / len(values)
    if len(set(values)) < 2:
        return (mean, mean, mean)
    d = stats.paired_mean_difference(values, [0.0] * len(values), alpha=ALPHA)
    return (mean, d.low, d.high)


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_ablations(table, row):
    res, text = table["results"][row], table["text"]
    for arm in ABLATIONS:
        assert 0 <= res[arm]["rate"] <= 1 and 0 <= res[arm]["shift_p_holm"] <= 1, text
    if table["profile"] == "paper" and row == "Always Defect":
        # The paper's ordering for Always Defect: both single-channel leaks lower Bob's cooperation below baseline.
        for arm in ("leak_system", "leak_plan"):
            assert res[arm]["rate"] < res["baseline"]["rate"] and res[arm]["mcnemar"] < ALPHA, f"{arm}\n{text}"
    elif table["profile"] == "small":
        CLAIMS_SMALL[row](res, text)


def _small_claim(res, text):
    """Regression check against the committed small run (README): McNemar detected no gap in sampled rates there.
    Not an equivalence claim: the rate TOST (reported in the notes) does not show equivalence at n = 32."""
    for arm in ABLATIONS:
        assert res[arm]["mcnemar"] >= ALPHA, (
            f"{arm}: McNemar now detects a gap in Bob's cooperation rate (p < {ALPHA}); the committed small run "
            f"detected none\n{text}")


CLAIMS_SMALL = {row: _small_claim for row in ROWS}
