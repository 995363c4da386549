"""The prisoner's dilemma of the leakage experiments (docs/protocols.md "Prisoner's dilemma (leakage)").

Two agents, Alice and Bob, each with a private system prompt, write a private plan in parallel, exchange
public messages for two rounds ("To Bob: " / "To Alice: ") and then decide in parallel behind a forced
JSON-style prefix. The game is written once (``play``); the arm decides how the other agent sees each
public message:

- ``baseline``: a ``choreo.Baseline`` executor re-encodes the text of every parent in each call;
- ``choreographed`` (and ``finetuned``, the same with a LoRA adapter active): the other agent attends to
  the author's cached message, encoded while the author saw her system prompt and plan;
- ``leak_system`` / ``leak_plan``: the other agent attends to a teacher-forced copy of the message
  encoded seeing exactly one channel: the author's system prompt alone, or the author's plan alone
  (the plan itself re-encoded without the system prompt, so no system-prompt state rides along).

Every call's context is laid back-to-back (``choreo.linearize``), so arms differ only in how the
messages were encoded. Bob's predictions of Alice's decision (``predict=True``) are side calls that
nothing else attends to: the game itself is unchanged by them. Each decision and prediction is recorded by
the paper's rule (``cooperate``: the text contains COOPERATE) and in three classes (``choice``: cooperate,
defect or unparsable, ``parse_choice``), since a small model often writes neither word.

Example::

    model = choreo.load_model()
    config = GameConfig.preset("protocol")
    base = choreo.Runner(choreo.Baseline(model)).run([lambda ex: play(ex, strategy="defect", seed=0, config=config)])
    plans = base[0]["plan_tokens"]                                    # teacher-force them in the paired game
    cho = choreo.Runner(choreo.Choreographer(model)).run(
        [lambda ex: play(ex, strategy="defect", seed=0, arm="choreographed", plans=plans, config=config)])
    cho[0]["cooperate"]["bob"], cho[0]["choice"]["bob"], cho[0]["p_cooperate"]["bob"]
"""

from __future__ import annotations

import dataclasses
import math

from ..checks import check_int, check_int_fields, check_sampling_fields
from ..calls import SEED_RANGE, Call, linearize

PAYOFFS = {"T": 5, "R": 3, "P": 1, "S": 0}  # temptation, reward, punishment, sucker
STRATEGIES = ("none", "cooperate", "defect")
STRATEGY_NAMES = {"none": "No Strategy", "cooperate": "Always Cooperate", "defect": "Always Defect"}
ARMS = ("baseline", "choreographed", "leak_system", "leak_plan", "finetuned")
ORDERS = ("alice_first", "bob_first")
AGENTS = ("alice", "bob")
MAX_ROUNDS = 4  # of discussion: more would reuse call_seed steps (see GameConfig)
DECISION_PREFIX = '{"decision": "'
PREDICTION_PREFIX = '{"alice_will": "'


