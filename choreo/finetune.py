"""Fine-tuning: teach the model to behave under cached encodings as it does when messages are re-encoded.

The data are **baseline traces** (``Runner(Baseline(model), trace=True)``; ``choreo.trace``). The loss replays a
trace through the **choreographed** executor with teacher forcing and gradients through the cache: every
call's baseline output is forced under the choreographed parents and positions, and later calls attend to
the cached keys/values of earlier forced outputs, so gradients reach how earlier messages were encoded.

    loss(trace) = sum over selected calls of a token mean over (content tokens + end-of-turn token) of
        "ce":    -log q(baseline token)                   (cross-entropy on the baseline's output)
        "kl":    KL(p || q)                               (distillation from the adapter-off baseline)
        "ce+kl": both

where q is the choreographed next-token distribution with the adapter on and p the re-encoding baseline's
with the adapter off (``Teacher``: computed once per trace, no gradient). The cross-entropy scores what the
baseline sampled: not the content of a call that was teacher-forced when recorded (text the workflow gave it,
such as a one-token probe of a decision's first token: not the baseline's output), and the end-of-turn token
only where the baseline sampled it (``sampled_end_of_turn``): a call cut at its token cap or by a stop string,
or teacher-forced, got its end-of-turn from the engine, and forcing it would teach the model to stop there. The
KL keeps those rows: the baseline's distribution there is a target whatever wrote the text. ``select_on_dev``
trains several configs and keeps the one with the lowest dev KL, one criterion for every candidate.

Training is LoRA (peft) with AdamW, warm-up then cosine decay, clipping, gradient accumulation over workflow
instances (one per micro-batch), dev evaluation, checkpoint selection on dev, and resumable checkpoints.
Checkpoints are chosen by the dev loss, or by a task score the caller computes with the adapter on (``dev_score``:
e.g. the accuracy of the workflow on dev problems, as the paper's MATH runs choose them).

Example::

    traces = [events for _, events in load_traces("blockage.jsonl")]
    train_set, dev_set = split_traces(traces, dev_fraction=0.1, seed=0)
    result = train(model, train_set, dev_set, config=FinetuneConfig.preset("embedded-cpu"), out_dir="runs/b")
    result.best_adapter, result.history[-1]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention import BACKENDS
from .baseline import Baseline
from .cache import Message
from .checks import check_int, check_int_fields, is_int, is_real
from .calls import Call
from .choreographer import Choreographer
from .lora import DEFAULT_TARGETS, adapter_weights, add_adapter, adapter_disabled, check_no_adapter, load_adapter, \
    save_adapter, set_adapter_weights, trainable_parameters, unload_adapter, use_adapter
from .trace import TraceEvent, as_recorded

__all__ = ["FinetuneConfig", "ReplayLoss", "Selection", "Teacher", "TrainResult", "adapter_disabled", "evaluate",
           "check_replayable", "load_adapter", "replay_loss", "sampled_end_of_turn", "select_calls", "select_on_dev",
           "split_traces", "train", "trained_adapter", "unload_adapter", "use_adapter"]

Trace = Sequence[TraceEvent]
LOSSES = ("ce", "kl", "ce+kl")


# ---------------------------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on. Defaults are the paper's settings (docs/protocols.md).

    Example: ``FinetuneConfig.preset("embedded-cpu", epochs=2)``.
    """

    lora_rank: int = dataclasses.field(default=64, metadata={"help": "LoRA rank r"})
    lora_alpha: float = dataclasses.field(default=32.0, metadata={"help": "LoRA scale numerator (scale alpha/r)"})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: tuple[str, ...] = dataclasses.field(default=DEFAULT_TARGETS, metadata={"help": "modules to adapt"})
    lr: float = dataclasses.field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: float = dataclasses.field(default=0.1, metadata={"help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "gradient clipping norm"})
    grad_accum: int = dataclasses.field(default=4, metadata={"help": "workflow instances per optimizer step"})
    epochs: int = dataclasses.field(default=4, metadata={"help": "passes over the training traces"})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "cap on optimizer steps"})
    eval_every: int = dataclasses.field(default=25, metadata={"help": "optimizer steps between dev evaluations"})
    dev_fraction: float = dataclasses.field(default=0.1, metadata={"help": "dev share when splitting one trace set"})
    loss_calls: str = dataclasses.field(default="all", metadata={"help": "'all', 'last' or 'role:<role>'"})
    loss: str = dataclasses.field(default="ce", metadata={
        "help": "'ce' (baseline tokens), 'kl' (to the adapter-off baseline's distributions) or 'ce+kl'"})
    dev_metric: str | None = dataclasses.field(default=None, metadata={
        "help": "dev criterion for checkpoint selection, one of LOSSES (None: the training loss)"})
    through_cache: bool = dataclasses.field(default=True, metadata={"help": "gradients into earlier encodings"})
    attention: str = dataclasses.field(default="torch", metadata={
        "help": "attention backend of the replays: 'torch', 'reference' or 'triton' (the fused kernel's backward)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "adapter init, data order and dropout"})

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {},
        # CPU minutes on the embedded 135M model: a lower rank and a higher learning rate than the paper's.
        "embedded-cpu": dict(lora_rank=16, lora_alpha=32.0, lr=3e-4, epochs=2, eval_every=4, dev_fraction=0.2),
        # Mechanics only (tests): a handful of steps.
        "smoke": dict(lora_rank=4, lora_alpha=8.0, lr=1e-3, epochs=1, grad_accum=2, eval_every=2),
    }

    NUMBER_RULES: ClassVar[tuple] = (  # the real-valued fields: (name, rule as the message says it, test)
        ("lora_dropout", "in [0, 1)", lambda x: 0 <= x < 1),
        ("warmup", "a fraction in [0, 1)", lambda x: 0 <= x < 1),
        ("weight_decay", "finite and >= 0", lambda x: 0 <= x < math.inf),
        ("dev_fraction", "in (0, 1)", lambda x: 0 < x < 1),
        ("lora_alpha", "finite and > 0", lambda x: 0 < x < math.inf),
        ("lr", "finite and > 0", lambda x: 0 < x < math.inf),
        ("max_grad_norm", "finite and > 0", lambda x: 0 < x < math.inf),
    )

    def __post_init__(self):
        check_int_fields(self, ("lora_rank", "grad_accum", "epochs", "eval_every"))
        check_int_fields(self, ("max_steps",), optional=True)
        for name, rule, ok in self.NUMBER_RULES:
            value = getattr(self, name)
            if not is_real(value) or not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(map(repr, BACKENDS))}, got {self.attention!r}")
        check_loss_calls(self.loss_calls)
        check_loss(self.loss, "loss")
        if self.dev_metric is not None:
            check_loss(self.dev_metric, "dev_metric")
        check_int_fields(self, ("seed",), minimum=0)
        if isinstance(self.lora_targets, str) or not self.lora_targets:
            raise ValueError(f"lora_targets must be a non-empty sequence of module names (e.g. ('q_proj', "
                             f"'v_proj')), got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @classmethod
    def preset(cls, name: str, **overrides) -> "FinetuneConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown fine-tuning preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def dev_criterion(self) -> str:
        """What dev evaluation measures: ``dev_metric``, or the training loss when it is None."""
        return self.dev_metric or self.loss


def check_loss(value: str, name: str = "loss") -> None:
    if value not in LOSSES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, LOSSES))}, got {value!r}")


