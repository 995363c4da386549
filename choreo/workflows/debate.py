"""Multi-agent debate on MATH (docs/protocols.md "Multi-agent debate on MATH"): iterative and parallel.

Every speaker has its own system prompt and its own copy of the problem turn (the same text, encoded after
that system prompt), so a speaker's own prompt is the ordinary chat prefix in every condition; what the
conditions change is how speakers see each other's messages.

``iterative_debate``: an affirmative and a negative debater and a moderator, up to ``rounds`` rounds. In round
r the affirmative speaks (round 1: proposes a solution; later: defends or revises it against the negative's
last argument), then the negative (argues against it with its own solution), then the moderator replies with
JSON ``{"reasoning", "preference": "affirmative" | "negative" | "none", "answer"}`` behind a forced prefix.
The debate stops after the first round whose moderator names a winner with a usable answer (``names_winner``;
docs/protocols.md: "stops when it names a winner with an answer"): a side's name, "none", "N/A", yes/no/true/false
or the prompt's placeholder in the answer field is no answer, so such a verdict does not stop the debate. After the last
round without a winner, a verdict that prefers a side gives that side's last message as the final answer.

- the debate is the debaters' messages, in order; each debater's call attends to its system prompt, its
  problem turn, the whole debate so far and a private instruction turn (the opening proposal has none);
- the moderator attends to its system prompt, its problem turn, the whole debate so far and its instruction;
  its verdicts are side calls that no debater attends to (a debater argues the problem, not the verdict).

``parallel_debate`` (Du et al.): ``agents`` agents answer independently (one parallel decode), then in each of
``rounds`` update rounds a summariser attends to its system prompt, its problem turn, every answer of the
previous round and an instruction, and summarises them; each agent (in parallel) then attends to the shared
system prompt and problem turn, its own earlier answers, the summary and a private instruction, and updates
its answer. The agents share one system prompt and problem turn (the same encoding each would have alone).

The workflows are written once; the condition is the executor plus ``layout``:

- baseline: ``choreo.Baseline`` with ``layout="linearized"`` -- every call re-encodes its parents back to back
  in list order, one serial prompt (``choreo.linearize``);
- choreographed: ``choreo.Choreographer`` with ``layout="parallel"`` -- every call attends to the cached
  messages where they were encoded (parallel siblings, e.g. the agents' answers, overlap in position);
- ``choreo.Choreographer`` with ``layout="linearized"`` gives the baseline's positions over cached encodings.

Sampling uses T = 0.7 and a seed per call derived from the instance seed (``call_seed``), identical in every
condition: the conditions differ only in executor and layout, and the first calls (whose parents are all in
the speaker's own serial prefix) are the same in both.

Example::

    from choreo import Choreographer, Runner, load_model
    problem = "What is $1 + 2 \\\\cdot 3$?"
    out = Runner(Choreographer(load_model())).run(
        [lambda ex: iterative_debate(ex, problem, layout="parallel", seed=0)])[0]
    out["final"], out["final_source"], out["rounds"]     # e.g. "\\\\boxed{7}", "moderator", 1
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from ..checks import check_int, check_int_fields, check_sampling_fields
from ..calls import SEED_RANGE, Call, linearize

LAYOUTS = ("parallel", "linearized")
PREFERENCES = ("affirmative", "negative", "none")
MAX_ROUNDS, MAX_AGENTS = 16, 16
SEED_STRIDE = 1000  # seeds per instance: more than the calls of the largest allowed debate (17 * 17 = 289)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DebateConfig:
    """Sizes, token caps and sampling of both debates (identical in every condition).

    ``rounds``: debate rounds (iterative) or update rounds after the independent answers (parallel);
    ``agents``: agents of the parallel debate. ``preset("tiny")`` is for tests and smoke runs (mechanics only).
    """

    rounds: int = 3
    agents: int = 3
    temperature: float = 0.7
    top_p: float = 1.0
    answer_tokens: int = 256  # a debater's or an agent's message
    moderator_tokens: int = 160
    summary_tokens: int = 160

    def __post_init__(self):
        check_int_fields(self, ("rounds",), maximum=MAX_ROUNDS)
        check_int_fields(self, ("agents",), minimum=2, maximum=MAX_AGENTS)
        check_int_fields(self, ("answer_tokens", "moderator_tokens", "summary_tokens"))
        check_sampling_fields(self)

    @classmethod
    def preset(cls, name: str) -> "DebateConfig":
        presets = {"protocol": cls(),
                   "tiny": cls(rounds=2, agents=2, answer_tokens=4, moderator_tokens=6, summary_tokens=4)}
        if name not in presets:
            raise ValueError(f"unknown DebateConfig preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


def call_seed(seed: int, step: int) -> int:
    """The sampling seed of call ``step`` of the instance with seed ``seed`` (never shared across instances)."""
    return SEED_STRIDE * seed + step


MAX_STEP = (MAX_ROUNDS + 1) * (MAX_AGENTS + 1) - 1  # the last call of the largest parallel debate
MAX_SEED = (SEED_RANGE[1] - MAX_STEP) // SEED_STRIDE  # the largest instance seed whose call seeds all fit a Call


def _offsets(parents: Sequence, layout: str) -> list[int] | None:
    """A call's offsets: its parents back to back in list order ("linearized") or where they are ("parallel")."""
    return linearize(parents) if layout == "linearized" else None


