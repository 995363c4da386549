"""Branch-solve-merge story generation (information blockage at the merge).

1. Branch: propose a topic and split the concepts into two groups (fixed format, parsed; a parse
   failure ends the instance with coverage 0). With ``BSMConfig(branch="halves")`` the model proposes the
   topic only, on one line (a reply that starts with a line break is continued to the end of the next line, the
   line a "Topic:" alone on its line announces), and the groups are the two halves of the concept list (for
   models too small to follow the split format; the blockage under test is at the merge).
2. Solve: one story paragraph per group, both decoded in parallel.
3. Merge: one paragraph combining the two stories and keeping every concept. The merge attends to the
   system prompt, each solve prompt (with its concept list) and each story, then a merge instruction.

The workflow is written once; the condition is the executor plus ``layout``:

- baseline: ``choreo.Baseline`` with ``layout="linearized"`` -- the merge re-encodes, as one serial
  prompt, solve prompt 1, story 1, solve prompt 2, story 2 and the instruction;
- choreographed: ``choreo.Choreographer`` with ``layout="parallel"`` -- the merge attends to the cached
  solve branches, which overlap in position;
- linearized: ``choreo.Choreographer`` with ``layout="linearized"`` -- the cached branches rotated back
  to back (the same positions as the baseline, without attention between them);
- fine-tuned: ``parallel`` on an executor whose model carries a LoRA adapter.

Sampling uses T = 0.7 and a seed per call derived from the instance seed, identical in every condition.

Example::

    from choreo import Choreographer, Runner, load_model
    from choreo.data.concepts import load_concept_sets
    sets = load_concept_sets(None, n=4, size=10)
    out = Runner(Choreographer(load_model())).run([lambda ex, c=c, i=i: bsm(ex, c, layout="parallel", seed=i)
                                                  for i, c in enumerate(sets)])
    out[0]["coverage"]["word"]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from ..checks import check_int, check_int_fields, check_sampling_fields, check_system_field
from ..data.concepts import coverage
from ..calls import SEED_RANGE, linearize
from ..trace import without_offsets

LAYOUTS = ("parallel", "linearized")
BRANCH_MODES = ("model", "halves")
MAX_SEED = (SEED_RANGE[1] - 3) // 4  # the largest instance seed whose call seeds (4 * seed + 0..3) fit a Call


@dataclasses.dataclass(frozen=True, kw_only=True)
class BSMConfig:
    """Prompts and sampling of branch-solve-merge (identical in every condition)."""

    system: str = "You are a creative writer who follows instructions exactly."
    branch: str = "model"  # "model": the model splits the concepts; "halves": it proposes the topic only
    temperature: float = 0.7
    top_p: float = 1.0
    branch_tokens: int = 160
    solve_tokens: int = 200
    merge_tokens: int = 320

    def __post_init__(self):
        if self.branch not in BRANCH_MODES:
            raise ValueError(f"BSMConfig.branch must be one of {BRANCH_MODES}, got {self.branch!r}")
        check_system_field(self)
        check_sampling_fields(self)
        check_int_fields(self, ("branch_tokens", "solve_tokens", "merge_tokens"))


def branch_prompt(concepts: Sequence[str]) -> str:
    return (f"Concepts: {', '.join(concepts)}\n\n"
            "Propose a topic for a story that uses all of these concepts, and split the concepts into two groups. "
            "Use exactly this format:\nTopic: <one sentence>\nGroup 1: <concepts, comma-separated>\n"
            "Group 2: <concepts, comma-separated>")


def topic_prompt(concepts: Sequence[str]) -> str:
    return (f"Concepts: {', '.join(concepts)}\n\n"
            "Propose a topic for a story that uses all of these concepts. Answer with one sentence.")


def halves(concepts: Sequence[str]) -> tuple[list[str], list[str]]:
    """The first and second half of a concept list (the fixed split of ``branch="halves"``)."""
    k = (len(concepts) + 1) // 2
    return list(concepts[:k]), list(concepts[k:])


def solve_prompt(topic: str, group: Sequence[str]) -> str:
    return (f"Write one short story paragraph about this topic: {topic}\n"
            f"The story must use all of these concepts: {', '.join(group)}.")


MERGE_PROMPT = ("Combine the two stories above into one coherent story paragraph. "
                "Keep every concept from both concept lists.")

# "Group 1: dog, ball", "**Group 2 (outdoors):** park", "Group 1 - dog", "2. Group 2: park"; the items on the same
# line and on the bullet lines below it (blank lines between them allowed). "Topic: a day out" (or the topic alone on
# the next line). An item never runs across a line break.
_GROUP = re.compile(r"^(?:[^\w\n]|\d+[.)])*group[ \t]*([12])\b[ \t]*(?:\([^)\n]*\))?[ \t*_]*[:\-][ \t*_]*(.*)$",
                    re.IGNORECASE | re.MULTILINE)
_TOPIC = re.compile(r"^\W*topic[ \t*_]*[:\-][ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE)
_BULLET = re.compile(r"[ \t]*(?:[-*\u2022+]|\d+[.)])[ \t]+(.*)")


def _topic(text: str) -> str | None:
    """The text after "Topic:" on its line, or the next line when that is empty and not a group's."""
    m = _TOPIC.search(text)
    if m is None:
        return None
    topic = m.group(1).strip()
    if not topic:
        after = text[m.end():].lstrip("\n").split("\n", 1)[0]
        topic = "" if _GROUP.match(after) else after.strip()
    return topic or None


