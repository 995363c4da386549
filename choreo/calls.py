"""What a call is, and the checks of the arguments prefill and decode take.

``Call`` holds the keyword fields of one decode; the functions below read parents, offsets and positions the way
every executor does (``Choreographer``, ``Baseline``, a ``Runner``'s sessions), with errors that name the bad value.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Sequence

from .cache import Message
from .chat import parse_role
from .checks import check_int, check_sampling, is_int

ParentRef = Message | int
RAW = "raw"  # prefill role of a raw segment: part of a chat turn, e.g. one question of a user turn


@dataclasses.dataclass(frozen=True, kw_only=True)
class Call:
    """One decode call; the keyword fields of ``Choreographer.decode``.

    ``offsets[i]`` moves parent i to start at that position (None keeps it); ``new_offset`` sets the new
    message's start (default: 1 + the largest position it attends to, 0 with no parents).
    ``teacher_tokens`` replaces sampling with the given content tokens (one forward pass); an empty list forces
    an empty turn (header and end-of-turn: what a sampled end-of-turn as first token leaves in the cache);
    ``keep_logits`` keeps the (len(tokens), V) logits of a teacher-forced call on the message.
    """

    role: str = "assistant"
    parents: Sequence[ParentRef] = ()
    offsets: Sequence[int | None] | None = None
    new_offset: int | None = None
    prefix: str = ""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    teacher_tokens: Sequence[int] | None = None
    keep_logits: bool = False

    def __post_init__(self):
        parse_role(self.role)
        # Iterables become tuples once: a generator read by a trace check would otherwise reach the executor empty.
        object.__setattr__(self, "parents", as_tuple(self.parents))
        if self.offsets is not None:
            object.__setattr__(self, "offsets", as_tuple(self.offsets))
        object.__setattr__(self, "new_offset", check_position(self.new_offset, "new_offset"))
        if not isinstance(self.prefix, str):
            raise ValueError(f"prefix must be a string (text the turn starts with), got {self.prefix!r}")
        check_int("max_tokens", self.max_tokens)
        check_sampling(temperature=self.temperature, top_p=self.top_p)
        if not is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [0, 2**32 - 1], got {self.seed!r}: torch's CPU generator "
                             f"keeps a seed's low 32 bits only, so seeds differing by a multiple of 2**32 (or a "
                             f"negative one and its 32-bit complement) would draw the same tokens")
        # Python numbers from here on (numpy scalars included): they reach the store's counters and the traces' JSON.
        for name, kind in (("max_tokens", operator.index), ("seed", operator.index), ("temperature", float),
                           ("top_p", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if not isinstance(self.keep_logits, bool):
            raise ValueError(f"keep_logits must be True or False, got {self.keep_logits!r}")
        if self.keep_logits and self.teacher_tokens is None:
            raise ValueError("keep_logits=True keeps the logits of a teacher-forced call; this call samples "
                             "(teacher_tokens=None): to score sampled tokens, teacher-force them afterwards "
                             "(teacher_tokens=message.tokens, keep_logits=True)")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else as_tuple(self.stop)
        if not isinstance(stop, tuple) or not all(isinstance(s, str) and s for s in stop):  # a generator: read once
            raise ValueError(f"stop must be a non-empty string or a sequence of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.teacher_tokens is not None:
            object.__setattr__(self, "teacher_tokens", token_ids(self.teacher_tokens, "teacher_tokens"))


SEED_RANGE = (0, (1 << 32) - 1)  # the seeds torch's CPU generator tells apart (it keeps the low 32 bits)
POSITION_LIMIT = 1 << 62  # positions and position sums stay inside int64 tensors


def token_ids(tokens, name: str, *, vocab: int | None = None) -> tuple[int, ...]:
    """``tokens`` as a tuple of Python ints (numpy and 0-d torch integers included, bool not), each a token id
    (below ``vocab`` when given); anything else raises ValueError naming ``name`` and the first bad entry."""
    if isinstance(tokens, (str, bytes, dict)) or not hasattr(tokens, "__len__"):
        raise ValueError(f"{name} must be a sequence of token ids, got {tokens!r}")
    ids = tuple(as_int(t) for t in tokens)
    bad = [t for t, i in zip(tokens, ids) if i is None or i < 0]
    if bad:
        raise ValueError(f"{name} must be non-negative integer token ids, got {bad[0]!r}")
    if vocab is not None and ids and max(ids) >= vocab:
        raise ValueError(f"{name} holds token id {max(ids)}, outside the model's vocabulary of {vocab}")
    return ids


SINGLES = (Message, str, bytes, dict)  # iterable, yet one item where a list is expected


def is_single(value, singles=SINGLES) -> bool:
    """Whether ``value`` is one item rather than a list of them: not iterable, or one of ``singles``."""
    return isinstance(value, singles) or not hasattr(value, "__iter__")


def as_tuple(value, singles=SINGLES):
    """An iterable (a list, a generator) as a tuple, read once; a single item or a non-iterable comes back as it is,
    for the checks that say what was expected (``check_sequence``)."""
    return value if is_single(value, singles) else tuple(value)


def as_int(x) -> int | None:
    """x as a Python int if it is an integer (a numpy or 0-d integer torch scalar included, bool not), else None."""
    if isinstance(x, bool) or getattr(x, "ndim", 0) != 0 or "bool" in str(getattr(x, "dtype", "")):
        return None  # a bool, an array of one element, a 0-d bool tensor
    try:
        return operator.index(x)
    except TypeError:
        return None



def call_list(calls, fields: dict) -> list[Call]:
    """The calls of ``decode(calls)`` as a list of ``Call`` (dicts are keyword fields); refuses a single call, or
    keyword fields beside the list, with a TypeError that says how to call ``decode`` instead."""
    if fields:
        raise TypeError(f"decode(calls) takes no keyword fields, got {sorted(fields)}")
    check_sequence(calls, "decode(calls)", "calls", example="decode([call]) or decode(**fields)",
                    singles=(Call, dict, str, bytes))
    calls = list(calls)
    for i, c in enumerate(calls):
        if not isinstance(c, (Call, dict)):
            raise TypeError(f"decode(calls)[{i}] must be a Call or a dict of Call fields, got "
                            f"{type(c).__name__} {c!r:.60}")
    return [c if isinstance(c, Call) else Call(**c) for c in calls]


def check_position(value, name: str) -> int | None:
    """``value`` as a Python int if it is a non-negative integer (numpy and 0-d torch integers included, bool not),
    None if it is None; anything else raises ValueError naming ``name`` and the value."""
    if value is None:
        return None
    position = as_int(value)
    if position is None or not 0 <= position < POSITION_LIMIT:
        raise ValueError(f"{name} must be a non-negative integer position below 2**62, or None, got {value!r}")
    return position


def check_sequence(value, name: str, what: str, *, example: str, singles=SINGLES) -> None:
    """Refuse a single item (``is_single``) where a list is expected: a TypeError that shows the list form."""
    if is_single(value, singles):
        raise TypeError(f"{name} must be a list of {what}, got {type(value).__name__} {value!r:.60}: write "
                        f"{example}")


def resolve_offsets(parents: Sequence[Message], offsets) -> list[int]:
    """Effective start position of each parent: its offset, or its own start when the offset is None."""
    if offsets is None:
        return [p.start for p in parents]
    check_sequence(offsets, "offsets", "positions (or None), one per parent", example="offsets=[0]")
    offsets = list(offsets)
    if len(offsets) != len(parents):
        raise ValueError(f"offsets has {len(offsets)} entries but there are {len(parents)} parents")
    offsets = [check_position(o, f"offsets[{i}]") for i, o in enumerate(offsets)]
    return [p.start if o is None else o for p, o in zip(parents, offsets)]


def default_start(parents: Sequence[Message], starts: Sequence[int]) -> int:
    """1 + the largest position the new message attends to; 0 without parents."""
    return max((s + p.length for p, s in zip(parents, starts)), default=0)


def linearize(parents: Sequence[Message], start: int | None = None) -> list[int]:
    """Offsets that lay ``parents`` back-to-back in the given order from ``start`` (default: the first position
    after the shared conversation prefix, ``Message.floor``: 0 for templates without a BOS token).

    Example: ``ch.decode(role="assistant", parents=ps, offsets=linearize(ps))`` attends to parallel
    siblings as if they had been written one after another (their encodings are unchanged).
    """
    if not all(isinstance(p, Message) for p in parents):
        raise TypeError(f"linearize takes Message objects (it needs their lengths), got {list(parents)!r}")
    if start is None:
        start = parents[0].floor if parents else 0
    start = check_position(start, "start")
    offsets, pos = [], start
    for p in parents:
        offsets.append(pos)
        pos += p.length
    return offsets