def _check(layout: str, problem: str, seed) -> int:
    """The instance's seed as an int, once the arguments are checked."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown debate layout {layout!r}; choose one of {LAYOUTS}")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"a debate needs a non-empty problem string, got {problem!r}")
    return check_int("seed", seed, minimum=0, maximum=MAX_SEED)


async def _speak(ex, view: list, instruction: str | None, *, layout: str, **call):
    """Decode one message attending to ``view`` and, if given, a private instruction turn prefilled after it."""
    parents = list(view)
    if instruction is not None:
        parents.append(await ex.prefill(instruction, role="user", parents=view, offsets=_offsets(view, layout)))
    return await ex.decode(parents=parents, offsets=_offsets(parents, layout), **call)


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------

PROBLEM_PROMPT = "Problem: {problem}"
AFFIRMATIVE_SYSTEM = ("You are the affirmative side of a debate about a math problem. Solve the problem step by step "
                      "and put your final answer in \\boxed{}. When the negative side argues against you, defend "
                      "your solution if it is right and correct it if it is wrong.")
NEGATIVE_SYSTEM = ("You are the negative side of a debate about a math problem. Check the affirmative side's "
                   "solution step by step, point out its mistakes, and give your own solution with your final "
                   "answer in \\boxed{}.")
MODERATOR_SYSTEM = ("You are the moderator of a debate between an affirmative and a negative side about a math "
                    "problem. After each round you judge which side's final answer is correct, and reply with JSON "
                    "only.")
AFFIRMATIVE_PROMPT = ("Above is the debate so far. As the affirmative side, answer the negative side's last argument: "
                      "defend your solution or correct it, and end with your final answer in \\boxed{}.")
NEGATIVE_PROMPT = ("Above is the debate so far. As the negative side, answer the affirmative side's last argument: "
                   "point out its mistakes and give your own solution, ending with your final answer in \\boxed{}.")
MODERATOR_PROMPT = ("Round {round} of at most {rounds} is over. Judge the debate so far. Reply with JSON only: "
                    '{{"reasoning": "<one or two sentences>", "preference": "affirmative" or "negative" or "none", '
                    '"answer": "<the final answer of the side you prefer>"}}. Prefer a side only if you are sure its '
                    'final answer is correct; otherwise use "none".')
MODERATOR_PREFIX = '{"reasoning": "'

AGENT_SYSTEM = ("You are a careful mathematician. Solve the problem step by step and put your final answer in "
                "\\boxed{}.")
SUMMARISER_SYSTEM = "You summarise the solutions of several agents to a math problem, briefly and faithfully."
SUMMARY_PROMPT = ("Above are the solutions of {agents} agents to the problem. Summarise each agent's reasoning and "
                  "final answer in one or two sentences.")
UPDATE_PROMPT = ("Above is a summary of the other agents' solutions. Using their reasoning as additional advice, "
                 "examine your solution and theirs step by step and give an updated solution, ending with your "
                 "final answer in \\boxed{}.")


# ---------------------------------------------------------------------------------------------------------------
# The moderator's verdict
# ---------------------------------------------------------------------------------------------------------------

_KEY = r'["\']{}["\']\s*:\s*'
# Values in double quotes (JSON) or in single quotes (a Python-style dict, which models also write), else bare
_PREFERENCE = re.compile(_KEY.format("preference") + r"""(?:"\s*([^"]*)"?|'\s*([^']*)'?|([A-Za-z]+))""",
                         re.IGNORECASE)
