"""Run many workflow instances at once, batching all their pending calls into shared forward passes.

A workflow is an ``async def`` that takes a ``Session`` (the executor's verbs, awaitable) and reads like
sequential code. The runner drives the coroutines itself (no asyncio): whenever every live instance is
waiting on calls, it runs one engine step over all of their jobs, so calls join and leave the decode
batch as they start and finish. Decoding is memory-bound, so this is where throughput comes from.

Example::

    async def chat(ex, seed):
        sys = await ex.prefill("You are terse.", role="system")
        q = await ex.prefill(f"Name a number above {seed}.", role="user", parents=[sys])
        a = await ex.decode(role="assistant", parents=[sys, q], max_tokens=8, seed=seed)
        return a.text

    texts = Runner(Choreographer(model)).run([lambda ex, s=s: chat(ex, s) for s in range(64)])
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from typing import Any, Callable, Coroutine, Iterable, Sequence

from .cache import CapacityError, Message
from .checks import check_int
from .calls import Call, as_tuple, call_list
from .choreographer import Choreographer
from .engine import Job
from .progress import progress_bar
from .trace import TraceRecorder

Workflow = Callable[["Session"], Coroutine[Any, Any, Any]]


class _Request:
    """What a workflow awaits: a set of jobs; resumes with their messages."""

    def __init__(self, jobs: list[Job], single: bool):
        self.jobs, self.single = jobs, single

    def __await__(self):
        return (yield self)


class Session:
    """The executor's verbs for one workflow instance; every message it creates is freed at the end."""

    def __init__(self, executor: Choreographer, *, trace: bool = False, deferred: list[Job] | None = None):
        self.executor = executor
        self.created: list[Message] = []
        self.trace = TraceRecorder() if trace else None
        self._deferred = deferred  # the runner's prefills waiting for the next engine step
        self._awaited: list[Job] = []  # the jobs this instance waits on (undone if it is closed first)

    async def prefill(self, text: str, *, role: str, parents=(), offsets=None, new_offset=None) -> Message:
        """Returns at once. With ``Runner(fuse_prefills=True)`` (the default) the message is encoded in the
        runner's next step, with the first call that reads it: in that call's forward pass, or in a pass just
        before it when their lengths differ enough that padding would cost more (``engine.first_chunk_passes``),
        so a workflow's prompts mostly cost no passes of their own. With ``fuse_prefills=False`` it awaits a
        pass of its own."""
        parents = as_tuple(parents)  # read once: the trace checks it, then the executor
        offsets = offsets if offsets is None else as_tuple(offsets)
        if self.trace is not None:
            self.trace.check_parents(parents)  # before any work: a trace names parents by event
        job = self.executor.start_prefill(text, role=role, parents=parents, offsets=offsets, new_offset=new_offset)
        if self._deferred is None:
            self._awaited = [job]
            msg = await _Request([job], single=True)
            self._awaited = []
        else:
            if not job.done:
                self._deferred.append(job)
            msg = self.executor.finish([job])[0]
            self.created.append(msg)
        if self.trace is not None:
            self.trace.prefill(msg, text=text, role=role, parents=parents, offsets=offsets, new_offset=new_offset)
        return msg

    async def decode(self, calls: Sequence[Call] | None = None, /, **fields) -> Message | list[Message]:
        """``Choreographer.decode`` as an awaitable: one call from keyword fields, or a list of calls."""
        single = calls is None
        calls = [Call(**fields)] if single else call_list(calls, fields)
        if self.trace is not None:
            for call in calls:
                self.trace.check_parents(call.parents)
        self._awaited = self.executor.start_decode(calls)
        msgs = await _Request(self._awaited, single=False)
        self._awaited = []
        if self.trace is not None:
            self.trace.decode(msgs, calls)
        return msgs[0] if single else msgs

    def free(self, *messages: Message) -> None:
        """Free messages as ``Choreographer.free`` does: a message that a call in flight reads (another instance's
        decode, or a prefill waiting for the next step) keeps its rows until that call is done."""
        self.executor.free(*messages)

    def _close(self) -> None:
        """Free what this instance created; undo the call it was waiting on (closed before it was handed over)."""
        self.executor.abort([j for j in self._awaited if not j.done])
        self._awaited = []
        mine = {id(m) for m in self.created}
        for job in self._deferred or ():
            if id(job.msg) in mine:  # never read, never encoded: drop it with its rows
                job.done = True
        live = [m for m in self.created if not m.freed]
        if live:
            self.executor.free(*live)


