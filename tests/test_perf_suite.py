"""The performance suite's helpers (suites/performance): rounds under a disabled benchmark, the device in
machine_info, the model the memory subprocesses load, what the decode-throughput benchmark times."""

from __future__ import annotations

import types

import pytest
import torch

from choreo import perf
from suites.performance import conftest as performance
from suites.performance import test_engine_bench as engine_bench
from suites.performance import test_performance as performance_table


class FakeBenchmark:
    """What ``timed_rounds`` uses of pytest-benchmark's fixture."""

    def __init__(self, disabled: bool):
        self.disabled, self.pedantic_calls = disabled, []

    def pedantic(self, target, *, setup, rounds, warmup_rounds, iterations):
        """Enabled: every round (untimed here); disabled: one setup and target, as pytest-benchmark does."""
        self.pedantic_calls.append((rounds, warmup_rounds, iterations))
        out = None
        for _ in range(1 if self.disabled else warmup_rounds + rounds):
            setup()
            out = target()
        return out


@pytest.mark.parametrize("disabled", [False, True], ids=["enabled", "disabled"])
def test_timed_rounds_runs_every_round_when_the_benchmark_is_disabled(disabled):
    """--benchmark-disable and xdist make pedantic run once, cold: the side-by-side ratios need all rounds."""
    calls = []
    bench = FakeBenchmark(disabled)
    out = performance.timed_rounds(bench, lambda: calls.append("target") or len(calls),
                                   setup=lambda: calls.append("setup"), rounds=3, warmup=1)
    assert calls == ["setup", "target"] * 4 and out == 8
    assert bench.pedantic_calls == [(3, 1, 1)]  # the fixture is used either way (no "not used" warning)


def test_machine_info_names_the_models_device_not_a_present_gpu(monkeypatch):
    """The suite's model runs on the CPU: a visible GPU must not be named as the device."""
    from choreo.provenance import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = types.SimpleNamespace(stash=pytest.Stash())
    config.stash[performance.MODEL_DEVICES] = {"cpu"}
    info = {}
    performance.pytest_benchmark_update_machine_info(config, info)
    assert info["choreo"]["device"] == device_name("cpu") and info["choreo"]["model_devices"] == ["cpu"]
    empty = {}
    performance.pytest_benchmark_update_machine_info(types.SimpleNamespace(stash=pytest.Stash()), empty)
    assert empty["choreo"]["device"] == "no model loaded"


def test_suite_memory_loads_the_suites_model(monkeypatch):
    """Peak RSS is measured on --model's checkpoint, not on the embedded model."""
    seen = []
    monkeypatch.setattr(perf, "measure_memory", lambda shape, arm, lengths, *, model_path=None:
                        seen.append((arm, model_path)) or {})
    cfg = perf.BenchConfig(lengths=perf.Lengths(), memory_arms=("choreographed", "baseline"))
    out = performance_table.peak_memory(perf.make_shape("multiqa", k=2), cfg, torch.device("cpu"), "/ckpt")
    assert set(out) == {"choreographed[torch]", "baseline"}
    assert seen == [("choreographed[torch]", "/ckpt"), ("baseline", "/ckpt")]


def test_decode_throughput_times_no_prefill(tiny_gqa):
    """The prompt is encoded before the timed run: the Runner's run processes the calls' own tokens only."""
    ex = perf.StepwiseChoreographer(tiny_gqa)
    prompt = ex.prefill("Tell me something.", role="user")
    teacher = perf.Synth(tiny_gqa.tokenizer, perf.Lengths(content_tokens=4)).tokens("decode")
    alone = ex.decode(parents=[prompt], teacher_tokens=teacher)  # header + teacher + footer
    ex.free(alone)
    rate, stats = engine_bench.decode_rate(ex, prompt, teacher, 3)
    assert rate > 0 and stats.tokens_processed == 3 * alone.length
    assert stats.forward_passes == len(teacher) + 1  # header pass, len - 1 steps, closing pass: all 3 batched
    assert ex.memory()["tokens_used"] == prompt.length  # the calls' messages are freed; the prompt stays


@pytest.mark.parametrize("ratio, goal, expected", [
    (21.0, 20.0, "at the goal (+5.0%)"), (19.7, 20.0, "at the goal (-1.5%)"), (22.0, 20.0, "at the goal (+10.0%)"),
    (22.1, 20.0, "met"), (17.9, 20.0, "not met"), (10.8, 5.0, "met"), (4.4, 5.0, "not met")])
def test_a_ratio_within_the_run_to_run_spread_of_its_goal_reads_at_the_goal(ratio, goal, expected):
    """One run's ratio near its goal neither meets nor misses it: runs of the same code differ by about that much."""
    assert engine_bench.verdict(ratio, goal) == expected
    assert engine_bench.measured(21.014, [20.68, 21.014, 21.22], 2) == "21.01x (rounds 20.68-21.22x)"
