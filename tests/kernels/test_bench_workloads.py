"""The GPU benchmarks' computations, run small on the CPU: every workload kind, implementation, tile
configuration and backward tile of ``bench_segment_attention`` computes the attention it claims to time.

The benchmarks run only where CUDA is, and device time is short; a benchmark that builds the wrong workload
or asserts on a path that was never run wastes it. Here each of them runs at a tenth of its size (H 4, Hkv 2,
D 16, fp32, tens of keys) under the Triton interpreter, against the fp64 reference: the same workload builders,
implementations (FlexAttention eager instead of compiled) and configuration lists, so a GPU run only adds timing.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from tests.kernels.cases import DEVICE, fp64, index_tables, segment_table  # sets TRITON_INTERPRET first
from tests.kernels import bench_segment_attention as bench
from triton_kernels import interpreter_active, is_available
from triton_kernels.reference import dense_layout, segment_attention_ref

pytestmark = pytest.mark.skipif(not is_available(DEVICE) or DEVICE.type != "cpu",
                                reason="runs the benchmarks' computations under the Triton interpreter (CPU)")


def tiny(w: bench.Workload) -> bench.Workload:
    """``w`` at a tenth of its size or less, keeping what the benchmarks vary: decode or prefill, messages of the
    pool's size or one long message, per-message, shared or no deltas, a past of the call's own or none."""
    one_segment = w.msg_len == w.attended
    return dataclasses.replace(w, B=2, S=1 if w.S == 1 else 5, attended=32, msg_len=32 if one_segment else 8,
                               own_past=3 if w.own_past else 0)


@pytest.fixture
def small(monkeypatch):
    """The benchmark module at H 4, Hkv 2, D 16, fp32 (the interpreter's bf16 dots are wrong upstream), with
    FlexAttention run eagerly (compiling it on the CPU takes minutes and times nothing here)."""
    from torch.nn.attention.flex_attention import flex_attention

    for name, value in dict(H=4, HKV=2, D=16, DTYPE=torch.float32).items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "_compiled_flex", lambda: flex_attention)
    return bench


def reference(args: dict) -> torch.Tensor:
    return segment_attention_ref(**fp64(args)).float()


def test_every_workload_kind_is_covered():
    kinds = {(w.S == 1, w.msg_len == w.attended, w.deltas, w.own_past > 0) for w in bench.WORKLOADS}
    assert kinds == {(tiny(w).S == 1, tiny(w).msg_len == tiny(w).attended, w.deltas, tiny(w).own_past > 0)
                     for w in bench.WORKLOADS}
    assert {w.deltas for w in bench.WORKLOADS} == {"per-message", "shared", "none"}


@pytest.mark.parametrize("w", bench.WORKLOADS, ids=[w.name for w in bench.WORKLOADS])
def test_workload_builds_what_it_names(small, w):
    t = tiny(w)
    args = small.build_inputs(t, DEVICE)
    q, k, v = args["q"], args["k_cache"], args["v_cache"]
    seg_start, seg_len, seg_delta = args["seg_start"], args["seg_len"], args["seg_delta"]
    own_start, own_past, new_len = args["own_start"], args["own_past"], args["new_len"]
    n_pick = t.attended // t.msg_len
    assert q.shape == (t.B, small.H, t.S, small.D) and k.shape == v.shape and k.shape[0] == small.HKV
    assert seg_start.shape == (t.B, n_pick) and (seg_len == t.msg_len).all() and (new_len == t.S).all()
    assert (own_past == t.own_past).all()
    pool = t.pool_messages * t.msg_len
    assert (seg_start % t.msg_len == 0).all() and (seg_start + seg_len <= pool).all()
    for b in range(t.B):  # distinct messages per call, own rows past the pool and apart
        assert len(set(seg_start[b].tolist())) == n_pick
    assert (own_start >= pool).all() and (own_start.diff() >= t.own_past + t.S).all()
    moved_to = seg_start + seg_delta
    if w.deltas == "per-message":  # back to back from position 0
        assert (moved_to == torch.arange(n_pick) * t.msg_len).all()
    elif w.deltas == "shared":
        assert (seg_delta == pool).all()
    else:
        assert (seg_delta == 0).all()
    assert len(small.input_sets(t, DEVICE)) == 2  # no GPU L2 to fill: the two sets a round still cycles through
    assert not torch.equal(small.build_inputs(t, DEVICE, seed=1)["q"], q)


IMPL_CASES = [(w, impl) for w in bench.WORKLOADS for impl in bench.IMPLS if not bench.skip_reason(w, impl)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # FlexAttention's "eager mode is slow" warning
@pytest.mark.parametrize("w, impl", IMPL_CASES, ids=[f"{w.name}-{impl}" for w, impl in IMPL_CASES])
def test_each_timed_implementation_computes_the_attention(small, w, impl):
    t = tiny(w)
    args = small.build_inputs(t, DEVICE)
    layout = dense_layout(**index_tables(args), num_queries=t.S)
    out = small.make_impl(impl, t, args)()
    assert out.shape == args["q"].shape
    if impl != "sdpa_causal":
        torch.testing.assert_close(out, reference(args), atol=1e-4, rtol=1e-4)
        return
    # causal SDPA is the same amount of attention over contiguous keys: as many (query, key) pairs per call
    T = layout.key_rows.shape[1]
    causal_pairs = int(torch.ones(t.S, T, dtype=torch.bool).tril(T - t.S).sum())
    assert causal_pairs * t.B == int(layout.mask.sum())
    fn = small.make_impl(impl, t, args)
    k_own, v_own = fn.kv  # every call its own contiguous keys and values (no batch stride 0: no shared L2 rows)
    assert k_own.shape == (t.B, small.HKV, T, small.D) and k_own.is_contiguous() and k_own.stride(0) > 0
    assert not torch.equal(k_own[0], k_own[1])
    q = args["q"]
    out = fn()
    k, v = (c.repeat_interleave(small.H // small.HKV, 1).double() for c in (k_own, v_own))
    scores = torch.einsum("bhsd,bhtd->bhst", q.double(), k) / small.D ** 0.5
    scores = scores.masked_fill(~torch.ones(t.S, T, dtype=torch.bool).tril(T - t.S), float("-inf"))
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("w, cfg, splits", bench.TILES, ids=bench.TILE_IDS)
def test_each_swept_tile_configuration_computes_the_attention(small, w, cfg, splits):
    from triton_kernels import segment_attention, tile_table

    t = tiny(w)
    args = small.build_inputs(t, DEVICE)
    tiles = tile_table(**segment_table(args), block_n=cfg.block_n)
    out = segment_attention(**args, config=cfg, tiles=tiles, num_splits=splits)
    torch.testing.assert_close(out, reference(args), atol=1e-4, rtol=1e-4)


TRAIN_CASES = [(impl, *bench.BACKWARD_TILES[0]) for impl in bench.TRAIN_IMPLS] + [
    ("triton", *tiles) for tiles in bench.BACKWARD_TILES[1:]]


@pytest.mark.parametrize("impl, label, dq, dkdv", TRAIN_CASES, ids=[f"{i}-{label}" for i, label, *_ in TRAIN_CASES])
def test_training_steps_differentiate_at_the_same_point(small, monkeypatch, impl, label, dq, dkdv):
    """Each training implementation's step, and the kernel's at each backward tile, gives the dense-mask
    backend's gradients (``_assert_grads_close``, as the training benchmarks check before timing)."""
    import triton_kernels.segment_attention_backward as bwd

    default = bwd.backward_configs
    monkeypatch.setattr(bwd, "backward_configs", lambda *a, **k: tuple(
        mine or theirs for mine, theirs in zip((dq, dkdv), default(*a, **k))))
    t = tiny(bench.TRAIN_WORKLOADS[0])
    args = small.build_inputs(t, DEVICE)
    step = small._training_step(lambda a: small.make_impl(impl, t, a), args)
    if impl == "sdpa_causal":  # other attention, over keys and values of its own: q's gradient, finite
        dq, dk_store, dv_store = step()
        assert dq.shape == args["q"].shape and dq.isfinite().all() and dk_store is None and dv_store is None
        return
    small._assert_grads_close(step, lambda a: small.make_impl("sdpa_dense", t, a))
    theirs = torch.autograd.grad(bench.make_impl("sdpa_dense", t, step.args)(), step.leaves, step.cotangent)
    for mine, ref in zip(step(), theirs):  # tighter than the benchmarks' 5% at fp32
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_vs_base_loads_another_commits_kernels(small, tmp_path, monkeypatch):
    """``CHOREO_BASE_KERNELS``: a copy of triton_kernels imported as another package, named by its COMMIT file,
    computing what this checkout's computes."""
    import triton_kernels

    shutil.copytree(triton_kernels.__path__[0], tmp_path / "triton_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "COMMIT").write_text("abc1234\n")
    monkeypatch.setenv(bench.BASE_ENV, str(tmp_path))
    bench._base_kernels.cache_clear()
    try:
        base, commit = bench._base_kernels()
        assert commit == "abc1234" and base is not triton_kernels and base.__name__ == "triton_kernels_base"
        assert base.interpreter_active() == interpreter_active()
        t = tiny(bench.WORKLOADS[4])
        args = small.build_inputs(t, DEVICE)
        torch.testing.assert_close(bench._kernel_call(base, t, args)(), bench._kernel_call(triton_kernels, t, args)())
    finally:
        bench._base_kernels.cache_clear()


def test_vs_base_names_a_folder_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(bench.BASE_ENV, str(tmp_path))
    bench._base_kernels.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="no triton_kernels/__init__.py"):
            bench._base_kernels()
    finally:
        bench._base_kernels.cache_clear()
