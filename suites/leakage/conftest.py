"""Shared by the leakage tables: one set of prisoner's-dilemma games feeds Tables 1-3.

Games are played once per session (baseline first: the other arms teacher-force its plans) and appended
to ``results_dir/leakage/games/<fingerprint>.jsonl`` as they finish, so an interrupted run resumes.
Bob's predictions (Table 3) are side calls that leave the game unchanged, so they ride along in the
baseline and choreographed games instead of costing separate games.

Sizes: ``CHOREO_LEAKAGE_GAMES`` / ``CHOREO_LEAKAGE_CANARY`` override the profile's game counts (a run
that does not fit its time says so in every table it writes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from choreo import stats
from choreo.profiles import pick
from choreo.provenance import provenance
from choreo.results import JsonlLog
from choreo.workflows.prisoners import STRATEGIES, STRATEGY_NAMES, GameConfig, run_games

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
# The reduced CPU run distils the adapter-off baseline (loss "kl"): on the blockage recovery task it closed 71%
# of the held-out KL where cross-entropy on sampled tokens closed little (results/finetune/recovery.md).
FINETUNE_REDUCED = dict(train=24, dev=8, first_seed=500, preset="embedded-cpu", overrides=dict(loss="kl", lr=1e-3))
ARM_NAMES = {"baseline": "Baseline", "choreographed": "Choreographed", "leak_system": "Leak System",
             "leak_plan": "Leak Plan", "finetuned": "Choreographed + FT"}
ROWS = [STRATEGY_NAMES[s] for s in STRATEGIES]
STRATEGY_OF = {STRATEGY_NAMES[s]: s for s in STRATEGIES}


def sizes(profile: str) -> dict:
    """The profile's sizes, with the environment overrides applied and flagged."""
    out = dict(pick(SIZES, profile))
    out["reduced_from"] = {}
    for key, var in (("games", "CHOREO_LEAKAGE_GAMES"), ("canary", "CHOREO_LEAKAGE_CANARY")):
        if os.environ.get(var):
            value = os.environ[var]
            if not value.isdigit() or int(value) < 2:
                raise ValueError(f"{var} must be an integer >= 2 (games), got {value!r}")
            out["reduced_from"][key] = out[key]
            out[key] = int(value)
    out["predict"] = min(out["predict"], out["games"])
    return out


def config_for(name: str) -> GameConfig:
    return GameConfig.preset(name)


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

    def bob(self, arm: str, strategy: str, field: str = "cooperate") -> list:
        return [r[field]["bob"] for r in self.records[arm][strategy]]

    def alice(self, arm: str, strategy: str, field: str = "cooperate") -> list:
        return [r[field]["alice"] for r in self.records[arm][strategy]]

    def provenance(self, model, profile: str, **extra) -> dict:
        return provenance(model, seeds=self.seeds, sample_sizes={"games_per_strategy": len(self.seeds),
                                                                  "profile": profile, **self.sizes},
                          game_config=dataclasses.asdict(self.config), wall_s=self.wall_s,
                          games_log=str(self.log_path.name), **extra)


def rate_cell(values) -> str:
    return stats.rate(int(sum(values)), len(values)).format()


def mean_cell(values) -> str:
    return f"{100 * sum(values) / len(values):.1f}%"


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    note = finetuned_arm(model, profile, records, seeds=seeds, log=log, config=config, plans=plans,
                         folder=log_path.parent.parent / "adapters" / name)
    if "finetuned" in records:
        wall["finetuned (training + games)"] = round(time.perf_counter() - t0, 1)
    return Games(records=records, seeds=seeds, config=config, sizes=leakage_sizes, wall_s=wall, log_path=log_path,
                 finetune_note=note)


def finetuned_arm(model, profile: str, records: dict, *, seeds, log, config, plans, folder: Path) -> str:
    """Train (or reuse) one adapter per Alice strategy and play the fine-tuned games; returns the tables' note."""
    plan = FINETUNE_REDUCED if os.environ.get("CHOREO_LEAKAGE_FINETUNE") == "1" else pick(FINETUNE, profile)
    if plan is None:
        return ("Choreographed + FT: not run at this profile (CPU time). Code path: choreo.workflows.prisoners."
                "train_adapter (baseline games on seeds disjoint from evaluation, dev games choose the checkpoint) "
                "then run_games(arm='finetuned') under choreo.finetune.use_adapter; `paper` runs it, "
                "CHOREO_LEAKAGE_FINETUNE=1 runs a reduced CPU version.")
    from choreo.finetune import FinetuneConfig, use_adapter
    from choreo.workflows.prisoners import FLUENCY_MAX_NLL, train_adapter

    first, n_train, n_dev = plan["first_seed"], plan["train"], plan["dev"]
    train_seeds = range(first, first + n_train)
    dev_seeds = range(first + n_train, first + n_train + n_dev)
    if set(train_seeds) & set(seeds) or set(dev_seeds) & set(seeds):
        raise ValueError(f"fine-tuning seeds from {first} overlap the evaluation seeds 0..{max(seeds)}")
    out = {}
    for s in STRATEGIES:
        best = folder / s / "best"
        if not best.is_dir():
            train_adapter(model, strategy=s, train_seeds=train_seeds, dev_seeds=dev_seeds, config=config,
                          finetune_config=FinetuneConfig.preset(plan["preset"], **plan.get("overrides", {})),
                          out_dir=folder / s)
        with use_adapter(model, best):
            out.update(run_games(model, arm="finetuned", strategies=[s], seeds=seeds, log=log, config=config,
                                 plans=plans, predict=True))
    records["finetuned"] = {s: [out[(s, seed)] for seed in seeds] for s in STRATEGIES}
    kept, chosen = {}, {}
    for s in STRATEGIES:
        games = json.loads((folder / s / "fluency.json").read_text())["games"]
        kept[s] = "/".join(f"{sum(g['kept'] for g in games if g['split'] == split)}" for split in ("train", "dev"))
        run = json.loads((folder / s / "history.json").read_text())
        chosen[s] = (f"step {run['best_step']} of {run['history'][-1]['step']}, dev {run['dev_metric']} "
                     f"{run['history'][0]['dev_loss']:.3f} -> {run['best_dev_loss']:.3f}")
    return (f"Choreographed + FT: one LoRA per Alice strategy (preset {plan['preset']!r}, "
            f"{plan.get('overrides') or 'no overrides'}), trained on {n_train} "
            f"baseline games (seeds {first}-{first + n_train - 1}), checkpoint chosen on {n_dev} dev games; "
            f"training and dev games kept when fluent (mean NLL of their messages under the base model <= "
            f"{FLUENCY_MAX_NLL} nats/token; kept train/dev per strategy: {kept}); chosen checkpoints: {chosen}.")
