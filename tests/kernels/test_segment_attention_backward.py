"""Backward pass of the segment-attention kernel vs autograd through the fp64 reference.

Gradients dq, dk, dv of <out, g> for a random cotangent g. Tolerance as for the forward (flash-attention's
tests, ``cases.error_bound``): the kernel's error against fp64 is at most 2x PyTorch's own error at the input dtype
(autograd through the einsum reference at that dtype), plus twice the dtype's rounding at the gradient's size,
plus at fp32 ``cases.FP32_GRAD_ULPS`` ulps of it (the backward recomputes P = exp2(s - lse) from fp32 s and lse).
"""

import contextlib
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kernels.cases import (AWKWARD, CUDA, DEVICE, EXAMPLES, FP32_GRAD_ULPS, QKV, Case,  # sets TRITON_INTERPRET
                                 cases, error_bound, index_tables, read_rows, segment_table)
from triton_kernels import LaunchConfig, interpreter_active, is_available, launch_config, segment_attention
from triton_kernels.reference import dense_layout, rope_shift, segment_attention_ref
from triton_kernels.segment_attention import LOG2E
from triton_kernels.segment_attention_backward import backward_configs

pytestmark = pytest.mark.skipif(
    not is_available(DEVICE),
    reason="no CUDA, and triton_kernels was imported before TRITON_INTERPRET=1 was set (set it in conftest)",
)