@dataclasses.dataclass
class RunStats:
    """Counters of a ``Runner``, added up over its ``run`` calls (a run that raised included): instances that
    finished, wall time, forward passes and tokens processed; the largest cache use (the KV store's peak rows in use
    during a run, what a store must hold to run it) and batch seen."""

    instances: int = 0
    wall_s: float = 0.0
    forward_passes: int = 0
    tokens_processed: int = 0
    peak_cache_tokens: int = 0
    max_batch: int = 0


def _each(steps: list[Callable[[], None]]) -> None:
    """Run every step; what they raise is noted on the exception being handled (the first one raised if none)."""
    errors = []
    for step in steps:
        try:
            step()
        except Exception as error:  # e.g. a workflow whose finally raises, or awaits, when it is closed
            errors.append(error)
    handled = sys.exc_info()[1]
    if handled is None and errors:
        raise errors[0]
    for error in errors:
        handled.add_note(f"while closing the other workflow instances: {type(error).__name__}: {error}")


def _start(workflow: Workflow, index: int, session: Session) -> Coroutine:
    """``workflow(session)``, checked to be a coroutine (TypeError naming the index and what came back)."""
    coro = workflow(session)
    if not inspect.iscoroutine(coro):  # (the session has created nothing: its verbs only act when awaited)
        raise TypeError(f"workflow {index} returned {coro!r}, not a coroutine: a workflow must be an async def "
                        f"taking a Session (or a callable returning its coroutine, e.g. lambda ex: chat(ex, 3))")
    return coro


