"""Performance: workflow shapes, the arms that run them, and side-by-side measurement.

Every shape is one ``async def`` written once against the executor verbs; the arm is chosen by the
executor that runs it:

- ``choreographed[<backend>]``: ``Choreographer`` with an attention backend ("torch"; "triton" on CUDA).
- ``baseline``: ``Baseline`` (each call re-encodes its serial prompt from position 0).
- ``baseline+prefix``: ``Baseline(prefix_reuse=True)`` (exact prefix caching, as vLLM/SGLang do).
- ``hf``: ``model.hf_model`` with its own KV cache on the *same serial prompt ids* the baseline builds.

Content is teacher-forced *one decode step at a time* (``TEACHER``): a call's prompt is encoded, then
each forced content token is fed as if it had been sampled. Every arm therefore runs the same prompts,
the same number of decode steps and emits identical tokens, and time to first token is real prompt
processing. Parallel calls of a stage share forward passes in the engine arms; the ``hf`` arm runs them
one after another (its time to first token counts from the stage's submission).

Example::

    model = choreo.load_model()
    shape = make_shape("tree_of_thoughts", B=8, V=4)
    runs = compare(model, shape, arms=("choreographed[torch]", "baseline"), lengths=Lengths(), rounds=3)
    speedups(runs, "baseline", "choreographed[torch]")  # {"e2e": ..., "ttft": ..., bounds ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .baseline import Baseline
from .cache import Message
from .engine import Call, Choreographer, Engine, Job
from .model import Model
from .runner import Runner

TEACHER = "teacher-forced, one decode step per content token (identical tokens in every arm)"
HF_PROTOCOL = ("hf_model forward with its DynamicCache on the baseline's serial prompt ids, then the same "
               "teacher tokens one step at a time and a closing step with the footer (logits_to_keep=1); "
               "parallel calls one after another")


# ============================================================================ synthetic content
@dataclasses.dataclass(frozen=True, kw_only=True)
class Lengths:
    """Sizes of the synthetic messages: words per prompt, tokens per generated message."""

    prompt_words: int = 24
    content_tokens: int = 16

    def __post_init__(self):
        for name in ("prompt_words", "content_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Lengths.{name} must be an integer >= 1, got {value!r}")


_WORDS = ("the plan should weigh cost risk and time before we agree on a fair answer to this question "
          "consider each option carefully then explain which one is better and why a careful reader "
          "would accept it given what we know about the problem so far").split()


class Synth:
    """Deterministic prompts and teacher tokens keyed by a tag (the same in every arm).

    Example: ``s = Synth(model.tokenizer, Lengths()); s.prompt("question"); s.tokens("vote/3")``.
    """

    def __init__(self, tokenizer, lengths: Lengths):
        self.tokenizer, self.lengths = tokenizer, lengths
        self._cache: dict[str, list[int]] = {}
        bad = {tokenizer.eos_token_id, *tokenizer.all_special_ids}
        self._bad = {b for b in bad if b is not None}

    def prompt(self, tag: str) -> str:
        rng = random.Random(f"prompt/{tag}")
        return f"[{tag}] " + " ".join(rng.choice(_WORDS) for _ in range(self.lengths.prompt_words))

    def tokens(self, tag: str) -> list[int]:
        """``content_tokens`` ordinary token ids (no special or stop tokens)."""
        if tag not in self._cache:
            rng = random.Random(f"content/{tag}")
            text = " ".join(rng.choice(_WORDS) for _ in range(4 * self.lengths.content_tokens))
            ids = [t for t in self.tokenizer.encode(text, add_special_tokens=False) if t not in self._bad]
            self._cache[tag] = ids[: self.lengths.content_tokens]
        return self._cache[tag]


# ============================================================================ shapes
class Recorder:
    """Wraps a session: passes verbs through and records every decode stage (a set of parallel calls)."""

    def __init__(self, ex, synth: Synth):
        self.ex, self.synth, self.stages = ex, synth, []

    async def prefill(self, tag: str, *, role: str, parents=()) -> Message:
        return await self.ex.prefill(self.synth.prompt(tag), role=role, parents=parents)

    async def decode(self, tags: Sequence[str], parents: Sequence[Sequence[Message]], role="assistant") -> list[Message]:
        roles = [role] * len(tags) if isinstance(role, str) else list(role)
        calls = [Call(role=r, parents=tuple(p), teacher_tokens=self.synth.tokens(t), max_tokens=1)
                 for t, p, r in zip(tags, parents, roles)]
        msgs = await self.ex.decode(calls)
        self.stages.append([{
            "ttft": m.ttft, "latency": m.latency, "tokens": list(m.tokens), "header": m.content[0],
            "parent_tokens": sum(p.length for p in ps),
        } for m, ps in zip(msgs, parents)])
        return msgs

    async def decode1(self, tag: str, parents: Sequence[Message], role="assistant") -> Message:
        return (await self.decode([tag], [parents], role))[0]


async def prisoners_dilemma(rec: Recorder, *, rounds: int = 2):
    """Private plans, ``rounds`` of public A->B turns, then both decisions in parallel."""
    sys_ = {a: await rec.prefill(f"pd/system/{a}", role="system") for a in ("alice", "bob")}
    plan = dict(zip(sys_, await rec.decode(["pd/plan/alice", "pd/plan/bob"], [[sys_["alice"]], [sys_["bob"]]])))
    public: list[Message] = []
    for r in range(rounds):
        for a in ("alice", "bob"):
            public.append(await rec.decode1(f"pd/turn/{r}/{a}", [sys_[a], plan[a], *public], role=f"assistant:{a}"))
    await rec.decode([f"pd/decide/{a}" for a in sys_], [[sys_[a], plan[a], *public] for a in sys_])
    return rec.stages


async def multiqa(rec: Recorder, *, k: int = 2):
    """k questions encoded in parallel, one answer attending to all of them."""
    sys_ = await rec.prefill("mqa/system", role="system")
    qs = [await rec.prefill(f"mqa/q{i}", role="user", parents=[sys_]) for i in range(k)]
    await rec.decode1("mqa/answer", [sys_, *qs])
    return rec.stages


async def branch_solve_merge(rec: Recorder, *, N: int = 2):
    """A task, N branch instructions, N parallel solutions, one merge over them."""
    task = await rec.prefill("bsm/task", role="user")
    branches = [await rec.prefill(f"bsm/branch{i}", role="user", parents=[task]) for i in range(N)]
    solved = await rec.decode([f"bsm/solve{i}" for i in range(N)], [[task, b] for b in branches])
    merge = await rec.prefill("bsm/merge", role="user", parents=[task])
    await rec.decode1("bsm/final", [task, merge, *solved])
    return rec.stages


async def tree_of_thoughts(rec: Recorder, *, B: int = 8, V: int = 4):
    """B proposals in parallel, V voters attending to all of them, a final answer from the winner."""
    q = await rec.prefill("tot/question", role="user")
    ask = await rec.prefill("tot/propose", role="user", parents=[q])
    cands = await rec.decode([f"tot/cand{i}" for i in range(B)], [[q, ask]] * B)
    vote = await rec.prefill("tot/vote", role="user", parents=[q])
    await rec.decode([f"tot/vote{i}" for i in range(V)], [[vote, *cands]] * V)
    final = await rec.prefill("tot/final", role="user", parents=[q])
    await rec.decode1("tot/answer", [final, cands[0]])  # teacher-forced votes: the winner is fixed
    return rec.stages


async def iterative_debate(rec: Recorder, *, rounds: int = 3):
    """Affirmative then negative, each seeing the whole debate so far, then a judge."""
    q = await rec.prefill("id/question", role="user")
    aff_sys = await rec.prefill("id/aff", role="system")
    neg_sys = await rec.prefill("id/neg", role="system")
    prev: list[Message] = []
    for r in range(rounds):
        prev.append(await rec.decode1(f"id/aff{r}", [aff_sys, q, *prev], role="assistant:aff"))
        prev.append(await rec.decode1(f"id/neg{r}", [neg_sys, q, *prev], role="assistant:neg"))
    judge = await rec.prefill("id/judge", role="system")
    await rec.decode1("id/verdict", [judge, q, *prev])
    return rec.stages


async def parallel_debate(rec: Recorder, *, A: int = 3, rounds: int = 3):
    """A agents answer in parallel each round, seeing every answer of the previous round."""
    q = await rec.prefill("pdb/question", role="user")
    agents = [await rec.prefill(f"pdb/agent{a}", role="system") for a in range(A)]
    last: list[Message] = []
    for r in range(rounds):
        last = await rec.decode([f"pdb/{r}/{a}" for a in range(A)], [[agents[a], q, *last] for a in range(A)],
                                role=[f"assistant:agent{a}" for a in range(A)])
    return rec.stages


async def conversation(rec: Recorder, *, turns: int = 2):
    """A multi-turn chat: system prompt, then ``turns`` user/assistant exchanges, each seeing all before it."""
    history = [await rec.prefill("chat/system", role="system")]
    for t in range(turns):
        history.append(await rec.prefill(f"chat/user{t}", role="user", parents=history))
        history.append(await rec.decode1(f"chat/assistant{t}", history))
    return rec.stages


WORKFLOWS: dict[str, Callable] = {
    "prisoners_dilemma": prisoners_dilemma,
    "multiqa": multiqa,
    "branch_solve_merge": branch_solve_merge,
    "tree_of_thoughts": tree_of_thoughts,
    "iterative_debate": iterative_debate,
    "parallel_debate": parallel_debate,
    "conversation": conversation,
}
_LIMITS = {"B": (1, 16), "V": (2, 16), "A": (2, 8), "k": (1, 16), "N": (1, 16), "rounds": (1, 8), "turns": (1, 16)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """A workflow and its size, e.g. ``Shape(name="tree_of_thoughts", size=(("B", 8), ("V", 4)))``."""

    name: str
    size: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.name not in WORKFLOWS:
            raise ValueError(f"unknown shape {self.name!r}; choose one of {sorted(WORKFLOWS)}")
        for key, value in self.size:
            lo, hi = _LIMITS.get(key, (1, 64))
            if not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{self.name}: size {key}={value!r} must be an integer in {lo}..{hi}")

    @property
    def label(self) -> str:
        return self.name + "".join(f" {k}={v}" for k, v in self.size)

    def workflow(self, synth: Synth):
        return lambda ex: WORKFLOWS[self.name](Recorder(ex, synth), **dict(self.size))


def make_shape(name: str, **size: int) -> Shape:
    return Shape(name=name, size=tuple(sorted(size.items())))


# The paper's shapes (Performance section of the seed) at their reported sizes.
PAPER_SHAPES = (
    make_shape("prisoners_dilemma", rounds=2),
    make_shape("multiqa", k=2),
    make_shape("branch_solve_merge", N=2),
    make_shape("tree_of_thoughts", B=8, V=4),
    make_shape("iterative_debate", rounds=3),
    make_shape("parallel_debate", A=3, rounds=3),
)
SCALING = {
    "B": [make_shape("tree_of_thoughts", B=b, V=4) for b in (2, 4, 8, 16)],
    "V": [make_shape("tree_of_thoughts", B=4, V=v) for v in (2, 4, 8, 16)],
    "A": [make_shape("parallel_debate", A=a, rounds=3) for a in (2, 4, 8)],
}
# Paper figures (A100), for the table's reference column.
PAPER = {"tree_of_thoughts B=8 V=4": {"ttft": 3.6, "e2e": 1.03},
         "iterative_debate rounds=3": {"ttft": 2.0, "e2e": 1.03},
         "parallel_debate A=3 rounds=3": {"ttft": 6.2, "e2e": 1.03}}


# ============================================================================ arms
class _StepwiseEngine(Engine):
    """Feeds a job's forced tokens as if sampled (no argmax), one decode step each."""

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        forced = getattr(job, "forced", None)
        if forced is None or job.closing:
            return super()._advance(job, logits)
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
        self.engine.__class__ = _StepwiseEngine  # adds behaviour only, no state

    def make_job(self, call: Call, header, **kwargs) -> Job:
        if call.teacher_tokens is None:
            return super().make_job(call, header, **kwargs)
        forced = [int(t) for t in call.teacher_tokens]
        job = super().make_job(dataclasses.replace(call, teacher_tokens=None, max_tokens=len(forced)), header, **kwargs)
        job.forced = forced
        return job


