"""The choreographed executor: prefill / decode over the global message cache.

A call is a *job*: tokens to feed (its header, forced prefix, teacher tokens or the last sampled token)
plus what it attends to (its parents' cached rows, moved by offsets). ``Engine.step`` runs one batched
forward pass over any set of jobs, so parallel calls of one workflow and calls of many concurrent
workflows share forward passes. ``Choreographer`` is the user-facing API on top.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import time
from typing import Iterable, Sequence

import torch

from .attention import AttentionPlan, default_backend, get_backend, triton_unsupported
from .cache import KVStore, Message
from .chat import ChatFormat, parse_role
from .checks import check_int, check_sampling, is_int
from .lora import adapter_scope
from .model import Model
from .sampling import make_generator, sample

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
    ids = tuple(_as_int(t) for t in tokens)
    bad = [t for t, i in zip(tokens, ids) if i is None or i < 0]
    if bad:
        raise ValueError(f"{name} must be non-negative integer token ids, got {bad[0]!r}")
    if vocab is not None and ids and max(ids) >= vocab:
        raise ValueError(f"{name} holds token id {max(ids)}, outside the model's vocabulary of {vocab}")
    return ids


SINGLES = (Message, str, bytes, dict)  # iterable, yet one item where a list is expected


def _is_single(value, singles=SINGLES) -> bool:
    """Whether ``value`` is one item rather than a list of them: not iterable, or one of ``singles``."""
    return isinstance(value, singles) or not hasattr(value, "__iter__")


def as_tuple(value, singles=SINGLES):
    """An iterable (a list, a generator) as a tuple, read once; a single item or a non-iterable comes back as it is,
    for the checks that say what was expected (``_check_sequence``)."""
    return value if _is_single(value, singles) else tuple(value)


def _as_int(x) -> int | None:
    """x as a Python int if it is an integer (a numpy or 0-d integer torch scalar included, bool not), else None."""
    if isinstance(x, bool) or getattr(x, "ndim", 0) != 0 or "bool" in str(getattr(x, "dtype", "")):
        return None  # a bool, an array of one element, a 0-d bool tensor
    try:
        return operator.index(x)
    except TypeError:
        return None


@dataclasses.dataclass(eq=False)
class Job:
    """An in-flight call: what to feed next and what it attends to."""

    msg: Message
    segments: tuple[tuple[int, int, int], ...]
    pending: list[int]
    reserved: int
    call: Call | None = None  # None: a prefill
    fed: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    closing: bool = False
    done: bool = False
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    footer: list[int] = dataclasses.field(default_factory=list)
    n_header: int = 0  # header + prefix tokens
    logits: torch.Tensor | None = None  # (n + 1, V) of a teacher-forced call: row j predicts ids[content[0] + j]
    origin: object = None  # the executor's own bookkeeping (the baseline's prompt and reuse)

    @property
    def wants_all_logits(self) -> bool:
        return self.call is not None and self.call.teacher_tokens is not None

    def logit_rows(self) -> list[int]:
        """The rows of the chunk now pending whose logits the call needs: a teacher-forced call's (fed in one
        chunk) predict its n content tokens and the end of turn, rows content[0] - 1 .. content[1] - 1; any other
        call needs its last row's."""
        if not self.wants_all_logits:
            return [len(self.pending) - 1]
        a, b = self.msg.content
        assert self.fed == 0 and len(self.pending) >= b, "a teacher-forced call is fed in one chunk"
        return list(range(a - 1, b))


# Rows of padding one forward pass's fixed cost is worth (``Engine.pass_rows``): on CPU a pass of the embedded
# model costs 43 ms plus 1.04 ms per token (results/performance/pass_cost.md); on an H200 its pass costs the same
# from 6 to 517 tokens (results/performance_gpu/pass_cost.md).
PASS_ROWS = {"cpu": 64, "cuda": 512}


