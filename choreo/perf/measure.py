"""Side-by-side measurement of the arms on a shape, and the cost of one forward pass.

``run_once`` runs one workflow instance under one arm; ``compare`` interleaves arms within each round, so
every ratio compares runs made under the same machine conditions. Two bounds put each speed-up in context:

- the *token bound*: tokens the slower arm encodes / tokens the faster arm encodes;
- the *pass-cost bound*: the same ratio of times predicted by the affine cost of one forward pass,
  ``t(S) = fixed + per_token * S`` (``pass_costs``), which charges every pass its fixed part (streaming the
  weights, launches). A call that encodes a few header tokens cannot beat ``fixed``, whatever the token
  bound says; measured / pass-cost bound says how close the engine gets to what its passes allow.

Example::

    runs = compare(model, make_shape("tree_of_thoughts", B=8, V=4), arms=("choreographed[torch]", "baseline"),
                   lengths=Lengths(), rounds=3)
    speedups(runs, "baseline", "choreographed[torch]", cost=pass_costs(model))
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from ..engine import Call
from ..model import Model
from ..runner import Runner
from .arms import HFSession, StepwiseChoreographer, fast_arm, make_executor
from .shapes import Lengths, Shape, Synth


def _sync(model: Model) -> None:
    if model.spec.device.type == "cuda":
        torch.cuda.synchronize(model.spec.device)


def run_once(model: Model, shape: Shape, arm: str, synth: Synth, executor=None) -> dict:
    """One workflow instance under one arm: wall time, per-call figures, tokens and passes, KV peak.

    ``executor`` lets rounds reuse one executor (its KV buffers stay allocated, like a server's).
    ``stage_tokens`` lists, per sequential stage, the tokens each pass up to the stage's first tokens
    encodes (engine arms: one batched pass; ``hf``: one pass per call, in turn), as the executor counted them
    (``first_pass_tokens``): a prefix that ``baseline+prefix`` reuses from its cache is not encoded, so not counted.
    """
    workflow = shape.workflow(synth)
    cuda = model.spec.device.type == "cuda"
    _sync(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.spec.device)
    cuda_base = torch.cuda.memory_allocated(model.spec.device) if cuda else None
    fused = arm.endswith("+fused")
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
        tokens, kv_tokens, passes = session.tokens_processed, session.peak_kv_tokens, session.forward_passes
        encoded = session.first_pass_tokens
    else:
        ex = executor or make_executor(model, arm)
        engine = ex.engine
        tok0, passes0 = engine.tokens_processed, engine.forward_passes
        engine.store.peak = engine.store.used
        ex.first_pass_tokens.clear()  # a reused executor keeps its earlier runs' counts
        t0 = time.perf_counter()
        # Unfused: each prompt message is encoded when it is created, in a pass of its own, before the calls
        # that read it (a live workflow whose messages arrive over time). Fused: prompts are encoded in the
        # first pass of the call that reads them (Runner's default; what a batch job gets).
        stages = Runner(ex, progress=False, fuse_prefills=fused).run([workflow])[0]
        _sync(model)
        wall = time.perf_counter() - t0
        tokens, kv_tokens = engine.tokens_processed - tok0, engine.store.peak
        passes = engine.forward_passes - passes0
        encoded = ex.first_pass_tokens
    # Tokens each call encodes before its first token, as the executor recorded them: the header when its
    # parents are cached (choreographed), the serial prompt past any reused prefix (baseline+prefix), the
    # whole serial prompt (baseline, hf).
    if arm == "hf":
        stage_tokens = [[encoded[c["id"]] for c in s] for s in stages]
    else:
        stage_tokens = [[sum(encoded[c["id"]] for c in s) + (s[0]["prefilled"] if fused else 0)] for s in stages]
    calls = [c for s in stages for c in s]
    return {
        "arm": arm, "shape": shape.label, "wall_s": wall,
        "ttft_sum_s": sum(max(c["ttft"] for c in s) for s in stages),  # summed over sequential stages
        "ttft_calls_s": [c["ttft"] for c in calls],
        "stages": len(stages), "calls": len(calls),
        "generated": [c["tokens"] for c in calls],
        "prompt_tokens": sum(map(sum, stage_tokens)),  # tokens encoded before each stage's first tokens
        "stage_tokens": stage_tokens,
        "tokens_processed": tokens, "forward_passes": passes,
        "kv_peak_tokens": kv_tokens, "kv_peak_bytes": kv_tokens * model.spec.kv_bytes_per_token,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(model.spec.device) if cuda else None,
        "cuda_base_bytes": cuda_base,  # allocated when the run began: weights, every executor's KV store
        # hf runs a stage's calls one after another: a call's first token also waits for the whole decodes of
        # the calls ahead of it, which no token or pass-cost bound of TTFT counts (``speedups`` gives none)
        "serial_calls": arm == "hf",
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


def model_seconds(run: dict, cost: dict) -> dict:
    """Times the affine pass cost predicts for a run: ``ttft`` (summed over stages) and ``e2e``."""
    a, b = cost["fixed_s"], cost["per_token_s"]
    return {"ttft": sum(a + b * s for stage in run["stage_tokens"] for s in stage),
            "e2e": a * run["forward_passes"] + b * run["tokens_processed"]}


def speedups(runs: dict[str, list[dict]], slow: str, fast: str, *, cost: dict | None = None) -> dict:
    """Median per-round speed-ups of ``fast`` over ``slow``, the token bounds, and (given the affine pass
    ``cost`` of ``pass_costs``) the pass-cost bounds ``e2e_model`` and ``ttft_model``. An arm that runs a stage's
    calls one after another (``serial_calls``: ``hf``) gets no TTFT bounds: its TTFT includes decode steps."""
    pairs = list(zip(runs[slow], runs[fast]))
    e2e = statistics.median(s["wall_s"] / f["wall_s"] for s, f in pairs)
    ttft = statistics.median(s["ttft_sum_s"] / f["ttft_sum_s"] for s, f in pairs)
    s0, f0 = pairs[0]
    bounded_ttft = not (s0.get("serial_calls") or f0.get("serial_calls"))  # see ``run_once``
    out = {
        "e2e": e2e, "ttft": ttft,
        "e2e_rounds": [s["wall_s"] / f["wall_s"] for s, f in pairs],
        "ttft_rounds": [s["ttft_sum_s"] / f["ttft_sum_s"] for s, f in pairs],
        "e2e_bound": s0["tokens_processed"] / f0["tokens_processed"],
    }
    if bounded_ttft:
        out["ttft_bound"] = s0["prompt_tokens"] / f0["prompt_tokens"]
    if cost is not None:
        ms, mf = model_seconds(s0, cost), model_seconds(f0, cost)
        out["e2e_model"] = ms["e2e"] / mf["e2e"]
        if bounded_ttft:
            out["ttft_model"] = ms["ttft"] / mf["ttft"]
    return out


def measure_shape(model: Model, shape: Shape, arms: Sequence[str], *, lengths: Lengths, rounds: int,
                  warmup: int, cost: dict | None = None) -> dict:
    """Runs, identity check and ``summarize`` for one shape."""
    runs = compare(model, shape, arms=arms, lengths=lengths, rounds=rounds, warmup=warmup)
    check_identical(runs)
    fast = fast_arm(model.spec.device) if fast_arm(model.spec.device) in arms else arms[0]
    return summarize(runs, fast, cost=cost)


def summarize(runs: dict[str, list[dict]], fast: str, *, cost: dict | None = None) -> dict:
    """Speed-ups of ``fast`` over every other arm, and of ``fast`` with fused prefills over the baseline."""
    slim = {a: [{k: v for k, v in r.items() if k != "generated"} for r in rs] for a, rs in runs.items()}
    out = {"fast": fast, "runs": slim,
           "speedups": {a: speedups(runs, a, fast, cost=cost) for a in runs if a != fast}}
    if f"{fast}+fused" in runs and "baseline" in runs:
        out["fused"] = speedups(runs, "baseline", f"{fast}+fused", cost=cost)
    return out


def fit_affine(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x``; returns (intercept, slope)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError(f"an affine fit needs at least two distinct x values, got {list(xs)}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


STEPS = 8  # one-token decode steps per timed decode of ``pass_costs``


def pass_costs(model: Model, *, sizes=(1, 8, 32, 128, 512), batches=(1, 8, 32), repeats: int = 3) -> dict:
    """Where a forward pass's time goes: seconds per prefill of S tokens and per decode step of B calls (one
    token each: the difference between two teacher-forced decodes, so the header and closing passes cancel).

    Fits ``t(S) = fixed + per_token * S`` by least squares over the prefill sizes (minimum of ``repeats``
    each): ``fixed`` is what every pass pays (streaming the weights, Python and kernel launches).
    """
    ch = StepwiseChoreographer(model)  # teacher-forced decodes take one pass per token, as sampling does
    words = Synth(model.tokenizer, Lengths(prompt_words=2 * max(sizes))).prompt("pass")
    ids = model.tokenizer.encode(words, add_special_tokens=False)
    prefill = {}
    for n in sizes:
        text, times = model.tokenizer.decode(ids[:n]), []
        for _ in range(repeats + 1):  # the first is a warm-up
            _sync(model)
            t0 = time.perf_counter()
            msg = ch.prefill(text, role="user")
            _sync(model)
            times.append(time.perf_counter() - t0)
            ch.free(msg)
        prefill[msg.length] = min(times[1:])
    fixed, per_token = fit_affine(list(prefill), list(prefill.values()))
    prompt = ch.prefill(model.tokenizer.decode(ids[:32]), role="user")
    teacher = ids[:1 + STEPS]

    def decode_s(b: int, n: int) -> tuple[float, int]:
        """(fastest seconds, passes) of a parallel decode of b calls teacher-forced to n tokens."""
        calls = [Call(parents=[prompt], teacher_tokens=teacher[:n], seed=i) for i in range(b)]
        ch.free(*ch.decode(calls))  # warm-up: a GPU compiles kernels for a new batch size on first use
        times = []
        for _ in range(repeats):
            _sync(model)
            passes0, t0 = ch.engine.forward_passes, time.perf_counter()
            msgs = ch.decode(calls)
            _sync(model)
            times.append(time.perf_counter() - t0)
            ch.free(*msgs)
        return min(times), ch.engine.forward_passes - passes0

    step = {}
    for b in batches:  # the header and closing passes (about 3B and 2B tokens) cancel in the difference
        (short, p_short), (long, p_long) = decode_s(b, 1), decode_s(b, 1 + STEPS)
        step[b] = (long - short) / (p_long - p_short)
    return {"prefill_s": prefill, "fixed_s": fixed, "per_token_s": per_token, "decode_step_s": step,
            "decode_step_method": f"(time of a parallel decode of B calls teacher-forced to {1 + STEPS} tokens - "
                                  f"time to 1 token) / the {STEPS} passes more it takes; fastest of {repeats} each",
            "repeats": repeats, "threads": torch.get_num_threads(), "attention": ch.attention}