class StepwiseChoreographer(_Stepwise, Choreographer):
    """``Choreographer`` whose teacher-forced calls decode one token per step."""


class StepwiseBaseline(_Stepwise, Baseline):
    """``Baseline`` whose teacher-forced calls decode one token per step."""


class HFSession:
    """The executor verbs over ``model.hf_model`` on the baseline's serial prompts (verbs never suspend)."""

    def __init__(self, model: Model):
        self.model, self.book = model, Baseline(model)  # the book keeps messages and builds the prompts
        self.tokens_processed, self.peak_kv_tokens, self.created = 0, 0, []

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
        fmt, hf, dev = self.book.format, self.model.hf_model, self.model.spec.device
        prompt, start, parents = self.book._prompt(call)  # exactly the baseline's serial prompt
        forced, footer = [int(t) for t in call.teacher_tokens], fmt.footer(call.role)
        step = lambda ids, past: hf(input_ids=torch.tensor([ids], device=dev), past_key_values=past,
                                    use_cache=True, logits_to_keep=1)
        out = step(prompt, None)
        ttft = time.perf_counter() - t0
        for token in forced[:-1]:
            out = step([token], out.past_key_values)
        step([forced[-1]] + footer, out.past_key_values)
        n = len(prompt) + len(forced) + len(footer)
        self.tokens_processed += n
        self.peak_kv_tokens = max(self.peak_kv_tokens, n)
        header = fmt.header(call.role, call.prefix)
        msg = Message(id=next(self.book._ids), role=call.role, parents=parents, start=start,
                      ids=header + forced + footer, content=(len(header), len(header) + len(forced)),
                      text=fmt.decode(forced), prefix=call.prefix, ttft=ttft, latency=time.perf_counter() - t0)
        self.book._messages[msg.id] = msg
        return msg

    def close(self) -> None:
        self.book.free(*[m for m in self.created if not m.freed])
        self.created = []


