"""Side-by-side measurement of the arms on a shape, and the cost of one forward pass.

``run_once`` runs one workflow instance under one arm; ``compare`` interleaves arms within each round, so
every ratio compares runs made under the same machine conditions. Two bounds put each speed-up in context:

- the *token bound*: tokens the slower arm encodes / tokens the faster arm encodes;
- the *pass-cost bound*: the same ratio of times predicted from the measured cost of one forward pass of S
  tokens (``pass_costs``), interpolated piecewise linearly between the measured sizes (``pass_time``), which
  charges every pass what a pass of its size costs: a pass of a few header tokens costs nearly what a one-token
  pass does (streaming the weights, launches), whatever the token bound says. Measured / pass-cost bound says
  how close the engine gets to what its passes allow. The affine fit ``t(S) = fixed + per_token * S`` is kept as a
  one-line summary only (``pass_cost.md`` gives how far it is off the measured passes).

Example::

    runs = compare(model, make_shape("tree_of_thoughts", B=8, V=4), arms=("choreographed[torch]", "baseline"),
                   lengths=Lengths(), rounds=3)
    speedups(runs, "baseline", "choreographed[torch]", cost=pass_costs(model))
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Sequence

import torch

from ..cache import Message
from ..checks import check_int
from ..calls import RAW, Call
from ..engine import Job
from ..model import Model
from ..runner import Runner
from .arms import HFSession, StepwiseChoreographer, fast_arm, make_executor, model_heads
from .shapes import Lengths, Shape, Synth


def _sync(model: Model) -> None:
    if model.spec.device.type == "cuda":
        torch.cuda.synchronize(model.spec.device)


def run_once(model: Model, shape: Shape, arm: str, synth: Synth, executor=None) -> dict:
    """One workflow instance under one arm: wall time, per-call figures, tokens and passes, KV peak.

    ``executor`` lets rounds reuse one executor (its KV buffers stay allocated, like a server's).
    ``stage_tokens`` lists, per sequential stage, the tokens each pass up to the stage's first tokens
    encodes (engine arms: the step's passes of first chunks, one batched pass or a few where their lengths differ
    much, ``first_chunk_passes``; ``hf``: one pass per call, in turn), as the executor counted them: a prefix
    that ``baseline+prefix`` reuses from its cache is not encoded, so not counted.
    ``pass_tokens`` counts the forward passes of the run by their number of tokens ({S: passes}); ``argmax`` holds,
    per call, each step's (argmax, relative top-2 logit gap) over the forced tokens (``check_identical``).
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
        encoded, argmax, sizes = session.first_pass_tokens, session.step_argmax, session.pass_tokens
    else:
        ex = executor or make_executor(model, arm)
        engine = ex.engine
        tok0, passes0 = engine.tokens_processed, engine.forward_passes
        engine.store.peak = engine.store.used
        ex.first_pass_tokens.clear()  # a reused executor keeps its earlier runs' counts
        ex.first_passes.clear()
        ex.step_argmax.clear()
        engine.pass_tokens = []
        t0 = time.perf_counter()
        # Unfused: each prompt message is encoded when it is created, in a pass of its own, before the calls
        # that read it (a live workflow whose messages arrive over time). Fused: prompts are encoded in the
        # first pass of the call that reads them (Runner's default; what a batch job gets).
        stages = Runner(ex, progress=False, fuse_prefills=fused).run([workflow])[0]
        _sync(model)
        wall = time.perf_counter() - t0
        tokens, kv_tokens = engine.tokens_processed - tok0, engine.store.peak
        passes = engine.forward_passes - passes0
        encoded, argmax, sizes = ex.first_pass_tokens, ex.step_argmax, engine.pass_tokens
        windows = ex.first_passes
    # Tokens each call encodes before its first token, as the executor recorded them: the header when its
    # parents are cached (choreographed), the serial prompt past any reused prefix (baseline+prefix), the
    # whole serial prompt (baseline, hf).
    if arm == "hf":
        stage_tokens = [[encoded[c["id"]] for c in s] for s in stages]
    else:
        stage_tokens = [windows[s[0]["id"]][1] for s in stages]  # a stage's calls start in one step
        if any(windows[c["id"]][0] != windows[s[0]["id"]][0] for s in stages for c in s):
            raise RuntimeError(f"{shape.label} ({arm}): the calls of a stage started in different steps")
    calls = [c for s in stages for c in s]
    return {
        "arm": arm, "shape": shape.label, "wall_s": wall,
        "ttft_sum_s": sum(max(c["ttft"] for c in s) for s in stages),  # summed over sequential stages
        "ttft_calls_s": [c["ttft"] for c in calls],
        "stages": len(stages), "calls": len(calls),
        "generated": [c["tokens"] for c in calls],
        "argmax": [argmax[c["id"]] for c in calls],  # per call: (argmax, relative top-2 gap) per step
        "call_prompt_tokens": [encoded[c["id"]] for c in calls],  # per call, as its executor counted them
        "prompt_tokens": sum(map(sum, stage_tokens)),  # tokens encoded before each stage's first tokens
        "stage_tokens": stage_tokens,
        "tokens_processed": tokens, "forward_passes": passes,
        "pass_tokens": {s: n for s, n in sorted(collections.Counter(sizes).items())},
        "kv_peak_tokens": kv_tokens, "kv_peak_bytes": kv_tokens * model.spec.kv_bytes_per_token,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(model.spec.device) if cuda else None,
        "cuda_base_bytes": cuda_base,  # allocated when the run began: weights, every executor's KV store
        # hf runs a stage's calls one after another: a call's first token also waits for the whole decodes of
        # the calls ahead of it, which no token or pass-cost bound of TTFT counts (``speedups`` gives none)
        "serial_calls": arm == "hf",
    }


def compare(model: Model, shape: Shape, *, arms: Sequence[str], lengths: Lengths, rounds: int = 3,
            warmup: int = 1) -> dict[str, list[dict]]:
    """Run every arm ``warmup + rounds`` times, interleaved within each round; returns timed runs per arm (a
    ``rounds`` below 1 or ``warmup`` below 0 is a ValueError naming it)."""
    rounds, warmup = check_int("rounds", rounds), check_int("warmup", warmup, minimum=0)
    synth = Synth(model.tokenizer, lengths)
    executors = {a: make_executor(model, a) for a in arms if a != "hf"}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(warmup + rounds):
        for arm in arms:
            result = run_once(model, shape, arm, synth, executors.get(arm))
            if r >= warmup:
                runs[arm].append(result)
    return runs


# Arms that compute the same attention over the same tokens, so whose step argmaxes must agree. Across families
# they differ by design: choreographed calls see parallel siblings at overlapping positions, a serial prompt does not.
def family(arm: str) -> str:
    """"choreographed" (any backend, prefills fused or not) or "re-encoding" (baseline, baseline+prefix, hf)."""
    return "choreographed" if arm.startswith("choreographed") else "re-encoding"


def tie_tolerance(dtype) -> float:
    """A relative top-2 logit gap (``arms.top2``) at most this counts as a float near-tie: two implementations of
    one computation may then pick either token (fp32/fp64: 1e-3; bf16: 0.25; fp16: 0.03)."""
    return max(1e-3, 32 * torch.finfo(dtype).eps)


def check_identical(runs: dict[str, list[dict]], *, tolerance: float = 1e-3) -> None:
    """What every arm computed agrees, call for call (AssertionError naming the arm, call and step otherwise):

    - every arm fed the same forced tokens;
    - within a ``family``, every step's argmax over the forced tokens is the same, except where either arm's
      relative top-2 logit gap is at most ``tolerance`` (a near-tie; ``tie_tolerance``);
    - ``baseline`` and ``hf`` encoded serial prompts of the same length before each call's first token (they build
      the same prompt ids: a baseline that dropped or added a parent would differ).
    """
    reference_arm, first = next(iter(runs.items()))
    for arm, results in runs.items():
        for res in results:
            if res["generated"] != first[0]["generated"]:
                raise AssertionError(f"arm {arm!r} generated other tokens than {reference_arm!r} on {res['shape']}")
    for group in {family(a) for a in runs}:
        arms = [a for a in runs if family(a) == group and "argmax" in runs[a][0]]
        for arm in arms[1:]:
            for res in runs[arm]:
                _same_argmax(runs[arms[0]][0], res, arms[0], arm, tolerance)
    if "baseline" in runs and "hf" in runs:
        b, h = runs["baseline"][0]["call_prompt_tokens"], runs["hf"][0]["call_prompt_tokens"]
        if b != h:
            raise AssertionError(f"baseline and hf encoded serial prompts of other lengths on {runs['hf'][0]['shape']}:"
                                 f" {b} vs {h} tokens per call")


def _same_argmax(ref: dict, res: dict, ref_arm: str, arm: str, tolerance: float) -> None:
    for call, (xs, ys) in enumerate(zip(ref["argmax"], res["argmax"], strict=True)):
        for step, ((a, gap_a), (b, gap_b)) in enumerate(zip(xs, ys, strict=True)):
            if a != b and min(gap_a, gap_b) > tolerance:
                raise AssertionError(
                    f"arm {arm!r} computed another argmax than {ref_arm!r} on {res['shape']}, call {call}, step {step}:"
                    f" {b} vs {a} (top-2 gaps {gap_b:.3g} and {gap_a:.3g}, not a near-tie): its attention differs")


def pass_time(cost: dict, S: int) -> float:
    """Seconds of one forward pass of ``S`` tokens: the measured passes (``cost["prefill_s"]``, {S: seconds})
    interpolated piecewise linearly in S, extrapolated along the last segment past the largest size and held at
    the smallest size's time below it. A cost without measured passes falls back to its affine summary line.

    Example: ``pass_time({"prefill_s": {1: 0.04, 8: 0.05}}, 4)`` -> about 0.0443.
    """
    measured = sorted((int(k), v) for k, v in (cost.get("prefill_s") or {}).items())
    if len(measured) < 2:
        return cost["fixed_s"] + cost["per_token_s"] * S
    if S <= measured[0][0]:
        return measured[0][1]
    i = next((i for i in range(1, len(measured)) if S <= measured[i][0]), len(measured) - 1)
    (x0, y0), (x1, y1) = measured[i - 1], measured[i]
    return y0 + (S - x0) * (y1 - y0) / (x1 - x0)


def model_seconds(run: dict, cost: dict) -> dict:
    """Times the pass cost predicts for a run: ``ttft`` (every pass up to each stage's first tokens, summed over
    stages) and ``e2e`` (every pass of the run), each pass charged ``pass_time`` of its size. A run recorded
    without its pass sizes (``pass_tokens``) is charged the affine line for ``e2e``: fixed x passes + per token x
    tokens."""
    ttft = sum(pass_time(cost, s) for stage in run["stage_tokens"] for s in stage)
    if run.get("pass_tokens"):
        e2e = sum(n * pass_time(cost, int(s)) for s, n in run["pass_tokens"].items())
    else:
        e2e = cost["fixed_s"] * run["forward_passes"] + cost["per_token_s"] * run["tokens_processed"]
    return {"ttft": ttft, "e2e": e2e}


def speedups(runs: dict[str, list[dict]], slow: str, fast: str, *, cost: dict | None = None) -> dict:
    """Median per-round speed-ups of ``fast`` over ``slow``, the token bounds, and (given the pass ``cost`` of
    ``pass_costs``) the pass-cost bounds ``e2e_model`` and ``ttft_model`` (``model_seconds``). An arm that runs a
    stage's calls one after another (``serial_calls``: ``hf``) gets no TTFT bounds: its TTFT includes decode steps."""
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
    check_identical(runs, tolerance=tie_tolerance(model.spec.dtype))
    fast = fast_arm(model.spec.device, **model_heads(model))
    fast = fast if fast in arms else arms[0]
    return summarize(runs, fast, cost=cost)


def summarize(runs: dict[str, list[dict]], fast: str, *, cost: dict | None = None) -> dict:
    """Speed-ups of ``fast`` over every other arm, and of ``fast`` with fused prefills over the baseline."""
    slim = {a: [{k: v for k, v in r.items() if k not in ("generated", "argmax")} for r in rs]
            for a, rs in runs.items()}
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
PASS_METHOD = ("one engine forward pass (Engine.step) over a job of S token ids already placed in the store: no "
               "tokenising, no message bookkeeping; fastest of {repeats} after a warm-up")


def time_pass(ch, ids: Sequence[int], *, repeats: int) -> float:
    """Fastest of ``repeats`` (after one warm-up) of one forward pass of ``ids`` through ``ch``'s engine, as the
    engine runs a pass: a root message of exactly ``len(ids)`` tokens, its rows reserved before the timer starts."""
    repeats = check_int("repeats", repeats)
    engine, model, times = ch.engine, ch.model, []
    for _ in range(repeats + 1):
        row = engine.store.alloc(len(ids))
        msg = Message(id=-2, role=RAW, parents=(), start=0, ids=list(ids), content=(0, len(ids)), text="", row=row)
        job = Job(msg=msg, segments=(), pending=list(ids), reserved=len(ids))
        _sync(model)
        t0 = time.perf_counter()
        engine.step([job])
        _sync(model)
        times.append(time.perf_counter() - t0)
        engine.store.free(row, len(ids))
    return min(times[1:])


def pass_costs(model: Model, *, sizes=(1, 2, 4, 8, 16, 32, 128, 512), batches=(1, 8, 32), repeats: int = 3) -> dict:
    """Where a forward pass's time goes: seconds per pass of S tokens (``time_pass``) and per decode step of B
    calls (one token each: the difference between two teacher-forced decodes, so the header and closing passes
    cancel).

    The bounds interpolate the measured passes (``pass_time``); the least-squares line ``t(S) = fixed +
    per_token * S`` over them is a summary, with ``fit_max_residual`` (the largest |fit / measured - 1|) saying how
    far it is off. A one-token pass is what every pass pays at least (streaming the weights, launches).
    """
    repeats = check_int("repeats", repeats)
    if not sizes or not batches:
        raise ValueError(f"pass_costs: sizes {tuple(sizes)!r} and batches {tuple(batches)!r} must each name at least "
                         "one size")
    for name, values in (("sizes", sizes), ("batches", batches)):
        for value in values:
            check_int(f"pass_costs: each of {name}", value)
    ch = StepwiseChoreographer(model)  # teacher-forced decodes take one pass per token, as sampling does
    words = Synth(model.tokenizer, Lengths(prompt_words=2 * max(sizes))).prompt("pass")
    ids = model.tokenizer.encode(words, add_special_tokens=False)
    if len(ids) < max(sizes):
        raise ValueError(f"pass_costs: the synthetic text has {len(ids)} tokens, fewer than the largest size "
                         f"{max(sizes)}")
    prefill = {n: time_pass(ch, ids[:n], repeats=repeats) for n in sorted(set(sizes))}
    fixed, per_token = fit_affine(list(prefill), list(prefill.values()))
    residual = {n: (fixed + per_token * n) / t - 1 for n, t in prefill.items()}
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
    worst = max(residual, key=lambda n: abs(residual[n]))
    return {"prefill_s": prefill, "pass_method": PASS_METHOD.format(repeats=repeats),
            "bound": "measured passes interpolated piecewise linearly in S",
            "fixed_s": fixed, "per_token_s": per_token, "fit_residual": residual,
            "fit_max_residual": {"S": worst, "residual": residual[worst]},
            "decode_step_s": step,
            "decode_step_method": f"(time of a parallel decode of B calls teacher-forced to {1 + STEPS} tokens - "
                                  f"time to 1 token) / the {STEPS} passes more it takes; fastest of {repeats} each",
            "repeats": repeats, "threads": torch.get_num_threads(), "attention": ch.attention}