def first_chunk_passes(jobs: list[Job], pass_rows: int) -> list[list[Job]]:
    """The forward passes that feed ``jobs``' first chunks, in order, each a list in ``jobs``' order.

    A pass pads every chunk to its longest: one 300-token prompt beside eight 5-token headers computes 2,700 rows
    for 340 tokens. Chunks are taken longest first, and the next starts a new pass where it would bring the
    current pass's padding (rows computed beyond its tokens) above ``pass_rows``, what a pass's fixed cost is
    worth. A job whose rows another job reads in this step (a prefill a call attends to in the same step) then
    moves to that reader's pass if it would come later: each layer writes a pass's keys and values before any call
    of it attends, so a writer's pass may not follow its reader's. Long prompts go first, so a short call over a
    long prefill runs in a short pass after it rather than padded to the prefill's length.

    Example: with pass_rows 64, chunks of 5, 5 and 300 tokens -> [300] then [5, 5]; chunks of 3, 7 and 5 -> one
    pass (6 rows of padding).
    """
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].pending))
    level, k, longest, padding = {}, 0, 0, 0
    for i in order:
        n = len(jobs[i].pending)
        if level and padding + longest - n > pass_rows:
            k, longest, padding = k + 1, n, 0
        elif not level:
            longest = n
        level[i], padding = k, padding + longest - n
    if k:  # several passes: no writer after a job that reads its rows
        writes = [(j.msg.row + j.fed, j.msg.row + j.fed + len(j.pending)) for j in jobs]
        writers = [[w for w, (lo, hi) in enumerate(writes) if w != i and any(r < hi and lo < r + n
                                                                              for r, n, _ in j.segments)]
                   for i, j in enumerate(jobs)]
        changed = True
        while changed:  # levels only fall, so this ends (after at most len(jobs) rounds)
            changed = False
            for i in range(len(jobs)):
                for w in writers[i]:
                    if level[w] > level[i]:
                        level[w], changed = level[i], True
    return [[j for i, j in enumerate(jobs) if level[i] == p] for p in sorted(set(level.values()))]


