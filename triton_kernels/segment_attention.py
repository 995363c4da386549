"""Fused segment-table attention for Prompt Choreography (FlashAttention-2 style forward pass, Triton).

Each call ``b`` of a batch attends to

1. every token of the segments in its row of the segment table: store rows
   ``seg_start[b, g] .. seg_start[b, g] + seg_len[b, g] - 1``, moved by ``seg_delta[b, g]`` positions
   (keys are stored after RoPE at their original positions; RoPE rotations compose, so a move is one more
   rotation by ``delta * inv_freq``), and
2. causally, its own tokens: store rows ``own_start[b] ..``; query row ``i`` (own index ``own_past[b] + i``)
   sees own key ``j`` iff ``j <= own_past[b] + i``.

There is no gather, no dense mask and no repeated K/V: the kernel walks the table, one online softmax over
all segments and then the own part. By default the segments are first cut into key tiles (``tile_table``;
segments that continue each other in the store with one delta are cut as one run) and walked in one loop, so
K/V prefetching continues across segment boundaries; calls with many keys and too few programs to fill the GPU
are split along their tiles (split-K), with the partials merged in fp32.

Supported:
    dtypes fp32 / fp16 / bf16 (q, k_cache, v_cache alike; fp32 dots run in IEEE fp32, not tf32), head dim
    any power of two 16..256, any S (decode S = 1, prefill S not a multiple of the block), any number of
    segments G >= 0 (zero-length entries are padding; segments may overlap, repeat or leave gaps), position
    deltas of either sign, grouped-query attention (H % Hkv == 0), arbitrary strides for q / k_cache / v_cache.
    Runs on CUDA (and ROCm builds of torch), or on CPU tensors under the Triton interpreter
    (``TRITON_INTERPRET=1`` set before this module is imported; ~400x slower than SDPA, for tests only).
Differentiable: when q, k_cache or v_cache requires grad, the forward also keeps each row's log-sum-exp and
    the backward kernels of ``segment_attention_backward`` give dq and dk / dv into the whole store (through the
    re-rotation of moved segments), so LoRA fine-tuning through the cache runs on the kernel. dk / dv are
    added with atomics, or, under ``torch.use_deterministic_algorithms(True)``, reduced in a fixed order.
Host cost: ``segment_attention`` checks its arguments at every call. ``prepare_launch`` checks them once and
    ``run_launch`` runs that launch on any q, k_cache and v_cache of the same shapes (the engine: every layer of a
    forward pass shares one table), checking only those three. The launch holds its own copies of the tables, so
    a caller's later in-place edit of one cannot get past the checks (``copy_tables=False`` skips the copies for a
    caller whose tables are private: the engine's, built per step).
Not supported:
    double backward, sliding windows, ALiBi / softcapping, RoPE conventions other than HF Llama "rotate_half".
    Row offsets inside one segment or own run are int32 (N * D < 2**31 elements per KV head).
    Table values are checked on CPU only (on CUDA a check would synchronise): out-of-range rows, int64 values
    outside int32 and a ``tiles`` argument that is not ``tile_table`` of the segment table are the caller's bug
    there; on CPU each is refused.
    Tile tables hold position deltas up to +-4194303 (``tile_table`` refuses larger ones): the flat loop and the
    backward walk one; the nested loop (``LaunchConfig(flat=False)``) runs larger moves, forward only.

Measured on an H200 (bf16, H=32, Hkv=8, D=128, at equal attended tokens): prefill over 1k-16k moved keys, with
the moved keys copied first as the defaults now do there, at 111-127% of causal SDPA's speed; decode at 97-209%,
27-36x faster than FlexAttention after the gather it needs; forward + backward at 91-99%. The figures, what the
compiled code shows of where the time goes (instructions per key tile, registers, pipelining) and what each change
did: ``triton_kernels/NOTES.md``, with the tables in ``results/kernels/``.

Worked example (call 0 sees store rows 0..9 moved 5 positions later, then its own 3 tokens, 2 of them new; every
argument after v_cache is keyword-only, so that same-typed tables cannot be swapped by position)::

    out = segment_attention(
        q,                       # (1, H, 2, D), the 2 new tokens, RoPE'd at own positions
        k_cache, v_cache,        # (Hkv, N, D)
        seg_start=torch.tensor([[0]]), seg_len=torch.tensor([[10]]), seg_delta=torch.tensor([[5]]),
        own_start=torch.tensor([40]), own_past=torch.tensor([1]), new_len=torch.tensor([2]),
        inv_freq=inv_freq,       # (D / 2,) fp32
    )                            # (1, H, 2, D)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["segment_attention", "prepare_launch", "run_launch", "Launch", "unsupported", "is_available",
           "interpreter_active", "LaunchConfig", "launch_config", "TileTable", "tile_table", "pack_tiles",
           "unpack_tiles", "default_splits", "half_angles"]

# exp(x) == exp2(x * log2(e)): the softmax runs on exp2, the GPU's native exponential (one MUFU.EX2 instruction),
# so the softmax scale is pre-multiplied by log2(e) = 1 / ln(2).
LOG2E = 1.4426950408889634

# A tile-table entry is one int64, so the flat loop reads a tile's row, count and delta with one load:
# row (bits 0..31) + count * 2**32 (9 bits: block_n <= 256) + delta * 2**41 (23 bits, signed).
COUNT_BITS = 9
TILE_COUNT_BITS: tl.constexpr = tl.constexpr(COUNT_BITS)  # the same, for the kernels
TILE_COUNT_LIMIT: tl.constexpr = tl.constexpr(1 << COUNT_BITS)
MAX_TILE_DELTA = (1 << (31 - COUNT_BITS)) - 1  # |delta| <= this


@triton.jit
def _to(x, DTYPE: tl.constexpr, FIX_BF16: tl.constexpr):
    # Cast fp32 -> DTYPE rounding to nearest even. The interpreter truncates fp32 -> bf16 casts (compiled Triton
    # rounds), so under FIX_BF16 round the fp32 bits first (add half a bf16 ulp, ties to even, clear the low 16
    # bits): the truncating cast is then exact and CPU tests see the GPU's numerics.
    if FIX_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _widen(x):
    # x as fp32, exactly. A bf16 is the top half of its fp32: one shift or mask per element (sm_90 compiles the
    # plain cast of a packed pair to three instructions, the upper element's as a byte permute and a shift).
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _token_to_load(tok, n_new):
    # The token a query row reads: its own, or for a padding row (tok >= n_new) the call's last new token (token 0
    # of a call with none, whose rows no loop reads). Every query-row load is then in bounds and finite without a
    # mask (no zero-filled registers); what padding rows compute is discarded.
    return tl.minimum(tok, tl.maximum(n_new - 1, 0))


@triton.jit
def _rope_tables(INV_FREQ, offs_d, HEAD_DIM: tl.constexpr, HALF_ANGLES: tl.constexpr):
    # HF Llama's "rotate_half" convention: the frequencies (fp32; HALF_ANGLES: the D / 2 of them, else one per
    # column d of D (offs_d), inv_freq[d % (D / 2)]) and per column d the column the other half pairs with
    # ((d + D / 2) % D, for the half-swapped loads).
    HALF: tl.constexpr = HEAD_DIM // 2
    if HALF_ANGLES:
        inv_freq = tl.load(INV_FREQ + tl.arange(0, HALF))
    else:
        inv_freq = tl.load(INV_FREQ + offs_d % HALF)
    return inv_freq, (offs_d + HALF) % HEAD_DIM


@triton.jit
def _tile(ENTRY, ok):
    # One tile-table entry (int64, ``pack_tiles``): its first store row (int64), key count and position delta
    # (zeros where not ok).
    e = tl.load(ENTRY, mask=ok, other=0)
    hi = (e >> 32).to(tl.int32)  # count + delta * 2**9 (arithmetic shifts: the delta keeps its sign)
    return e & 0xFFFFFFFF, hi & (TILE_COUNT_LIMIT - 1), hi >> TILE_COUNT_BITS


@triton.jit
def _load_q_rotated(q_ptrs, q_swap_ptrs, inv_freq, delta, HEAD_DIM: tl.constexpr, HALF_ANGLES: tl.constexpr,
                    FIX_BF16: tl.constexpr):
    # RoPE is relative: <R(m) q, R(n + delta) k> == <R(m - delta) q, R(n) k>. Instead of re-rotating every key
    # tile of a moved segment by +delta, counter-rotate the query tile by -delta once per segment: the same
    # attention scores, O(BLOCK_M * D) work per segment instead of O(seg_len * D), and the inner loop below
    # stays a plain FlashAttention loop. Returns the rotated query (BLOCK_M, D) in the query's dtype, ready for
    # the score dot; delta == 0 is exact (cos 0 = 1, sin 0 = 0).
    # The query is loaded twice, once with its two halves of D swapped, so that rotate_half(q) = cat(-q2, q1)
    # (q_swap with its first half negated) needs no in-register shuffle. Unmasked: the pointers address valid
    # rows only (``_attn_fwd`` points padding rows at a real token), which saves the zero-filling of predicated
    # loads (bf16 D 128 prefill: 418 -> 368 instructions per re-rotation, sm_90).
    q = tl.load(q_ptrs)  # (BLOCK_M, D)
    q_swap = tl.load(q_swap_ptrs)
    cos_a, sin_a = _rotation(inv_freq, delta, HEAD_DIM, HALF_ANGLES)
    return _rotate_rows(q, q_swap, cos_a, sin_a, FIX_BF16)


@triton.jit
def _rotate_rows(x, x_swap, cos_a, sin_a, FIX_BF16: tl.constexpr):
    # Rows x (R, D) rotated (``_rotate``) and returned in their own dtype, for a dot: bf16 rows in bf16
    # arithmetic (``_rotate_bf16``), fp16 and fp32 rows in fp32, then rounded.
    if x.dtype == tl.bfloat16:
        return _rotate_bf16(x, x_swap, cos_a, sin_a, FIX_BF16)
    else:
        return _to(_rotate(_widen(x), _widen(x_swap), cos_a, sin_a), x.dtype, FIX_BF16)


@triton.jit
def _rotate_bf16(x, x_swap, cos_a, sin_a, FIX_BF16: tl.constexpr):
    # ``_rotate`` on bf16 rows in bf16 arithmetic: x * cos rounded to bf16, then one fused multiply-add
    # x_swap * sin + that, rounded once, with cos and sin rounded to bf16 first. Two bf16 instructions per pair
    # of elements (sm_90: HMUL2.BF16 and HFMA2.BF16), where the fp32 rotation takes a widening per element, a
    # multiply and a fused multiply-add per element and a pack per pair: bf16 D 128 prefill, 368 -> 164
    # instructions per re-rotation. Accuracy: two bf16 roundings and bf16 angles, where the fp32 rotation rounds
    # once; Hugging Face's Llama applies RoPE in the model's dtype with three (q * cos + rotate_half(q) * sin).
    # FIX_BF16 (the interpreter, whose bf16 arithmetic multiplies the bit patterns): the same in fp32, exact
    # products rounded to bf16 where the GPU rounds (the sum rounded to fp32 first: a rare tie may differ).
    cos_b = _to(cos_a, tl.bfloat16, FIX_BF16)[None, :]
    sin_b = _to(sin_a, tl.bfloat16, FIX_BF16)[None, :]
    if FIX_BF16:
        t = _to(_widen(x) * _widen(cos_b), tl.bfloat16, True)
        return _to(_widen(x_swap) * _widen(sin_b) + _widen(t), tl.bfloat16, True)
    else:
        return tl.fma(x_swap, sin_b, x * cos_b)


@triton.jit
def _rotation(inv_freq, delta, HEAD_DIM: tl.constexpr, HALF_ANGLES: tl.constexpr):
    # cos and signed sin (D,) of R(-delta)'s angles, -delta * inv_freq (``_rope_tables``). The sine carries
    # rotate_half's sign (-1 on the first half of D), so that ``_rotate`` spends one multiply and one fused
    # multiply-add per element, with the rounding of x * cos + rotate_half(x) * sin. HALF_ANGLES: each cosine and
    # sine is evaluated once, on the D / 2 frequencies, then laid out for both halves; else once per column (D
    # evaluations, each frequency twice). The same values either way; which compiles to fewer instructions
    # depends on the layouts Triton picks (``half_angles``).
    angle = -delta.to(tl.float32) * inv_freq  # (D / 2,) or (D,)
    if HALF_ANGLES:
        cos_h = tl.cos(angle)
        sin_h = tl.sin(angle)
        cos_a = tl.reshape(tl.permute(tl.join(cos_h, cos_h), (1, 0)), (HEAD_DIM,))  # cat(cos, cos)
        sin_a = tl.reshape(tl.permute(tl.join(-sin_h, sin_h), (1, 0)), (HEAD_DIM,))  # cat(-sin, sin)
    else:
        cos_a = tl.cos(angle)
        sin_a = tl.where(tl.arange(0, HEAD_DIM) < HEAD_DIM // 2, -1.0, 1.0) * tl.sin(angle)
    return cos_a, sin_a


@triton.jit
def _rotate(x, x_swap, cos_a, sin_a):
    # Rows x (R, D) rotated by the angles of cos_a and the signed sin_a (D,, ``_rotation``), in fp32; x_swap: the
    # same rows with their two halves of D swapped (rotate_half(x) = cat(-x2, x1), its sign in sin_a).
    return x * cos_a[None, :] + x_swap * sin_a[None, :]


@triton.jit
def _prerotate_keys(K, KP, TILES, N_TILES, INV_FREQ,  #
                    stride_kh, stride_kn, stride_kd, stride_pb, stride_ph, stride_pn, stride_tb, stride_tt, Hkv,  #
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FIX_BF16: tl.constexpr):
    # ``LaunchConfig.prerotate``: tile t of call b's tile table with its keys moved, one program per (tile, call x
    # KV head): KP[b, hkv, t * BLOCK_N + j] = R(delta) K[hkv, row + j] for j < count, rotated as the backward
    # kernels rotate key tiles (``_rotate_rows``: the same bits); lanes past a partial tile's count repeat its last
    # key (finite; the main loop masks their scores).
    t = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hkv
    off_hkv = off_bh % Hkv
    if t < tl.load(N_TILES + off_b):
        row, cnt, delta = _tile(TILES + off_b.to(tl.int64) * stride_tb + t * stride_tt, True)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        inv_freq, offs_swap = _rope_tables(INV_FREQ, offs_d, HEAD_DIM, False)
        rows = K + off_hkv.to(tl.int64) * stride_kh + (row + tl.minimum(offs_n, cnt - 1))[:, None] * stride_kn
        k = tl.load(rows + offs_d[None, :] * stride_kd)  # (BLOCK_N, D)
        k_swap = tl.load(rows + offs_swap[None, :] * stride_kd)
        cos_a, sin_a = _rotation(inv_freq, -delta, HEAD_DIM, False)  # R(+delta): _rotation gives R(-its delta)
        moved = _rotate_rows(k, k_swap, cos_a, sin_a, FIX_BF16)
        P = KP + off_b.to(tl.int64) * stride_pb + off_hkv.to(tl.int64) * stride_ph
        tl.store(P + (t * BLOCK_N + offs_n)[:, None] * stride_pn + offs_d[None, :], moved)


@triton.jit
def _online_softmax(acc, l_i, m_i, qk, qk_scale, v, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    FIX_BF16: tl.constexpr):
    # One FlashAttention-2 step: unscaled scores qk (BLOCK_M, BLOCK_N) (masked keys -inf), qk_scale > 0 (the
    # softmax scale times log2(e): scaled scores are in log2 units), V tile (BLOCK_N, D); acc (BLOCK_M, D), l_i
    # and m_i (BLOCK_M,) are the running unnormalised output, sum and max of the scaled scores.
    # The scale is applied in the exponent's fused multiply-add (qk * qk_scale - m), not to the whole tile first:
    # the row max of the unscaled scores, scaled, is that of the scaled ones (rounding is monotonic).
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN (an all-masked
    # tile: a padding tile of the flat loop, or a split that holds no key of this row).
    m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = _to(p, v.dtype, FIX_BF16)  # probabilities at the input precision, as FlashAttention does
    if DOT_FP32:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(p, v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_flat(acc, l_i, m_i, Q, q_ptrs, q_swap_ptrs, inv_freq,  #
                   T_ROW, stride_tt, t_lo, t_hi, K_HEAD, V_HEAD, KP_HEAD, qk_scale,  #
                   offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, K_DESC, V_DESC, off_hkv,  #
                   DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,  #
                   TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, STAGES: tl.constexpr,
                   MOVED: tl.constexpr, HALF_ANGLES: tl.constexpr, PREROTATED: tl.constexpr):
    # Tiles t_lo .. t_hi - 1 of a call's row T_ROW of the tile table, all segments in one loop: tile t holds cnt
    # keys from store row ``row`` on, moved by ``delta`` (one int64 entry, ``_tile``). The K/V addresses come from
    # a table indexed by the loop counter, so the software pipeliner prefetches across segment boundaries (as
    # paged attention does); the query is re-rotated only where the delta changes (once per segment). TMA: K/V
    # tiles come through tensor descriptors over the (Hkv, N, D) store (Hopper's copy engine; rows past N read as
    # zeros), not through per-element address tensors; a partial tile's rows past its count are masked in the
    # scores, and their values, finite by the option's contract, are multiplied by zero probabilities.
    # STAGES: this loop's software-pipelining stages, shared by the pipeliner between the table load and the K/V
    # loads it addresses (``LaunchConfig.flat_stages``).
    # Without TMA the loads are not masked: lanes past a tile's count re-read its last key (in bounds, and a key
    # the call attends to, so finite), and only a partial tile masks its scores. A whole tile (every tile of a
    # segment but its last) then pays no per-key predicate on its loads or scores: for the bf16 D-128 prefill
    # tile that took 674 instructions per tile on sm_90 to 534 (``ptxas_report``).
    # MOVED False (no tile of the launch has a delta): the query as loaded, loop-invariant, so it stays in shared
    # memory for every score dot (as in the own-token loops) instead of going through registers each tile.
    # PREROTATED (``LaunchConfig.prerotate``; MOVED is then False): tile t's keys, already moved, are rows
    # t * BLOCK_N .. of this call's copy KP_HEAD (``_prerotate_keys``); its values are read from the store.
    if MOVED:
        _, _, cur = _tile(T_ROW + t_lo * stride_tt, t_lo < t_hi)
        q = _load_q_rotated(q_ptrs, q_swap_ptrs, inv_freq, cur, HEAD_DIM, HALF_ANGLES, FIX_BF16)
    else:
        cur = 0
        q = tl.load(q_ptrs)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        row, cnt, delta = _tile(T_ROW + t * stride_tt, True)
        if MOVED:
            if delta != cur:
                q = _load_q_rotated(q_ptrs, q_swap_ptrs, inv_freq, delta, HEAD_DIM, HALF_ANGLES, FIX_BF16)
                cur = delta
        col_ok = offs_n < cnt
        key = tl.minimum(offs_n, cnt - 1)  # (BLOCK_N,) the key each lane loads: cnt >= 1 in every table tile
        if PREROTATED:
            kT = tl.load(KP_HEAD + (t * BLOCK_N + offs_n)[None, :] * stride_pn + offs_d[:, None])
        elif TMA:
            kT = tl.trans(K_DESC.load([off_hkv, row.to(tl.int32), 0]).reshape(BLOCK_N, HEAD_DIM))
        else:
            kT = tl.load(K_HEAD + row * stride_kn + (key[None, :] * stride_kn + offs_d[:, None] * stride_kd))
        if DOT_FP32:
            qk = tl.dot(q.to(tl.float32), kT.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if cnt < BLOCK_N:  # a partial tile: its lanes past the count hold no key of this call
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        if TMA:  # rows past a partial tile's count are other store rows, finite (``LaunchConfig.tma``): p = 0 x v
            v = V_DESC.load([off_hkv, row.to(tl.int32), 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            v = tl.load(V_HEAD + row * stride_vn + (key[:, None] * stride_vn + offs_d[None, :] * stride_vd))
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, qk_scale, v, DOT_FP32, INPUT_PRECISION, FIX_BF16)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,  #
                    K_BASE, V_BASE, lo, hi, kv_len, row_limit, qk_scale,  #
                    offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,  #
                    BLOCK_N: tl.constexpr, KEY_BOUND: tl.constexpr, CAUSAL: tl.constexpr,  #
                    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    # Keys lo .. hi - 1 of one contiguous run of store rows starting at K_BASE / V_BASE.
    # KEY_BOUND masks keys >= kv_len (the tail tile of a run); CAUSAL masks keys j > row_limit of each row.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        col_ok = cols < kv_len
        # -- compute qk: K^T tile (D, BLOCK_N) --
        k_ptrs = K_BASE + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if KEY_BOUND:
            kT = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_ptrs)
        if DOT_FP32:
            qk = tl.dot(q.to(tl.float32), kT.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)
        if CAUSAL:  # (BLOCK_M, BLOCK_N)
            qk = tl.where(col_ok[None, :] & (cols[None, :] <= row_limit[:, None]), qk, float("-inf"))
        elif KEY_BOUND:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        v_ptrs = V_BASE + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if KEY_BOUND:
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, qk_scale, v, DOT_FP32, INPUT_PRECISION, FIX_BF16)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, PART_ACC, PART_M, PART_L, K_DESC, V_DESC, KP,  #
              SEG_START, SEG_LEN, SEG_DELTA, TILES, N_TILES, OWN_START, OWN_PAST, NEW_LEN, INV_FREQ, qk_scale,  #
              stride_qb, stride_qh, stride_qs, stride_qd,  #
              stride_kh, stride_kn, stride_kd,  #
              stride_vh, stride_vn, stride_vd,  #
              stride_ob, stride_oh, stride_os, stride_od,  #
              stride_segb, stride_segg, stride_tb, stride_tt,  #
              stride_pb, stride_ph, stride_pn,  #
              H, Hkv, S, G,  #
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
              FLAT: tl.constexpr, FLAT_STAGES: tl.constexpr, MOVED: tl.constexpr, SPLIT: tl.constexpr,  #
              STORE_LSE: tl.constexpr, HALF_ANGLES: tl.constexpr, PREROTATED: tl.constexpr,  #
              TMA: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    off_b = off_bh // Hkv
    off_hkv = off_bh % Hkv

    # -- rows of this block --
    # Row r is (token r // GROUP, query head off_hkv * GROUP + r % GROUP): the GROUP query heads that share a
    # KV head are packed into the M dimension, so each K/V tile is loaded once for the whole group (GQA by
    # index mapping; for decode this is what fills the 16-row minimum of tl.dot).
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = offs_m // GROUP
    head = off_hkv * GROUP + offs_m % GROUP
    n_new = tl.minimum(tl.load(NEW_LEN + off_b), S)
    row_ok = tok < n_new  # padding rows are written as zeros
    tok_lo = (start_m * BLOCK_M) // GROUP
    tok_hi = tl.minimum((start_m * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
    alive = tok_lo < n_new  # a block of padding rows only writes zeros

    tok_q = _token_to_load(tok, n_new)
    q_rows = Q + off_b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh + tok_q[:, None] * stride_qs
    inv_freq, offs_swap = _rope_tables(INV_FREQ, offs_d, HEAD_DIM, HALF_ANGLES)
    q_ptrs = q_rows + offs_d[None, :] * stride_qd
    q_swap_ptrs = q_rows + offs_swap[None, :] * stride_qd
    K_HEAD = K + off_hkv.to(tl.int64) * stride_kh
    V_HEAD = V + off_hkv.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    own_past = tl.load(OWN_PAST + off_b)
    row_limit = own_past + tok  # own key j is visible to a row iff j <= own_past + token

    # -- phase 1: the segments; every row sees every key, keys moved by delta. With split-K (a grid of
    #    num_splits along axis 2) each split takes an equal share of the call's tiles (FLAT) or segments. --
    if FLAT:
        n_tiles = tl.where(alive, tl.load(N_TILES + off_b), 0)
        chunk = tl.cdiv(n_tiles, num_splits)
        t_lo = tl.minimum(split * chunk, n_tiles)
        t_hi = tl.minimum(t_lo + chunk, n_tiles)
        T_ROW = TILES + off_b.to(tl.int64) * stride_tb
        KP_HEAD = KP + off_b.to(tl.int64) * stride_pb + off_hkv.to(tl.int64) * stride_ph  # read if PREROTATED
        acc, l_i, m_i = _attn_fwd_flat(acc, l_i, m_i, Q, q_ptrs, q_swap_ptrs, inv_freq,
                                       T_ROW, stride_tt, t_lo, t_hi, K_HEAD, V_HEAD, KP_HEAD, qk_scale, offs_n,
                                       offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, K_DESC, V_DESC,
                                       off_hkv, DOT_FP32, INPUT_PRECISION, FIX_BF16, TMA, BLOCK_N, HEAD_DIM,
                                       FLAT_STAGES, MOVED, HALF_ANGLES, PREROTATED)
    else:
        n_seg = tl.where(alive, G, 0)
        chunk = tl.cdiv(n_seg, num_splits)
        g_lo = tl.minimum(split * chunk, n_seg)
        g_hi = tl.minimum(g_lo + chunk, n_seg)
        for g in range(g_lo, g_hi):
            seg = off_b * stride_segb + g * stride_segg
            seg_start = tl.load(SEG_START + seg).to(tl.int64)
            seg_len = tl.load(SEG_LEN + seg)
            delta = tl.load(SEG_DELTA + seg)
            q = _load_q_rotated(q_ptrs, q_swap_ptrs, inv_freq, delta, HEAD_DIM, HALF_ANGLES, FIX_BF16)
            K_SEG = K_HEAD + seg_start * stride_kn
            V_SEG = V_HEAD + seg_start * stride_vn
            # Whole tiles need no key mask; the tail tile (if any) is masked.
            full = seg_len // BLOCK_N * BLOCK_N
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_SEG, V_SEG, 0, full, seg_len, row_limit, qk_scale,
                                            offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                            BLOCK_N, False, False, DOT_FP32, INPUT_PRECISION, FIX_BF16)
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_SEG, V_SEG, full, seg_len, seg_len, row_limit,
                                            qk_scale, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                            BLOCK_N, True, False, DOT_FP32, INPUT_PRECISION, FIX_BF16)

    # -- phase 2: the call's own tokens, causal, delta 0 (in the last split) --
    own_start = tl.load(OWN_START + off_b).to(tl.int64)
    K_OWN = K_HEAD + own_start * stride_kn
    V_OWN = V_HEAD + own_start * stride_vn
    # Not the same op as the segment loop's first query load (".cg": read once, not kept in L1): identical loads
    # are merged, and the merged value, held in shared memory for the own loops' dots, would stay allocated
    # through the segment loop and take the shared memory of one of its K/V buffers.
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
    # Own keys below own_past + tok_lo + 1 are visible to every row of the block: whole tiles of them need no
    # mask. The band from there to own_past + tok_hi + 1 (the diagonal) is masked per row.
    own_here = alive & (split == num_splits - 1)
    band_lo = tl.where(own_here, (own_past + tok_lo + 1) // BLOCK_N * BLOCK_N, 0)
    band_hi = tl.where(own_here, own_past + tok_hi + 1, 0)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_OWN, V_OWN, 0, band_lo, band_hi, row_limit, qk_scale,
                                    offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                    BLOCK_N, False, False, DOT_FP32, INPUT_PRECISION, FIX_BF16)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_OWN, V_OWN, band_lo, band_hi, band_hi, row_limit, qk_scale,
                                    offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                    BLOCK_N, True, True, DOT_FP32, INPUT_PRECISION, FIX_BF16)

    out_ok = (tok < S)[:, None]
    if SPLIT:
        # -- partial results (unnormalised acc, max m and sum l in log2 units), merged by _merge_splits_kernel --
        B = tl.num_programs(1) // Hkv
        part = ((split * B + off_b) * H + head).to(tl.int64) * S + tok  # row index into (splits, B, H, S)
        tl.store(PART_M + part, tl.where(row_ok, m_i, float("-inf")), mask=tok < S)
        tl.store(PART_L + part, tl.where(row_ok, l_i, 0.0), mask=tok < S)
        tl.store(PART_ACC + part[:, None] * HEAD_DIM + offs_d[None, :], tl.where(row_ok[:, None], acc, 0.0),
                 mask=out_ok)
    else:
        # -- epilogue: normalise; padding rows and rows that saw no key are zeros, never NaN --
        has_keys = row_ok & (l_i > 0.0)
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = tl.where(has_keys[:, None], acc / l_safe[:, None], 0.0)
        o_ptrs = (OUT + off_b.to(tl.int64) * stride_ob + head[:, None].to(tl.int64) * stride_oh
                  + tok[:, None] * stride_os + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, _to(out, OUT.dtype.element_ty, FIX_BF16), mask=out_ok)
        if STORE_LSE:  # for the backward pass: log2-sum-exp2 of each row's scores, +inf where it saw no key
            lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
            tl.store(LSE + ((off_b * H + head).to(tl.int64) * S + tok), lse, mask=tok < S)


@triton.jit
def _merge_splits_kernel(PART_ACC, PART_M, PART_L, OUT, LSE, rows, num_splits,  #
                         stride_ob, stride_oh, stride_os, stride_od, H, S,  #
                         HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, STORE_LSE: tl.constexpr,
                         FIX_BF16: tl.constexpr):
    # Split-K merge in one launch: partials PART_ACC (splits, rows, D), PART_M / PART_L (splits, rows), fp32
    # contiguous, rows = B * H * S (row (b * H + h) * S + s). Same arithmetic as ``_merge_splits``.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for k in range(num_splits):
        m = tl.maximum(m, tl.load(PART_M + k * rows + r, mask=ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)  # rows no split saw a key of: weights exp2(-inf) = 0
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for k in range(num_splits):
        w = tl.math.exp2(tl.load(PART_M + k * rows + r, mask=ok, other=float("-inf")) - m)
        total += w * tl.load(PART_L + k * rows + r, mask=ok, other=0.0)
        part = (k * rows + r).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        acc += w[:, None] * tl.load(PART_ACC + part, mask=ok[:, None], other=0.0)
    total_safe = tl.where(total > 0, total, 1.0)
    out = acc / total_safe[:, None]
    b, h, s = r // (H * S), (r // S) % H, r % S
    o_ptrs = (OUT + b.to(tl.int64)[:, None] * stride_ob + h[:, None].to(tl.int64) * stride_oh
              + s[:, None] * stride_os + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, _to(out, OUT.dtype.element_ty, FIX_BF16), mask=ok[:, None])
    if STORE_LSE:
        tl.store(LSE + r, tl.where(total > 0, m + tl.math.log2(total_safe), float("inf")), mask=ok)


# ----------------------------------------------------------------------------------------------- host side
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """True if this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attn_fwd, InterpretedFunction)


def unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot attend over heads of ``head_dim`` at ``dtype`` (None: it can): the domain that
    ``segment_attention`` checks, for callers that choose a backend before any tensor exists (the engine)."""
    if dtype not in _DTYPES:
        return f"the kernel runs float32, float16 or bfloat16, not {dtype}"
    if not isinstance(head_dim, int) or head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"the kernel's head dim must be a power of two in 16..256, not {head_dim}"
    return None


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether ``segment_attention`` can run on tensors of ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if interpreter_active():
        return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    return device.type == "cuda" and torch.cuda.is_available()


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Tile sizes and schedule of one launch. ``segment_attention`` picks one by shape (``launch_config``);
    pass ``config=`` to override it (tuning sweeps, the benchmarks).

    block_m: packed query rows per program (S * H / Hkv rows in all), block_n: keys per tile; both powers of
    two >= 16 (``tl.dot``'s smallest side), block_n <= 256 (a tile's key count is a 9-bit field of its entry).
    num_warps: a power of two; num_stages >= 1 (software pipelining).
    flat: walk all segments' key tiles in one loop from a tile table (``tile_table``), so K/V prefetching runs
    across segment boundaries; False walks the segment table with one loop per segment.
    tma: (flat loop, CUDA capability >= 9) load K/V tiles through host-made tensor descriptors (Hopper's copy
    engine) instead of per-element addresses; needs k_cache / v_cache with unit last stride and 16-byte-aligned
    strides, and finite values in every store row: a partial tile's box reads the rows after its keys (rows
    past N read as zeros), which enter the output multiplied by zero (inf or NaN there would make NaN). The
    engine's store is allocated with zeros and written with keys and values only. Off by default: on an H100
    it was slower than the default loads on the benchmarked prefill workloads (``triton_kernels/NOTES.md``).
    flat_stages: software-pipelining stages of the flat loop alone (the own-token loops use ``num_stages``);
    default ``num_stages``. Its K/V loads are addressed by a tile-table load, and Triton's pipeliner (3.6, 3.7)
    splits a loop's stages between the two: with a tile's row, count and delta in three int32 loads,
    ``num_stages`` 3 kept one K/V tile in flight at prefill and none at decode, and 2 * num_stages - 1 stages
    were needed to match the own loops. With one int64 entry per tile (``pack_tiles``) ``num_stages`` gives the
    flat loop the own loops' buffers (3 at the default prefill tile, 2 at decode) at the same shared memory; more
    stages add buffers and shared memory (``python -m triton_kernels.ptxas_report --flat-stages ...`` prints the
    buffers, registers, shared memory and instructions each setting compiles to). dq's loop: ``backward_configs``.
    prerotate: (flat loop, no TMA) when some segment is moved, first copy every tile's keys, moved by its delta,
    into a buffer of the launch's own (``_prerotate_keys``: B x Hkv x max_tiles x block_n x D elements, read once
    and written once), then run the main loop as for unmoved segments on those keys (the query loop-invariant in
    shared memory, no re-rotation) with the values read from the store. Trades the in-register re-rotation
    (its query round trip through shared memory at every tile and its re-rotation at every delta change) for
    that copy, which the query blocks of a prefill share; at decode the copy is about as much traffic as the
    attention itself. ``launch_config`` turns it on for prefill launches of ``PREROTATE_ROWS`` rows or more at
    fp16 / bf16 and D <= 128, where it was timed faster (H200); elsewhere off. A forward that a backward will follow
    uses it whatever the config says, when some segment is moved (``segment_attention_backward.scoring_launch``: the
    backward scores moved keys rotated, and its recomputed probabilities must use the forward's row statistics
    of those same scores).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    flat: bool = True
    tma: bool = False
    flat_stages: int | None = None
    prerotate: bool = False

    @property
    def flat_loop_stages(self) -> int:
        """The flat loop's software-pipelining stages: ``flat_stages``, or ``num_stages``."""
        return self.flat_stages if self.flat_stages is not None else self.num_stages

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= 16, got {v!r}")
        if self.block_n > 256:
            raise ValueError(f"LaunchConfig.block_n must be <= 256 (a tile's key count is a 9-bit field), got "
                             f"{self.block_n}")
        if not isinstance(self.num_warps, int) or self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"LaunchConfig.num_warps must be a power of two >= 1, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"LaunchConfig.num_stages must be an integer >= 1, got {self.num_stages!r}")
        if not isinstance(self.flat, bool):
            raise ValueError(f"LaunchConfig.flat must be a bool, got {self.flat!r}")
        if not isinstance(self.tma, bool) or (self.tma and not self.flat):
            raise ValueError(f"LaunchConfig.tma must be a bool, and needs flat=True, got tma={self.tma!r}, "
                             f"flat={self.flat!r}")
        if not isinstance(self.prerotate, bool) or (self.prerotate and (not self.flat or self.tma)):
            raise ValueError(f"LaunchConfig.prerotate must be a bool, and needs flat=True and tma=False, got "
                             f"prerotate={self.prerotate!r}, flat={self.flat!r}, tma={self.tma!r}")
        if self.flat_stages is not None and (isinstance(self.flat_stages, bool) or not isinstance(self.flat_stages, int)
                                             or self.flat_stages < 1 or not self.flat):
            raise ValueError(f"LaunchConfig.flat_stages must be None or an integer >= 1, and needs flat=True, got "
                             f"flat_stages={self.flat_stages!r}, flat={self.flat!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileTable:
    """Every call's segments cut into key tiles of ``block_n`` (what the flat loop walks).

    tiles: (B, W) int64 on the kernel's device, W >= max(T, 1) columns, one entry per tile (``pack_tiles``: first
    store row, key count 1..block_n and position delta), calls' tiles in segment order, padded with zeros (a table
    with no tile has one column of them); n_tiles: (B,) int32; max_tiles: T, the most tiles of any call, on the
    host. ``fields()`` unpacks the entries. moved: whether any tile has a non-zero delta
    (on the host); False lets the kernels skip the re-rotation entirely (the engine's calls without ``offsets``
    read every parent where it was encoded), True is always correct.
    """

    block_n: int
    tiles: torch.Tensor
    n_tiles: torch.Tensor
    max_tiles: int
    moved: bool = True

    def fields(self) -> torch.Tensor:
        """(3, B, W) int32: each tile's first store row, key count and position delta."""
        return unpack_tiles(self.tiles)


def pack_tiles(row: torch.Tensor, count: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Tile-table entries, int64: row (0 <= row < 2**31) + count * 2**32 (0 <= count < 512) + delta * 2**41
    (|delta| <= ``MAX_TILE_DELTA``), so that the kernels read a tile with one load (``_tile``)."""
    row, count, delta = (t.to(torch.int64) for t in (row, count, delta))
    return row + (count << 32) + delta * (1 << (32 + COUNT_BITS))


def unpack_tiles(entries: torch.Tensor) -> torch.Tensor:
    """(3, *shape) int32 row, count and delta of ``pack_tiles`` entries."""
    hi = entries >> 32
    return torch.stack([entries & 0xFFFFFFFF, hi & ((1 << COUNT_BITS) - 1), hi >> COUNT_BITS]).to(torch.int32)


def tile_table(*, seg_start, seg_len, seg_delta, block_n: int, device=None) -> TileTable:
    """Cut a segment table (B, G) into key tiles of ``block_n``; built on the host, then copied to ``device``
    (default: the tables' device). Tables on a GPU are copied to the host first (a synchronisation): callers
    that know their segments on the host (the engine) build the table there, once per step. Every argument is
    keyword-only: the three tables share a shape and dtype, so a swapped pair would pass every check.

    Consecutive segments of a call that continue each other (the next starts at the store row after the
    previous one's last, with the same delta; empty entries between them do not count) are cut as one run: the
    same keys in the same order, in fewer partial tiles. Messages encoded one after another and read together
    unmoved, or moved by one offset, are such runs (the engine lists one segment per parent message).

    Example: segments (0, 100, 5) and (300, 10, 0) with block_n 64 give tiles (0, 64, 5), (64, 36, 5), (300, 10, 0)
    (``TileTable.fields()``)::

        table = tile_table(seg_start=torch.tensor([[0, 300]]), seg_len=torch.tensor([[100, 10]]),
                           seg_delta=torch.tensor([[5, 0]]), block_n=64)
        table.fields()[:, 0].T.tolist()  # [[0, 64, 5], [64, 36, 5], [300, 10, 0]]

    Segments (0, 40, 0) and (40, 40, 0) give (0, 64, 0), (64, 16, 0).
    """
    device = torch.device(device) if device is not None else seg_start.device
    if not 1 <= block_n < 1 << COUNT_BITS:
        raise ValueError(f"block_n must be in 1..{(1 << COUNT_BITS) - 1} (a tile's key count has {COUNT_BITS} bits), "
                         f"got {block_n}")
    # On the host, in numpy: a step's tables are small, and each torch op would cost more than its work.
    start, length, delta = (t.detach().to("cpu", torch.int64).numpy() for t in (seg_start, seg_len, seg_delta))
    if start.ndim != 2 or length.shape != start.shape or delta.shape != start.shape:
        raise ValueError(f"seg_start, seg_len and seg_delta must be (B, G) tables of one shape, got "
                         f"{start.shape}, {length.shape} and {delta.shape}")
    B = start.shape[0]
    # -- runs: the segments with keys, in call and table order, each merged into the one before it that it
    #    continues (same call, next store row, same delta) --
    call, g = np.nonzero(length > 0)  # (n_seg,) each, row-major: a call's segments in table order
    s_start, s_len, s_delta = start[call, g], length[call, g], delta[call, g]
    if len(s_delta) and int(np.abs(s_delta).max()) > MAX_TILE_DELTA:
        bad = int(s_delta[np.abs(s_delta) > MAX_TILE_DELTA][0])
        raise ValueError(f"seg_delta {bad} is out of range: tile tables hold position deltas up to "
                         f"+-{MAX_TILE_DELTA}, for the flat loop and the backward; the nested loop "
                         f"(LaunchConfig(flat=False)) runs larger moves, forward only")
    first = np.ones(len(call), dtype=bool)  # (n_seg,) whether a segment begins a run
    first[1:] = (call[1:] != call[:-1]) | (s_start[1:] != s_start[:-1] + s_len[:-1]) | (s_delta[1:] != s_delta[:-1])
    r_call, r_start, r_delta = call[first], s_start[first], s_delta[first]  # (n_run,)
    r_len = np.add.reduceat(s_len, np.flatnonzero(first)) if len(call) else s_len
    per_run = (r_len + block_n - 1) // block_n  # (n_run,) tiles per run
    n_tiles = np.bincount(r_call, weights=per_run, minlength=B).astype(np.int64)  # (B,)
    T = int(n_tiles.max()) if B else 0
    table = np.zeros((B, max(T, 1)), dtype=np.int64)
    if T:
        run_id = np.repeat(np.arange(len(r_call)), per_run)  # (total tiles,) -> run
        j = np.arange(len(run_id)) - (np.cumsum(per_run) - per_run)[run_id]  # tile index within its run
        b = r_call[run_id]
        pos = np.arange(len(run_id)) - (np.cumsum(n_tiles) - n_tiles)[b]  # tile index within its call
        offset = j * block_n
        fields = (r_start[run_id] + offset, np.minimum(r_len[run_id] - offset, block_n), r_delta[run_id])
        table[b, pos] = pack_tiles(*map(torch.from_numpy, fields)).numpy()
    return TileTable(block_n=block_n, tiles=torch.from_numpy(table).to(device),
                     n_tiles=torch.from_numpy(n_tiles.astype(np.int32)).to(device), max_tiles=T,
                     moved=bool(np.any(s_delta != 0)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def half_angles(kernel: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``kernel`` ("fwd", "dq" or "dkdv") evaluates its rotations' cosines and sines on the D / 2
    frequencies and lays them out for both halves of D (True), or once per column (False). Both give the same
    values; the choice is the one that compiles to fewer instructions (sm_90, Triton 3.7, ``ptxas_report``):
    at 16-bit dtypes dq's new-delta block issues 64 instructions instead of 429 (D 128) and its loop 537 per
    tile instead of 555 (with the keys rotated in fp32), the forward's re-rotation at D 64 215 instead of 580
    (in fp32; 111 in bf16 arithmetic); elsewhere it gains nothing or costs registers (fp32 dq spills over 300
    bytes; the forward at bf16 D 128 decode spills 8)."""
    if dtype == torch.float32 or kernel == "dkdv":
        return False
    return kernel == "dq" or head_dim <= 64


def default_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """Split-K ways for a launch of ``programs`` (query blocks x calls x KV heads) over at most ``max_keys``
    segment keys per call: split only when the launch leaves half the GPU's multiprocessors idle and every split
    still gets >= 1024 keys; then aim at ~2 programs per multiprocessor. (Decode over 16k keys, 64 programs on an
    H100's 132 multiprocessors, bf16 D 128: unsplit 284 us; 4 splits 164 us, 8 splits 199, 9 (the earlier aim of
    ~4 programs per multiprocessor) 182, 16 splits 186; on an H200, 8 splits 293 us against 404 unsplit. Splitting
    launches of 256 programs made them slower there: the merge costs more than the idle multiprocessors.)"""
    if device.type != "cuda" or interpreter_active():
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs == 0 or 2 * programs >= sms:  # no query rows (S = 0), or half the GPU busy already
        return 1
    return max(1, min(2 * sms // programs, max_keys // 1024, 64))


MERGE_ROWS = 16  # rows per program of the split-K merge


def _merge_splits(acc, row_max, row_sum, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow reference of the split-K merge (``_merge_splits_kernel`` does it in one launch). Partials: acc
    (splits, B, H, S, D) unnormalised; row_max and row_sum (splits, B, H, S), in log2 units. Returns the output
    (B, H, S, D) in ``dtype`` and each row's log2-sum-exp2 (B, H, S) fp32. Rows with no key anywhere (row_sum 0
    in every split) come out as zeros, with log2-sum-exp2 +inf."""
    m_max = row_max.amax(0)
    m_max = torch.where(m_max == float("-inf"), 0.0, m_max)
    w = torch.exp2(row_max - m_max)  # (splits, B, H, S); 0 where a split saw no key
    total = (row_sum * w).sum(0)
    out = (acc * w[..., None]).sum(0) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, m_max + torch.log2(total), float("inf"))
    return out.to(dtype), lse


# Prefill launches of at least this many packed query rows per (call, KV head), at 16-bit dtypes and D <= 128,
# copy their moved keys first (``LaunchConfig.prerotate``): on an H200 (bf16, H 32, Hkv 8, D 128; 512 to 2048 rows,
# 8 to 32 query blocks of 64 sharing each copy) that took 0.73-0.85x the time of re-rotating in the loop on the
# five moved prefill workloads of ``tests/kernels/bench_segment_attention.py`` (e.g. 728 against 992 us a call on
# prefill-B8-S512-T4k) and the same time unmoved (729 against 733 us; nothing is copied). Fewer rows share the
# copy among fewer query blocks and were not timed: they keep the re-rotation in the loop, as decode does. fp16
# and D 64 were not timed either; they take the rule by the same arithmetic (the copy and the loop's re-rotation
# both scale with D, and fp16 and bf16 move the same bytes).
PREROTATE_ROWS = 512
# The copy is B x Hkv x max_tiles x block_n x D elements, made for the launch and freed after it (on the H200
# workloads above 33-268 MiB, one layer at a time). A default launch whose copy would exceed this keeps the
# re-rotation in the loop instead: e.g. 32 calls over 16k moved keys each at Hkv 8, D 128, bf16 would copy 1 GiB.
PREROTATE_MAX_BYTES = 512 << 20


def launch_config(rows: int, head_dim: int, dtype: torch.dtype, interpret: bool = False) -> LaunchConfig:
    """The default tiles for ``rows`` = S * (H // Hkv) packed query rows of one (call, KV head). Prefill launches
    of ``PREROTATE_ROWS`` rows or more at fp16 / bf16 and D <= 128 copy their moved keys first
    (``LaunchConfig.prerotate``; transient memory of B x Hkv x max_tiles x block_n x D elements when a segment is
    moved, none otherwise; a launch whose copy would exceed ``PREROTATE_MAX_BYTES`` keeps the in-loop
    re-rotation, ``prepare_launch``)."""
    if interpret:  # per-op Python overhead dominates; small tiles keep padding work low
        return LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    half = dtype != torch.float32
    if rows <= 64:  # decode and short chunks: as few padding rows as tl.dot allows
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        return LaunchConfig(block_m=block_m, block_n=64 if head_dim <= 128 else 32, num_warps=4,
                            num_stages=3 if half and head_dim <= 128 else 2)
    if half and head_dim <= 128:  # prefill: the fastest tile of the H200 sweep on segmented workloads
        return LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, prerotate=rows >= PREROTATE_ROWS)
    # fp32 (IEEE dots, twice the registers) and D = 256: 8 warps, so that the tile compiles for sm_90 without
    # spilling registers (4 warps spilled 1.3-5 KB at fp32; ``ptxas_report``). Not timed on a GPU.
    return LaunchConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


def _copy_shape(B: int, Hkv: int, max_tiles: int, block_n: int, D: int) -> tuple[int, int, int, int]:
    """The shape of a prerotating launch's copy of its moved keys (``LaunchConfig.prerotate``): every call's tiles,
    ``block_n`` rows each, per KV head (at least one tile, so that the kernel gets a real buffer)."""
    return (B, Hkv, max(max_tiles, 1) * block_n, D)


def _check_index(name: str, t, shape: tuple[int, ...], device: torch.device, copy: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: all tensors must share q's device")
    if t.dtype == torch.int64 and t.device.type == "cpu" and t.numel():
        lo, hi = int(t.min()), int(t.max())  # on CPU, where reading values needs no device synchronisation
        if lo < -(1 << 31) or hi >= 1 << 31:
            raise ValueError(f"{name} holds {lo if lo < -(1 << 31) else hi}, outside int32: the kernel's tables are "
                             f"int32")
    return _own_copy(t.to(torch.int32).contiguous(), t, copy=copy)


def _own_copy(out: torch.Tensor, given: torch.Tensor, *, copy: bool) -> torch.Tensor:
    """``out``, a conversion of the caller's ``given``; with ``copy``, as a tensor the caller does not hold (copied
    if the conversion returned ``given`` itself)."""
    return out.clone() if copy and out.data_ptr() == given.data_ptr() and given.numel() else out


def _check_table_values(seg_start, seg_len, own_start, own_past, new_len, S: int, N: int) -> None:
    """Data-dependent checks; only run on CPU, where they need no device synchronisation. Sums in int64, so that
    rows near 2**31 cannot wrap back into the store."""
    seg_start, seg_len, own_start, own_past, new_len = (
        t.to(torch.int64) for t in (seg_start, seg_len, own_start, own_past, new_len))
    for name, t in (("seg_len", seg_len), ("own_past", own_past), ("new_len", new_len)):
        if (t < 0).any():
            where = tuple(int(i) for i in (t < 0).nonzero()[0])  # (b, g) for seg_len, (b,) for the others
            at = f"call {where[0]}, segment {where[1]}" if len(where) > 1 else f"call {where[0]}"
            raise ValueError(f"{name} must be >= 0, got {int(t[where])} at {at}")
    if (new_len > S).any():
        raise ValueError(f"new_len must be <= S = {S} (q's token dim), got max {int(new_len.max())}")
    used = seg_len > 0
    outside = ((seg_start < 0) | (seg_start + seg_len > N)) & used
    if outside.any():
        b, g = (int(i) for i in outside.nonzero()[0])
        raise ValueError(f"every non-empty segment must lie in store rows 0 .. N - 1 = {N - 1}: call {b}, segment {g} "
                         f"reads rows {int(seg_start[b, g])} .. {int(seg_start[b, g] + seg_len[b, g]) - 1}")
    own = own_past + new_len > 0  # a call without own rows reads none: its own_start is not used
    bad = (((own_start < 0) | (own_start + own_past + new_len > N)) & own).nonzero()
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"own rows own_start .. own_start + own_past + new_len - 1 must lie in 0 .. {N - 1}: call "
                         f"{b} has own_start {int(own_start[b])}, own_past {int(own_past[b])}, new_len "
                         f"{int(new_len[b])}")


def _check_tiles(tiles: TileTable, seg_start, seg_len, seg_delta) -> None:
    """On CPU: a caller's tile table must be the one ``tile_table`` cuts from this segment table (the kernels
    trust its rows, counts, ``max_tiles`` and ``moved``)."""
    expected = tile_table(seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, block_n=tiles.block_n)
    T = expected.max_tiles
    if not T <= tiles.max_tiles <= tiles.tiles.shape[1]:
        raise ValueError(f"tiles.max_tiles = {tiles.max_tiles} must lie between the {T} tiles of the longest call "
                         f"and tiles.tiles' width {tiles.tiles.shape[1]}")
    if expected.moved and not tiles.moved:
        raise ValueError("tiles.moved is False, but the segment table moves keys (a non-zero seg_delta): the "
                         "kernels would skip their re-rotation")
    if (not torch.equal(tiles.n_tiles.to(torch.int64), expected.n_tiles.to(torch.int64))
            or not torch.equal(tiles.tiles[:, :T], expected.tiles[:, :T]) or tiles.tiles[:, T:].any()):
        raise ValueError(f"tiles are not this segment table cut into tiles of {tiles.block_n} keys: build them "
                         f"with tile_table(seg_start=..., seg_len=..., seg_delta=..., block_n={tiles.block_n})")


def _positive_finite(x) -> bool:
    if isinstance(x, (bool, str, bytes)):
        return False
    try:
        x = float(x)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and x > 0


def segment_attention(q, k_cache, v_cache, *, seg_start, seg_len, seg_delta, own_start, own_past, new_len, inv_freq,
                      scale=None, config: LaunchConfig | None = None, tiles: TileTable | None = None,
                      num_splits: int | None = None, max_own_len: int | None = None) -> torch.Tensor:
    """Attention of B calls over a shared KV store, each to its segment table and causally to its own tokens.

    Everything after v_cache is keyword-only: the six index tables share a dtype and their shapes ((B, G) or
    (B,)), so a swapped pair (own_start for own_past, seg_len for seg_delta) would pass every check.

    q: (B, H, S, D) new tokens, RoPE'd at their positions; row i of call b is valid iff i < new_len[b].
    k_cache, v_cache: (Hkv, N, D) one layer's store, keys RoPE'd at their original positions; H % Hkv == 0.
    seg_start, seg_len, seg_delta: (B, G) int32 segment table (seg_len 0 = padding; delta = position shift);
        int64 is accepted and converted, its values within int32.
    own_start, own_past, new_len: (B,) int32 (or int64, as above); own rows own_start .. own_start + own_past +
        new_len - 1.
    inv_freq: (D / 2,) RoPE inverse frequencies (HF Llama rotate_half convention), used in fp32.
    scale: softmax scale, a positive finite number; default 1 / sqrt(D).
    config: tile sizes (``LaunchConfig``); default ``launch_config(S * H // Hkv, D, q.dtype)``.
    tiles: the segment table cut into tiles of config.block_n (``tile_table``), for the flat loop; default: built
        here (on CUDA that copies the table to the host: a synchronisation; the engine passes its own).
    num_splits: split-K ways (each split takes a share of every call's tiles; partials merged in fp32); default
        ``default_splits`` when the tile table is known, else 1.
    max_own_len: the largest own_past + new_len of any call, if the caller knows it on the host (the engine
        does); the backward sizes its key-tile grid with it. Default: read from the tensors when the backward
        runs (on CUDA a synchronisation).
    Returns (B, H, S, D) in q's dtype; invalid rows are zeros. Differentiable in q, k_cache and v_cache (the store
    is held by reference until the backward: rows the calls read must stay unchanged until then; see
    ``segment_attention_backward``).
    """
    return run_launch(q, k_cache, v_cache, prepare_launch(
        q, k_cache, v_cache, seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, own_start=own_start,
        own_past=own_past, new_len=new_len, inv_freq=inv_freq, scale=scale, config=config, tiles=tiles,
        num_splits=num_splits, max_own_len=max_own_len))


def prepare_launch(q, k_cache, v_cache, *, seg_start, seg_len, seg_delta, own_start, own_past, new_len, inv_freq,
                   scale=None, config: LaunchConfig | None = None, tiles: TileTable | None = None,
                   num_splits: int | None = None, max_own_len: int | None = None, copy_tables: bool = True) -> Launch:
    """Every check and choice of ``segment_attention`` (arguments as there, keyword-only after v_cache), without
    running the kernel: a ``Launch`` that ``run_launch`` runs on these q, k_cache and v_cache or on any of the same
    shapes, dtype and device. A caller that attends many times with one table prepares once: the engine, for every
    layer of a forward pass. The launch copies the segment, own-row and tile tables it was checked with
    (``run_launch`` trusts them); ``copy_tables=False`` keeps the caller's, for a caller that never edits them
    afterwards. (On the CPU, with the kernel launches made no-ops, a pass of 30 layers took 2.9-3.6 ms of host
    time through ``segment_attention`` and 0.70 ms prepared once: ``tests/kernels/bench_launch_host_cost.py``.)
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("inv_freq", inv_freq),
                    ("seg_start", seg_start)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, H, S, D), got shape {tuple(q.shape)}")
    B, H, S, D = q.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    # the kernels scale scores inside the softmax's exponent and take the row max before scaling: scale > 0
    if scale is not None and not _positive_finite(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (Hkv, N, D), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must share q's device")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    Hkv, N, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache head dim {Dk} must equal q's head dim D = {D}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim D must be a power of two in 16..256, got {D}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's H = {H} must be a multiple of k_cache's Hkv = {Hkv} (grouped-query attention)")
    if seg_start.dim() != 2:
        raise ValueError(f"seg_start must be 2-D (B, G), got shape {tuple(seg_start.shape)}")
    G = seg_start.shape[1]
    seg_start, seg_len, seg_delta = (_check_index(n, t, (B, G), q.device, copy_tables) for n, t in
                                     (("seg_start", seg_start), ("seg_len", seg_len), ("seg_delta", seg_delta)))
    own_start, own_past, new_len = (_check_index(n, t, (B,), q.device, copy_tables) for n, t in
                                    (("own_start", own_start), ("own_past", own_past), ("new_len", new_len)))
    if inv_freq.shape != (D // 2,):
        raise ValueError(f"inv_freq must have shape (D/2,) = ({D // 2},), got {tuple(inv_freq.shape)}")
    if not inv_freq.is_floating_point():
        raise TypeError(f"inv_freq must be a floating tensor, got {inv_freq.dtype}")
    if inv_freq.device != q.device:
        raise ValueError(f"inv_freq is on {inv_freq.device} but q is on {q.device}: all tensors must share q's device")
    if config is not None and not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    if max_own_len is not None and (not isinstance(max_own_len, int) or isinstance(max_own_len, bool)
                                    or max_own_len < 0):
        raise ValueError(f"max_own_len must be an integer >= 0 or None, got {max_own_len!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"num_splits must be an integer >= 1 or None, got {num_splits!r}")
    if tiles is not None:
        if not isinstance(tiles, TileTable):
            raise TypeError(f"tiles must be a TileTable or None, got {type(tiles).__name__}")
        if (tiles.tiles.dim() != 2 or tiles.tiles.shape[0] != B or tiles.tiles.dtype != torch.int64
                or tuple(tiles.n_tiles.shape) != (B,) or tiles.n_tiles.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"tiles must hold a (B = {B}, T) int64 table and (B,) int32 counts, got "
                             f"{tuple(tiles.tiles.shape)} {tiles.tiles.dtype} and {tuple(tiles.n_tiles.shape)} "
                             f"{tiles.n_tiles.dtype}")
        if tiles.tiles.device != q.device or tiles.n_tiles.device != q.device:
            raise ValueError(f"tiles.tiles is on {tiles.tiles.device} and tiles.n_tiles on {tiles.n_tiles.device}, "
                             f"but q is on {q.device}: all tensors must share q's device")
        # the kernels read the counts with stride 1, as int32 (copies of both unless copy_tables is False)
        tiles = dataclasses.replace(
            tiles, tiles=_own_copy(tiles.tiles.contiguous(), tiles.tiles, copy=copy_tables),
            n_tiles=_own_copy(tiles.n_tiles.to(torch.int32).contiguous(), tiles.n_tiles, copy=copy_tables))
        if q.device.type == "cpu":
            _check_tiles(tiles, seg_start, seg_len, seg_delta)
    if not is_available(q.device):
        raise RuntimeError(f"segment_attention cannot run on {q.device}: it needs CUDA, or CPU tensors with "
                           "TRITON_INTERPRET=1 set before triton_kernels is imported")
    if q.device.type == "cpu":
        _check_table_values(seg_start, seg_len, own_start, own_past, new_len, S, N)
        if max_own_len is not None and B and max_own_len < int((own_past + new_len).max()):
            raise ValueError(f"max_own_len = {max_own_len} is below the largest own_past + new_len, "
                             f"{int((own_past + new_len).max())}")

    if G == 0:  # a real (never read) table, so no kernel argument is a null pointer
        seg_start = seg_len = seg_delta = torch.zeros((B, 1), dtype=torch.int32, device=q.device)
    group = H // Hkv
    interpret = interpreter_active()
    cfg = config or launch_config(S * group, D, q.dtype, interpret)
    if cfg.flat:
        if tiles is None:
            tiles = tile_table(seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, block_n=cfg.block_n,
                               device=q.device)
        elif tiles.block_n != cfg.block_n:
            raise ValueError(f"tiles were cut for block_n = {tiles.block_n}, but the launch uses block_n = "
                             f"{cfg.block_n}: build them with tile_table(..., block_n={cfg.block_n})")
    if config is None and cfg.prerotate and tiles.moved:  # the default's copy of the moved keys, within its budget
        if math.prod(_copy_shape(B, Hkv, tiles.max_tiles, cfg.block_n, D)) * q.element_size() > PREROTATE_MAX_BYTES:
            cfg = dataclasses.replace(cfg, prerotate=False)
    if num_splits is None:
        programs = triton.cdiv(S * group, cfg.block_m) * B * Hkv
        num_splits = 1 if tiles is None else default_splits(programs, tiles.max_tiles * cfg.block_n, q.device)
    return Launch(seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, own_start=own_start,
                  own_past=own_past, new_len=new_len, inv_freq=inv_freq.to(torch.float32).contiguous(),
                  scale=1.0 / math.sqrt(D) if scale is None else float(scale), config=cfg,
                  tiles=tiles if cfg.flat else None, num_splits=num_splits, G=G, max_own_len=max_own_len,
                  q_shape=(B, H, S, D), kv_shape=(Hkv, N, D), dtype=q.dtype, device=q.device)


def run_launch(q, k_cache, v_cache, launch: Launch) -> torch.Tensor:
    """Run a launch from ``prepare_launch`` on q (B, H, S, D) and k_cache, v_cache (Hkv, N, D) of the shapes,
    dtype and device it was prepared for (checked here; the tables were checked when it was prepared). Returns
    ``segment_attention``'s output, differentiable in the same way.

    Example (one table, every layer)::

        tables = dict(seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, own_start=own_start,
                      own_past=own_past, new_len=new_len)
        launch = prepare_launch(q, k_store[0], v_store[0], **tables, inv_freq=inv_freq)
        outs = [run_launch(q_l, k_l, v_l, launch) for q_l, k_l, v_l in zip(qs, k_store, v_store)]
    """
    if not isinstance(launch, Launch):
        raise TypeError(f"launch must be a Launch from prepare_launch, got {type(launch).__name__}")
    for name, t, shape in (("q", q, launch.q_shape), ("k_cache", k_cache, launch.kv_shape),
                           ("v_cache", v_cache, launch.kv_shape)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != shape or t.dtype != launch.dtype or t.device != launch.device:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}, but the launch was prepared for "
                             f"{shape} {launch.dtype} on {launch.device}")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        from .segment_attention_backward import SegmentAttentionFunction

        if launch.tiles is None:  # the nested loop: its backward walks a tile table, whose deltas are bounded
            moves = launch.seg_delta[launch.seg_len > 0]  # (on CUDA a synchronisation, as the backward's table)
            if moves.numel() and int(moves.abs().max()) > MAX_TILE_DELTA:
                raise ValueError(f"a segment moved by {int(moves.abs().max())} positions has no backward: the "
                                 f"backward's tile table holds moves of at most +-{MAX_TILE_DELTA}; the nested loop "
                                 f"(LaunchConfig(flat=False)) runs larger moves forward only (under torch.no_grad(), "
                                 f"or with inputs that do not require grad)")

        return SegmentAttentionFunction.apply(q, k_cache, v_cache, launch)
    return forward(q, k_cache, v_cache, launch)[0]


def _descriptor(t: torch.Tensor, name: str, block_n: int):
    """A host-made tensor descriptor over one layer's store (Hkv, N, D), tiles of (1, block_n, D)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9:
        raise ValueError(f"LaunchConfig.tma needs a GPU of compute capability >= 9 (Hopper), got "
                         f"{torch.cuda.get_device_capability(t.device)} for {name}")
    ok = t.stride(2) == 1 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:2]) and t.data_ptr() % 16 == 0
    if not ok:
        raise ValueError(f"LaunchConfig.tma needs {name} with unit last stride and 16-byte-aligned strides and base, "
                         f"got strides {t.stride()}")
    return TensorDescriptor.from_tensor(t, block_shape=[1, block_n, t.shape[2]])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
    """A checked call of ``segment_attention`` (``prepare_launch``): int32 tables on q's device (a G = 0 table
    padded to one empty column), fp32 inv_freq, the softmax scale, tiles, the tile table (flat loop; None for the
    nested one) and the split-K ways; the largest own_past + new_len if known on the host; the shapes, dtype and
    device it was checked for (``run_launch`` holds later tensors to them). Shared by the forward and backward
    passes."""

    seg_start: torch.Tensor
    seg_len: torch.Tensor
    seg_delta: torch.Tensor
    own_start: torch.Tensor
    own_past: torch.Tensor
    new_len: torch.Tensor
    inv_freq: torch.Tensor
    scale: float
    config: LaunchConfig
    tiles: TileTable | None
    num_splits: int
    G: int
    max_own_len: int | None = None
    # what it was checked against: q (B, H, S, D), k_cache / v_cache (Hkv, N, D), their dtype and device
    q_shape: tuple[int, int, int, int] = ()
    kv_shape: tuple[int, int, int] = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None


def forward(q, k_cache, v_cache, launch: Launch, *, store_lse: bool = False):
    """Run the forward kernel on checked arguments. Returns the output (B, H, S, D) in q's dtype and, with
    ``store_lse``, each row's log2-sum-exp2 of its scaled scores (B, H, S) fp32 (+inf for rows that saw no key,
    padding rows included), else None."""
    B, H, S, D = q.shape
    Hkv = k_cache.shape[0]
    cfg, num_splits = launch.config, launch.num_splits
    out = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device) if store_lse else None
    if out.numel() == 0:
        return out, lse
    interpret = interpreter_active()
    if launch.tiles is not None:
        table, n_tiles = launch.tiles.tiles, launch.tiles.n_tiles
    else:  # never read: real tensors so no kernel argument is a null pointer
        table, n_tiles = torch.zeros((B, 1), dtype=torch.int64, device=q.device), launch.own_past
    split = num_splits > 1
    if split:  # fp32 partials: unnormalised output, row max and row sum (log2 units)
        part_acc = torch.empty((num_splits, B, H, S, D), dtype=torch.float32, device=q.device)
        part_m, part_l = torch.empty((2, num_splits, B, H, S), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_m = part_l = out
    dot_fp32 = interpret or q.dtype == torch.float32  # the interpreter's bf16 tl.dot is wrong (upstream bug)
    if cfg.tma:
        k_desc, v_desc = (_descriptor(t, name, cfg.block_n) for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")))
    else:  # never read
        k_desc, v_desc = k_cache, v_cache
    moved = launch.tiles is None or launch.tiles.moved
    prerotated = cfg.prerotate and moved
    if prerotated:  # the moved keys, tile by tile, for this launch only: (B, Hkv, T * block_n, D)
        T = launch.tiles.max_tiles
        kp = torch.empty(_copy_shape(B, Hkv, T, cfg.block_n, D), dtype=k_cache.dtype, device=q.device)
        if T:
            _prerotate_keys[(T, B * Hkv)](
                k_cache, kp, table, n_tiles, launch.inv_freq, *k_cache.stride(), *kp.stride()[:3], *table.stride(),
                Hkv, BLOCK_N=cfg.block_n, HEAD_DIM=D, FIX_BF16=interpret and q.dtype == torch.bfloat16,
                num_warps=4)
    else:  # never read
        kp = k_cache
    grid = (triton.cdiv(S * (H // Hkv), cfg.block_m), B * Hkv, num_splits)
    _attn_fwd[grid](
        q, k_cache, v_cache, out, lse if store_lse else out, part_acc, part_m, part_l, k_desc, v_desc, kp,  #
        launch.seg_start, launch.seg_len, launch.seg_delta, table, n_tiles, launch.own_start, launch.own_past,
        launch.new_len, launch.inv_freq, launch.scale * LOG2E,  #
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),  #
        launch.seg_start.stride(0), launch.seg_start.stride(1), *table.stride(),  #
        *(kp.stride()[:3] if prerotated else (0, 0, 0)),  #
        H, Hkv, S, launch.G,  #
        GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, FLAT=cfg.flat,  #
        FLAT_STAGES=cfg.flat_loop_stages, MOVED=moved and not prerotated, SPLIT=split,  #
        STORE_LSE=store_lse and not split, TMA=cfg.tma, HALF_ANGLES=half_angles("fwd", q.dtype, D),  #
        PREROTATED=prerotated,  #
        DOT_FP32=dot_fp32, INPUT_PRECISION="ieee" if dot_fp32 else "tf32",  #
        FIX_BF16=interpret and q.dtype == torch.bfloat16,  #
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:  # one launch (``_merge_splits`` is its reference)
        rows = B * H * S
        _merge_splits_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
            part_acc, part_m, part_l, out, lse if store_lse else part_m, rows, num_splits, *out.stride(), H, S,
            HEAD_DIM=D, BLOCK_R=MERGE_ROWS, STORE_LSE=store_lse, FIX_BF16=interpret and q.dtype == torch.bfloat16,
            num_warps=4)
    return out, lse