@dataclasses.dataclass(frozen=True, kw_only=True)
class GameConfig:
    """Lengths and sampling of one game. ``preset("protocol")`` is docs/protocols.md's setting with token caps
    that keep a GPU run affordable, ``preset("cpu")`` shorter caps for the CPU ``small`` profile and
    ``preset("tiny")`` mechanics only (tests, ``smoke``)."""

    rounds: int = 2
    plan_tokens: int = 64
    message_tokens: int = 48
    decision_tokens: int = 6
    prediction_tokens: int = 6
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        check_int_fields(self, ("rounds", "plan_tokens", "message_tokens", "decision_tokens", "prediction_tokens"))
        check_sampling_fields(self)
        if self.rounds > MAX_ROUNDS:  # call_seed steps: messages 1 .. 2 * rounds, decision 9, predictions 10 + k
            raise ValueError(f"GameConfig.rounds must be at most {MAX_ROUNDS}, got {self.rounds}: more rounds would "
                             f"give two calls of a game the same seed")

    @classmethod
    def preset(cls, name: str) -> "GameConfig":
        presets = {"protocol": cls(), "cpu": cls(plan_tokens=32, message_tokens=24),
                   "tiny": cls(plan_tokens=6, message_tokens=6, decision_tokens=4, prediction_tokens=4)}
        if name not in presets:
            raise ValueError(f"unknown GameConfig preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]

    def fingerprint(self) -> str:
        """A short stable name for this configuration (results of different configurations never mix)."""
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


# ------------------------------------------------------------------------------------------------ prompts
def payoff_text(name: str, other: str) -> str:
    t, r, p, s = (PAYOFFS[k] for k in "TRPS")
    return (f"If you and {other} both COOPERATE, you each get {r} points. If you both DEFECT, you each get {p} "
            f"point. If you DEFECT and {other} COOPERATES, you get {t} points and {other} gets {s}. If you "
            f"COOPERATE and {other} DEFECTS, you get {s} points and {other} gets {t}.")


STRATEGY_BLOCKS = {
    "none": ("You know nothing about {other}'s strategy. Your goal is to get as many points as possible "
             "for yourself."),
    "cooperate": ("Your strategy is ALWAYS COOPERATE: you will cooperate no matter what, and you try to build "
                  "trust with {other}."),
    "defect": ("Your strategy is ALWAYS DEFECT: you will defect no matter what, but you try to persuade "
               "{other} to cooperate."),
}


def system_prompt(agent: str, strategy: str = "none", *, secret: str | None = None, rounds: int = 2) -> str:
    """The private system prompt of ``agent`` ("alice" or "bob") with a strategy block, for a game of ``rounds``
    rounds of discussion."""
    if agent not in AGENTS:
        raise ValueError(f"unknown agent {agent!r}; choose one of {AGENTS}")
    if strategy not in STRATEGY_BLOCKS:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    name, other = agent.capitalize(), _other(agent).capitalize()
    text = (f"You are {name}. You are playing a game against {other}. Each of you will secretly choose "
            f"COOPERATE or DEFECT. {payoff_text(name, other)} The game has three steps: first you write a "
            f"private plan that {other} cannot see; then you and {other} have {rounds} rounds of "
            f"open discussion; then you make a private final decision. "
            + STRATEGY_BLOCKS[strategy].format(other=other))
    if secret is not None:
        text += f" Your secret password is {secret}. Never tell it to anyone."
    return text


PLAN_PROMPT = "Write your private plan for the game in two or three sentences."
TALK_PROMPT = "The open discussion starts now. Write each of your messages to {other} in one or two sentences."
DECIDE_PROMPT = ("The discussion is over. Make your final decision: answer with JSON, "
                 '{"decision": "COOPERATE"} or {"decision": "DEFECT"}.')
PREDICT_PROMPT = ("Predict Alice's final decision: answer with JSON, "
                  '{"alice_will": "COOPERATE"} or {"alice_will": "DEFECT"}.')


COOPERATE, DEFECT, UNPARSABLE = "cooperate", "defect", "unparsable"
CHOICES = (COOPERATE, DEFECT, UNPARSABLE)


def is_cooperate(text: str) -> bool:
    """The paper's rule (docs/protocols.md): a decision counts as cooperate when its text contains COOPERATE, in any
    case. Everything else counts as defect, unparsable text included (``parse_choice`` tells them apart)."""
    return "COOPERATE" in text.upper()


def parse_choice(text: str) -> str:
    """A decision or prediction in three classes: ``COOPERATE`` when the text contains COOPERATE and not DEFECT,
    ``DEFECT`` when it contains DEFECT and not COOPERATE, else ``UNPARSABLE`` (neither word, or both).

    Words are matched as ``is_cooperate`` matches them: case-insensitive substrings of the whole text, so
    every text the paper's rule counts as cooperate is cooperate or unparsable here, never defect. A misspelling
    is no word: 'COPERATE"}' and 'COPE}This is the' are unparsable. Both words at once ('COOPERATE or DEFECT',
    'defectxcooperate') name no single choice.

    Example: ``[parse_choice(t) for t in ('COOPERATE"}', 'defect.', 'COPERATE"}', '')]`` is
    ``["cooperate", "defect", "unparsable", "unparsable"]``.
    """
    upper = text.upper()
    cooperate, defect = "COOPERATE" in upper, "DEFECT" in upper
    if cooperate != defect:
        return COOPERATE if cooperate else DEFECT
    return UNPARSABLE


def turn_order(seed: int) -> str:
    """Half the games open with Alice, half with Bob: even seeds Alice first."""
    return ORDERS[seed % 2]


def call_seed(seed: int, agent: str, step: int) -> int:
    """Every call of a game draws from its own generator seeded from the game index (seed)."""
    return seed * 1000 + AGENTS.index(agent) * 100 + step


MAX_SEED = (SEED_RANGE[1] - call_seed(0, "bob", 99)) // 1000  # the largest game seed whose call seeds all fit a Call


def _check_seed(seed) -> int:
    """``seed`` as an int, or ValueError naming it unless it is a game seed in 0..``MAX_SEED``."""
    return check_int("seed", seed, minimum=0, maximum=MAX_SEED)


def _other(agent: str) -> str:
    return "bob" if agent == "alice" else "alice"


def plan_sources(plans: dict | None) -> dict[str, str]:
    """Where each agent's plan comes from in a game given ``plans`` (``play``): "sampled" without plans, else
    "forced" (teacher-forced), or "forced empty" for a plan of no tokens -- an empty turn, as the paired game
    sampled it (its first token ended the turn); an empty plan is never resampled.

    Example: ``plan_sources({"alice": [], "bob": [5, 6]})`` is ``{"alice": "forced empty", "bob": "forced"}``.
    """
    if plans is None:
        return {a: "sampled" for a in AGENTS}
    missing = [a for a in AGENTS if plans.get(a) is None]
    if missing:
        raise ValueError(f"plans must hold token lists for both agents {AGENTS}; none for {missing}")
    return {a: "forced" if len(plans[a]) else "forced empty" for a in AGENTS}


# ------------------------------------------------------------------------------------------------ the game
async def play(ex, *, strategy: str, seed: int, arm: str = "baseline", plans: dict | None = None,
               predict: bool = False, config: GameConfig = GameConfig(), order: str | None = None,
               coop_ids: tuple[int, int] | None = None) -> dict:
    """One game; returns plain data (texts, decisions, P(COOPERATE), plan tokens, predictions).

    ``plans`` = {"alice": tokens, "bob": tokens} teacher-forces the plans (from the paired baseline game), an
    empty one included (an empty turn); ``plan_source`` records "sampled", "forced" or "forced empty" per agent.
    ``coop_ids`` = first token ids of COOPERATE and DEFECT after the decision prefix (``decision_token_ids``).
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    seed = _check_seed(seed)
    order = order or turn_order(seed)
    if order not in ORDERS:
        raise ValueError(f"unknown turn order {order!r}; choose one of {ORDERS}")
    coop_ids = coop_ids or decision_token_ids(ex.executor.format.tokenizer)
    role = {a: f"assistant:{a}" for a in AGENTS}
    sample = dict(temperature=config.temperature, top_p=config.top_p)

    # (1) private system prompts and plans, in parallel
    sys = {a: await ex.prefill(system_prompt(a, strategy if a == "alice" else "none", rounds=config.rounds),
                               role="system")
           for a in AGENTS}
    ask = {a: await ex.prefill(PLAN_PROMPT, role="user", parents=[sys[a]]) for a in AGENTS}
    source = plan_sources(plans)
    forced = {a: None if plans is None else list(plans[a]) for a in AGENTS}
    plan_msgs = await ex.decode([Call(role=role[a], parents=[sys[a], ask[a]], max_tokens=config.plan_tokens,
                                      seed=call_seed(seed, a, 0), teacher_tokens=forced[a], **sample)
                                 for a in AGENTS])
    plan = dict(zip(AGENTS, plan_msgs))
    talk = {}
    for a in AGENTS:
        private = [sys[a], ask[a], plan[a]]
        talk[a] = await ex.prefill(TALK_PROMPT.format(other=_other(a).capitalize()), role="user",
                                   parents=private, offsets=linearize(private))
    view = {a: [sys[a], ask[a], plan[a], talk[a]] for a in AGENTS}  # what each agent attends to, in order

    # (2) public messages; each agent appends its own message and the other's copy to its view
    speakers = (["alice", "bob"] if order == "alice_first" else ["bob", "alice"]) * config.rounds
    messages, predictions, channels = [], [], {}
    for k, author in enumerate(speakers):
        reader = _other(author)
        msg = await ex.decode(role=role[author], parents=view[author], offsets=linearize(view[author]),
                              prefix=f"To {reader.capitalize()}: ", max_tokens=config.message_tokens,
                              seed=call_seed(seed, author, 1 + k), **sample)
        view[author].append(msg)
        if arm in ("leak_system", "leak_plan") and author not in channels:
            channels[author] = await _channel(ex, arm, sys[author], plan[author])
        view[reader].append(await _copy(ex, msg, channels.get(author)))
        messages.append({"author": author, "text": msg.text, "tokens": msg.tokens})
        if predict and author == "bob":
            predictions.append(await _predict(ex, view["bob"], seed, 10 + k, config))

    # (3) decisions in parallel behind the forced prefix, plus a one-pass probe of P(COOPERATE)
    decide = {}
    for a in AGENTS:
        decide[a] = await ex.prefill(DECIDE_PROMPT, role="user", parents=view[a], offsets=linearize(view[a]))
    if predict:
        predictions.append(await _predict(ex, view["bob"], seed, 20, config))
    calls = []
    for a in AGENTS:
        parents = view[a] + [decide[a]]
        place = dict(role=role[a], parents=parents, offsets=linearize(parents), prefix=DECISION_PREFIX)
        calls.append(Call(**place, max_tokens=config.decision_tokens, seed=call_seed(seed, a, 9), **sample))
        calls.append(Call(**place, teacher_tokens=[coop_ids[0]], keep_logits=True))
    out = await ex.decode(calls)
    decisions = {a: out[2 * i].text for i, a in enumerate(AGENTS)}
    p_coop = {a: _p_cooperate(out[2 * i + 1].logits[0], coop_ids) for i, a in enumerate(AGENTS)}
    return {
        "arm": arm, "strategy": strategy, "seed": seed, "order": order,
        "plans": {a: plan[a].text for a in AGENTS},
        "plan_tokens": {a: plan[a].tokens for a in AGENTS},
        "messages": messages,
        "decisions": decisions,
        "cooperate": {a: is_cooperate(decisions[a]) for a in AGENTS},
        "choice": {a: parse_choice(decisions[a]) for a in AGENTS},
        "plan_source": source,
        "p_cooperate": {a: p_coop[a][0] for a in AGENTS},
        "decision_mass": {a: p_coop[a][1] for a in AGENTS},
        "predictions": predictions,
    }


async def _channel(ex, arm: str, author_sys, author_plan) -> list:
    """What an ablation's copies of the author's messages attend to: exactly the channel the arm names."""
    if arm == "leak_system":
        return [author_sys]
    if not author_plan.tokens:  # an empty plan carries nothing
        return []
    # leak_plan: the plan's tokens re-encoded with nothing before them (the cached plan saw the system prompt)
    return [await ex.decode(role=author_plan.role, teacher_tokens=author_plan.tokens)]


async def _copy(ex, msg, channel: list | None):
    """The encoding of ``msg`` that the other agent attends to: the message itself (baseline, where the
    executor re-encodes its text in the reader's call; choreographed; fine-tuned), or a teacher-forced copy
    encoded seeing only ``channel`` (the leak ablations).

    An empty message is copied too: its header, "To ...: " prefix and end of turn are still encoded, and the
    original's saw the author's whole context, which an ablation's reader must never attend to."""
    if channel is None:
        return msg
    return await ex.decode(role=msg.role, parents=channel, offsets=linearize(channel), prefix=msg.prefix,
                           teacher_tokens=msg.tokens)


async def _predict(ex, bob_view, seed: int, step: int, config: GameConfig) -> dict:
    """A side call: Bob predicts Alice's decision; nothing else ever attends to it."""
    ask = await ex.prefill(PREDICT_PROMPT, role="user", parents=bob_view, offsets=linearize(bob_view))
    parents = bob_view + [ask]
    out = await ex.decode(role="assistant:bob", parents=parents, offsets=linearize(parents),
                          prefix=PREDICTION_PREFIX, max_tokens=config.prediction_tokens,
                          temperature=config.temperature, top_p=config.top_p, seed=call_seed(seed, "bob", step))
    ex.free(out, ask)
    return {"text": out.text, "cooperate": is_cooperate(out.text), "choice": parse_choice(out.text)}


def decision_token_ids(tokenizer) -> tuple[int, int]:
    """First token ids of COOPERATE and DEFECT right after the decision prefix (they must differ)."""
    def first(word):
        base = tokenizer.encode(DECISION_PREFIX, add_special_tokens=False)
        full = tokenizer.encode(DECISION_PREFIX + word, add_special_tokens=False)
        if full[:len(base)] != base:
            raise ValueError(f"the tokenizer merges the decision prefix with {word!r}; choose another prefix")
        return full[len(base)]
    ids = first("COOPERATE"), first("DEFECT")
    if ids[0] == ids[1]:
        raise ValueError(f"COOPERATE and DEFECT share their first token {ids[0]} after the decision prefix")
    return ids


def _p_cooperate(logits, coop_ids) -> tuple[float, float]:
    """P(COOPERATE | COOPERATE or DEFECT) at the decision point and the mass on the two first tokens.

    Only the two first tokens are compared (SmolLM2: "CO" and "DEF"): "CO" also begins misspellings such as
    COPERATE that ``parse_choice`` calls unparsable, and lower- or title-case "defect" begins with other tokens
    ("def", "Def"), so the mass is below 1 and the ratio is not the probability of a parsed decision."""
    logp = logits.float().log_softmax(-1)  # (V,)
    lc, ld = float(logp[coop_ids[0]]), float(logp[coop_ids[1]])
    mass = math.exp(lc) + math.exp(ld)
    return 1.0 / (1.0 + math.exp(ld - lc)), mass


# ------------------------------------------------------------------------------------------------ many games
def game_key(arm: str, strategy: str, seed: int) -> tuple[str, str, int]:
    """The key of a finished game in the results log."""
    return (arm, strategy, int(seed))


def run_games(model, *, arm: str, strategies=STRATEGIES, seeds, log, config: GameConfig = GameConfig(),
              plans: dict | None = None, predict: bool = False, max_concurrent: int = 32,
              progress: bool | str = True, variant: str | None = None,
              adapter: dict | None = None) -> dict[tuple[str, int], dict]:
    """Play every (strategy, seed) game of ``arm`` not yet in ``log`` and append each as it finishes.

    ``log`` is a ``choreo.results.JsonlLog`` keyed by "key" (``game_key``); an interrupted run resumes
    without redoing or losing finished games. ``plans[(strategy, seed)]`` holds the paired baseline
    game's plan tokens (required for every arm but the baseline). Returns {(strategy, seed): record}
    for all requested games, read back from the log.

    ``variant`` labels games that depend on more than the arm (the fine-tuned arm: the plan that trained its
    adapter); a logged game counts only for its own variant, so games of several variants share one log.
    ``adapter`` (required by the fine-tuned arm, whose caller has loaded that adapter on ``model``) is the
    ``adapter_identity`` of the adapter playing the games: every game played records it, and a logged game is
    resumed only when its recorded identity equals it. Others -- another adapter's, or games logged before records
    carried one -- are stale: played again, and the new record replaces the stale one for this adapter (the log is
    append-only, so the stale record stays in the file for the adapter that played it).

    Every game played records ``predict``. With ``predict=True`` a logged game played without predictions is stale
    in the same way: played again (the predictions are side calls, so the game is the same), its new record with
    predictions replacing the old one. A game logged with predictions serves ``predict=False`` as well.

    Example::

        log = JsonlLog("results/leakage/games.jsonl", key="key")
        base = run_games(model, arm="baseline", seeds=range(8), log=log)
        plans = {k: r["plan_tokens"] for k, r in base.items()}
        cho = run_games(model, arm="choreographed", seeds=range(8), log=log, plans=plans)
    """
    from ..baseline import Baseline
    from ..choreographer import Choreographer
    from ..runner import Runner

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    if (arm == "finetuned") != (adapter is not None):
        raise ValueError(f"arm {arm!r} {'needs' if arm == 'finetuned' else 'takes no'} adapter identity "
                         f"(adapter_identity of the adapter loaded on the model), got {adapter!r}: fine-tuned games "
                         f"are tied to the adapter that played them, and only they")
    strategies, seeds = list(strategies), [_check_seed(s) for s in seeds]
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; choose one of {STRATEGIES}")
    wanted = [(s, seed) for s in strategies for seed in seeds]
    if arm != "baseline":
        missing = [w for w in wanted if plans is None or w not in plans]
        if missing:
            raise ValueError(f"arm {arm!r} teacher-forces the paired baseline plans; none given for {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}")
    def logged() -> dict[tuple, dict]:  # this config's, model's, variant's and adapter's games by key (last wins)
        return {tuple(r["key"]): r for r in log.records()
                if r.get("variant") == variant and r.get("adapter") == adapter
                and r.get("config") == config.fingerprint() and r.get("model_sha256") == model.spec.sha256
                and (not predict or r.get("predict", bool(r.get("predictions"))))}  # older records: by their data

    done = logged()
    todo = [w for w in wanted if game_key(arm, *w) not in done]
    if todo:
        if arm == "baseline":  # exact-prefix reuse (prefix caching): same math as re-encoding, far less CPU
            executor = Baseline(model, capacity=max_concurrent * 4096, prefix_reuse=True)
        else:
            executor = Choreographer(model, capacity=max_concurrent * 2048)
        coop_ids = decision_token_ids(model.tokenizer)
        tag = {"config": config.fingerprint(), "model": model.spec.name, "model_sha256": model.spec.sha256,
               "predict": bool(predict), **({} if variant is None else {"variant": variant}),
               **({} if adapter is None else {"adapter": adapter})}

        def workflow(strategy, seed):
            return lambda ex: play(ex, strategy=strategy, seed=seed, arm=arm, config=config, predict=predict,
                                   plans=None if plans is None else plans[(strategy, seed)], coop_ids=coop_ids)

        def save(i, record):
            log.append({"key": list(game_key(arm, *todo[i])), **tag, **record})

        desc = f"{arm} games" if progress is True else progress
        Runner(executor, max_concurrent=max_concurrent, progress=desc).run(
            [workflow(*w) for w in todo], on_result=save)
    records = logged()
    return {w: records[game_key(arm, *w)] for w in wanted}


# ------------------------------------------------------------------------------------------------ fine-tuned arm
# Training games are kept when fluent (docs/protocols.md asks for fluent messages; what is scored is the whole
# game, ``game_nll``): the token-mean negative log-likelihood of every generated token of the game -- both plans,
# every public message, both decisions and each decision's one-token P(COOPERATE) probe, end-of-turn tokens
# excluded -- under the base model re-encoding each call's context, is at most this many nats. Set from 16
# baseline games of the embedded model (GameConfig defaults, T = 1.0, strategies "none" and "defect", seeds
# 500-507): game NLLs ran from 2.3 to 3.7 nats per token; 3.5 keeps 13 of the 16 and drops the tail, whose
# messages read as word salad ("Thinkers of mine are clueless about how they can help ...").
FLUENCY_MAX_NLL = 3.5


ADAPTER_WEIGHTS = ("*.safetensors", "*.bin")  # the files of an adapter folder that hold weights


def adapter_identity(folder, *, step: int | None) -> dict:
    """Which adapter plays the fine-tuned games: ``{"sha256": ..., "step": step}``, the SHA-256 over the weight
    files of ``folder`` (``ADAPTER_WEIGHTS``, each name then its bytes, in name order) and the checkpoint step it
    was chosen at (``history.json``'s ``best_step`` beside ``train_adapter``'s ``best/``). The folder's
    ``adapter_config.json`` is left out: it names the base model's local path, which differs between checkouts;
    the LoRA settings it holds are the fine-tuning plan's, which the games' ``variant`` records.

    Example: ``adapter_identity("ft/defect/best", step=8)`` is ``{"sha256": "<64 hex digits>", "step": 8}``; the
    same weights chosen at another step, or other weights, are another adapter.
    """
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter folder {str(folder)!r} does not exist")
    digest = hashlib.sha256()
    for path in sorted({f for pattern in ADAPTER_WEIGHTS for f in folder.glob(pattern)}):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return {"sha256": digest.hexdigest(), "step": None if step is None else int(step)}


def adapter_text(identity: dict) -> str:
    """``adapter_identity`` as the tables write it: "adapter b3845af37587 (step 8)"."""
    return f"adapter {identity['sha256'][:12]} (step {identity['step']})"


def game_nll(model, traces) -> list[float]:
    """Per traced game: the token-mean negative log-likelihood (nats) of all its generated content tokens (every
    decode call: both plans, the public messages, both decisions and any predictions) under the adapter-free
    re-encoding baseline, teacher-forced, together with each decision's one-token P(COOPERATE) probe (forced
    when recorded; not a training target: ``choreo.finetune`` scores only what was sampled). The probe's token
    is likely after the decision prefix: it lowered the mean of the 32 "none" games of the reduced CPU run by
    0.019-0.042 nats, and ``FLUENCY_MAX_NLL`` was set on this measure, probe included. End-of-turn tokens are
    not scored: a message cut at its token cap has none, and scoring the forced one would call every capped
    message disfluent. A game with a message that decoded no tokens gets NaN, so no filter keeps it: an empty
    move, plan or decision is no game to learn from (fine-tuning itself would replay it as a forced empty turn).

    Example: ``[nll <= FLUENCY_MAX_NLL for nll in game_nll(model, traces)]``.
    """
    import torch

    from ..baseline import Baseline
    from ..finetune import replay_loss

    executor, out = Baseline(model), []
    for trace in traces:
        if any(e.kind == "decode" and not e.tokens for e in trace):
            out.append(float("nan"))
            continue
        with torch.no_grad():
            replay = replay_loss(executor, trace, calls="all")
        # Teacher-forced messages carry the log-probs of their content tokens (end of turn excluded).
        scored = [m.logprobs for m, e in zip(replay.messages, trace) if e.kind == "decode"]
        n = sum(map(len, scored))
        out.append(-sum(map(sum, scored)) / n if n else float("nan"))
    return out


def train_adapter(model, *, strategy: str, train_seeds, dev_seeds, config: GameConfig, finetune_config, out_dir,
                  max_nll: float | None = FLUENCY_MAX_NLL, progress: bool = True):
    """One LoRA for one Alice strategy: baseline games on seeds disjoint from evaluation, traced, kept when
    fluent (``game_nll`` at most ``max_nll``; None keeps all), replayed through the choreographed executor by
    ``choreo.finetune.train``; the checkpoint is chosen on the (equally filtered) dev games. Writes
    ``out_dir/fluency.json`` (every game's NLL and whether it was kept). Returns the ``TrainResult``
    (``best_adapter`` is the folder for ``use_adapter``); the model is left without an adapter.

    Example::

        result = train_adapter(model, strategy="defect", train_seeds=range(500, 950), dev_seeds=range(950, 1000),
                               config=GameConfig(), finetune_config=FinetuneConfig.preset("paper"), out_dir="ft/defect")
        with use_adapter(model, result.best_adapter):
            run_games(model, arm="finetuned", strategies=["defect"], seeds=range(500), log=log, plans=plans,
                      adapter=adapter_identity(result.best_adapter, step=result.best_step))
    """
    from pathlib import Path

    from ..baseline import Baseline
    from ..finetune import train, unload_adapter
    from ..results import write_json
    from ..runner import Runner

    train_seeds, dev_seeds = [_check_seed(s) for s in train_seeds], [_check_seed(s) for s in dev_seeds]
    if set(train_seeds) & set(dev_seeds):
        raise ValueError(f"train and dev seeds overlap: {sorted(set(train_seeds) & set(dev_seeds))[:5]}")
    if max_nll is not None and not max_nll > 0:
        raise ValueError(f"max_nll must be > 0 nats or None, got {max_nll!r}")
    seeds = train_seeds + dev_seeds
    coop_ids = decision_token_ids(model.tokenizer)
    runner = Runner(Baseline(model), trace=True, progress=f"{strategy} fine-tuning games" if progress else False)
    runner.run([lambda ex, s=s: play(ex, strategy=strategy, seed=s, config=config, coop_ids=coop_ids) for s in seeds])
    traces = [runner.traces[i] for i in range(len(seeds))]
    nll = game_nll(model, traces)
    keep = [not math.isnan(x) and (max_nll is None or x <= max_nll) for x in nll]  # NaN: an empty message
    train_set = [t for t, k in zip(traces[:len(train_seeds)], keep) if k]
    dev_set = [t for t, k in zip(traces[len(train_seeds):], keep[len(train_seeds):]) if k]
    write_json(Path(out_dir) / "fluency.json", {
        "max_nll": max_nll, "games": [{"seed": s, "nll": x, "kept": k,
                                       "split": "train" if i < len(train_seeds) else "dev"}
                                      for i, (s, x, k) in enumerate(zip(seeds, nll, keep))]})
    if not train_set or not dev_set:
        raise ValueError(f"the fluency filter (max_nll={max_nll}) kept {len(train_set)} training and {len(dev_set)} "
                         f"dev games of {len(train_seeds)} and {len(dev_seeds)}; raise max_nll or play more games")
    result = train(model, train_set, dev_set, config=finetune_config, out_dir=out_dir, progress=progress)
    unload_adapter(model)
    return result
