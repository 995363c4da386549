"""Host cost of the fused kernel's launches in one forward pass, kernels not run.

A small model's forward pass on a GPU is bound by the host: 30 layers of launches, and the kernel of each
layer finishes before the next is issued. The engine checks its tables and prepares the launch once per pass
(``prepare_launch``) and runs it in every layer (``run_launch``); ``segment_attention`` checks everything at
every call. Here both run on the CPU with the kernel launches replaced by no-ops, so that what is timed is the
Python and torch work around them: a pass of ``LAYERS`` layers, SmolLM2-135M's heads (H 9, Hkv 3, D 64), one call
of 36 new tokens over 72 cached keys (a replay of the LoRA step's traces). On the CPU the table checks include
the value checks, which CUDA skips.

Run: ``pytest tests/kernels/bench_launch_host_cost.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytestmark = pytest.mark.bench

LAYERS = 30
B, H, HKV, S, D, N = 1, 9, 3, 36, 64, 1024


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_kernels(monkeypatch):
    import triton_kernels
    import triton_kernels.segment_attention  # noqa: F401 (the module, not the function of that name)

    module = sys.modules["triton_kernels.segment_attention"]
    for name in ("_attn_fwd", "_merge_splits_kernel"):
        monkeypatch.setattr(module, name, _NoLaunch())
    for owner in (module, triton_kernels):  # the GPU's tiles, not the interpreter's
        monkeypatch.setattr(owner, "interpreter_active", lambda: False)
    monkeypatch.setattr(module, "is_available", lambda device=None: True)


def _layers():
    gen = torch.Generator().manual_seed(0)
    qs = [torch.randn(B, H, S, D, generator=gen) for _ in range(LAYERS)]
    ks = [torch.randn(HKV, N, D, generator=gen) for _ in range(LAYERS)]
    vs = [torch.randn(HKV, N, D, generator=gen) for _ in range(LAYERS)]
    return qs, ks, vs


@pytest.mark.parametrize("path", ["engine", "segment_attention"])
def test_launch_host_cost_per_pass(benchmark, no_kernels, path):
    from choreo.attention import AttentionPlan, triton_attention
    from triton_kernels import launch_config, segment_attention

    qs, ks, vs = _layers()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2) / D)
    fields = dict(segments=(((0, 72, 5),),), own_start=(200,), own_past=(0,), new_len=(S,))

    def one_pass():
        plan = AttentionPlan(**fields)  # a new pass: nothing prepared yet
        if path == "engine":
            return [triton_attention(plan, q, k, v, inv_freq, D ** -0.5) for q, k, v in zip(qs, ks, vs)]
        cfg = launch_config(S * H // HKV, D, torch.float32)
        tables = plan.kernel_tables("cpu", cfg.block_n)  # the six tables and the tiles, by name
        return [segment_attention(q, k, v, **tables, inv_freq=inv_freq, scale=D ** -0.5, config=cfg,
                                  max_own_len=plan.max_own_len) for q, k, v in zip(qs, ks, vs)]

    outs = benchmark(one_pass)
    assert len(outs) == LAYERS and all(o.shape == (B, H, S, D) for o in outs)
    benchmark.extra_info.update(layers=LAYERS, us_per_layer=benchmark.stats.stats.median / LAYERS * 1e6)
