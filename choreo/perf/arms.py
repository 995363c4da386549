"""The arms of the performance suite: executors that run a shape, all emitting the same tokens.

- ``choreographed[<backend>]``: ``Choreographer`` with an attention backend ("torch"; "triton" on CUDA).
- ``baseline``: ``Baseline`` (each call re-encodes its serial prompt from position 0).
- ``baseline+prefix``: ``Baseline(prefix_reuse=True)`` (exact prefix caching, as vLLM/SGLang do).
- ``hf``: ``model.hf_model`` with its own KV cache on the *same serial prompt ids* the baseline builds, a
  stage's calls one after another (so a call's time to first token includes the decodes of the calls ahead).

Content is teacher-forced *one decode step at a time* (``TEACHER``): a call's prompt is encoded, then each
forced content token is fed as if it had been sampled, so time to first token is real prompt processing. Every
step reads its argmax (and the gap to the runner-up) to the host, as sampling does, so on a GPU each step waits
for its pass to finish; the argmaxes are kept (``step_argmax``) so that ``measure.check_identical`` can compare
what each arm's model computed, not only the forced tokens, which are the same by construction.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from ..baseline import Baseline
from ..cache import Message
from ..calls import Call
from ..choreographer import Choreographer
from ..engine import Engine, Job
from ..model import Model

TEACHER = ("teacher-forced, one decode step per content token (identical tokens in every arm; each step's argmax "
           "checked to agree between arms that compute the same attention)")
HF_PROTOCOL = ("hf_model forward with its DynamicCache on the baseline's serial prompt ids, then the same "
               "teacher tokens one step at a time and a closing step with the footer (logits_to_keep=1); "
               "parallel calls one after another")


def top2(logits: torch.Tensor) -> tuple[int, float]:
    """(argmax, relative gap) of one step's logits (V,): the gap between the largest and second largest logit over
    max(1, |largest|). What a sampling step reads back to the host (a sync on a GPU); the gap tells a float
    near-tie from a different computation (``measure.check_identical``)."""
    top = logits.float().topk(2)
    (a, b), index = top.values.tolist(), int(top.indices[0])
    return index, (a - b) / max(1.0, abs(a))


class _StepwiseEngine(Engine):
    """Feeds a job's forced tokens as if sampled, one decode step each; records each step's argmax, the number
    of tokens of every forward pass (``pass_tokens``), and on each job the step it started in and the tokens of
    every pass of that step that fed first chunks (``job.first_window``: one pass, or several where
    ``first_chunk_passes`` split them)."""

    def step(self, jobs) -> None:
        self.steps += 1
        self._first_window = (self.steps, [])  # this step's number and its passes of first chunks, their tokens
        super().step(jobs)

    def _forward(self, jobs: list[Job]) -> None:
        tokens = sum(len(j.pending) for j in jobs)
        self.pass_tokens.append(tokens)
        if all(j.fed == 0 for j in jobs):  # a pass of first chunks: every job of it is before its first token
            self._first_window[1].append(tokens)
            for j in jobs:
                j.first_window = self._first_window  # the step's, its list filled by its later passes too
        super()._forward(jobs)

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        forced = getattr(job, "forced", None)
        if forced is None or job.closing:
            return super()._advance(job, logits)
        job.argmax.append(top2(logits[-1]))  # the step's result reaches the host, as sampling's does
        if job.msg.ttft is None:
            job.msg.ttft = time.perf_counter() - job.t0
        token = forced[len(job.generated)]
        job.generated.append(token)
        done = len(job.generated) >= len(forced)
        job.pending, job.closing = ([token] + job.footer, True) if done else ([token], False)


class _Stepwise:
    """Executor mixin: a call with ``teacher_tokens`` decodes them step by step instead of in one pass."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.engine.__class__ = _StepwiseEngine  # adds behaviour; its state is set here
        self.engine.pass_tokens = []  # tokens of every forward pass, in order
        self.engine.steps = 0  # steps run
        self.first_pass_tokens: dict[int, int] = {}  # message id -> tokens its call encoded before its first token
        self.first_passes: dict[int, tuple[int, list[int]]] = {}  # message id -> (its step, tokens of each pass
        # before its first token)
        self.step_argmax: dict[int, list[tuple[int, float]]] = {}  # message id -> (argmax, relative top-2 gap) per step

    def make_job(self, call: Call, header, **kwargs) -> Job:
        if call.teacher_tokens is None:
            return super().make_job(call, header, **kwargs)
        forced = [int(t) for t in call.teacher_tokens]
        job = super().make_job(dataclasses.replace(call, teacher_tokens=None, max_tokens=len(forced)), header, **kwargs)
        job.forced, job.argmax = forced, []
        return job

    def finish(self, jobs: list[Job]) -> list[Message]:
        out = super().finish(jobs)
        for job, msg in zip(jobs, out):
            if job.call is not None:
                # What the call's first pass encodes: the choreographed header; the baseline's serial prompt past
                # the prefix reused from a cached chain (prompt[reuse:], reuse = len(job.origin[1])).
                self.first_pass_tokens[msg.id] = job.n_header
                step, passes = getattr(job, "first_window", (None, []))
                self.first_passes[msg.id] = (step, list(passes))
                self.step_argmax[msg.id] = getattr(job, "argmax", [])
        return out


