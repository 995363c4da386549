"""Shared by the blockage tables: resumable per-instance runs logged under results/blockage/<table>/runs/."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

from choreo.report import loss_text
from choreo.results import fingerprint, logged_results, logs_written, resumable as results_resumable


# Train/dev split of the fine-tuning traces (docs/protocols.md: 90/10, fixed seed), whatever the LoRA preset's own
# dev_fraction says: the suites split one trace set themselves and record this share in the training summary.
DEV_FRACTION = 0.1


def with_split(summary: dict, *, dev_fraction: float, seed: int) -> dict:
    """``summary`` with the train/dev split that produced it: ``split`` = share, seed and counts, and
    ``config["dev_fraction"]`` set to the share used -- when the counts agree with ``split_traces`` at that share
    (summaries written before the share was recorded carried the preset's unused value).

    Example: a summary with 405 train / 45 dev traces and dev_fraction 0.1 gets
    ``split = {"dev_fraction": 0.1, "seed": 0, "train": 405, "dev": 45}``.
    """
    n_train, n_dev = summary.get("train_traces"), summary.get("dev_traces")
    if n_train is None or n_dev is None:
        return summary
    n = n_train + n_dev
    if n_dev != min(n - 1, max(1, round(n * dev_fraction))):
        return {**summary, "split": {"dev_fraction": None, "seed": seed, "train": n_train, "dev": n_dev}}
    return {**summary, "config": {**summary.get("config", {}), "dev_fraction": dev_fraction},
            "split": {"dev_fraction": dev_fraction, "seed": seed, "train": n_train, "dev": n_dev}}


def resumed_summary(path: Path, *, seed: int) -> dict:
    """The training summary at ``path`` with its split (``with_split`` at ``DEV_FRACTION``), written back when a
    summary from before the split was recorded gains it."""
    from choreo.results import write_json

    summary = json.loads(path.read_text())
    fixed = with_split(summary, dev_fraction=DEV_FRACTION, seed=seed)
    if fixed != summary:
        write_json(path, fixed)
    return fixed


def split_text(summary: dict) -> str:
    """The train/dev split a training summary records, for a table's notes."""
    split = summary.get("split") or {}
    if not split.get("dev_fraction"):
        return "dev share not recorded"
    return f"dev share {split['dev_fraction']}, split seed {split['seed']}"


LOGS_READ: set[Path] = set()  # every run log resumable() read or wrote in this pytest run (for provenance)


def logs_read(folder: Path) -> list[dict]:
    """Which code computed the records a table in ``folder`` used (``choreo.results.logs_written``)."""
    return logs_written(p for p in LOGS_READ if p.parent == Path(folder))


def resumable(folder: Path, name: str, items: Sequence, run: Callable,
              redo: Callable[[object, object], bool] | None = None) -> list:
    """``choreo.results.resumable`` on ``folder/<name>.jsonl``, the log noted for the tables' provenance."""
    path = Path(folder) / f"{name}.jsonl"
    LOGS_READ.add(path)
    return results_resumable(path, items, run, redo)


# ---------------------------------------------------------------------------------------------------------------
# Branch-solve-merge: one study feeds the coverage table and the head-to-head table
# ---------------------------------------------------------------------------------------------------------------

import time

import pytest

BSM_SIZES = {  # concept sets evaluated, concepts per set, token caps (branch, solve, merge), branch mode
    "smoke": dict(n=2, size=6, tokens=(32, 40, 48), branch="halves"),
    "small": dict(n=24, size=12, tokens=(48, 128, 200), branch="halves"),
    "paper": dict(n=50, size=None, tokens=(256, 320, 480), branch="model"),
}
BSM_SEED = 0
BSM_EVAL_SKIP = 100  # CommonGen-Hard: sets 0-99 are for fine-tuning traces, the next ones for evaluation
BSM_ARMS = {"Baseline": "baseline", "Choreographed": "choreographed", "Choreographed + Linearization": "linearized"}
BSM_FINETUNE = {  # baseline traces from separate concept sets (the first ones), LoRA preset and overrides
    "smoke": dict(train=4, preset="smoke", overrides={}),
    # CPU time: 40 concept sets, one epoch distilling the adapter-off baseline (as MultiQA's fine-tuned arm)
    "small": dict(train=40, preset="embedded-cpu", overrides={"epochs": 1, "eval_every": 3, "loss": "kl", "lr": 1e-3}),
    "paper": dict(train=100, preset="paper", overrides={}),  # docs/protocols.md: rank 64, alpha 32, lr 5e-5
}
FINETUNE_ROW = "Choreographed + Fine-tuning"


def finetune_key(eval_key: str, plan: dict, *, teacher: str | None = "as recorded") -> str:
    """A fine-tuned arm's log name: the evaluation's key, the plan, its fine-tuning configuration (before the
    split's dev_fraction is recorded: the committed logs were named so) and, where given, the teacher: BSM's
    replays the traces as recorded (logs from before, whose teacher read the merge's parents reordered, have
    another name); MultiQA's names none (``teacher=None``: its logs were named before the teacher was a part)."""
    from choreo.finetune import FinetuneConfig

    ft = FinetuneConfig.preset(plan["preset"], **plan["overrides"]).to_json()
    return fingerprint(eval=eval_key, plan=plan, ft=ft, **({} if teacher is None else {"teacher": teacher}))


def _finetuned_arm(model, *, plan, config, sizes, data_dir, use_file, sets, seeds, key, folder, out_dir):
    """Train on baseline traces of separate concept sets (dev-selected checkpoint), run the choreographed arm
    with the adapter, then remove the adapter. Returns (results, training summary, the arm's key: its logs' name,
    which names the plan and the fine-tuning config as well as the evaluation)."""
    from choreo.data.concepts import load_concept_sets
    from choreo.finetune import FinetuneConfig, split_traces, trained_adapter
    from choreo.results import write_json
    from choreo.workflows.bsm import as_layout, run_condition

    ft_config = FinetuneConfig.preset(plan["preset"], **plan["overrides"])
    ft_key = finetune_key(key, plan)
    # After the fingerprint (which names the committed logs): the configuration records the split actually used.
    ft_config = dataclasses.replace(ft_config, dev_fraction=DEV_FRACTION)
    log = Path(folder) / f"finetuned-{ft_key}.jsonl"
    LOGS_READ.add(log)
    done = logged_results(log)
    if all(i in done for i in range(len(sets))):  # the arm finished in an earlier session
        summary_path = Path(folder) / f"finetune-{ft_key}.json"
        summary = resumed_summary(summary_path, seed=BSM_SEED) if summary_path.exists() else {"resumed": str(log)}
        return [done[i] for i in range(len(sets))], summary, ft_key
    if use_file:
        train_sets = load_concept_sets(data_dir, n=plan["train"], skip=0)
        train_sets = [c[:sizes["size"]] for c in train_sets] if sizes["size"] else train_sets
    else:
        train_sets = load_concept_sets(None, n=plan["train"], skip=0, size=sizes["size"] or 30, seed=BSM_SEED)
    _, traces = run_condition(model, train_sets, condition="baseline", config=config, trace=True,
                              seeds=[10_000 + i for i in range(len(train_sets))], progress="bsm traces")
    usable = [as_layout(t, "parallel") for t in traces if all(e.tokens for e in t if e.kind == "decode")]
    train_set, dev_set = split_traces(usable, dev_fraction=ft_config.dev_fraction, seed=BSM_SEED)
    with trained_adapter(model, train_set, dev_set, config=ft_config, out_dir=out_dir) as result:
        runs = resumable(folder, f"finetuned-{ft_key}", list(range(len(sets))), lambda todo, cb: run_condition(
            model, [sets[i] for i in todo], condition="choreographed", config=config, seeds=[seeds[i] for i in todo],
            progress="bsm finetuned", on_result=cb))
    summary = {"train_traces": len(train_set), "dev_traces": len(dev_set), "dropped_traces": len(traces) - len(usable),
               **result.summary(), "config": ft_config.to_json()}
    summary = with_split(summary, dev_fraction=ft_config.dev_fraction, seed=BSM_SEED)
    write_json(Path(folder) / f"finetune-{ft_key}.json", summary)
    return runs, summary, ft_key


def stale_judgement(record, pair: tuple[str, str]) -> bool:
    """Whether a logged judgement must be redone for ``pair`` (story A, story B): it kept only the outcome (no raw
    answers), or it names other stories than these (a log of the stories regenerated under the same key). Records
    from before judgements named their stories are read as logged."""
    from choreo.workflows.bsm import stories_digest

    if not isinstance(record, dict):
        return True
    return "stories" in record and record["stories"] != stories_digest(*pair)


@pytest.fixture(scope="session")
def bsm_study(model, profile, data_dir, results_dir, tmp_path_factory):
    from choreo.data.concepts import FILE_NAME, load_concept_sets
    from choreo.profiles import pick
    from choreo.workflows.bsm import BSMConfig, run_condition, run_judge

    sizes = pick(BSM_SIZES, profile)
    use_file = data_dir is not None and (Path(data_dir) / FILE_NAME).is_file()
    if use_file:
        sets = load_concept_sets(data_dir, n=sizes["n"], skip=BSM_EVAL_SKIP)
        sets = [s[:sizes["size"]] for s in sets] if sizes["size"] else sets
        source = f"{Path(data_dir) / FILE_NAME} rows {BSM_EVAL_SKIP}-{BSM_EVAL_SKIP + sizes['n'] - 1}" + \
            (f", first {sizes['size']} concepts of each" if sizes["size"] else "")
    else:
        sets = load_concept_sets(None, n=sizes["n"], skip=BSM_EVAL_SKIP, size=sizes["size"] or 30, seed=BSM_SEED)
        source = "built-in concept list (choreo.data.concepts), seeded draws"
    b, s, m = sizes["tokens"]
    config = BSMConfig(branch_tokens=b, solve_tokens=s, merge_tokens=m, branch=sizes["branch"])
    seeds = [BSM_SEED + i for i in range(len(sets))]
    key = fingerprint(model=model.spec.sha256, sets=sets, config=config, seeds=seeds)
    folder = results_dir / "blockage" / "bsm" / "runs"
    t0 = time.perf_counter()
    runs = {}
    for row, cond in BSM_ARMS.items():
        runs[row] = resumable(folder, f"{cond}-{key}", list(range(len(sets))), lambda todo, cb, cond=cond: (
            run_condition(model, [sets[i] for i in todo], condition=cond, config=config,
                          seeds=[seeds[i] for i in todo], progress=f"bsm {cond}", on_result=cb)))
    plan, finetune, ft_key = pick(BSM_FINETUNE, profile), None, None
    if plan is not None:
        runs[FINETUNE_ROW], finetune, ft_key = _finetuned_arm(
            model, plan=plan, config=config, sizes=sizes, data_dir=data_dir, use_file=use_file, sets=sets,
            seeds=seeds, key=key, folder=folder, out_dir=tmp_path_factory.mktemp("bsm-finetune"))
    runs = {row: [_rescore(r, sets[i]) for i, r in enumerate(rs)] for row, rs in runs.items()}
    judged = {}
    for row in [r for r in runs if r != "Baseline"]:  # the judge is the base model (no adapter)
        pairs = [(a["merged"], b["merged"]) for a, b in zip(runs["Baseline"], runs[row])]
        # Records that kept only the outcome are judged again (greedy, cheap) for the raw answers of both orders.
        # A fine-tuned row's verdicts are keyed like its stories (plan and config too): other stories, other log.
        name = f"judge-{BSM_ARMS[row]}-{key}" if row in BSM_ARMS else f"judge-finetuned-{ft_key}"
        judged[row] = resumable(folder, name, pairs, lambda todo, cb: run_judge(
            model, todo, progress="bsm judge", on_result=cb), redo=stale_judgement)
    return {"profile": profile, "sizes": sizes, "sets": sets, "source": source, "config": config, "seeds": seeds,
            "runs": runs, "judged": judged, "wall_s": time.perf_counter() - t0, "key": key, "finetune": finetune,
            "finetune_note": (f"{FINETUNE_ROW}: not run at profile {profile} (CPU time; it runs at smoke for the "
                              "mechanics and at paper)." if plan is None else
                              f"{FINETUNE_ROW}: LoRA preset {plan['preset']!r} on baseline traces of {plan['train']} "
                              f"separate concept sets (replayed as the choreographed layout), checkpoint chosen on a "
                              f"disjoint dev split: {_ft_summary(finetune)}.")}


def _rescore(record: dict, concepts) -> dict:
    """Coverage recomputed from the logged texts with the current matcher (logs keep texts; scoring may improve)."""
    from choreo.data.concepts import coverage

    if not record["parsed"]:
        return record
    story, groups = record["merged"], record["groups"]
    return {**record, "coverage": {m: coverage(concepts, story, method=m) for m in ("word", "substring")},
            "group_coverage": {m: [coverage(g, story, method=m) for g in groups] for m in ("word", "substring")}}


def _ft_summary(summary):
    if not summary or "best_step" not in summary:
        return f"resumed from {summary}"
    config = summary.get("config", {})
    criterion = config.get("dev_metric") or config.get("loss", "ce")
    curve = ", ".join(f"{loss_text(h['dev_loss'])} (step {h['step']})" for h in summary.get("history", [])
                      if "dev_loss" in h)
    chosen = f"step {summary['best_step']}" + (" (the untrained adapter: this arm then equals the choreographed one)"
                                               if summary["best_step"] == 0 else "")
    return (f"loss {config.get('loss', 'ce')!r}, lr {config.get('lr')}, {summary['train_traces']} train / "
            f"{summary['dev_traces']} dev traces ({split_text(summary)}), {summary['steps']} steps; "
            f"dev {criterion}: {curve}; "
            f"chosen: {chosen}")
