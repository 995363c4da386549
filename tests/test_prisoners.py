"""The prisoner's dilemma workflow: every arm runs, ablation copies see exactly one channel, Bob's predictions
never change the game, and runs resume from their log without redoing or losing games.

Mechanics only, so the games run on a tiny random model (fp64: replays are exact); the behaviour of the real
model is the reproduction suite's business (suites/leakage/).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import choreo
from choreo.results import JsonlLog
from choreo.workflows import prisoners as pd

TINY = pd.GameConfig.preset("tiny")
# Adapter identities (``adapter_identity``) that name no real adapter: run_games records them, it cannot check them.
ADAPTER_A = {"sha256": "a" * 64, "step": 3}
ADAPTER_B = {"sha256": "b" * 64, "step": 3}


def _run(model, tmp_path, arm, *, seeds=(0, 1), plans=None, predict=False, name="games.jsonl", adapter=None):
    log = JsonlLog(tmp_path / name, key="key")
    return pd.run_games(model, arm=arm, strategies=["defect"], seeds=seeds, log=log, config=TINY, plans=plans,
                        predict=predict, progress=False, adapter=adapter)


@pytest.fixture(scope="module")
def model(tiny_gqa):
    return tiny_gqa


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory):
    return _run(model, tmp_path_factory.mktemp("pd"), "baseline", predict=True)


def _plans(baseline):
    return {k: r["plan_tokens"] for k, r in baseline.items()}


@pytest.mark.parametrize("arm", ["choreographed", "leak_system", "leak_plan", "finetuned"])
def test_every_arm_plays_paired_games(model, tmp_path, baseline, arm):
    out = _run(model, tmp_path, arm, plans=_plans(baseline), adapter=ADAPTER_A if arm == "finetuned" else None)
    for key, record in out.items():
        base = baseline[key]
        assert record["arm"] == arm and record["order"] == pd.turn_order(key[1])
        assert record["plan_tokens"] == base["plan_tokens"]  # teacher-forced from the paired baseline game
        assert [m["author"] for m in record["messages"]] == [m["author"] for m in base["messages"]]
        assert len(record["messages"]) == 2 * TINY.rounds
        assert all(0.0 <= record["p_cooperate"][a] <= 1.0 for a in pd.AGENTS)
        assert record["cooperate"]["bob"] == pd.is_cooperate(record["decisions"]["bob"])
        assert record["choice"] == {a: pd.parse_choice(record["decisions"][a]) for a in pd.AGENTS}
        assert record["plan_source"] == {"alice": "forced", "bob": "forced"}
        assert record.get("adapter") == (ADAPTER_A if arm == "finetuned" else None)


def test_baseline_records_choices_and_sampled_plans(baseline):
    for record in baseline.values():
        assert record["plan_source"] == {"alice": "sampled", "bob": "sampled"}
        assert record["choice"] == {a: pd.parse_choice(record["decisions"][a]) for a in pd.AGENTS}
        predictions = record["predictions"]
        assert [p["choice"] for p in predictions] == [pd.parse_choice(p["text"]) for p in predictions]


@pytest.mark.parametrize("arm", ["baseline", "choreographed", "leak_plan"])
def test_an_empty_paired_plan_is_forced_empty_and_recorded(model, baseline, arm):
    """A paired plan of no tokens is teacher-forced as an empty turn (never resampled), and the record says so;
    the other plan stays forced. Leak Plan's copies of an empty plan's author see nothing."""
    base = baseline[("defect", 0)]
    plans = {"alice": [], "bob": base["plan_tokens"]["bob"]}
    executor = choreo.Baseline(model) if arm == "baseline" else choreo.Choreographer(model)
    runner = choreo.Runner(executor, progress=False, trace=True)
    game = runner.run([lambda s: pd.play(s, strategy="defect", seed=0, arm=arm, plans=plans, config=TINY)])[0]
    assert game["plan_source"] == {"alice": "forced empty", "bob": "forced"}
    assert game["plan_tokens"] == {"alice": [], "bob": base["plan_tokens"]["bob"]}
    assert game["plans"]["alice"] == ""
    assert len(game["messages"]) == 2 * TINY.rounds
    if arm == "leak_plan":
        events = runner.traces[0]
        copies = _copies(events)
        assert sorted(events[c].role for c in copies) == ["assistant:alice"] * 2 + ["assistant:bob"] * 2
        for c in copies:
            if events[c].role == "assistant:alice":
                assert events[c].parents == (), "a copy of an empty plan's author sees nothing"
            else:
                _assert_sees_only_its_authors_channel(events, c, "plan")


def test_plan_sources():
    assert pd.plan_sources({"alice": (), "bob": [7]}) == {"alice": "forced empty", "bob": "forced"}
    assert pd.plan_sources(None) == {"alice": "sampled", "bob": "sampled"}
    with pytest.raises(ValueError, match=r"plans must hold token lists for both agents .*none for \['bob'\]"):
        pd.plan_sources({"alice": [1]})


# The three classes of a decision or prediction, on the texts the embedded model writes and a few made up.
CHOICE_TEXTS = [
    ('COOPERATE"}', "cooperate"), ('COOPERATE"}\n', "cooperate"), ("cooperate", "cooperate"),
    ('Cooperate"} is', "cooperate"), ('DEFECT"}', "defect"), ("defect.", "defect"), ('I chose DEFECT"}', "defect"),
    ('Defect"} or {"decision', "defect"), ('COPERATE"}', "unparsable"), ("COPE}This is the", "unparsable"),
    ('UNKNOWN"}', "unparsable"), ("SIGLIO ARENA UN", "unparsable"), ("", "unparsable"),
    ("COOPERATE or DEFECT", "unparsable"), ("defectxcooperate", "unparsable"),
]


@pytest.mark.parametrize("text,expected", CHOICE_TEXTS, ids=[repr(t) for t, _ in CHOICE_TEXTS])
def test_parse_choice_three_classes(text, expected):
    assert pd.parse_choice(text) == expected
    if expected != "unparsable":  # the paper's rule agrees on every parsed text
        assert pd.is_cooperate(text) == (expected == "cooperate")


def test_turn_orders_alternate(baseline):
    firsts = {seed: r["messages"][0]["author"] for (_, seed), r in baseline.items()}
    assert firsts == {0: "alice", 1: "bob"}


def _trace(model, arm, plans=None, *, wrap=lambda ex: ex):
    ex = (choreo.Baseline if arm == "baseline" else choreo.Choreographer)(model)
    runner = choreo.Runner(ex, progress=False, trace=True)
    runner.run([lambda s: pd.play(wrap(s), strategy="defect", seed=0, arm=arm, plans=plans, config=TINY)])
    return runner.traces[0]


def _public(events) -> list[int]:
    """Indices of the public messages as their authors wrote them (sampled, or forced by ``_EmptyMessages``)."""
    return [i for i, e in enumerate(events) if e.kind == "decode" and e.prefix.startswith("To ")
            and e.max_tokens == TINY.message_tokens]


def _copies(events) -> list[int]:
    """Indices of the ablations' teacher-forced copies of public messages."""
    return [i for i, e in enumerate(events) if e.kind == "decode" and e.prefix.startswith("To ")
            and e.max_tokens != TINY.message_tokens]