def _group_items(text: str, m: re.Match) -> list[str]:
    """The raw items of the group line ``m``: its own line's, then those of the bullet lines below it (blank lines
    between bullets skipped; the first other line ends them)."""
    parts = [m.group(2)]
    for line in text[m.end():].split("\n")[1:]:
        if not line.strip():
            continue
        bullet = _BULLET.fullmatch(line)
        if bullet is None or _GROUP.match(line):  # "2. Group 2: ..." is the next group, not a bullet
            break
        parts.append(bullet.group(1))
    return [x for part in parts for x in re.split(r"[,;]|\band\b", part)]


def _concepts_of(item: str, known: dict[str, str]) -> list[str]:
    """The concepts one raw item names: the item itself without an article ("the dog"), else each of its words
    ("dog ball run", listed without commas). Unknown words are dropped."""
    words = [re.sub(r"^[\W_]+|[\W_]+$", "", w).lower() for w in item.split()]
    words = [w for w in words if w]
    if words and words[0] in ("the", "a", "an") and len(words) > 1:
        words = words[1:]
    whole = known.get(" ".join(words))
    return [whole] if whole is not None else [known[w] for w in words if w in known]


def parse_branch(text: str, concepts: Sequence[str]) -> tuple[str, list[str], list[str]] | None:
    """(topic, group 1, group 2) from a branch answer, or None when it does not follow the format.

    Group items are matched to the given concepts (case-insensitive, surrounding punctuation ignored; a regular
    inflection of a concept, as coverage counts it, names it: "dogs" is "dog"); items may follow the group's
    label on its line or be bullet lines below it; a label may carry a parenthesis ("Group 1 (outdoors):").
    Unknown items are dropped and a concept keeps its first group. None if the topic is missing or a group has no
    known concept. Example::

        parse_branch("Topic: a day out\\nGroup 1: dog, ball\\nGroup 2: park", ["dog", "ball", "park"])
        # ("a day out", ["dog", "ball"], ["park"])
        parse_branch("Topic: x\\nGroup 1:\\n- dogs\\n- ball\\nGroup 2: park", ["dog", "ball", "park"])
        # ("x", ["dog", "ball"], ["park"])
    """
    from ..data.concepts import inflections

    topic = _topic(text)
    known = {word.lower(): c for c in reversed(concepts) for word in inflections(c)}  # the first concept wins
    known.update({c.lower(): c for c in reversed(concepts)})  # and a concept's own name over an inflection
    groups: dict[int, list[str]] = {}
    seen: set[str] = set()
    for m in _GROUP.finditer(text):
        k = int(m.group(1))
        if k in groups:
            continue
        groups[k] = []
        for item in _group_items(text, m):
            for concept in _concepts_of(item, known):
                if concept not in seen:
                    groups[k].append(concept)
                    seen.add(concept)
    if topic is None or not groups.get(1) or not groups.get(2):
        return None
    return topic, groups[1], groups[2]


