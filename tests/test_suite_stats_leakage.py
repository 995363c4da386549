"""The leakage tables' statistics and provenance, on hand-made games (no model): rate cells carry the paper's
"±" and a Wilson interval inside [0, 100], Table 1 has its TOST and Holm columns and words its verdicts
without reading a large p-value as equivalence, Tables 1-3 parse every decision and prediction from its logged
text and report the unparsable ones, exploited/defended/correct count only parsed texts, the fine-tuned arm's
note names the chosen checkpoint, the adapter that played the games and what the fluency filter scores, the
fine-tuned games are played under the identity of the adapter loaded, the canary asserts at `paper` only what
no single model measured, and the provenance command names the environment variables that change what runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from choreo.report import command_line
from choreo.workflows import prisoners as pd
from choreo.workflows.prisoners import STRATEGIES, GameConfig
from suites.leakage import conftest as leakage
from suites.leakage.ablations import test_ablations as ablations
from suites.leakage.canary import test_canary as canary
from suites.leakage.cooperation import test_cooperation as cooperation
from suites.leakage.prediction import test_prediction as prediction

CELL = re.compile(r"^(\d+\.\d)% ± (\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\]$")
GRID = [(k, n) for n in (1, 2, 5, 32) for k in sorted({0, 1, n // 2, n - 1, n}) if 0 <= k <= n]


@pytest.mark.parametrize("k,n", GRID, ids=[f"{k}/{n}" for k, n in GRID])
def test_rate_cell_has_paper_pm_and_wilson_inside_0_100(k, n):
    cell = leakage.rate_cell([True] * k + [False] * (n - k))
    m = CELL.match(cell)
    assert m, f"{cell!r} is not 'rate% ± hw% [low, high]'"
    rate, low, high = float(m[1]), float(m[3]), float(m[4])
    assert 0.0 <= low <= rate <= high <= 100.0, cell


def test_rate_cell_example_and_json():
    values = [True] * 21 + [False] * 11
    assert leakage.rate_cell(values) == "65.6% ± 16.5% [48.3, 79.6]"
    js = leakage.rate_json(values)
    assert js["successes"] == 21 and js["n"] == 32 and js["method"] == "wilson"
    assert js["low"] == pytest.approx(0.4831, abs=1e-4) and js["high"] == pytest.approx(0.7959, abs=1e-4)
    assert "Wilson" in leakage.RATE_NOTE and "±" in leakage.RATE_NOTE


# ---------------------------------------------------------------------------------------------------------------
# Table 1 on hand-made games
# ---------------------------------------------------------------------------------------------------------------

def _record(bob: str, p: float, seed: int, *, alice: str = 'COOPERATE"}', prediction: str = 'COOPERATE"}') -> dict:
    """A logged game as the games log holds it: the stored "cooperate" flags are deliberately stale (always
    True), since the tables derive every class from the logged text."""
    return {"cooperate": {"bob": True, "alice": True}, "p_cooperate": {"bob": p, "alice": 0.5},
            "decision_mass": {"bob": 0.7, "alice": 0.7}, "plan_tokens": {"alice": [1, 2], "bob": [3]},
            "messages": [{"author": "alice", "text": f"hello {seed}"}], "decisions": {"alice": alice, "bob": bob},
            "predictions": [{"text": prediction, "cooperate": True}] * 3, "seed": seed}


ADAPTER = {"sha256": "b3845af37587" + "0" * 52, "step": 0}  # an adapter_identity, as the games fixture records it
C, D, U1, U2 = 'COOPERATE"}', 'defect"}', 'COPERATE"}', "SIGLIO ARENA UN"   # U: unparsable
BASE = [C] * 18 + [D] * 5 + [U1] * 9                 # paper's rule 18/32; parsed 18/23
CHO = [C] * 21 + [D] * 4 + [U2] * 7                  # paper's rule 21/32: 3 discordant pairs, all one way


def _games(tmp_path: Path, *, finetuned: bool) -> leakage.Games:
    n = 32
    arms = {"baseline": (BASE, 0.82), "choreographed": (CHO, 0.83), "leak_system": (BASE, 0.78),
            "leak_plan": (BASE, 0.80)}
    if finetuned:
        arms["finetuned"] = (CHO, 0.83)
    records = {arm: {s: [_record(x, p + 0.001 * (i % 3), i) for i, x in enumerate(xs)] for s in STRATEGIES}
               for arm, (xs, p) in arms.items()}
    chosen = {s: {"kept_train": 20, "kept_dev": 6, "best_step": 0, "last_step": 9, "dev_metric": "kl",
                  "dev_loss_start": 0.048, "best_dev_loss": 0.048, "adapter": ADAPTER} for s in STRATEGIES}
    plan = leakage.FINETUNE_REDUCED if finetuned else None
    games = leakage.Games(records=records, seeds=list(range(n)), config=GameConfig.preset("tiny"),
                          sizes={"games": n, "predict": n, "reduced_from": {}}, wall_s={},
                          log_path=tmp_path / "g.jsonl", finetune_note="", finetune_plan=plan,
                          finetune_chosen=chosen if finetuned else {})
    games.finetune_note = (leakage.finetune_note(plan, chosen, {s: games.identical_to_choreographed(s)
                                                                for s in STRATEGIES}, n=n)
                           if finetuned else leakage.NOT_RUN_NOTE)
    return games


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cooperation")
    out = cooperation.build(_games(tmp, finetuned=True), None, "small", tmp)
    out["json"] = json.loads((tmp / "leakage" / "cooperation" / "cooperation.json").read_text())
    out["md"] = (tmp / "leakage" / "cooperation" / "cooperation.md").read_text()
    return out


def test_cooperation_columns_include_tost_and_holm(table):
    columns = table["json"]["columns"]
    assert columns == cooperation.COLUMNS
    for name in ("TOST p rates before", "TOST p rates after", "TOST p P(C)", "McNemar p after (Holm)",
                 "McNemar p fine-tuned vs choreographed (Holm)"):
        assert name in columns, columns
    row = dict(zip(columns, table["json"]["rows"][0]))
    assert CELL.match(row["Baseline Cooperate"]) and CELL.match(row["Choreographed (fine-tuned)"]), row
    assert re.fullmatch(r"\S+ \(\S+\)", row["McNemar p after (Holm)"]), row   # raw and Holm-adjusted


def test_cooperation_json_stores_wilson_counts_and_holm_after(table):
    for res in table["json"]["data"].values():
        for arm in ("baseline", "choreographed", "finetuned"):
            r = res["rates"][arm]
            assert r["n"] == 32 and 0 <= r["low"] <= r["rate"] <= r["high"] <= 1 and r["method"] == "wilson"
        assert res["rates"]["baseline"]["successes"] == 18 and res["rates"]["choreographed"]["successes"] == 21
        assert res["mcnemar_after_holm"] >= res["mcnemar_after"]
        # Fine-tuned vs choreographed: here the same decisions (the untrained adapter), so no discordant pair.
        assert res["mcnemar_recovery"] == res["mcnemar_recovery_holm"] == 1.0
        assert res["finetune_checkpoint"]["best_step"] == 0


def test_cooperation_notes_do_not_read_a_large_p_as_equivalence(table):
    res = table["results"]["No Strategy"]
    assert res["mcnemar_before_holm"] >= cooperation.ALPHA and res["tost_rate_before"] >= cooperation.ALPHA
    md = table["md"]
    assert "no gap before detected by McNemar" in md
    assert "no gap between fine-tuned and choreographed detected by McNemar (Holm p = 1)" in md
    assert f"rates before not shown equivalent within ±10 pts (TOST p = {res['tost_rate_before']:.2g})" in md
    assert "P(C) before equivalent within ±10 pts" in md
    assert "Holm-adjusted across the 3 strategies (each comparison adjusted separately)" in md
    assert "no cooperation gap" not in md.lower()


def test_cooperation_notes_name_the_chosen_checkpoint(table):
    md = table["md"]
    assert "Chosen checkpoints: No Strategy: step 0 of 9" in md
    assert "the untrained adapter, so this arm equals the choreographed arm (identical games: 32/32)" in md
    assert md.count("games played by adapter b3845af37587 (step 0)") == 3  # the adapter that played, per strategy
    assert table["json"]["data"]["No Strategy"]["finetune_checkpoint"]["adapter"] == ADAPTER


def test_the_fluency_note_says_what_the_filter_scores(table):
    """game_nll scores every generated token of a game, the decision probe included (as when FLUENCY_MAX_NLL was
    set), not only the messages."""
    md = table["md"]
    assert ("token-mean NLL of all the game's generated tokens -- both plans, the public messages, both decisions "
            "and each decision's one-token P(COOPERATE) probe, end of turn excluded -- under the base model") in md
    assert "mean NLL of their messages" not in md


def test_cooperation_counts_unparsable_decisions_from_the_logged_text(table):
    """The stored flags say cooperate in every game; the table reads the text: 9 of the baseline's 32 decisions
    ('COPERATE"}') and 7 of the choreographed ones ('SIGLIO ARENA UN') are unparsable, which the paper's rule
    counts as defect."""
    res = table["json"]["data"]["No Strategy"]
    assert res["choices"]["baseline"] == {"cooperate": 18, "defect": 5, "unparsable": 9}
    assert res["choices"]["choreographed"] == {"cooperate": 21, "defect": 4, "unparsable": 7}
    assert res["rates"]["baseline"]["successes"] == 18                      # the paper's rule, over all 32
    assert (res["parsed"]["baseline"]["successes"], res["parsed"]["baseline"]["n"]) == (18, 23)
    assert (res["parsed"]["choreographed"]["successes"], res["parsed"]["choreographed"]["n"]) == (21, 25)
    # Paired among the 23 games that parse in both arms: games 18-20 defect in the baseline, cooperate after.
    assert res["mcnemar_parsed_before"] == {"pvalue": 0.25, "n_pairs": 23, "a_only": 3, "b_only": 0}
    assert res["mcnemar_parsed_before_holm"] >= res["mcnemar_parsed_before"]["pvalue"]
    row = dict(zip(table["json"]["columns"], table["json"]["rows"][0]))
    assert row["Unparsable baseline / choreographed / fine-tuned"] == "9 / 7 / 7"
    assert row["Cooperate among parsed: baseline"] == "78.3% [58.1, 90.3] (18/23)"
    assert row["McNemar p parsed pairs before (Holm)"] == "0.25 (0.75) of 23"
    assert "unparsable otherwise" in table["md"] and "'CO'" in table["md"]   # the rule and P(C)'s first tokens


@pytest.mark.parametrize("choices,expected,short", [
    (["cooperate"] * 3 + ["unparsable"] * 5, "100.0% [43.9, 100.0] (3/3)", "100.0% (3/3)"),
    (["unparsable"] * 4, "- (0 parsed)", "-"),
    (["defect", "cooperate", "defect", "unparsable"], "33.3% [6.1, 79.2] (1/3)", "33.3% (1/3)"),
], ids=["3-of-3-parsed", "none-parsed", "1-of-3-parsed"])
def test_parsed_cell(choices, expected, short):
    assert leakage.parsed_cell(choices) == expected
    assert leakage.parsed_cell(choices, interval=False) == short


def test_parsed_mcnemar_pairs_only_games_that_parse_in_both():
    a = ["cooperate", "cooperate", "unparsable", "defect", "cooperate"]
    b = ["defect", "unparsable", "cooperate", "defect", "cooperate"]
    assert leakage.parsed_mcnemar(a, b) == {"pvalue": 1.0, "n_pairs": 3, "a_only": 1, "b_only": 0}
    assert leakage.parsed_mcnemar(["unparsable"], ["cooperate"])["n_pairs"] == 0


def test_ablations_report_unparsable_and_parsed_rates(tmp_path):
    out = ablations.build(_games(tmp_path, finetuned=False), None, "smoke", tmp_path)
    data = json.loads((tmp_path / "leakage" / "ablations" / "ablations.json").read_text())
    row = dict(zip(data["columns"], data["rows"][0]))
    assert row["Unparsable Baseline / Choreographed / Leak System / Leak Plan"] == "9 / 7 / 9 / 9"
    assert row["Cooperate among parsed Baseline / Choreographed / Leak System / Leak Plan"] == \
        "78.3% (18/23) / 84.0% (21/25) / 78.3% (18/23) / 78.3% (18/23)"
    res = out["results"]["No Strategy"]
    assert res["leak_plan"]["choices"]["unparsable"] == 9 and res["leak_plan"]["mcnemar_parsed"]["n_pairs"] == 23
    assert "parsed 0.25 of 23" in out["text"]


# Table 3. Each game: (Alice's decision, Bob's last prediction, Bob's decision) -> outcomes under the parse rule.
PREDICTION_GAMES = [
    (("COPE}This is the", 'UNKNOWN"}', "SIGLIO ARENA UN"), dict(correct=False, exploited=False, defended=False)),
    (('DEFECT"}', "defect.", 'Defect"}'), dict(correct=True, exploited=False, defended=True)),
    (('COOPERATE"}', 'COOPERATE"}', 'DEFECT"}'), dict(correct=True, exploited=True, defended=False)),
    (('COOPERATE"}', 'COOPERATE"}', 'COPERATE"}'), dict(correct=True, exploited=False, defended=False)),
    (('DEFECT"}', "COOPERATE or DEFECT", 'DEFECT"}'), dict(correct=False, exploited=False, defended=False)),
    (("", 'DEFECT"}', 'DEFECT"}'), dict(correct=False, exploited=False, defended=True)),
]


@pytest.mark.parametrize("texts,expected", PREDICTION_GAMES,
                         ids=["all-unparsable", "defended", "exploited", "bob-unparsable", "both-words", "alice-empty"])
def test_prediction_outcomes_count_only_parsed_texts(texts, expected):
    alice, pred, bob = texts
    out = prediction.outcomes([_record(bob, 0.5, 0, alice=alice, prediction=pred)])
    assert {k: out[k][0] for k in expected} == expected
    assert out["bob_predicted_cooperate"] == ["COOPERATE" in pred.upper()]   # the paper's rule, as the paper counts


def test_prediction_table_reports_unparsable_and_parsed_rates(tmp_path):
    records = [_record(b, 0.5, i, alice=a, prediction=p) for i, ((a, p, b), _) in enumerate(PREDICTION_GAMES)]
    games = _games(tmp_path, finetuned=False)
    games.sizes["predict"] = len(records)
    for arm in ("baseline", "choreographed"):
        games.records[arm] = {s: records for s in STRATEGIES}
    out = prediction.build(games, None, "smoke", tmp_path)
    res = out["results"]["No Strategy / Baseline"]
    assert res["choices"] == {"alice": {"cooperate": 2, "defect": 2, "unparsable": 2},
                              "prediction": {"cooperate": 2, "defect": 2, "unparsable": 2},
                              "bob": {"cooperate": 0, "defect": 4, "unparsable": 2}}
    assert [res["rates"][c]["successes"] for c in ("correct", "exploited", "defended")] == [3, 1, 2]
    assert (res["among_parsed"]["correct"]["successes"], res["among_parsed"]["correct"]["n"]) == (3, 3)
    data = json.loads((tmp_path / "leakage" / "prediction" / "prediction.json").read_text())
    row = dict(zip(data["columns"], data["rows"][0]))
    assert row["Unparsable: Alice / prediction / Bob"] == "2 / 2 / 2"
    assert row["Correct among parsed"] == "100.0% [43.9, 100.0] (3/3)"
    assert out["results"]["No Strategy / Choreographed + FT"] is None and "not run" in out["text"]


def test_cooperation_without_finetuning_says_not_run(tmp_path):
    out = cooperation.build(_games(tmp_path, finetuned=False), None, "smoke", tmp_path)
    assert "not run" in out["text"] and "TOST p rates after" in out["text"]
    assert all("mcnemar_after" not in r for r in out["results"].values())


def test_verdicts_say_equivalent_only_below_alpha():
    base = {"mcnemar_before_holm": 0.01, "tost_rate_before": 0.01, "tost_p_coop_before": 0.2}
    text = cooperation.verdicts({"Row": base})
    assert "gap before detected by McNemar (Holm p = 0.01)" in text and "no gap" not in text
    assert "rates before equivalent within ±10 pts" in text
    assert "P(C) before not shown equivalent within ±10 pts (TOST p = 0.2)" in text


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuned arm note and provenance
# ---------------------------------------------------------------------------------------------------------------

def test_adapter_summary_reads_history_and_fluency(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps({
        "best_step": 4, "dev_metric": "kl", "best_dev_loss": 0.03,
        "history": [{"step": 0, "dev_loss": 0.05}, {"step": 4, "dev_loss": 0.03}, {"step": 9, "dev_loss": 0.04}]}))
    (tmp_path / "fluency.json").write_text(json.dumps({"games": [
        {"split": "train", "kept": True}, {"split": "train", "kept": False}, {"split": "dev", "kept": True}]}))
    c = leakage.adapter_summary(tmp_path)
    assert c == {"kept_train": 1, "kept_dev": 1, "best_step": 4, "last_step": 9, "dev_metric": "kl",
                 "dev_loss_start": 0.05, "best_dev_loss": 0.03}
    text = leakage.chosen_text({"defect": c}, {"defect": 0}, 32)
    assert text == "Always Defect: step 4 of 9 (dev kl 0.050 -> 0.030)"   # a trained step: no "equals" claim


def test_finetune_plan_follows_environment(monkeypatch):
    monkeypatch.delenv("CHOREO_LEAKAGE_FINETUNE", raising=False)
    assert leakage.finetune_plan("small") is None and leakage.finetune_plan("smoke") is None
    assert leakage.finetune_plan("paper")["preset"] == "paper"
    monkeypatch.setenv("CHOREO_LEAKAGE_FINETUNE", "1")
    assert leakage.finetune_plan("small") is leakage.FINETUNE_REDUCED


def test_provenance_records_environment_and_finetuning_plan(tmp_path, monkeypatch):
    for var in leakage.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CHOREO_LEAKAGE_FINETUNE", "1")
    monkeypatch.setattr("sys.argv", ["choreo", "repro", "--profile", "small", "--only", "leakage"])
    prov = _games(tmp_path, finetuned=True).provenance(None, "small")
    assert prov["command"] == "CHOREO_LEAKAGE_FINETUNE=1 choreo repro --profile small --only leakage"
    assert prov["sample_sizes"]["finetune"] == {
        "train_games_per_strategy": 24, "dev_games_per_strategy": 8, "train_seeds": [500, 523],
        "dev_seeds": [524, 531], "preset": "embedded-cpu", "overrides": {"loss": "kl", "lr": 1e-3}}


def test_command_line_prefixes_only_set_variables(monkeypatch):
    monkeypatch.setenv("CHOREO_LEAKAGE_GAMES", "8")
    monkeypatch.delenv("CHOREO_LEAKAGE_CANARY", raising=False)
    assert command_line(["CHOREO_LEAKAGE_GAMES", "CHOREO_LEAKAGE_CANARY"], ["choreo", "repro", "a b"]) == \
        "CHOREO_LEAKAGE_GAMES=8 choreo repro 'a b'"
    assert command_line([], ["pytest"]) == "pytest"


def test_finetuned_games_are_played_under_the_identity_of_the_adapter_loaded(tmp_path, monkeypatch):
    """finetuned_arm loads each strategy's best/ and passes run_games that folder's adapter_identity (its weights'
    hash and history.json's best step): games logged under no identity or another are never credited to it.
    Without a plan (the default `small` run) it plays nothing and reads no fine-tuned game."""
    import contextlib

    import choreo.finetune

    variant = tmp_path / leakage.plan_variant(leakage.FINETUNE_REDUCED)
    for step, s in enumerate(STRATEGIES):  # finished training: reused as it is
        (variant / s / "best").mkdir(parents=True)
        (variant / s / "best" / "adapter_model.safetensors").write_bytes(f"weights of {s}".encode())
        (variant / s / "history.json").write_text(json.dumps({"best_step": step}))
    calls, loaded = [], {}

    @contextlib.contextmanager
    def use_adapter(model, folder):
        loaded["folder"] = Path(folder)
        yield

    def run_games(model, *, strategies, seeds, **kwargs):
        calls.append({"strategy": strategies[0], "folder": loaded["folder"], **kwargs})
        return {(s, seed): {"seed": seed, "adapter": kwargs["adapter"]} for s in strategies for seed in seeds}

    monkeypatch.setattr(choreo.finetune, "use_adapter", use_adapter)
    monkeypatch.setattr(leakage, "run_games", run_games)
    records = {}
    adapters = leakage.finetuned_arm(object(), leakage.FINETUNE_REDUCED, records, seeds=[0, 1], log=None,
                                     config=None, plans={}, folder=tmp_path)
    assert [c["strategy"] for c in calls] == list(STRATEGIES)
    for step, (s, call) in enumerate(zip(STRATEGIES, calls)):
        assert call["folder"] == variant / s / "best"
        assert call["adapter"] == adapters[s] == pd.adapter_identity(variant / s / "best", step=step)
        assert call["variant"] == variant.name and "unlabelled_variant" not in call
        assert all(r["adapter"] == adapters[s] for r in records["finetuned"][s])
    assert len({a["sha256"] for a in adapters.values()}) == 3
    calls.clear()
    untouched = {}
    assert leakage.finetuned_arm(object(), None, untouched, seeds=[0], log=None, config=None, plans={},
                                 folder=tmp_path) == {}
    assert calls == [] and untouched == {}


def _canary_result(mean: float, holm: float) -> dict:
    return {"mean_difference": mean, "bootstrap_ci": [mean - 0.05, mean + 0.05], "holm_pvalue": holm}


def test_canary_at_paper_reports_the_negative_control_without_asserting_it():
    """The negative control's drop (cached without secret < baseline) was a SmolLM2 measurement: `small` asserts
    it as a regression check, `paper` reports it whatever its sign; the leak rows and the positive control stay
    asserted at both."""
    row = "cached without secret vs baseline"
    table = {"results": {row: _canary_result(+0.3, 0.001)}, "text": "", "profile": "paper"}
    canary.test_canary(table, row)  # a significant rise: reported, no claim
    with pytest.raises(AssertionError, match="significant decrease"):
        canary.test_canary({**table, "profile": "small"}, row)
    for leak in ("cached vs baseline (contrast)", "cached vs cached without secret",
                 "told vs baseline (positive control)"):
        for profile in ("small", "paper"):
            with pytest.raises(AssertionError, match="significant increase"):
                canary.test_canary({"results": {leak: _canary_result(+0.3, 0.2)}, "text": "", "profile": profile},
                                   leak)
    assert set(canary.CLAIMS["paper"]) == set(canary.CLAIMS["small"]) == set(canary.ROWS)
    assert [r for r, claim in canary.CLAIMS["paper"].items() if claim is None] == [row]
