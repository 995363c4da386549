"""The blockage tables' fine-tuning plans and statistics, without a model: the `paper` profiles use the protocol's
LoRA preset, the `small` plans still name their committed logs, training summaries record the split actually
used, the judge table's intervals are Wilson, MultiQA's claim names agree with the sign of their differences, and a
"no difference" claim on branch-solve-merge cannot pass on identical arms or on a judge whose answers do not parse."""

from __future__ import annotations

import numpy as np
import pytest

from choreo import stats
from choreo.finetune import FinetuneConfig, split_traces
from suites.blockage import conftest as blockage
from suites.blockage.bsm_coverage import test_bsm_coverage as bsm_coverage
from suites.blockage.bsm_judge import test_bsm_judge as judge
from suites.blockage.multiqa import test_multiqa as multiqa


@pytest.mark.parametrize("plans", [multiqa.FINETUNE, blockage.BSM_FINETUNE], ids=["multiqa", "bsm"])
def test_paper_profiles_use_the_paper_preset(plans):
    assert plans["paper"]["preset"] == "paper" and plans["paper"]["overrides"] == {}
    config = FinetuneConfig.preset(plans["paper"]["preset"])
    assert (config.lora_rank, config.lora_alpha, config.lr, config.dev_fraction) == (64, 32.0, 5e-5, 0.1)


# The committed small runs' fine-tuned logs are named by each suite's finetune_key (the evaluation's key, the plan,
# its config); a change to these plans would orphan them, and the suite would quietly train and run the arm again.
COMMITTED = {"multiqa": (lambda key, plan: blockage.finetune_key(key, plan, teacher=None), multiqa.FINETUNE,
                         "4c1e8e863fad", "multiqa"),
             "bsm": (blockage.finetune_key, blockage.BSM_FINETUNE, "ce883725a347", "bsm")}


@pytest.mark.parametrize("suite", list(COMMITTED))
def test_small_plans_still_name_their_committed_logs(suite):
    from choreo.repro import RESULTS_DIR

    key_of, plans, eval_key, folder = COMMITTED[suite]
    runs = RESULTS_DIR / "blockage" / folder / "runs"
    assert (runs / f"{eval_key}.jsonl").exists() or any(runs.glob(f"*-{eval_key}.jsonl"))  # the evaluation's logs
    assert (runs / f"finetuned-{key_of(eval_key, plans['small'])}.jsonl").is_file()


def test_with_split_records_the_share_used():
    train, dev = split_traces(list(range(450)), dev_fraction=blockage.DEV_FRACTION, seed=0)
    summary = {"train_traces": len(train), "dev_traces": len(dev), "config": {"dev_fraction": 0.2, "lr": 1e-3}}
    out = blockage.with_split(summary, dev_fraction=blockage.DEV_FRACTION, seed=0)
    assert out["split"] == {"dev_fraction": 0.1, "seed": 0, "train": 405, "dev": 45}
    assert out["config"] == {"dev_fraction": 0.1, "lr": 1e-3}
    assert summary["config"]["dev_fraction"] == 0.2   # the input is not modified
    assert blockage.with_split({"train_traces": 36, "dev_traces": 4}, dev_fraction=0.1, seed=0)["split"]["dev"] == 4


def test_with_split_does_not_claim_a_share_the_counts_contradict():
    out = blockage.with_split({"train_traces": 32, "dev_traces": 8, "config": {"dev_fraction": 0.2}},
                              dev_fraction=0.1, seed=0)
    assert out["split"]["dev_fraction"] is None and out["config"]["dev_fraction"] == 0.2
    assert blockage.with_split({"resumed": "x"}, dev_fraction=0.1, seed=0) == {"resumed": "x"}


