"""Engine benchmarks: time to first token over a cached parent, decode throughput under concurrency, and
the Runner's peak memory with 64 concurrent conversations (embedded model).

Goals (engine issue): (a) a call attending to ~1,000 cached parent tokens with a ~10-token header reaches
its first token >= 20x sooner choreographed than re-encoded (asserted: >= 10x, what the shared CPU shows;
the goal is reported in ``extra_info`` and ``engine.md``); (b) the Runner decodes >= 5x more tokens/s with
32 concurrent calls than with 1 (``DECODE_TIMED``: the prompt is prefilled before the timed region); (c) peak
RSS and KV bytes with 64 concurrent multi-turn instances are reported (and the KV peak is at most 64x one
instance's).
"""

from __future__ import annotations

import os
import statistics

import psutil
import pytest
import torch

import choreo
from choreo import perf
from choreo.perf.report import DECODE_TIMED, RUN_TO_RUN, engine_notes, verdict  # noqa: F401
from choreo.profiles import pick
from choreo.runner import RunStats

from .conftest import table_complete, timed_rounds

pytestmark = [pytest.mark.bench, pytest.mark.model]

PARENT_TOKENS = 1000
HEADER_PREFIX = "Summary in one line:"  # assistant header (3 tokens) + this prefix ~ 10 tokens
ROUNDS = {"smoke": 1, "small": 3, "paper": 5}
WARMUP = {"smoke": 0, "small": 1, "paper": 1}
DECODE_STEPS = {"smoke": 8, "small": 32, "paper": 64}
CONVERSATION_TOKENS = {"smoke": 4, "small": 16, "paper": 64}
CONCURRENT = 32
CONVERSATIONS = 64


def measured(ratio: float, rounds: list[float], digits: int) -> str:
    """The median ratio with the range of its rounds, e.g. '21.01x (rounds 20.68-21.22x)'."""
    return f"{ratio:.{digits}f}x (rounds {min(rounds):.{digits}f}-{max(rounds):.{digits}f}x)"


@pytest.fixture(scope="module")
def engine_raw():
    """The measurements behind each row (per-round pairs, figures), so every printed ratio can be recomputed."""
    return {}


ROWS = ("ttft", "throughput", "memory")  # the keys of engine_rows, one per benchmark below


