"""Workflow shapes of the performance suite: synthetic content and the paper's workflows, written once.

Every shape is one ``async def`` over a ``Recorder`` (the executor verbs plus a record of each decode
stage); the arm that runs it is the executor underneath. Content is synthetic and deterministic
(``Synth``), so every arm runs the same prompts and emits the same teacher tokens.

Example::

    shape = make_shape("tree_of_thoughts", B=8, V=4)
    stages = Runner(executor).run([shape.workflow(Synth(model.tokenizer, Lengths()))])[0]
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from ..cache import Message
from ..checks import check_int_fields, is_int
from ..calls import RAW, Call
from ..workflows.debate import MODERATOR_PREFIX, SPEAKERS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lengths:
    """Sizes of the synthetic messages: words per prompt, tokens per generated message."""

    prompt_words: int = 24
    content_tokens: int = 16

    def __post_init__(self):
        check_int_fields(self, ("prompt_words", "content_tokens"))


_WORDS = ("the plan should weigh cost risk and time before we agree on a fair answer to this question "
          "consider each option carefully then explain which one is better and why a careful reader "
          "would accept it given what we know about the problem so far").split()


class Synth:
    """Deterministic prompts and teacher tokens keyed by a tag (the same in every arm).

    Example: ``s = Synth(model.tokenizer, Lengths()); s.prompt("question"); s.tokens("vote/3")``.
    """

    def __init__(self, tokenizer, lengths: Lengths):
        self.tokenizer, self.lengths = tokenizer, lengths
        self._cache: dict[str, list[int]] = {}
        bad = {tokenizer.eos_token_id, *tokenizer.all_special_ids}
        self._bad = {b for b in bad if b is not None}

    def prompt(self, tag: str) -> str:
        rng = random.Random(f"prompt/{tag}")
        return f"[{tag}] " + " ".join(rng.choice(_WORDS) for _ in range(self.lengths.prompt_words))

    def tokens(self, tag: str) -> list[int]:
        """``content_tokens`` ordinary token ids (no special or stop tokens)."""
        if tag not in self._cache:
            rng = random.Random(f"content/{tag}")
            text = " ".join(rng.choice(_WORDS) for _ in range(4 * self.lengths.content_tokens))
            ids = [t for t in self.tokenizer.encode(text, add_special_tokens=False) if t not in self._bad]
            self._cache[tag] = ids[: self.lengths.content_tokens]
        return self._cache[tag]


class Recorder:
    """Wraps a session: passes verbs through and records every decode stage (a set of parallel calls)."""

    def __init__(self, ex, synth: Synth):
        self.ex, self.synth, self.stages = ex, synth, []

    async def prefill(self, tag: str, *, role: str, parents=()) -> Message:
        return await self.ex.prefill(self.synth.prompt(tag), role=role, parents=parents)

    async def decode(self, tags: Sequence[str], parents: Sequence[Sequence[Message]],
                     role: str | Sequence[str] = "assistant", prefix: str | Sequence[str] = "") -> list[Message]:
        """One stage of parallel calls; ``role`` and ``prefix``: one for all, or one per call."""
        roles = [role] * len(tags) if isinstance(role, str) else list(role)
        prefixes = [prefix] * len(tags) if isinstance(prefix, str) else list(prefix)
        calls = [Call(role=r, parents=tuple(p), prefix=f, teacher_tokens=self.synth.tokens(t), max_tokens=1)
                 for t, p, r, f in zip(tags, parents, roles, prefixes)]
        msgs = await self.ex.decode(calls)
        # what a call encoded before its first token is the executor's count (``first_pass_tokens``), by id
        self.stages.append([{"id": m.id, "ttft": m.ttft, "latency": m.latency, "tokens": list(m.tokens)}
                            for m in msgs])
        return msgs

    async def decode1(self, tag: str, parents: Sequence[Message], role="assistant", prefix: str = "") -> Message:
        return (await self.decode([tag], [parents], role, prefix))[0]


async def prisoners_dilemma(rec: Recorder, *, rounds: int = 2):
    """Private plans, ``rounds`` of public A->B turns, then both decisions in parallel: the skeleton of the leakage
    suite's game (``choreo.workflows.prisoners.play`` adds a prompt turn before each plan, talk and decision call,
    lays each view out with ``linearize``, and, in some arms, copies and predictions)."""
    sys_ = {a: await rec.prefill(f"pd/system/{a}", role="system") for a in ("alice", "bob")}
    plan = dict(zip(sys_, await rec.decode(["pd/plan/alice", "pd/plan/bob"], [[sys_["alice"]], [sys_["bob"]]])))
    public: list[Message] = []
    for r in range(rounds):
        for a in ("alice", "bob"):
            public.append(await rec.decode1(f"pd/turn/{r}/{a}", [sys_[a], plan[a], *public], role=f"assistant:{a}"))
    await rec.decode([f"pd/decide/{a}" for a in sys_], [[sys_[a], plan[a], *public] for a in sys_])
    return rec.stages


async def multiqa(rec: Recorder, *, k: int = 2):
    """``choreo.workflows.multiqa.multiqa``'s call graph (parallel layout): one user turn in raw segments, its
    header, then k questions encoded in parallel after it; one answer attending to all of them."""
    sys_ = await rec.prefill("mqa/system", role="system")
    head = await rec.prefill("mqa/header", role=RAW, parents=[sys_])
    qs = [await rec.prefill(f"mqa/q{i}", role=RAW, parents=[sys_, head]) for i in range(k)]
    await rec.decode1("mqa/answer", [sys_, head, *qs])
    return rec.stages


async def branch_solve_merge(rec: Recorder, *, N: int = 2):
    """``choreo.workflows.bsm.bsm``'s call graph (parallel layout) with N groups (the workflow's 2): the branch call
    names the topic behind the forced "Topic:"; N solve prompts get their stories in one parallel decode; the merge
    reads the system prompt, each solve prompt and its story, and the merge instruction."""
    sys_ = await rec.prefill("bsm/system", role="system")
    ask = await rec.prefill("bsm/branch", role="user", parents=[sys_])
    await rec.decode1("bsm/topic", [sys_, ask], prefix="Topic:")
    asks = [await rec.prefill(f"bsm/solve{i}", role="user", parents=[sys_]) for i in range(N)]
    stories = await rec.decode([f"bsm/story{i}" for i in range(N)], [[sys_, a] for a in asks])
    context = [sys_, *(m for pair in zip(asks, stories) for m in pair)]
    instruction = await rec.prefill("bsm/merge", role="user", parents=context)
    await rec.decode1("bsm/merged", [*context, instruction])
    return rec.stages


async def tree_of_thoughts(rec: Recorder, *, B: int = 8, V: int = 4):
    """``choreo.workflows.tot.tree_of_thoughts``'s call graph (parallel layout): B proposals in parallel, each
    behind its forced "Solution #i:"; V voters reading the system prompt, the vote's introduction, every proposal
    and the vote instruction, behind "BEST CHOICE:"; the finisher reading the system prompt, the problem, the
    winner and the finishing instruction. With teacher-forced votes no vote parses, so the winner is the first
    proposal, as in the workflow."""
    sys_ = await rec.prefill("tot/system", role="system")
    ask = await rec.prefill("tot/propose", role="user", parents=[sys_])
    cands = await rec.decode([f"tot/cand{i}" for i in range(B)], [[sys_, ask]] * B,
                             prefix=[f"Solution #{i}:" for i in range(1, B + 1)])
    intro = await rec.prefill("tot/vote", role="user", parents=[sys_])
    context = [sys_, intro, *cands]
    instruction = await rec.prefill("tot/vote/instruction", role="user", parents=context)
    await rec.decode([f"tot/vote{j}" for j in range(V)], [[*context, instruction]] * V, prefix="BEST CHOICE:")
    question = await rec.prefill("tot/question", role="user", parents=[sys_])
    context = [sys_, question, cands[0]]
    finish = await rec.prefill("tot/finish", role="user", parents=context)
    await rec.decode1("tot/answer", [*context, finish])
    return rec.stages


async def iterative_debate(rec: Recorder, *, rounds: int = 3):
    """``choreo.workflows.debate.iterative_debate``'s call graph: each speaker (affirmative, negative, moderator)
    has its own system prompt and its own copy of the problem turn; in every round the affirmative then the
    negative speak, each seeing its own prompts and the whole debate so far plus, once the debate has begun, a
    private instruction turn prefilled right before its call; then the moderator, seeing its own prompts, the
    debate and its instruction, replies behind the forced JSON prefix (a side call: the debaters never see it).
    All ``rounds`` run: with synthetic text no moderator names a winner, where the MATH debate may stop early."""
    own = {}  # speaker -> [system prompt, problem turn]
    for speaker in SPEAKERS:
        sys_ = await rec.prefill(f"id/system/{speaker}", role="system")
        own[speaker] = [sys_, await rec.prefill("id/problem", role="user", parents=[sys_])]
    debate: list[Message] = []
    for r in range(rounds):
        for speaker in ("affirmative", "negative"):
            view = own[speaker] + debate
            if debate:
                view.append(await rec.prefill(f"id/{r}/instruct/{speaker}", role="user", parents=view))
            debate.append(await rec.decode1(f"id/{r}/{speaker}", view, role=f"assistant:{speaker}"))
        view = own["moderator"] + debate
        view.append(await rec.prefill(f"id/{r}/instruct/moderator", role="user", parents=view))
        await rec.decode1(f"id/{r}/verdict", view, role="assistant:moderator", prefix=MODERATOR_PREFIX)
    return rec.stages


async def parallel_debate(rec: Recorder, *, A: int = 3, rounds: int = 3):
    """``choreo.workflows.debate.parallel_debate``'s call graph (Du et al.): A agents share one system prompt and
    problem turn and answer independently (one parallel decode); the summariser's own system prompt and problem
    turn follow; then in each of ``rounds`` update rounds the summariser reads every answer of the last round and
    an instruction turn and summarises them, and each agent, seeing the shared prompts, its own earlier answers,
    the summary and a private update turn, updates its answer (one parallel decode)."""
    sys_ = await rec.prefill("pdb/system/agent", role="system")
    own = [sys_, await rec.prefill("pdb/problem", role="user", parents=[sys_])]
    roles = [f"assistant:agent{a}" for a in range(A)]
    last = await rec.decode([f"pdb/0/{a}" for a in range(A)], [own] * A, role=roles)
    history = [[m] for m in last]
    sum_sys = await rec.prefill("pdb/system/summariser", role="system")
    summariser = [sum_sys, await rec.prefill("pdb/problem", role="user", parents=[sum_sys])]
    for r in range(1, rounds + 1):
        view = summariser + list(last)
        view.append(await rec.prefill(f"pdb/{r}/instruct/summariser", role="user", parents=view))
        summary = await rec.decode1(f"pdb/{r}/summary", view, role="assistant:summariser")
        views = [own + history[a] + [summary] for a in range(A)]
        for a in range(A):
            views[a].append(await rec.prefill(f"pdb/{r}/instruct/{a}", role="user", parents=views[a]))
        last = await rec.decode([f"pdb/{r}/{a}" for a in range(A)], views, role=roles)
        for a, msg in enumerate(last):
            history[a].append(msg)
    return rec.stages


async def conversation(rec: Recorder, *, turns: int = 2):
    """A multi-turn chat: system prompt, then ``turns`` user/assistant exchanges, each seeing all before it."""
    history = [await rec.prefill("chat/system", role="system")]
    for t in range(turns):
        history.append(await rec.prefill(f"chat/user{t}", role="user", parents=history))
        history.append(await rec.decode1(f"chat/assistant{t}", history))
    return rec.stages


WORKFLOWS: dict[str, Callable] = {
    "prisoners_dilemma": prisoners_dilemma,
    "multiqa": multiqa,
    "branch_solve_merge": branch_solve_merge,
    "tree_of_thoughts": tree_of_thoughts,
    "iterative_debate": iterative_debate,
    "parallel_debate": parallel_debate,
    "conversation": conversation,
}
_LIMITS = {"B": (1, 16), "V": (2, 16), "A": (2, 8), "k": (1, 16), "N": (1, 16), "rounds": (1, 8), "turns": (1, 16)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """A workflow and its size, e.g. ``Shape(name="tree_of_thoughts", size=(("B", 8), ("V", 4)))``."""

    name: str
    size: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.name not in WORKFLOWS:
            raise ValueError(f"unknown shape {self.name!r}; choose one of {sorted(WORKFLOWS)}")
        for key, value in self.size:
            lo, hi = _LIMITS.get(key, (1, 64))
            if not is_int(value) or not lo <= value <= hi:
                raise ValueError(f"{self.name}: size {key}={value!r} must be an integer in {lo}..{hi}")

    @property
    def label(self) -> str:
        return self.name + "".join(f" {k}={v}" for k, v in self.size)

    def workflow(self, synth: Synth):
        return lambda ex: WORKFLOWS[self.name](Recorder(ex, synth), **dict(self.size))


def make_shape(name: str, **size: int) -> Shape:
    return Shape(name=name, size=tuple(sorted(size.items())))


# The paper's shapes (Performance section of the seed) at their reported sizes.
PAPER_SHAPES = (
    make_shape("prisoners_dilemma", rounds=2),
    make_shape("multiqa", k=2),
    make_shape("branch_solve_merge", N=2),
    make_shape("tree_of_thoughts", B=8, V=4),
    make_shape("iterative_debate", rounds=3),
    make_shape("parallel_debate", A=3, rounds=3),
)
SCALING = {
    "B": [make_shape("tree_of_thoughts", B=b, V=4) for b in (2, 4, 8, 16)],
    "V": [make_shape("tree_of_thoughts", B=4, V=v) for v in (2, 4, 8, 16)],
    "A": [make_shape("parallel_debate", A=a, rounds=3) for a in (2, 4, 8)],
}
# Paper figures (A100; docs/protocols.md, Performance), for the table's reference column: a TTFT speed-up per workflow,
# and one end-to-end figure for all of them ("about 1.03x": decoding dominated), not one per workflow.
PAPER_E2E_TYPICAL = 1.03
PAPER = {"tree_of_thoughts B=8 V=4": {"ttft": 3.6},
         "iterative_debate rounds=3": {"ttft": 2.0},
         "parallel_debate A=3 rounds=3": {"ttft": 6.2}}
