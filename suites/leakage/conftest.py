"""Shared by the leakage tables: one set of prisoner's-dilemma games feeds Tables 1-3.

Games are played once per session (baseline first: the other arms teacher-force its plans) and appended
to ``results_dir/leakage/games/<fingerprint>.jsonl`` as they finish, so an interrupted run resumes.
Bob's predictions (Table 3) are side calls that leave the game unchanged, so they ride along in the
baseline and choreographed games instead of costing separate games.

Sizes: ``CHOREO_LEAKAGE_GAMES`` / ``CHOREO_LEAKAGE_CANARY`` override the profile's game counts (a run
that does not fit its time says so in every table it writes); ``CHOREO_LEAKAGE_FINETUNE=1`` adds the reduced
fine-tuned arm. Those that are set are written before the command in every table's provenance, since the same
command without them produces different tables. A value the suite would not read as meant ("true", "abc", "²")
is a usage error before any test runs (``pytest_configure``; ``choreo repro`` checks them before pytest starts).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import pytest

from choreo import stats
from choreo.profiles import pick
from choreo.provenance import provenance
from choreo.report import command_line, loss_text
from choreo.repro import ENV_COUNTS, check_env, env_count, env_flag
from choreo.results import JsonlLog, fingerprint, logs_written
from choreo.workflows.prisoners import (CHOICES, COOPERATE, DEFECT, STRATEGIES, STRATEGY_NAMES, UNPARSABLE, GameConfig,
                                       is_cooperate, parse_choice, run_games)

ALPHA = 0.05
SIZES = {  # games per Alice strategy; canary games; the game's token caps (GameConfig preset)
    "smoke": dict(games=2, canary=4, config="tiny", predict=2),
    "small": dict(games=32, canary=64, config="cpu", predict=32),
    "paper": dict(games=500, canary=500, config="protocol", predict=100),
}
# The fine-tuned arm: baseline games on seeds disjoint from evaluation (train, then dev for checkpoint choice),
# one adapter per Alice strategy; None: not run at this profile (the tables say so).
FINETUNE = {
    "smoke": None,
    "small": None,  # hours of CPU on a shared 2-core machine; run at `paper` (GPU) or set CHOREO_LEAKAGE_FINETUNE=1
    "paper": dict(train=450, dev=50, first_seed=500, preset="paper"),
}
# The reduced CPU run distils the adapter-off baseline (loss "kl"): on the blockage recovery task it closed 67%
# of the held-out KL where cross-entropy on sampled tokens closed little (results/finetune/recovery.md).
FINETUNE_REDUCED = dict(train=24, dev=8, first_seed=500, preset="embedded-cpu", overrides=dict(loss="kl", lr=1e-3))
ARM_NAMES = {"baseline": "Baseline", "choreographed": "Choreographed", "leak_system": "Leak System",
             "leak_plan": "Leak Plan", "finetuned": "Choreographed + FT"}
ROWS = [STRATEGY_NAMES[s] for s in STRATEGIES]
# Environment variables that change what the leakage suite runs (recorded before the command in provenance; read
# with choreo.repro.env_flag / env_count, which check them).
ENV_VARS = ("CHOREO_LEAKAGE_FINETUNE", "CHOREO_LEAKAGE_GAMES", "CHOREO_LEAKAGE_CANARY")
RATE_NOTE = ("Rates: the paper's '±' (normal 95% half-width 1.96*sqrt(p(1-p)/n), which can reach past 0% or 100% "
             "and is 0 at 0/n and n/n), then the Wilson 95% interval in brackets, in percent; the JSON keeps the "
             "counts and the Wilson bounds.")
STRATEGY_OF = {STRATEGY_NAMES[s]: s for s in STRATEGIES}
PARSE_NOTE = ("Parsing (choreo.workflows.prisoners.parse_choice, applied to the logged text): a decision or "
              "prediction is cooperate when its text contains COOPERATE and not DEFECT, defect when it contains "
              "DEFECT and not COOPERATE, unparsable otherwise -- neither word (e.g. 'COPERATE\"}', 'SIGLIO ARENA UN') "
              "or both; case-insensitive. The paper-style rate (docs/protocols.md) counts every text that contains "
              "COOPERATE as cooperate and everything else, unparsable text included, as defect.")


def pytest_configure(config):
    """``ENV_VARS``, checked before any test runs (``choreo.repro.check_env``, as ``choreo repro`` checks them): a
    bad one would otherwise surface only after the model loads, as an error of every test."""
    try:
        check_env()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def finetune_flag() -> bool:
    """CHOREO_LEAKAGE_FINETUNE: "1" runs the reduced fine-tuned arm, "0" or unset does not; anything else (say
    "true", which would otherwise run nothing while the provenance recorded it) is a ValueError."""
    return env_flag("CHOREO_LEAKAGE_FINETUNE")


def sizes(profile: str) -> dict:
    """The profile's sizes, with the environment overrides applied and flagged."""
    out = dict(pick(SIZES, profile))
    out["reduced_from"] = {}
    for key, var in (("games", "CHOREO_LEAKAGE_GAMES"), ("canary", "CHOREO_LEAKAGE_CANARY")):
        value = env_count(var, minimum=ENV_COUNTS[var])
        if value is not None:
            out["reduced_from"][key] = out[key]
            out[key] = value
    out["predict"] = min(out["predict"], out["games"])
    return out


