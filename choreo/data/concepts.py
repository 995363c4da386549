"""Concept sets for constrained story generation: CommonGen-Hard by path, or a built-in set.

``load_concept_sets(data_dir)`` reads ``<data_dir>/commongen_hard.jsonl`` (one ``{"concepts": [...]}`` per
line) when a folder is given; without one it draws sets from ``BUILTIN_CONCEPTS``, everyday nouns and
verbs in CommonGen's style. Coverage is measured both the original way (plain substring of the
lower-cased story, so "art" matches "start") and by whole words allowing regular inflections
(``inflections``: "run" matches "running", "city" matches "cities", "cat" does not match "catalog").
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

from ..checks import check_int
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
    n, skip = check_int("n", n), check_int("skip", skip, minimum=0)
    if data_dir is None:
        size = check_int("size", size, minimum=2, maximum=len(BUILTIN_CONCEPTS))
        return [random.Random(f"{seed}:{i}").sample(BUILTIN_CONCEPTS, size) for i in range(skip, skip + n)]
    path = Path(data_dir) / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"concept file {str(path)!r} does not exist (expected {FILE_NAME} in the data folder)")
    sets = []
    for number, record in read_jsonl(path):
        concepts = record.get("concepts") if isinstance(record, dict) else None
        if not isinstance(concepts, list) or not concepts \
                or not all(isinstance(c, str) and c.strip() for c in concepts):
            raise ValueError(f"{path}:{number}: expected {{\"concepts\": [non-empty strings]}}, "
                             f"got {str(record)[:80]!r}")
        sets.append([c.strip().lower() for c in concepts])
    if len(sets) < skip + n:
        raise ValueError(f"{path} has {len(sets)} concept sets; {skip + n} needed (skip {skip} + n {n})")
    return sets[skip:skip + n]


_SUFFIXES = ("ing", "ed", "er", "ers", "est")  # the suffixes that begin with a vowel (they change the spelling)


def inflections(concept: str) -> tuple[str, ...]:
    """Every word that ``found(concept, story)`` accepts: the concept, or the concept plus one regular suffix.

    The suffixes are -s/-es, -ed, -ing, -er/-ers (agent or comparative) and -est, spelled by the regular rules:

    - -es only after s, x, z, ch, sh or o (box -> boxes; "car" does not match "cares", "sit" not "sites");
    - a final e takes -s, -d, -r, -rs, -st and drops before -ing (dance -> danced, dancer, dancing; free ->
      freeing keeps it); a final ie takes -s, -d and -ying (tie -> tied, tying; not "tier");
    - a final consonant + y becomes i (city -> cities, party -> partied, happy -> happiest); -ying keeps the y,
      and -yer/-yers are accepted too (dryer, flyer);
    - a final consonant-vowel-consonant (not w, x or y) doubles before a vowel suffix (run -> running, runner;
      swim -> swimming; shop -> shopped). A one-syllable word must double ("car" does not match "caring", "hat"
      not "hated"); a longer one may or may not, as its stress decides (visited, admitted, traveled/travelled);
    - a word of one or two letters takes only -s and -ing (every other suffix makes another word: bed, best).

    A possessive ("dog's") matches through the word boundary. Irregular forms are out of scope (ran, swam,
    children, leaves, teeth), and so is the concept plus anything that is not one of these suffixes ("cat" does
    not match "catalog", "sit" not "site", "art" not "start"). The rule is spelling, not meaning: a derived word
    spelled as an inflection still matches ("corn" matches "corner", "show" "shower", "let" "letter").

    Example: ``inflections("run")`` is ``("run", "runs", "running", "runned", "runner", "runners", "runnest")``.
    """
    w = concept.lower()
    if len(w) <= 2:  # be, go: any other suffix makes another word (bed, best, beer)
        return (w, w + "s", w + "ing")
    if w.endswith("ie"):  # tie -> ties, tied, tying (not "tier")
        return (w, w + "s", w + "d", w[:-2] + "ying")
    if w.endswith("e"):
        keep = re.search(r"[eoy]e$", w) is not None  # seeing, canoeing, eyeing keep the e
        return (w, w + "s", w + "d", w + "r", w + "rs", w + "st", (w if keep else w[:-1]) + "ing")
    if re.search(r"[^aeiou]y$", w):
        return (w, w[:-1] + "ies", w + "ing", *(w[:-1] + "i" + s for s in _SUFFIXES[1:]), w + "er", w + "ers")
    forms = [w, w + "s"] + ([w + "es"] if re.search(r"(?:s|x|z|ch|sh|o)$", w) else [])
    plain = w.replace("qu", "q")  # the u of qu is not a vowel: quit -> quitting
    cvc = re.search(r"(?:^|[^aeiou])[aeiou]([^aeiouwxy])$", plain)
    if cvc:
        forms += [w + cvc.group(1) + s for s in _SUFFIXES]
    if not cvc or len(re.findall(r"[aeiouy]+", plain)) > 1:
        forms += [w + s for s in _SUFFIXES]
    return tuple(forms)


def _word_pattern(concept: str) -> re.Pattern:
    return re.compile(rf"\b(?:{'|'.join(re.escape(f) for f in inflections(concept))})\b")


def found(concept: str, story: str, *, method: str = "word") -> bool:
    """Whether ``concept`` occurs in ``story``: "substring" (the original) or "word" (a whole word among
    ``inflections(concept)``).

    Example: ``found("art", "a start")`` is False; ``found("art", "a start", method="substring")`` is True;
    ``found("jump", "she jumped")`` and ``found("run", "they were running")`` are True.
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