def available_arms(device) -> list[str]:
    """Arms that run on ``device``: the torch backend everywhere, triton on CUDA."""
    backends = ["torch"] + (["triton"] if torch.device(device).type == "cuda" else [])
    return [f"choreographed[{b}]" for b in backends] + ["baseline", "baseline+prefix", "hf"]


def fast_arm(device) -> str:
    """The choreographed arm with the device's default attention backend (torch on CPU, triton on CUDA)."""
    from .attention import default_backend

    return f"choreographed[{default_backend(torch.device(device))}]"


def make_executor(model: Model, arm: str):
    """The executor of an engine arm (``hf`` has none: see ``HFSession``)."""
    if arm.startswith("choreographed[") and arm.endswith("]"):
        return StepwiseChoreographer(model, attention=arm[len("choreographed["):-1])
    if arm == "baseline":
        return StepwiseBaseline(model)
    if arm == "baseline+prefix":
        return StepwiseBaseline(model, prefix_reuse=True)
    raise ValueError(f"unknown arm {arm!r}; choose one of {available_arms('cuda')}")


# ============================================================================ measurement
def _sync(model: Model) -> None:
    if model.spec.device.type == "cuda":
        torch.cuda.synchronize(model.spec.device)


def run_once(model: Model, shape: Shape, arm: str, synth: Synth, executor=None) -> dict:
    """One workflow instance under one arm: wall time, per-call figures, tokens processed, KV peak.

    ``executor`` lets rounds reuse one executor (its KV buffers stay allocated, like a server's).
    """
    workflow = shape.workflow(synth)
    cuda = model.spec.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.spec.device)
    _sync(model)
    if arm == "hf":
        session = HFSession(model)
        t0 = time.perf_counter()
        coro = workflow(session)
        try:
            coro.send(None)
            raise RuntimeError("an hf session verb suspended")
        except StopIteration as stop:
            stages = stop.value
        _sync(model)
        wall = time.perf_counter() - t0
        session.close()
        tokens, kv_tokens = session.tokens_processed, session.peak_kv_tokens
    else:
        ex = executor or make_executor(model, arm)
        engine = ex.engine
        tok0 = engine.tokens_processed
        engine.store.peak = engine.store.used
        t0 = time.perf_counter()
        # Prompts are prefilled ahead of the calls (each its own pass), as the committed tables were measured.
        stages = Runner(ex, progress=False, fuse_prefills=False).run([workflow])[0]
        _sync(model)
        wall = time.perf_counter() - t0
        tokens, kv_tokens = engine.tokens_processed - tok0, engine.store.peak
    calls = [c for s in stages for c in s]
    prompt = [c["header"] + (0 if arm.startswith("choreographed") else c["parent_tokens"]) for c in calls]
    return {
        "arm": arm, "shape": shape.label, "wall_s": wall,
        "ttft_sum_s": sum(max(c["ttft"] for c in s) for s in stages),  # summed over sequential stages
        "ttft_calls_s": [c["ttft"] for c in calls],
        "stages": len(stages), "calls": len(calls),
        "generated": [c["tokens"] for c in calls],
        "prompt_tokens": sum(prompt),  # tokens encoded before each call's first token (no reuse counted)
        "tokens_processed": tokens,
        "kv_peak_tokens": kv_tokens, "kv_peak_bytes": kv_tokens * model.spec.kv_bytes_per_token,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(model.spec.device) if cuda else None,
    }


