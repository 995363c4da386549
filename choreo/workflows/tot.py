"""Tree of Thoughts on MATH, and the direct-prompted single call it is compared with.

1. Propose: ``B`` approaches in parallel, each decoded after the forced label "Solution #i:" (one call per
   proposal, all attending to the system prompt and the proposal request: parallel siblings).
2. Vote: ``V`` voters in parallel, each attending to the system prompt, a vote request with the problem, every
   proposal, and an instruction after them; each answers after the forced prefix "BEST CHOICE:" with an index.
   Majority vote over the votes that parse, ties going to the index seen first; no parsed vote: proposal 1.
3. Finish: one call attending to the system prompt, the problem, the winning proposal and an instruction after
   it, ending its solution with "ANSWER: ...".

The workflow is written once; the condition is the executor plus ``layout`` (as in branch-solve-merge):

- baseline: ``choreo.Baseline`` with ``layout="linearized"`` -- each voter and the finisher re-encode their
  parents as one serial prompt (proposals back to back, in order);
- choreographed: ``choreo.Choreographer`` with ``layout="parallel"`` -- voters and the finisher attend to the
  cached proposals where they were encoded (the proposals overlap in position, and the winner keeps the
  positions it had after the proposal request).

Sampling uses T = 0.7 and a seed per call derived from the instance seed, identical in every condition, so
the proposals are the same in both conditions (up to float reassociation) and the conditions part at the votes.

Example::

    from choreo import Choreographer, Runner, load_model
    from choreo.data.math import load_problems
    problem = load_problems(None)[0]
    out = Runner(Choreographer(load_model())).run(
        [lambda ex: tree_of_thoughts(ex, problem.problem, layout="parallel", seed=0)])[0]
    out["votes"], out["winner"], out["final"]
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Sequence

from ..checks import check_int, check_int_fields, check_sampling_fields, check_system_field
from ..calls import SEED_RANGE, Call, linearize
from ..trace import TraceEvent

LAYOUTS = ("parallel", "linearized")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToTConfig:
    """Sizes, prompts and sampling of Tree of Thoughts (identical in every condition)."""

    proposals: int = 8  # B
    voters: int = 4  # V
    temperature: float = 0.7
    propose_tokens: int = 128
    vote_tokens: int = 6
    answer_tokens: int = 384
    system: str = "You are an expert mathematician who solves competition problems step by step."

    def __post_init__(self):
        check_int_fields(self, ("proposals", "voters", "propose_tokens", "vote_tokens", "answer_tokens"))
        check_sampling_fields(self)
        check_system_field(self)

    @property
    def max_seed(self) -> int:
        """The largest instance seed whose call seeds (``B + V + 1`` per instance) all fit a ``Call``."""
        return (SEED_RANGE[1] - self.proposals - self.voters) // (self.proposals + self.voters + 1)


def propose_prompt(problem: str) -> str:
    return (f"Problem: {problem}\n\nPropose a high-level approach to solving this problem. Do not solve it: "
            "describe the approach in two or three sentences.")


def vote_prompt(problem: str, n: int) -> str:
    return f"Problem: {problem}\n\nHere are {n} proposed approaches, labelled Solution #1 to Solution #{n}."


def vote_instruction(n: int) -> str:
    return (f"Which of the {n} approaches above is the most promising? Reply in the form "
            "\"BEST CHOICE: <index>\".")


FINISH_INSTRUCTION = ("Solve the problem by following the approach above. End your solution with a line of the "
                      "form \"ANSWER: <final answer>\".")

_INDEX = re.compile(r"(?<![\d.])(\d+)(?![\d.]*\d)")


def parse_vote(text: str, n: int) -> int | None:
    """The 1-based index a vote names: the first whole number in the text after the forced "BEST CHOICE:"
    ("3", "#3", "Solution #3"; not the 5 of "5.5"), None when there is none or it is not in 1..n.
    Example: ``parse_vote(" Solution #3, because", 8)`` is 3; ``parse_vote(" 10 x 1", 8)`` is None."""
    m = _INDEX.search(text)
    if m is None or len(m.group(1).lstrip("0")) > len(str(n)):  # more than n (no int() past 4,300 digits)
        return None
    k = int(m.group(1))
    return k if 1 <= k <= n else None


def majority(votes: Sequence[int | None]) -> int | None:
    """The most frequent parsed vote, ties going to the one seen first; None when no vote parsed."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(v for v in votes if v is not None and counts[v] == best)


