"""The re-encoding baseline: ordinary chat prompting behind the choreography API.

Every call re-encodes, from position 0, a serial prompt made of its parents' turns in position order
(ties keep the listed order) followed by its own header. Parents are token ids (a message's text rendering, or
the ids it sampled): nothing of how a parent was encoded carries over, so there is no leakage and no blockage.

With ``prefix_reuse=True`` a call may attend to the cached encoding of an earlier prompt that starts
with exactly the same tokens at the same positions (what vLLM's or SGLang's prefix caching does). The
math is the same, but not the computation: a reused prefix was encoded in a pass of another length, so logits
differ from full re-encoding by floating-point reassociation (up to ~5e-5 in fp32 on the embedded model), which
the bit-for-bit rule of docs/semantics.md for prefix reuse does not allow. It is off by default; the leakage
suites' baseline arm uses it and says what it measured of the difference (suites/leakage/cooperation/README.md).
Cached prompts are a cache, as in those servers: when a call does not fit the store, the least recently used
ones that no running call reads are evicted until it does, so a program that fits without reuse fits with it.
Without reuse a call's re-encoded prompt is freed as soon as the call finishes: the store holds only the prompts
of the calls running (a parallel step's together).
"""

from __future__ import annotations

import dataclasses

from .cache import CapacityError, Message
from .calls import Call, token_ids
from .choreographer import Choreographer
from .engine import Job
from .model import Model


@dataclasses.dataclass(eq=False)
class _Chain:
    """An encoded token sequence at positions 0.. as a list of (internal message, rows used)."""

    ids: list[int]
    parts: list[tuple[Message, int]]


