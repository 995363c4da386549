"""Blockage recovery on the embedded model: after fine-tuning on baseline traces, the choreographed executor
predicts the baseline's answers better on held-out question pairs (CPU, ~15 minutes on a busy 2-core machine;
--run-slow)."""

from __future__ import annotations

import json

import pytest

from choreo.finetune import FinetuneConfig
from choreo.recovery import recovery_experiment

pytestmark = [pytest.mark.slow, pytest.mark.model]

ALPHA = 0.05
N_TRAIN, N_EVAL = 40, 24  # 32 training and 8 dev traces (dev only selects the checkpoint); 24 held-out pairs
CONFIG = FinetuneConfig.preset("embedded-cpu")


def test_finetuning_recovers_baseline_answers(model, results_dir):
    report = recovery_experiment(model, config=CONFIG, out_dir=results_dir / "finetune" / "recovery",
                                 n_train=N_TRAIN, n_eval=N_EVAL)
    s = report["summary"]
    table = json.dumps(s, indent=1)
    # Paired over the held-out pairs, one-sided at ALPHA. What the 135M model shows at this size (measured first):
    # the choreographed arm gives the baseline's answer tokens clearly more probability (the held-out training
    # objective), while mean KL(baseline || choreographed) moves down by an amount 24 pairs cannot resolve, so the
    # KL claim is asserted as "not significantly worse". With lr 1e-3 instead of 3e-4 the KL rose significantly
    # while the dev loss fell (likely sharpening: the loss is cross-entropy on the baseline's greedy tokens).
    assert s["nll_reduction"] > 0 and s["nll_t_pvalue"] / 2 < ALPHA, table
    assert not (s["kl_reduction"] < 0 and s["kl_t_pvalue"] / 2 < ALPHA), table