def compare(model: Model, shape: Shape, *, arms: Sequence[str], lengths: Lengths, rounds: int = 3,
            warmup: int = 1) -> dict[str, list[dict]]:
    """Run every arm ``warmup + rounds`` times, interleaved within each round; returns timed runs per arm."""
    synth = Synth(model.tokenizer, lengths)
    executors = {a: make_executor(model, a) for a in arms if a != "hf"}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(warmup + rounds):
        for arm in arms:
            result = run_once(model, shape, arm, synth, executors.get(arm))
            if r >= warmup:
                runs[arm].append(result)
    return runs


def check_identical(runs: dict[str, list[dict]]) -> None:
    """Every arm generated the same tokens, call for call (raises AssertionError naming the arm)."""
    reference_arm, reference = next((a, r[0]["generated"]) for a, r in runs.items())
    for arm, results in runs.items():
        for res in results:
            if res["generated"] != reference:
                raise AssertionError(f"arm {arm!r} generated other tokens than {reference_arm!r} on {res['shape']}")


def speedups(runs: dict[str, list[dict]], slow: str, fast: str) -> dict:
    """Median per-round speed-ups of ``fast`` over ``slow`` and the bounds token counts allow."""
    pairs = list(zip(runs[slow], runs[fast]))
    e2e = statistics.median(s["wall_s"] / f["wall_s"] for s, f in pairs)
    ttft = statistics.median(s["ttft_sum_s"] / f["ttft_sum_s"] for s, f in pairs)
    s0, f0 = pairs[0]
    return {
        "e2e": e2e, "ttft": ttft,
        "e2e_rounds": [s["wall_s"] / f["wall_s"] for s, f in pairs],
        "ttft_rounds": [s["ttft_sum_s"] / f["ttft_sum_s"] for s, f in pairs],
        "e2e_bound": s0["tokens_processed"] / f0["tokens_processed"],
        "ttft_bound": s0["prompt_tokens"] / f0["prompt_tokens"],
    }