def _assert_sees_only_its_authors_channel(events, c, channel):
    """The copy ``events[c]`` attends to one event: its author's system prompt, or its author's plan re-encoded
    alone (a teacher-forced turn of the plan's tokens without parents) -- never a public message, never the
    reader's channel."""
    copy = events[c]
    author = copy.role.removeprefix("assistant:")
    assert len(copy.parents) == 1, f"copy {c} sees {copy.parents}: one channel, never the original message"
    (parent,) = copy.parents
    seen = events[parent]
    assert parent not in _public(events)
    if channel == "system":
        assert seen.kind == "prefill" and seen.role == "system" and seen.parents == ()
        assert seen.text.startswith(f"You are {author.capitalize()}."), (c, seen.text[:40])
    else:
        (plan,) = [e for e in events if e.kind == "decode" and e.role == copy.role
                   and e.max_tokens == TINY.plan_tokens and e.prefix == ""]  # the author's plan in the game
        assert seen.kind == "decode" and seen.parents == () and seen.forced and seen.role == copy.role
        assert seen.tokens == plan.tokens and seen.prefix == ""


@pytest.mark.parametrize("arm,channel", [("leak_system", "system"), ("leak_plan", "plan")])
def test_ablation_copies_attend_to_exactly_their_channel(model, baseline, arm, channel):
    events = _trace(model, arm, plans=baseline[("defect", 0)]["plan_tokens"])
    public, copies = _public(events), _copies(events)
    assert len(public) == 4 and len(copies) == 4
    for c, original in zip(copies, public):  # each copy follows its original
        assert c > original and events[c].tokens == events[original].tokens and events[c].forced
        assert events[c].role == events[original].role and events[c].prefix == events[original].prefix
        _assert_sees_only_its_authors_channel(events, c, channel)