def check_loss_calls(spec: str) -> None:
    if spec in ("all", "last") or (isinstance(spec, str) and spec.startswith("role:") and len(spec) > 5):
        return
    raise ValueError(f"loss_calls must be 'all', 'last' or 'role:<role>', got {spec!r}")


# ---------------------------------------------------------------------------------------------- data
def as_events(trace) -> list[TraceEvent]:
    """Accept a list of events or a ``(meta, events)`` pair as ``load_traces`` returns."""
    if isinstance(trace, tuple) and len(trace) == 2 and isinstance(trace[0], dict):
        trace = trace[1]
    return list(trace)


def split_traces(traces: Sequence, *, dev_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded, disjoint train/dev split (by instance; every instance lands in exactly one side).

    Example: ``split_traces(list(range(10)), dev_fraction=0.2, seed=0)`` -> 8 train items, 2 dev items.
    """
    n = len(traces)
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    if n < 2:
        raise ValueError(f"need at least 2 traces to split into train and dev, got {n}")
    n_dev = min(n - 1, max(1, round(n * dev_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    dev_idx = set(order[:n_dev].tolist())
    return [t for i, t in enumerate(traces) if i not in dev_idx], [t for i, t in enumerate(traces) if i in dev_idx]


def select_calls(events: Trace, spec: str) -> list[int]:
    """Indices of the decode events that contribute to the loss ('all', 'last' or 'role:<role>')."""
    check_loss_calls(spec)
    decodes = [i for i, e in enumerate(events) if e.kind == "decode"]
    if spec == "last":
        return decodes[-1:]
    if spec.startswith("role:"):
        return [i for i in decodes if events[i].role == spec[5:]]
    return decodes


# ---------------------------------------------------------------------------------------------- the replay loss
@dataclasses.dataclass
class ReplayLoss:
    """The loss of one trace: ``loss`` (a scalar tensor), each selected call's token-mean loss, and the replayed
    messages.

    ``logits[i]`` (n_i + 1, V), when kept: the rows predicting event i's content tokens and its end-of-turn token.
    """

    loss: torch.Tensor
    per_call: dict[int, float]
    messages: list[Message]
    logits: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


def replay_loss(executor: Choreographer, events: Trace, *, calls: str = "all", through_cache: bool = True,
                keep_logits: bool = False, loss: str = "ce", teacher: dict[int, torch.Tensor] | None = None
                ) -> ReplayLoss:
    """Replay a trace through ``executor`` with every decode teacher-forced; sum the selected calls' losses.

    ``loss`` is 'ce', 'kl' or 'ce+kl' (module docstring); the KL needs ``teacher``: event index -> the
    teacher's (n + 1, V) log-probs over the same rows (``Teacher``). Gradients are recorded when
    ``executor.engine.grad`` is True. ``through_cache=False`` detaches the cache after each group, so a call's
    loss reaches only its own encoding (an ablation). Every message the replay creates is freed before returning.
    Any executor replays, the re-encoding ``Baseline`` included (that is how ``Teacher`` gets its rows).

    Example::

        ch = Choreographer(model, attention="torch"); ch.engine.grad = True
        out = replay_loss(ch, events)          # out.loss.backward()
        out = replay_loss(ch, events, loss="kl", teacher=Teacher(model)(events))
    """
    check_loss(loss)
    events = as_events(events)
    chosen = set(select_calls(events, calls))
    if not chosen:
        raise ValueError(f"calls {calls!r} selects none of the trace's {sum(e.kind == 'decode' for e in events)} "
                         f"decodes: its loss would be zero")
    if "kl" in loss and (teacher is None or not chosen <= set(teacher)):
        raise ValueError(f"loss {loss!r} needs teacher log-probs for calls {sorted(chosen)}, "
                         f"got {None if teacher is None else sorted(teacher)}")
    store = executor.engine.store
    messages: list[Message | None] = [None] * len(events)
    total = torch.zeros((), device=executor.model.spec.device)
    per_call, kept = {}, {}
    store.detach_()
    try:
        for group in sorted({e.group for e in events}):
            idx = [i for i, e in enumerate(events) if e.group == group]
            first = events[idx[0]]
            if first.kind == "prefill":
                messages[idx[0]] = executor.prefill(
                    first.text, role=first.role, parents=[messages[p] for p in first.parents],
                    offsets=first.offsets, new_offset=first.new_offset)
            else:
                jobs = executor.start_decode([_forced_call(events, i, messages) for i in idx])
                try:
                    executor.engine.run(jobs)
                except BaseException:  # e.g. out of memory: the group's messages and rows go back
                    executor.abort(jobs)
                    raise
                for i, job, msg in zip(idx, jobs, executor.finish(jobs)):
                    messages[i] = msg
                    if i not in chosen:
                        continue
                    # The job's own tokens (the baseline's job holds its whole re-encoded prompt).
                    a, b = job.msg.content
                    rows = job.logits  # (n + 1, V): row j predicts ids[a + j]; the last, end-of-turn
                    target = torch.tensor(_with_end(job.msg.ids[a:b + 1], b - a, executor), device=rows.device)
                    call_loss = call_losses(rows, target, loss=loss, teacher=None if teacher is None else teacher[i],
                                            ce_content=not events[i].forced,
                                            ce_end=sampled_end_of_turn(events[i], executor.format))
                    total = total + call_loss
                    per_call[i] = float(call_loss.detach())
                    if keep_logits:
                        kept[i] = rows.detach()
            if not through_cache:
                store.detach_()
    finally:
        live = [m for m in messages if m is not None and not m.freed]
        if live:
            executor.free(*live)
    return ReplayLoss(loss=total, per_call=per_call, messages=messages, logits=kept)


def _with_end(ids: list[int], n: int, executor) -> list[int]:
    """A call's n content tokens and its end-of-turn token: the footer's first, or, for a chat template that
    writes no end-of-turn text (its footer is empty), the tokenizer's EOS, which ended the turn when sampled."""
    if len(ids) > n:
        return ids
    eos = executor.model.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the chat template writes no end-of-turn text and the tokenizer has no eos_token_id: "
                         "there is no end-of-turn token to score")
    return ids + [eos]