class Baseline(Choreographer):
    """Same verbs as ``Choreographer``; each call re-encodes its parents' text.

    Example::

        bl = Baseline(choreo.load_model())
        sys = bl.prefill("You are terse.", role="system")        # no forward pass: text only
        q = bl.prefill("Capital of France?", role="user", parents=[sys])
        bl.decode(role="assistant", parents=[sys, q], max_tokens=10).text
    """

    adapter = False  # ordinary prompting of the base model: a LoRA adapter on the model never applies
    encodes_prefills = False  # a prefill is text only: nothing is encoded until a decode needs it

    def __init__(self, model: Model, *, attention: str | None = None, capacity: int = 65536,
                 prefix_reuse: bool = False):
        super().__init__(model, attention=attention, capacity=capacity)
        self.prefix_reuse = prefix_reuse
        self._chains: dict[int, _Chain] = {}  # output message id -> its encoding chain, least recently used first
        self._refs: dict[int, int] = {}  # internal message id -> number of chains using it
        self._internal: dict[int, Message] = {}
        self.reused_tokens = 0  # prompt tokens that finished calls read from cached chains instead of encoding
        self.evicted_chains = 0  # cached prompts dropped to make room for a call

    def start_decode(self, calls: list[Call]) -> list[Job]:
        calls = [c if isinstance(c, Call) else Call(**c) for c in calls]
        prompts = [self.serial_prompt(c) for c in calls]

        def reserve():
            for call, (prompt, start, parent_ids) in zip(calls, prompts):
                parts, reuse = self._reuse(prompt)
                segments = tuple((m.row, n, 0) for m, n in parts)
                job = self.make_job(call, prompt[reuse:], segments=segments, start=reuse, parents=parent_ids)
                job.origin = (start, prompt[:reuse], parts)
                yield job

        while True:
            try:
                jobs = self._all_or_nothing(reserve())
                break
            except CapacityError:
                store = self.engine.store
                if not self._chains or self._least_rows(calls) > store.capacity - store.used + self._freeable():
                    raise  # nothing cached to make room with, or not room enough were all of it evicted
                self._evict_oldest()
        for job in jobs:
            job.msg.id = next(self._ids)
            self._internal[job.msg.id] = job.msg
            for m, _ in job.origin[2]:
                self._refs[m.id] += 1
        return jobs

    def finish(self, jobs: list[Job]) -> list[Message]:
        out = []
        for job in jobs:
            if job.call is None:  # a prefill: already a user-facing message
                out.append(job.msg)
                continue
            inner, call = job.msg, job.call
            header = self.format.header(call.role, call.prefix)
            gen = inner.tokens
            msg = Message(
                id=next(self._ids), role=call.role, parents=inner.parents, start=job.origin[0],
                ids=header + gen + inner.ids[inner.content[1]:], content=(len(header), len(header) + len(gen)),
                text=inner.text, prefix=call.prefix, ttft=inner.ttft, latency=inner.latency,
                logprobs=inner.logprobs, logits=inner.logits, floor=self.floor,
            )
            self._messages[msg.id] = msg
            _, prefix_ids, parts = job.origin
            self.reused_tokens += len(prefix_ids)  # counted once the call has run: a refused call reused nothing
            chain = _Chain(ids=prefix_ids + inner.ids, parts=parts + [(inner, inner.length)])
            self._refs[inner.id] = self._refs.get(inner.id, 0) + 1
            job.reserved = 0  # the chain owns the inner message's rows now
            if self.prefix_reuse:
                self._chains[msg.id] = chain
            else:
                self._release(chain)
            out.append(msg)
        return out

    def _least_rows(self, calls: list[Call]) -> int:
        """The fewest new rows ``calls`` can reserve: each one's prompt less its longest cached prefix, plus the
        rows of its output (``max_tokens`` or teacher tokens) and footer."""
        total = 0
        for call in calls:
            prompt = self.serial_prompt(call)[0]
            own = call.max_tokens if call.teacher_tokens is None else len(call.teacher_tokens)
            total += len(prompt) - self._reuse(prompt, touch=False)[1] + own + len(self.format.footer(call.role))
        return total

    def _freeable(self) -> int:
        """Rows that evicting every cached prompt would free: those of messages only cached prompts refer to (a
        running call's reference keeps its rows)."""
        counts: dict[int, int] = {}
        for chain in self._chains.values():
            for m, _ in chain.parts:
                counts[m.id] = counts.get(m.id, 0) + 1
        return sum(self._internal[i].length for i, k in counts.items() if self._refs[i] == k)

    def _evict_oldest(self) -> None:
        """Drop the least recently used cached prompt; rows that a running call reads stay (reference counts)."""
        self._release(self._chains.pop(next(iter(self._chains))))
        self.evicted_chains += 1

    def release(self, msg: Message) -> None:
        """A text message holds no rows; one whose encoding is kept for reuse releases its chain."""
        chain = self._chains.pop(msg.id, None)
        if chain is not None:
            self._release(chain)

    def abort(self, jobs) -> None:
        """Undo started jobs: a decode's internal message and rows, and its hold on reused chains."""
        jobs = list(jobs)
        for job in jobs:
            if job.call is not None and self._internal.get(job.msg.id) is job.msg:
                del self._internal[job.msg.id]
                self._release(_Chain(ids=[], parts=job.origin[2]))
        super().abort(jobs)

    # ------------------------------------------------------------------ prompts and reuse
    def serial_prompt(self, call: Call) -> tuple[list[int], int, tuple[int, ...]]:
        """The serial prompt of a call: the template's conversation prefix (a BOS token, if it has one), its
        parents' turns in position order, then its header.

        Returns (prompt token ids, the start the output message gets, parent ids). Placement is validated
        as for a decode (unknown or freed parents raise ``KeyError``, bad offsets ``ValueError``).
        """
        parents, starts, start = self._resolve(call.parents, call.offsets, call.new_offset)
        order = sorted(range(len(parents)), key=lambda i: (starts[i], i))
        prompt = (list(self.format.prefix_ids) + [t for i in order for t in parents[i].ids]
                  + self.format.header(call.role, call.prefix))
        return prompt, start, tuple(p.id for p in parents)

    def add_generated(self, call: Call, tokens, *, ttft: float | None = None,
                      latency: float | None = None) -> Message:
        """Register a message generated elsewhere for ``call`` (e.g. by another implementation from
        ``serial_prompt(call)``) as this executor's text message, so later calls can list it as a parent.

        ``tokens``: the generated content ids (without header or end-of-turn footer), checked as ``teacher_tokens``
        are (integers inside the model's vocabulary).
        """
        call = call if isinstance(call, Call) else Call(**call)
        _, start, parents = self.serial_prompt(call)
        header = self.format.header(call.role, call.prefix)
        gen = list(token_ids(tokens, "add_generated tokens", vocab=self.model.spec.vocab_size))
        msg = Message(id=next(self._ids), role=call.role, parents=parents, start=start,
                      ids=header + gen + self.format.footer(call.role), content=(len(header), len(header) + len(gen)),
                      text=self.format.decode(gen), prefix=call.prefix, ttft=ttft, latency=latency, floor=self.floor)
        self._messages[msg.id] = msg
        return msg

    def _reuse(self, prompt: list[int], *, touch: bool = True) -> tuple[list[tuple[Message, int]], int]:
        """The chain parts covering the longest cached exact prefix of ``prompt`` (one token is left to encode);
        ``touch``: count it as a use (the chain becomes the most recently used)."""
        if not self.prefix_reuse:
            return [], 0
        best, best_len = None, 0
        for key, chain in self._chains.items():  # the longest; of equals, the earliest cached (use order aside)
            n = _common_prefix(chain.ids, prompt, len(prompt) - 1)
            if n > best_len or (n == best_len and n and key < best):
                best, best_len = key, n
        if best is None:
            return [], 0
        chain = self._chains[best]
        if touch:
            self._chains[best] = self._chains.pop(best)  # now the most recently used
        parts, n = [], best_len
        for m, used in chain.parts:  # the leading parts covering exactly best_len tokens
            if n <= 0:
                break
            parts.append((m, min(used, n)))
            n -= used
        return parts, best_len

    def _release(self, chain: _Chain) -> None:
        for m, _ in chain.parts:
            self._refs[m.id] -= 1
            if self._refs[m.id] == 0:
                del self._refs[m.id], self._internal[m.id]
                self.engine.store.free(m.row, m.length)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