async def bsm(ex, concepts: Sequence[str], *, layout: str, seed: int, config: BSMConfig = BSMConfig(),
              split: tuple[str, Sequence[str], Sequence[str]] | None = None) -> dict:
    """One branch-solve-merge instance; returns texts, the parsed branch and coverage.

    ``split`` = (topic, group 1, group 2) skips the branch call (a fixed split, e.g. to test the merge alone).

    Returns ``{"parsed", "topic", "groups", "branch", "stories", "merged", "coverage": {"word", "substring"},
    "group_coverage": {"word": [g1, g2], "substring": [g1, g2]}}``; coverage is 0 when the branch fails to parse.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown BSM layout {layout!r}; choose one of {LAYOUTS}")
    seed = check_int("seed", seed, minimum=0, maximum=MAX_SEED)
    concepts = list(concepts)
    if len(concepts) < 2:
        raise ValueError(f"branch-solve-merge needs at least 2 concepts, got {concepts!r}")
    sample = dict(temperature=config.temperature, top_p=config.top_p)
    sys = await ex.prefill(config.system, role="system")
    if split is None and config.branch == "halves":  # the model names the topic; the groups are fixed
        ask = await ex.prefill(topic_prompt(concepts), role="user", parents=[sys])
        branch = await ex.decode(role="assistant", parents=[sys, ask], prefix="Topic:", stop=("\n",),
                                 max_tokens=config.branch_tokens, seed=4 * seed, **sample)
        branch_text = "Topic:" + branch.text
        if "\n" in branch.text and not branch.text.strip():  # "Topic:\n": the topic follows on the next line
            # A continuation of the same reply, so it samples with that call's seed (every other seed is taken).
            branch = await ex.decode(role="assistant", parents=[sys, ask], prefix=branch_text, stop=("\n",),
                                     max_tokens=config.branch_tokens, seed=4 * seed, **sample)
            branch_text += branch.text
        topic = branch.text.strip().split("\n")[0].strip()
        parsed = (topic, *halves(concepts)) if topic else None
    elif split is None:
        ask = await ex.prefill(branch_prompt(concepts), role="user", parents=[sys])
        branch = await ex.decode(role="assistant", parents=[sys, ask], prefix="Topic:",
                                 max_tokens=config.branch_tokens, seed=4 * seed, **sample)
        branch_text = "Topic:" + branch.text
        parsed = parse_branch(branch_text, concepts)
    else:
        branch_text, parsed = "", (split[0], list(split[1]), list(split[2]))
    out = {"parsed": parsed is not None, "branch": branch_text, "topic": None, "groups": None, "stories": None,
           "merged": "", "coverage": {"word": 0.0, "substring": 0.0},
           "group_coverage": {"word": [0.0, 0.0], "substring": [0.0, 0.0]}}
    if parsed is None:
        return out
    topic, g1, g2 = parsed
    from ..calls import Call

    asks = [await ex.prefill(solve_prompt(topic, g), role="user", parents=[sys]) for g in (g1, g2)]
    stories = await ex.decode([Call(role="assistant", parents=[sys, a], max_tokens=config.solve_tokens,
                                    seed=4 * seed + 1 + i, **sample) for i, a in enumerate(asks)])
    context = [sys, asks[0], stories[0], asks[1], stories[1]]
    offsets = linearize(context) if layout == "linearized" else None
    instruction = await ex.prefill(MERGE_PROMPT, role="user", parents=context, offsets=offsets)
    parents = context + [instruction]
    merged = await ex.decode(role="assistant", parents=parents,
                             offsets=None if offsets is None else offsets + [None],
                             max_tokens=config.merge_tokens, seed=4 * seed + 3, **sample)
    story = merged.text
    out.update(topic=topic, groups=[g1, g2], stories=[s.text for s in stories], merged=story,
               coverage={m: coverage(concepts, story, method=m) for m in ("word", "substring")},
               group_coverage={m: [coverage(g, story, method=m) for g in (g1, g2)] for m in ("word", "substring")})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Head-to-head judge
# ---------------------------------------------------------------------------------------------------------------

JUDGE_SYSTEM = "You are a careful judge of writing quality."


def judge_prompt(first: str, second: str) -> str:
    return (f"Story A:\n{first.strip()}\n\nStory B:\n{second.strip()}\n\n"
            "Which story is more coherent and better written? Answer with the single letter A or B.")


# A first sentence that names no single story; a bare letter (any case); an answer that opens with the letter or
# "Story X" (not the article of "A story that ..."); else the first "Story X" / "the answer is X".
_NO_SINGLE = re.compile(r"\b(both|equal(ly)?|neither|tie[ds]?|same)\b", re.IGNORECASE)
_BARE = re.compile(r"\W*([ABab])\W*")
_LEADING = re.compile(r"\W*(?:(?i:story)\s+)?([AB])\b(?!\s+(?i:stor))")
_NAMED = re.compile(r"(?i:story|answer\s+is|answer\s*:)\s*([AB])\b")
_LETTER_A = re.compile(r"\bA\b(?!\s+(?i:stor))")  # the letter, not the article of "A story ..."


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or None from a judge's answer: a bare letter in either case (" b" -> 'B'); an answer that opens
    with the letter or "Story X" (" A.", "Story B is better"; not the article of "A story that is better is B",
    which reads on to "Story"/"answer is"); else the first "Story X" or "the answer is X". None when the first
    sentence names both stories (" A or B", " Story A and Story B"), neither, a tie or the same quality (" A and B
    are equal"), or nothing parses.

    Example: ``[parse_verdict(t) for t in (" A", " B.", " b", "A story that is better is Story B", " Both")]``
    -> ['A', 'B', 'B', 'B', None].
    """
    first = re.split(r"[.\n!?]", text.strip(), maxsplit=1)[0]
    if _NO_SINGLE.search(first) or (_LETTER_A.search(first) and re.search(r"\bB\b", first)):
        return None  # "both", or both letters: " A or B" echoes the question
    for pattern, match in ((_BARE, re.fullmatch), (_LEADING, re.match), (_NAMED, re.search)):
        m = match(pattern, text)
        if m:
            return m.group(1).upper()
    return None


