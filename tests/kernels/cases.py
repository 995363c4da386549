"""Shared cases of the segment-attention kernel tests: the ``Case`` record (its tensors are the kernel's arguments,
by name) with helpers that pick tables out of them, a Hypothesis strategy of random segment tables, and the awkward
cases by name.

Importing this module sets TRITON_INTERPRET=1 when there is no CUDA device, so it must be imported before
``triton_kernels`` (the test modules import it first).
"""

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# Tolerance, as flash-attention's tests set it: the kernel's error against the fp64 reference is at most twice
# PyTorch's own error at the input dtype (the einsum-and-softmax reference computed at that dtype, flash-attention's
# ``attention_ref(upcast=False)``) plus twice the dtype's rounding at the result's size (``rounding_floor``:
# flash-attention's ``fwd_atol``, and at least twice the rounding of the exact result to the dtype). SDPA at the
# dtype is no yardstick on the CPU: its math path computes in fp32 and rounds once (at bf16 and a softmax scale of
# 1.7, dq 0.45 off where the einsum reference is 4.7 off and the kernel, which rounds P to bf16 for its dots as
# FlashAttention does, 2.7).
#
# fp32 gets ``fp32_ulps`` more ulps of the result's largest entry: FP32_ULPS for the forward, FP32_GRAD_ULPS for
# the gradients. The kernel's softmax is exp2 of scores pre-scaled by log2(e), and the backward recomputes it from
# the stored log-sum-exp; in the interpreter every fp32 exp2 is numpy's float32 routine, on a GPU ex2.approx.
# Measured in the interpreter beyond 2x PyTorch + the rounding floor, over the Hypothesis cases (about 100 per
# head dim) and the awkward ones: the forward up to 2.9 ulps (decode over 31 own keys, D 128: 1.7e-6 where PyTorch
# is 3.3e-7 off), the gradients up to 7.2 (dv, where PyTorch's dv is exact; dk 7.0); fp16 and bf16 stay within
# 0.6 of the bound without any.
FP32_ULPS = 8
FP32_GRAD_ULPS = 16


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the dtype's rounding at the result's size: flash-attention's ``fwd_atol``, ``2 * (ref + 0.3 - 0.3 -
    ref).abs().max()`` at the dtype, and at least twice the rounding of ``ref`` itself to the dtype (``fwd_atol``
    vanishes where adding 0.3 falls below half an ulp: entries of 128 and more at bf16)."""
    if not ref.numel():
        return 0.0
    r = ref.to(dtype)
    return max(2 * (r + 0.3 - 0.3 - r).abs().max().item(), 2 * (r.double() - ref).abs().max().item())


def error_bound(ref: torch.Tensor, err_pt: float, dtype: torch.dtype, *, fp32_ulps: int = FP32_ULPS,
                extra: float = 0.0, cancelled: float = 0.0) -> float:
    """The kernel's allowed max error against the fp64 ``ref``: twice PyTorch's (``err_pt``), the rounding floor,
    ``fp32_ulps`` ulps of ``ref``'s largest entry at fp32, ``extra`` (a relative error, of that entry), and
    ``fp32_ulps`` fp32 ulps of ``cancelled`` at every dtype: the size of terms the kernel subtracts in fp32
    whatever its inputs' dtype, which the result's own size does not show where they cancel (the backward's
    dP - D_i: for a query row that attends a single key both are do . v, and the exact dq is zero)."""
    size = ref.abs().max().item() if ref.numel() else 0.0
    eps = torch.finfo(torch.float32).eps
    ulps = fp32_ulps * eps if dtype == torch.float32 else 0.0
    return 2 * err_pt + rounding_floor(ref, dtype) + (ulps + extra) * size + fp32_ulps * eps * cancelled


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    """One call batch: segments[b] is a list of (start, length, delta); own_* and new_len per call."""

    segments: list
    own_start: list
    own_past: list
    new_len: list
    S: int
    H: int = 4
    Hkv: int = 2
    D: int = 64
    N: int | None = None  # store rows; default: just enough
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def tensors(self, device=DEVICE) -> dict:
        """``segment_attention``'s arguments by name: q, k_cache, v_cache, seg_start, seg_len, seg_delta, own_start,
        own_past, new_len, inv_freq (``segment_attention(**case.tensors())``)."""
        B, G = len(self.own_start), max((len(s) for s in self.segments), default=0)
        table = torch.zeros(3, B, G, dtype=torch.int32)
        for b, segs in enumerate(self.segments):
            for g, seg in enumerate(segs):
                table[:, b, g] = torch.tensor(seg, dtype=torch.int32)
        ends = [s + n for segs in self.segments for s, n, _ in segs if n > 0] + [
            s + p + n for s, p, n in zip(self.own_start, self.own_past, self.new_len)]
        N = self.N if self.N is not None else max(ends + [1])
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(B, self.H, self.S, self.D, generator=gen)
        k = torch.randn(self.Hkv, N, self.D, generator=gen)
        v = torch.randn(self.Hkv, N, self.D, generator=gen)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.D, 2, dtype=torch.float32) / self.D))
        own = torch.tensor([self.own_start, self.own_past, self.new_len], dtype=torch.int32).reshape(3, B)
        args = dict(q=q.to(self.dtype), k_cache=k.to(self.dtype), v_cache=v.to(self.dtype), seg_start=table[0],
                    seg_len=table[1], seg_delta=table[2], own_start=own[0], own_past=own[1], new_len=own[2],
                    inv_freq=inv_freq)
        return {name: t.to(device) for name, t in args.items()}


# ``Case.tensors`` returns ``segment_attention``'s arguments as a dict by these names (every one after v_cache is
# keyword-only in the kernel API: the six index tables share a dtype, so a swap by position would pass every check).
QKV = ("q", "k_cache", "v_cache")
SEGMENT_TABLE = ("seg_start", "seg_len", "seg_delta")  # (B, G) each: ``tile_table``'s tables
INDEX_TABLES = SEGMENT_TABLE + ("own_start", "own_past", "new_len")  # ``dense_layout``'s; own_* and new_len (B,)


def segment_table(args: dict) -> dict:
    """seg_start, seg_len and seg_delta of ``args`` (``Case.tensors``): ``tile_table(**segment_table(args), ...)``."""
    return {name: args[name] for name in SEGMENT_TABLE}


def index_tables(args: dict) -> dict:
    """The six index tables of ``args``: ``dense_layout(**index_tables(args), num_queries=S)``."""
    return {name: args[name] for name in INDEX_TABLES}


def fp64(args: dict) -> dict:
    """``args`` with q, k_cache and v_cache in fp64: the reference's inputs for an fp64 result."""
    return {**args, **{name: args[name].double() for name in QKV}}


