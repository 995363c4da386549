"""Trivia questions: the built-in easy set, a TriviaQA-format reader, and TriviaQA-style grading.

Grading follows the TriviaQA evaluation script: lower-case, strip punctuation and the articles a/an/the,
collapse whitespace; a prediction is correct when a normalised alias occurs in it as whole words.
Answers to several questions are first split by their numbers ("1.", "2)", "Question 2:", "Answer 2:") at line
starts, or inline ("1. Tokyo 2. Paris") for the next expected number; an "Answer i" item wins over an echoed
"Question i" one. A number from zero to twenty is the same answer as a word or in digits ("three", "3"). Aliases
shorter than 2 characters after normalisation (e.g. "7") match only as a whole token: of their question's item, or,
for a question whose number is missing (graded against the whole response, as free text), of the response, but
not as the number of a question ("Question 2", "Q2", "#2").

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

from ..checks import check_int, is_real
from ..results import read_jsonl

HERE = Path(__file__).resolve().parent
CANDIDATES = HERE / "trivia_candidates.json"
BUILTIN = HERE / "trivia_questions.json"

_PUNCT = set(string.punctuation) | set("\u2018\u2019\u201c\u201d\u2013\u2014\u00b4")
_PUNCT_CHARS = "".join(sorted(_PUNCT))
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# "1.", "1)", "1:", "**1.**", "Question 1:", "Answer 1 -", "Q1." at the start of a line (or of the text)
_ITEM = re.compile(r"(?:^|\n)[ \t>*#-]*(?:\*\*)?(question|answer|q|a)?[ \t]*(\d+)[ \t]*(?:\*\*)?[ \t]*[.):\-](?:\*\*)?",
                   re.IGNORECASE)
# Inline, after a space and before more text on the same line: "2.", "2)", "**2.**", "Question 2:", "Answer 2." (a
# colon only after a keyword). Accepted only for the next expected number, so "3.14" or "in 1999." is no marker,
# nor is a sentence's last word ("the answer is 1.\n").
_INLINE = re.compile(r"(?<=[ \t])(?:\*\*)?(?:(question|answer)[ \t]*)?(\d+)(?:\*\*)?([.):])(?:\*\*)?(?=[ \t]+\S)",
                     re.IGNORECASE)
_ANSWER_WORDS = ("answer", "a")
# Aliases shorter than this after normalisation ("7", "x") count only as whole tokens (``matches_item``, ``grade``).
SHORT_ALIAS = 2
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
# the words before a question's own number in a free-text answer ("Question 2", "Q2", "#2", "number 2")
_NUMBERING = {"question", "questions", "q", "number", "no", "#"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Question:
    """One trivia question with its accepted answers (``aliases``: all kept, at least one non-empty after
    normalisation; short ones such as "7" are graded as in ``grade``)."""

    id: str
    question: str
    aliases: tuple[str, ...]

    def __post_init__(self):
        if not self.question.strip():
            raise ValueError(f"question {self.id!r} has empty text")
        if isinstance(self.aliases, str):
            raise TypeError(f"question {self.id!r}: aliases must be a sequence of strings, got the string "
                            f"{self.aliases!r}")
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if not any(normalize(a) for a in self.aliases):
            raise ValueError(f"question {self.id!r} has no alias left after normalisation: {self.aliases!r}")

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


def _markers(text: str) -> list[tuple[int, int, int, bool]]:
    """(start, end, number, is_answer) of the item markers in ``text``, in order: every line-start marker, and an
    inline one only when its number is one more than the previous accepted marker's (1 when none came before)."""
    found = [(m.start(), m.end(), _number(m.group(2)), (m.group(1) or "").lower() in _ANSWER_WORDS, True)
             for m in _ITEM.finditer(text)]
    found += [(m.start(), m.end(), _number(m.group(2)), (m.group(1) or "").lower() == "answer", False)
              for m in _INLINE.finditer(text) if m.group(1) or m.group(3) != ":"]
    marks: list[tuple[int, int, int, bool]] = []
    for start, end, number, is_answer, line_start in sorted(f for f in found if f[2] is not None):
        if marks and start < marks[-1][1]:
            continue  # inside the previous marker (an indented line-start marker is found twice)
        if line_start or number == (marks[-1][2] if marks else 0) + 1:
            marks.append((start, end, number, is_answer))
    return marks


