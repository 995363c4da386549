"""The choreographed executor: prefill / decode over the global message cache (``Choreographer``).

Every call attends to an arbitrary list of cached messages, each where it was encoded or moved by an offset;
parallel calls share the engine's forward passes (``choreo.engine``).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from .cache import Message
from .calls import (RAW, Call, ParentRef, as_int, call_list, check_position, check_sequence, default_start,
                    is_single, resolve_offsets, token_ids)
from .chat import parse_role
from .engine import Engine, Job
from .model import Model
from .sampling import make_generator


class Choreographer:
    """Prompt choreography: every call attends to an arbitrary set of cached messages.

    Example::

        ch = Choreographer(choreo.load_model())
        sys = ch.prefill("You are terse.", role="system")
        q1 = ch.prefill("Capital of France?", role="user", parents=[sys])
        q2 = ch.prefill("Capital of Peru?", role="user", parents=[sys])   # parallel sibling of q1
        a = ch.decode(role="assistant", parents=[sys, q1, q2], max_tokens=20)
        a.text, a.start, ch.memory()["tokens_used"]
    """

    adapter = True  # whether a LoRA adapter on the model applies to this executor's passes
    encodes_prefills = True  # False: a prefill only records its text (the re-encoding baseline)

    def __init__(self, model: Model, *, attention: str | None = None, capacity: int = 65536):
        self.model = model
        self.engine = Engine(model, attention=attention, capacity=capacity, adapter=self.adapter)
        self.format = self.engine.format
        self._messages: dict[int, Message] = {}
        self._ids = itertools.count()
        # A conversation prefix (BOS) is encoded once at positions 0.. and every call attends to it; messages
        # start after it. Empty for templates without one (ChatML): then nothing here changes anything.
        self.floor = len(self.format.prefix_ids)
        self._prefix: Message | None = None
        self._prefix_encoded = False  # its rows are reserved by the first call; encoded once that call is accepted
        self._peak_before_prefix = 0
        self._live: list[Job] = []  # started jobs, pruned of finished ones when messages are released
        self._held: list[Message] = []  # freed messages whose rows a live job still reads

    @property
    def attention(self) -> str:
        return self.engine.attention

    # ------------------------------------------------------------------ public verbs
    def prefill(self, text: str, *, role: str, parents: Sequence[ParentRef] = (), offsets=None,
                new_offset=None) -> Message:
        """Encode one message in one forward pass; it attends to ``parents`` and causally to itself.

        ``role="raw"`` encodes the text's tokens with no chat header or footer: several raw segments can
        make up one turn (template tokens written in the text), e.g. the questions of one user turn encoded
        in parallel, while the serial layout of the same segments reproduces the ordinary prompt exactly.
        """
        job = self.start_prefill(text, role=role, parents=parents, offsets=offsets, new_offset=new_offset)
        return self._run([job])[0]

    def decode(self, calls: Sequence[Call] | None = None, /, **fields) -> Message | list[Message]:
        """Generate one message (keyword fields of ``Call``), or several in parallel from a list of calls (an
        empty list gives an empty list). If any call fails, none of them leaves a message or a row behind."""
        if calls is not None:
            return self._run(self.start_decode(call_list(calls, fields)))
        return self._run(self.start_decode([Call(**fields)]))[0]

    def _run(self, jobs: list[Job]) -> list[Message]:
        """Run jobs to the end; if anything raises, roll all of them back (no message listed, no row kept)."""
        try:
            self._check_encoded_parents(jobs)
            self.engine.run(jobs)
            return self.finish(jobs)
        except BaseException:
            self.abort(jobs)
            raise
        finally:
            self.release_unread()

    def _check_encoded_parents(self, jobs: list[Job]) -> None:
        """Refuse a call run on its own whose parent is a started job that this run does not include: a prefill
        that a ``Runner`` defers to its next step (``Session.prefill``), whose rows are not yet written."""
        mine = {id(j) for j in jobs}
        waiting = {j.msg.id for j in self._live if not j.done and id(j) not in mine}
        for job in jobs:
            unencoded = [p for p in job.msg.parents if p in waiting]
            if unencoded:
                raise ValueError(f"message {unencoded[0]} is not encoded yet: a prefill waiting for the runner's "
                                 f"next step (Runner(fuse_prefills=True) defers a Session's prefills to the pass of "
                                 f"the first call that reads them); inside a workflow, call the Session's verbs "
                                 f"(await ex.decode(...)), not the executor's")

    def abort(self, jobs: Iterable[Job]) -> None:
        """Undo started jobs whose messages were never handed out: unlist their messages, free their rows."""
        for job in jobs:
            if self._messages.get(job.msg.id) is job.msg:
                del self._messages[job.msg.id]
            if job.reserved:
                self.engine.store.free(job.msg.row, job.reserved)
            job.msg.freed, job.reserved, job.done, job.pending = True, 0, True, []
            job.msg.decoding = False
        self.release_unread()

    def free(self, *messages: ParentRef) -> None:
        """Release the cache rows of messages; their text and tokens stay readable.

        A message that a started call still reads (a parent of a decode or prefill in flight, or a prefill not yet
        encoded) is unlisted at once, and its rows go back to the store when the last such call is done."""
        self._held.extend(self.unlist(*messages))
        self.release_unread()

    def release_unread(self) -> None:
        """Return to the store the rows of freed messages that no live job reads any more."""
        self._live = [j for j in self._live if not j.done]
        if not self._held:
            return
        read = {j.msg.id for j in self._live} | {p for j in self._live for p in j.msg.parents}
        held, self._held = self._held, []
        for msg in held:
            if msg.id in read:
                self._held.append(msg)
            else:
                self.release(msg)

    def release(self, msg: Message) -> None:
        """Return the rows of a message already unlisted (``unlist``) to the store."""
        self.engine.store.free(msg.row, msg.length)

    def unlist(self, *messages: ParentRef) -> list[Message]:
        """Validate all of ``messages`` first, then remove them from the registry and mark them freed; returns
        them (their rows are the caller's to release: ``free`` does, once no started call reads them)."""
        listed = next((m for m in messages if not is_single(m) and as_int(m) is None), None)  # 0-d ids pass
        if listed is not None:
            raise TypeError(f"free takes messages (or ids) as separate arguments, got a {type(listed).__name__} "
                            f"{listed!r:.60}: write free(*messages) or free(a, b)")
        msgs = [self._lookup(m, "free") for m in messages]
        if len({m.id for m in msgs}) != len(msgs):
            raise ValueError(f"free lists a message twice: {[m.id for m in msgs]}")
        for msg in msgs:
            msg.freed = True
            del self._messages[msg.id]
        return msgs

    def message(self, id: int) -> Message:
        return self._lookup(id, "message")

    @property
    def messages(self) -> list[Message]:
        return list(self._messages.values())

    def memory(self) -> dict:
        """Cache usage: the message count; tokens in use, at peak and allocated, and the capacity (in tokens); bytes
        per token, bytes in use and allocated (``KVStore.report``)."""
        return {"messages": len(self._messages), **self.engine.store.report()}

    # ------------------------------------------------------------------ jobs (shared with the runner)
    def start_prefill(self, text, *, role, parents=(), offsets=None, new_offset=None) -> Job:
        if not isinstance(text, str) or not text:
            raise ValueError(f"prefill text must be a non-empty string, got {text!r}")
        if role == RAW:  # a piece of a turn: the text's own tokens, no header or footer
            ids = self.format.tokenizer.encode(text, add_special_tokens=False)
            content = (0, len(ids))
        else:
            parse_role(role)
            ids, content = self.format.encode_turn(text, role)
        encode = self.encodes_prefills

        def reserve():
            return *self._place(parents, offsets, new_offset), self.engine.store.alloc(len(ids)) if encode else -1

        def undo(reserved):
            if encode:
                self.engine.store.free(reserved[-1], len(ids))

        segments, start, parent_ids, row = self._reserved_with_prefix(reserve, undo)
        msg = Message(
            id=next(self._ids), role=role, parents=parent_ids, start=start, ids=ids, content=content, text=text,
            row=row, floor=self.floor,
        )
        self._messages[msg.id] = msg
        if not encode:  # text only: nothing to run
            return Job(msg=msg, segments=segments, pending=[], reserved=0, done=True)
        job = Job(msg=msg, segments=segments, pending=list(ids), reserved=len(ids))
        self._live.append(job)
        return job

    def start_decode(self, calls: list[Call]) -> list[Job]:
        """Validate every call, then reserve rows for all of them (all or nothing)."""
        calls = [c if isinstance(c, Call) else Call(**c) for c in calls]

        def reserve():
            placed = [self._place(c.parents, c.offsets, c.new_offset) for c in calls]
            return self._all_or_nothing(
                self.make_job(call, self.format.header(call.role, call.prefix), segments=segments, start=start,
                              parents=parent_ids)
                for call, (segments, start, parent_ids) in zip(calls, placed))

        jobs = self._reserved_with_prefix(reserve, self.abort)
        for job in jobs:
            job.msg.id = next(self._ids)
            self._messages[job.msg.id] = job.msg
        self._live.extend(jobs)
        return jobs

    def _all_or_nothing(self, jobs: Iterable[Job]) -> list[Job]:
        """The jobs ``jobs`` reserves one by one; if one fails, the others are undone (``abort``) and the store's
        peak and allocation are put back: their rows were reserved and returned before any use."""
        store = self.engine.store
        made, peak, allocated = [], store.peak, store.allocated
        try:
            for job in jobs:
                made.append(job)
        except Exception:
            self.abort(made)
            store.peak = peak
            store.shrink_to(allocated)  # the buffers too, if the refused calls grew them
            raise
        return made

    def make_job(self, call: Call, header: list[int], *, segments, start: int, parents: tuple[int, ...]) -> Job:
        """Reserve rows for a decode whose own tokens begin with ``header`` (the message is not yet listed)."""
        self.format.check_stop(call.stop, call.role)
        if not header:  # the first token is predicted from the last token a call feeds: it must feed one
            raise ValueError(f"decode call (role {call.role!r}) has no token to encode before its first one: the "
                             f"chat template opens a {call.role!r} turn with no tokens, and the call has no prefix"
                             f"{'' if call.parents else ' and no parents'}; give it a prefix (e.g. prefix=' ')")
        footer = self.format.footer(call.role)
        if call.teacher_tokens is not None:
            teacher = list(token_ids(call.teacher_tokens, "teacher_tokens", vocab=self.model.spec.vocab_size))
            ids = header + teacher + footer
            content, reserved = (len(header), len(header) + len(teacher)), len(ids)
        else:
            ids, content = list(header), (len(header), len(header))
            reserved = len(header) + call.max_tokens + len(footer)
        capacity = self.engine.store.capacity
        if reserved > capacity >= len(header) + len(footer) + 1:  # no freeing makes room: name the call's own value
            what = (f"its {len(teacher)} teacher_tokens" if call.teacher_tokens is not None
                    else f"max_tokens={call.max_tokens}")
            raise ValueError(f"decode call (role {call.role!r}) reserves {reserved} cache rows ({what}, with its "
                             f"{len(header)}-token header and {len(footer)}-token footer), more than the store's "
                             f"capacity of {capacity} tokens: lower it, or give the executor a "
                             f"larger capacity (capacity=...)")
        generator, stop_ids = make_generator(call.seed), self.format.stop_ids(call.role)
        row = self.engine.store.alloc(reserved)  # last: nothing above allocates, so nothing leaks if it raises
        msg = Message(
            id=-1, role=call.role, parents=parents, start=start, ids=ids, content=content,
            text=self.format.decode(ids[content[0]:content[1]]), prefix=call.prefix, row=row, floor=self.floor,
            decoding=True,
        )
        return Job(
            msg=msg, segments=segments, pending=list(ids), reserved=reserved, call=call,
            generator=generator, stop_ids=stop_ids, footer=footer, n_header=len(header),
        )

    def finish(self, jobs: list[Job]) -> list[Message]:
        """The messages of finished jobs (the runner's hook; trivial here)."""
        return [j.msg for j in jobs]

    # ------------------------------------------------------------------ placement
    def _lookup(self, ref: ParentRef, what: str) -> Message:
        """The listed message ``ref`` names. A decode still running (listed once started, so that its id is taken)
        can be read with ``message`` but is no parent yet, and cannot be freed: its rows are still being written."""
        key = ref.id if isinstance(ref, Message) else as_int(ref)  # a numpy integer id too
        msg = self._messages.get(key) if key is not None else None
        if msg is None or (isinstance(ref, Message) and msg is not ref):
            raise KeyError(f"{what}: unknown or freed message {ref!r}")
        if msg.decoding and what != "message":
            raise ValueError(f"{what}: message {msg.id} is still being decoded; use it once its decode has returned")
        return msg

    def _resolve(self, parents, offsets, new_offset) -> tuple[list[Message], list[int], int]:
        """Validate a call's placement: its parent messages, their effective starts and its own start."""
        check_sequence(parents, "parents", "messages or message ids", example="parents=[m]")
        parents = [self._lookup(p, "parents") for p in parents]
        if len({p.id for p in parents}) != len(parents):
            raise ValueError(f"parents list a message twice: {[p.id for p in parents]}")
        starts = resolve_offsets(parents, offsets)
        new_offset = check_position(new_offset, "new_offset")
        start = max(self.floor, default_start(parents, starts)) if new_offset is None else new_offset
        return parents, starts, start

    def _place(self, parents, offsets, new_offset):
        """Resolve parents to store segments and the new message's start position (validates everything)."""
        parents, starts, start = self._resolve(parents, offsets, new_offset)
        segments = tuple((p.row, p.length, s - p.start) for p, s in zip(parents, starts))
        if self.engine.attention == "triton" and self.encodes_prefills:  # the baseline never reads moved rows
            from triton_kernels.segment_attention import MAX_TILE_DELTA

            far = [(p, s) for p, s in zip(parents, starts) if abs(s - p.start) > MAX_TILE_DELTA]
            if far:
                (p, s), = far[:1]
                raise ValueError(f"offsets move message {p.id} from position {p.start} to {s}, by more than the "
                                 f"triton backend's +-{MAX_TILE_DELTA} positions; use attention='torch' for such "
                                 f"moves")
        prefix = self._shared_prefix()
        if prefix is not None:
            segments = ((prefix.row, prefix.length, 0),) + segments
        return segments, start, tuple(p.id for p in parents)

    def _shared_prefix(self) -> Message | None:
        """The conversation prefix every call attends to (None without one). The first call to place reserves its
        rows; ``_encode_prefix`` encodes it (one pass) once that call is accepted, and a call refused before that
        gives the rows back (``_drop_unencoded_prefix``): a refused call leaves no trace, not even the prefix."""
        if not self.floor or not self.encodes_prefills:
            return None
        if self._prefix is None:
            ids = list(self.format.prefix_ids)
            self._peak_before_prefix = self.engine.store.peak
            row = self.engine.store.alloc(len(ids))
            self._prefix = Message(id=-1, role=RAW, parents=(), start=0, ids=ids, content=(0, 0), text="", row=row)
            self._prefix_encoded = False
        return self._prefix

    def _reserved_with_prefix(self, reserve, undo):
        """``reserve()`` (a call's placement and rows), then the encoding of the prefix it may have reserved: if
        ``reserve`` raises, the prefix's rows go back; if the encoding raises, ``undo`` takes back what ``reserve``
        returned. Either way the executor is left as it was."""
        try:
            reserved = reserve()
        except BaseException:
            self._drop_unencoded_prefix()
            raise
        try:
            self._encode_prefix()
        except BaseException:
            undo(reserved)
            raise
        return reserved

    def _encode_prefix(self) -> None:
        """Encode the prefix reserved by the call being started (nothing if there is none, or it is encoded)."""
        msg = self._prefix
        if msg is None or self._prefix_encoded:
            return
        try:
            self.engine.run([Job(msg=msg, segments=(), pending=list(msg.ids), reserved=msg.length)])
        except BaseException:
            self._drop_unencoded_prefix()
            raise
        self._prefix_encoded = True

    def _drop_unencoded_prefix(self) -> None:
        """Give back the rows of a prefix reserved by a call that was then refused (and the store's peak)."""
        if self._prefix is not None and not self._prefix_encoded:
            self.engine.store.free(self._prefix.row, self._prefix.length)
            self.engine.store.peak = self._peak_before_prefix
            self._prefix = None