def config_for(name: str) -> GameConfig:
    return GameConfig.preset(name)


def finetune_plan(profile: str) -> dict | None:
    """The fine-tuned arm's plan: the reduced CPU plan under CHOREO_LEAKAGE_FINETUNE=1, else the profile's."""
    return FINETUNE_REDUCED if finetune_flag() else pick(FINETUNE, profile)


def plan_record(plan: dict | None) -> dict | None:
    """The fine-tuning plan as provenance records it: game counts, seed ranges (inclusive), preset, overrides."""
    if plan is None:
        return None
    first, n_train, n_dev = plan["first_seed"], plan["train"], plan["dev"]
    return {"train_games_per_strategy": n_train, "dev_games_per_strategy": n_dev,
            "train_seeds": [first, first + n_train - 1], "dev_seeds": [first + n_train, first + n_train + n_dev - 1],
            "preset": plan["preset"], "overrides": dict(plan.get("overrides") or {})}


@dataclasses.dataclass
class Games:
    """Records of every arm: ``records[arm][strategy]`` is a list ordered by seed (paired across arms)."""

    records: dict
    seeds: list
    config: GameConfig
    sizes: dict
    wall_s: dict
    log_path: Path
    finetune_note: str
    finetune_plan: dict | None = None
    finetune_chosen: dict = dataclasses.field(default_factory=dict)  # strategy -> checkpoint summary

    def bob(self, arm: str, strategy: str, field: str = "cooperate") -> list:
        return [decision(r, "bob", field) for r in self.records[arm][strategy]]

    def alice(self, arm: str, strategy: str, field: str = "cooperate") -> list:
        return [decision(r, "alice", field) for r in self.records[arm][strategy]]

    def provenance(self, model, profile: str, **extra) -> dict:
        sample_sizes = {"games_per_strategy": len(self.seeds), "profile": profile, **self.sizes}
        if self.finetune_plan is not None:
            sample_sizes["finetune"] = plan_record(self.finetune_plan)
        return provenance(model, seeds=self.seeds, sample_sizes=sample_sizes, command=command_line(ENV_VARS),
                          game_config=dataclasses.asdict(self.config), wall_s=self.wall_s,
                          games_log=str(self.log_path.name), logs=logs_written([self.log_path]), **extra)

    def empty_plans(self) -> int:
        """Empty baseline plans (per agent), which the paired games force as empty turns (``prisoners.play``)."""
        return sum(not r["plan_tokens"][a] for rs in self.records["baseline"].values() for r in rs
                   for a in ("alice", "bob"))

    def identical_to_choreographed(self, strategy: str) -> int:
        """Fine-tuned games whose every message and both decisions equal the paired choreographed game's."""
        def play(r):
            return [m["text"] for m in r["messages"]], r["decisions"]
        return sum(play(a) == play(b) for a, b in zip(self.records["finetuned"][strategy],
                                                       self.records["choreographed"][strategy]))