async def tree_of_thoughts(ex, problem: str, *, layout: str, seed: int, config: ToTConfig = ToTConfig()) -> dict:
    """One Tree-of-Thoughts instance; returns texts, votes and the final solution.

    Returns ``{"proposals": [B texts, each starting "Solution #i:"], "votes": [V raw texts], "parsed_votes":
    [index or None], "winner": 1-based index, "vote_parsed": bool (False: no vote parsed, proposal 1 used),
    "final": the finisher's text}``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Tree-of-Thoughts layout {layout!r}; choose one of {LAYOUTS}")
    seed = check_int("seed", seed, minimum=0, maximum=config.max_seed)
    B, V = config.proposals, config.voters
    stride = B + V + 1  # calls per instance: seeds never collide across instances
    sample = dict(temperature=config.temperature)
    sys = await ex.prefill(config.system, role="system")
    ask = await ex.prefill(propose_prompt(problem), role="user", parents=[sys])
    proposals = await ex.decode([Call(role="assistant", parents=[sys, ask], prefix=f"Solution #{i}:",
                                      max_tokens=config.propose_tokens, seed=stride * seed + i - 1, **sample)
                                 for i in range(1, B + 1)])
    intro = await ex.prefill(vote_prompt(problem, B), role="user", parents=[sys])
    context = [sys, intro, *proposals]
    offsets = linearize(context) if layout == "linearized" else None
    instruction = await ex.prefill(vote_instruction(B), role="user", parents=context, offsets=offsets)
    voters = context + [instruction]
    vote_offsets = None if offsets is None else offsets + [None]
    votes = await ex.decode([Call(role="assistant", parents=voters, offsets=vote_offsets, prefix="BEST CHOICE:",
                                  max_tokens=config.vote_tokens, seed=stride * seed + B + j, **sample)
                             for j in range(V)])
    parsed = [parse_vote(v.text, B) for v in votes]
    chosen = majority(parsed)
    winner = proposals[(chosen or 1) - 1]
    question = await ex.prefill(f"Problem: {problem}", role="user", parents=[sys])
    context = [sys, question, winner]
    offsets = linearize(context) if layout == "linearized" else None
    finish = await ex.prefill(FINISH_INSTRUCTION, role="user", parents=context, offsets=offsets)
    final = await ex.decode(role="assistant", parents=context + [finish],
                            offsets=None if offsets is None else offsets + [None],
                            max_tokens=config.answer_tokens, seed=stride * seed + B + V, **sample)
    return {"proposals": [f"Solution #{i}:" + p.text for i, p in enumerate(proposals, start=1)],
            "votes": [v.text for v in votes], "parsed_votes": parsed, "winner": chosen or 1,
            "vote_parsed": chosen is not None, "final": final.text}


# ---------------------------------------------------------------------------------------------------------------
# The direct-prompted baseline: one call
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class DirectConfig:
    """The single "solve this problem" call the workflows are compared with (greedy by default)."""

    temperature: float = 0.0
    answer_tokens: int = 384
    system: str = ToTConfig.system

    def __post_init__(self):
        check_int_fields(self, ("answer_tokens",))
        check_sampling_fields(self)
        check_system_field(self)

    max_seed = SEED_RANGE[1]  # the seed is the call's own


def direct_prompt(problem: str) -> str:
    return (f"Problem: {problem}\n\nSolve this problem. Put your final answer in \\boxed{{}} or end with a line of "
            "the form \"ANSWER: <final answer>\".")


async def direct(ex, problem: str, *, seed: int, config: DirectConfig = DirectConfig()) -> dict:
    """One call that solves ``problem``: ``{"final": text}``."""
    seed = check_int("seed", seed, minimum=0, maximum=config.max_seed)
    sys = await ex.prefill(config.system, role="system")
    ask = await ex.prefill(direct_prompt(problem), role="user", parents=[sys])
    answer = await ex.decode(role="assistant", parents=[sys, ask], max_tokens=config.answer_tokens,
                             temperature=config.temperature, seed=seed)
    return {"final": answer.text}


def direct_trace(problem: str, final: str, *, events: Sequence[TraceEvent], tokenizer,
                 config: DirectConfig = DirectConfig()) -> list[TraceEvent]:
    """The trace of a direct call on ``problem`` that answers ``final``, another workflow's final answer: data for
    the paper's control, the direct call fine-tuned on the workflows' final answers only (``choreo.finetune``
    replays it, forcing ``final``).

    When a decode event of that workflow's trace ``events`` wrote ``final`` (without a forced prefix), its tokens,
    cap and stop strings carry over, so a turn cut at its cap or by a stop string stays cut (its end-of-turn is
    not trained). Otherwise (a debate moderator's answer, put in ``\\boxed{}``) ``final`` is tokenized with
    ``tokenizer`` as a turn that ended by itself. The direct call's own trace and its answer event give that
    trace back.

    Example: ``direct_trace(p.problem, record["final"], events=trace, tokenizer=model.tokenizer)``.
    """
    source = next((e for e in reversed(events) if e.kind == "decode" and not e.prefix and e.text == final), None)
    if source is None:
        ids = tuple(tokenizer.encode(final, add_special_tokens=False))
        source = TraceEvent(kind="decode", group=0, role="assistant", parents=(), text=final, tokens=ids,
                            max_tokens=len(ids) + 1, temperature=config.temperature)
    return [TraceEvent(kind="prefill", group=0, role="system", parents=(), text=config.system),
            TraceEvent(kind="prefill", group=1, role="user", parents=(0,), text=direct_prompt(problem)),
            dataclasses.replace(source, group=2, role="assistant", parents=(0, 1), offsets=None, new_offset=None)]


# ---------------------------------------------------------------------------------------------------------------
# Running conditions
# ---------------------------------------------------------------------------------------------------------------

CONDITIONS = {  # name -> (executor, layout); a fine-tuned condition is "choreographed" with an adapter loaded
    "baseline": ("baseline", "linearized"),
    "choreographed": ("choreographed", "parallel"),
}


def run_condition(model, problems: Sequence[str], *, condition: str, config: ToTConfig | DirectConfig | None = None,
                  seeds: Sequence[int] | None = None, seed: int = 0, batch: int = 16, capacity: int = 65536,
                  progress: bool | str = True, trace: bool = False, on_result=None):
    """Run Tree of Thoughts on every problem under one of ``CONDITIONS`` (instance i uses seed ``seed + i``, or
    ``seeds[i]``); ``condition="direct"`` runs the single direct call under the baseline. ``config``: a ``ToTConfig``
    (a ``DirectConfig`` for "direct"); None for the defaults.
    ``batch`` instances run at once in a KV store of ``capacity`` tokens. A re-encoding baseline frees each call's
    serial prompt when the call ends, but its vote step reserves every voter's whole prompt (all B proposals) at
    once: with B = 8, V = 4 and 64-token proposals about 2,800 tokens per instance, so 32 instances voting together
    overflow the default 65,536.

    Returns the results, or (results, traces) with ``trace=True``.
    Example: ``run_condition(model, [p.problem for p in problems], condition="choreographed")``.
    """
    from ..runner import Runner
    from .executors import instance_seeds, make_executor, run_instances

    if condition not in (*CONDITIONS, "direct"):
        raise ValueError(f"unknown Tree-of-Thoughts condition {condition!r}; choose one of "
                         f"{sorted([*CONDITIONS, 'direct'])}")
    wanted = DirectConfig if condition == "direct" else ToTConfig
    config = wanted() if config is None else config
    if not isinstance(config, wanted):
        raise ValueError(f"condition {condition!r} takes a {wanted.__name__}, got {type(config).__name__}")
    seeds = instance_seeds(seed, seeds, len(problems), maximum=config.max_seed, what="problems")
    if condition == "direct":
        runner = Runner(make_executor(model, "baseline", capacity=capacity), max_concurrent=batch, progress=progress,
                        trace=trace)
        workflows = [lambda ex, p=p, s=s: direct(ex, p, seed=s, config=config) for p, s in zip(problems, seeds)]
    else:
        kind, layout = CONDITIONS[condition]
        runner = Runner(make_executor(model, kind, capacity=capacity), max_concurrent=batch, progress=progress,
                        trace=trace)
        workflows = [lambda ex, p=p, s=s: tree_of_thoughts(ex, p, layout=layout, seed=s, config=config)
                     for p, s in zip(problems, seeds)]
    results = run_instances(runner, workflows, capacity=capacity, on_result=on_result)
    return (results, [runner.traces[i] for i in range(len(results))]) if trace else results