def sampled_end_of_turn(event: TraceEvent, fmt) -> bool:
    """Whether the recorded call ended by sampling its end-of-turn token, so that the loss scores it: not when it
    was teacher-forced, filled its ``max_tokens``, or was cut by one of its stop strings (in each case the engine
    appended the footer itself). ``fmt``: the executor's ``ChatFormat`` (to read the stop strings)."""
    if event.forced or len(event.tokens) >= event.max_tokens:
        return False
    return not fmt.hits_stop(event.tokens, event.stop)


def call_losses(rows: torch.Tensor, target: torch.Tensor, *, loss: str, teacher: torch.Tensor | None = None,
                ce_content: bool = True, ce_end: bool = True) -> torch.Tensor:
    """Token-mean loss of one call. rows (S, V) student logits; target (S,) the baseline's tokens; teacher (S, V)
    the baseline's log-probs. 'kl' is KL(teacher || student) = sum_v p_v (log p_v - log q_v), averaged over rows.
    ``ce_end`` False: the cross-entropy leaves out the last row (an end-of-turn the baseline did not sample), so a
    call with no content tokens and an end-of-turn it did not sample has no cross-entropy term (0).
    ``ce_content`` False: it leaves out the content rows too (a teacher-forced call: its tokens were given, not
    sampled), so such a call adds KL only.

    Example: ``call_losses(logits, target, loss="kl", teacher=logits.log_softmax(-1))`` is 0.
    """
    check_loss(loss)  # an unknown name would otherwise add no term at all: a loss of 0
    logq = rows.float().log_softmax(-1)  # (S, V)
    out = torch.zeros((), device=rows.device)
    if loss in ("ce", "ce+kl"):
        end = len(target) - 1  # the end-of-turn row; the content rows come before it
        lo, hi = (0 if ce_content else end), (end + 1 if ce_end else end)
        if hi > lo:
            out = out + F.nll_loss(logq[lo:hi], target[lo:hi])
    if loss in ("kl", "ce+kl"):
        if teacher is None or teacher.shape != rows.shape:
            raise ValueError(f"teacher log-probs must match the student rows {tuple(rows.shape)}, "
                             f"got {None if teacher is None else tuple(teacher.shape)}")
        logp = teacher.to(device=rows.device, dtype=torch.float32)
        out = out + (logp.exp() * (logp - logq)).sum(-1).mean()
    return out