_ANSWER = re.compile(_KEY.format("answer") + r"""(?:"((?:[^"\\]|\\.)*)"?|'((?:[^'\\]|\\.)*)'?|([^,}\n]+))""",
                     re.IGNORECASE | re.DOTALL)
_BOXED = re.compile(r"^\\boxed\s*\{(.*)\}$", re.DOTALL)


def parse_moderator(text: str) -> dict:
    """``{"preference", "answer"}`` from a moderator's JSON reply, leniently (the forced prefix included or not).

    Each field is found by its quoted key, so prose around the JSON and a reply cut off by the token cap are
    fine: a missing field is None, and an unterminated answer string runs to the end of the text.
    ``preference`` is one of ``PREFERENCES`` ("aff..." / "neg..." count; "null", "neither", "tie" are "none"),
    or None when absent or unrecognised. ``answer`` is the stripped string (``\\\\`` and ``\\"`` unescaped, other
    backslashes kept, since LaTeX such as ``\\frac`` is rarely escaped; a wrapping ``\\boxed{}`` or ``$...$``
    removed), a bare value such as 42 as text, or None when absent, empty or not an answer (``usable_answer``: a
    side's name, "none", "N/A", yes/no, true/false, the prompt's placeholder). Example::

        parse_moderator('{"reasoning": "x", "preference": "Negative", "answer": "\\\\\\\\frac{1}{2}"}')
        # {"preference": "negative", "answer": "\\\\frac{1}{2}"}
        parse_moderator('{"reasoning": "both agree", "preference": "affirmative", "answer": "affirmative"}')
        # {"preference": "affirmative", "answer": None}
    """
    pref = _PREFERENCE.search(text)
    word = next((g for g in pref.groups() if g is not None), "").strip().lower() if pref else ""
    word = re.sub(r"^the\s+", "", word)  # "the affirmative side"
    if word.startswith("aff"):
        preference = "affirmative"
    elif word.startswith("neg"):
        preference = "negative"
    elif word in ("none", "null", "neither", "tie", "no preference"):
        preference = "none"
    else:
        preference = None
    m = _ANSWER.search(text)
    answer = None
    if m is not None:
        double, single, bare = m.groups()
        quote = '"' if double is not None else "'" if single is not None else None
        answer = (double if double is not None else single if single is not None else bare).strip()
        if quote is not None:
            answer = answer.replace("\\\\", "\x00").replace("\\" + quote, quote).replace("\x00", "\\").strip()
        answer = usable_answer(_unwrap(answer))
    return {"preference": preference, "answer": answer}


def _unwrap(answer: str) -> str:
    """``answer`` without a wrapping ``$...$`` or ``\\boxed{...}``."""
    answer = answer.strip()
    if len(answer) > 1 and answer[0] == answer[-1] == "$":
        answer = answer.strip("$").strip()
    m = _BOXED.match(answer)
    return m.group(1).strip() if m else answer


