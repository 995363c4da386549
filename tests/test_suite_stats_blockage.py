"""The blockage tables' fine-tuning plans and statistics, without a model: the `paper` profiles use the protocol's
LoRA preset, the `small` plans still name their committed logs, training summaries record the split actually
used, the judge table's intervals are Wilson, and MultiQA's claim names agree with the sign of their differences."""

from __future__ import annotations

import pytest

from choreo import stats
from choreo.finetune import FinetuneConfig, split_traces
from suites.blockage import conftest as blockage
from suites.blockage.bsm_judge import test_bsm_judge as judge
from suites.blockage.multiqa import test_multiqa as multiqa


@pytest.mark.parametrize("plans", [multiqa.FINETUNE, blockage.BSM_FINETUNE], ids=["multiqa", "bsm"])
def test_paper_profiles_use_the_paper_preset(plans):
    assert plans["paper"]["preset"] == "paper" and plans["paper"]["overrides"] == {}
    config = FinetuneConfig.preset(plans["paper"]["preset"])
    assert (config.lora_rank, config.lora_alpha, config.lr, config.dev_fraction) == (64, 32.0, 5e-5, 0.1)


# The committed small runs' logs are named by fingerprint(eval=<evaluation key>, plan, ft=config before the
# split's dev_fraction is recorded); a change to these plans would orphan them.
COMMITTED = {"multiqa": (multiqa.FINETUNE, "88f73fa82920", "38d7c976a901"),
             "bsm": (blockage.BSM_FINETUNE, "ce883725a347", "bc70a79078b5")}


@pytest.mark.parametrize("suite", list(COMMITTED))
def test_small_plans_still_name_their_committed_logs(suite):
    plans, eval_key, ft_key = COMMITTED[suite]
    plan = plans["small"]
    config = FinetuneConfig.preset(plan["preset"], **plan["overrides"])
    assert blockage.fingerprint(eval=eval_key, plan=plan, ft=config.to_json()) == ft_key


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
