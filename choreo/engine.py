"""The batched forward passes over the global message cache.

A call is a *job*: tokens to feed (its header, forced prefix, teacher tokens or the last sampled token)
plus what it attends to (its parents' cached rows, moved by offsets). ``Engine.step`` runs batched forward
passes over any set of jobs, so parallel calls of one workflow and calls of many concurrent workflows share
them. ``choreo.choreographer.Choreographer`` is the user-facing API on top.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable

import torch

from .attention import AttentionPlan, default_backend, get_backend, triton_unsupported
from .cache import KVStore, Message
from .calls import Call
from .chat import ChatFormat
from .checks import check_int
from .lora import adapter_scope
from .model import Model
from .sampling import sample


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
# model costs 43-53 ms at one token and 1.0-1.4 ms per token more (results/performance/pass_cost.md, two machines:
# the fixed cost is worth 40 rows or so, rounded up to a power of two); on an H200 its pass costs the same from 6 to
# 517 tokens (results/performance_gpu/pass_cost.md).
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

