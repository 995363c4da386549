"""GPU benchmark: one LoRA optimizer step of the blockage fine-tuning, with the torch backend (gather + SDPA
under autograd) against the fused kernel's forward and backward (``attention="triton"``).

The model is SmolLM2-135M's architecture with seeded random weights in bf16 (``choreo.model.random_model``:
$CHOREO_TOKENIZER names a checkpoint directory with its config and tokenizer, default the embedded model's).
Its traces are the blockage task's greedy baseline traces, collected once; a step replays each with teacher
forcing and gradients through the cache, then AdamW. Both backends first take one step from the same adapter
and must agree on the loss.

Run: ``pytest tests/kernels/bench_finetune_step.py -m gpu --benchmark-group-by=group``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.bench,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA"),
]

N_TRACES = 8  # workflow instances per optimizer step (the paper's batch is 4-8)


DEVICE = "cuda"


@functools.cache
def _setup():
    from choreo.model import random_model
    from choreo.recovery import collect_traces

    model = random_model(os.environ.get("CHOREO_TOKENIZER") or None, device=DEVICE)
    traces, _ = collect_traces(model, n=N_TRACES, split="train", seed=0)
    return model, traces


def _step_fn(attention: str):
    """A zero-argument optimizer step over the traces, and the first step's loss."""
    from choreo.engine import Choreographer
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
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return total

    return step, step()


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_finetune_step_speed(benchmark, attention):
    import triton

    torch_loss = _step_fn("torch")[1]
    step, first_loss = _step_fn(attention)
    assert abs(first_loss - torch_loss) <= 2e-2 * abs(torch_loss), (first_loss, torch_loss)
    model, traces = _setup()
    torch.cuda.reset_peak_memory_stats()
    benchmark.group = "finetune step"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        attention=attention, device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        model=model.spec.name, traces=len(traces), decoded_tokens=sum(len(e.tokens) for t in traces for e in t),
        seconds_per_step=benchmark.stats.stats.median, first_loss=first_loss, torch_first_loss=torch_loss,
        peak_mem_mib=torch.cuda.max_memory_allocated() / 2**20,
    )