def _number(digits: str) -> int | None:
    """``int(digits)``, or None for more digits than Python converts (4,300 by default): no item's number."""
    try:
        return int(digits)
    except ValueError:
        return None


def split_numbered(text: str) -> dict[int, str]:
    """The items of a numbered answer list, by number.

    Markers are found at line starts, and inline for the next expected number. When a number occurs twice, an
    "Answer i" item wins over a "Question i" or plain "i." one (an echoed question); otherwise the first wins.
    Example: ``split_numbered("Question 1: Capital of France?\\nAnswer 1: Paris 2. Shakespeare")`` is
    ``{1: "Paris", 2: "Shakespeare"}``.
    """
    marks = _markers(text)
    items: dict[int, str] = {}
    answered: set[int] = set()
    for k, (_, end, number, is_answer) in enumerate(marks):
        if number in answered or (number in items and not is_answer):
            continue
        items[number] = text[end:marks[k + 1][0] if k + 1 < len(marks) else len(text)].strip()
        if is_answer:
            answered.add(number)
    return items


def _tokens(text: str) -> set[str]:
    """The normalised whitespace-separated tokens of ``text``, each stripped of surrounding punctuation first:
    "(7)." gives "7" but "7.5" gives "7 5", so a short alias never matches part of a number."""
    return {normalize(token.strip(_PUNCT_CHARS)) for token in text.split()}


def with_numbers(aliases: Sequence[str]) -> tuple[str, ...]:
    """``aliases`` and, for each that is a number from zero to twenty, its other spelling (word or digits).

    Example: ``with_numbers(["three"])`` is ``("three", "3")``; ``with_numbers(["12", "dozen"])`` is ``("12",
    "dozen", "twelve")``.
    """
    out = list(aliases)
    for a in map(normalize, aliases):
        other = (str(_NUMBER_WORDS.index(a)) if a in _NUMBER_WORDS else
                 _NUMBER_WORDS[int(a)] if a.isascii() and a.isdigit() and int(a) < len(_NUMBER_WORDS) else None)
        if other is not None and other not in out:
            out.append(other)
    return tuple(out)


def _short(aliases: Sequence[str]) -> set[str]:
    return {a for a in map(normalize, aliases) if 0 < len(a) < SHORT_ALIAS}


def matches_item(item: str, aliases: Sequence[str]) -> bool:
    """Whether a numbered item answers a question: an alias of ``SHORT_ALIAS``+ characters occurs in it as whole
    words (``matches``), or a shorter one is a whole token of it; numbers up to twenty as words or digits.

    Example: ``matches_item("7 (seven)", ["7"])`` is True; ``matches_item("7.5", ["7"])`` is False.
    """
    aliases = with_numbers(aliases)
    return matches(item, free_text_aliases(aliases)) or bool(_short(aliases) & _tokens(item))


def matches_free_text(response: str, aliases: Sequence[str]) -> bool:
    """Whether a response with no item for the question answers it: an alias of ``SHORT_ALIAS``+ characters as whole
    words, or a shorter one as a whole token that does not number a question ("Question 2"); numbers up to twenty
    as words or digits.

    Example: ``matches_free_text("A triangle has 3 sides.", ["three"])`` is True; ``matches_free_text("Question 3
    is hard.", ["3"])`` is False.
    """
    aliases = with_numbers(aliases)
    if matches(response, free_text_aliases(aliases)):
        return True
    short, previous = _short(aliases), ""
    for raw in response.split():
        token = normalize(raw.strip(_PUNCT_CHARS))
        if token in short and previous not in _NUMBERING and not raw.startswith("#"):
            return True
        previous = token if token else raw.strip()  # "#" normalises to nothing
    return False


def free_text_aliases(aliases: Sequence[str]) -> tuple[str, ...]:
    """The aliases that may match anywhere in a free-text response: those of ``SHORT_ALIAS``+ characters after
    normalisation. Example: ``free_text_aliases(["7", "seven"])`` is ``("seven",)``."""
    return tuple(a for a in aliases if len(normalize(a)) >= SHORT_ALIAS)