# Examples per (dtype, head dim): the forward's (cases.EXAMPLES) halved, as the backward costs ~2x the forward.
BACKWARD_EXAMPLES = max(2, EXAMPLES // 2)


def gradients(fn, args, dtype, cotangent, **kwargs):
    """(out, dq, dk, dv) of <fn(**args), cotangent> with q, k_cache, v_cache of ``args`` (``Case.tensors``) cast to
    ``dtype``."""
    leaves = {name: args[name].detach().to(dtype).requires_grad_() for name in QKV}
    out = fn(**{**args, **leaves}, **kwargs)
    (out.to(cotangent.dtype) * cotangent).sum().backward()
    return (out, *(leaves[name].grad for name in QKV))


@contextlib.contextmanager
def deterministic_algorithms(mode: bool = True):
    """``torch.use_deterministic_algorithms(mode)`` inside the block, the previous setting restored after.

    Tests that compare dk / dv bit for bit between two backward passes run them inside this block: by default
    dkdv adds its partials into the store's gradient with fp32 atomics, whose order (so the rounding) varies from
    run to run on a GPU wherever two programs write the same row (repeated or overlapping segments)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(mode)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def check_gradients(case: Case, *, args: dict | None = None, score_bound: float = 0.0, deterministic: bool = False,
                    **kwargs):
    """The kernel's gradients (under ``torch.use_deterministic_algorithms(deterministic)``) against autograd through
    the fp64 reference, within 2x PyTorch's own error at the dtype. Returns them, (out, dq, dk, dv). args: the
    case's tensors (``Case.tensors``), or others of the same shapes. score_bound: a bound on |scaled score| in
    log2 units where it is far above 1: P = exp2(s - lse), recomputed from fp32 s and lse of that size, carries
    a relative error of a few ulps of it, added to the floor."""
    args = case.tensors() if args is None else args
    q = args["q"]
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(DEVICE)
    scale = kwargs.get("scale")
    with deterministic_algorithms(deterministic):  # the references below use matmuls: cuBLAS refuses the mode
        out, *grads = gradients(segment_attention, args, case.dtype, g.to(case.dtype), **kwargs)
    _, *ref = gradients(segment_attention_ref, args, torch.float64, g.double(), scale=scale)
    _, *pt = gradients(segment_attention_ref, args, case.dtype, g.to(case.dtype), upcast=False, scale=scale)
    assert out.requires_grad
    new_len = args["new_len"].cpu()
    cancelled = cancellation_size(args, g, scale)
    for name, mine, gold, theirs in zip(("dq", "dk", "dv"), grads, ref, pt):
        assert mine.dtype == case.dtype and mine.shape == gold.shape
        assert not mine.isnan().any(), f"{name} has NaN for {case}"
        if not gold.numel():
            continue
        err = (mine.double() - gold).abs().max().item()
        err_pt = (theirs.double() - gold).abs().max().item()
        bound = error_bound(gold, err_pt, case.dtype, fp32_ulps=FP32_GRAD_ULPS,
                            extra=4 * score_bound * torch.finfo(torch.float32).eps,
                            cancelled=cancelled if name != "dv" else 0.0)
        assert err <= bound, (f"{name}: kernel error {err:.3g} > {bound:.3g} (2 x PyTorch's {err_pt:.3g} + floor) "
                              f"for {case}")
        if name != "dq":  # store rows no call reads get exactly zero gradient
            assert (mine[:, ~read_rows(case, mine.shape[1])] == 0).all(), f"{name} is non-zero on rows nobody read"
    for b in range(q.shape[0]):  # padding query rows get exactly zero gradient
        assert (grads[0][b, :, int(new_len[b]):] == 0).all(), f"call {b}: dq rows >= new_len are not zero"
    return (out, *grads)


def cancellation_size(args: dict, cotangent: torch.Tensor, scale: float | None) -> float:
    """A bound on the terms dq and dk subtract before they multiply a key or query: scale * |dP_ij| * |k_j| (or
    |q_i|), with |dP_ij| = |do_i . v_j| <= |do_i| |v_j|. The kernel forms dS = P * (dP - D_i) in fp32 at every
    dtype, and where a row attends a single key dP and D_i are the same number, so the exact dq and dk are zero
    and their error is the fp32 rounding of that subtraction alone (on an H200, dq 4.3e-7 for one fp32 D-128 row
    whose own key was its only one; exactly zero in the interpreter)."""
    q, k, v = (args[name].double() for name in QKV)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dp = cotangent.double().norm(dim=-1).max() * v.norm(dim=-1).max() if v.numel() and q.numel() else 0.0
    size = max(q.abs().max().item() if q.numel() else 0.0, k.abs().max().item() if k.numel() else 0.0)
    return float(scale * dp * size)


def test_single_key_rows_allow_the_fp32_rounding_of_their_cancellation():
    """The case a GPU drew (an H200, fp32 D 128: one row whose own key is its only one): the exact dq is zero, so
    the allowed error must come from the cancelled terms' size, not from the result's."""
    case = Case(segments=[[]], own_start=[1], own_past=[0], new_len=[1], S=1, H=1, Hkv=1, D=128)
    args = case.tensors()
    g = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(DEVICE)
    gold_dq = gradients(segment_attention_ref, args, torch.float64, g.double())[1]
    assert gold_dq.abs().max().item() < 1e-15  # exactly zero but for fp64 rounding
    bound = error_bound(gold_dq, 0.0, torch.float32, fp32_ulps=FP32_GRAD_ULPS,
                        cancelled=cancellation_size(args, g, None))
    assert 4.35e-7 <= bound < 1e-3  # the GPU's error fits; the bound is not vacuous
    check_gradients(case)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@settings(max_examples=BACKWARD_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_gradients_match_fp64_reference(dtype, D, data):
    check_gradients(data.draw(cases(dtype, D), label="case"))


@pytest.mark.parametrize("case", AWKWARD.values(), ids=AWKWARD.keys())
def test_gradients_awkward_cases(case):
    check_gradients(case)


@pytest.mark.parametrize("name",
                         ["decode-S1", "overlap-repeat-gap", "padding-segments-and-rows", "multi-tile-segments",
                          "continued-segments"])
def test_gradients_after_split_k_and_nested_forward(name):
    """The backward reads the row statistics of a split-K forward (merged on the host), of the nested-loop
    forward (no tile table: the backward cuts one) and of a forward over keys copied moved
    (``LaunchConfig.prerotate``) as it reads the flat forward's."""
    case = AWKWARD[name]
    cfg = launch_config(case.S * case.H // case.Hkv, case.D, case.dtype, interpreter_active())
    check_gradients(case, num_splits=3)
    check_gradients(case, config=dataclasses.replace(cfg, flat=False))
    check_gradients(case, config=dataclasses.replace(cfg, prerotate=True))


@pytest.mark.parametrize("scale", [0.3, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", ["decode-S1", "overlap-repeat-gap", "fp16-D128", "seqlen-97"])
def test_gradients_at_large_scale(name, dtype, scale):
    """An explicit softmax scale far above 1 / sqrt(D) (0.125 at D 64, 0.088 at D 128): scaled scores of tens,
    where the backward's P = exp2(s - L) is only as exact as the forward's L is for the same scores. With moved
    segments scored one way in the forward (the query counter-rotated) and another in the backward (the keys
    rotated), dV at 16-bit dtypes came out 2.5-6.6x PyTorch's error at scale 1.7; the forward of a launch that a
    backward follows now scores the keys moved first, as the backward does (``scoring_launch``). The floor grows
    with the largest scaled score (``check_gradients``' score_bound)."""
    case = dataclasses.replace(AWKWARD[name], dtype=dtype)
    check_gradients(case, scale=scale, score_bound=max_scaled_score(case.tensors(), scale))


def max_scaled_score(args: dict, scale: float) -> float:
    """The largest |score| in log2 units (|q . k| * scale * log2(e)) over the keys each query attends to, moved
    keys re-rotated: computed in fp64 from ``Case.tensors``."""
    q, k, inv_freq = args["q"], args["k_cache"], args["inv_freq"]
    layout = dense_layout(**index_tables(args), num_queries=q.shape[2])  # key_rows, key_delta (B, T); mask (B, S, T)
    keys = k[:, layout.key_rows].transpose(0, 1).double()  # (B, Hkv, T, D)
    keys = rope_shift(keys, layout.key_delta[:, None, :], inv_freq.double())
    keys = keys.repeat_interleave(q.shape[1] // k.shape[0], dim=1)  # (B, H, T, D)
    scores = q.double() @ keys.transpose(-1, -2) * scale  # (B, H, S, T)
    return scores.masked_fill(~layout.mask[:, None], 0.0).abs().max().item() * LOG2E


def test_scoring_launch_moves_the_keys_first_only_where_a_segment_moved():
    """The forward that a backward follows: the launch itself when nothing is moved; else prerotated keys, in the
    flat loop without TMA (a nested-loop launch gets the tile table the backward would cut)."""
    from triton_kernels.segment_attention import prepare_launch
    from triton_kernels.segment_attention_backward import scoring_launch

    moved = AWKWARD["overlap-repeat-gap"]
    unmoved = Case(segments=[[(0, 20, 0), (30, 5, 0)]], own_start=[40], own_past=[2], new_len=[3], S=3)
    for case in (moved, unmoved):
        args = case.tensors()
        cfg = launch_config(case.S * case.H // case.Hkv, case.D, case.dtype, interpreter_active())
        for config in (cfg, dataclasses.replace(cfg, flat=False)):
            launch = prepare_launch(**args, config=config)
            scoring = scoring_launch(launch)
            if case is unmoved:
                assert scoring is launch
                continue
            assert scoring.config == dataclasses.replace(cfg, prerotate=True)
            assert scoring.tiles is not None and scoring.tiles.moved
            if launch.tiles is not None:
                assert scoring.tiles is launch.tiles


@pytest.mark.parametrize("name", ["decode-S1", "overlap-repeat-gap", "padding-segments-and-rows", "all-calls-padding",
                                  "empty-segment-list-G0", "gqa-3-decode", "seqlen-97", "multi-tile-segments", "bf16",
                                  "continued-segments"])
def test_deterministic_gradients(name, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) dk / dv come from per-tile partials added in a fixed order
    (store rows read by two calls, twice by one call, or by a call and its own tokens; padding; G = 0): the
    reference's gradients, those of the atomic path up to the order of fp32 additions, and the same bits on
    every run."""
    import triton_kernels.segment_attention_backward as bwd

    reduced = []
    reduce_partials = bwd._reduce_partials
    monkeypatch.setattr(bwd, "_reduce_partials", lambda *a: reduced.append(a[0].shape) or reduce_partials(*a))
    case = AWKWARD[name]
    first = check_gradients(case, deterministic=True)
    assert len(reduced) == 2, "the deterministic path did not run"  # dk and dv
    again = check_gradients(case, deterministic=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    atomic = check_gradients(case)
    assert len(reduced) == 4
    torch.testing.assert_close(first, atomic)


def test_padding_rows_with_garbage_do_not_leak():
    """NaN queries and a NaN cotangent on rows >= new_len change no gradient of the valid rows."""
    case = AWKWARD["padding-segments-and-rows"]
    args = case.tensors()
    g = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with deterministic_algorithms():
        clean = gradients(segment_attention, args, case.dtype, g)
    args["q"] = args["q"].clone()
    args["q"][0, :, 2:] = float("nan")  # call 0 has new_len 2
    args["q"][1] = float("nan")  # call 1 has new_len 0
    g[0, :, 2:] = float("nan")
    g[1] = float("nan")
    with deterministic_algorithms():
        dirty = gradients(segment_attention, args, case.dtype, g)
    for a, b in zip(clean[1:], dirty[1:]):
        assert not b.isnan().any()
        assert torch.equal(a, b)


# the lanes' inf and NaN, which the interpreter's numpy reports as it makes them
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2", "ignore:invalid value encountered in matmul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_far_negative_scores_keep_partial_tiles_finite(dtype):
    """Every score far below zero (each row's log2-sum-exp2 about -370): the lanes past a partial key tile's count,
    which dkdv masks only once after its loop, have P = exp2(0 - lse) = inf there; no gradient may see it."""
    case = Case(segments=[[(0, 65, 0), (70, 33, 0)], [(5, 17, 0)]], own_start=[110, 130], own_past=[49, 3],
                new_len=[2, 2], S=2, dtype=dtype)
    args = case.tensors()
    q, k = args["q"], args["k_cache"]
    gen = torch.Generator().manual_seed(5)
    k = (torch.rand(k.shape, generator=gen) + 1).to(k)  # every component positive ...
    q = (-40 * (torch.rand(q.shape, generator=gen) + 1)).to(q)  # ... and every query's negative
    # |q . k| <= D max|q| max|k|, scaled by the default 1 / sqrt(D) and log2(e)
    bound = case.D * q.abs().max().item() * k.abs().max().item() * case.D ** -0.5 * LOG2E
    out, *grads = check_gradients(case, args=dict(args, q=q, k_cache=k), score_bound=bound)
    assert all(t.isfinite().all() for t in (out, *grads))


@pytest.mark.parametrize("name", ["overlap-repeat-gap", "multi-tile-segments", "decode-S1", "gqa-4-to-1"])
def test_unread_store_rows_ignore_garbage(name):
    """NaN keys and inf values in store rows no call reads change no gradient: dq, and dk / dv on the rows read
    (the rows nobody read get zero either way)."""
    from tests.kernels.test_segment_attention import with_garbage_in_unread_rows

    case = AWKWARD[name]
    args = case.tensors()
    g = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with deterministic_algorithms():
        clean = gradients(segment_attention, args, case.dtype, g)
        dirty = gradients(segment_attention, with_garbage_in_unread_rows(case, args), case.dtype, g)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


def test_unmoved_launch_gradients():
    """The backward of a launch with no moved segment skips the rotations (dq's key tiles, dkdv's key tile and
    its gradient): the reference's gradients, and bit for bit those of the rotating kernels."""
    from tests.kernels.test_segment_attention import UNMOVED
    from triton_kernels import tile_table

    args = UNMOVED.tensors()
    cfg = launch_config(UNMOVED.S * UNMOVED.H // UNMOVED.Hkv, UNMOVED.D, UNMOVED.dtype, interpreter_active())
    tiles = tile_table(**segment_table(args), block_n=cfg.block_n)
    assert not tiles.moved
    g = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with deterministic_algorithms():
        plain = gradients(segment_attention, args, UNMOVED.dtype, g, tiles=tiles)
        rotating = gradients(segment_attention, args, UNMOVED.dtype, g, tiles=dataclasses.replace(tiles, moved=True))
    for a, b in zip(plain, rotating):
        assert torch.equal(a, b)
    check_gradients(UNMOVED)


@pytest.mark.parametrize("name", ["large-deltas", "bf16", "overlap-repeat-gap"])
def test_half_angles_give_the_same_results(name, monkeypatch):
    """The rotations' cosines and sines evaluated on the D / 2 frequencies or once per column (``half_angles``, a
    choice of generated code): outputs and gradients bit for bit the same, in every kernel."""
    import sys

    import triton_kernels.segment_attention_backward as bwd

    fwd = sys.modules["triton_kernels.segment_attention"]
    case = AWKWARD[name]
    args = case.tensors()
    g = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    results = []
    for choice in (True, False):
        for module in (fwd, bwd):
            monkeypatch.setattr(module, "half_angles", lambda kernel, dtype, head_dim, choice=choice: choice)
        with deterministic_algorithms():
            results.append(gradients(segment_attention, args, case.dtype, g))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_store_rows_written_after_the_forward():
    """The engine writes later tokens' rows into the same store tensors between a layer's forward and the
    backward: allowed (the store is held by reference), and the gradients are those of the rows read."""
    case = AWKWARD["decode-S1"]
    args = case.tensors()
    extra = 16
    rows = torch.zeros(args["k_cache"].shape[0], extra, args["k_cache"].shape[2], device=DEVICE)
    k_big, v_big = (torch.cat([args[name], rows], 1) for name in ("k_cache", "v_cache"))
    q, k_big, v_big = (t.detach().requires_grad_() for t in (args["q"], k_big, v_big))
    k_store, v_store = k_big * 1.0, v_big * 1.0  # non-leaf, as in the engine
    with deterministic_algorithms():
        out = segment_attention(**dict(args, q=q, k_cache=k_store, v_cache=v_store))
        with torch.no_grad():
            k_store[:, -extra:] = 7.0  # rows no call read
            v_store[:, -extra:] = -7.0
        out.sum().backward()
        _, dq, dk, dv = gradients(segment_attention, dict(args, q=q), case.dtype, torch.ones_like(out))
    torch.testing.assert_close(q.grad, dq, rtol=0, atol=0)
    torch.testing.assert_close(k_big.grad[:, :-extra], dk, rtol=0, atol=0)
    assert (k_big.grad[:, -extra:] == 0).all() and (v_big.grad[:, -extra:] == 0).all()


def test_gradients_only_where_asked():
    """Only the kernels whose gradients autograd asks for run; their results are those of a full backward."""
    case = AWKWARD["gqa-3-decode"]
    args = case.tensors()
    with deterministic_algorithms():
        _, dq_all, dk_all, dv_all = gradients(segment_attention, args, case.dtype, torch.ones_like(args["q"]))
    q, k, v = (args[name] for name in QKV)
    q.requires_grad_()
    segment_attention(**args).sum().backward()
    assert k.grad is None and v.grad is None
    torch.testing.assert_close(q.grad, dq_all, rtol=0, atol=0)
    args = case.tensors()
    q, k, v = (args[name] for name in QKV)
    k.requires_grad_()
    v.requires_grad_()
    with deterministic_algorithms():
        segment_attention(**args).sum().backward()
    assert q.grad is None
    torch.testing.assert_close((k.grad, v.grad), (dk_all, dv_all), rtol=0, atol=0)
    with torch.no_grad():  # no graph, no statistics
        assert not segment_attention(**args).requires_grad


def test_backward_configs():
    fwd = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    dq, dkdv = backward_configs(fwd, 1024, 128, torch.bfloat16)
    assert (dq.block_m, dkdv.block_m, dkdv.num_stages) == (128, 128, 2)  # 3 stages would not fit shared memory
    assert backward_configs(fwd, 4, 128, torch.bfloat16)[1].num_stages == 3  # a decode block has room
    assert backward_configs(fwd, 1024, 64, torch.float16)[0].block_m == 128
    assert backward_configs(fwd, 1024, 128, torch.float32)[0].block_m == 16  # fp32 tiles hold twice the registers
    assert all(c.block_m == 16 for c in backward_configs(fwd, 4, 128, torch.bfloat16))  # decode: tl.dot's minimum
    assert backward_configs(fwd, 8, 64, torch.float32, interpret=True) == (
        LaunchConfig(block_m=16, block_n=64, num_warps=1, num_stages=1),) * 2
    for rows in (1, 100, 4096):  # the forward's tile table serves the backward
        assert all(c.block_n == fwd.block_n for c in backward_configs(fwd, rows, 64, torch.float16))


def test_no_query_rows_gives_zero_gradients():
    case = Case(segments=[[(0, 4, 1)]], own_start=[5], own_past=[3], new_len=[0], S=0)
    out, dq, dk, dv = gradients(segment_attention, case.tensors(), case.dtype,
                                torch.zeros(1, case.H, 0, case.D, device=DEVICE))
    assert out.shape == (1, case.H, 0, case.D) and dq.shape == out.shape
    assert (dk == 0).all() and (dv == 0).all() and dk.shape == (case.Hkv, 8, case.D)


def test_max_own_len_sizes_the_backward_grid():
    """A caller that knows the largest own_past + new_len (the engine) passes it and gets the same gradients
    without the backward reading it back; a value too small is refused (checked on CPU)."""
    case = AWKWARD["seqlen-97"]  # own_past 10 + new_len 97: several own key tiles
    args = case.tensors()
    g = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with deterministic_algorithms():
        plain = gradients(segment_attention, args, case.dtype, g)
        given_len = gradients(segment_attention, args, case.dtype, g, max_own_len=107)
    for a, b in zip(plain, given_len):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not CUDA:
        with pytest.raises(ValueError, match="max_own_len"):
            gradients(segment_attention, args, case.dtype, g, max_own_len=100)
    with pytest.raises(ValueError, match="max_own_len"):
        segment_attention(**args, max_own_len=-1)
