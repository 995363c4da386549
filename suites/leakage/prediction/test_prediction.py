"""Table 3 (leakage, prediction): Bob predicts Alice's decision in side calls that never enter the game."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import choreo
from choreo import stats
from choreo.report import markdown_table, plot_rates, write_table
from choreo.workflows.prisoners import play

from ..conftest import ALPHA, ARM_NAMES, RATE_NOTE, ROWS as STRATEGY_ROWS, STRATEGY_OF, rate_cell, rate_json
from ..cooperation.test_cooperation import run_notes

HERE = Path(__file__).resolve().parent
MODELS = ("baseline", "choreographed", "finetuned")
COLUMNS = ("alice_cooperate", "bob_predicted_cooperate", "correct", "exploited", "defended")
ROWS = [f"{s} / {ARM_NAMES[m]}" for s in STRATEGY_ROWS for m in MODELS]


def outcomes(records) -> dict[str, list[bool]]:
    """Per game: Alice cooperates, Bob's final prediction (before deciding), and what follows from them."""
    alice = [r["cooperate"]["alice"] for r in records]
    pred = [r["predictions"][-1]["cooperate"] for r in records]
    bob = [r["cooperate"]["bob"] for r in records]
    return {"alice_cooperate": alice, "bob_predicted_cooperate": pred,
            "correct": [p == a for p, a in zip(pred, alice)],
            "exploited": [p and not b for p, b in zip(pred, bob)],  # predicts cooperate, defects
            "defended": [(not p) and (not b) for p, b in zip(pred, bob)]}  # predicts defect, defects


@pytest.fixture(scope="module")
def table(games, model, profile, results_dir):
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    n = games.sizes["predict"]
    results, rows = {}, []
    for s_row in STRATEGY_ROWS:
        s = STRATEGY_OF[s_row]
        base = outcomes(games.records["baseline"][s][:n])
        for m in MODELS:
            row = f"{s_row} / {ARM_NAMES[m]}"
            if m not in games.records:
                results[row] = None
                rows.append([s_row, ARM_NAMES[m], "-", "not run", "", "", "", "", " / ".join(map(str, paper[row]))])
                continue
            out = outcomes(games.records[m][s][:n])
            res = {c: stats.rate(sum(out[c]), n).rate for c in COLUMNS}
            res["n"] = n
            res["rates"] = {c: rate_json(out[c]) for c in COLUMNS}
            res["predictions_per_game"] = sorted({len(r["predictions"]) for r in games.records[m][s][:n]})
            if m != "baseline":
                res["mcnemar_vs_baseline"] = {c: stats.mcnemar_exact(out[c], base[c]).pvalue for c in COLUMNS}
            results[row] = res
            rows.append([s_row, ARM_NAMES[m], n] + [rate_cell(out[c]) for c in COLUMNS]
                        + [" / ".join(map(str, paper[row]))])
    columns = ["Strategy", "Model", "n", "Alice Actual Cooperate", "Bob Predicted Cooperate", "Correct", "Exploited",
               "Defended", "paper (%)"]
    notes = ["Bob's prediction: the last of his side calls (after each of his messages and before deciding), "
             "'COOPERATE' in the text; exploited = predicts cooperate and defects; defended = predicts defect and "
             "defects. Side calls never enter the game (tests/test_prisoners.py and the test below check it).",
             RATE_NOTE, games.finetune_note] + run_notes(games)
    folder = Path(results_dir) / "leakage" / "prediction"
    write_table(folder, "prediction", title="Table 3: Bob predicts Alice's decision", columns=columns, rows=rows,
                data=results, provenance=games.provenance(model, profile), notes=notes)
    groups = {}
    for s_row in STRATEGY_ROWS:
        groups[s_row] = {}
        for m in MODELS:
            if m in games.records:
                r = stats.rate(sum(outcomes(games.records[m][STRATEGY_OF[s_row]][:n])["correct"]), n)
                groups[s_row][ARM_NAMES[m]] = (r.rate, r.low, r.high)
    plot_rates(folder / "prediction.png", title="Bob predicts Alice correctly", groups=groups, ylabel="accuracy")
    return {"results": results, "text": markdown_table(columns, rows) + "\n" + "\n".join(notes), "profile": profile,
            "rounds": games.config.rounds}


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_prediction(table, row):
    res, text = table["results"][row], table["text"]
    if res is None:
        assert "not run" in text  # the fine-tuned arm's absence is stated in the table (note above)
        return
    assert res["predictions_per_game"] == [table["rounds"] + 1], f"{row}: one prediction per Bob message + 1\n{text}"
    assert res["correct"] + res["exploited"] >= 0 and all(0 <= res[c] <= 1 for c in COLUMNS), text
    if table["profile"] == "paper" and row == "Always Defect / Choreographed":
        # The paper: choreographed Bob defends more often against an always-defecting Alice.
        assert res["defended"] > table["results"]["Always Defect / Baseline"]["defended"] and \
            res["mcnemar_vs_baseline"]["defended"] < ALPHA, text


@pytest.mark.model
@pytest.mark.parametrize("arm", ["baseline", "choreographed"])
def test_side_calls_leave_game_unchanged(games, model, arm):
    """Replaying a logged game without Bob's predictions reproduces its every message and decision."""
    record = games.records[arm]["defect"][0]
    plans = None if arm == "baseline" else games.records["baseline"]["defect"][0]["plan_tokens"]
    executor = choreo.Baseline(model, prefix_reuse=True) if arm == "baseline" else choreo.Choreographer(model)
    again = choreo.Runner(executor, progress=False).run(
        [lambda ex: play(ex, strategy="defect", seed=record["seed"], arm=arm, plans=plans, config=games.config)])[0]
    assert again["predictions"] == [] and record["predictions"]
    assert [m["text"] for m in again["messages"]] == [m["text"] for m in record["messages"]]
    assert again["decisions"] == record["decisions"]
    assert again["p_cooperate"]["bob"] == pytest.approx(record["p_cooperate"]["bob"], abs=1e-4)