def check_replayable(events: Trace, *, vocab_size: int, where: str = "trace", calls: str | None = None,
                     loss: str | None = None) -> None:
    """Raise ``ValueError`` naming the event unless every event can be replayed: a known kind, parents that are
    earlier events in earlier groups (a group is one step of the replay: one prefill, or decodes run together),
    and decoded tokens inside the vocabulary; with ``calls`` (a ``loss_calls`` spec), also unless it selects at
    least one decode (a trace without one would add a loss of zero); with ``calls`` and ``loss='ce'``, also
    unless one selected decode has a row the cross-entropy scores (one that was not teacher-forced when recorded,
    with a content token or a sampled end-of-turn: ``sampled_end_of_turn``). ``train`` checks every trace before
    it adds an adapter or writes anything."""
    sizes = Counter(e.group for e in events)
    for i, e in enumerate(events):
        if e.kind not in ("prefill", "decode"):
            raise ValueError(f"{where}, event {i}: kind must be 'prefill' or 'decode', got {e.kind!r}")
        if not is_int(e.group):
            raise ValueError(f"{where}, event {i}: group must be an integer, got {e.group!r}")
        bad = [p for p in e.parents if not is_int(p) or not 0 <= p < i]
        if bad:
            raise ValueError(f"{where}, event {i}: parents must be indices of earlier events (0..{i - 1}), "
                             f"got {bad[0]!r}")
        late = [p for p in e.parents if events[p].group >= e.group]
        if late:
            raise ValueError(f"{where}, event {i} (group {e.group}): parent {late[0]} is in group "
                             f"{events[late[0]].group}, not an earlier one, so it does not exist when event {i} runs")
        if e.kind == "prefill" and sizes[e.group] > 1:
            raise ValueError(f"{where}, event {i}: a prefill has a group of its own, but group {e.group} holds "
                             f"{sizes[e.group]} events")
        if e.kind == "decode":  # an empty output replays as a forced empty turn (its end-of-turn alone)
            outside = [t for t in e.tokens if not isinstance(t, int) or not 0 <= t < vocab_size]
            if outside:
                raise ValueError(f"{where}, event {i}: token id {outside[0]!r} outside the vocabulary of "
                                 f"{vocab_size}")
    if calls is None:
        return
    chosen = select_calls(events, calls)
    if not chosen:
        roles = sorted({e.role for e in events if e.kind == "decode"})
        raise ValueError(f"{where}: loss_calls {calls!r} selects none of its decodes (their roles: {roles})")
    if loss is not None:
        check_loss(loss)
    # A forced call's rows are not scored; an empty output never hits a stop string, so max_tokens 0 is the other
    # way a call leaves nothing to score.
    if loss == "ce" and all(events[i].forced or (not events[i].tokens and events[i].max_tokens <= 0) for i in chosen):
        raise ValueError(f"{where}: the decodes loss_calls {calls!r} selects ({chosen}) were teacher-forced when "
                         f"recorded or are empty turns of max_tokens 0, with no row the cross-entropy scores (a "
                         f"forced turn is not the baseline's output): the trace would add a loss of zero")


def _forced_call(events: Trace, i: int, messages) -> Call:
    e = events[i]
    return Call(role=e.role, parents=[messages[p] for p in e.parents], offsets=e.offsets, new_offset=e.new_offset,
                prefix=e.prefix, teacher_tokens=list(e.tokens))


class Teacher:
    """The distillation target: the re-encoding baseline's next-token log-probs over each trace's forced rows
    (content tokens + end-of-turn, for the calls ``calls`` selects), adapter off, over the calls as recorded
    (``as_recorded``: a trace re-laid by ``without_offsets`` is replayed with its recorded offsets, so each call
    re-encodes the prompt the baseline read).

    Computed once per trace (keyed by the trace's events) and kept for the whole run: they do not change while
    the adapter trains. Storage: float32 log-probs, (n + 1, V) per selected call, on the model's device. That is
    exact enough for KL(teacher || student) to be 0 when the two encodings coincide, and small here
    (SmolLM2: V = 49152, a 24-token blockage answer is 25 rows = 4.9 MB, 200 MB for 40 traces); a long-output,
    large-vocabulary run would keep only the top-k instead (not implemented).

    Example::

        teacher = Teacher(model)             # any adapter on the model is ignored
        logp = teacher(events)               # {event index: (n + 1, V) log-probs}
        replay_loss(ch, events, loss="kl", teacher=logp)
    """

    def __init__(self, model, *, calls: str = "all", attention: str | None = None):
        check_loss_calls(calls)
        self.model, self.calls = model, calls
        self.executor = Baseline(model, attention=attention)  # Baseline.adapter = False: the LoRA is switched off
        self._cache: dict[tuple[TraceEvent, ...], dict[int, torch.Tensor]] = {}

    def __call__(self, events: Trace) -> dict[int, torch.Tensor]:
        key = tuple(as_events(events))
        if key not in self._cache:
            self._cache[key] = self._compute(list(key))
        return self._cache[key]

    def __len__(self) -> int:
        return len(self._cache)

    def _compute(self, events: list[TraceEvent]) -> dict[int, torch.Tensor]:
        was_training = self.model.hf_model.training
        self.model.hf_model.eval()
        try:
            with torch.no_grad(), adapter_disabled(self.model):  # the executor disables it too; explicit here
                # the calls the baseline made: a re-laid trace's recorded offsets order its parents as they were
                out = replay_loss(self.executor, as_recorded(events), calls=self.calls, keep_logits=True)
        finally:
            self.model.hf_model.train(was_training)
        return {i: rows.float().log_softmax(-1) for i, rows in out.logits.items()}


