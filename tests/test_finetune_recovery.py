"""Blockage recovery on the embedded model: after fine-tuning on baseline traces (loss and learning rate chosen on
dev), the choreographed executor's next-token distributions move towards the re-encoding baseline's on held-out
question pairs (CPU, ~23 minutes on a busy 2-core machine with one thread; --run-slow)."""

from __future__ import annotations

import json

import pytest

from choreo.finetune import FinetuneConfig
from choreo.recovery import candidate_configs, recovery_experiment

pytestmark = [pytest.mark.slow, pytest.mark.model]

ALPHA = 0.05
N_TRAIN, N_EVAL = 40, 32  # 32 training and 8 dev traces (dev chooses the candidate and checkpoint); 32 held-out pairs
CONFIGS = candidate_configs(FinetuneConfig.preset("embedded-cpu"), losses=("ce", "kl"), lrs=(3e-4, 1e-3))


def test_finetuning_recovers_baseline_distributions(model, results_dir):
    report = recovery_experiment(model, configs=CONFIGS, out_dir=results_dir / "finetune" / "recovery",
                                 n_train=N_TRAIN, n_eval=N_EVAL)
    s = report["summary"]
    table = json.dumps({k: v for k, v in s.items() if not k.startswith(("seconds", "train_wall", "wall"))}, indent=1)
    table += "\n" + json.dumps(report["candidates"], indent=1, default=str)
    # Measured (results/finetune/recovery.md, dev pairs on questions no training pair holds): dev picked KL at
    # lr 1e-3; held-out KL 0.194 -> 0.064 nats/token (gain 0.130 [0.091, 0.169], paired t p = 1e-7), NLL 0.677 ->
    # 0.517 (p = 8e-4), top-1 0.869 -> 0.902 (p = 0.014), greedy agreement 3/32 -> 8/32 (McNemar p = 0.125).
    # Paired over held-out pairs, two-sided, Holm-adjusted across the four metrics. The earlier CE-only run moved KL
    # by an amount 24 pairs could not resolve; the distillation loss is what closes the distribution gap.
    for name in ("kl", "nll"):
        assert s[f"{name}_gain"] > 0 and s[f"{name}_holm_pvalue"] < ALPHA, (name, table)
    assert s["kl_after"] < 0.5 * s["kl_before"], table  # the gap to the baseline more than halves
    # Secondary metrics: at least not significantly worse (top-1 gains at p = 0.014 here; agreement is exact
    # match of 24-token answers, too coarse for 32 pairs).
    assert not (s["top1_gain"] < 0 and s["top1_t_pvalue"] < ALPHA), table
    assert not (s["agree_gain"] < 0 and s["agree_mcnemar_pvalue"] < ALPHA), table