def test_ft_summary_names_the_split_and_step_zero():
    summary = {"train_traces": 36, "dev_traces": 4, "steps": 9, "best_step": 0,
               "config": {"loss": "kl", "lr": 1e-3}, "history": [{"step": 0, "dev_loss": 0.039}]}
    text = blockage._ft_summary(blockage.with_split(summary, dev_fraction=0.1, seed=0))
    assert "36 train / 4 dev traces (dev share 0.1, split seed 0)" in text
    assert "chosen: step 0 (the untrained adapter" in text


@pytest.mark.parametrize("counts", [(0, 24, 0), (3, 20, 1), (24, 0, 0)], ids=["all-ties", "mixed", "all-A"])
def test_judge_outcome_intervals_are_wilson(counts):
    h = stats.head_to_head(*counts, seed=0, n_resamples=200)
    rates = judge.outcome_rates(h)
    for key, k in zip(judge.OUTCOMES, counts):
        expected = stats.rate(k, sum(counts))
        assert (rates[key].low, rates[key].high) == (expected.low, expected.high)
        assert rates[key].high > rates[key].low   # never collapses to a point, even at 0/n or n/n
    if counts == (0, 24, 0):
        assert judge.rate_text(rates["a_win"]) == "0.0% [0.0, 13.8]"


def _runs(q1: list[bool], q2: list[bool]) -> list[dict]:
    return [{"correct": [a, b], "both": a and b} for a, b in zip(q1, q2)]


def test_multiqa_claim_names_agree_with_the_sign():
    n = 20
    q1 = [i < 3 for i in range(n)]             # linearized: Q1 3/20, Q2 15/20
    q2 = [i < 15 for i in range(n)]
    runs = {"baseline": _runs([True] * n, [True] * n), "choreographed": _runs(q1, [False] * n),
            "choreographed+linearized": _runs(q1, q2), "choreographed+finetuned": _runs([True] * n, q2)}
    tests = multiqa.claim_tests(runs)
    assert tests["linearized Q2 > linearized Q1"].difference == pytest.approx(0.6)
    assert tests["choreographed both < baseline both"].difference < 0
    assert tests["linearized both < baseline both"].difference < 0
    assert tests["finetuned both > choreographed both"].difference > 0


def _bsm_record(story: str, covered: float) -> dict:
    return {"parsed": True, "merged": story, "coverage": {"word": covered, "substring": covered},
            "group_coverage": {"word": [covered, covered], "substring": [covered, covered]}}


def _bsm_runs(baseline: list[dict], other: list[dict]) -> dict:
    return {"Baseline": baseline, "Choreographed": other, "Choreographed + Linearization": other}


def test_bsm_coverage_no_difference_is_not_vacuous():
    n = 24
    base = [_bsm_record(f"story {i}", (i % 3) / 12) for i in range(n)]
    name = "Choreographed - Baseline coverage"
    same = bsm_coverage.vacuity(_bsm_runs(base, [dict(r) for r in base]), name)   # identical arms: 24 ties
    assert same is not None and "same merged story in all 24 instances" in same
    flat = [_bsm_record(f"other {i}", r["coverage"]["word"]) for i, r in enumerate(base)]  # differ, equal coverage
    assert "equal in every instance" in bsm_coverage.vacuity(_bsm_runs(base, flat), name)
    varied = [_bsm_record(f"other {i}", ((i + 1) % 3) / 12) for i in range(n)]
    assert bsm_coverage.vacuity(_bsm_runs(base, varied), name) is None
    assert bsm_coverage.differing(base, varied) == n and bsm_coverage.differing(base, base) == 0