# What a moderator writes in the answer field when it has none: a side's name ("affirmative", "the negative
# side's answer"), a refusal, or a truth value (the prompt asks for a side's final answer, and MATH answers are
# numbers and expressions); compared whole, case-insensitively, after ``\\text{}`` and end punctuation are removed.
# "neither" is an answer: MATH's "odd, even, or neither" problems have it as their gold answer (a moderator with no
# preference says so in the preference field, and then names no winner whatever the answer).
_NON_ANSWER = re.compile(r"(?:the\s+)?(?:affirmative|negative)(?:\s+side)?(?:'s)?(?:\s+(?:side|answer|solution))?"
                         r"|none|null|nil|nothing|n/?a|tie|unknown|undefined|undecided|no\s+answer"
                         r"|yes|no|true|false|-+|\?+", re.IGNORECASE)
# The prompt's placeholder for the answer ("<the final answer of the side you prefer>"), echoed with or without
# its angle brackets; any other "<...>" is a placeholder too (choreo.data.math's rule for "ANSWER: <...>")
_ECHOED = re.compile(re.escape(re.search(r'"answer": "<([^<>]*)>"', MODERATOR_PROMPT).group(1)), re.IGNORECASE)
_ANGLED = re.compile(r"\s*<[^<>\n]*>")


def usable_answer(answer: str | None) -> str | None:
    """``answer`` (stripped) when it can be an answer to the problem, else None: empty, "null", a side's name, "none",
    "N/A", yes/no, true/false, or the prompt's placeholder. Example: ``usable_answer(" 14 ")`` is ``"14"``;
    ``usable_answer("Affirmative.")`` and ``usable_answer("<the final answer of the side you prefer>")`` are None.
    """
    answer = (answer or "").strip()
    bare = re.sub(r"^\\text\s*\{(.*)\}$", r"\1", answer).strip().rstrip(".!").strip()
    if not bare or _NON_ANSWER.fullmatch(bare) or _ANGLED.match(bare) or _ECHOED.search(bare):
        return None
    return answer


def names_winner(verdict: dict) -> bool:
    """The stopping rule: the moderator prefers a side ("affirmative" or "negative") and gives a usable answer
    (``usable_answer``); a preference without one does not end the debate (docs/protocols.md: "names a winner with an
    answer")."""
    return verdict.get("preference") in ("affirmative", "negative") and usable_answer(verdict.get("answer")) is not None


def final_answer(verdicts: Sequence[dict], affirmative: str, negative: str = "") -> tuple[str, str]:
    """(text to grade, source) at the end of an iterative debate, from its verdicts and each side's last message.

    The moderator's answer wrapped as ``\\boxed{answer}`` (source "moderator") when the last verdict names a
    winner (the debate stopped on it); else, when the last verdict prefers a side without a usable answer, that
    side's last message as written (source "affirmative" or "negative"); else the last affirmative message (source
    "affirmative"): after the last round without a winner, the side that proposed and defended a solution keeps
    it. Example: ``final_answer([{"preference": "negative", "answer": "7"}], "... \\\\boxed{9}")`` is
    ``("\\\\boxed{7}", "moderator")``; with answer "negative" instead of "7" it is the negative's last message.
    """
    last = verdicts[-1] if verdicts else {}
    if names_winner(last):
        return f"\\boxed{{{last['answer'].strip()}}}", "moderator"
    if last.get("preference") == "negative":
        return negative, "negative"
    return affirmative, "affirmative"


def reread(record: dict, *, rounds: int) -> dict:
    """A logged ``iterative_debate`` record judged again by the current rules, from its logged texts: every verdict
    re-parsed from the moderator's text, the final answer recomputed from the verdicts and the sides' last
    messages in the transcript. ``"complete"`` is False when the logged debate stopped before round ``rounds`` on
    a verdict that does not name a winner now (it was run under an earlier stopping rule, and would have gone
    on): only running that debate again gives its result. Example: a record that stopped at round 1 of 3 on
    ``{"preference": "affirmative", "answer": "affirmative"}`` comes back with the affirmative's last message as
    its final answer and ``"complete": False``.
    """
    verdicts = [{"text": m["text"], **parse_moderator(m["text"])} for m in record["moderator"]]
    last = {turn["speaker"]: turn["text"] for turn in record["transcript"]}  # each speaker's last message
    final, source = final_answer(verdicts, last.get("affirmative", ""), last.get("negative", ""))
    winners = [r for r, v in enumerate(verdicts) if names_winner(v)]
    # as run now, the debate stops at its first winner, else after round ``rounds``
    complete = winners[:1] == [len(verdicts) - 1] if winners else len(verdicts) == rounds
    return {**record, "final": final, "final_source": source, "moderator": verdicts, "complete": complete}