class Runner:
    """Drive up to ``max_concurrent`` workflow instances over one executor.

    ``run(workflows)`` takes callables ``f(session) -> coroutine`` (an ``async def`` called with the session)
    and returns their results in order; one that returns anything else is refused with TypeError, and the
    instances already started are closed with what they created. ``on_result(index, result)`` is called as each
    instance finishes (to append results to a file). An exception in one instance ends the run: it propagates
    (with a note naming the instance), every instance still running is closed with what it created, and only
    ``on_result`` has seen the results of those that finished. ``traces`` holds the last run's traces.
    """

    def __init__(self, executor: Choreographer, *, max_concurrent: int = 64, progress: bool | str = True,
                 trace: bool = False, fuse_prefills: bool = True):
        max_concurrent = check_int("max_concurrent", max_concurrent)
        self.executor, self.max_concurrent, self.progress = executor, max_concurrent, progress
        self.trace = trace
        # True: a prefill is encoded in the step of the first call that reads it (fewer passes). False: each
        # prefill is a step of its own before the workflow continues (prompts encoded ahead of any call).
        self.fuse_prefills = fuse_prefills
        self.traces: dict[int, list] = {}  # the last run's: instance index -> trace events, when trace=True
        self.stats = RunStats()

    def run(self, workflows: Iterable[Workflow], *, on_result: Callable[[int, Any], None] | None = None) -> list:
        todo = list(workflows)
        results: list = [None] * len(todo)
        self.traces = {}
        finished = 0
        engine = self.executor.engine
        passes0, tokens0 = engine.forward_passes, engine.tokens_processed
        # The store's own peak, kept on every reservation: with fused prefills, rows reserved between steps (one
        # instance's next calls while another finishes and frees its rows) coexist without any step seeing them.
        store = engine.store
        outer_peak, store.peak = store.peak, store.used
        t0 = time.perf_counter()
        bar = progress_bar(total=len(todo), desc=self.progress if isinstance(self.progress, str) else "workflows",
                           disable=not self.progress, leave=False)
        ready: list[tuple[int, Session, Coroutine, Any]] = []
        deferred: list[Job] = []
        waiting: dict[int, tuple[Session, Coroutine, _Request]] = {}
        admitted = 0
        current = None  # the instance being advanced, while its coroutine runs (popped from ready, not yet waiting)

        def admit():
            nonlocal admitted
            while admitted < len(todo) and len(ready) + len(waiting) < self.max_concurrent:
                session = Session(self.executor, trace=self.trace, deferred=deferred if self.fuse_prefills else None)
                coro = _start(todo[admitted], admitted, session)
                ready.append((admitted, session, coro, None))
                admitted += 1

        try:
            admit()
            while ready or waiting:
                while ready:
                    i, session, coro, value = current = ready.pop()
                    try:
                        request = coro.send(value)
                    except StopIteration as stop:
                        current = None
                        session._close()
                        results[i] = stop.value
                        finished += 1
                        if session.trace is not None:
                            self.traces[i] = session.trace.events
                        bar.update(1)
                        if on_result is not None:
                            on_result(i, stop.value)
                        admit()
                        continue
                    except BaseException as error:
                        session._close()
                        error.add_note(f"raised by workflow instance {i} (of {len(todo)} in this run)"
                                       + ("; the Runner drives workflows without asyncio: await only Session verbs"
                                          if isinstance(error, RuntimeError) and "event loop" in str(error) else ""))
                        raise
                    if not isinstance(request, _Request):
                        coro.close()
                        session._close()
                        raise TypeError(f"workflow {i} awaited {request!r}; only Session verbs can be awaited (the "
                                        f"Runner drives workflows without asyncio; for calls in parallel, give "
                                        f"ex.decode a list: await ex.decode([Call(...), Call(...)]))")
                    waiting[i] = (session, coro, request)
                    current = None
                jobs = [j for j in deferred if not j.done]
                jobs += [j for _, _, r in waiting.values() for j in r.jobs if not j.done]
                self.stats.max_batch = max(self.stats.max_batch, len(jobs))
                engine.step(jobs)
                deferred.clear()
                self.executor.release_unread()
                for i in [i for i, (_, _, r) in waiting.items() if all(j.done for j in r.jobs)]:
                    session, coro, request = waiting.pop(i)
                    messages = self.executor.finish(request.jobs)
                    session.created.extend(messages)
                    ready.append((i, session, coro, messages[0] if request.single else messages))
        except CapacityError as error:  # the fix is usually here, not in the workflow: say so
            live = len(ready) + len(waiting) + (current is not None)  # the instance whose call raised counts too
            raise CapacityError(f"{error} -- with {live} workflow instances live (max_concurrent="
                                f"{self.max_concurrent}): run fewer at once (Runner(max_concurrent=...)) or give the "
                                f"executor a larger capacity (capacity=...)") from error
        finally:
            bar.close()
            # After an error: every instance still running is closed with what it created, and calls in flight
            # (listed, never handed to their workflow) are undone. Each step of that is tried whatever the others
            # raise (a workflow's own cleanup may fail too); their errors become notes on the one in flight.
            steps = [step for _, session, coro, _ in ready for step in (coro.close, session._close)]
            steps += [step for session, coro, request in waiting.values()
                      for step in (coro.close, lambda jobs=request.jobs: self.executor.abort(jobs), session._close)]
            _each(steps)
            self.executor.release_unread()
            self.stats.instances += finished
            self.stats.wall_s += time.perf_counter() - t0
            self.stats.forward_passes += engine.forward_passes - passes0
            self.stats.tokens_processed += engine.tokens_processed - tokens0
            self.stats.peak_cache_tokens = max(self.stats.peak_cache_tokens, store.peak)
            store.peak = max(outer_peak, store.peak)
        return results
