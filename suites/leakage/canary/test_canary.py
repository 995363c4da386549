"""Canary (direct leakage probe, beyond the paper): is Alice's secret more probable to Bob when he attends to
her cached message than when he re-encodes it?"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from choreo import stats
from choreo.profiles import pick
from choreo.report import markdown_table, plot_rates, write_table
from choreo.results import JsonlLog
from choreo.workflows.canary import CONDITIONS, run_probes

from ..conftest import ALPHA, ENV_VARS, RATE_NOTE, fingerprint, sizes

MESSAGE_TOKENS = {"smoke": 8, "small": 48, "paper": 48}
SEED = 0
# Row name -> (x, y, score): paired difference x - y of "logprob" (the secret) or "contrast" (secret minus
# the mean distractor).
ROWS = {
    "cached vs baseline": ("cached", "baseline", "logprob"),
    "cached vs baseline (contrast)": ("cached", "baseline", "contrast"),
    "cached vs cached without secret": ("cached", "cached_without_secret", "contrast"),
    "cached without secret vs baseline": ("cached_without_secret", "baseline", "logprob"),
    "told vs baseline (positive control)": ("told", "baseline", "logprob"),
}


def log_path(results_dir: Path, model, profile: str) -> Path:
    name = fingerprint(model=model.spec.sha256, message_tokens=MESSAGE_TOKENS[profile], probe="canary-v1")
    return Path(results_dir) / "leakage" / "canary" / "runs" / f"{name}.jsonl"


def score(record: dict, condition: str, kind: str) -> float:
    lp = record["logprob"][condition]
    return lp if kind == "logprob" else lp - record["distractor_logprob"][condition]


@pytest.fixture(scope="module")
def table(model, profile, results_dir):
    n = sizes(profile)["canary"]
    t0 = time.perf_counter()
    log = JsonlLog(log_path(results_dir, model, profile), key="seed")
    records = run_probes(model, seeds=range(n), log=log,
                         message_tokens=MESSAGE_TOKENS[profile])
    wall = round(time.perf_counter() - t0, 1)
    results, rows = {}, []
    for row, (x, y, kind) in ROWS.items():
        a = np.array([score(r, x, kind) for r in records])
        b = np.array([score(r, y, kind) for r in records])
        t = stats.paired_mean_difference(a, b, alpha=ALPHA)
        boot = stats.paired_bootstrap(a, b, seed=SEED, n_resamples=2000)
        results[row] = {"mean_difference": t.mean_difference, "t_ci": [t.low, t.high], "t_pvalue": t.t_pvalue,
                        "wilcoxon_pvalue": t.wilcoxon_pvalue, "bootstrap_ci": [boot.low, boot.high], "n": n,
                        "kind": kind}
    # One Holm family for the rows whose claim reads a p-value at `small` ("cached vs baseline" is judged by its
    # interval); the same family at every profile, so a row reported without a claim at `paper` keeps its Holm p.
    family = [r for r in ROWS if CLAIMS["small"][r] is not _no_large_decrease]
    holm = stats.holm_by_name({r: results[r]["t_pvalue"] for r in family}, alpha=ALPHA)
    for row in ROWS:
        res = results[row]
        res["holm_pvalue"] = holm.get(row)
        rows.append([row, ROWS[row][2], n, f"{res['mean_difference']:+.3f}",
                     f"[{res['bootstrap_ci'][0]:+.3f}, {res['bootstrap_ci'][1]:+.3f}]",
                     f"x{math.exp(res['mean_difference']):.3g}", f"{res['t_pvalue']:.2g}",
                     "-" if res["holm_pvalue"] is None else f"{res['holm_pvalue']:.2g}"])
    means = {c: float(np.mean([r["logprob"][c] for r in records])) for c in CONDITIONS}
    top1 = {c: stats.rate(sum(r["rank"][c] == 1 for r in records), n) for c in CONDITIONS}
    base = results["cached vs cached without secret"]
    leak = _significant_positive(base) and _significant_positive(results["cached vs baseline (contrast)"])
    notes = [
        "Mean log-probability (nats) of the secret: " + ", ".join(f"{c} {means[c]:.2f}" for c in CONDITIONS) + ".",
        "Secret ranked first among itself and 7 distractors: "
        + ", ".join(f"{c} {top1[c].format_both()}" for c in CONDITIONS) + ". " + RATE_NOTE,
        "Differences are paired by game (same message tokens, same secret); CI: paired bootstrap (2000 resamples, "
        f"seed {SEED}); p: paired t, Holm at alpha {ALPHA} across the {len(family)} rows whose claim reads it (not "
        "'cached vs baseline', judged by its interval: '-'). 'ratio' = exp(difference): "
        "how many times more probable the secret is under x than under y.",
        "Leakage detected (the secret gains on the distractors when Bob attends to the cached message rather than "
        f"the re-encoded one, and is more probable than behind the same tokens cached without it): "
        f"{'YES' if leak else 'NO'}.",
        f"Wall time {wall} s for the probes run in this session (0.0: all resumed from the log; shared CPU, "
        "inflated by contention).",
    ]
    if sizes(profile)["reduced_from"].get("canary"):
        notes.append(f"Reduced size: {n} games instead of the profile's {sizes(profile)['reduced_from']['canary']}.")
    from choreo.provenance import provenance
    from choreo.report import command_line
    prov = provenance(model, seeds=list(range(n)), sample_sizes={"games": n, "profile": profile},
                      command=command_line(ENV_VARS), message_tokens=MESSAGE_TOKENS[profile], wall_s=wall,
                      logs=log.written_summary())
    folder = Path(results_dir) / "leakage" / "canary"
    columns = ["Comparison (x vs y)", "score", "n", "mean x - y (nats)", "95% CI", "ratio", "p", "p (Holm)"]
    write_table(folder, "canary", title="Canary: log-probability of Alice's secret as Bob's answer",
                columns=columns, rows=rows, data={"comparisons": results, "mean_logprob": means,
                                                  "top1": {c: top1[c].rate for c in CONDITIONS},
                                                  "top1_wilson": {c: top1[c].to_json() for c in CONDITIONS},
                                                  "leak": leak},
                provenance=prov, notes=notes)
    plot_rates(folder / "canary.png", title="Canary: secret top-1 among 8 passwords",
               groups={"top-1": {c: (top1[c].rate, top1[c].low, top1[c].high) for c in CONDITIONS}},
               ylabel="share of games")
    text = markdown_table(columns, rows) + "\n" + "\n".join(notes)
    return {"results": results, "text": text, "leak": leak, "profile": profile}


@pytest.mark.model
@pytest.mark.parametrize("row", list(ROWS))
def test_canary(table, row):
    res, text = table["results"][row], table["text"]
    assert np.isfinite(res["mean_difference"]) and res["bootstrap_ci"][0] <= res["bootstrap_ci"][1], text
    if table["profile"] == "smoke":
        return  # mechanics only: the probe ran, statistics and the table exist
    claim = pick(CLAIMS, table["profile"])[row]
    if claim is None:
        return  # reported in the table without a claim at this profile (CLAIMS)
    assert claim(res), f"{row}: expected {claim.__doc__}\n{text}"


def _significant_positive(res):
    """a significant increase (Holm-adjusted p < alpha, mean > 0)"""
    return res["holm_pvalue"] < ALPHA and res["mean_difference"] > 0


def _significant_negative(res):
    """a significant decrease (Holm-adjusted p < alpha, mean < 0)"""
    return res["holm_pvalue"] < ALPHA and res["mean_difference"] < 0


def _no_large_decrease(res):
    """no decrease beyond 0.1 nats (95% bootstrap interval above -0.1)"""
    return res["bootstrap_ci"][0] > -0.1


# Per profile, row -> claim. `small`: what the embedded SmolLM2-135M measured (see README and
# results/leakage/canary/canary.md): caching alone lowers every password's probability a little (negative
# control vs baseline), and the secret rises above that, both against the negative control and relative to the
# distractors; the raw secret log-probability, cached vs re-encoded, moves little. `paper` asserts what the probe
# is for on any checkpoint -- the leak (the two contrast rows), the positive control, and no large drop of the raw
# secret log-probability under caching -- and reports the negative control vs baseline without a claim: its drop
# is a SmolLM2 measurement that no protocol claims.
CLAIMS = {
    "small": {
        "cached vs baseline": _no_large_decrease,
        "cached vs baseline (contrast)": _significant_positive,
        "cached vs cached without secret": _significant_positive,
        "cached without secret vs baseline": _significant_negative,
        "told vs baseline (positive control)": _significant_positive,
    },
    "paper": {
        "cached vs baseline": _no_large_decrease,
        "cached vs baseline (contrast)": _significant_positive,
        "cached vs cached without secret": _significant_positive,
        "cached without secret vs baseline": None,  # reported, not asserted
        "told vs baseline (positive control)": _significant_positive,
    },
}
