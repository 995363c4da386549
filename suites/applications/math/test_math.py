"""Other applications on MATH: Tree of Thoughts, iterative and parallel multi-agent debate, and the direct call.

Each workflow runs twice on the same problems with the same seeds: re-encoding (Baseline) and choreographed
(Before, i.e. before fine-tuning). Answers are graded programmatically (``choreo.data.math.grade``: the last
``\\boxed{}`` or "ANSWER:", equivalence by ``math_verify``) and kept aligned by problem id, so Before and
Baseline are compared pairwise (exact McNemar, Holm across the workflows). Beside accuracy the table reports
what does not depend on the model being good at MATH: how often the choreographed run ends with the same final
answer as the baseline, and for Tree of Thoughts whether the votes and the winner match.

The fine-tuned rows of the paper (After; the direct call fine-tuned on the workflows' final answers) are not run
by this suite: the table lists them as not run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from choreo import stats
from choreo.data.math import FILE_NAME, equivalent, grade, load_problems, split_problems
from choreo.profiles import pick
from choreo.provenance import provenance
from choreo.report import plot_rates, write_table
from choreo.results import fingerprint, logs_written, resumable, write_text
from choreo.workflows import debate, tot

HERE = Path(__file__).resolve().parent
ALPHA = 0.05
SEED = 0  # problem choice (choreo.data.math.split_problems) and instance seeds (problem i: seed i)
SIZES = {  # problems; Tree-of-Thoughts and debate settings; token caps
    "smoke": dict(n=2, tot=dict(proposals=2, voters=2, propose_tokens=8, vote_tokens=4, answer_tokens=12),
                  debate=dict(rounds=1, agents=2, answer_tokens=10, moderator_tokens=10, summary_tokens=8),
                  direct=dict(answer_tokens=12)),
    # CPU: B = 8 proposals and V = 4 voters as in the paper, debates of up to 3 rounds, shorter answers
    "small": dict(n=40, tot=dict(propose_tokens=64, answer_tokens=192),
                  debate=dict(answer_tokens=128, moderator_tokens=96, summary_tokens=96),
                  direct=dict(answer_tokens=192)),
    "paper": dict(n=500, tot={}, debate={}, direct={}),  # PROTOCOLS: 500 problems, the workflows' defaults
}
WORKFLOWS = {"ToT": "tot", "MAD": "iterative", "MADpar": "parallel"}
# The paper's rows in its order; those this suite does not run are listed as such.
ROWS = ["Direct", "+ ToT fine-tuning", "+ MAD fine-tuning", "ToT Baseline", "ToT Before", "ToT After",
        "MAD Baseline", "MAD Before", "MAD After", "MADpar Baseline", "MADpar Before", "MADpar After"]
NOT_RUN = {"+ ToT fine-tuning", "+ MAD fine-tuning", "ToT After", "MAD After", "MADpar After"}
# The paper's claim "Before < Baseline" is tested only where the baseline solves enough problems for a drop to be
# detectable; below this rate (the embedded 135M model solves almost none) the test reports the floor instead.
MIN_BASELINE_RATE = 0.10


def _configs(sizes):
    return (tot.ToTConfig(**sizes["tot"]), debate.DebateConfig(**sizes["debate"]),
            tot.DirectConfig(**sizes["direct"]))


def _run(model, problems, seeds, *, workflow, condition, configs, progress):
    texts = [p.problem for p in problems]
    tot_config, debate_config, direct_config = configs
    if workflow == "direct":
        return lambda todo, cb: tot.run_condition(model, [texts[i] for i in todo], condition="direct",
                                                  config=direct_config, seeds=[seeds[i] for i in todo],
                                                  progress=progress, on_result=cb)
    if workflow == "tot":
        return lambda todo, cb: tot.run_condition(model, [texts[i] for i in todo], condition=condition,
                                                  config=tot_config, seeds=[seeds[i] for i in todo],
                                                  progress=progress, on_result=cb)
    return lambda todo, cb: debate.run_condition(model, [texts[i] for i in todo], workflow=workflow,
                                                 condition=condition, config=debate_config,
                                                 seeds=[seeds[i] for i in todo], progress=progress, on_result=cb)


def prompts() -> dict:
    """Every prompt the workflows send (with placeholders): logged records are reused only for the same prompts."""
    text = {"tot": [tot.propose_prompt("{problem}"), tot.vote_prompt("{problem}", 0), tot.vote_instruction(0),
                    tot.FINISH_INSTRUCTION, tot.direct_prompt("{problem}")]}
    text["debate"] = {k: v for k, v in vars(debate).items() if k.isupper() and isinstance(v, str)}
    return text


def final_answer(record: dict, gold: str) -> dict:
    """``{"correct", "extracted"}`` of one workflow record. Parallel debate: correct when a majority of the agents
    is correct (2 of 3), and its answer is the most common extracted one (None when no agent's parses)."""
    if "answers" not in record:
        return grade(gold, record["final"])
    graded = [grade(gold, text) for text in record["answers"]]
    answers = [g["extracted"] for g in graded if g["extracted"] is not None]
    common = Counter(answers).most_common(1)
    return {"correct": sum(g["correct"] for g in graded) > len(graded) / 2,
            "extracted": common[0][0] if common else None, "agents_correct": sum(g["correct"] for g in graded)}


def same_answer(a: str | None, b: str | None) -> bool | None:
    """Whether two runs end with the same final answer: None when neither has one (nothing to compare), False
    when only one has one, else whether the answers are equivalent."""
    if a is None or b is None:
        return None if a is None and b is None else False
    return equivalent(a, b)


@pytest.fixture(scope="module")
def table(model, profile, data_dir, results_dir):
    sizes = pick(SIZES, profile)
    n = sizes["n"]
    use_file = data_dir is not None and (Path(data_dir) / FILE_NAME).is_file()
    problems, _ = split_problems(load_problems(data_dir if use_file else None), n_eval=n, seed=SEED)
    source = (f"{Path(data_dir) / FILE_NAME}: {n} problems drawn with seed {SEED} from the id-sorted file"
              if use_file else f"built-in problems (choreo.data.math, not MATH): {n} drawn with seed {SEED}")
    configs = _configs(sizes)
    seeds = list(range(n))
    key = fingerprint(model=model.spec.sha256, problems=[p.to_json() for p in problems],
                      configs=[repr(c) for c in configs], seeds=seeds, prompts=prompts())
    folder = results_dir / "applications" / "math" / "runs"
    logs, t0, runs = [], time.perf_counter(), {}
    arms = [("Direct", "direct", "baseline")] + [
        (f"{name} {label}", workflow, condition) for name, workflow in WORKFLOWS.items()
        for label, condition in (("Baseline", "baseline"), ("Before", "choreographed"))]
    for row, workflow, condition in arms:
        path = folder / f"{workflow}-{condition}-{key}.jsonl"
        logs.append(path)
        runs[row] = resumable(path, list(range(n)), _run(model, problems, seeds, workflow=workflow, condition=condition,
                                                         configs=configs, progress=f"math {row}"))
    wall = time.perf_counter() - t0
    graded = {row: [final_answer(r, p.answer) for r, p in zip(rs, problems)] for row, rs in runs.items()}
    correct = {row: [g["correct"] for g in gs] for row, gs in graded.items()}
    rates = {row: stats.rate(sum(c), n) for row, c in correct.items()}
    unparsed = {row: sum(g["extracted"] is None for g in gs) for row, gs in graded.items()}
    agree = {name: [same_answer(a["extracted"], b["extracted"])
                    for a, b in zip(graded[f"{name} Before"], graded[f"{name} Baseline"])] for name in WORKFLOWS}
    tests = {name: stats.mcnemar_exact(correct[f"{name} Before"], correct[f"{name} Baseline"]) for name in WORKFLOWS}
    holm = dict(zip(tests, map(float, stats.adjust_pvalues([t.pvalue for t in tests.values()], method="holm",
                                                            alpha=ALPHA).adjusted)))
    base_tot, ch_tot = runs["ToT Baseline"], runs["ToT Before"]
    tot_stats = {
        "proposals_identical": sum(a["proposals"] == b["proposals"] for a, b in zip(base_tot, ch_tot)),
        "votes_parsed": {arm: sum(v is not None for r in runs[arm] for v in r["parsed_votes"])
                         for arm in ("ToT Baseline", "ToT Before")},
        "votes": sum(len(r["parsed_votes"]) for r in base_tot),
        "winner_same": sum(a["winner"] == b["winner"] for a, b in zip(base_tot, ch_tot)),
        "no_parsed_vote": {arm: sum(not r["vote_parsed"] for r in runs[arm]) for arm in ("ToT Baseline", "ToT Before")},
    }
    paper = json.loads((HERE / "paper.json").read_text())["rows"]
    rows = []
    for row in ROWS:
        p = paper[row]
        paper_cell = "-" if p["rate"] is None else f"{p['count']} ({p['rate']:.1f}% ± {p['half_width']:.1f}%)"
        if row in NOT_RUN:
            rows.append([row, "not run", "-", "-", "-", paper_cell])
            continue
        name = row.split()[0]
        compared = [x for x in agree[name] if x is not None]
        same = f"{sum(compared)}/{len(compared)}" if row.endswith("Before") else "-"
        rows.append([row, f"{rates[row].successes}/{n}", rates[row].format_both(), f"{unparsed[row]}/{n}", same,
                     paper_cell])
    notes = [
        f"n = {n} problems per row (profile {profile}), the same problems and seeds in every row; {source}.",
        "Rates: the paper's '±' (normal 95% half-width), then the Wilson 95% interval in brackets. Graded by "
        "choreo.data.math.grade: the last \\boxed{} of the final text, else its last 'ANSWER:' line, checked against "
        "the gold \\boxed{} answer with math_verify; 'no answer' counts final texts with neither (graded wrong). "
        "MADpar: correct when a majority of its agents is correct; its answer is the agents' most common one.",
        "'same answer as baseline': problems where the choreographed run's final answer is equivalent to the "
        "baseline's on the same problem, out of those where at least one of the two gave an answer.",
        *[f"{name} Before vs Baseline: difference {t.difference:+.3f} ({t.a_only} problems solved only choreographed, "
          f"{t.b_only} only baseline), exact McNemar p = {t.pvalue:.2g}, Holm-adjusted p = {holm[name]:.2g}."
          for name, t in tests.items()],
        f"ToT: proposals identical in both arms in {tot_stats['proposals_identical']}/{n} problems (same prompts and "
        f"seeds); votes that name an index: {tot_stats['votes_parsed']['ToT Baseline']}/{tot_stats['votes']} "
        f"baseline, {tot_stats['votes_parsed']['ToT Before']}/{tot_stats['votes']} choreographed; same winning "
        f"proposal in {tot_stats['winner_same']}/{n}; problems with no parsed vote (proposal 1 used): "
        f"{tot_stats['no_parsed_vote']['ToT Baseline']} baseline, {tot_stats['no_parsed_vote']['ToT Before']} "
        "choreographed.",
        "Not run by this suite: the fine-tuned rows (After: LoRA on baseline traces replayed through the "
        "choreographed workflow; '+ ToT / MAD fine-tuning': the direct call fine-tuned on the workflows' final "
        "answers).",
        f"Wall time in this session {wall:.0f} s (records already logged in runs/ are reused, not recomputed; "
        "shared CPU: not a benchmark).",
    ]
    data = {"n": n, "profile": profile, "source": source, "problems": [p.id for p in problems],
            "configs": {"tot": vars(configs[0]), "debate": vars(configs[1]), "direct": vars(configs[2])},
            "rates": {row: {"successes": r.successes, "n": r.n, "rate": r.rate, "low": r.low, "high": r.high,
                            "half_width": r.half_width} for row, r in rates.items()},
            "unparsed": unparsed,
            "same_answer_as_baseline": {k: {"same": sum(x is True for x in v), "different": sum(x is False for x in v),
                                            "neither_answered": sum(x is None for x in v)} for k, v in agree.items()},
            "tests": {name: {"a_only": t.a_only, "b_only": t.b_only, "difference": t.difference, "pvalue": t.pvalue,
                             "holm": holm[name]} for name, t in tests.items()},
            "tot": tot_stats, "not_run": sorted(NOT_RUN), "paper": paper, "wall_s": wall,
            "records": f"runs/*-{key}.jsonl"}
    prov = provenance(model, seeds={"problems": SEED, "instances": "problem i uses seed i"},
                      sample_sizes={"problems": n}, profile=profile,
                      logs=logs_written(p for p in logs if p.exists()))
    out = results_dir / "applications" / "math"
    write_table(out, "math", title=f"MATH: problems solved by workflow and implementation (n = {n})",
                columns=["Method", "Count", "Percentage", "no answer", "same answer as baseline", "Paper"],
                rows=rows, data=data, provenance=prov, notes=notes)
    plot_rates(out / "math.png", title=f"MATH (n = {n})", ylabel="solved",
               groups={name: {arm: (rates[f"{name} {arm}"].rate, rates[f"{name} {arm}"].low,
                                    rates[f"{name} {arm}"].high) for arm in ("Baseline", "Before")}
                       for name in WORKFLOWS})
    records = [{"problem": p.id, "gold": p.answer, **{row: {**runs[row][i], "graded": graded[row][i]} for row in runs}}
               for i, p in enumerate(problems)]
    write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {"n": n, "profile": profile, "runs": runs, "graded": graded, "rates": rates, "tests": tests, "holm": holm,
            "tot": tot_stats, "problems": problems, "text": (out / "math.md").read_text()}


@pytest.mark.model
def test_records_are_complete_and_aligned(table):
    """Every row has one graded record per problem, in problem order (paired tests need it)."""
    n, text = table["n"], table["text"]
    for row, records in table["runs"].items():
        assert len(records) == n, f"{row}\n{text}"
        assert all(isinstance(g["correct"], bool) for g in table["graded"][row]), f"{row}\n{text}"
    for a, b in zip(table["runs"]["ToT Baseline"], table["runs"]["ToT Before"]):
        assert len(a["proposals"]) == len(b["proposals"]) and len(a["votes"]) == len(b["votes"]), text


@pytest.mark.model
def test_tot_arms_share_their_proposals(table):
    """The two Tree-of-Thoughts arms encode the same prompts with the same seeds before the votes, so they propose
    the same approaches (float reassociation between batch shapes may flip a rare sampled token)."""
    assert table["tot"]["proposals_identical"] >= table["n"] / 2, table["text"]


@pytest.mark.model
@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_choreographed_solves_fewer_than_baseline(table, workflow):
    """The paper's "Before < Baseline" (ToT 31.4% vs 41.4%, MAD 20.4% vs 33.6%, MADpar 52.2% vs 64.6%)."""
    base = table["rates"][f"{workflow} Baseline"]
    if table["profile"] == "smoke":
        pytest.skip("smoke profile: mechanics only")
    if base.rate < MIN_BASELINE_RATE:
        pytest.skip(f"untestable on this model: the {workflow} baseline solves {base.successes}/{base.n} problems "
                    f"(< {MIN_BASELINE_RATE:.0%}), so no drop can be detected")
    t = table["tests"][workflow]
    assert t.difference < 0 and table["holm"][workflow] < ALPHA, table["text"]
