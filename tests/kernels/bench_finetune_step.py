"""GPU benchmark: one LoRA optimizer step of the blockage fine-tuning, with the torch backend (gather + SDPA
under autograd) against the fused kernel's forward and backward (``attention="triton"``); with
``CHOREO_BENCH_DEVICE=cpu``, the torch backend's step on the CPU.

The model is SmolLM2-135M's architecture with seeded random weights in bf16, fp32 on the CPU
(``choreo.model.random_model``: $CHOREO_TOKENIZER names a checkpoint directory with its config and tokenizer,
default the embedded model's).
Its traces are the blockage task's greedy baseline traces, collected once; a step replays each with teacher
forcing and gradients through the cache, then AdamW. Both backends first take one step from the same adapter
and must agree on the loss.

``test_finetune_step_profile`` runs one step of each backend under ``torch.profiler`` and writes where its host
and device time go (``profile_step``), for a step that timing alone shows only as slower.

Run: ``pytest tests/kernels/bench_finetune_step.py -m gpu --benchmark-group-by=group``; on the CPU,
``CHOREO_BENCH_DEVICE=cpu pytest tests/kernels/bench_finetune_step.py -k speed``.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch

# $CHOREO_BENCH_DEVICE=cpu times the torch backend's step on the CPU instead (the kernel's needs CUDA: under the
# Triton interpreter a step would take hours).
DEVICE = os.environ.get("CHOREO_BENCH_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.bench] + ([
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA"),
] if CUDA else [])

N_TRACES = 8  # workflow instances per optimizer step (the paper's batch is 4-8)


def _needs_cuda(attention: str) -> None:
    if attention == "triton" and not CUDA:
        pytest.skip("the kernel backend's step needs CUDA")


@functools.cache
def _setup():
    from choreo.model import random_model
    from choreo.recovery import collect_traces

    model = random_model(os.environ.get("CHOREO_TOKENIZER") or None, device=DEVICE)
    traces, _ = collect_traces(model, n=N_TRACES, split="train", seed=0)
    return model, traces


def _step_fn(attention: str):
    """A zero-argument optimizer step over the traces, and the first step's loss."""
    from choreo.choreographer import Choreographer
    from choreo.finetune import replay_loss
    from choreo.lora import add_adapter, trainable_parameters, unload_adapter

    model, traces = _setup()
    unload_adapter(model)
    add_adapter(model, rank=16, alpha=32, dropout=0.0, seed=0)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    executor = Choreographer(model, attention=attention)

    def step() -> float:
        executor.engine.grad = True
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for events in traces:  # one backward per replay, as training does
            loss = replay_loss(executor, events).loss
            (loss / len(traces)).backward()
            total += float(loss.detach()) / len(traces)
            executor.engine.store.detach_()
        opt.step()
        if CUDA:
            torch.cuda.synchronize()
        return total

    return step, step()


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_finetune_step_speed(benchmark, attention):
    import triton

    _needs_cuda(attention)
    torch_loss = _step_fn("torch")[1]
    step, first_loss = _step_fn(attention)
    assert abs(first_loss - torch_loss) <= 2e-2 * abs(torch_loss), (first_loss, torch_loss)
    model, traces = _setup()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = "finetune step"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        attention=attention, device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
        triton=triton.__version__, threads=torch.get_num_threads(),
        model=model.spec.name, traces=len(traces), decoded_tokens=sum(len(e.tokens) for t in traces for e in t),
        seconds_per_step=benchmark.stats.stats.median, first_loss=first_loss, torch_first_loss=torch_loss,
        peak_mem_mib=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None,
    )


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_step(attention: str, out_dir: Path | None = None, rows: int = 30) -> dict:
    """One optimizer step of ``attention``'s backend (after a warm one) under ``torch.profiler``: its wall time, the
    device's busy time (the sum of its kernels' self time), kernel launches, copies and synchronisations issued
    by the host, and the operators with the most self host time and the most self device time. Written to
    ``out_dir/finetune_step_profile_<attention>.txt`` when ``out_dir`` is given. Returns the counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _needs_cuda(attention)
    step, _ = _step_fn(attention)
    step()  # warm: every kernel variant the traces need compiled, the allocator's pools filled
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    events = prof.key_averages()

    def count(names):
        return sum(e.count for e in events if e.key in names)

    # the device's own events (kernels, copies, memsets), as the profiler's table totals them
    device = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    stats = dict(attention=attention, wall_s=wall, launches=count(LAUNCHES), syncs=count(SYNCS),
                 copies=count(("cudaMemcpyAsync", "cudaMemcpy")),
                 device_busy_s=sum(e.self_device_time_total for e in device) / 1e6)
    if out_dir is not None:
        model, traces = _setup()
        head = [f"One LoRA optimizer step ({len(traces)} traces, {model.spec.name}) with attention={attention!r} on "
                f"{torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}, under torch.profiler "
                f"(its overhead included): wall {wall:.3f} s, device busy {stats['device_busy_s']:.3f} s, "
                f"{stats['launches']} kernel launches, {stats['copies']} copies, {stats['syncs']} synchronisations."]
        tables = [events.table(sort_by="self_cpu_time_total", row_limit=rows)]
        if CUDA:
            tables.append(events.table(sort_by="self_device_time_total", row_limit=rows))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"finetune_step_profile_{attention}.txt").write_text("\n\n".join(head + tables) + "\n")
    return stats


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_finetune_step_profile(attention):
    """Where one step's time goes, per backend ($CHOREO_PROFILE_DIR: where to write the tables)."""
    out = os.environ.get("CHOREO_PROFILE_DIR")
    stats = profile_step(attention, Path(out) if out else None)
    print(stats)
    if CUDA:
        assert stats["launches"] > 0 and 0 < stats["device_busy_s"] <= stats["wall_s"] * 1.05, stats
    else:
        assert stats["wall_s"] > 0