# ---------------------------------------------------------------------------- memory in isolation
def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set) of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory_here(model: Model, shape: Shape, arm: str, lengths: Lengths) -> dict:
    """Peak RSS of one run in this process, above the RSS before it.

    One 2-token forward pass runs first: the first pass of a process allocates a fixed ~0.4 GiB (library
    initialisation, the same in every arm) that is not the workflow's. The workflow itself is not warmed
    up: its KV buffers, activations and allocator growth are its footprint.
    """
    import psutil

    synth = Synth(model.tokenizer, lengths)
    executor = None if arm == "hf" else make_executor(model, arm)
    with torch.inference_mode():
        model.hf_model(input_ids=torch.tensor([[1, 2]], device=model.spec.device), logits_to_keep=1)
    before = psutil.Process().memory_info().rss
    reset = _reset_peak_rss()
    result = run_once(model, shape, arm, synth, executor)
    peak = _peak_rss()
    return {"arm": arm, "shape": shape.label, "rss_before": before, "rss_peak": peak, "peak_reset": reset,
            "rss_delta": max(peak - before, 0), "kv_peak_bytes": result["kv_peak_bytes"],
            "cuda_peak_bytes": result["cuda_peak_bytes"]}


def measure_memory(shape: Shape, arm: str, lengths: Lengths, *, model_path: str | None = None,
                   timeout: float = 900) -> dict:
    """``measure_memory_here`` in a fresh subprocess (one per configuration, so peaks do not mix)."""
    spec = {"shape": shape.name, "size": dict(shape.size), "arm": arm, "lengths": dataclasses.asdict(lengths),
            "model": model_path}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-m", "choreo.perf", json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {shape.label} / {arm} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(spec: dict) -> None:
    from .model import load_model

    model = load_model(spec["model"])
    result = measure_memory_here(model, make_shape(spec["shape"], **spec["size"]), spec["arm"],
                                 Lengths(**spec["lengths"]))
    print(json.dumps(result))