# ---------------------------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------------------------

SPEAKERS = ("affirmative", "negative", "moderator")


async def iterative_debate(ex, problem: str, *, layout: str, seed: int, config: DebateConfig = DebateConfig()) -> dict:
    """One iterative debate (affirmative, negative, moderator) on ``problem``; stops when the moderator names a winner.

    Call ``3 * r + k`` of round r (0-based; k: affirmative, negative, moderator) samples with ``call_seed(seed,
    3 * r + k)``. Returns ``{"final": text to grade (``final_answer``), "final_source": "moderator" |
    "affirmative" | "negative", "rounds": rounds run, "moderator": [{"text" (forced prefix included), "preference",
    "answer"} per round], "transcript": [{"speaker", "text"} for every message in order, the moderator's included]}``.
    """
    seed = _check(layout, problem, seed)
    sample = dict(temperature=config.temperature, top_p=config.top_p)
    own = {}  # speaker -> [system prompt, problem turn]: its own serial prefix
    for speaker, system in zip(SPEAKERS, (AFFIRMATIVE_SYSTEM, NEGATIVE_SYSTEM, MODERATOR_SYSTEM)):
        sys = await ex.prefill(system, role="system")
        own[speaker] = [sys, await ex.prefill(PROBLEM_PROMPT.format(problem=problem), role="user", parents=[sys],
                                              offsets=_offsets([sys], layout))]
    debate, verdicts, transcript, last_affirmative = [], [], [], ""
    for r in range(config.rounds):
        for k, (speaker, prompt) in enumerate((("affirmative", AFFIRMATIVE_PROMPT), ("negative", NEGATIVE_PROMPT))):
            msg = await _speak(ex, own[speaker] + debate, prompt if debate else None, layout=layout,
                               role=f"assistant:{speaker}", max_tokens=config.answer_tokens,
                               seed=call_seed(seed, 3 * r + k), **sample)
            debate.append(msg)
            transcript.append({"speaker": speaker, "text": msg.text})
        last_affirmative = debate[-2].text
        msg = await _speak(ex, own["moderator"] + debate, MODERATOR_PROMPT.format(round=r + 1, rounds=config.rounds),
                           layout=layout, role="assistant:moderator", prefix=MODERATOR_PREFIX, stop=('"}',),
                           max_tokens=config.moderator_tokens, seed=call_seed(seed, 3 * r + 2), **sample)
        text = MODERATOR_PREFIX + msg.text
        verdicts.append({"text": text, **parse_moderator(text)})
        transcript.append({"speaker": "moderator", "text": text})
        if names_winner(verdicts[-1]):
            break
    final, source = final_answer(verdicts, last_affirmative, debate[-1].text)
    return {"final": final, "final_source": source, "rounds": len(verdicts), "moderator": verdicts,
            "transcript": transcript}