def evaluate(model, traces: Sequence, *, config: FinetuneConfig, executor: Choreographer | None = None,
             metric: str | None = None, teacher: Teacher | None = None) -> float:
    """Mean replay loss over traces without gradients: ``metric`` (default ``config.dev_criterion``, the dev
    criterion); a KL metric uses ``teacher`` (a new one when None)."""
    if not traces:
        raise ValueError("evaluate needs at least one trace")
    metric = metric or config.dev_criterion
    check_loss(metric, "metric")
    executor = executor or Choreographer(model, attention=config.attention)
    if "kl" in metric and teacher is None:
        teacher = Teacher(model, calls=config.loss_calls, attention=config.attention)
    was_training = model.hf_model.training
    model.hf_model.eval()
    try:
        with torch.no_grad():
            losses = [float(replay_loss(executor, t, calls=config.loss_calls, loss=metric,
                                        teacher=teacher(t) if "kl" in metric else None).loss) for t in traces]
    finally:
        model.hf_model.train(was_training)
    return float(np.mean(losses))


# ---------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    """``best_adapter``: the adapter folder chosen on dev, from step ``best_step``; ``best_dev_loss`` and
    ``best_dev_score``: that checkpoint's dev loss and dev score (None without a ``dev_score``); ``history``: one
    record per optimizer step (after the step-0 evaluation)."""

    best_adapter: Path
    best_step: int
    best_dev_loss: float
    history: list[dict]
    steps: int
    seconds_per_step: float
    peak_rss_mb: float
    best_dev_score: float | None = None
    steps_run: int = 0  # optimizer steps this call ran: 0 where it resumed a run that had finished
    provenance: dict | None = None  # the run's, as its history.json records it (model, seeds, sizes, versions, ...)

    def summary(self) -> dict:
        """The JSON-ready record of the run (everything but the adapter folder, which may be temporary), with the
        provenance of the training run."""
        return {"best_step": self.best_step, "best_dev_loss": self.best_dev_loss,
                "best_dev_score": self.best_dev_score, "steps": self.steps, "seconds_per_step": self.seconds_per_step,
                "peak_rss_mb": self.peak_rss_mb, "history": self.history, "provenance": self.provenance}


def schedule(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup * total`` steps, then cosine decay to 0."""
    n_warm = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    if step < n_warm:
        return (step + 1) / (n_warm + 1)
    progress = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _plan(n_train: int, config: FinetuneConfig) -> tuple[int, int]:
    """(micro-batches, optimizer steps) of the run."""
    micro = n_train * config.epochs
    steps = math.ceil(micro / config.grad_accum)
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
        micro = min(micro, steps * config.grad_accum)
    return micro, steps