class _EmptyMessages:
    """A session whose agents write empty public messages (the model ending its turn at once): every message
    call is teacher-forced to no tokens; all else passes through."""

    def __init__(self, ex):
        self._ex = ex

    def __getattr__(self, name):
        return getattr(self._ex, name)

    async def decode(self, *args, **kwargs):
        if kwargs.get("prefix", "").startswith("To ") and kwargs.get("max_tokens") == TINY.message_tokens:
            kwargs["teacher_tokens"] = []
        return await self._ex.decode(*args, **kwargs)


@pytest.mark.parametrize("arm,channel", [("leak_system", "system"), ("leak_plan", "plan")])
def test_an_empty_message_is_copied_seeing_only_the_channel(model, baseline, arm, channel):
    """An empty public message still has an encoding (header, "To ...: " prefix, end of turn), and the original's
    saw the author's whole context: the reader attends to a copy of it that sees only the channel."""
    events = _trace(model, arm, plans=baseline[("defect", 0)]["plan_tokens"], wrap=_EmptyMessages)
    public, copies = _public(events), _copies(events)
    assert len(public) == 4 and all(events[i].tokens == () for i in public)
    assert len(copies) == 4 and all(events[c].tokens == () for c in copies)
    for c in copies:
        _assert_sees_only_its_authors_channel(events, c, channel)
    for agent in pd.AGENTS:  # every later call of the reader: its own messages and the copies, no original
        others = {i for i in public if events[i].role != f"assistant:{agent}"}
        reader_calls = [e for e in events if e.role in (f"assistant:{agent}", "user") and e.parents
                        and events[e.parents[0]].text.startswith(f"You are {agent.capitalize()}.")]
        decision = [e for e in reader_calls if e.prefix == pd.DECISION_PREFIX]
        assert decision and all(not others & set(e.parents) for e in reader_calls), agent
        assert {p for p in decision[0].parents if events[p].role != f"assistant:{agent}"} >= \
            {c for c in copies if events[c].role != f"assistant:{agent}"}


@pytest.mark.parametrize("arm", ["baseline", "choreographed"])
def test_predictions_leave_the_game_unchanged(model, baseline, arm):
    plans = None if arm == "baseline" else baseline[("defect", 1)]["plan_tokens"]
    ex = lambda: (choreo.Baseline if arm == "baseline" else choreo.Choreographer)(model)
    games = [choreo.Runner(ex(), progress=False).run(
        [lambda s: pd.play(s, strategy="defect", seed=1, arm=arm, plans=plans, config=TINY, predict=p)])[0]
        for p in (False, True)]
    plain, predicted = games
    assert len(predicted["predictions"]) == TINY.rounds + 1 and plain["predictions"] == []
    for field in ("messages", "decisions", "cooperate", "plans"):
        assert plain[field] == predicted[field], field
    assert plain["p_cooperate"]["bob"] == pytest.approx(predicted["p_cooperate"]["bob"], abs=1e-9)


class _Interrupt(Exception):
    pass


class _DyingLog(JsonlLog):
    """A log whose process 'dies' after ``n`` appends (the last one torn half-way)."""

    def __init__(self, path, n):
        super().__init__(path, key="key")
        self.left = n

    def append(self, record):
        if self.left == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record)[:20])  # a torn final write
            raise _Interrupt
        self.left -= 1
        super().append(record)


def test_interrupted_run_resumes_without_redoing_or_losing_games(model, tmp_path, baseline):
    path = tmp_path / "games.jsonl"
    seeds = [0, 1, 2]
    plans = {**_plans(baseline), ("defect", 2): baseline[("defect", 0)]["plan_tokens"]}
    with pytest.raises(_Interrupt):
        pd.run_games(model, arm="choreographed", strategies=["defect"], seeds=seeds, log=_DyingLog(path, 1),
                     config=TINY, plans=plans, progress=False)
    first = [json.loads(line) for line in path.read_text().splitlines()[:1]]
    assert len(first) == 1
    out = pd.run_games(model, arm="choreographed", strategies=["defect"], seeds=seeds,
                       log=JsonlLog(path, key="key"), config=TINY, plans=plans, progress=False)
    records = list(JsonlLog(path, key="key").records())
    assert sorted(tuple(r["key"]) for r in records) == [("choreographed", "defect", s) for s in seeds]
    assert records[0] == first[0]  # finished games are kept as they were, not redone
    assert set(out) == {("defect", s) for s in seeds}


