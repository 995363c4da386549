"""Table 1 (leakage): Bob's cooperation rate, baseline vs choreographed (vs fine-tuned), paired by game."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choreo import stats
from choreo.report import markdown_table, plot_rates, write_table

from ..conftest import ALPHA, RATE_NOTE, ROWS, STRATEGY_OF, mean_cell, rate_cell, rate_json

HERE = Path(__file__).resolve().parent
RATE_MARGIN = 0.10  # TOST margin for "equivalent" cooperation rates (the paper's gaps are 9.5-26 points)
P_MARGIN = 0.10     # TOST margin for "equivalent" P(COOPERATE) at the decision point (probability units)


COLUMNS = ["Strategy", "n", "Baseline Cooperate", "Choreographed", "Choreographed (fine-tuned)",
           "McNemar p before (Holm)", "McNemar p after (Holm)", "TOST p rates before", "TOST p rates after",
           "P(C) baseline", "P(C) choreographed", "ΔP(C) pts [95% CI]", "TOST p P(C)",
           "paper: baseline / choreographed"]


def row_results(games, s: str, ft: bool) -> dict:
    """One strategy's numbers: rates with Wilson bounds, exact McNemar, TOST on rates and on P(C)."""
    base, cho = games.bob("baseline", s), games.bob("choreographed", s)
    pb, pc = games.bob("baseline", s, "p_cooperate"), games.bob("choreographed", s, "p_cooperate")
    shift = stats.paired_mean_difference(pc, pb, alpha=ALPHA)
    tost_before = stats.tost_paired_proportions(cho, base, margin=RATE_MARGIN, alpha=ALPHA)
    res = {
        "n": len(base),
        "baseline": stats.rate(sum(base), len(base)).rate, "choreographed": stats.rate(sum(cho), len(cho)).rate,
        "rates": {"baseline": rate_json(base), "choreographed": rate_json(cho)},
        "mcnemar_before": stats.mcnemar_exact(cho, base).pvalue,
        "tost_rate_before": tost_before.pvalue, "tost_rate_before_ci": [tost_before.low, tost_before.high],
        "p_coop_baseline": sum(pb) / len(pb), "p_coop_choreographed": sum(pc) / len(pc),
        "p_coop_shift": shift.mean_difference, "p_coop_shift_ci": [shift.low, shift.high],
        "p_coop_shift_p": shift.t_pvalue,
        "tost_p_coop_before": stats.tost_paired_means(pc, pb, margin=P_MARGIN, alpha=ALPHA).pvalue,
    }
    if ft:
        tuned = games.bob("finetuned", s)
        tost_after = stats.tost_paired_proportions(tuned, base, margin=RATE_MARGIN, alpha=ALPHA)
        res["finetuned"] = sum(tuned) / len(tuned)
        res["rates"]["finetuned"] = rate_json(tuned)
        res["mcnemar_after"] = stats.mcnemar_exact(tuned, base).pvalue
        res["tost_rate_after"] = tost_after.pvalue
        res["tost_rate_after_ci"] = [tost_after.low, tost_after.high]
        if s in games.finetune_chosen:
            res["finetune_checkpoint"] = games.finetune_chosen[s]
    return res


def add_holm(results: dict, key: str) -> None:
    """Holm-adjust ``results[row][key]`` across the strategies into ``results[row][key + '_holm']``."""
    holm = stats.adjust_pvalues([results[r][key] for r in results], method="holm", alpha=ALPHA).adjusted
    for row, p in zip(results, holm):
        results[row][f"{key}_holm"] = float(p)


def table_row(row: str, res: dict, cells: dict, paper_row: dict, ft: bool) -> list:
    """One line of the table: ``cells`` holds the rate and P(C) cells (they need the per-game values)."""
    ci = res["p_coop_shift_ci"]
    return [row, res["n"], cells["baseline"], cells["choreographed"], cells["finetuned"] if ft else "not run",
            f"{res['mcnemar_before']:.2g} ({res['mcnemar_before_holm']:.2g})",
            f"{res['mcnemar_after']:.2g} ({res['mcnemar_after_holm']:.2g})" if ft else "-",
            f"{res['tost_rate_before']:.2g}", f"{res['tost_rate_after']:.2g}" if ft else "-",
            cells["p_coop_baseline"], cells["p_coop_choreographed"],
            f"{100 * res['p_coop_shift']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]",
            f"{res['tost_p_coop_before']:.2g}", f"{paper_row['baseline']} / {paper_row['choreographed']}"]


