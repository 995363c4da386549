"""Trivia questions: the built-in easy set, a TriviaQA-format reader, and TriviaQA-style grading.

Grading follows the TriviaQA evaluation script: lower-case, strip punctuation and the articles a/an/the,
collapse whitespace; a prediction is correct when a normalised alias occurs in it as whole words.
Answers to several questions are first split by their numbers ("1.", "2)", "Question 2:", "Answer 2:");
a question whose number is missing is graded against the whole response (free text).

The built-in set (``trivia_questions.json``) is the subset of ``trivia_candidates.json`` that the
embedded SmolLM2-135M-Instruct answers correctly when asked alone (greedy), made by::

    OMP_NUM_THREADS=1 python -m choreo.data.trivia filter   # rewrites choreo/data/trivia_questions.json
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import sys
from pathlib import Path
from typing import Sequence

from ..results import read_jsonl

HERE = Path(__file__).resolve().parent
CANDIDATES = HERE / "trivia_candidates.json"
BUILTIN = HERE / "trivia_questions.json"

_PUNCT = set(string.punctuation) | set("\u2018\u2019\u201c\u201d\u2013\u2014\u00b4")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# "1.", "1)", "1:", "**1.**", "Question 1:", "Answer 1 -", "Q1." at the start of a line (or of the text)
_ITEM = re.compile(r"(?:^|\n)[ \t>*#-]*(?:\*\*)?(?:question|answer|q|a)?[ \t]*(\d+)[ \t]*(?:\*\*)?[ \t]*[.):\-]",
                   re.IGNORECASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Question:
    """One trivia question with its accepted answers."""

    id: str
    question: str
    aliases: tuple[str, ...]

    def __post_init__(self):
        if not self.question.strip():
            raise ValueError(f"question {self.id!r} has empty text")
        usable = tuple(a for a in self.aliases if len(normalize(a)) >= 2)
        if not usable:
            raise ValueError(f"question {self.id!r} has no alias of 2+ characters after normalisation: {self.aliases!r}")
        object.__setattr__(self, "aliases", usable)

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "aliases": list(self.aliases)}


def normalize(text: str) -> str:
    """TriviaQA answer normalisation.

    Example: ``normalize("The Beatles!")`` is ``"beatles"``.
    """
    text = text.lower().replace("_", " ")
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def matches(prediction: str, aliases: Sequence[str]) -> bool:
    """Whether any normalised alias occurs in the normalised prediction as whole words.

    Example: ``matches("It was William Shakespeare.", ["Shakespeare"])`` is True; ``matches("Parisian", ["Paris"])``
    is False.
    """
    pred = f" {normalize(prediction)} "
    return any(f" {a} " in pred for a in (normalize(x) for x in aliases) if a)


def split_numbered(text: str) -> dict[int, str]:
    """The items of a numbered answer list, by number (the first occurrence of each number wins).

    Example: ``split_numbered("1. Paris\\n2. Shakespeare")`` is ``{1: "Paris", 2: "Shakespeare"}``.
    """
    marks = list(_ITEM.finditer(text))
    items: dict[int, str] = {}
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        items.setdefault(int(m.group(1)), text[m.end():end].strip())
    return items


def grade(response: str, questions: Sequence[Question]) -> list[bool]:
    """Per-question correctness of one response to a numbered list of questions.

    Question i (1-based) is graded on item i of the response's numbered list when there is one, else on
    the whole response. Example: ``grade("1. Paris\\n2. Hamlet", [q_france, q_hamlet_author])`` is [True, False].
    """
    items = split_numbered(response)
    return [matches(items.get(i, response), q.aliases) for i, q in enumerate(questions, start=1)]


def overlapping(a: Question, b: Question) -> bool:
    """Whether an answer to one question could be graded correct for the other (shared alias words)."""
    na, nb = [normalize(x) for x in a.aliases], [normalize(x) for x in b.aliases]
    return any(f" {x} " in f" {y} " or f" {y} " in f" {x} " for x in na for y in nb) or \
        matches(a.question, b.aliases) or matches(b.question, a.aliases)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def _from_record(record, where: str, index: int) -> Question:
    """A Question from a built-in record, an original TriviaQA record or a Hugging Face trivia_qa record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get("question", record.get("Question"))
    answer = record.get("answer", record.get("Answer"))
    if isinstance(record.get("aliases"), list):
        aliases = record["aliases"]
    elif isinstance(answer, dict):
        aliases = list(answer.get("aliases", answer.get("Aliases", [])))
        value = answer.get("value", answer.get("Value"))
        aliases = ([value] if value else []) + [a for a in aliases if a != value]
    elif isinstance(answer, str):
        aliases = [answer]
    elif isinstance(answer, list):
        aliases = answer
    else:
        raise ValueError(f"{where}: no answer aliases (need 'aliases', or 'answer'/'Answer' with 'aliases'/'Aliases')")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: missing or empty 'question'/'Question' field")
    if not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}: answer aliases must be strings, got {aliases!r}")
    qid = record.get("id", record.get("QuestionId", record.get("question_id", f"q{index}")))
    try:
        return Question(id=str(qid), question=text.strip(), aliases=tuple(aliases))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def load_questions(path: str | Path | None = None, *, limit: int | None = None) -> list[Question]:
    """Questions from a file, or the built-in filtered set when ``path`` is None.

    Reads the original TriviaQA JSON (``{"Data": [{"Question", "Answer": {"Value", "Aliases"}}]}``),
    a JSON list, or JSON lines (one record per line, e.g. Hugging Face ``trivia_qa`` rows with
    ``question`` and ``answer.aliases``). Errors name the file and the record's line or index.

    Example: ``load_questions()[0].question`` is a short question the embedded model answers alone.
    """
    path = BUILTIN if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trivia question file {str(path)!r} does not exist")
    text = path.read_text()
    out: list[Question] = []
    if path.suffix == ".jsonl":
        for number, record in read_jsonl(path):
            out.append(_from_record(record, f"{path}:{number}", len(out)))
    else:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
        records = payload.get("Data", payload.get("data")) if isinstance(payload, dict) else payload
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of questions or an object with a 'Data' list")
        for i, record in enumerate(records):
            out.append(_from_record(record, f"{path}: record {i}", i))
    if not out:
        raise ValueError(f"{path}: no questions found")
    return out[:limit] if limit is not None else out