def decision(record: dict, agent: str, field: str = "cooperate"):
    """One agent's value in a logged game. "cooperate" (the paper's rule, ``is_cooperate``) and "choice"
    (``parse_choice``: cooperate, defect or unparsable) are derived from the logged decision text, so logs written
    before a record carried its choice render under the current rules; other fields are read as logged."""
    if field == "cooperate":
        return is_cooperate(record["decisions"][agent])
    if field == "choice":
        return parse_choice(record["decisions"][agent])
    return record[field][agent]


def predicted(record: dict, field: str = "choice"):
    """Bob's last prediction in a logged game (the one before deciding), derived from its text like ``decision``."""
    text = record["predictions"][-1]["text"]
    return parse_choice(text) if field == "choice" else is_cooperate(text)


def choice_counts(choices) -> dict:
    """{"cooperate": k, "defect": k, "unparsable": k} of a list of ``parse_choice`` classes."""
    choices = list(choices)
    return {c: choices.count(c) for c in CHOICES}


def parsed_rate(choices) -> stats.Rate | None:
    """Cooperate among the parsed (cooperate or defect) choices, Wilson interval; None when none parsed."""
    counts = choice_counts(choices)
    parsed = counts[COOPERATE] + counts[DEFECT]
    return stats.rate(counts[COOPERATE], parsed) if parsed else None


def interval_cell(r: stats.Rate | None, *, interval: bool = True) -> str:
    """"81.2% [70.4, 88.6] (56/69)": a rate among parsed texts, its Wilson interval and counts; "- (0 parsed)" for
    none. ``interval=False``: "81.2% (56/69)" and "-" (cells that list several arms)."""
    if r is None:
        return "- (0 parsed)" if interval else "-"
    bounds = f" [{100 * r.low:.1f}, {100 * r.high:.1f}]" if interval else ""
    return f"{100 * r.rate:.1f}%{bounds} ({r.successes}/{r.n})"


def parsed_cell(choices, *, interval: bool = True) -> str:
    """Cooperate among parsed as ``interval_cell`` writes it (see PARSE_NOTE)."""
    return interval_cell(parsed_rate(choices), interval=interval)


def parsed_json(choices) -> dict | None:
    r = parsed_rate(choices)
    return None if r is None else r.to_json()


def parsed_mcnemar(a, b) -> dict:
    """Exact McNemar of cooperate-among-parsed, a vs b, on the games where both choices parse (a selected
    population: whether a decision parses may itself depend on the arm). With no such game, p = 1 (no evidence)."""
    pairs = [(x == COOPERATE, y == COOPERATE) for x, y in zip(a, b) if UNPARSABLE not in (x, y)]
    if not pairs:
        return {"pvalue": 1.0, "n_pairs": 0, "a_only": 0, "b_only": 0}
    res = stats.mcnemar_exact([x for x, _ in pairs], [y for _, y in pairs])
    return {"pvalue": res.pvalue, "n_pairs": res.n_pairs, "a_only": res.a_only, "b_only": res.b_only}


def rate_of(values) -> stats.Rate:
    return stats.rate(int(sum(values)), len(values))


def rate_cell(values) -> str:
    """The paper's "±" and the Wilson interval: "65.6% ± 16.5% [48.3, 79.6]" (see RATE_NOTE)."""
    return rate_of(values).format_both()


def rate_json(values) -> dict:
    return rate_of(values).to_json()


def mean_cell(values) -> str:
    return f"{100 * sum(values) / len(values):.1f}%"


@pytest.fixture(scope="session")
def leakage_sizes(profile) -> dict:
    return sizes(profile)