def test_bsm_recovery_is_not_read_where_the_choreographed_arm_has_no_gap_to_recover():
    """Fine-tuning 'equivalent to the baseline' means recovery only when the choreographed arm is not equivalent
    to it already; the baseline's own Group 2 - Group 1 and linearization's addition to it are reported."""
    n = 24
    rng = np.random.default_rng(0)
    base = [_bsm_record(f"story {i}", 0.8 + 0.02 * rng.standard_normal()) for i in range(n)]
    near = [_bsm_record(f"near {i}", r["coverage"]["word"] + 0.01 * rng.standard_normal()) for i, r in enumerate(base)]
    far = [_bsm_record(f"far {i}", r["coverage"]["word"] - 0.18 + 0.01 * rng.standard_normal())
           for i, r in enumerate(base)]
    caveat = bsm_coverage.recovery_caveat(_bsm_runs(base, near), 0.05)
    assert caveat is not None and "no gap to recover" in caveat and "baseline coverage 79.8%" in caveat
    assert bsm_coverage.recovery_caveat(_bsm_runs(base, far), 0.05) is None  # an 18-point gap: recovery testable
    for i, r in enumerate(base):  # the baseline favours group 2 by 10 points, the linearized arm by 15
        r["group_coverage"]["word"] = [0.75 + 0.01 * (i % 3), 0.85 + 0.01 * (i % 3)]
        far[i]["group_coverage"]["word"] = [0.5 + 0.01 * (i % 4), 0.65 + 0.01 * (i % 4)]
    ref = bsm_coverage.references(_bsm_runs(base, far))
    assert ref["Baseline Group 2 - Group 1"].mean_difference == pytest.approx(0.10)
    assert ref["Linearization - Baseline in Group 2 - Group 1"].mean_difference == pytest.approx(0.05)
    assert list(bsm_coverage.references({"Baseline": base})) == ["Baseline Group 2 - Group 1"]


def _answer(text: str) -> dict:
    from choreo.workflows.bsm import parse_verdict

    return {"text": text, "verdict": parse_verdict(text)}


def test_bsm_judge_no_difference_is_not_vacuous():
    biased = {"outcome": "tie", "orders": [_answer(" A"), _answer(" A.")]}
    unparsable = {"outcome": "tie", "orders": [_answer(" Both"), _answer(" neither")]}
    decided = {"outcome": "A", "orders": [_answer(" A"), _answer(" B")]}  # the same story in both orders
    # Position bias alone decides nothing by content: every outcome is a tie whatever the stories say.
    assert "decided none of the 24 comparisons by the stories' content (the same position in both orders: A 24, B 0" \
        in judge.vacuity([biased] * 24, differ=24)
    # One comparison decided by content is not enough either: a sign test over it can never reach p < 0.05.
    assert judge.MIN_DECISIVE == 6
    assert "decided 1 of the 24 comparisons" in judge.vacuity([biased] * 23 + [decided], differ=24)
    assert "fewer than the 6 a sign test needs" in judge.vacuity([biased] * 19 + [decided] * 5, differ=24)
    assert judge.vacuity([biased] * 18 + [decided] * 6, differ=24) is None
    assert "identical in all 24 pairs" in judge.vacuity([biased] * 24, differ=0)
    assert "keep only the outcome" in judge.vacuity(["tie"] * 24, differ=24)   # records from before the answers
    assert "none of the judge's 48 answers" in judge.vacuity([unparsable] * 24, differ=24)
    assert "no comparison was put" in judge.vacuity([{"outcome": "A", "orders": []}] * 24, differ=24)
    assert "decided none of the 24" in judge.vacuity([unparsable] * 23 + [biased], differ=24)
    assert judge.vacuity([unparsable] * 17 + [biased] + [decided] * 6, differ=24) is None


@pytest.mark.parametrize("text, verdict", [
    (" A", "A"), (" A.", "A"), (" B.", "B"), (" A.\n\nThe story is more", "A"), (" b", "B"), ("a", "A"),
    ("Story B is better.", "B"), (" Story A", "A"), ("The answer is B", "B"), (" A. Both are good, but", "A"),
    ("A story that is better is Story B", "B"), ("A story that is better is B", None),
    (" A and B are equal", None), (" Both", None), (" Neither.", None), (" It's a tie", None), ("", None),
    (" The first one", None)])
def test_the_judge_answer_parser_reads_awkward_answers(text, verdict):
    from choreo.workflows.bsm import parse_verdict

    assert parse_verdict(text) == verdict