class Engine:
    """Batched forward steps over jobs that share one KV store."""

    def __init__(self, model: Model, *, attention: str | None = None, capacity: int = 65536, adapter: bool = True,
                 pass_rows: int | None = None):
        """``pass_rows``: the rows of padding a forward pass's fixed cost is worth, which decides when first chunks
        of different lengths take separate passes (``first_chunk_passes``); default ``PASS_ROWS`` of the model's
        device type (64 elsewhere)."""
        if not isinstance(model, Model):
            raise TypeError(f"model must be a choreo Model (choreo.load_model()), got {type(model).__name__}")
        self.pass_rows = (PASS_ROWS.get(model.spec.device.type, 64) if pass_rows is None
                          else check_int("pass_rows", pass_rows, minimum=0))
        self.model = model
        self.adapter = adapter  # False: a LoRA adapter on the model is switched off for this engine's passes
        self.grad = False  # True: record autograd history (teacher-forced replays for fine-tuning)
        spec = model.spec
        self.attention = attention or default_backend(spec.device, head_dim=spec.head_dim, dtype=spec.dtype)
        self.backend = get_backend(self.attention)
        if self.attention == "triton":
            from triton_kernels import is_available

            if not is_available(spec.device):
                raise ValueError(f"attention='triton' cannot run on the model's device {spec.device}: it needs "
                                 f"CUDA, or on CPU TRITON_INTERPRET=1 set before triton_kernels is imported (tests "
                                 f"only); use attention='torch'")
            reason = triton_unsupported(spec.head_dim, spec.dtype)
            if reason:
                raise ValueError(f"attention='triton' cannot run this model (head dim {spec.head_dim}, "
                                 f"{spec.dtype}): {reason}; use attention='torch'")
        self.store = KVStore(model.spec, capacity=capacity)
        self.format = ChatFormat(model.tokenizer)
        self.scale = model.spec.head_dim ** -0.5
        self.forward_passes = 0
        self.tokens_processed = 0

    def step(self, jobs: Iterable[Job]) -> None:
        """Feed every job's pending tokens: first chunks (prompts, headers), then single decode tokens, then
        closing chunks (padding decode tokens to a chunk's length would waste compute). First chunks of very
        different lengths take more than one pass (``first_chunk_passes``): a pass pads every chunk to its longest.

        A prompt may attend to a message that is prefilled in the same pass: each layer writes every job's
        keys and values before any job attends, so a child reads its parent's rows of that very layer.
        """
        jobs = list(jobs)
        live = [j for j in jobs if not j.done and j.pending]
        if not live and any(not j.done for j in jobs):  # a job with nothing to feed would never finish: no spin
            stuck = next(j for j in jobs if not j.done)
            raise RuntimeError(f"message {stuck.msg.id} (role {stuck.msg.role!r}) is not done but has no token to "
                               f"feed")
        first = [j for j in live if j.fed == 0]
        single = [j for j in live if j.fed > 0 and len(j.pending) == 1]
        closing = [j for j in live if j.fed > 0 and len(j.pending) > 1]
        for group in (*first_chunk_passes(first, self.pass_rows), single, closing):
            if group:
                self._forward(group)

    def _forward(self, jobs: list[Job]) -> None:
        dev = self.model.spec.device
        B, S = len(jobs), max(len(j.pending) for j in jobs)
        ids = torch.zeros(B, S, dtype=torch.long)
        pos = torch.zeros(B, S, dtype=torch.long)
        rows, src = [], []  # store row of each new token, and its flat (call, position) index b * S + i
        for b, j in enumerate(jobs):
            n = len(j.pending)
            ids[b, :n] = torch.tensor(j.pending)
            first = j.msg.start + j.fed
            pos[b] = torch.arange(first, first + S).clamp(max=first + n - 1)
            rows.extend(range(j.msg.row + j.fed, j.msg.row + j.fed + n))
            src.extend(range(b * S, b * S + n))
        plan = AttentionPlan(
            segments=tuple(j.segments for j in jobs),
            own_start=tuple(j.msg.row for j in jobs),
            own_past=tuple(j.fed for j in jobs),
            new_len=tuple(len(j.pending) for j in jobs),
        )
        # One host-to-device copy per pass; integer indices, not a boolean mask: boolean indexing makes every
        # layer wait for the GPU (its output size must be read back).
        index = torch.tensor([rows, src])  # (2, n_valid) on the host
        rows_t, src_t = index.to(dev)
        if len(src) == B * S:  # no padding: every new token is written, in order
            src_t = None
        store, backend, inv_freq = self.store, self.backend, self.model.inv_freq
        store.mark_written(index[0])
        grad = self.grad and torch.is_grad_enabled()
        # The fused kernel's backward reads the store itself, not a copy: guard the rows it read.
        guard = store.read_guard(plan.read_rows()) if grad and self.attention == "triton" else None

        def new_rows(x):  # (B, Hkv, S, D) -> (Hkv, n_valid, D)
            x = x.transpose(0, 1).reshape(x.shape[1], B * S, x.shape[3])
            return x if src_t is None else x[:, src_t]

        def attend(layer, q, k, v):  # q (B, H, S, D); k, v (B, Hkv, S, D)
            store.k[layer][:, rows_t] = new_rows(k)
            store.v[layer][:, rows_t] = new_rows(v)
            out = backend(plan, q, store.k[layer], store.v[layer], inv_freq, self.scale)
            if guard is not None and out.requires_grad:
                out.register_hook(guard)
            return out

        # Logits only for the rows a call reads (ragged, padded by repeating a call's last one): a teacher-forced
        # call's content, not its whole prompt, and never every row of the pass for every call.
        wanted = [j.logit_rows() for j in jobs]
        K = max(map(len, wanted))
        index = torch.tensor([w + w[-1:] * (K - len(w)) for w in wanted], device=dev)  # (B, K)
        with torch.set_grad_enabled(grad), adapter_scope(self.model, enabled=self.adapter):
            logits = self.model.forward(ids.to(dev), pos.to(dev), attend, logits_index=index)  # (B, K, V)
        self.forward_passes += 1
        self.tokens_processed += len(rows)
        for b, j in enumerate(jobs):
            j.fed += len(j.pending)
            self._advance(j, logits[b, :len(wanted[b])])

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        """Consume the logits of the chunk just fed (K, V): sample, close or finish the job."""
        call, now = job.call, time.perf_counter()
        if call is None or job.closing:
            self._finish(job, now)
            return
        if call.teacher_tokens is not None:
            job.logits = logits
            self._finish(job, now)
            return
        try:
            token = sample(logits[-1], temperature=call.temperature, top_p=call.top_p, generator=job.generator)
        except ValueError as error:  # NaN logits: say which call met them
            raise ValueError(f"decode call (role {call.role!r}, seed {call.seed}) at generated token "
                             f"{len(job.generated)}: {error}") from error
        if job.msg.ttft is None:
            job.msg.ttft = now - job.t0
        if token in job.stop_ids:
            job.pending, job.closing = list(job.footer), True
            if not job.pending:  # a template with no end-of-turn text: nothing left to encode
                self._finish(job, now)
            return
        job.generated.append(token)
        if len(job.generated) >= call.max_tokens or self.format.hits_stop(job.generated, call.stop):
            job.pending, job.closing = [token] + job.footer, True
        else:
            job.pending = [token]

    def _finish(self, job: Job, now: float) -> None:
        msg, call = job.msg, job.call
        if call is not None and call.teacher_tokens is None:
            msg.ids = msg.ids[: job.n_header] + job.generated + job.footer
            msg.content = (job.n_header, job.n_header + len(job.generated))
            msg.text = self.format.decode(job.generated)
        if job.logits is not None:
            a, b = msg.content
            content_logits = job.logits[:b - a].float()  # row j predicts content token j
            logp = content_logits.log_softmax(-1)
            msg.logprobs = logp.gather(1, torch.tensor(msg.tokens, device=logp.device)[:, None])[:, 0].tolist()
            if call.keep_logits:
                msg.logits = content_logits.detach()
        self.store.free(msg.row + msg.length, job.reserved - msg.length)
        job.reserved = msg.length
        job.done, job.pending, msg.decoding = True, [], False
        msg.latency = now - job.t0
        if msg.ttft is None:
            msg.ttft = msg.latency

    def run(self, jobs: list[Job]) -> None:
        """Step until every job is done."""
        while any(not j.done for j in jobs):
            self.step(jobs)


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
        listed = next((m for m in messages if not _is_single(m) and _as_int(m) is None), None)  # 0-d ids pass
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
        """Cache usage: tokens and bytes in use, allocated and at peak, and the capacity."""
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
        key = ref.id if isinstance(ref, Message) else _as_int(ref)  # a numpy integer id too
        msg = self._messages.get(key) if key is not None else None
        if msg is None or (isinstance(ref, Message) and msg is not ref):
            raise KeyError(f"{what}: unknown or freed message {ref!r}")
        if msg.decoding and what != "message":
            raise ValueError(f"{what}: message {msg.id} is still being decoded; use it once its decode has returned")
        return msg

    def _resolve(self, parents, offsets, new_offset) -> tuple[list[Message], list[int], int]:
        """Validate a call's placement: its parent messages, their effective starts and its own start."""
        _check_sequence(parents, "parents", "messages or message ids", example="parents=[m]")
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