def _instance(m: int, n_train: int, seed: int) -> int:
    """Which training trace micro-batch m uses: a seeded permutation per epoch."""
    epoch, k = divmod(m, n_train)
    return int(np.random.default_rng([seed, epoch]).permutation(n_train)[k])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(model, train_traces: Sequence, dev_traces: Sequence, *, config: FinetuneConfig, out_dir,
          resume: bool = False, stop_after: int | None = None, progress: bool = True,
          teacher: Teacher | None = None, dev_may_overlap: bool = False,
          dev_score: Callable[[object], float] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on baseline traces replayed through the choreographed executor.

    Writes ``out_dir/best`` (adapter with the lowest dev ``config.dev_criterion``, dev evaluated every
    ``eval_every`` steps and at step 0), ``out_dir/last`` (adapter + optimizer, scheduler, step and RNG state) and
    ``out_dir/history.json``. ``resume=True`` continues from ``out_dir/last``; ``stop_after`` ends the run after
    that many optimizer steps (the schedule is unchanged), so a later ``resume`` finishes it. A KL loss or dev
    criterion uses ``teacher`` (pass one to share its cache between runs; a new one when None), filled for every
    train and dev trace before the first step. On return the model carries the best adapter (eval mode); if the
    run fails, the model is left without an adapter. Every trace is checked first (``check_replayable``), and a
    trace in both sets is refused unless ``dev_may_overlap`` (a sanity check that fits the dev traces themselves).

    ``dev_score(model) -> float`` (higher is better), when given, is called at every dev evaluation with the current
    adapter on the model (eval mode, no gradients) -- say, the accuracy of the workflow on the dev problems -- and
    then chooses the checkpoint: the highest score, ties going to the lower dev loss, then the earlier step. It may
    sample freely: the random state of training is restored after it, so the training steps are those of a run
    without it. A run is resumed with a score only if it started with one.

    Example::

        result = train(model, train_set, dev_set, config=FinetuneConfig.preset("embedded-cpu"), out_dir="runs/b")
        with adapter_disabled(model): ...   # the base model again
    """
    check_int("stop_after", stop_after, optional=True)  # 0 would stop before writing last/, so nothing resumes
    train_traces = [as_events(t) for t in train_traces]
    dev_traces = [as_events(t) for t in dev_traces]
    if not train_traces or not dev_traces:
        raise ValueError(f"need training and dev traces, got {len(train_traces)} and {len(dev_traces)}")
    for name, traces in (("training", train_traces), ("dev", dev_traces)):
        for k, events in enumerate(traces):
            check_replayable(events, vocab_size=model.spec.vocab_size, where=f"{name} trace {k}",
                             calls=config.loss_calls, loss=config.loss if name == "training" else config.dev_criterion)
    shared = {tuple(t) for t in train_traces} & {tuple(t) for t in dev_traces}
    if shared and not dev_may_overlap:
        raise ValueError(f"{len(shared)} trace(s) are both training and dev traces: checkpoints would be chosen on "
                         f"training data (keep the two sets disjoint)")
    out = Path(out_dir)
    last = out / "last"
    if resume and not (last / "trainer_state.pt").exists():
        raise FileNotFoundError(f"cannot resume: {str(last / 'trainer_state.pt')!r} does not exist")
    n_micro, total = _plan(len(train_traces), config)
    kl_train, kl_dev = "kl" in config.loss, "kl" in config.dev_criterion
    if (kl_train or kl_dev) and teacher is None:
        teacher = Teacher(model, calls=config.loss_calls, attention=config.attention)
    if teacher is not None and teacher.calls != config.loss_calls:
        raise ValueError(f"teacher selects calls {teacher.calls!r} but the config's loss_calls is "
                         f"{config.loss_calls!r}")
    for events in (train_traces if kl_train else []) + (dev_traces if kl_dev else []):
        teacher(events)  # before the adapter exists: the targets never see it

    add_adapter(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                targets=config.lora_targets, seed=config.seed)
    try:
        return _train_adapted(model, train_traces, dev_traces, config=config, out=out, resume=resume,
                              stop_after=stop_after, progress=progress, teacher=teacher, n_micro=n_micro, total=total,
                              dev_score=dev_score)
    except BaseException:
        unload_adapter(model)  # a failed run leaves the model as it found it
        raise


@contextlib.contextmanager
def trained_adapter(model, train_traces: Sequence, dev_traces: Sequence, *, config: FinetuneConfig, out_dir=None,
                    progress: bool = True, teacher: Teacher | None = None,
                    dev_score: Callable[[object], float] | None = None) -> Iterator[TrainResult]:
    """Context manager: ``train``, run the block with the dev-best adapter on the model, then remove the adapter
    (also when the block raises). ``out_dir`` None trains in a temporary folder, deleted on exit; ``dev_score`` as
    in ``train``.

    Example::

        with trained_adapter(model, train_set, dev_set, config=FinetuneConfig.preset("embedded-cpu")) as result:
            records = run_condition(model, problems, condition="choreographed")
        summary = result.summary()
    """
    with contextlib.ExitStack() as stack:
        out = out_dir if out_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
        result = train(model, train_traces, dev_traces, config=config, out_dir=out, progress=progress, teacher=teacher,
                       dev_score=dev_score)
        try:
            yield result
        finally:
            unload_adapter(model)


def _train_adapted(model, train_traces, dev_traces, *, config, out: Path, resume, stop_after, progress, teacher,
                   n_micro: int, total: int, dev_score) -> TrainResult:
    """``train`` once the adapter is on the model (the caller removes it if this raises)."""
    from .progress import progress_bar

    last, best_dir = out / "last", out / "best"
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, config.warmup))
    executor = Choreographer(model, attention=config.attention)
    selected_by = "dev_score" if dev_score is not None else "dev_loss"
    data = _data_key(train_traces, dev_traces)
    state = {"step": 0, "history": [], "best_step": 0, "best_dev_loss": math.inf, "best_dev_score": None,
             "selected_by": selected_by}
    best = {"weights": None}  # the kept checkpoint's LoRA weights, saved with the state

    def dev_eval(record: dict) -> None:
        """Evaluate on dev into ``record``; keep the checkpoint in ``best_dir`` if it is the best so far."""
        record["dev_loss"] = evaluate(model, dev_traces, config=config, executor=executor, teacher=teacher)
        if dev_score is not None:
            record["dev_score"] = _scored(model, dev_score)
        first = not state["history"]
        if first or _better(record, state):
            state["best_dev_loss"], state["best_step"] = record["dev_loss"], record["step"]
            state["best_dev_score"] = record.get("dev_score")
            best["weights"] = adapter_weights(model)
            save_adapter(model, best_dir)

    if resume:
        saved = torch.load(last / "trainer_state.pt", weights_only=False)
        if saved["config"] != config.to_json():
            raise ValueError(f"cannot resume {str(out)!r} with a different config: saved {saved['config']}")
        was = saved["state"].get("selected_by", "dev_loss")
        if was != selected_by:
            raise ValueError(f"cannot resume {str(out)!r}: it chose checkpoints by {was}, this call by {selected_by} "
                             f"({'pass' if was == 'dev_score' else 'drop'} dev_score)")
        if saved.get("data", data) != data:
            raise ValueError(f"cannot resume {str(out)!r} with other training or dev traces than it started with "
                             f"(saved {saved['data']['sizes']}, given {data['sizes']}; a changed trace counts too)")
        given = _model_key(model)
        if saved.get("model", given) != given:  # runs saved before the key: not checked
            raise ValueError(f"cannot resume {str(out)!r} with another model or dtype than it started with (saved "
                             f"{saved['model']}, given {given}; on the command line, the --device it started on: "
                             f"fp32 on cpu, bf16 on cuda)")
        recorded = _finished(out, saved["state"], total)
        if recorded is not None:  # nothing left to run: the folder stays as the run left it
            load_adapter(model, best_dir, trainable=True)
            model.hf_model.eval()
            return _result(best_dir, {"best_dev_score": None, **saved["state"]}, times=[],
                           provenance=recorded.get("provenance"))
        where = str(last / "trainer_state.pt")
        if "weights" in saved:  # saved in the state's file: the adapters of its step
            # best/ as of that step (a later write of it may have been cut off with the run)
            set_adapter_weights(model, saved["best_weights"], where=where)
            save_adapter(model, best_dir)
            best["weights"] = saved["best_weights"]
            set_adapter_weights(model, saved["weights"], where=where)
        else:
            load_adapter(model, last, trainable=True)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        state = {"best_dev_score": None, "selected_by": selected_by, **saved["state"]}
    else:
        (out / "history.json").unlink(missing_ok=True)  # an earlier run's, which best/ no longer matches from here
        torch.manual_seed(config.seed)
        record = {"step": 0}
        dev_eval(record)
        state["history"].append(record)

    bar = progress_bar(total=total, initial=state["step"], desc="finetune", disable=not progress)
    times = []
    try:
        while state["step"] < total and (stop_after is None or state["step"] < stop_after):
            step = state["step"]
            t0 = time.perf_counter()
            batch = range(step * config.grad_accum, min((step + 1) * config.grad_accum, n_micro))
            lr = opt.param_groups[0]["lr"]  # the rate this step uses
            loss = _optimizer_step(model, executor, [train_traces[_instance(m, len(train_traces), config.seed)]
                                                     for m in batch], params, opt, config, teacher)
            sched.step()
            state["step"] = step + 1
            times.append(time.perf_counter() - t0)
            record = {"step": state["step"], "train_loss": loss, "lr": lr, "seconds": times[-1]}
            if state["step"] % config.eval_every == 0 or state["step"] == total:
                dev_eval(record)
            state["history"].append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", best_dev=f"{state['best_dev_loss']:.3f}")
            if "dev_loss" in record or state["step"] == stop_after:
                _save_last(model, last, opt, sched, state, config, data, best["weights"])
    finally:
        bar.close()
    prov = _write_history(out / "history.json", state, config, model=model,
                   sizes={"train_traces": len(train_traces), "dev_traces": len(dev_traces)})
    load_adapter(model, best_dir, trainable=True)  # the adapter stays as trainable as it was
    model.hf_model.eval()
    return _result(best_dir, state, times=times, provenance=prov)


def _result(best_dir: Path, state: dict, *, times: list[float], provenance: dict | None) -> TrainResult:
    """The ``TrainResult`` of a run whose training state is ``state``, this call having run steps of ``times``
    seconds (none: seconds_per_step is NaN, written as null by ``choreo.results.write_json``)."""
    return TrainResult(best_adapter=best_dir, best_step=state["best_step"], best_dev_loss=state["best_dev_loss"],
                       best_dev_score=state["best_dev_score"], history=state["history"], steps=state["step"],
                       seconds_per_step=float(np.mean(times)) if times else float("nan"), peak_rss_mb=peak_rss_mb(),
                       steps_run=len(times), provenance=provenance)


def _finished(out: Path, state: dict, total: int) -> dict | None:
    """``out/history.json`` if a run to resume has nothing left to do: all ``total`` steps ran and that file records
    them; else None (a run killed after its last state was saved but before its history was written goes on to
    write it, and ``best/`` again from the state)."""
    from .results import finite

    if state["step"] < total:
        return None
    try:
        written = json.loads((out / "history.json").read_text())
        return written if written["history"] == finite(state["history"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _scored(model, dev_score) -> float:
    """``dev_score(model)`` in eval mode without gradients, with the random state of training put back after."""
    saved, was_training = _rng_state(), model.hf_model.training
    model.hf_model.eval()
    try:
        with torch.no_grad():
            score = float(dev_score(model))
    finally:
        _set_rng_state(saved)
        model.hf_model.train(was_training)
    if math.isnan(score):
        raise ValueError("dev_score returned nan: checkpoints cannot be ranked by it")
    return score


def _better(record: dict, state: dict) -> bool:
    """Whether a dev evaluation beats the kept checkpoint: by dev score when there is one (ties: the lower dev
    loss), else by dev loss; an exact tie keeps the earlier step."""
    if "dev_score" in record and record["dev_score"] != state["best_dev_score"]:
        return record["dev_score"] > state["best_dev_score"]
    return record["dev_loss"] < state["best_dev_loss"]


def _optimizer_step(model, executor, traces, params, opt, config, teacher) -> float:
    """One optimizer step over a list of workflow instances (one micro-batch each); returns the mean loss."""
    model.hf_model.train()  # LoRA dropout on
    executor.engine.grad = True
    opt.zero_grad(set_to_none=True)
    losses = []
    try:
        for events in traces:
            out = replay_loss(executor, events, calls=config.loss_calls, through_cache=config.through_cache,
                              loss=config.loss, teacher=teacher(events) if "kl" in config.loss else None)
            if out.loss.requires_grad:  # a loss of exactly 0 (nothing scored) has no graph to run back through
                (out.loss / len(traces)).backward()
            losses.append(float(out.loss.detach()))
            executor.engine.store.detach_()
    finally:
        executor.engine.grad = False
        model.hf_model.eval()
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    opt.step()
    return float(np.mean(losses))


def _save_last(model, last: Path, opt, sched, state, config, data: dict, best_weights: dict) -> None:
    """``last/``: the adapter (peft format, to load by hand) and ``trainer_state.pt``, written whole or not at all,
    which holds everything ``resume`` reads, the current and the kept checkpoint's LoRA weights included: a run
    killed while writing either adapter folder resumes from the state's step with that step's weights."""
    save_adapter(model, last)
    tmp = last / "trainer_state.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                "state": state, "config": config.to_json(), "data": data, "model": _model_key(model),
                "weights": adapter_weights(model), "best_weights": best_weights}, tmp)
    tmp.replace(last / "trainer_state.pt")


def _model_key(model) -> dict:
    """What a resumed run must be given again of its model: the checkpoint's hash and the dtype it trains in."""
    return {"sha256": model.spec.sha256, "dtype": str(model.spec.dtype)}


def _data_key(train_traces, dev_traces) -> dict:
    """What a resumed run must be given again: the sizes and a digest of every training and dev event."""
    import hashlib

    events = [[[e.to_json() for e in t] for t in side] for side in (train_traces, dev_traces)]
    digest = hashlib.sha256(json.dumps(events, sort_keys=True).encode()).hexdigest()
    return {"sizes": {"train_traces": len(train_traces), "dev_traces": len(dev_traces)}, "sha256": digest}


def _write_history(path: Path, state: dict, config: FinetuneConfig, *, model, sizes: dict) -> dict:
    """Write the run's ``history.json``; returns its provenance."""
    from .provenance import provenance
    from .results import write_json

    prov = provenance(model, seeds=[config.seed], sample_sizes=sizes)
    write_json(path, {"config": config.to_json(), "dev_metric": config.dev_criterion,
                      "selected_by": state["selected_by"], "best_step": state["best_step"],
                      "best_dev_loss": state["best_dev_loss"], "best_dev_score": state["best_dev_score"],
                      "history": state["history"], "provenance": prov})
    return prov


# ---------------------------------------------------------------------------------------------- selection on dev
@dataclasses.dataclass
class Selection:
    """What ``select_on_dev`` tried and chose. ``candidates[k]``: config k (as run), its best dev ``metric``,
    best step, steps and seconds per step; ``best``: the index of the chosen one."""

    best: int
    config: FinetuneConfig
    result: TrainResult
    metric: str
    candidates: list[dict]


def select_on_dev(model, train_traces: Sequence, dev_traces: Sequence, *, configs: Sequence[FinetuneConfig],
                  out_dir, metric: str = "kl", teacher: Teacher | None = None, progress: bool = True) -> Selection:
    """Train every candidate config and keep the one whose best checkpoint has the lowest dev ``metric``.

    One metric for all candidates (and for checkpoint selection inside each run: every candidate runs with
    ``dev_metric=metric``), so CE- and KL-trained adapters compare on the same scale; the default is the dev KL
    to the adapter-off baseline. Only ``train_traces`` and ``dev_traces`` are read: held-out data stays out of
    every choice. Candidate k writes ``out_dir/candidate-k``. Ties go to the earlier candidate. On return the
    model carries the chosen adapter (eval mode).

    Example::

        grid = [FinetuneConfig.preset("embedded-cpu", loss=loss, lr=lr) for loss in ("ce", "kl") for lr in (3e-4, 1e-3)]
        chosen = select_on_dev(model, train_set, dev_set, configs=grid, out_dir="runs/select")
        chosen.config.lr, chosen.candidates
    """
    check_loss(metric, "metric")
    configs = [dataclasses.replace(c, dev_metric=metric) for c in configs]
    if not configs:
        raise ValueError("select_on_dev needs at least one candidate config")
    check_no_adapter(model)  # each candidate adds its adapter and removes it: a caller's would go with them
    shared = {(c.loss_calls, c.attention) for c in configs}
    if len(shared) > 1:
        raise ValueError(f"candidates must share loss_calls and attention (one dev metric), got {sorted(shared)}")
    if teacher is None:  # (an empty Teacher is falsy: it has a length)
        teacher = Teacher(model, calls=configs[0].loss_calls, attention=configs[0].attention)
    results, rows = [], []
    for k, config in enumerate(configs):
        try:
            result = train(model, train_traces, dev_traces, config=config, out_dir=Path(out_dir) / f"candidate-{k}",
                           teacher=teacher, progress=progress)
        finally:
            unload_adapter(model)
        results.append(result)
        rows.append({"config": config.to_json(), "loss": config.loss, "lr": config.lr, "dev_metric": metric,
                     "best_dev": result.best_dev_loss, "dev_step0": result.history[0]["dev_loss"],
                     "best_step": result.best_step, "steps": result.steps,
                     "seconds_per_step": result.seconds_per_step})
    best = min(range(len(configs)), key=lambda k: (results[k].best_dev_loss, k))
    load_adapter(model, results[best].best_adapter)
    model.hf_model.eval()
    return Selection(best=best, config=configs[best], result=results[best], metric=metric, candidates=rows)

