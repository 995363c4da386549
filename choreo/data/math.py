"""MATH problems: the benchmark's JSONL by path, or a built-in set; answer extraction and grading.

``load_problems(data_dir)`` reads ``<data_dir>/math_test.jsonl`` (one ``{"id", "problem", "level", "type",
"solution"}`` per line, the gold answer being the solution's last ``\\boxed{}``, or its boxes joined when the
problem asks for answers "separated by commas": ``gold_answer``); without a folder it makes
``BUILTIN_SIZE`` seeded problems in MATH's format (integer arithmetic, linear equations, fractions: *not* MATH,
for machines without the file). ``split_problems`` picks disjoint evaluation and training sets with a fixed seed
from the id-sorted list, so the choice does not depend on the file's order.

Grading (docs/protocols.md: programmatic, not by asking a model): ``extract_answer`` takes the last closed
``\\boxed{...}`` of a response (or the first: the parallel debate's rule), else what follows its last "ANSWER:"
(upper-case, or at a line's start), else its last "final answer is ..."; ``grade`` checks that answer against the
gold one with ``math_verify`` (symbolic and numeric equivalence: ``\\frac{9}{7}`` = ``9/7``, ``0.5`` =
``\\frac12``). A response with none of them is wrong and counted as unparsed. Example::

    problems = load_problems(None)
    evaluation, train = split_problems(problems, n_eval=8, n_train=16, seed=0)
    grade(evaluation[0].answer, "... so the answer is \\\\boxed{42}.")   # {"correct": ..., "extracted": "42"}
"""

from __future__ import annotations

import dataclasses
import random
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from ..checks import check_int
from ..results import read_jsonl

FILE_NAME = "math_test.jsonl"
BUILTIN_SIZE = 1000


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One problem; ``answer`` is the gold final answer (the solution's last ``\\boxed{}``)."""

    id: str
    problem: str
    answer: str
    level: str = ""
    type: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# "\\boxed{x}" (braces balanced) or "\\boxed x" (no braces: up to the next "$" or line end, as the MATH reference
# extractor reads it)
_BOX = re.compile(r"\\(?:boxed|fbox)(?:\s*\{|[ \t]+(?=[^\s{$]))")


def _boxes(text: str) -> list[tuple[int, str]]:
    """(start, content) of every closed box in ``text``, in order; contents stripped, empty ones kept."""
    found = []
    for m in _BOX.finditer(text):
        if not m.group().endswith("{"):
            content = re.match(r"[^$\n]*", text[m.end():]).group().strip().rstrip(".,;").strip()
            found.append((m.start(), content))
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end():i - 1].strip()))
    return found


def boxed(text: str) -> list[str]:
    """The contents of every closed ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x`` without braces: up to
    the next ``$`` or line end) in ``text``, in order, braces balanced; a box that is never closed (a response cut
    at its token cap) is left out."""
    return [content for _, content in _boxes(text)]


def last_boxed(text: str) -> str | None:
    """The content of the last closed ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if there is none.
    Example: ``last_boxed("\\\\boxed{\\\\frac{1}{2}}.")`` is ``"\\\\frac{1}{2}"``."""
    found = boxed(text)
    return found[-1] if found else None


# A problem that asks for several answers ("Enter all the solutions, separated by commas.")
_SEVERAL = re.compile(r"separated by comma", re.IGNORECASE)


def gold_answer(solution: str, problem: str = "", *, rule: str = "joined") -> str | None:
    """The gold answer of a MATH solution: its last non-empty box; when ``problem`` asks for several answers
    "separated by commas" (``rule="joined"``), its distinct non-empty boxes joined in order ("-2, 1": MATH boxes each
    solution of such a problem). ``rule="last"``: the last box, empty or not (MATH's usual convention). None when
    there is no box. Only the comma-separated problems join: elsewhere several boxes are alternatives ("3 is also
    accepted"), an intermediate result, or a drawing (``\\boxed{\\phantom{2}}``).
    Example: ``gold_answer("$\\\\boxed{-2}$ and $\\\\boxed{1}$", "... separated by commas.")`` is ``"-2, 1"``."""
    if rule not in ("joined", "last"):
        raise ValueError(f"rule must be 'joined' or 'last', got {rule!r}")
    if rule == "last":
        return last_boxed(solution)
    boxes = [b for b in boxed(solution) if b]
    if not boxes:
        return None
    if _SEVERAL.search(problem):
        return ", ".join(dict.fromkeys(boxes))
    return boxes[-1]


