"""Traces: every call a workflow instance made, recorded so it can be replayed exactly.

A trace is a list of events in the order the calls were issued. Parents are referred to by the index of
the event that produced them, so a trace recorded under one executor replays under another (the
baseline's outputs teacher-forced through the choreographed executor is how fine-tuning data is made).
Calls issued together (one parallel ``decode([...])``) share a ``group``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from .cache import Message
from .calls import Call, check_position
from .results import read_jsonl


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceEvent:
    kind: str  # "prefill" | "decode"
    group: int
    role: str
    parents: tuple[int, ...]  # indices of earlier events
    offsets: tuple[int | None, ...] | None = None
    new_offset: int | None = None
    text: str = ""  # prefill text, or the decoded text
    prefix: str = ""
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()  # decoded content tokens
    forced: bool = False  # teacher-forced when recorded: its tokens and end-of-turn were given, not sampled
    # the offsets it was recorded with, where a re-lay (``without_offsets``) replaced them: ``as_recorded``
    recorded_offsets: tuple[int | None, ...] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "TraceEvent":
        record = dict(record)
        for key in ("parents", "stop", "tokens"):
            record[key] = tuple(record.get(key) or ())
        for key in ("offsets", "recorded_offsets"):
            if record.get(key) is not None:
                record[key] = tuple(record[key])
        return cls(**record)


class TraceRecorder:
    """Collects events for one workflow instance (``Session(trace=True)`` owns one)."""

    def __init__(self):
        self.events: list[TraceEvent] = []
        self._index: dict[int, int] = {}  # id(Message) -> event index
        self._groups = 0

    def check_parents(self, parents: Sequence) -> None:
        """Raise unless every parent is a Message this recorder has seen (what a trace event can name)."""
        self._parents(parents)

    def _parents(self, parents: Sequence) -> tuple[int, ...]:
        out = []
        for p in parents:
            if not isinstance(p, Message) or id(p) not in self._index:
                raise ValueError(f"traced calls must name parents as Message objects of the same instance, got {p!r}")
            out.append(self._index[id(p)])
        return tuple(out)

    def prefill(self, msg: Message, *, text, role, parents, offsets, new_offset) -> None:
        self._add(msg, TraceEvent(kind="prefill", group=self._next_group(), role=role, parents=self._parents(parents),
                                  offsets=_positions(offsets), new_offset=check_position(new_offset, "new_offset"),
                                  text=text))

    def decode(self, msgs: Sequence[Message], calls: Sequence[Call]) -> None:
        group = self._next_group()
        for msg, call in zip(msgs, calls):
            self._add(msg, TraceEvent(
                kind="decode", group=group, role=call.role, parents=self._parents(call.parents),
                offsets=_positions(call.offsets), new_offset=check_position(call.new_offset, "new_offset"),
                text=msg.text, prefix=call.prefix, max_tokens=call.max_tokens, temperature=call.temperature,
                top_p=call.top_p, seed=call.seed, stop=tuple(call.stop), tokens=tuple(msg.tokens),
                forced=call.teacher_tokens is not None,
            ))

    def _next_group(self) -> int:
        self._groups += 1
        return self._groups - 1

    def _add(self, msg: Message, event: TraceEvent) -> None:
        self._index[id(msg)] = len(self.events)
        self.events.append(event)


def _positions(offsets) -> tuple[int | None, ...] | None:
    """Offsets of an accepted call as Python ints (a call may give numpy integers, which JSON cannot write)."""
    return None if offsets is None else tuple(check_position(o, f"offsets[{i}]") for i, o in enumerate(offsets))


def save_traces(path: str | Path, traces: Sequence[Sequence[TraceEvent]], *,
                meta: Sequence[dict] | None = None) -> None:
    """One JSON line per workflow instance: {"meta": ..., "events": [...]}."""
    from .results import write_text

    lines = [json.dumps({"meta": (meta[i] if meta else {}), "events": [e.to_json() for e in t]})
             for i, t in enumerate(traces)]
    write_text(path, "\n".join(lines) + "\n")


def load_traces(path: str | Path) -> list[tuple[dict, list[TraceEvent]]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist")
    out = []
    for number, record in read_jsonl(path):
        try:
            out.append((record.get("meta", {}), [TraceEvent.from_json(e) for e in record["events"]]))
        except (AttributeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: malformed trace line ({error!r})") from None
    return out


def without_offsets(events: Sequence[TraceEvent]) -> list[TraceEvent]:
    """The trace with every event's offsets dropped: a baseline trace whose calls re-encoded their parents back
    to back (``offsets=linearize(parents)``), re-laid so that a replay attends to the cached messages where they
    were encoded -- how a choreographed workflow lays them out. Each event keeps the offsets it had as
    ``recorded_offsets``, so that ``as_recorded`` gives back the calls the baseline made (the distillation
    teacher replays those: without the offsets, a re-encoding executor would put the parents in another order
    wherever one call's parents interleave, as a merge of two answered prompts does)."""
    return [dataclasses.replace(e, offsets=None, recorded_offsets=e.offsets) if e.offsets is not None else e
            for e in events]


def as_recorded(events: Sequence[TraceEvent]) -> list[TraceEvent]:
    """The trace as it was recorded: every re-laid event (``without_offsets``) with its recorded offsets back."""
    return [dataclasses.replace(e, offsets=e.recorded_offsets, recorded_offsets=None)
            if e.recorded_offsets is not None else e for e in events]


def replay_calls(events: Sequence[TraceEvent], messages: Sequence[Message], *, teacher: bool = True,
                 group: int) -> list[Call]:
    """The calls of one parallel group, with parents mapped to replayed messages (teacher-forced by default;
    ``teacher=False`` samples again every call that sampled when recorded)."""
    calls = []
    for e in events:
        if e.group != group or e.kind != "decode":
            continue
        calls.append(Call(
            role=e.role, parents=[messages[i] for i in e.parents], offsets=e.offsets, new_offset=e.new_offset,
            prefix=e.prefix, max_tokens=max(e.max_tokens, 1), temperature=e.temperature, top_p=e.top_p, seed=e.seed,
            # [] forces an empty turn; a turn forced when recorded (a scripted one) stays forced
            stop=e.stop, teacher_tokens=list(e.tokens) if teacher or e.forced else None,
        ))
    return calls


def replay(executor, events: Sequence[TraceEvent], *, teacher: bool = True) -> list[Message]:
    """Re-run a trace on an executor, group by group; returns one message per event."""
    messages: list[Message | None] = [None] * len(events)
    for group in sorted({e.group for e in events}):
        idx = [i for i, e in enumerate(events) if e.group == group]
        first = events[idx[0]]
        if first.kind == "prefill":
            messages[idx[0]] = executor.prefill(first.text, role=first.role,
                                                parents=[messages[i] for i in first.parents],
                                                offsets=first.offsets, new_offset=first.new_offset)
        else:
            out = executor.decode(replay_calls(events, messages, teacher=teacher, group=group))
            for i, m in zip(idx, out):
                messages[i] = m
    return messages