@pytest.fixture(scope="module")
def engine_rows(request, model, profile, results_dir, engine_raw):
    """Rows gathered by the benchmarks below; written to results/performance/engine.md at the end, once every
    benchmark has measured its row in a run that was not interrupted (``table_complete``)."""
    rows: dict[str, list] = {}
    yield rows
    if table_complete(request, rows, ROWS, table="engine"):
        from choreo.provenance import provenance
        from choreo.report import command_line, write_table

        prov = provenance(model, seeds=None, sample_sizes={"rounds": pick(ROUNDS, profile),
                                                          "warmup": pick(WARMUP, profile)},
                          command=command_line(),  # as run: pytest, or choreo repro
                          load_average=os.getloadavg(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
        write_table(results_dir / "performance", "engine", title="Engine benchmarks (embedded model)",
                    columns=["benchmark", "measured", "goal", "met", "details"], rows=list(rows.values()),
                    data={"rows": rows, "raw": engine_raw, "profile": profile}, provenance=prov,
                    notes=engine_notes(prov))


def _parent_text(tokenizer, n: int) -> str:
    """Synthetic text of exactly ``n`` tokens (ordinary words)."""
    synth = perf.Synth(tokenizer, perf.Lengths(prompt_words=2 * n))
    ids = tokenizer.encode(synth.prompt("parent"), add_special_tokens=False)[:n]
    return tokenizer.decode(ids)


def test_ttft_cached_parent(benchmark, model, profile, engine_rows, engine_raw):
    """(a) One call over a ~1,000-token cached parent: choreographed vs re-encoding, side by side."""
    ch, bl = choreo.Choreographer(model), choreo.Baseline(model)
    text = _parent_text(model.tokenizer, PARENT_TOKENS)
    parent_ch = ch.prefill(text, role="user")
    parent_bl = bl.prefill(text, role="user")
    ttft = {"choreographed": [], "baseline": []}

    def setup():
        msg = bl.decode(parents=[parent_bl], prefix=HEADER_PREFIX, max_tokens=1)
        ttft["baseline"].append(msg.ttft)
        bl.free(msg)

    def target():
        msg = ch.decode(parents=[parent_ch], prefix=HEADER_PREFIX, max_tokens=1)
        ttft["choreographed"].append(msg.ttft)
        ch.free(msg)
        return msg

    ch.free(ch.decode(parents=[parent_ch], prefix=HEADER_PREFIX, max_tokens=1))  # warm the small-batch path
    rounds = pick(ROUNDS, profile)
    msg = timed_rounds(benchmark, target, setup=setup, rounds=rounds, warmup=pick(WARMUP, profile))
    pairs = list(zip(ttft["baseline"][-rounds:], ttft["choreographed"][-rounds:]))
    ratio = statistics.median(b / c for b, c in pairs)
    header = msg.content[0]
    benchmark.group = "engine ttft"
    benchmark.extra_info.update({
        "parent_tokens": parent_ch.length, "header_tokens": header, "ttft_s": ttft, "speedup": ratio,
        "bound": (parent_ch.length + header) / header, "goal": 20.0, "floor": 10.0, "load_average": os.getloadavg(),
    })
    benchmark.extra_info["goal_met"] = ratio >= 20
    engine_raw["ttft"] = {"rounds_baseline_choreographed_s": pairs, "speedup": "median of per-round ratios",
                          "parent_tokens": parent_ch.length, "header_tokens": header}
    # Two decimals: 19.96 must not print as the goal it missed.
    engine_rows["ttft"] = ["(a) TTFT, cached parent vs re-encoding", measured(ratio, [b / c for b, c in pairs], 2),
                           ">= 20x", verdict(ratio, 20.0),
                           f"{parent_ch.length} parent + {header} header tokens; median TTFT "
                           f"{statistics.median(c for _, c in pairs):.3f} s vs "
                           f"{statistics.median(b for b, _ in pairs):.2f} s"]
    # Asserted: what the 2-core CPU shows under contention (15-21x measured, see engine.md); the 20x goal is
    # reported in extra_info. Every forward pass pays a fixed weight-streaming cost (pass_cost.md), which
    # caps this ratio below the token bound.
    assert ratio >= 10, (f"time to first token over {parent_ch.length} cached tokens with a {header}-token header: "
                         f"{ratio:.1f}x (goal 20x, floor 10x); rounds {pairs}")


def decode_workflow(prompt, teacher: list[int]):
    """One call over an already encoded ``prompt``: the workflow prefills nothing inside the timed run."""
    async def one(ex):
        msg = await ex.decode(role="assistant", parents=[prompt], teacher_tokens=teacher, max_tokens=1)
        return len(msg.tokens)

    return one


def decode_rate(ex, prompt, teacher: list[int], n: int) -> tuple[float, RunStats]:
    """Generated tokens/s of ``n`` concurrent calls over ``prompt`` (``DECODE_TIMED``), and the Runner's stats."""
    runner = choreo.Runner(ex, progress=False)
    generated = sum(runner.run([decode_workflow(prompt, teacher)] * n))
    return generated / runner.stats.wall_s, runner.stats


def test_decode_throughput(benchmark, model, profile, engine_rows, engine_raw):
    """(b) Generated tokens/s of the Runner with 32 concurrent calls vs 1 (same calls, side by side)."""
    steps = pick(DECODE_STEPS, profile)
    synth = perf.Synth(model.tokenizer, perf.Lengths(prompt_words=16, content_tokens=steps))
    ex = perf.StepwiseChoreographer(model)
    prompt = ex.prefill(synth.prompt("throughput"), role="user")  # encoded once, outside every timed run
    teacher = synth.tokens("decode")
    rate = {1: [], CONCURRENT: []}

    def run(n: int) -> None:
        rate[n].append(decode_rate(ex, prompt, teacher, n)[0])

    rounds = pick(ROUNDS, profile)
    timed_rounds(benchmark, lambda: run(CONCURRENT), setup=lambda: run(1), rounds=rounds, warmup=pick(WARMUP, profile))
    ex.free(prompt)
    pairs = list(zip(rate[1][-rounds:], rate[CONCURRENT][-rounds:]))
    ratio = statistics.median(many / one for one, many in pairs)
    benchmark.group = "engine throughput"
    benchmark.extra_info.update({"steps": steps, "tokens_per_s": rate, "speedup": ratio, "goal": 5.0,
                                 "timed": DECODE_TIMED, "load_average": os.getloadavg()})
    benchmark.extra_info["goal_met"] = ratio >= 5
    engine_raw["throughput"] = {"rounds_tokens_per_s_1_and_concurrent": pairs, "concurrent": CONCURRENT,
                                "speedup": "median of per-round ratios", "steps": steps, "timed": DECODE_TIMED}
    engine_rows["throughput"] = [f"(b) decode tokens/s, {CONCURRENT} concurrent vs 1",
                                 measured(ratio, [m / o for o, m in pairs], 1), ">= 5x", verdict(ratio, 5.0),
                                 f"{steps} steps; median {statistics.median(o for o, _ in pairs):.1f} vs "
                                 f"{statistics.median(m for _, m in pairs):.1f} tokens/s"]
    assert ratio >= 5, f"{CONCURRENT} concurrent calls decode {ratio:.1f}x the tokens/s of 1 (goal 5x); rounds {pairs}"


def test_runner_memory(benchmark, model, profile, engine_rows, engine_raw):
    """(c) Peak RSS and KV bytes with 64 concurrent instances of a two-turn conversation."""
    lengths = perf.Lengths(prompt_words=24, content_tokens=pick(CONVERSATION_TOKENS, profile))
    synth = perf.Synth(model.tokenizer, lengths)
    workflow = perf.make_shape("conversation", turns=2).workflow(synth)
    ex = perf.StepwiseChoreographer(model)
    solo = choreo.Runner(ex, progress=False)
    solo.run([workflow])
    figures = {}

    def target():
        runner = choreo.Runner(ex, max_concurrent=CONVERSATIONS, progress=False)
        perf.trim_heap()  # else pages freed earlier but still resident serve the run without growing the RSS
        before = psutil.Process().memory_info().rss
        reset = perf.reset_peak_rss()
        runner.run([workflow] * CONVERSATIONS)
        figures.update(rss_before=before, rss_peak=perf.peak_rss(), peak_reset=reset,
                       kv_peak_tokens=runner.stats.peak_cache_tokens, max_batch=runner.stats.max_batch)

    benchmark.pedantic(target, rounds=1, warmup_rounds=0)
    per_token = model.spec.kv_bytes_per_token
    figures.update(rss_delta=max(figures["rss_peak"] - figures["rss_before"], 0),
                   kv_peak_bytes=figures["kv_peak_tokens"] * per_token,
                   kv_allocated_bytes=ex.memory()["bytes_allocated"],
                   solo_kv_peak_bytes=solo.stats.peak_cache_tokens * per_token)
    mib = lambda n: f"{n / 2**20:.0f} MiB"
    engine_rows["memory"] = [f"(c) Runner peak memory, {CONVERSATIONS} two-turn conversations",
                             f"RSS +{mib(figures['rss_delta'])}, KV peak {mib(figures['kv_peak_bytes'])}",
                             "report", "-",
                             f"KV allocated {mib(figures['kv_allocated_bytes'])} ({figures['kv_peak_tokens']} "
                             f"peak tokens; one instance alone {mib(figures['solo_kv_peak_bytes'])}); "
                             f"RSS peak {mib(figures['rss_peak'])}"]
    engine_raw["memory"] = dict(figures)
    benchmark.group = "engine memory"
    benchmark.extra_info.update({"instances": CONVERSATIONS, **figures, "load_average": os.getloadavg()})
    assert figures["max_batch"] >= CONVERSATIONS, f"only {figures['max_batch']} calls ever shared a pass"
    assert figures["kv_peak_tokens"] <= CONVERSATIONS * solo.stats.peak_cache_tokens, figures
    assert ex.memory()["tokens_used"] == 0, f"messages left in the cache after the run: {ex.memory()}"