@pytest.fixture
def played(monkeypatch):
    """The seeds of the games ``play`` actually plays from here on (resumed games are not played)."""
    seeds, real = [], pd.play

    async def counting(ex, **kw):
        seeds.append(kw["seed"])
        return await real(ex, **kw)

    monkeypatch.setattr(pd, "play", counting)
    return seeds


def _finetuned(model, path, plans, *, variant=None, adapter=ADAPTER_A, seeds=(0, 1)):
    return pd.run_games(model, arm="finetuned", strategies=["defect"], seeds=seeds, log=JsonlLog(path, key="key"),
                        config=TINY, plans=plans, progress=False, variant=variant, adapter=adapter)


def test_games_of_different_variants_share_a_log_without_mixing(model, tmp_path, baseline, played):
    """The fine-tuned arm labels its games with the plan that trained its adapter: another plan's games in the
    same log are neither reused nor returned (unlabelled games: test_finetuned_games_are_tied_to_the_adapter...)."""
    path, plans, seeds = tmp_path / "games.jsonl", _plans(baseline), [0, 1]
    a = _finetuned(model, path, plans, variant="plan-a")
    assert sorted(played) == seeds and all(r["variant"] == "plan-a" for r in a.values())
    b = _finetuned(model, path, plans, variant="plan-b")
    assert sorted(played) == sorted(2 * seeds)  # another plan: played
    assert all(r["variant"] == "plan-b" for r in b.values())
    assert _finetuned(model, path, plans, variant="plan-b") == b and len(played) == 4  # and then reused
    assert _finetuned(model, path, plans, variant="plan-a") == a and len(played) == 4  # each plan reads its own
    keys = [tuple(r["key"]) for r in JsonlLog(path, key="key").records()]
    assert len(keys) == 2 * len(seeds) and set(keys) == {("finetuned", "defect", s) for s in seeds}