# ----------------------------------------------------------------------------------- property test
SIZES = dict(max_b=4, max_s=70, max_seg=150, max_g=5, max_past=150) if CUDA else dict(
    max_b=2, max_s=21, max_seg=40, max_g=3, max_past=40)


@st.composite
def cases(draw, dtype: torch.dtype, D: int):
    B = draw(st.integers(1, SIZES["max_b"]))
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    S = draw(st.one_of(st.just(1), st.integers(1, SIZES["max_s"])))
    pool = draw(st.integers(1, 2 * SIZES["max_seg"]))  # store rows segments are drawn from
    seg = st.tuples(st.integers(0, pool - 1), st.integers(0, SIZES["max_seg"]), st.integers(-300, 300))
    segments = []
    for _ in range(B):
        segs = [(s, min(n, pool - s), d) for s, n, d in draw(st.lists(seg, max_size=SIZES["max_g"]))]
        if segs and draw(st.booleans()):
            segs.append(segs[0])  # the same store rows attended twice
        if segs and segs[-1][0] + segs[-1][1] < pool and draw(st.booleans()):
            s, n, d = segs[-1]  # the rows right after the last segment, with its delta: one run in the tile table
            segs.append((s + n, draw(st.integers(1, pool - s - n)), d))
        segments.append(segs)
    new_len = [draw(st.one_of(st.just(S), st.integers(0, S))) for _ in range(B)]
    own_past = [draw(st.integers(0, SIZES["max_past"])) for _ in range(B)]
    own_start, row = [], pool  # own rows after the pool, with gaps
    for p, n in zip(own_past, new_len):
        row += draw(st.integers(0, 5))
        own_start.append(row)
        row += p + n
    return Case(segments=segments, own_start=own_start, own_past=own_past, new_len=new_len, S=S,
                H=Hkv * group, Hkv=Hkv, D=D, dtype=dtype, seed=draw(st.integers(0, 2**16)))