# The protocol's "ANSWER: x": upper-case anywhere, any case at the start of a line (markdown bullets, quotes,
# headings or bold around the word allowed); not a lower-case "answer:" inside a sentence ("To check the answer: ...")
_ANSWER = re.compile(r"(?:^[^\w\n]*(?i:answer)|\bANSWER)\s*\**\s*:\s*(.+)", re.MULTILINE)
# Minerva's answer sentence (the form lm-evaluation-harness's MATH tasks read): "The final answer is $x$.", and
# "final answer: x"
_FINAL = re.compile(r"final answer\s*(?:is|was|:)\s*:?\s*([^\s:].*)", re.IGNORECASE)  # not a bare "is:"
# The instruction's placeholder echoed back ('a line of the form "ANSWER: <final answer>"'): not an answer
_PLACEHOLDER = re.compile(r"\s*<[^<>\n]*>")
_HOPE = re.compile(r"\.?\s*I hope it is correct.*$", re.IGNORECASE)


def _innermost_final(answer: str) -> str:
    """The text after the last "final answer is" nested in a found answer: Minerva's whole line "Final Answer: The
    final answer is $5$. I hope it is correct." gives "$5$. I hope it is correct.", not "The final answer is ..."."""
    while (m := _FINAL.search(answer)) is not None:
        answer = m.group(1)
    return answer


def extract_answer(text: str, *, which: str = "last") -> str | None:
    """A response's final answer: whichever comes later of its last non-empty closed ``\\boxed{}`` (or ``\\boxed
    x``) and the rest of the line after its last "ANSWER:" (upper-case, or any case at a line's start; a box inside
    that line wins), else after its last "final answer is" or "final answer:" (Minerva's "Final Answer: The final
    answer is $x$. I hope it is correct." gives x). ``which="first"``: its first non-empty box, else as "last". An
    empty box and an echoed placeholder ("<final answer>") are skipped; markdown bold, quotes, dollar signs and a
    trailing period removed. None when it has none of them (or the answer is empty). Example:
    ``extract_answer("\\\\boxed{3}, then ANSWER: 10")`` is ``"10"``;
    ``extract_answer("\\\\boxed{} so \\\\boxed 5")`` is ``"5"``."""
    if which not in ("last", "first"):
        raise ValueError(f"which must be 'last' or 'first', got {which!r}")
    boxes = [(at, content) for at, content in _boxes(text) if content]  # an empty \\boxed{} is no answer
    lines = [m for m in _ANSWER.finditer(text) if not _PLACEHOLDER.match(m.group(1))]
    if which == "first" and boxes:
        return boxes[0][1]
    if boxes and (not lines or boxes[-1][0] >= lines[-1].start()):  # the box is in or after the last ANSWER line
        return boxes[-1][1]
    found = [m.group(1) for m in lines] or [a for a in map(_innermost_final, _FINAL.findall(text))
                                             if not _PLACEHOLDER.match(a)]
    if not found:
        return None
    answer = _HOPE.sub("", found[-1].strip())
    for _ in range(2):  # '**$12$**.' -> '12', '"10".' -> '10'
        answer = answer.strip().strip("*").strip().strip('"').strip().strip("$").strip().rstrip(".").strip()
    # punctuation alone is no answer, nor is a line that introduces one ("Your answer is:")
    return answer if re.search(r"[\w\\]", answer) and not answer.endswith(":") else None


def _normal(answer: str) -> str:
    """Spacing (but for one space between two digits: "1 2" is not 12), ``\\left``/``\\right`` and the
    ``dfrac``/``tfrac`` spellings removed."""
    answer = re.sub(r"(?<=\d)\s+(?=\d)", "\0", answer)
    answer = re.sub(r"\s+|\\[,;!]|\\left|\\right", "", answer).replace("\0", " ")
    return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def equivalent(gold: str, answer: str) -> bool:
    """Whether ``answer`` means ``gold`` (both bare answers, LaTeX allowed): identical after removing spacing,
    or equal for ``math_verify`` (symbolic and numeric comparison). Safe in any thread: ``math_verify`` times its
    steps with ``signal.alarm``, which only the main thread may set (elsewhere it raises, which would read as "not
    equal"), so off the main thread its timeouts are off."""
    if _normal(gold) == _normal(answer):
        return True
    from math_verify import parse, verify

    limit = {} if threading.current_thread() is threading.main_thread() else {"parsing_timeout": None}
    try:
        return bool(verify(parse(f"${gold}$", **limit), parse(f"${answer}$", **limit),
                           **({} if not limit else {"timeout_seconds": None})))
    except Exception:  # math_verify gives up (timeouts, unparsable LaTeX) by raising: not shown equal
        return False