def grade(response: str, questions: Sequence[Question]) -> list[bool]:
    """Per-question correctness of one response to a numbered list of questions.

    Question i (1-based) is graded on item i of the response's numbered list (``split_numbered``) when there is
    one (``matches_item``); else on the whole response (``matches_free_text``).
    Example: ``grade("1. Paris\\n2. Hamlet", [q_france, q_hamlet_author])`` is [True, False].
    """
    items = split_numbered(response)
    return [matches_item(items[i], q.aliases) if i in items else matches_free_text(response, q.aliases)
            for i, q in enumerate(questions, start=1)]


def overlapping(a: Question, b: Question) -> bool:
    """Whether an answer to one question could be graded correct for the other (shared alias words, numbers as words
    or digits)."""
    aliases_a, aliases_b = with_numbers(a.aliases), with_numbers(b.aliases)
    na, nb = [x for x in map(normalize, aliases_a) if x], [x for x in map(normalize, aliases_b) if x]
    return any(f" {x} " in f" {y} " or f" {y} " in f" {x} " for x in na for y in nb) or \
        matches(a.question, aliases_b) or matches(b.question, aliases_a)


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

    ``limit``: keep only the first ``limit`` questions (None or an integer >= 1).
    Example: ``load_questions()[0].question`` is a short question the embedded model answers alone.
    """
    limit = check_int("limit", limit, optional=True)
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


def split_questions(questions: Sequence[Question], *, train_share: float, seed: int
                    ) -> tuple[list[Question], list[Question]]:
    """(evaluation, training) questions: a seeded share ``train_share`` of the questions (at least 2) set aside
    for fine-tuning pairs, so that no evaluation pair asks a question a training pair asks (fine-tuning then
    cannot pass by learning the answers). Each side keeps the questions' order.

    Example: ``split_questions(load_questions(), train_share=0.4, seed=0)`` -> 146 and 98 of the 244 built-in
    questions.
    """
    import random

    if not is_real(train_share) or not 0 < train_share < 1:
        raise ValueError(f"train_share must be a number in (0, 1), got {train_share!r}")
    n_train = max(2, round(len(questions) * train_share))
    if len(questions) - n_train < 2:
        raise ValueError(f"need at least 2 questions on each side of the split, got {len(questions)} questions "
                         f"for a train_share of {train_share}")
    train = set(random.Random(seed).sample(range(len(questions)), n_train))
    return ([q for i, q in enumerate(questions) if i not in train], [q for i, q in enumerate(questions) if i in train])


def make_pairs(questions: Sequence[Question], n: int, *, seed: int) -> list[tuple[Question, Question]]:
    """``n`` ordered pairs of distinct questions whose answers cannot be confused, drawn with ``seed``.

    Every question appears as Q1 and as Q2 about equally often. Raises ValueError, naming how many pairs were
    asked for and found, when a question drawn as Q1 has no partner (every other question has its id or
    ``overlapping`` answers). Example: ``make_pairs(load_questions(), 30, seed=0)``.
    """
    import random

    if len(questions) < 2:
        raise ValueError(f"need at least 2 questions to make pairs, got {len(questions)}")
    n = check_int("number of pairs", n)
    rng = random.Random(seed)
    pairs: list[tuple[Question, Question]] = []
    firsts: list[Question] = []
    while len(pairs) < n:
        if not firsts:
            firsts = list(questions)
            rng.shuffle(firsts)
        a = firsts.pop()
        b = _partner(a, questions, rng)
        if b is None:
            raise ValueError(f"asked for {n} pairs, found {len(pairs)}: question {a.id!r} (answers {a.aliases!r}) "
                             f"has no partner among the {len(questions)} questions (each other one has the same id "
                             "or overlapping answers: a shared alias word, or an alias in the other's question)")
        pairs.append((a, b))
    return pairs


def _partner(a: Question, questions: Sequence[Question], rng, *, tries: int = 100) -> Question | None:
    """A random question that can follow ``a`` in a pair: ``tries`` random draws, then a draw among all valid
    partners (so a rare partner is still found); None when there is none."""
    def valid(b: Question) -> bool:
        return b.id != a.id and not overlapping(a, b)

    for _ in range(tries):
        b = questions[rng.randrange(len(questions))]
        if valid(b):
            return b
    candidates = [b for b in questions if valid(b)]
    return rng.choice(candidates) if candidates else None


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
