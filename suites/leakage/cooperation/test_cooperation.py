"""Table 1 (leakage): Bob's cooperation rate, baseline vs choreographed (vs fine-tuned), paired by game."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choreo import stats
from choreo.report import markdown_table, plot_rates, write_table
from choreo.workflows.prisoners import decision_token_ids

from ..conftest import (ALPHA, PARSE_NOTE, RATE_NOTE, ROWS, STRATEGY_OF, choice_counts, mean_cell, parsed_cell,
                        parsed_json, parsed_mcnemar, rate_cell, rate_json)

HERE = Path(__file__).resolve().parent
# TOST margin for "equivalent" cooperation rates. The paper's gaps before fine-tuning are 9.5-26 points, so an
# after-gap within it does not by itself show that fine-tuning closed the smallest one: the paper-profile claim pairs
# it with McNemar of fine-tuned against choreographed (the fine-tuned arm cooperates more, Holm p < ALPHA).
RATE_MARGIN = 0.10
P_MARGIN = 0.10     # TOST margin for "equivalent" P(COOPERATE) at the decision point (probability units)


COLUMNS = ["Strategy", "n", "Baseline Cooperate", "Choreographed", "Choreographed (fine-tuned)",
           "McNemar p before (Holm)", "McNemar p after (Holm)", "McNemar p fine-tuned vs choreographed (Holm)",
           "TOST p rates before", "TOST p rates after",
           "Unparsable baseline / choreographed / fine-tuned", "Cooperate among parsed: baseline",
           "Cooperate among parsed: choreographed", "Cooperate among parsed: fine-tuned",
           "McNemar p parsed pairs before (Holm)", "P(C) baseline", "P(C) choreographed", "ΔP(C) pts [95% CI]",
           "TOST p P(C)", "paper: baseline / choreographed"]


def row_results(games, s: str, ft: bool) -> dict:
    """One strategy's numbers: rates with Wilson bounds, exact McNemar, TOST on rates and on P(C)."""
    base, cho = games.bob("baseline", s), games.bob("choreographed", s)
    choice = {arm: games.bob(arm, s, "choice") for arm in ["baseline", "choreographed"] + ["finetuned"] * ft}
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
        "choices": {arm: choice_counts(c) for arm, c in choice.items()},
        "parsed": {arm: parsed_json(c) for arm, c in choice.items()},
        "mcnemar_parsed_before": parsed_mcnemar(choice["choreographed"], choice["baseline"]),
    }
    if ft:
        tuned = games.bob("finetuned", s)
        tost_after = stats.tost_paired_proportions(tuned, base, margin=RATE_MARGIN, alpha=ALPHA)
        res["finetuned"] = sum(tuned) / len(tuned)
        res["rates"]["finetuned"] = rate_json(tuned)
        res["mcnemar_after"] = stats.mcnemar_exact(tuned, base).pvalue
        res["mcnemar_recovery"] = stats.mcnemar_exact(tuned, cho).pvalue
        res["tost_rate_after"] = tost_after.pvalue
        res["tost_rate_after_ci"] = [tost_after.low, tost_after.high]
        res["mcnemar_parsed_after"] = parsed_mcnemar(choice["finetuned"], choice["baseline"])
        if s in games.finetune_chosen:
            res["finetune_checkpoint"] = games.finetune_chosen[s]
    return res


def add_holm(results: dict, key: str) -> None:
    """Holm-adjust ``results[row][key]`` (a p-value, or a dict with "pvalue") across the strategies into
    ``results[row][key + '_holm']``."""
    raw = {row: res[key]["pvalue"] if isinstance(res[key], dict) else res[key] for row, res in results.items()}
    for row, p in stats.holm_by_name(raw, alpha=ALPHA).items():
        results[row][f"{key}_holm"] = p