def grade(gold: str, response: str, *, which: str = "last", problem: str | None = None) -> dict:
    """``{"correct": bool, "extracted": answer or None}`` for a response to a problem whose answer is ``gold``
    (``which``: the box ``extract_answer`` reads).

    ``problem``: for a problem that asks for answers "separated by commas", a response that boxes each answer
    apart, as MATH's own solutions do, is read as ``gold_answer`` reads a solution: its distinct boxes joined.
    Example: ``grade("-2, 1", "$\\boxed{-2}$ and $\\boxed{1}$", problem="... separated by commas.")`` is correct.
    """
    extracted = extract_answer(response, which=which)
    if problem is not None and which == "last" and _SEVERAL.search(problem):
        boxes = list(dict.fromkeys(content for _, content in _boxes(response) if content))
        if len(boxes) > 1 and extracted == boxes[-1]:  # the answer is the last box, not a later ANSWER line
            extracted = ", ".join(boxes)
    return {"correct": extracted is not None and equivalent(gold, extracted), "extracted": extracted}


# ---------------------------------------------------------------------------------------------------------------
# Loading and splitting
# ---------------------------------------------------------------------------------------------------------------

def _builtin(i: int) -> Problem:
    """Built-in problem ``i`` (deterministic in i): arithmetic, a linear equation or a sum of fractions."""
    rng = random.Random(f"math:{i}")
    kind = ("arithmetic", "equation", "fractions")[i % 3]
    if kind == "arithmetic":
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("\\times", a * b)])
        text, answer = f"Compute ${a} {op} {b}$.", str(value)
    elif kind == "equation":
        a, x, b = rng.randint(2, 9), rng.randint(-12, 12), rng.randint(-30, 30)
        text, answer = f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}$.", str(x)
    else:
        p, q, r, s = rng.randint(1, 5), rng.randint(2, 9), rng.randint(1, 5), rng.randint(2, 9)
        value = Fraction(p, q) + Fraction(r, s)
        text = f"What is $\\frac{{{p}}}{{{q}}} + \\frac{{{r}}}{{{s}}}$? Express your answer as a common fraction."
        num, den = value.numerator, value.denominator
        answer = str(num) if den == 1 else f"\\frac{{{num}}}{{{den}}}"
    return Problem(id=f"builtin/{i}", problem=text, answer=answer, level="builtin", type=kind)


def load_problems(data_dir: str | Path | None = None, *, gold: str = "joined") -> list[Problem]:
    """Every problem of ``<data_dir>/math_test.jsonl`` (rows without a boxed answer are refused; the gold answer
    by ``gold_answer(solution, problem, rule=gold)``), or the ``BUILTIN_SIZE`` built-in problems without a
    folder."""
    if data_dir is None:
        return [_builtin(i) for i in range(BUILTIN_SIZE)]
    path = Path(data_dir) / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"MATH file {str(path)!r} does not exist (expected {FILE_NAME} in the data folder)")
    problems, seen = [], set()
    for number, record in read_jsonl(path):
        fields = ("id", "problem", "solution")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k] for k in fields):
            raise ValueError(f"{path}:{number}: expected non-empty string fields {fields}, got {str(record)[:80]!r}")
        answer = gold_answer(record["solution"], record["problem"], rule=gold)
        if not answer:
            raise ValueError(f"{path}:{number}: the solution of {record['id']!r} has no \\boxed{{}} answer")
        if record["id"] in seen:
            raise ValueError(f"{path}:{number}: duplicate problem id {record['id']!r}")
        seen.add(record["id"])
        problems.append(Problem(id=record["id"], problem=record["problem"], answer=answer,
                                level=str(record.get("level", "")), type=str(record.get("type", ""))))
    return problems


def split_problems(problems: Sequence[Problem], *, n_eval: int, n_train: int = 0,
                   seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(evaluation, training) problems: disjoint, drawn with ``seed`` from the problems sorted by id.

    The evaluation set is the first ``n_eval`` of the seeded shuffle and training the next ``n_train``, so a
    larger ``n_train`` never changes the evaluation set, and the same seed gives the same sets on any file order.
    """
    n_eval, n_train = check_int("n_eval", n_eval), check_int("n_train", n_train, minimum=0)
    if n_eval + n_train > len(problems):
        raise ValueError(f"{n_eval} evaluation + {n_train} training problems requested; only {len(problems)} exist")
    order = sorted(problems, key=lambda p: p.id)
    random.Random(seed).shuffle(order)
    return order[:n_eval], order[n_eval:n_eval + n_train]