async def parallel_debate(ex, problem: str, *, layout: str, seed: int, config: DebateConfig = DebateConfig()) -> dict:
    """One parallel (Du et al.) debate on ``problem``: independent answers, then ``rounds`` summarise-and-update rounds.

    Round r (0: the independent answers) uses seeds ``call_seed(seed, r * (agents + 1) + a)`` for agent a and
    ``call_seed(seed, r * (agents + 1) + agents)`` for the summary of round r >= 1. Returns ``{"answers": [each agent's
    final text], "history": [[its text in rounds 0..rounds] per agent], "summaries": [one text per update round]}``.
    """
    seed = _check(layout, problem, seed)
    A, stride = config.agents, config.agents + 1
    sample = dict(temperature=config.temperature, top_p=config.top_p)
    roles = [f"assistant:agent{a}" for a in range(A)]
    sys = await ex.prefill(AGENT_SYSTEM, role="system")
    own = [sys, await ex.prefill(PROBLEM_PROMPT.format(problem=problem), role="user", parents=[sys],
                                 offsets=_offsets([sys], layout))]
    last = await ex.decode([Call(role=roles[a], parents=own, offsets=_offsets(own, layout),
                                 max_tokens=config.answer_tokens, seed=call_seed(seed, a), **sample) for a in range(A)])
    history = [[m] for m in last]
    summaries = []
    sum_sys = await ex.prefill(SUMMARISER_SYSTEM, role="system")
    summariser = [sum_sys, await ex.prefill(PROBLEM_PROMPT.format(problem=problem), role="user", parents=[sum_sys],
                                            offsets=_offsets([sum_sys], layout))]
    for r in range(1, config.rounds + 1):
        summary = await _speak(ex, summariser + list(last), SUMMARY_PROMPT.format(agents=A), layout=layout,
                               role="assistant:summariser", max_tokens=config.summary_tokens,
                               seed=call_seed(seed, r * stride + A), **sample)
        summaries.append(summary)
        calls = []
        for a in range(A):
            view = own + history[a] + [summary]
            update = await ex.prefill(UPDATE_PROMPT, role="user", parents=view, offsets=_offsets(view, layout))
            parents = view + [update]
            calls.append(Call(role=roles[a], parents=parents, offsets=_offsets(parents, layout),
                              max_tokens=config.answer_tokens, seed=call_seed(seed, r * stride + a), **sample))
        last = await ex.decode(calls)
        for a, msg in enumerate(last):
            history[a].append(msg)
    return {"answers": [h[-1].text for h in history], "history": [[m.text for m in h] for h in history],
            "summaries": [s.text for s in summaries]}


# ---------------------------------------------------------------------------------------------------------------
# Running conditions
# ---------------------------------------------------------------------------------------------------------------

WORKFLOWS = {"iterative": iterative_debate, "parallel": parallel_debate}
CONDITIONS = {  # name -> (executor, layout); a fine-tuned condition is "choreographed" with an adapter loaded
    "baseline": ("baseline", "linearized"),
    "choreographed": ("choreographed", "parallel"),
}


def run_condition(model, problems: Sequence[str], *, workflow: str, condition: str,
                  config: DebateConfig = DebateConfig(), seeds: Sequence[int] | None = None, seed: int = 0,
                  batch: int = 8, capacity: int = 65536, progress: bool | str = True, trace: bool = False,
                  on_result=None):
    """Run one debate ``workflow`` ("iterative" or "parallel") on every problem under one of ``CONDITIONS``
    (instance i uses seed ``seed + i``, or ``seeds[i]``). ``batch`` instances run at once in a KV store of
    ``capacity`` tokens: a re-encoding baseline reserves each call's whole serial prompt while the call runs (the
    parallel debate's agents together) and frees it when the call ends. A prompt holds every earlier message it
    reads, so it grows with the rounds (x agents x answer length: thousands of tokens in the last round), and the
    last round's calls, times the instances running it, set the peak: mind the product.

    Returns the results, or (results, traces) with ``trace=True``.
    Example: ``run_condition(model, [p.problem for p in problems], workflow="parallel", condition="baseline")``.
    """
    from ..runner import Runner
    from .executors import instance_seeds, make_executor, run_instances

    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown debate workflow {workflow!r}; choose one of {sorted(WORKFLOWS)}")
    if condition not in CONDITIONS:
        raise ValueError(f"unknown debate condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    seeds = instance_seeds(seed, seeds, len(problems), maximum=MAX_SEED, what="problems")
    kind, layout = CONDITIONS[condition]
    run = WORKFLOWS[workflow]
    runner = Runner(make_executor(model, kind, capacity=capacity), max_concurrent=batch, progress=progress,
                    trace=trace)
    results = run_instances(runner, [lambda ex, p=p, s=s: run(ex, p, layout=layout, seed=s, config=config)
                                     for p, s in zip(problems, seeds)], capacity=capacity, on_result=on_result)
    return (results, [runner.traces[i] for i in range(len(results))]) if trace else results