class StepwiseChoreographer(_Stepwise, Choreographer):
    """``Choreographer`` whose teacher-forced calls decode one token per step."""


class StepwiseBaseline(_Stepwise, Baseline):
    """``Baseline`` whose teacher-forced calls decode one token per step."""


class HFSession:
    """The executor verbs over ``model.hf_model`` on the baseline's serial prompts (verbs never suspend)."""

    def __init__(self, model: Model):
        # The book keeps messages and builds the prompts; it never encodes, so its KV store holds one row (the
        # default 1,024-row store, 45 MiB for SmolLM2-135M, would be charged to hf's peak memory).
        self.model, self.book = model, Baseline(model, capacity=1)
        self.tokens_processed, self.forward_passes, self.peak_kv_tokens, self.created = 0, 0, 0, []
        self.first_pass_tokens: dict[int, int] = {}  # message id -> its serial prompt's length
        self.step_argmax: dict[int, list[tuple[int, float]]] = {}  # message id -> (argmax, relative top-2 gap) per step
        self.pass_tokens: list[int] = []  # tokens of every forward pass, in order

    async def prefill(self, text, *, role, parents=(), offsets=None, new_offset=None) -> Message:
        msg = self.book.prefill(text, role=role, parents=parents, offsets=offsets, new_offset=new_offset)
        self.created.append(msg)
        return msg

    async def decode(self, calls: Sequence[Call]) -> list[Message]:
        t0, out = time.perf_counter(), []
        for call in calls:
            out.append(self._one(call, t0))
        self.created.extend(out)
        return out

    @torch.inference_mode()
    def _one(self, call: Call, t0: float) -> Message:
        hf, dev = self.model.hf_model, self.model.spec.device
        prompt, _, _ = self.book.serial_prompt(call)  # exactly the baseline's serial prompt
        forced, footer = [int(t) for t in call.teacher_tokens], self.book.format.footer(call.role)
        argmax = []

        def step(ids, past, keep=True):  # one forward; its argmax reaches the host, as sampling would
            out = hf(input_ids=torch.tensor([ids], device=dev), past_key_values=past, use_cache=True,
                     logits_to_keep=1)
            self.pass_tokens.append(len(ids))
            if keep:  # the closing step's logits predict past the footer: no forced token to compare with
                argmax.append(top2(out.logits[0, -1]))
            return out

        out = step(prompt, None)
        ttft = time.perf_counter() - t0
        for token in forced[:-1]:
            out = step([token], out.past_key_values)
        step([forced[-1]] + footer, out.past_key_values, keep=False)
        n = len(prompt) + len(forced) + len(footer)
        self.tokens_processed += n
        self.forward_passes += len(forced) + 1
        self.peak_kv_tokens = max(self.peak_kv_tokens, n)
        msg = self.book.add_generated(call, forced, ttft=ttft, latency=time.perf_counter() - t0)
        self.first_pass_tokens[msg.id] = len(prompt)
        self.step_argmax[msg.id] = argmax
        return msg

    def close(self) -> None:
        self.book.free(*[m for m in self.created if not m.freed])
        self.created = []


def available_arms(device, *, head_dim: int | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Arms that run on ``device``: the torch backend everywhere, triton on CUDA where the kernel runs the model's
    heads (``head_dim`` and ``dtype``: ``attention.default_backend``); the device's default backend also with
    prefills fused into the first pass that reads them (``+fused``).

    Example: ``available_arms("cuda", head_dim=96, dtype=torch.float32)`` has no triton arm (96 is not a power of
    two)."""
    fast = fast_arm(device, head_dim=head_dim, dtype=dtype)
    backends = ["torch"] + (["triton"] if fast == "choreographed[triton]" else [])
    return ([f"choreographed[{b}]" for b in backends] + [fast + "+fused"]
            + ["baseline", "baseline+prefix", "hf"])


def fast_arm(device, *, head_dim: int | None = None, dtype: torch.dtype | None = None) -> str:
    """The choreographed arm with the device's default attention backend for a model with heads of ``head_dim`` at
    ``dtype`` (torch on CPU; triton on CUDA, unless the kernel cannot run those heads: then torch, as the engine
    falls back)."""
    from ..attention import default_backend

    return f"choreographed[{default_backend(torch.device(device), head_dim=head_dim, dtype=dtype)}]"


def model_heads(model: Model) -> dict:
    """The head dim and dtype of ``model``, as ``available_arms``, ``fast_arm`` and ``memory_arms`` take them."""
    return {"head_dim": model.spec.head_dim, "dtype": model.spec.dtype}


def make_executor(model: Model, arm: str):
    """The executor of an engine arm (``hf`` has none: see ``HFSession``). ``+fused`` changes how the
    runner schedules prefills (``run_once``), not the executor."""
    base = arm.removesuffix("+fused")
    if base.startswith("choreographed[") and base.endswith("]"):
        return StepwiseChoreographer(model, attention=base[len("choreographed["):-1])
    if arm == "baseline":
        return StepwiseBaseline(model)
    if arm == "baseline+prefix":
        return StepwiseBaseline(model, prefix_reuse=True)
    raise ValueError(f"unknown arm {arm!r}; choose one of {available_arms('cuda')}")