def verdicts(results: dict) -> str:
    """What the tests support per strategy, in words that do not read a large p-value as equivalence."""
    def equivalence(what, p, margin=RATE_MARGIN):
        shown = "equivalent" if p < ALPHA else "not shown equivalent"
        return f"{what} {shown} within ±{100 * margin:.0f} pts (TOST p = {p:.2g})"

    def gap(p, when):
        return (f"gap {when} detected by McNemar (Holm p = {p:.2g})" if p < ALPHA else
                f"no gap {when} detected by McNemar (Holm p = {p:.2g})")

    out = []
    for row, res in results.items():
        parts = [gap(res["mcnemar_before_holm"], "before"), equivalence("rates before", res["tost_rate_before"])]
        if "mcnemar_after" in res:
            parts += [gap(res["mcnemar_after_holm"], "after fine-tuning"),
                      equivalence("rates after", res["tost_rate_after"])]
        parts.append(equivalence("P(C) before", res["tost_p_coop_before"], P_MARGIN))
        out.append(f"{row}: " + "; ".join(parts))
    return ". ".join(out) + "."


def build(games, model, profile, results_dir) -> dict:
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    ft = "finetuned" in games.records
    results = {row: row_results(games, STRATEGY_OF[row], ft) for row in ROWS}
    add_holm(results, "mcnemar_before")
    if ft:
        add_holm(results, "mcnemar_after")
    rows = []
    for row in ROWS:
        s = STRATEGY_OF[row]
        cells = {arm: rate_cell(games.bob(arm, s)) for arm in ["baseline", "choreographed"] + ["finetuned"] * ft}
        cells.update({f"p_coop_{arm}": mean_cell(games.bob(arm, s, "p_cooperate"))
                      for arm in ("baseline", "choreographed")})
        rows.append(table_row(row, results[row], cells, paper[row], ft))
    notes = [
        "Bob's sampled decision (cooperate iff the text contains COOPERATE). " + RATE_NOTE,
        f"McNemar p: exact McNemar on games paired by seed and turn order, choreographed (before) or fine-tuned "
        f"(after) vs baseline; raw, and in parentheses Holm-adjusted across the {len(ROWS)} strategies (before and "
        f"after adjusted separately). TOST p: equivalence within ±{100 * RATE_MARGIN:.0f} rate points (paired "
        f"proportions, Bonett-Price) and within ±{100 * P_MARGIN:.0f} points of P(C) (paired t), alpha {ALPHA}, "
        "per row and not adjusted (equivalence in every row at once needs no adjustment; a claim about one chosen "
        "row would).",
        "P(C): Bob's probability of COOPERATE vs DEFECT at the decision point (first token after the forced prefix), "
        "mean over games; ΔP(C): paired mean difference choreographed - baseline, t interval.",
        "What the tests support (a large McNemar p is not evidence of no difference): " + verdicts(results),
        games.finetune_note,
    ] + run_notes(games)
    prov = games.provenance(model, profile)
    folder = Path(results_dir) / "leakage" / "cooperation"
    write_table(folder, "cooperation", title="Table 1: Bob's cooperation rate (prisoner's dilemma, leakage)",
                columns=COLUMNS, rows=rows, data=results, provenance=prov, notes=notes)
    groups = {}
    for row in ROWS:
        s = STRATEGY_OF[row]
        groups[row] = {}
        for arm in ["baseline", "choreographed"] + (["finetuned"] if ft else []):
            r = stats.rate(sum(games.bob(arm, s)), len(games.bob(arm, s)))
            groups[row][arm] = (r.rate, r.low, r.high)
    plot_rates(folder / "cooperation.png", title="Bob cooperates", groups=groups, ylabel="cooperation rate")
    return {"results": results, "text": markdown_table(COLUMNS, rows) + "\n" + "\n".join(notes), "ft": ft}


def run_notes(games) -> list[str]:
    out = [f"Wall time per arm for the games played in this session (s; 0.0: every game was resumed from the games "
           f"log, played earlier: the provenance names the code that computed the logged games; shared 2-core CPU, "
           f"inflated by contention): {games.wall_s}.",
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
        # Regression checks against the committed small run (README). McNemar detected no gap there; that is
        # not an equivalence claim (the rate TOST did not show equivalence within ±RATE_MARGIN, and is not
        # asserted). The decision probability P(C) was shown equivalent within ±P_MARGIN (TOST).
        assert res["mcnemar_before_holm"] >= ALPHA, (
            f"{row}: McNemar now detects a cooperation gap (Holm p < {ALPHA}); the committed small run detected "
            f"none\n{text}")
        assert res["tost_p_coop_before"] < ALPHA, f"{row}: P(C) not shown equivalent within ±{P_MARGIN} (TOST)\n{text}"