def _strip(path, *fields):
    """The log as written before its records carried ``fields`` (the committed leakage log's fine-tuned games)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in fields}) + "\n" for r in records))


def test_games_logged_without_predictions_are_played_again_when_predictions_are_asked(model, tmp_path, played):
    """A game logged by ``predict=False`` has no predictions: ``predict=True`` plays it again (the same game, now with
    its predictions), rather than returning it with none. A game logged with predictions serves either setting."""
    path, seeds = tmp_path / "games.jsonl", [0, 1]
    plain = _run(model, tmp_path, "baseline")
    assert all(r["predict"] is False and r["predictions"] == [] for r in plain.values())
    asked = _run(model, tmp_path, "baseline", predict=True)
    assert sorted(played) == sorted(2 * seeds)  # played again
    for key, record in asked.items():
        assert record["predict"] is True and len(record["predictions"]) == TINY.rounds + 1
        assert record["messages"] == plain[key]["messages"] and record["decisions"] == plain[key]["decisions"]
    assert _run(model, tmp_path, "baseline", predict=True) == asked and len(played) == 4  # then resumed
    assert _run(model, tmp_path, "baseline") == asked and len(played) == 4  # predictions: resumed for False too
    _strip(path, "predict")  # records from before they carried the flag: read by whether they hold predictions
    assert [r["predictions"] for r in _run(model, tmp_path, "baseline", predict=True).values()] == \
        [r["predictions"] for r in asked.values()] and len(played) == 4


@pytest.mark.parametrize("seed, message", [
    (-1, "seed must be an integer in 0..4294967, got -1"),
    (2.5, "seed must be an integer in 0..4294967, got 2.5"),
    (pd.MAX_SEED + 1, "seed must be an integer in 0..4294967, got 4294968"),
], ids=["negative", "float", "too-large"])
def test_bad_seeds_are_refused_by_name_before_any_game(model, tmp_path, seed, message):
    """The seed passed is named (not the call seed 1000 * seed + ... derived from it), before a game starts."""
    assert pd.call_seed(pd.MAX_SEED, "bob", 99) <= 2**32 - 1 < pd.call_seed(pd.MAX_SEED + 1, "alice", 0)
    with pytest.raises(ValueError, match=message):
        _run(model, tmp_path, "baseline", seeds=[0, seed])
    assert not (tmp_path / "games.jsonl").exists()
    with pytest.raises(ValueError, match=message):
        choreo.Runner(choreo.Baseline(model), progress=False).run(
            [lambda s: pd.play(s, strategy="defect", seed=seed, config=TINY)])


def test_finetuned_games_are_tied_to_the_adapter_that_played_them(model, tmp_path, baseline, played):
    """A fine-tuned game records the adapter that played it (weights hash and step) and is resumed only by that
    adapter: another adapter, the same weights chosen at another step, or a game logged before records carried
    an adapter (stale: credited to none) are played again, and the new records replace the stale ones for this
    adapter; the log stays readable and append-only."""
    path, plans, seeds = tmp_path / "games.jsonl", _plans(baseline), [0, 1]
    old = _finetuned(model, path, plans)
    _strip(path, "adapter", "variant")  # the committed log's fine-tuned games: no adapter, no plan label
    del played[:]
    a = _finetuned(model, path, plans)
    assert sorted(played) == seeds, "games logged without an adapter were credited to the adapter loaded now"
    assert all(r["adapter"] == ADAPTER_A for r in a.values())
    assert all(a[k]["messages"] == old[k]["messages"] for k in a)  # the same adapter plays the same games
    assert _finetuned(model, path, plans) == a and len(played) == 2  # resumed: same adapter
    later = {**ADAPTER_A, "step": ADAPTER_A["step"] + 1}
    for n, adapter in ((4, later), (6, ADAPTER_B)):
        out = _finetuned(model, path, plans, adapter=adapter)
        assert len(played) == n and all(r["adapter"] == adapter for r in out.values()), adapter
    assert _finetuned(model, path, plans) == a and len(played) == 6  # each adapter still reads its own games
    records = list(JsonlLog(path, key="key").records())
    assert len(records) == 4 * len(seeds) and sum("adapter" not in r for r in records) == len(seeds)


@pytest.mark.parametrize("arm,adapter,message", [
    ("finetuned", None, "arm 'finetuned' needs adapter identity"),
    ("choreographed", ADAPTER_A, "arm 'choreographed' takes no adapter identity"),
])
def test_only_the_finetuned_arm_plays_under_an_adapter_identity(model, tmp_path, baseline, arm, adapter, message):
    with pytest.raises(ValueError, match=message):
        _run(model, tmp_path, arm, plans=_plans(baseline), adapter=adapter)
    assert not (tmp_path / "games.jsonl").exists()


def test_adapter_identity_hashes_the_weight_files_and_names_the_step(tmp_path):
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights-1")
    (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "/home/a/model"}')
    (folder / "README.md").write_text("peft card")
    first = pd.adapter_identity(folder, step=4)
    assert set(first) == {"sha256", "step"} and len(first["sha256"]) == 64 and first["step"] == 4
    # The config names the base model's local path, which differs between checkouts: not part of the identity.
    (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "/root/b/model"}')
    (folder / "README.md").write_text("another card")
    assert pd.adapter_identity(folder, step=4) == first
    assert pd.adapter_identity(folder, step=5) != first
    (folder / "adapter_model.safetensors").write_bytes(b"weights-2")
    assert pd.adapter_identity(folder, step=4)["sha256"] != first["sha256"]
    assert pd.adapter_text(first) == f"adapter {first['sha256'][:12]} (step 4)"
    with pytest.raises(ValueError, match="adapter folder .*missing.* does not exist"):
        pd.adapter_identity(tmp_path / "missing", step=0)


def test_malformed_log_is_an_error_naming_file_and_line(model, tmp_path):
    path = tmp_path / "games.jsonl"
    path.write_text('{"key": ["baseline", "defect", 0]}\nnot json\n{"key": ["baseline", "defect", 1]}\n')
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"games\.jsonl:2: malformed"):
        pd.run_games(model, arm="baseline", strategies=["defect"], seeds=[0, 1, 2], log=JsonlLog(path, key="key"),
                     config=TINY, progress=False)
    assert path.read_bytes() == before  # nothing already written is touched


@pytest.mark.parametrize("kwargs,message", [
    (dict(arm="sideways"), "unknown arm 'sideways'"),
    (dict(arm="baseline", strategies=["tit-for-tat"]), "unknown strategy 'tit-for-tat'"),
    (dict(arm="choreographed"), "teacher-forces the paired baseline plans"),
])
def test_bad_options_are_clear_errors(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pd.run_games(model, seeds=[0], log=JsonlLog(tmp_path / "g.jsonl", key="key"), config=TINY,
                     progress=False, **kwargs)
    assert not (tmp_path / "g.jsonl").exists()


def test_config_and_prompt_errors():
    with pytest.raises(ValueError, match="plan_tokens must be an integer >= 1, got 0"):
        pd.GameConfig(plan_tokens=0)
    with pytest.raises(ValueError, match="unknown GameConfig preset 'huge'"):
        pd.GameConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown agent 'carol'"):
        pd.system_prompt("carol")
    with pytest.raises(ValueError, match="rounds must be at most 4, got 5.*same seed"):
        pd.GameConfig(rounds=5)


@pytest.mark.parametrize("rounds", range(1, pd.MAX_ROUNDS + 1))
def test_every_call_of_a_game_has_its_own_seed_and_the_prompt_states_the_rounds(rounds):
    """Steps of call_seed per agent: messages 1 + k, decision 9, predictions 10 + k and 20 (Bob): no two alike."""
    speakers = 2 * rounds
    steps = {a: [1 + k for k in range(speakers)] + [9] for a in pd.AGENTS}
    steps["bob"] += [10 + k for k in range(speakers)] + [20]
    for agent, agent_steps in steps.items():
        seeds = [pd.call_seed(3, agent, step) for step in agent_steps]
        assert len(set(seeds)) == len(seeds), (agent, agent_steps)
    assert f"have {rounds} rounds of open discussion" in pd.system_prompt("alice", rounds=rounds)


def test_prompts_state_the_payoffs_and_strategy():
    text = pd.system_prompt("alice", "defect")
    assert "ALWAYS DEFECT" in text and "5 points" in text and "3 points" in text and "Bob" in text
    assert "ALWAYS" not in pd.system_prompt("bob")
    assert pd.is_cooperate('COOPERATE"}') and not pd.is_cooperate('DEFECT"}')


def test_decision_tokens_differ(tokenizer):
    c, d = pd.decision_token_ids(tokenizer)
    assert c != d
    assert tokenizer.decode([c]).strip()[:1] == "C" and tokenizer.decode([d]).strip()[:1] == "D"


def test_baseline_prefix_reuse_plays_the_same_game(model, baseline):
    """run_games' baseline reuses exact prompt prefixes (prefix caching); the game is that of full re-encoding."""
    plain = choreo.Runner(choreo.Baseline(model), progress=False).run(
        [lambda s: pd.play(s, strategy="defect", seed=1, config=TINY, predict=True)])[0]
    reused = baseline[("defect", 1)]
    for field in ("messages", "decisions", "plans", "predictions"):
        assert plain[field] == reused[field], field
    assert plain["p_cooperate"]["bob"] == pytest.approx(reused["p_cooperate"]["bob"], abs=1e-9)