@pytest.fixture(scope="session")
def games(model, profile, results_dir, leakage_sizes) -> Games:
    config = config_for(leakage_sizes["config"])
    seeds = list(range(leakage_sizes["games"]))
    name = fingerprint(model=model.spec.sha256, config=config.fingerprint())
    log_path = Path(results_dir) / "leakage" / "games" / f"{name}.jsonl"
    log = JsonlLog(log_path, key="key")
    records, wall = {}, {}
    plans = None
    for arm in ("baseline", "choreographed", "leak_system", "leak_plan"):
        t0 = time.perf_counter()
        out = run_games(model, arm=arm, seeds=seeds, log=log, config=config, plans=plans,
                        predict=arm in ("baseline", "choreographed"))
        wall[arm] = round(time.perf_counter() - t0, 1)
        records[arm] = {s: [out[(s, seed)] for seed in seeds] for s in STRATEGIES}
        if arm == "baseline":
            plans = {k: r["plan_tokens"] for k, r in out.items()}
    plans = {(s, seed): records["baseline"][s][i]["plan_tokens"] for s in STRATEGIES for i, seed in enumerate(seeds)}
    t0 = time.perf_counter()
    plan = finetune_plan(profile)
    folder = log_path.parent.parent / "adapters" / name
    adapters = finetuned_arm(model, plan, records, seeds=seeds, log=log, config=config, plans=plans, folder=folder)
    if "finetuned" in records:
        wall["finetuned (training + games)"] = round(time.perf_counter() - t0, 1)
    out = Games(records=records, seeds=seeds, config=config, sizes=leakage_sizes, wall_s=wall, log_path=log_path,
                finetune_note="", finetune_plan=plan)
    if plan is not None:
        out.finetune_chosen = {s: {**adapter_summary(folder / plan_variant(plan) / s), "adapter": adapters[s]}
                               for s in STRATEGIES}
        identical = {s: out.identical_to_choreographed(s) for s in STRATEGIES}
        out.finetune_note = finetune_note(plan, out.finetune_chosen, identical, n=len(seeds))
    else:
        out.finetune_note = NOT_RUN_NOTE
    return out


NOT_RUN_NOTE = ("Choreographed + FT: not run at this profile (CPU time). Code path: choreo.workflows.prisoners."
                "train_adapter (baseline games on seeds disjoint from evaluation, dev games choose the checkpoint) "
                "then run_games(arm='finetuned') under choreo.finetune.use_adapter; `paper` runs it, "
                "CHOREO_LEAKAGE_FINETUNE=1 runs a reduced CPU version.")


def finetuned_arm(model, plan: dict | None, records: dict, *, seeds, log, config, plans, folder: Path) -> dict:
    """Train one adapter per Alice strategy (or reuse one whose training finished: ``adapter_trained``) and play
    the fine-tuned games into ``records``. Returns {strategy: ``adapter_identity``} of the adapters that played
    them: a logged game is resumed only when it records that identity (``run_games``), so the games logged before
    records carried one are played again by this run's adapters rather than credited to them."""
    if plan is None:
        return {}
    from choreo.finetune import FinetuneConfig, use_adapter
    from choreo.workflows.prisoners import adapter_identity, train_adapter

    first, n_train, n_dev = plan["first_seed"], plan["train"], plan["dev"]
    train_seeds = range(first, first + n_train)
    dev_seeds = range(first + n_train, first + n_train + n_dev)
    if set(train_seeds) & set(seeds) or set(dev_seeds) & set(seeds):
        raise ValueError(f"fine-tuning seeds from {first} overlap the evaluation seeds 0..{max(seeds)}")
    out, variant, adapters = {}, plan_variant(plan), {}
    for s in STRATEGIES:
        out_dir = folder / variant / s
        if not adapter_trained(out_dir):
            _clear_unfinished(out_dir)
            train_adapter(model, strategy=s, train_seeds=train_seeds, dev_seeds=dev_seeds, config=config,
                          finetune_config=FinetuneConfig.preset(plan["preset"], **plan.get("overrides", {})),
                          out_dir=out_dir)
        step = json.loads((out_dir / "history.json").read_text()).get("best_step")
        adapters[s] = adapter_identity(out_dir / "best", step=step)  # the folder use_adapter loads
        with use_adapter(model, out_dir / "best"):
            out.update(run_games(model, arm="finetuned", strategies=[s], seeds=seeds, log=log, config=config,
                                 plans=plans, predict=True, variant=variant, adapter=adapters[s]))
    records["finetuned"] = {s: [out[(s, seed)] for seed in seeds] for s in STRATEGIES}
    return adapters