async def judge_orders(ex, story_a: str, story_b: str, *, max_tokens: int = 8) -> dict:
    """Compare two stories in both orders (greedy); the outcome with each order's raw answer and its parse.

    Returns ``{"outcome": "A" | "B" | "tie", "orders": [{"text", "verdict"}, {"text", "verdict"}], "stories":
    stories_digest(story_a, story_b)}``: order 0
    shows ``story_a`` as Story A, order 1 shows ``story_b`` as Story A; ``verdict`` is the *position* the answer
    names ("A", "B" or None when it does not parse). The outcome is "A" or "B" only if that story is preferred in
    both orders, else "tie" -- so a judge that names position A twice (position bias) and one whose answers do
    not parse both give ties, and only ``orders`` tells them apart. An empty story (a failed instance) loses to
    a non-empty one and two empty stories tie, without asking (``orders`` is then empty).
    """
    from ..calls import Call

    if not story_a.strip() or not story_b.strip():
        outcome = "tie" if not story_a.strip() and not story_b.strip() else ("B" if not story_a.strip() else "A")
        return {"outcome": outcome, "orders": [], "stories": stories_digest(story_a, story_b)}
    sys = await ex.prefill(JUDGE_SYSTEM, role="system")
    asks = [await ex.prefill(judge_prompt(x, y), role="user", parents=[sys]) for x, y in ((story_a, story_b),
                                                                                          (story_b, story_a))]
    answers = await ex.decode([Call(role="assistant", parents=[sys, a], prefix="Answer:", max_tokens=max_tokens)
                               for a in asks])
    orders = [{"text": x.text, "verdict": parse_verdict(x.text)} for x in answers]
    return {"outcome": _outcome(*(o["verdict"] for o in orders)), "orders": orders,
            "stories": stories_digest(story_a, story_b)}