def test_finetuned_arm_trains_an_adapter_and_plays(model, tmp_path, baseline):
    """The fine-tuned arm's code path: adapter on baseline games from separate seeds, then paired games under it."""
    from choreo.finetune import FinetuneConfig, use_adapter

    result = pd.train_adapter(model, strategy="defect", train_seeds=[100, 101], dev_seeds=[102], config=TINY,
                              finetune_config=FinetuneConfig.preset("smoke", max_steps=1), out_dir=tmp_path / "ft",
                              max_nll=100.0, progress=False)
    assert (tmp_path / "ft" / "best").is_dir() and result.best_adapter == tmp_path / "ft" / "best"
    fluency = json.loads((tmp_path / "ft" / "fluency.json").read_text())
    assert [g["seed"] for g in fluency["games"]] == [100, 101, 102] and all(g["kept"] for g in fluency["games"])
    assert all(0 < g["nll"] < 100 for g in fluency["games"]) and fluency["max_nll"] == 100.0
    adapter = pd.adapter_identity(result.best_adapter, step=result.best_step)
    assert adapter["step"] == result.best_step == json.loads((tmp_path / "ft" / "history.json").read_text())[
        "best_step"]
    with use_adapter(model, result.best_adapter):
        out = _run(model, tmp_path, "finetuned", plans=_plans(baseline), predict=True, adapter=adapter)
    assert all(r["arm"] == "finetuned" and len(r["predictions"]) == TINY.rounds + 1 for r in out.values())
    assert all(r["adapter"] == adapter for r in out.values())
    with pytest.raises(ValueError, match="train and dev seeds overlap"):
        pd.train_adapter(model, strategy="defect", train_seeds=[1, 2], dev_seeds=[2], config=TINY,
                         finetune_config=FinetuneConfig.preset("smoke"), out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="max_nll must be > 0 nats or None, got -1"):
        pd.train_adapter(model, strategy="defect", train_seeds=[1], dev_seeds=[2], config=TINY, max_nll=-1,
                         finetune_config=FinetuneConfig.preset("smoke"), out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"fluency filter \(max_nll=1e-06\) kept 0 training and 0 dev games"):
        pd.train_adapter(model, strategy="defect", train_seeds=[100], dev_seeds=[102], config=TINY, max_nll=1e-6,
                         finetune_config=FinetuneConfig.preset("smoke"), out_dir=tmp_path / "y", progress=False)
    assert not (tmp_path / "y" / "best").exists()


