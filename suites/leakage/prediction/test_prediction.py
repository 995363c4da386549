"""Table 3 (leakage, prediction): Bob predicts Alice's decision in side calls that never enter the game."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import choreo
from choreo import stats
from choreo.report import markdown_table, plot_rates, write_table
from choreo.workflows.prisoners import COOPERATE, DEFECT, UNPARSABLE, play

from ..conftest import (ALPHA, ARM_NAMES, PARSE_NOTE, RATE_NOTE, ROWS as STRATEGY_ROWS, STRATEGY_OF, choice_counts,
                        decision, interval_cell, parsed_cell, parsed_json, predicted, rate_cell, rate_json)
from ..cooperation.test_cooperation import run_notes

HERE = Path(__file__).resolve().parent
MODELS = ("baseline", "choreographed", "finetuned")
COLUMNS = ("alice_cooperate", "bob_predicted_cooperate", "correct", "exploited", "defended")
ROWS = [f"{s} / {ARM_NAMES[m]}" for s in STRATEGY_ROWS for m in MODELS]


def choices(records) -> dict[str, list[str]]:
    """Per game, parsed from the logged text: Alice's decision, Bob's final prediction (before deciding), Bob's
    decision."""
    return {"alice": [decision(r, "alice", "choice") for r in records], "prediction": [predicted(r) for r in records],
            "bob": [decision(r, "bob", "choice") for r in records]}


def outcomes(records) -> dict[str, list[bool]]:
    """Per game: Alice cooperates and Bob predicts cooperate (the paper's rule), and what follows from them, which
    counts a game only when the texts involved parse (``parse_choice``): correct = the prediction parses as Alice's
    parsed decision; exploited = predicts cooperate and Bob defects; defended = predicts defect and Bob defects.
    An unparsable prediction or decision is none of these."""
    c = choices(records)
    return {"alice_cooperate": [decision(r, "alice") for r in records],
            "bob_predicted_cooperate": [predicted(r, "cooperate") for r in records],
            "correct": [p == a != UNPARSABLE for p, a in zip(c["prediction"], c["alice"])],
            "exploited": [p == COOPERATE and b == DEFECT for p, b in zip(c["prediction"], c["bob"])],
            "defended": [p == DEFECT and b == DEFECT for p, b in zip(c["prediction"], c["bob"])]}


def correct_among_parsed(records) -> stats.Rate | None:
    """Correct predictions among the games where both the prediction and Alice's decision parse; None if none."""
    c = choices(records)
    pairs = [p == a for p, a in zip(c["prediction"], c["alice"]) if UNPARSABLE not in (p, a)]
    return stats.rate(sum(pairs), len(pairs)) if pairs else None


@pytest.fixture(scope="module")
def table(games, model, profile, results_dir):
    return build(games, model, profile, results_dir)


def build(games, model, profile, results_dir) -> dict:
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
                rows.append([s_row, ARM_NAMES[m], "-", "not run"] + [""] * (len(COLUMNS) + 3)
                            + [" / ".join(map(str, paper[row]))])
                continue
            records = games.records[m][s][:n]
            out, parsed, correct = outcomes(records), choices(records), correct_among_parsed(records)
            res = {c: stats.rate(sum(out[c]), n).rate for c in COLUMNS}
            res["n"] = n
            res["rates"] = {c: rate_json(out[c]) for c in COLUMNS}
            res["choices"] = {k: choice_counts(v) for k, v in parsed.items()}
            res["among_parsed"] = {"alice_cooperate": parsed_json(parsed["alice"]),
                                   "bob_predicted_cooperate": parsed_json(parsed["prediction"]),
                                   "correct": None if correct is None else correct.to_json()}
            res["predictions_per_game"] = sorted({len(r["predictions"]) for r in records})
            if m != "baseline":
                res["mcnemar_vs_baseline"] = {c: stats.mcnemar_exact(out[c], base[c]).pvalue for c in COLUMNS}
            results[row] = res
            unparsed = " / ".join(str(res["choices"][k][UNPARSABLE]) for k in ("alice", "prediction", "bob"))
            rows.append([s_row, ARM_NAMES[m], n] + [rate_cell(out[c]) for c in COLUMNS] + [unparsed]
                        + [parsed_cell(parsed["alice"]), parsed_cell(parsed["prediction"]), interval_cell(correct)]
                        + [" / ".join(map(str, paper[row]))])
    columns = ["Strategy", "Model", "n", "Alice Actual Cooperate", "Bob Predicted Cooperate", "Correct", "Exploited",
               "Defended", "Unparsable: Alice / prediction / Bob", "Alice Cooperate among parsed",
               "Predicted Cooperate among parsed", "Correct among parsed", "paper (%)"]
    notes = ["Bob's prediction: the last of his side calls (after each of his messages and before deciding). Side "
             "calls never enter the game (tests/test_prisoners.py and the test below check it).",
             "Alice Actual Cooperate, Bob Predicted Cooperate: the paper's rule ('COOPERATE' in the text; an "
             "unparsable text counts as defect), over n games. Correct, Exploited, Defended count a game only when "
             "the texts involved parse: correct = the prediction parses as the class Alice's decision parses as; "
             "exploited = the prediction parses as cooperate and Bob's decision as defect; defended = the prediction "
             "parses as defect and Bob's decision as defect (the paper's 'predicts cooperate/defect, and defects': "
             "Bob defects). They are rates over all n games, so an unparsable prediction or decision is none of "
             "them and the games stay paired across models for McNemar (JSON: mcnemar_vs_baseline, raw).",
             PARSE_NOTE + " Unparsable: unparsable texts of n -- Alice's decision, Bob's prediction, Bob's decision. "
             "Among parsed (Wilson 95% interval, (successes/parsed)): Alice cooperates among her parsed decisions; "
             "Bob predicts cooperate among his parsed predictions; correct among the games where both the prediction "
             "and Alice's decision parse. Their denominators differ by model, so they are not tested against "
             "each other.",
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
    assert all(0 <= res[c] <= 1 for c in COLUMNS), text
    # Exploited and defended need a parsed prediction: together at most Bob's parsed predictions.
    counts, n = res["choices"]["prediction"], res["n"]
    assert sum(counts.values()) == n, text
    assert res["rates"]["exploited"]["successes"] <= counts[COOPERATE], f"{row}\n{text}"
    assert res["rates"]["defended"]["successes"] <= counts[DEFECT], f"{row}\n{text}"
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