# ============================================================================ tables, plots, CLI
@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What ``choreo bench`` measures at a profile (``BENCH_PROFILES``)."""

    lengths: Lengths
    shapes: tuple[Shape, ...] = PAPER_SHAPES
    rounds: int = 3
    warmup: int = 1
    scaling: dict = dataclasses.field(default_factory=dict)
    scaling_rounds: int = 1
    memory_arms: tuple[str, ...] = ("choreographed", "baseline")  # "choreographed": the device's default


BENCH_PROFILES = {
    "smoke": BenchConfig(lengths=Lengths(prompt_words=32, content_tokens=4), rounds=3, warmup=1,
                         shapes=(make_shape("multiqa", k=2), make_shape("tree_of_thoughts", B=2, V=2),
                                 make_shape("parallel_debate", A=2, rounds=1)), memory_arms=()),
    "small": BenchConfig(lengths=Lengths(prompt_words=24, content_tokens=8), rounds=2, warmup=1, scaling=SCALING),
    "paper": BenchConfig(lengths=Lengths(prompt_words=64, content_tokens=64), rounds=5, warmup=1, scaling=SCALING,
                         scaling_rounds=3, memory_arms=("choreographed", "baseline", "baseline+prefix", "hf")),
}


def memory_arms(cfg: BenchConfig, device) -> list[str]:
    return [fast_arm(device) if a == "choreographed" else a for a in cfg.memory_arms]


def _x(value: float, bound: float | None = None) -> str:
    return f"{value:.2f}x" + ("" if bound is None else f" (bound {bound:.1f}x, {100 * value / bound:.0f}%)")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _rss(m: dict | None) -> str:
    return "-" if not m else f"{m['rss_peak'] / 2**20:.0f} MiB (+{m['rss_delta'] / 2**20:.0f})"


def table_rows(figures: dict, memory: dict) -> list[list[str]]:
    """One row per shape: speed-ups of the choreographed arm over each other arm, and peak memory."""
    rows = []
    for label, f in figures.items():
        base = f["speedups"]["baseline"]
        mem = memory.get(label, {})
        paper = PAPER.get(label)
        rows.append([
            label, _x(base["e2e"], base["e2e_bound"]), _x(base["ttft"], base["ttft_bound"]),
            " / ".join(_x(f["speedups"][a]["e2e"]) for a in ("baseline+prefix", "hf") if a in f["speedups"]) or "-",
            "-" if paper is None else f"{paper['e2e']:.2f}x / {paper['ttft']:.1f}x",
            " vs ".join(_rss(mem.get(a)) for a in (f["fast"], "baseline")) if mem else "-",
            " vs ".join(_mib(f["runs"][a][0]["kv_peak_bytes"]) for a in (f["fast"], "baseline")),
        ])
    return rows


COLUMNS = ["workflow", "end-to-end speed-up vs baseline", "TTFT speed-up vs baseline",
           "end-to-end vs baseline+prefix / hf", "paper (A100) e2e / TTFT",
           "peak RSS (+ above loaded model): choreographed vs baseline", "peak KV cache: choreographed vs baseline"]


def measure_shape(model: Model, shape: Shape, arms: Sequence[str], *, lengths: Lengths, rounds: int,
                  warmup: int) -> dict:
    """Runs, identity check and speed-ups of the choreographed arm over every other arm, for one shape."""
    runs = compare(model, shape, arms=arms, lengths=lengths, rounds=rounds, warmup=warmup)
    check_identical(runs)
    fast = fast_arm(model.spec.device) if fast_arm(model.spec.device) in arms else arms[0]
    slim = {a: [{k: v for k, v in r.items() if k != "generated"} for r in rs] for a, rs in runs.items()}
    return {"fast": fast, "runs": slim, "speedups": {a: speedups(runs, a, fast) for a in arms if a != fast}}


def plot_scaling(path: Path, *, title: str, axis: str, points: list[tuple[int, dict]]) -> Path:
    """Speed-up of the choreographed arm over the baseline against one size, with the token bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x for x, _ in points]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, marker, color in (("e2e", "o", "tab:blue"), ("ttft", "s", "tab:green")):
        ax.plot(xs, [s[key] for _, s in points], marker + "-", color=color, label=f"{key} measured")
        ax.plot(xs, [s[f"{key}_bound"] for _, s in points], marker + ":", color=color, alpha=0.5,
                label=f"{key} token bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(axis)
    ax.set_ylabel("speed-up vs baseline (x)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(out: Path, *, model: Model, profile: str, figures: dict, memory: dict, scaling: dict,
                  command: str | None = None) -> Path:
    """``speedups.md``/``.json`` (one row per shape) and ``scaling_<axis>.png`` under ``out``."""
    from .provenance import provenance
    from .report import write_table

    cfg = BENCH_PROFILES[profile]
    contention = os.getloadavg()
    prov = provenance(model, seeds=None, sample_sizes={"rounds": cfg.rounds, "warmup": cfg.warmup,
                                                      **dataclasses.asdict(cfg.lengths)},
                      command=command, protocol=TEACHER, hf_protocol=HF_PROTOCOL, load_average=contention,
                      threads=torch.get_num_threads())
    notes = [
        f"Protocol: {TEACHER}; {cfg.lengths.prompt_words}-word synthetic prompts, "
        f"{cfg.lengths.content_tokens} content tokens per call. hf arm: {HF_PROTOCOL}.",
        "Speed-ups are medians over rounds of ratios measured side by side in the same round (arms interleaved); "
        "bound = tokens the baseline encodes / tokens the choreographed arm encodes (end-to-end: all forward-pass "
        "tokens; TTFT: tokens encoded before each call's first token, summed).",
        "TTFT = summed over sequential stages of the slowest call's time to first token; choreographed prompt "
        "messages are prefilled once and counted in end-to-end time, not in TTFT.",
        "Peak RSS: one subprocess per configuration (model loaded, one 2-token priming pass, VmHWM reset, one "
        "run); + is the growth above the RSS before the run. Peak KV: the store's peak rows in use x bytes per "
        "token.",
        f"Machine shared with other jobs: 1-min load average {contention[0]:.1f} on {os.cpu_count()} cores at "
        "the end of the run; absolute times are inflated, ratios are measured side by side.",
    ]
    write_table(out, "speedups", title="Performance: choreographed vs re-encoding vs Hugging Face (teacher-forced)",
                columns=COLUMNS, rows=table_rows(figures, memory),
                data={"figures": figures, "memory": memory, "scaling": scaling, "profile": profile},
                provenance=prov, notes=notes)
    titles = {"B": "tree of thoughts, V=4: proposals B", "V": "tree of thoughts, B=4: voters V",
              "A": "parallel debate, 3 rounds: agents A"}
    for axis, points in scaling.items():
        plot_scaling(out / f"scaling_{axis}.png", title=titles.get(axis, axis), axis=axis, points=points)
    return out / "speedups.md"


def remeasure_memory(out: Path, model: Model, *, model_path: str | None = None) -> Path:
    """Peak memory again for every shape in ``out/speedups.json``; timings are kept as measured."""
    stored = json.loads((Path(out) / "speedups.json").read_text())
    data, timed = stored["data"], stored["provenance"]
    cfg = BENCH_PROFILES[data["profile"]]
    memory = {}
    for shape in cfg.shapes:
        if shape.label in data["figures"]:
            data["figures"][shape.label].setdefault("fast", fast_arm(model.spec.device))
            memory[shape.label] = {a: measure_memory(shape, a, cfg.lengths, model_path=model_path)
                                   for a in memory_arms(cfg, model.spec.device)}
    command = f"{' '.join(sys.argv)} (timings: `{timed.get('command')}` at {timed.get('date')})"
    return write_results(Path(out), model=model, profile=data["profile"], figures=data["figures"], memory=memory,
                         scaling={k: [tuple(p) for p in v] for k, v in data["scaling"].items()}, command=command)


def bench(model: Model, *, profile: str, results_dir: Path, model_path: str | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Measure every shape of a profile, write ``results_dir/performance/`` (table, JSON, plots)."""
    cfg = BENCH_PROFILES[profile]
    arms = available_arms(model.spec.device)
    out = Path(results_dir) / "performance"
    figures, memory, scaling = {}, {}, {}
    for shape in cfg.shapes:
        figures[shape.label] = measure_shape(model, shape, arms, lengths=cfg.lengths, rounds=cfg.rounds,
                                             warmup=cfg.warmup)
        log(f"{shape.label}: {json.dumps({a: round(s['e2e'], 2) for a, s in figures[shape.label]['speedups'].items()})}")
    for axis, shapes in cfg.scaling.items():
        scaling[axis] = []
        for shape in shapes:
            f = measure_shape(model, shape, [fast_arm(model.spec.device), "baseline"], lengths=cfg.lengths, rounds=cfg.scaling_rounds,
                              warmup=0)
            scaling[axis].append((dict(shape.size)[axis], f["speedups"]["baseline"]))
            log(f"scaling {shape.label}: e2e {f['speedups']['baseline']['e2e']:.2f}x")
    if model.spec.device.type == "cpu":
        for shape in cfg.shapes:
            memory[shape.label] = {a: measure_memory(shape, a, cfg.lengths, model_path=model_path)
                                   for a in memory_arms(cfg, model.spec.device)}
            log(f"memory {shape.label}: {json.dumps({a: m['rss_delta'] for a, m in memory[shape.label].items()})}")
    write_results(out, model=model, profile=profile, figures=figures, memory=memory, scaling=scaling)
    return {"figures": figures, "memory": memory, "scaling": scaling}


def pass_costs(model: Model, *, sizes=(1, 8, 32, 128, 512), batches=(1, 8, 32), repeats: int = 3) -> dict:
    """Where a forward pass's time goes: seconds per prefill of S tokens and per decode step of B calls.

    Fits ``t(S) = fixed + per_token * S`` by least squares: ``fixed`` is what every pass pays (streaming
    the weights, Python and kernel launches), so a call of few tokens cannot run faster than ``fixed``.
    """
    ch = Choreographer(model)
    words = Synth(model.tokenizer, Lengths(prompt_words=2 * max(sizes))).prompt("pass")
    ids = model.tokenizer.encode(words, add_special_tokens=False)
    prefill = {}
    for n in sizes:
        text, times = model.tokenizer.decode(ids[:n]), []
        for _ in range(repeats):
            _sync(model)
            t0 = time.perf_counter()
            msg = ch.prefill(text, role="user")
            _sync(model)
            times.append(time.perf_counter() - t0)
            ch.free(msg)
        prefill[msg.length] = min(times)
    xs, ys = list(prefill), list(prefill.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    prompt = ch.prefill(model.tokenizer.decode(ids[:32]), role="user")
    step = {}
    for b in batches:
        calls = [Call(parents=[prompt], teacher_tokens=None, max_tokens=8, seed=i) for i in range(b)]
        passes0, t0 = ch.engine.forward_passes, time.perf_counter()
        msgs = ch.decode(calls)
        _sync(model)
        step[b] = (time.perf_counter() - t0) / (ch.engine.forward_passes - passes0)
        ch.free(*msgs)
    return {"prefill_s": prefill, "fixed_s": my - slope * mx, "per_token_s": slope, "decode_step_s": step}


def write_pass_costs(out: Path, model: Model, costs: dict) -> Path:
    from .provenance import provenance
    from .report import write_table

    rows = [[f"prefill, S={s}", f"{1000 * t:.0f} ms", f"{1000 * (costs['fixed_s'] + costs['per_token_s'] * s):.0f} ms"]
            for s, t in costs["prefill_s"].items()]
    rows += [[f"decode step, B={b} calls", f"{1000 * t:.0f} ms", "-"] for b, t in costs["decode_step_s"].items()]
    notes = [f"Least-squares fit t(S) = {1000 * costs['fixed_s']:.0f} ms + {1000 * costs['per_token_s']:.2f} ms x S: "
             "the fixed part is paid by every forward pass, so a choreographed call that encodes a few header "
             "tokens cannot be faster than it, whatever the token bound says.",
             f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)."]
    return write_table(out, "pass_cost", title="Cost of one forward pass (choreographed engine, torch attention)",
                       columns=["pass", "measured (min of repeats)", "affine fit"], rows=rows, data=costs,
                       provenance=provenance(model, seeds=None, sample_sizes={"repeats": 3}), notes=notes)


def register(sub) -> None:
    """``choreo bench``: measure the performance shapes and write results/performance/."""
    p = sub.add_parser("bench", help="time to first token, end-to-end time and peak memory per workflow shape")
    p.add_argument("--profile", default="small", choices=sorted(BENCH_PROFILES), help="sizes (default: small)")
    p.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--results-dir", default="results", help="where performance/ goes (default: results/)")
    p.add_argument("--passes-only", action="store_true", help="only measure the cost of one forward pass")
    p.add_argument("--memory-only", action="store_true",
                   help="re-measure peak memory for the shapes of an existing speedups.json and rewrite the table")
    p.set_defaults(func=_bench_command)


def _bench_command(args) -> int:
    from .model import load_model

    model = load_model(args.model, device=args.device)
    out = Path(args.results_dir) / "performance"
    if args.memory_only:
        remeasure_memory(out, model, model_path=args.model)
        print((out / "speedups.md").read_text())
        return 0
    if not args.passes_only:
        bench(model, profile=args.profile, results_dir=Path(args.results_dir), model_path=args.model)
        print((out / "speedups.md").read_text())
    print(write_pass_costs(out, model, pass_costs(model)).read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m choreo.perf bench ...`` (the same as ``choreo bench ...``)."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("{"):  # a memory-measurement subprocess
        _child(json.loads(argv[0]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m choreo.perf")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