def table_row(row: str, res: dict, cells: dict, paper_row: dict, ft: bool) -> list:
    """One line of the table: ``cells`` holds the rate and P(C) cells (they need the per-game values)."""
    ci, parsed = res["p_coop_shift_ci"], res["mcnemar_parsed_before"]
    unparsed = " / ".join(str(res["choices"][arm]["unparsable"]) if arm in res["choices"] else "-"
                          for arm in ("baseline", "choreographed", "finetuned"))
    return [row, res["n"], cells["baseline"], cells["choreographed"], cells["finetuned"] if ft else "not run",
            f"{res['mcnemar_before']:.2g} ({res['mcnemar_before_holm']:.2g})",
            f"{res['mcnemar_after']:.2g} ({res['mcnemar_after_holm']:.2g})" if ft else "-",
            f"{res['mcnemar_recovery']:.2g} ({res['mcnemar_recovery_holm']:.2g})" if ft else "-",
            f"{res['tost_rate_before']:.2g}", f"{res['tost_rate_after']:.2g}" if ft else "-",
            unparsed, cells["parsed_baseline"], cells["parsed_choreographed"],
            cells["parsed_finetuned"] if ft else "not run",
            f"{parsed['pvalue']:.2g} ({res['mcnemar_parsed_before_holm']:.2g}) of {parsed['n_pairs']}",
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
        if "mcnemar_parsed_before_holm" in res:
            parts.append(gap(res["mcnemar_parsed_before_holm"], "among parsed pairs before"))
        if "mcnemar_after" in res:
            parts += [gap(res["mcnemar_after_holm"], "after fine-tuning"),
                      gap(res["mcnemar_recovery_holm"], "between fine-tuned and choreographed"),
                      equivalence("rates after", res["tost_rate_after"])]
            if "mcnemar_parsed_after_holm" in res:
                parts.append(gap(res["mcnemar_parsed_after_holm"], "among parsed pairs after fine-tuning"))
        parts.append(equivalence("P(C) before", res["tost_p_coop_before"], P_MARGIN))
        out.append(f"{row}: " + "; ".join(parts))
    return ". ".join(out) + "."


def build(games, model, profile, results_dir) -> dict:
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    ft = "finetuned" in games.records
    results = {row: row_results(games, STRATEGY_OF[row], ft) for row in ROWS}
    add_holm(results, "mcnemar_before")
    add_holm(results, "mcnemar_parsed_before")
    if ft:
        add_holm(results, "mcnemar_after")
        add_holm(results, "mcnemar_recovery")
        add_holm(results, "mcnemar_parsed_after")
    rows = []
    arms = ["baseline", "choreographed"] + ["finetuned"] * ft
    for row in ROWS:
        s = STRATEGY_OF[row]
        cells = {arm: rate_cell(games.bob(arm, s)) for arm in arms}
        cells.update({f"parsed_{arm}": parsed_cell(games.bob(arm, s, "choice")) for arm in arms})
        cells.update({f"p_coop_{arm}": mean_cell(games.bob(arm, s, "p_cooperate"))
                      for arm in ("baseline", "choreographed")})
        rows.append(table_row(row, results[row], cells, paper[row], ft))
    notes = [
        "Baseline Cooperate, Choreographed, Choreographed (fine-tuned): Bob's sampled decision by the paper's rule "
        "(cooperate iff the text contains COOPERATE, so an unparsable decision counts as defect), the rate "
        "comparable with the paper's. " + RATE_NOTE,
        PARSE_NOTE + " Unparsable: Bob's unparsable decisions of n per arm. Cooperate among parsed: his cooperate "
        "decisions among his parsed ones, Wilson 95% interval, (cooperate/parsed); each arm's denominator is its own "
        "parsed games, so these rates are not paired.",
        f"McNemar p: exact McNemar on games paired by seed and turn order, choreographed (before) or fine-tuned "
        f"(after) vs baseline, and fine-tuned vs choreographed (did fine-tuning move the choreographed arm?); raw, and "
        f"in parentheses Holm-adjusted across the {len(ROWS)} strategies (each comparison adjusted separately). "
        f"McNemar p parsed pairs: the same test on cooperate-among-parsed, restricted to "
        f"the games whose decisions parse in both arms (a smaller population, selected by parsing, which may itself "
        f"depend on the arm), 'of' that many pairs, Holm across the {len(ROWS)} strategies. TOST p: equivalence "
        f"within ±{100 * RATE_MARGIN:.0f} rate points (paired proportions, Bonett-Price; paper-style rates) and "
        f"within ±{100 * P_MARGIN:.0f} points of P(C) (paired t), alpha {ALPHA}, per row and not adjusted "
        "(equivalence in every row at once needs no adjustment; a claim about one chosen row would).",
        "P(C): Bob's probability of COOPERATE vs DEFECT at the decision point (first token after the forced prefix), "
        "mean over games; ΔP(C): paired mean difference choreographed - baseline, t interval. "
        + p_coop_note(games, model),
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


def p_coop_note(games, model) -> str:
    """What P(C) compares, with Bob's mean mass on the two tokens per arm (``decision_mass`` in the log)."""
    mass = {}
    for arm in ("baseline", "choreographed", "leak_system", "leak_plan"):
        if arm in games.records:
            values = [m for s in games.records[arm] for m in games.bob(arm, s, "decision_mass")]
            mass[arm] = f"{100 * sum(values) / len(values):.0f}%"
    tokens = ""
    if model is not None:
        ids = decision_token_ids(model.tokenizer)
        tokens = " (" + " and ".join(repr(model.tokenizer.decode([i])) for i in ids) + " for this model)"
    return (f"P(C) compares only the first tokens of COOPERATE and DEFECT after the prefix{tokens}, so it is not the "
            "probability of a parsed cooperate decision: on the embedded SmolLM2, 'CO' also begins misspellings that "
            "parse as unparsable ('COPERATE\"}', 'COPE}'), and lower- or title-case 'defect' begins with other "
            f"tokens ('def', 'Def'). Bob's mean probability mass on the two tokens: {mass}.")


def run_notes(games) -> list[str]:
    out = [f"Wall time per arm for the games played in this session (s; 0.0: every game was resumed from the games "
           f"log, played earlier: the provenance names the code that computed the logged games; shared 2-core CPU, "
           f"inflated by contention): {games.wall_s}.",
           f"Game caps: plan {games.config.plan_tokens}, message {games.config.message_tokens}, decision "
           f"{games.config.decision_tokens} tokens; T = {games.config.temperature}, top-p {games.config.top_p}.",
           f"Empty baseline plans: {games.empty_plans()} of {2 * sum(map(len, games.records['baseline'].values()))} "
           f"(the paired games teacher-force them as empty turns; records name each plan's source in plan_source, "
           f"and games logged before it was recorded sampled a fresh plan for an empty one)."]
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
    for arm, counts in res["choices"].items():  # every decision is cooperate, defect or unparsable, and reported
        assert sum(counts.values()) == res["n"], f"{row} {arm}: {counts}\n{text}"
        assert res["rates"][arm]["successes"] >= counts["cooperate"], f"{row} {arm}: paper's rule counts fewer\n{text}"
    if table["profile"] == "paper":
        # The paper: choreographed Bob cooperates less than baseline before fine-tuning; fine-tuning closes the gap:
        # the fine-tuned arm cooperates more than the choreographed one, and within ±RATE_MARGIN of baseline (TOST).
        assert res["choreographed"] < res["baseline"], f"{row}: choreographed does not cooperate less\n{text}"
        assert res["mcnemar_before_holm"] < ALPHA, f"{row}: no difference before fine-tuning\n{text}"
        if table["ft"]:
            assert res["finetuned"] > res["choreographed"], f"{row}: fine-tuning did not raise cooperation\n{text}"
            assert res["mcnemar_recovery_holm"] < ALPHA, f"{row}: fine-tuned vs choreographed not detected\n{text}"
            assert res["tost_rate_after"] < ALPHA, f"{row}: not equivalent within ±{RATE_MARGIN} after FT\n{text}"
    elif table["profile"] == "small":
        # Regression checks against the committed small run (README). McNemar detected no gap there; that is
        # not an equivalence claim (the rate TOST did not show equivalence within ±RATE_MARGIN, and is not
        # asserted). The decision probability P(C) was shown equivalent within ±P_MARGIN (TOST).
        assert res["mcnemar_before_holm"] >= ALPHA, (
            f"{row}: McNemar now detects a cooperation gap (Holm p < {ALPHA}); the committed small run detected "
            f"none\n{text}")
        assert res["tost_p_coop_before"] < ALPHA, f"{row}: P(C) not shown equivalent within ±{P_MARGIN} (TOST)\n{text}"
        # Nor among the games whose decisions parse in both arms (21-23 pairs per strategy, Holm p 1).
        assert res["mcnemar_parsed_before_holm"] >= ALPHA, (
            f"{row}: McNemar now detects a gap among parsed pairs (Holm p < {ALPHA}); the committed small run detected "
            f"none\n{text}")