def test_the_decision_probe_is_no_training_target(model):
    """A baseline game's trace holds each agent's one-token P(COOPERATE) probe as a call forced when recorded: the
    cross-entropy of fine-tuning leaves it out (its token is the probe's, not the baseline's output, and would
    teach both agents to say COOPERATE). The fluency filter scores it, as when its threshold was set."""
    from choreo.finetune import replay_loss

    events = _trace(model, "baseline")
    probes = [i for i, e in enumerate(events) if e.kind == "decode" and e.forced]
    assert len(probes) == 2 and all(len(events[i].tokens) == 1 and events[i].prefix == pd.DECISION_PREFIX
                                    for i in probes)
    with torch.no_grad():
        out = replay_loss(choreo.Choreographer(model), events)
    assert all(out.per_call[i] == 0.0 for i in probes)
    assert all(out.per_call[i] > 0 for i in out.per_call if i not in probes)
    kept = [i for i, e in enumerate(events) if not e.forced]
    renumber = {old: new for new, old in enumerate(kept)}
    without = [dataclasses.replace(events[i], parents=tuple(renumber[p] for p in events[i].parents)) for i in kept]
    assert pd.game_nll(model, [events]) != pytest.approx(pd.game_nll(model, [without]), rel=1e-9)


def test_game_nll_is_the_teacher_forced_baseline_nll(tiny_gqa):
    """game_nll agrees with the log-probs a teacher-forced Baseline decode reports, token-weighted over calls."""
    async def two_calls(ex):
        q = await ex.prefill("Say something.", role="user")
        a = await ex.decode(role="assistant", parents=[q], max_tokens=5, temperature=1.0, seed=3)
        await ex.decode(role="assistant", parents=[q, a], max_tokens=3, temperature=1.0, seed=4)

    runner = choreo.Runner(choreo.Baseline(tiny_gqa), trace=True, progress=False)
    runner.run([two_calls])
    trace = runner.traces[0]
    bl = choreo.Baseline(tiny_gqa)
    q = bl.prefill("Say something.", role="user")
    a = bl.decode(role="assistant", parents=[q], teacher_tokens=list(trace[1].tokens))
    b = bl.decode(role="assistant", parents=[q, a], teacher_tokens=list(trace[2].tokens))
    expected = -(sum(a.logprobs) + sum(b.logprobs)) / (len(a.logprobs) + len(b.logprobs))
    assert pd.game_nll(tiny_gqa, [trace]) == pytest.approx([expected], rel=1e-6)


def test_games_of_another_config_in_the_same_log_are_played_not_reused(model, tmp_path):
    log = JsonlLog(tmp_path / "games.jsonl", key="key")
    other = dataclasses.replace(TINY, message_tokens=4)
    play = lambda config: pd.run_games(model, arm="baseline", strategies=["defect"], seeds=[0], log=log,
                                       config=config, progress=False)
    a, b = play(TINY), play(other)
    assert [r["config"] for r in (*a.values(), *b.values())] == [TINY.fingerprint(), other.fingerprint()]
    assert play(TINY) == a and len(list(log.records())) == 2  # each config reads its own games back
