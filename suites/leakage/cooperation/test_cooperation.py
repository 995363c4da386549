"""Table 1 (leakage): Bob's cooperation rate, baseline vs choreographed (vs fine-tuned), paired by game."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choreo import stats
from choreo.report import markdown_table, plot_rates, write_table

from ..conftest import ALPHA, ROWS, STRATEGY_OF, mean_cell, rate_cell

HERE = Path(__file__).resolve().parent
RATE_MARGIN = 0.10  # TOST margin for "equivalent" cooperation rates (the paper's gaps are 9.5-26 points)
P_MARGIN = 0.10     # TOST margin for "equivalent" P(COOPERATE) at the decision point (probability units)


def build(games, model, profile, results_dir) -> dict:
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    ft = "finetuned" in games.records
    results, rows = {}, []
    for row in ROWS:
        s = STRATEGY_OF[row]
        base, cho = games.bob("baseline", s), games.bob("choreographed", s)
        pb, pc = games.bob("baseline", s, "p_cooperate"), games.bob("choreographed", s, "p_cooperate")
        shift = stats.paired_mean_difference(pc, pb, alpha=ALPHA)
        res = {
            "n": len(base),
            "baseline": stats.rate(sum(base), len(base)).rate, "choreographed": stats.rate(sum(cho), len(cho)).rate,
            "mcnemar_before": stats.mcnemar_exact(cho, base).pvalue,
            "tost_rate_before": stats.tost_paired_proportions(cho, base, margin=RATE_MARGIN, alpha=ALPHA).pvalue,
            "p_coop_baseline": sum(pb) / len(pb), "p_coop_choreographed": sum(pc) / len(pc),
            "p_coop_shift": shift.mean_difference, "p_coop_shift_ci": [shift.low, shift.high],
            "p_coop_shift_p": shift.t_pvalue,
            "tost_p_coop_before": stats.tost_paired_means(pc, pb, margin=P_MARGIN, alpha=ALPHA).pvalue,
        }
        if ft:
            tuned = games.bob("finetuned", s)
            res["finetuned"] = sum(tuned) / len(tuned)
            res["mcnemar_after"] = stats.mcnemar_exact(tuned, base).pvalue
            res["tost_rate_after"] = stats.tost_paired_proportions(tuned, base, margin=RATE_MARGIN, alpha=ALPHA).pvalue
        results[row] = res
    holm = stats.adjust_pvalues([results[r]["mcnemar_before"] for r in ROWS], method="holm", alpha=ALPHA).adjusted
    for row, p in zip(ROWS, holm):
        results[row]["mcnemar_before_holm"] = float(p)
    for row in ROWS:
        s, res = STRATEGY_OF[row], results[row]
        rows.append([
            row, res["n"], rate_cell(games.bob("baseline", s)), rate_cell(games.bob("choreographed", s)),
            rate_cell(games.bob("finetuned", s)) if ft else "not run",
            f"{res['mcnemar_before']:.2g} (Holm {res['mcnemar_before_holm']:.2g})",
            f"{res['mcnemar_after']:.2g}" if ft else "-",
            mean_cell(games.bob("baseline", s, "p_cooperate")), mean_cell(games.bob("choreographed", s, "p_cooperate")),
            f"{100 * res['p_coop_shift']:+.1f} [{100 * res['p_coop_shift_ci'][0]:+.1f}, "
            f"{100 * res['p_coop_shift_ci'][1]:+.1f}]",
            f"{paper[row]['baseline']} / {paper[row]['choreographed']}",
        ])
    columns = ["Strategy", "n", "Baseline Cooperate", "Choreographed", "Choreographed (fine-tuned)",
               "p-value before", "p-value after", "P(C) baseline", "P(C) choreographed", "ΔP(C) pts [95% CI]",
               "paper: baseline / choreographed"]
    notes = [
        "Bob's sampled decision (cooperate iff the text contains COOPERATE) with Wilson 95% intervals; p-values: exact "
        f"McNemar on games paired by seed and turn order (Holm across the {len(ROWS)} strategies).",
        "P(C): Bob's probability of COOPERATE vs DEFECT at the decision point (first token after the forced prefix), "
        "mean over games; ΔP(C): paired mean difference choreographed - baseline, t interval.",
        games.finetune_note if not ft else "Fine-tuned: one adapter per Alice strategy (see README).",
    ] + run_notes(games)
    prov = games.provenance(model, profile)
    folder = Path(results_dir) / "leakage" / "cooperation"
    write_table(folder, "cooperation", title="Table 1: Bob's cooperation rate (prisoner's dilemma, leakage)",
                columns=columns, rows=rows, data=results, provenance=prov, notes=notes)
    groups = {}
    for row in ROWS:
        s = STRATEGY_OF[row]
        groups[row] = {}
        for arm in ["baseline", "choreographed"] + (["finetuned"] if ft else []):
            r = stats.rate(sum(games.bob(arm, s)), len(games.bob(arm, s)))
            groups[row][arm] = (r.rate, r.low, r.high)
    plot_rates(folder / "cooperation.png", title="Bob cooperates", groups=groups, ylabel="cooperation rate")
    return {"results": results, "text": markdown_table(columns, rows) + "\n" + "\n".join(notes), "ft": ft}


def run_notes(games) -> list[str]:
    out = [f"Wall time per arm for the games played in this session (s; 0.0: every game was resumed from the games "
           f"log, played earlier by the same code; shared 2-core CPU, inflated by contention): {games.wall_s}.",
           f"Game caps: plan {games.config.plan_tokens}, message {games.config.message_tokens}, decision "
           f"{games.config.decision_tokens} tokens; T = {games.config.temperature}, top-p {games.config.top_p}."]
    if games.sizes["reduced_from"].get("games"):
        out.append(f"Reduced size: {games.sizes['games']} games per strategy instead of the profile's "
                   f"{games.sizes['reduced_from']['games']}.")
    return out


@pytest.fixture(scope="module")
def table(games, model, profile, results_dir):
    out = build(games, model, profile, results_dir)
    out["profile"] = profile
    return out


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_cooperation(table, row):
    res, text = table["results"][row], table["text"]
    assert 0 <= res["baseline"] <= 1 and 0 <= res["mcnemar_before"] <= 1, text
    if table["profile"] == "paper":
        # The paper: choreographed differs from baseline before fine-tuning; equivalent after (TOST).
        assert res["mcnemar_before_holm"] < ALPHA, f"{row}: no difference before fine-tuning\n{text}"
        if table["ft"]:
            assert res["tost_rate_after"] < ALPHA, f"{row}: not equivalent within ±{RATE_MARGIN} after FT\n{text}"
    elif table["profile"] == "small":
        # Measured on the embedded model (README): no detectable cooperation gap, and the decision probability
        # moves by less than P_MARGIN.
        assert res["mcnemar_before_holm"] >= ALPHA, f"{row}: a cooperation gap appeared\n{text}"
        assert res["tost_p_coop_before"] < ALPHA, f"{row}: P(C) shift not within ±{P_MARGIN}\n{text}"
