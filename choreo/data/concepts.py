"""Concept sets for constrained story generation: CommonGen-Hard by path, or a built-in set.

``load_concept_sets(data_dir)`` reads ``<data_dir>/commongen_hard.jsonl`` (one ``{"concepts": [...]}`` per
line) when a folder is given; without one it draws sets from ``BUILTIN_CONCEPTS``, everyday nouns and
verbs in CommonGen's style. Coverage is measured both the original way (plain substring of the
lower-cased story, so "art" matches "start") and by whole words allowing regular inflections.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

from ..results import read_jsonl

FILE_NAME = "commongen_hard.jsonl"

BUILTIN_CONCEPTS = tuple("""
apple ball beach bed bicycle bird boat book bottle bread bridge brush bus cake camera candle car card cat chair
cheese child city clock cloud coat coffee cook cup dance desk dog door dream drink drive drum egg farm fence
field fire fish flag flower forest fork friend garden gate gift glass glove grass guitar hammer hat hill horse
house ice island jacket jump key kitchen kite knife ladder lake lamp leaf letter light lion map market mirror
moon mountain music nest night ocean paint paper park party pencil phone piano picture pillow plant plate pocket
pool rain read ride ring river road rock roof rope run sail sand school sea shadow sheep shell ship shoe shop
sing sky sleep snow soap song star stone storm street sun swim table tea teacher tent ticket tower town toy
train tree truck umbrella village violin wall watch water wave wheel whistle wind window winter wolf write
""".split())


def load_concept_sets(data_dir: str | Path | None = None, *, n: int, skip: int = 0, size: int = 30,
                      seed: int = 0) -> list[list[str]]:
    """``n`` concept sets after skipping ``skip`` (CommonGen-Hard rows in file order, or built-in draws).

    Built-in sets are ``size`` distinct concepts drawn with ``seed`` (set i uses ``seed`` and i, so sets
    do not depend on ``n``). Example: ``load_concept_sets(None, n=2, size=10)[0]`` is ten concepts.
    """
    if n < 1:
        raise ValueError(f"number of concept sets must be >= 1, got {n}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if data_dir is None:
        if not 2 <= size <= len(BUILTIN_CONCEPTS):
            raise ValueError(f"size must be in [2, {len(BUILTIN_CONCEPTS)}], got {size}")
        return [random.Random(f"{seed}:{i}").sample(BUILTIN_CONCEPTS, size) for i in range(skip, skip + n)]
    path = Path(data_dir) / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"concept file {str(path)!r} does not exist (expected {FILE_NAME} in the data folder)")
    sets = []
    for number, record in read_jsonl(path):
        concepts = record.get("concepts") if isinstance(record, dict) else None
        if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
            raise ValueError(f"{path}:{number}: expected {{\"concepts\": [non-empty strings]}}, got {str(record)[:80]!r}")
        sets.append([c.strip().lower() for c in concepts])
    if len(sets) < skip + n:
        raise ValueError(f"{path} has {len(sets)} concept sets; {skip + n} needed (skip {skip} + n {n})")
    return sets[skip:skip + n]


def _word_pattern(concept: str) -> re.Pattern:
    word = re.escape(concept.lower())
    forms = rf"{word}(?:s|es|d|ed|ing|er|ers)?"
    if concept.lower().endswith("e") and len(concept) > 2:  # dance -> dancing (but wine never matches "win")
        forms += rf"|{re.escape(concept[:-1].lower())}(?:ing|ed|er|ers)"
    return re.compile(rf"\b(?:{forms})\b")


def found(concept: str, story: str, *, method: str = "word") -> bool:
    """Whether ``concept`` occurs in ``story``: "substring" (the original) or "word" (whole word + inflections).

    Example: ``found("art", "a start")`` is False; ``found("art", "a start", method="substring")`` is True;
    ``found("jump", "she jumped")`` is True.
    """
    text = story.lower()
    if method == "substring":
        return concept.lower() in text
    if method == "word":
        return _word_pattern(concept).search(text) is not None
    raise ValueError(f"unknown matching method {method!r}; choose 'substring' or 'word'")


def coverage(concepts: Sequence[str], story: str, *, method: str = "word") -> float:
    """Share of ``concepts`` found in ``story`` (0.0 for an empty concept list is an error)."""
    if not concepts:
        raise ValueError("coverage of an empty concept list is undefined")
    return sum(found(c, story, method=method) for c in concepts) / len(concepts)