def make_pairs(questions: Sequence[Question], n: int, *, seed: int) -> list[tuple[Question, Question]]:
    """``n`` ordered pairs of distinct questions whose answers cannot be confused, drawn with ``seed``.

    Every question appears as Q1 and as Q2 about equally often. Example: ``make_pairs(load_questions(), 30, seed=0)``.
    """
    import random

    if len(questions) < 2:
        raise ValueError(f"need at least 2 questions to make pairs, got {len(questions)}")
    if n < 1:
        raise ValueError(f"number of pairs must be >= 1, got {n}")
    rng = random.Random(seed)
    pairs: list[tuple[Question, Question]] = []
    firsts: list[Question] = []
    while len(pairs) < n:
        if not firsts:
            firsts = list(questions)
            rng.shuffle(firsts)
        a = firsts.pop()
        for _ in range(100):
            b = questions[rng.randrange(len(questions))]
            if b.id != a.id and not overlapping(a, b):
                pairs.append((a, b))
                break
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Building the built-in set
# ---------------------------------------------------------------------------------------------------------------

def filter_answerable(model, questions: Sequence[Question], *, batch: int = 64) -> list[tuple[Question, str, bool]]:
    """Ask each question alone (the MultiQA prompt with one question, greedy) and grade the answer."""
    from choreo import Choreographer, Runner
    from choreo.workflows.multiqa import MultiQAConfig, multiqa

    config = MultiQAConfig()
    runner = Runner(Choreographer(model), max_concurrent=batch, progress="filter questions")
    results = runner.run([lambda ex, q=q: multiqa(ex, [q], layout="serial", config=config) for q in questions])
    return [(q, r["response"], r["correct"][0]) for q, r in zip(questions, results)]


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m choreo.data.trivia")
    parser.add_argument("action", choices=["filter"])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--out", default=str(BUILTIN))
    args = parser.parse_args(argv)
    import torch

    import choreo

    torch.manual_seed(0)
    candidates = load_questions(CANDIDATES)
    candidates = [q for q in candidates if not matches(q.question, q.aliases)]  # the answer is not in the question
    graded = filter_answerable(choreo.load_model(args.model), candidates)
    kept = [q.to_json() for q, _, ok in graded if ok]
    from choreo.results import write_text

    write_text(args.out, json.dumps(kept, indent=0, ensure_ascii=False) + "\n")
    print(f"kept {len(kept)} of {len(graded)} candidate questions -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
