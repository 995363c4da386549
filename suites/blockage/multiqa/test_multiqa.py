"""MultiQA (information blockage): Q1 / Q2 / both correct by condition, same tokens in every condition."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from choreo import stats
from choreo.data.trivia import grade, load_questions, make_pairs, split_questions
from choreo.profiles import pick
from choreo.provenance import provenance
from choreo.report import loss_text, plot_rates, write_table
from choreo.results import write_text
from choreo.workflows.multiqa import MultiQAConfig, collect_traces, run_condition

from ..conftest import (DEV_FRACTION, LOGS_READ, fingerprint, finetune_key, logs_read, resumable, resumed_summary,
                        split_text, with_split)

HERE = Path(__file__).resolve().parent
SIZES = {"smoke": 4, "small": 100, "paper": 500}  # question pairs
SEED = 0
ALPHA = 0.05
ROWS = ["baseline", "choreographed", "choreographed+linearized", "choreographed+finetuned"]
CONDITION = {"baseline": "baseline", "choreographed": "choreographed", "choreographed+linearized": "linearized"}
FINETUNE = {  # training pairs (baseline traces, DEV_FRACTION of them dev), LoRA preset and overrides
    "smoke": dict(train=6, preset="smoke", overrides={}),
    # The paper's 450 training pairs, one epoch, LoRA rank 16 (traces, training and the evaluation with the
    # adapter took 629 s, about 10 minutes, on the shared 2-core CPU: results/blockage/multiqa/multiqa.md). It
    # distils the adapter-off baseline (loss "kl", lr chosen on dev for the blockage recovery task,
    # results/finetune/recovery.md): on 60 pairs, cross-entropy (10 steps) gave 0/100 both correct and KL
    # (26 steps) 1/100 (runs/finetuned-*.json).
    "small": dict(train=450, preset="embedded-cpu", overrides={"epochs": 1, "eval_every": 25, "loss": "kl",
                                                               "lr": 1e-3}),
    "paper": dict(train=450, preset="paper", overrides={}),  # docs/protocols.md: rank 64, alpha 32, lr 5e-5
}
TRAIN_SEED = 1
# Share of the questions set aside for fine-tuning pairs (split_questions, seed SEED): no evaluation pair asks one
# of them, so the fine-tuned arm cannot pass by learning the baseline's answers to the evaluation questions.
TRAIN_SHARE = 0.4


def _finetuned(model, profile, train_questions, pairs, config, key, folder):
    """Train on baseline traces of pairs of the questions set aside for training (dev-selected checkpoint), run
    the choreographed condition on the evaluation pairs with the adapter, remove it. Resumes from the logged
    results when the arm finished earlier."""
    from choreo.finetune import FinetuneConfig, split_traces, trained_adapter
    from choreo.results import logged_results, write_json

    plan = pick(FINETUNE, profile)
    ft_config = FinetuneConfig.preset(plan["preset"], **plan["overrides"])
    name = f"finetuned-{finetune_key(key, plan, teacher=None)}"
    # After the fingerprint (which names the committed logs): the configuration records the split actually used.
    ft_config = dataclasses.replace(ft_config, dev_fraction=DEV_FRACTION)
    LOGS_READ.add(folder / f"{name}.jsonl")
    done = logged_results(folder / f"{name}.jsonl")
    summary_path = folder / f"{name}.train.json"
    if all(i in done for i in range(len(pairs))) and summary_path.exists():
        return [done[i] for i in range(len(pairs))], resumed_summary(summary_path, seed=SEED)
    # distinct pairs: a pair drawn twice would give one trace (greedy) on both sides of the train/dev split
    distinct = {(a.id, b.id): (a, b) for a, b in make_pairs(train_questions, 3 * plan["train"], seed=TRAIN_SEED)}
    train_pairs = list(distinct.values())[:plan["train"]]
    traces = collect_traces(model, train_pairs, config=config, progress="multiqa traces")
    traces = [t for t in traces if all(e.tokens for e in t if e.kind == "decode")]
    train_set, dev_set = split_traces(traces, dev_fraction=ft_config.dev_fraction, seed=SEED)
    t0 = time.perf_counter()
    with trained_adapter(model, train_set, dev_set, config=ft_config) as trained:
        results = resumable(folder, name, pairs, lambda todo, cb: run_condition(
            model, todo, condition="choreographed", config=config, progress="multiqa finetuned", on_result=cb))
    summary = trained.summary()
    summary.update(train_traces=len(train_set), dev_traces=len(dev_set), train_pairs=len(train_pairs),
                   train_questions=len(train_questions), train_seconds=time.perf_counter() - t0,
                   config=ft_config.to_json(),
                   shared_questions=len({q.id for p in train_pairs for q in p} & {q.id for p in pairs for q in p}))
    summary = with_split(summary, dev_fraction=ft_config.dev_fraction, seed=SEED)
    write_json(summary_path, summary)
    return results, summary


def regraded(results, pairs):
    """The logged results with each response graded again by ``choreo.data.trivia.grade`` as it is now (the logs
    keep the responses), so a change of the grader reaches the table without rerunning the model."""
    out = []
    for result, pair in zip(results, pairs):
        correct = grade(result["response"], pair)
        out.append({**result, "correct": correct, "both": all(correct)})
    return out


def _rates(results, key):
    return [r["correct"][0] for r in results] if key == "Q1" else \
        [r["correct"][1] for r in results] if key == "Q2" else [r["both"] for r in results]


def claim_tests(runs: dict) -> dict[str, stats.McNemarResult]:
    """The table's claims (Holm-adjusted together). Each name reads "x > y" or "x < y" and its McNemar test is
    run as (x, y), so ``difference`` = rate(x) - rate(y) has the sign the name states when the claim holds."""
    def outcome(row, key):
        return _rates(runs[row], key)

    return {
        "choreographed both < baseline both": stats.mcnemar_exact(outcome("choreographed", "Both"),
                                                                  outcome("baseline", "Both")),
        "finetuned both > choreographed both": stats.mcnemar_exact(outcome("choreographed+finetuned", "Both"),
                                                                   outcome("choreographed", "Both")),
        "linearized Q2 > linearized Q1": stats.mcnemar_exact(outcome("choreographed+linearized", "Q2"),
                                                             outcome("choreographed+linearized", "Q1")),
        "linearized both < baseline both": stats.mcnemar_exact(outcome("choreographed+linearized", "Both"),
                                                               outcome("baseline", "Both")),
    }


@pytest.fixture(scope="module")
def table(model, profile, results_dir):
    n = pick(SIZES, profile)
    config = MultiQAConfig()
    questions = load_questions()
    eval_questions, train_questions = split_questions(questions, train_share=TRAIN_SHARE, seed=SEED)
    pairs = make_pairs(eval_questions, n, seed=SEED)
    key = fingerprint(model=model.spec.sha256, pairs=[[q.to_json() for q in p] for p in pairs], config=vars(config))
    folder = results_dir / "blockage" / "multiqa" / "runs"
    t0 = time.perf_counter()
    runs = {}
    for name, cond in [*CONDITION.items(), ("serial check", "serial")]:
        runs[name] = resumable(folder, f"{cond}-{key}", pairs, lambda todo, cb, cond=cond: run_condition(
            model, todo, condition=cond, config=config, progress=f"multiqa {cond}", on_result=cb))
    ft, ft_summary = _finetuned(model, profile, train_questions, pairs, config, key, folder)
    runs["choreographed+finetuned"] = ft
    runs = {name: regraded(results, pairs) for name, results in runs.items()}
    wall = time.perf_counter() - t0
    base, serial = runs["baseline"], runs["serial check"]
    identical = sum(a["response"] == b["response"] for a, b in zip(base, serial))
    tests = claim_tests(runs)
    holm = stats.holm_by_name({name: t.pvalue for name, t in tests.items()}, alpha=ALPHA)
    ft_both, base_both = _rates(runs["choreographed+finetuned"], "Both"), _rates(base, "Both")
    vs_base = stats.mcnemar_exact(ft_both, base_both)
    tost = stats.tost_paired_proportions(ft_both, base_both, margin=EQUIVALENCE_MARGIN, alpha=ALPHA)
    rates = {row: {k: stats.rate(sum(_rates(runs[row], k)), n) for k in ("Q1", "Q2", "Both")} for row in ROWS}
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    rows = [[row] + [rates[row][k].format_both() for k in ("Q1", "Q2", "Both")]
            + [" / ".join(f"{paper[row][k]:.1f}" for k in ("Q1", "Q2", "Both"))] for row in ROWS]
    ft_note = (f"choreographed+finetuned: LoRA (preset {pick(FINETUNE, profile)['preset']!r}, rank "
               f"{ft_summary['config']['lora_rank']}, loss {ft_summary['config'].get('loss', 'ce')!r}, "
               f"lr {ft_summary['config']['lr']}, "
               f"{ft_summary['steps']} optimizer steps "
               f"of {ft_summary['config']['grad_accum']} instances) on baseline traces of "
               f"{ft_summary['train_pairs']} question pairs drawn from the {ft_summary['train_questions']} questions "
               f"set aside for fine-tuning ({TRAIN_SHARE:.0%} of the {len(questions)}, seed {SEED}; "
               f"{ft_summary['shared_questions']} of them in an evaluation pair), replayed as the parallel layout; "
               f"{ft_summary['train_traces']} train / "
               f"{ft_summary['dev_traces']} dev traces ({split_text(ft_summary)}), checkpoint chosen on dev "
               f"(best step {ft_summary['best_step']} of "
               f"{ft_summary['steps']}, dev "
               f"{ft_summary['config'].get('dev_metric') or ft_summary['config'].get('loss', 'ce')} "
               f"{loss_text(ft_summary['history'][0]['dev_loss'])} -> "
               f"{loss_text(ft_summary['best_dev_loss'])}); traces, training and the evaluation with the adapter took "
               f"{ft_summary['train_seconds']:.0f} s.")
    reuse = max(Counter(q.id for p in pairs for q in p).values())
    notes = [f"n = {n} question pairs per condition (profile {profile}), greedy; the same pairs in every condition, "
             f"drawn from the {len(eval_questions)} evaluation questions "
             + ("(no two pairs share a question); " if reuse == 1 else
                f"(a question is in up to {reuse} pairs: pairs that share a question are not independent, which "
                "the McNemar tests below assume); ")
             + "'±' is the normal 95% half-width as in the paper, then the Wilson 95% interval in brackets (also in "
             "the JSON).",
             f"Serial segments under the choreographed executor reproduce the baseline response in "
             f"{identical}/{n} pairs.",
             *[f"{name}: difference {t.difference:+.3f}, exact McNemar p = {t.pvalue:.2g}, "
               f"Holm-adjusted p = {holm[name]:.2g}"
               for name, t in tests.items()],
             f"finetuned both vs baseline both: difference {vs_base.difference:+.3f}, exact McNemar p = "
             f"{vs_base.pvalue:.2g}; TOST within ±{100 * EQUIVALENCE_MARGIN:.0f} points: "
             f"{100 * (1 - 2 * ALPHA):.0f}% interval [{tost.low:+.3f}, {tost.high:+.3f}], p = {tost.pvalue:.2g} "
             f"({'equivalent' if tost.equivalent else 'equivalence not shown'}).",
             ft_note,
             f"Wall time in this session {wall:.0f} s for {len(runs)} conditions (records already logged in "
             f"runs/*-{key}.jsonl are reused, not recomputed; shared, contended CPU: not a benchmark)."]
    data = {"n": n, "profile": profile, "config": vars(config) if hasattr(config, "__dict__") else str(config),
            "rates": {row: {k: {"successes": r.successes, "n": r.n, "rate": r.rate, "low": r.low, "high": r.high,
                                "half_width": r.half_width} for k, r in rs.items()} for row, rs in rates.items()},
            "serial_identical": identical,
            "tests": {name: {"a_only": t.a_only, "b_only": t.b_only, "difference": t.difference, "pvalue": t.pvalue,
                             "holm": holm[name]} for name, t in tests.items()},
            "finetuned_vs_baseline": {"difference": vs_base.difference, "mcnemar_p": vs_base.pvalue,
                                      "tost": {"margin": tost.margin, "low": tost.low, "high": tost.high,
                                               "pvalue": tost.pvalue, "equivalent": tost.equivalent}},
            "paper": paper, "wall_s": wall, "finetune": ft_summary, "records": f"runs/*-{key}.jsonl"}
    prov = provenance(model, seeds={"question_split": SEED, "evaluation_pairs": SEED, "training_pairs": TRAIN_SEED,
                                    "train_dev_split": SEED},
                      sample_sizes={"pairs": n, "evaluation_questions": len(eval_questions),
                                    "training_questions": len(train_questions),
                                    "training_pairs": ft_summary.get("train_pairs"),
                                    "train_traces": ft_summary.get("train_traces"),
                                    "dev_traces": ft_summary.get("dev_traces")}, profile=profile,
                      logs=logs_read(folder))
    out = results_dir / "blockage" / "multiqa"
    write_table(out, "multiqa", title=f"MultiQA: questions answered correctly by condition (% , n = {n})",
                columns=["Condition", "Q1", "Q2", "Both", "Paper Q1 / Q2 / Both"], rows=rows, data=data,
                provenance=prov, notes=notes)
    plot_rates(out / "multiqa.png", title=f"MultiQA (n = {n})", ylabel="correct",
               groups={k: {row: (rates[row][k].rate, rates[row][k].low, rates[row][k].high) for row in ROWS}
                       for k in ("Q1", "Q2", "Both")})
    records = [{"pair": i, "questions": [q.to_json() for q in p],
                **{name: runs[name][i] for name in runs}} for i, p in enumerate(pairs)]
    write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    text = (out / "multiqa.md").read_text()
    return {"n": n, "profile": profile, "runs": runs, "rates": rates, "tests": tests, "holm": holm,
            "identical": identical, "text": text}


@pytest.mark.model
@pytest.mark.parametrize("row", ROWS)
def test_multiqa(table, row):
    text, runs = table["text"], table["runs"]
    condition_runs = runs[row]
    assert len(condition_runs) == table["n"], text
    assert all(isinstance(r["response"], str) and len(r["correct"]) == 2 for r in condition_runs), text
    if row == "baseline":
        # Mechanics at every profile: serial segments reproduce the baseline (float reassociation may flip a rare tie).
        assert table["identical"] >= 0.95 * table["n"], text
        if table["profile"] != "smoke":
            assert table["rates"]["baseline"]["Both"].successes > 0, text
        return
    if table["profile"] == "smoke":
        return
    if row == "choreographed+finetuned":
        for name, direction in FINETUNE_CLAIMS:
            t = table["tests"][name]
            if direction == "greater":
                assert t.difference > 0 and table["holm"][name] < ALPHA, f"{name}\n{text}"
            else:  # "not detected": no recovery at this training budget (the raw p: Holm only makes it easier)
                assert t.pvalue >= ALPHA, f"{name}\n{text}"
        return
    name = f"{'choreographed' if row == 'choreographed' else 'linearized'} both < baseline both"
    both = table["tests"][name]
    assert both.difference < 0 and table["holm"][name] < ALPHA, text
    if row == "choreographed+linearized":
        bias = table["tests"]["linearized Q2 > linearized Q1"]
        assert bias.difference > 0 and table["holm"]["linearized Q2 > linearized Q1"] < ALPHA, text


# What fine-tuning was measured to do on the embedded model at `small` (see README). With the paper's 450 training
# pairs (one epoch, 102 steps distilling the baseline) dev KL falls from 0.234 to 0.042 nats/token and both-correct
# recovers from 0/100 to 18/100 (baseline 17/100): the paper's direction (0.4% -> 48.8%). On 60 pairs it did not
# (KL, 26 steps: 1/100; cross-entropy, 10 steps: 0/100).
FINETUNE_CLAIMS = [("finetuned both > choreographed both", "greater")]
# Equivalence of fine-tuned and baseline both-correct is reported (TOST at this margin, in rate points), not asserted.
EQUIVALENCE_MARGIN = 0.10