def stories_digest(story_a: str, story_b: str) -> str:
    """A short hash of the two stories a judgement compared (kept in its record): a logged verdict is reused only
    for the same stories."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([story_a, story_b]).encode()).hexdigest()[:12]


async def judge(ex, story_a: str, story_b: str, *, max_tokens: int = 8) -> str:
    """The outcome of ``judge_orders``: "A" or "B" only if preferred in both orders, else "tie"."""
    return (await judge_orders(ex, story_a, story_b, max_tokens=max_tokens))["outcome"]


def judge_outcome(record: str | dict) -> str:
    """The outcome of a logged judgement: a ``judge_orders`` record's answers parsed again (by this
    ``parse_verdict``, so a log is read the same as a fresh run), or a bare outcome (records that kept only it)."""
    if isinstance(record, str):
        return record
    if not record["orders"]:  # an empty story: decided without asking
        return record["outcome"]
    return _outcome(*(parse_verdict(o["text"]) for o in record["orders"]))


def _outcome(first: str | None, second: str | None) -> str:
    """"A", "B" or "tie" from the positions named in the two orders (order 1 shows story B first: its position is
    mapped back to the story)."""
    from ..stats import combine_orders

    return combine_orders(first, {"A": "B", "B": "A"}.get(second))


def judge_diagnostics(records: Sequence[str | dict]) -> dict:
    """What the judge's raw answers show, beside the outcomes: counts over ``records`` (``judge_orders`` records;
    bare outcomes from logs that kept only the outcome count as ``not_logged``).

    ``asked``: comparisons put to the judge (both stories non-empty); ``verdicts``: their answers (two each);
    ``unparsable``: answers naming neither A nor B; ``position_a`` / ``position_b``: comparisons where both orders
    named that position (position bias: a tie whatever the stories); ``consistent``: both orders parsed and named
    different positions, i.e. the same story twice (a win). Example: two records whose orders both answered " A"
    give ``asked=2, verdicts=4, unparsable=0, position_a=2, consistent=0``.
    """
    logged = [r for r in records if isinstance(r, dict)]
    asked = [[parse_verdict(o["text"]) for o in r["orders"]] for r in logged if r["orders"]]  # as judge_outcome
    return {"n": len(records), "not_logged": len(records) - len(logged), "asked": len(asked),
            "verdicts": 2 * len(asked), "unparsable": sum(v is None for vs in asked for v in vs),
            "position_a": sum(vs == ["A", "A"] for vs in asked), "position_b": sum(vs == ["B", "B"] for vs in asked),
            "consistent": sum(None not in vs and vs[0] != vs[1] for vs in asked)}


# ---------------------------------------------------------------------------------------------------------------
# Running conditions
# ---------------------------------------------------------------------------------------------------------------

CONDITIONS = {  # name -> (executor, layout); a fine-tuned condition is "choreographed" with an adapter loaded
    "baseline": ("baseline", "linearized"),
    "choreographed": ("choreographed", "parallel"),
    "linearized": ("choreographed", "linearized"),
}


def run_condition(model, concept_sets: Sequence[Sequence[str]], *, condition: str, config: BSMConfig = BSMConfig(),
                  seed: int = 0, batch: int = 64, capacity: int = 65536, progress: bool | str = True,
                  trace: bool = False, seeds: Sequence[int] | None = None, on_result=None):
    """Run every concept set under one of ``CONDITIONS`` (instance i uses seed ``seed + i``, or ``seeds[i]``).

    ``batch`` instances run at once in a KV store of ``capacity`` tokens. A choreographed instance keeps all its
    messages until it ends, up to ``branch_tokens + 2 * solve_tokens + merge_tokens`` tokens plus its prompts: at
    the paper's caps (256/320/480) 50 instances at once can overflow the default 65,536.

    Returns the results, or (results, traces) with ``trace=True``.
    Example: ``run_condition(model, load_concept_sets(None, n=8, size=10), condition="choreographed")``.
    """
    from ..runner import Runner
    from .executors import instance_seeds, make_executor, run_instances

    if condition not in CONDITIONS:
        raise ValueError(f"unknown BSM condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    kind, layout = CONDITIONS[condition]
    seeds = instance_seeds(seed, seeds, len(concept_sets), maximum=MAX_SEED, what="concept sets")
    runner = Runner(make_executor(model, kind, capacity=capacity), max_concurrent=batch, progress=progress,
                    trace=trace)
    results = run_instances(runner, [lambda ex, c=c, s=s: bsm(ex, c, layout=layout, seed=s, config=config)
                                     for c, s in zip(concept_sets, seeds)], capacity=capacity, on_result=on_result)
    return (results, [runner.traces[i] for i in range(len(results))]) if trace else results


def as_layout(events, layout: str) -> list:
    """A recorded trace with the merge calls re-laid for ``layout`` (a baseline trace replayed as choreographed).

    The baseline records the merge with back-to-back offsets; "parallel" drops them (the cached branches
    overlap in position), "linearized" keeps them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown BSM layout {layout!r}; choose one of {LAYOUTS}")
    return list(events) if layout == "linearized" else without_offsets(events)


def run_judge(model, pairs: Sequence[tuple[str, str]], *, batch: int = 64, progress: bool | str = True,
              on_result=None) -> list[dict]:
    """``judge_orders`` records (the outcome "A", "B" or "tie" and each order's raw answer) for (story A, story B)
    pairs, judged in both orders (greedy)."""
    from ..choreographer import Choreographer
    from ..runner import Runner

    runner = Runner(Choreographer(model), max_concurrent=batch, progress=progress)
    return runner.run([lambda ex, a=a, b=b: judge_orders(ex, a, b) for a, b in pairs], on_result=on_result)