def test_a_logged_judgement_is_read_by_the_current_parser():
    from choreo.workflows.bsm import judge_diagnostics, judge_outcome

    old = {"outcome": "tie", "orders": [{"text": " b", "verdict": None}, {"text": " A", "verdict": "A"}]}
    assert judge_outcome(old) == "B"  # " b" now reads as B: story B preferred in both orders
    assert judge_diagnostics([old])["consistent"] == 1 and judge_outcome("tie") == "tie"


def test_bsm_judge_even_is_tost_on_the_net_preference():
    paper = ["A"] * 15 + ["tie"] * 21 + ["B"] * 14  # the paper's "even" row, n = 50
    two_to_one = ["A"] * 10 + ["tie"] * 35 + ["B"] * 5  # sign test p 0.30: once enough to pass "even"
    assert judge.net_equivalence(paper).pvalue < 0.05 < judge.net_equivalence(two_to_one).pvalue


def test_bsm_judge_table_cells():
    from choreo.workflows.bsm import judge_diagnostics

    biased = {"outcome": "tie", "orders": [_answer(" A"), _answer(" A.")]}
    unparsable = {"outcome": "tie", "orders": [_answer(" Both"), _answer(" B")]}
    assert judge.answers_text(judge_diagnostics([biased] * 3 + [unparsable])) == ("1 of 8", "3 / 0 of 4")
    assert judge.answers_text(judge_diagnostics(["tie"] * 24)) == ("not logged (24 of 24)",) * 2
    assert judge._answer_counts([biased, biased, unparsable], top=2) == "' A' x2, ' A.' x2, 2 other answers"


def test_resumable_redoes_rejected_records_and_keeps_the_last(tmp_path):
    from choreo.results import JsonlLog

    log = JsonlLog(tmp_path / "judge.jsonl", key="index")
    for i, outcome in enumerate(["tie", "A", "tie"]):
        log.append({"index": i, "result": outcome})           # the old format: the outcome only
    calls = []

    def run(todo, on_result):
        calls.append(list(todo))
        for j, item in enumerate(todo):
            on_result(j, {"outcome": "tie", "orders": [], "item": item})

    items = ["x", "y", "z"]
    out = blockage.resumable(tmp_path, "judge", items, run, redo=lambda r, _item: not isinstance(r, dict))
    assert calls == [["x", "y", "z"]] and [r["item"] for r in out] == items
    again = blockage.resumable(tmp_path, "judge", items, run, redo=lambda r, _item: not isinstance(r, dict))
    assert calls == [["x", "y", "z"]] and again == out               # the new records are the ones read
    assert len(log.path.read_text().splitlines()) == 6                # appended: the old records stay in the log
    assert blockage.resumable(tmp_path / "fresh", "judge", items, run) == out and len(calls) == 2


def test_a_logged_judgement_of_other_stories_is_judged_again(tmp_path):
    """A judgement names the stories it compared: regenerated stories under the same log name are judged anew,
    while records from before the stories were named are read as logged."""
    from choreo.workflows.bsm import stories_digest

    pairs = [("one", "two"), ("three", "four")]
    calls = []

    def run(todo, on_result):
        calls.append(list(todo))
        for j, (a, b) in enumerate(todo):
            on_result(j, {"outcome": "A", "orders": [{"text": " A", "verdict": "A"}] * 2,
                          "stories": stories_digest(a, b)})

    blockage.resumable(tmp_path, "judge", pairs, run, redo=blockage.stale_judgement)
    assert calls == [pairs]
    blockage.resumable(tmp_path, "judge", pairs, run, redo=blockage.stale_judgement)
    assert len(calls) == 1
    blockage.resumable(tmp_path, "judge", [("one", "two"), ("three", "FOUR")], run, redo=blockage.stale_judgement)
    assert calls[-1] == [("three", "FOUR")]
    assert not blockage.stale_judgement({"outcome": "tie", "orders": []}, ("x", "y"))  # from before: as logged
    assert blockage.stale_judgement("tie", ("x", "y"))                                   # outcome only