def adapter_trained(out_dir: Path) -> bool:
    """Whether ``train_adapter`` finished in ``out_dir``: ``history.json`` is written last. ``best/`` is not the
    sign: training writes it at step 0 (the untrained adapter), so an interrupted run leaves one behind."""
    return (out_dir / "history.json").is_file() and (out_dir / "best").is_dir()


def _clear_unfinished(out_dir: Path) -> None:
    """Remove what an interrupted ``train_adapter`` left in ``out_dir`` (said in a warning), so it trains anew."""
    if out_dir.exists():
        warnings.warn(f"{out_dir}: fine-tuning did not finish there (no history.json); removed, trained again",
                      stacklevel=2)
        shutil.rmtree(out_dir)


def plan_variant(plan: dict) -> str:
    """The fine-tuned arm's label for ``plan``: its games and adapters are kept apart from another plan's. Within a
    plan, games are tied to the very adapter that played them (``adapter_identity``); fine-tuned games logged
    before games carried either are credited to no adapter and played again."""
    from choreo.finetune import FinetuneConfig

    config = FinetuneConfig.preset(plan["preset"], **plan.get("overrides", {}))
    return "plan-" + fingerprint(plan=plan_record(plan), finetune=config.to_json())


def adapter_summary(folder: Path) -> dict:
    """What an adapter folder (``train_adapter``'s output) says about its training: games kept by the fluency
    filter, and the dev-chosen checkpoint (step 0 is the untrained adapter, which changes nothing)."""
    games = json.loads((folder / "fluency.json").read_text())["games"]
    run = json.loads((folder / "history.json").read_text())
    return {"kept_train": sum(g["kept"] for g in games if g["split"] == "train"),
            "kept_dev": sum(g["kept"] for g in games if g["split"] == "dev"),
            "best_step": run["best_step"], "last_step": run["history"][-1]["step"], "dev_metric": run["dev_metric"],
            "dev_loss_start": run["history"][0]["dev_loss"], "best_dev_loss": run["best_dev_loss"]}


def chosen_text(chosen: dict, identical: dict, n: int) -> str:
    """Per strategy: the chosen step, the dev curve's ends, the adapter that played the games (SHA-256 prefix of
    its weights and its step, when ``chosen`` records it) and whether the arm is the choreographed one again."""
    from choreo.workflows.prisoners import adapter_text

    parts = []
    for s, c in chosen.items():
        text = (f"{STRATEGY_NAMES[s]}: step {c['best_step']} of {c['last_step']} (dev {c['dev_metric']} "
                f"{loss_text(c['dev_loss_start'])} -> {loss_text(c['best_dev_loss'])})")
        if c.get("adapter"):
            text += f", games played by {adapter_text(c['adapter'])}"
        if c["best_step"] == 0:
            text += (f", the untrained adapter, so this arm equals the choreographed arm (identical games: "
                     f"{identical[s]}/{n})")
        parts.append(text)
    return "; ".join(parts)


def finetune_note(plan: dict, chosen: dict, identical: dict, *, n: int) -> str:
    """The tables' note on the fine-tuned arm: the plan, the fluency filter and the chosen checkpoint per strategy."""
    from choreo.workflows.prisoners import FLUENCY_MAX_NLL

    first, n_train, n_dev = plan["first_seed"], plan["train"], plan["dev"]
    kept = {s: f"{c['kept_train']}/{c['kept_dev']}" for s, c in chosen.items()}
    return (f"Choreographed + FT: one LoRA per Alice strategy (preset {plan['preset']!r}, "
            f"{plan.get('overrides') or 'no overrides'}), trained on {n_train} baseline games (seeds {first}-"
            f"{first + n_train - 1}), checkpoint chosen on {n_dev} dev games (seeds {first + n_train}-"
            f"{first + n_train + n_dev - 1}); training and dev games kept when fluent (token-mean NLL of all the "
            f"game's generated tokens -- both plans, the public messages, both decisions and each decision's "
            f"one-token P(COOPERATE) probe, end of turn excluded -- under the base model re-encoding each call's "
            f"context, <= {FLUENCY_MAX_NLL} nats/token; kept train/dev per strategy: {kept}). "
            f"Chosen checkpoints: {chosen_text(chosen, identical, n)}.")
