"""MultiQA: several trivia questions in ONE user turn, answered as a numbered list (information blockage).

Every condition encodes the same tokens. The user turn is split into raw segments (no chat header or
footer of their own): ``<|im_start|>user\\n`` + instruction, then ``Question 1: ...\\n``, ..., and the last
question with the turn's footer. Only what each segment attends to changes:

- ``serial``: each question segment attends to all earlier segments -- the ordinary prompt. Under
  ``choreo.Baseline`` this *is* the baseline; under ``choreo.Choreographer`` it reproduces it exactly.
- ``parallel``: each question attends only to the system prompt and the turn's header, and all questions
  share positions (choreographed: blockage between the questions).
- ``linearized``: the parallel encodings, rotated back-to-back for the answer (positions fixed, attention
  between the questions still missing).

The answer attends to the system prompt and every segment. A fine-tuned condition is ``parallel`` on an
executor whose model carries a LoRA adapter (``choreo.finetune``).

Example::

    from choreo import Choreographer, Runner, load_model
    from choreo.data.trivia import load_questions, make_pairs
    pairs = make_pairs(load_questions(), 8, seed=0)
    out = Runner(Choreographer(load_model())).run(
        [lambda ex, p=p: multiqa(ex, p, layout="parallel") for p in pairs])
    out[0]["correct"]     # e.g. [True, False]
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..cache import Message
from ..checks import check_int_fields, check_system_field
from ..calls import RAW, linearize
from ..choreographer import Choreographer
from ..data.trivia import Question, grade
from .executors import make_executor, run_instances

LAYOUTS = ("serial", "parallel", "linearized")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiQAConfig:
    """Prompt and decoding settings (identical in every condition)."""

    system: str = "Answer all of the user's questions. Reply with a numbered list: one short answer per question."
    instruction: str = ""  # text at the start of the user turn, on its own line(s) before the questions
    answer_prefix: str = ""  # forced start of the answer, e.g. "1."
    max_tokens: int = 48

    def __post_init__(self):
        for name in ("system", "instruction", "answer_prefix"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"MultiQAConfig.{name} must be a string, got {getattr(self, name)!r}")
        check_system_field(self)
        check_int_fields(self, ("max_tokens",))


SEGMENT_ROLE = RAW  # raw segments: parts of the one user turn, each its own message


def turn_segments(executor: Choreographer, questions: Sequence[Question],
                  config: MultiQAConfig) -> list[tuple[list[int], str]]:
    """(ids, raw text) of the user turn's segments: header + instruction (ended by a line break when it has none),
    then one per question (the last one with the turn's footer). ``ids`` is the tokenization of the raw text."""
    fmt = executor.format
    tok = fmt.tokenizer
    header = tok.decode(fmt.header("user"), skip_special_tokens=False)
    footer = tok.decode(fmt.footer("user"), skip_special_tokens=False)
    instruction = config.instruction
    if instruction and not instruction.endswith("\n"):  # "...questions.Question 1:" is no prompt: a line break
        instruction += "\n"
    texts = [header + instruction]
    for i, q in enumerate(questions, start=1):
        last = i == len(questions)
        texts.append(f"Question {i}: {q.question}" + (footer if last else "\n"))
    return [(tok.encode(t, add_special_tokens=False), t) for t in texts]


# ---------------------------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------------------------

async def multiqa(ex, questions: Sequence[Question], *, layout: str, config: MultiQAConfig = MultiQAConfig()) -> dict:
    """Ask ``questions`` in one user turn laid out by ``layout``; returns the response and its grading.

    Returns ``{"response", "correct": [bool per question], "both": bool, "tokens": int,
    "question_starts": [position of each question segment as the answer sees it]}``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown MultiQA layout {layout!r}; choose one of {LAYOUTS}")
    if not questions:
        raise ValueError("multiqa needs at least one question")
    sys = await ex.prefill(config.system, role="system")
    (_, head_text), *rest = turn_segments(ex.executor, questions, config)
    head = await ex.prefill(head_text, role=RAW, parents=[sys])
    qs: list[Message] = []
    for _, text in rest:  # serial: each question sees the earlier ones; otherwise only the turn's header
        qs.append(await ex.prefill(text, role=RAW, parents=[sys, head, *(qs if layout == "serial" else [])]))
    parents = [sys, head, *qs]
    offsets = linearize(parents) if layout == "linearized" else None
    answer = await ex.decode(role="assistant", parents=parents, offsets=offsets,
                             prefix=config.answer_prefix, max_tokens=config.max_tokens, temperature=0.0)
    response = config.answer_prefix + answer.text
    correct = grade(response, questions)
    return {"response": response, "correct": correct, "both": all(correct), "tokens": len(answer.tokens),
            "question_starts": (offsets or [p.start for p in parents])[2:]}


# ---------------------------------------------------------------------------------------------------------------
# Running conditions
# ---------------------------------------------------------------------------------------------------------------

CONDITIONS = {  # name -> (executor, layout); a fine-tuned condition is "choreographed" with an adapter loaded
    "baseline": ("baseline", "serial"),
    "serial": ("choreographed", "serial"),
    "choreographed": ("choreographed", "parallel"),
    "linearized": ("choreographed", "linearized"),
}


def collect_traces(model, pairs, *, config: MultiQAConfig = MultiQAConfig(), batch: int = 64,
                   progress: bool | str = True) -> list[list]:
    """Baseline traces (serial segments under ``choreo.Baseline``) re-laid as the parallel layout.

    The raw question segments are re-parented to the system prompt and the turn header only, so a replay
    through ``choreo.Choreographer`` teacher-forces the baseline answer under the choreographed layout.
    """
    from ..baseline import Baseline
    from ..runner import Runner

    runner = Runner(Baseline(model), max_concurrent=batch, progress=progress, trace=True)
    runner.run([lambda ex, p=p: multiqa(ex, p, layout="serial", config=config) for p in pairs])
    out = []
    for i in range(len(pairs)):
        events = list(runner.traces[i])
        head = next(k for k, e in enumerate(events) if e.role == SEGMENT_ROLE)  # the turn header segment
        out.append([dataclasses.replace(e, parents=(0, head)) if e.role == SEGMENT_ROLE and k != head else
                    dataclasses.replace(e, offsets=None) if e.kind == "decode" else e for k, e in enumerate(events)])
    return out


def run_condition(model, pairs: Sequence[Sequence[Question]], *, condition: str,
                  config: MultiQAConfig = MultiQAConfig(), batch: int = 64, capacity: int = 65536,
                  progress: bool | str = True, on_result=None) -> list[dict]:
    """Run every pair under one of ``CONDITIONS`` through ``choreo.Runner`` (concurrent, batched): ``batch``
    instances at once in a KV store of ``capacity`` tokens.

    Example: ``run_condition(model, make_pairs(load_questions(), 30, seed=0), condition="linearized")``.
    """
    from ..runner import Runner

    if condition not in CONDITIONS:
        raise ValueError(f"unknown MultiQA condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    kind, layout = CONDITIONS[condition]
    runner = Runner(make_executor(model, kind, capacity=capacity), max_concurrent=batch, progress=progress)
    return run_instances(runner, [lambda ex, p=p: multiqa(ex, p, layout=layout, config=config) for p in pairs],
                         capacity=capacity, on_result=on_result)
