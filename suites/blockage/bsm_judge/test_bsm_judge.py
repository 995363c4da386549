"""Branch-solve-merge story generation: head-to-head judgements of the merged stories against the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choreo import stats
from choreo.provenance import provenance
from choreo.report import write_table

from ..conftest import logs_read

HERE = Path(__file__).resolve().parent
ALPHA = 0.05
ARMS = {"Baseline vs. Choreographed": "Choreographed",
        "Baseline vs. Choreographed + Linearization": "Choreographed + Linearization",
        "Baseline vs. Choreographed + Fine-tuning": "Choreographed + Fine-tuning"}
ROWS = list(ARMS)
OUTCOMES = ("a_win", "tie", "b_win")


def outcome_rates(h: stats.HeadToHead) -> dict[str, stats.Rate]:
    """Wilson 95% interval for each outcome's share (that outcome against the other two). Unlike a percentile
    bootstrap of the multinomial, it does not collapse to a point at 0/n or n/n (0/24: [0.0%, 13.8%])."""
    counts = {"a_win": h.a_wins, "tie": h.ties, "b_win": h.b_wins}
    return {k: stats.rate(counts[k], h.n, alpha=ALPHA) for k in OUTCOMES}


def rate_text(r: stats.Rate) -> str:
    """"0.0% [0.0, 13.8]": the share and its Wilson interval, in percent."""
    return f"{100 * r.rate:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]"


@pytest.fixture(scope="module")
def table(bsm_study, model, results_dir):
    st = bsm_study
    n = len(st["sets"])
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    results, rows = {}, []
    for row, arm in ARMS.items():
        p = paper[row]
        ref = f"{p['A Wins']} / {p['Ties']} / {p['B Wins']}"
        if arm not in st["judged"]:
            rows.append([row, "not run", "", "", "", "", "", "", ref])
            continue
        h = stats.head_to_head_from_outcomes(st["judged"][arm], seed=0)
        results[row] = h
        wilson = outcome_rates(h)
        rows.append([row, h.a_wins, h.ties, h.b_wins, h.n] + [rate_text(wilson[k]) for k in OUTCOMES] + [ref])
    notes = [f"n = {n} concept sets ({st['source']}), profile {st['profile']}; A = the baseline's merged story, "
             "B = the other condition's, same instance and seeds.",
             "Judge: the model under test (default the embedded SmolLM2-135M-Instruct; the paper used GPT-4o), greedy, "
             "asked in both orders; a win only if preferred in both orders, else a tie. An instance whose branch "
             "failed to parse has an empty story, which loses to a non-empty one (two empty stories tie).",
             "Win / tie / loss shares with Wilson 95% intervals, each outcome against the other two (a percentile "
             "bootstrap of the multinomial collapses to a point when an outcome never or always occurs); p: exact "
             "sign test of A wins against B wins, ties dropped (1 when every comparison is a tie).",
             *[f"{row}: sign test p = {h.pvalue:.2g}" for row, h in results.items()],
             st["finetune_note"]]
    data = {"n": n, "profile": st["profile"],
            "results": {row: {"a_wins": h.a_wins, "ties": h.ties, "b_wins": h.b_wins, "pvalue": h.pvalue,
                              # [rate, Wilson low, Wilson high] per outcome
                              **{k: [r.rate, r.low, r.high] for k, r in outcome_rates(h).items()},
                              # A win rate - B win rate: percentile bootstrap of the multinomial (seed 0)
                              "net_bootstrap": [h.net.estimate, h.net.low, h.net.high]}
                        for row, h in results.items()},
            "paper": paper}
    prov = provenance(model, seeds=st["seeds"], sample_sizes={"concept_sets": n}, profile=st["profile"],
                      judge=model.spec.name, logs=logs_read(results_dir / "blockage" / "bsm" / "runs"))
    out = results_dir / "blockage" / "bsm"
    write_table(out, "bsm_judge", title=f"Branch-solve-merge: head-to-head coherence judgements (n = {n})",
                columns=["Comparison", "A Wins", "Ties", "B Wins", "Total", "A Win % [95% CI]", "Tie % [95% CI]",
                         "B Win % [95% CI]", "Paper A / Ties / B"], rows=rows, data=data, provenance=prov, notes=notes)
    return {"results": results, "profile": st["profile"], "n": n, "text": (out / "bsm_judge.md").read_text()}


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_bsm_judge(table, row):
    text = table["text"]
    if row not in table["results"]:
        pytest.skip(f"{row}: not run at this profile (reported in the table notes)")
    h = table["results"][row]
    assert h.n == table["n"] and h.a_wins + h.ties + h.b_wins == h.n, text
    if table["profile"] == "smoke":
        return
    outcome = CLAIMS.get(row)
    if outcome == "baseline wins":
        assert h.a_wins > h.b_wins and h.pvalue < ALPHA, text
    elif outcome == "no detectable difference":
        assert h.pvalue >= ALPHA, text


# What the embedded model showed at `small` (n = 24, measured first; see README): the 135M judge never prefers
# the same story in both orders (pure position bias), so every comparison is a tie and the paper's baseline
# preference (31 / 16 / 3 and 28 / 16 / 6) does NOT reproduce with this judge. A stronger local judge
# (--model) is the way to test it.
CLAIMS = {
    "Baseline vs. Choreographed": "no detectable difference",
    "Baseline vs. Choreographed + Linearization": "no detectable difference",
}