# Examples per (dtype, head dim): $CHOREO_KERNEL_EXAMPLES, default 50 on a GPU, 10 in the interpreter.
EXAMPLES = int(os.environ.get("CHOREO_KERNEL_EXAMPLES") or (50 if CUDA else 10))


# ----------------------------------------------------------------------------------- awkward cases
AWKWARD = {
    "decode-S1": Case(segments=[[(0, 30, 5)], [(10, 20, -10)]], own_start=[40, 60], own_past=[7, 12],
                      new_len=[1, 1], S=1),
    "empty-segment-list-G0": Case(segments=[[], []], own_start=[0, 9], own_past=[4, 0], new_len=[3, 2], S=3),
    "padding-segments-and-rows": Case(segments=[[(0, 0, 0), (3, 9, 2), (10**6, 0, 0)], [(0, 0, 7)]],
                                      own_start=[20, 30], own_past=[2, 5], new_len=[2, 0], S=5),
    "all-calls-padding": Case(segments=[[(0, 4, 1)]], own_start=[5], own_past=[3], new_len=[0], S=4),
    "overlap-repeat-gap": Case(segments=[[(0, 20, 0), (10, 20, 25), (0, 20, 0), (40, 3, -60)]], own_start=[50],
                               own_past=[0], new_len=[6], S=6),
    "gqa-4-to-1": Case(segments=[[(0, 33, 3)]], own_start=[40], own_past=[5], new_len=[7], S=7, H=4, Hkv=1),
    "gqa-3-decode": Case(segments=[[(0, 17, -4), (20, 9, 40)]], own_start=[30], own_past=[3], new_len=[1], S=1,
                         H=6, Hkv=2),
    "seqlen-97": Case(segments=[[(0, 45, 100)]], own_start=[45], own_past=[10], new_len=[97], S=97, H=2, Hkv=2),
    "multi-tile-segments": Case(segments=[[(0, 65, 7), (70, 33, -7)]], own_start=[110], own_past=[49],
                                new_len=[2], S=2),
    "bf16": Case(segments=[[(0, 40, 9)], [(5, 30, -3)]], own_start=[50, 70], own_past=[4, 0], new_len=[5, 3], S=5,
                 dtype=torch.bfloat16),
    "fp16-D128": Case(segments=[[(0, 40, 9)]], own_start=[50], own_past=[4], new_len=[5], S=5, D=128,
                      dtype=torch.float16),
    # segments continuing each other (next store row, same delta; an empty entry between two of them): the tile
    # table cuts them as one run, so tiles straddle segment boundaries; the last has another delta
    "continued-segments": Case(segments=[[(0, 20, 3), (20, 30, 3), (50, 0, 9), (50, 14, 3), (64, 10, -2)],
                                         [(5, 9, 0), (14, 9, 0)]], own_start=[80, 90], own_past=[3, 0],
                               new_len=[4, 2], S=4),
    "large-deltas": Case(segments=[[(0, 20, 4000), (20, 20, -4000)]], own_start=[40], own_past=[2], new_len=[3],
                         S=3),
    # the fp32 case furthest beyond 2x PyTorch's error (2.9 ulps, FP32_ULPS; a draw of the property test)
    "fp32-D128-own-only": Case(segments=[[]], own_start=[69], own_past=[30], new_len=[1], S=1, H=2, Hkv=1, D=128,
                               seed=203),
}


def read_rows(case: Case, N: int) -> torch.Tensor:
    """(N,) bool on DEVICE: the store rows some call of ``case`` attends to (its segments, and its own rows)."""
    read = torch.zeros(N, dtype=torch.bool)
    for segs, start, past, n in zip(case.segments, case.own_start, case.own_past, case.new_len):
        for row, length, _ in segs:
            read[row:row + length] = True
        if n:  # a call with no valid row reads nothing
            read[start:start + past + n] = True
    return read.to(DEVICE)