def call_list(calls, fields: dict) -> list[Call]:
    """The calls of ``decode(calls)`` as a list of ``Call`` (dicts are keyword fields); refuses a single call, or
    keyword fields beside the list, with a TypeError that says how to call ``decode`` instead."""
    if fields:
        raise TypeError(f"decode(calls) takes no keyword fields, got {sorted(fields)}")
    _check_sequence(calls, "decode(calls)", "calls", example="decode([call]) or decode(**fields)",
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
    position = _as_int(value)
    if position is None or not 0 <= position < POSITION_LIMIT:
        raise ValueError(f"{name} must be a non-negative integer position below 2**62, or None, got {value!r}")
    return position


def _check_sequence(value, name: str, what: str, *, example: str, singles=SINGLES) -> None:
    """Refuse a single item (``_is_single``) where a list is expected: a TypeError that shows the list form."""
    if _is_single(value, singles):
        raise TypeError(f"{name} must be a list of {what}, got {type(value).__name__} {value!r:.60}: write "
                        f"{example}")


def resolve_offsets(parents: Sequence[Message], offsets) -> list[int]:
    """Effective start position of each parent: its offset, or its own start when the offset is None."""
    if offsets is None:
        return [p.start for p in parents]
    _check_sequence(offsets, "offsets", "positions (or None), one per parent", example="offsets=[0]")
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
