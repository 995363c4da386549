"""Backward pass of ``segment_attention`` (FlashAttention-2 style, Triton): dQ, and dK / dV into the store.

With the forward's output O and each row's log2-sum-exp2 L, the probabilities are recomputed tile by tile,
P = exp2(s - L) (s: scores in log2 units), and

    dP = dO V^T,    dS = P * (dP - rowsum(dO * O)),    dQ = scale * dS K',    dK' = scale * dS^T Q,    dV = P^T dO

where K' are the keys as the call sees them. A segment moved by delta is seen as R(delta) k (RoPE is relative:
<q, R(delta) k> = <R(-delta) q, k>), so

- ``_attn_bwd_dq`` (one program per query block, call and KV head, the forward's grid) rotates each key tile by
  +delta in registers: dQ += dS (R(delta) K), the rotation's cosines and sines computed once per segment (where
  the delta changes), the loads unmasked as in the forward's flat loop. No atomics; deterministic.
- ``_attn_bwd_dkdv`` (one program per key tile, call and KV head: the call's segment tiles from the forward's tile
  table, then its own keys, as many as ``max_own_len`` allows) rotates its key tile by +delta once, runs a plain
  FlashAttention backward over the unrotated query blocks, dK' += dS^T Q, and turns the rotated keys' gradient
  back to the store's frame once at the end: dK = R(-delta) dK' (R(delta)^T = R(-delta)). (Counter-rotating
  every query block by -delta instead, as the forward does with its one query block, cost a second query load
  and the rotation per block: 503 instructions per 32-row block at bf16 D 128 on sm_90, now 397.) A store
  row may be read by several calls, by several segments of one call, or by its own call and others, so each
  program adds its tile into fp32 dK / dV with atomics (on a GPU the order of those additions, and so the last
  bits of dK / dV, vary from run to run). Under ``torch.use_deterministic_algorithms(True)`` each program
  instead writes its tile to a buffer of per-tile partials, and ``_reduce_partials`` adds them into the store's
  rows in a fixed order (``index_put_`` with ``accumulate=True``: a stable sort by row): the same bits on every
  run, for fp32 partials as large as the keys the calls read (B x tiles x block_n x Hkv x D x 8 bytes) and one
  sort.

The backward recomputes P from scores of keys rotated by +delta; the forward's own loop counter-rotates the query
instead, which at 16-bit dtypes rounds differently (by |s| times a few ulps), and P = exp2(s - L) is only a
distribution when L was summed over the same scores. So the forward of a launch that a backward follows runs
over keys moved first (``scoring_launch``: ``LaunchConfig.prerotate``, the bits the backward rotates to) whenever
a segment is moved; a launch with none runs as configured.

Masks: a row that is not a query (padding) has L = +inf, so its P is exactly 0 with no mask, and so is its
dS = P (dP - 0), its dO and Q being loaded from the call's last new token (finite; unmasked loads); the
scores are masked (-inf) only where a valid row does not attend a key: a partial tile's lanes past its count
in dq's segment loop (a branch taken on partial tiles only), the causal band of the call's own keys. dkdv loads
zeros past its tile's count and masks nothing there in its loop: those lanes gather gradient (possibly inf, where
P = exp2(0 - L) overflows) into their own rows of dK / dV only, which it zeroes once after the loop. The
softmax scale goes into the exponent's fused multiply-add, exp2(s * scale - L). At bf16 D 128 on sm_90 this
took dkdv's loop from 828 to 586 instructions per 128-row block (473 with each row's head computed once
and its query and dO loaded unmasked, ``_query_block``) and dq's from 615 to 537 per 64-key tile (401 with its
key tile rotated in bf16 arithmetic, ``_rotate_rows``: dq and dkdv rotate a bf16 key tile to the same bits).

Contract: between the forward and the backward the caller leaves the store rows the calls read unchanged (the
store tensors themselves may be written elsewhere, as the engine writes later tokens' rows); the store is
held by reference, not copied, and not checked by autograd's version counter. The engine checks it: its
store counts row writes, and a gradient hook raises if rows a pass read were rewritten before that pass's
backward (``KVStore.read_guard``; e.g. two replays summed into one loss, the second reusing freed rows).

Supported as the forward is, except split-K (the backward does not split) and the nested loop (``flat=False``
launches get a tile table built here, so their position deltas must fit one: +-4194303, ``tile_table``).
Tiles: ``backward_configs``; chosen to compile without register spills for sm_90 (``ptxas_report``), not yet
timed on a GPU.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from .segment_attention import (LOG2E, Launch, LaunchConfig, _rope_tables, _rotate, _rotate_rows, _rotation, _tile,
                                _to, _token_to_load, forward, half_angles, interpreter_active, tile_table)

__all__ = ["SegmentAttentionFunction", "backward", "backward_configs", "scoring_launch"]


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # acc + a @ b with fp32 accumulation; DOT_FP32 upcasts the operands (fp32 inputs, and the interpreter,
    # whose bf16 tl.dot is wrong).
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _scores(q, k, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # Unscaled scores q k^T (BLOCK_M, BLOCK_N) fp32 of q (BLOCK_M, D) and k (BLOCK_N, D) as the rows see them.
    return _mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), DOT_FP32, INPUT_PRECISION)


@triton.jit
def _grad_scores(s, qk_scale, v, do, lse, di, DTYPE: tl.constexpr,
                 DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    # s: unscaled scores (``_scores``), -inf where a row does not attend a key; do (BLOCK_M, D); v (BLOCK_N, D);
    # lse, di (BLOCK_M,). Returns P and dS (BLOCK_M, BLOCK_N) at DTYPE, ready for the next dots. A row that is
    # not a query (padding) has lse = +inf and di = 0, so its P and dS are 0 with no mask wherever its scores and
    # dO are finite: the callers mask only what a row does not attend (a partial tile's lanes, the causal band),
    # and the scale goes into the exponent's fused multiply-add.
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = _mma(do, tl.trans(v), tl.zeros([s.shape[0], v.shape[0]], dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
    ds = p * (dp - di[:, None])
    return _to(p, DTYPE, FIX_BF16), _to(ds, DTYPE, FIX_BF16)


@triton.jit
def _swap_halves(x, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    # x (ROWS, D) with its two halves of D swapped, cat(x2, x1), in registers (rotate_half(x) is this with its
    # first half negated).
    halves = tl.permute(tl.reshape(x, (ROWS, 2, HEAD_DIM // 2)), (0, 2, 1))  # (ROWS, D / 2, 2)
    x1, x2 = tl.split(halves)
    return tl.reshape(tl.permute(tl.join(x2, x1), (0, 2, 1)), (ROWS, HEAD_DIM))


@triton.jit
def _query_block(DO, LSE, DI, start_m, off_b, off_hkv, n_new, H, S, stride_qb, stride_qh, stride_qs, stride_qd,
                 offs_d, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    # Packed query rows start_m .. start_m + BLOCK_M - 1 of call off_b and KV head off_hkv, as in the forward
    # (row r: token r // GROUP, query head off_hkv * GROUP + r % GROUP). Returns each row's token and validity,
    # its offsets into Q / DO / DQ (BLOCK_M, 1), the offsets to load from (the same, invalid rows pointed at the
    # call's last new token, or at token 0 of a call with none: in bounds, and finite but for a call with no
    # query rows, whose rows no loop reads), its dO (BLOCK_M, D) loaded from those, and its log2-sum-exp2 and
    # rowsum(dO * O) (BLOCK_M,; +inf and 0 on invalid rows). LSE and DI are (B, H, S) contiguous.
    r = tl.arange(0, BLOCK_M)
    if BLOCK_M % GROUP == 0:
        # start_m is a multiple of BLOCK_M, so of GROUP: each row's head and its token's offset from the block's
        # first token do not depend on start_m, and a loop over blocks computes them once (dkdv's loop: 586 -> 512
        # instructions per 128-row block at bf16 D 128, sm_90; 473 with the unmasked loads below)
        head = off_hkv * GROUP + r % GROUP
        tok = start_m // GROUP + r // GROUP
    else:
        head = off_hkv * GROUP + (start_m + r) % GROUP
        tok = (start_m + r) // GROUP
    rows = off_b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh + tok[:, None] * stride_qs
    stat = (off_b * H + head).to(tl.int64) * S + tok
    row_ok = tok < n_new
    tok_ld = _token_to_load(tok, n_new)
    rows_ld = off_b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh + tok_ld[:, None] * stride_qs
    do = tl.load(DO + rows_ld + offs_d[None, :] * stride_qd)
    lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
    di = tl.load(DI + stat, mask=row_ok, other=0.0)
    return tok, row_ok, rows, rows_ld, do, lse, di


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DI, DQ,  #
                 TILES, N_TILES, OWN_START, OWN_PAST, NEW_LEN, INV_FREQ, qk_scale, sm_scale,  #
                 stride_qb, stride_qh, stride_qs, stride_qd,  #
                 stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,  #
                 stride_tb, stride_tt,  #
                 H, Hkv, S,  #
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                 DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,  #
                 FLAT_STAGES: tl.constexpr, MOVED: tl.constexpr, HALF_ANGLES: tl.constexpr):
    # DO and DQ share Q's strides (the host makes them so); LSE and DI are (B, H, S) contiguous. FLAT_STAGES:
    # the segment loop's pipelining stages (its K/V addresses come from a tile-table load: ``LaunchConfig``).
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hkv
    off_hkv = off_bh % Hkv
    DTYPE = Q.dtype.element_ty

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_new = tl.minimum(tl.load(NEW_LEN + off_b), S)
    alive = (start_m * BLOCK_M) // GROUP < n_new
    tok_hi = tl.minimum((start_m * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
    tok, row_ok, rows, _, do, lse, di = _query_block(DO, LSE, DI, start_m * BLOCK_M, off_b, off_hkv, n_new, H, S,
                                                  stride_qb, stride_qh, stride_qs, stride_qd, offs_d, GROUP, BLOCK_M)
    q = tl.load(Q + rows + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    inv_freq, offs_swap = _rope_tables(INV_FREQ, offs_d, HEAD_DIM, HALF_ANGLES)
    K_HEAD = K + off_hkv.to(tl.int64) * stride_kh
    V_HEAD = V + off_hkv.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- the segments' key tiles, each rotated by its +delta (every valid row sees every key) --
    T_ROW = TILES + off_b.to(tl.int64) * stride_tb
    n_tiles = tl.where(alive, tl.load(N_TILES + off_b), 0)
    _, _, cur = _tile(T_ROW, n_tiles > 0)
    cos_a, sin_a = _rotation(inv_freq, -cur, HEAD_DIM, HALF_ANGLES)  # R(+delta), recomputed where the delta changes
    for t in tl.range(0, n_tiles, num_stages=FLAT_STAGES):
        row, cnt, delta = _tile(T_ROW + t * stride_tt, True)
        col_ok = offs_n < cnt
        # Unmasked loads, as in the forward's flat loop: lanes past the count re-read the tile's last key.
        key = tl.minimum(offs_n, cnt - 1)  # (BLOCK_N,)
        k_rows = K_HEAD + row * stride_kn + key[:, None] * stride_kn
        if MOVED:
            if delta != cur:
                cos_a, sin_a = _rotation(inv_freq, -delta, HEAD_DIM, HALF_ANGLES)
                cur = delta
            k = tl.load(k_rows + offs_d[None, :] * stride_kd)  # (BLOCK_N, D)
            k_swap = tl.load(k_rows + offs_swap[None, :] * stride_kd, mask=delta != 0, other=0.0)
            k = _rotate_rows(k, k_swap, cos_a, sin_a, FIX_BF16)  # R(+delta) k, as dkdv rotates it
        else:  # no tile of the launch is moved
            k = tl.load(k_rows + offs_d[None, :] * stride_kd)
        v = tl.load(V_HEAD + row * stride_vn + (key[:, None] * stride_vn + offs_d[None, :] * stride_vd))
        s = _scores(q, k, DOT_FP32, INPUT_PRECISION)
        if cnt < BLOCK_N:  # a partial tile: its lanes past the count re-read its last key
            s = tl.where(col_ok[None, :], s, float("-inf"))
        p, ds = _grad_scores(s, qk_scale, v, do, lse, di, DTYPE, DOT_FP32, INPUT_PRECISION, FIX_BF16)
        dq = _mma(ds, k, dq, DOT_FP32, INPUT_PRECISION)

    # -- the call's own keys, causal: own key j is seen by row tok iff j <= own_past + tok --
    own_past = tl.load(OWN_PAST + off_b)
    own_start = tl.load(OWN_START + off_b).to(tl.int64)
    own_hi = tl.where(alive, own_past + tok_hi + 1, 0)
    for j0 in range(0, own_hi, BLOCK_N):
        cols = j0 + offs_n
        k = tl.load(K_HEAD + (own_start + cols)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(cols < own_hi)[:, None], other=0.0)
        v = tl.load(V_HEAD + (own_start + cols)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=(cols < own_hi)[:, None], other=0.0)
        # causal; own keys past the call's (cols >= own_hi) lie past every valid row's limit too
        s = tl.where(cols[None, :] <= (own_past + tok)[:, None], _scores(q, k, DOT_FP32, INPUT_PRECISION),
                     float("-inf"))
        p, ds = _grad_scores(s, qk_scale, v, do, lse, di, DTYPE, DOT_FP32, INPUT_PRECISION, FIX_BF16)
        dq = _mma(ds, k, dq, DOT_FP32, INPUT_PRECISION)

    dq = tl.where(row_ok[:, None], dq * sm_scale, 0.0)
    tl.store(DQ + rows + offs_d[None, :] * stride_qd, _to(dq, DQ.dtype.element_ty, FIX_BF16), mask=(tok < S)[:, None])


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DI, DK, DV, DEST,  #
                   TILES, N_TILES, OWN_START, OWN_PAST, NEW_LEN, INV_FREQ, qk_scale, sm_scale,  #
                   stride_qb, stride_qh, stride_qs, stride_qd,  #
                   stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,  #
                   stride_tb, stride_tt,  #
                   H, Hkv, S, N,  #
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                   DETERMINISTIC: tl.constexpr, MOVED: tl.constexpr, HALF_ANGLES: tl.constexpr,  #
                   DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    # Program (t, b * Hkv + h): key tile t of call b, KV head h. Tiles 0 .. n_tiles[b] - 1 are the call's segment
    # tiles (tile table); tile n_tiles[b] + i holds own keys i * BLOCK_N .. of the call. DK / DV: (Hkv, N, D) fp32
    # contiguous, added to atomically; DETERMINISTIC: (P, Hkv, D) fp32 partials instead, P = B * tiles * BLOCK_N,
    # each program writing its tile's rows (zeros past its count) and DEST (P,) int64 the store row of each (N for
    # none), for ``_reduce_partials`` to add in a fixed order.
    pid = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hkv
    off_hkv = off_bh % Hkv
    DTYPE = Q.dtype.element_ty

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_new = tl.minimum(tl.load(NEW_LEN + off_b), S)
    own_past = tl.load(OWN_PAST + off_b)
    n_tiles = tl.load(N_TILES + off_b)
    is_seg = pid < n_tiles
    T_ROW = TILES + off_b.to(tl.int64) * stride_tb
    t = tl.minimum(pid, tl.maximum(n_tiles - 1, 0))  # a valid column either way; read only for segment tiles
    j0 = (pid - n_tiles) * BLOCK_N  # own index of an own tile's first key
    seg_row, seg_cnt, seg_delta = _tile(T_ROW + t * stride_tt, is_seg)
    row = tl.where(is_seg, seg_row, tl.load(OWN_START + off_b).to(tl.int64) + j0)
    cnt = tl.where(is_seg, seg_cnt, tl.minimum(tl.maximum(own_past + n_new - j0, 0), BLOCK_N))
    delta = tl.where(is_seg, seg_delta, 0)
    col_ok = offs_n < cnt
    # Rows that can see this tile: every valid row for a segment tile; tokens >= j0 - own_past for an own tile.
    m_lo = tl.where(is_seg, 0, tl.maximum(j0 - own_past, 0) * GROUP // BLOCK_M * BLOCK_M)
    m_hi = tl.where(cnt > 0, n_new * GROUP, 0)

    K_HEAD = K + off_hkv.to(tl.int64) * stride_kh
    V_HEAD = V + off_hkv.to(tl.int64) * stride_vh
    # The keys as the call sees them, R(+delta) k, rotated once here (not every query block by -delta): the loop
    # below is a plain FlashAttention backward over unrotated queries, and dK comes back to the store's frame
    # once at the end.
    inv_freq, offs_swap = _rope_tables(INV_FREQ, offs_d, HEAD_DIM, HALF_ANGLES)
    k_rows = K_HEAD + (row + offs_n)[:, None] * stride_kn
    k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
    if MOVED:
        cos_a, sin_a = _rotation(inv_freq, -delta, HEAD_DIM, HALF_ANGLES)  # R(+delta)
        k_swap = tl.load(k_rows + offs_swap[None, :] * stride_kd, mask=col_ok[:, None] & (delta != 0), other=0.0)
        k = _rotate_rows(k, k_swap, cos_a, sin_a, FIX_BF16)  # the same bits as dq's rotated keys
    v = tl.load(V_HEAD + (row + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # gradient of the rotated keys
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    for start_m in range(m_lo, m_hi, BLOCK_M):
        tok, row_ok, _, rows, do, lse, di = _query_block(DO, LSE, DI, start_m, off_b, off_hkv, n_new, H, S, stride_qb,
                                                      stride_qh, stride_qs, stride_qd, offs_d, GROUP, BLOCK_M)
        q = tl.load(Q + rows + offs_d[None, :] * stride_qd)  # (BLOCK_M, D)
        s = _scores(q, k, DOT_FP32, INPUT_PRECISION)
        if not is_seg:  # an own tile: causal
            s = tl.where((j0 + offs_n)[None, :] <= (own_past + tok)[:, None], s, float("-inf"))
        p, ds = _grad_scores(s, qk_scale, v, do, lse, di, DTYPE, DOT_FP32, INPUT_PRECISION, FIX_BF16)
        dv = _mma(tl.trans(p), do, dv, DOT_FP32, INPUT_PRECISION)
        dk = _mma(tl.trans(ds), q, dk, DOT_FP32, INPUT_PRECISION)
    # Lanes past the tile's count (zero keys and values, unmasked in the loop) gathered gradient into their own
    # rows only: zero them.
    dk = tl.where(col_ok[:, None], dk, 0.0)
    dv = tl.where(col_ok[:, None], dv, 0.0)

    # d/dk <q, R(delta) k> = R(delta)^T (...) = R(-delta) (...): the rotated keys' gradient in the store's frame.
    if MOVED:
        cos_b, sin_b = _rotation(inv_freq, delta, HEAD_DIM, HALF_ANGLES)
        dk = _rotate(dk, _swap_halves(dk, BLOCK_N, HEAD_DIM), cos_b, sin_b)

    if DETERMINISTIC:
        part = (off_b * tl.num_programs(0) + pid).to(tl.int64) * BLOCK_N + offs_n  # (BLOCK_N,) partial rows
        out = (part[:, None] * Hkv + off_hkv) * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out, dk * sm_scale)  # rows past cnt are exact zeros: no query attended them
        tl.store(DV + out, dv)
        tl.store(DEST + part, tl.where(col_ok, row + offs_n, N), mask=off_hkv == 0)
    else:
        out = off_hkv.to(tl.int64) * N * HEAD_DIM + (row + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(DK + out, dk * sm_scale, mask=col_ok[:, None])
        tl.atomic_add(DV + out, dv, mask=col_ok[:, None])


# ----------------------------------------------------------------------------------------------- host side
def scoring_launch(launch: Launch) -> Launch:
    """The launch a forward runs when a backward will follow: ``launch`` itself when no segment is moved, else
    the same tiles over keys moved first (``LaunchConfig.prerotate``; a nested-loop launch gets its tile table
    here, a TMA one the default loads), so that the forward scores every moved key as the backward does.

    The backward recomputes P = exp2(s - L) with the forward's row statistics L, from scores of key tiles it
    rotates in registers (``_rotate_rows``, the bits ``_prerotate_keys`` writes). The forward's own re-rotation
    counter-rotates the query instead, rounded to the dtype: the same scores in exact arithmetic, but at 16-bit
    dtypes they differ by |s| times a few ulps, and where scaled scores are large P's rows no longer summed to 1.
    At scale 1.7 (D 128, a segment moved 9 positions, fp16 or bf16) dV came out 3.0-3.3x PyTorch's error at the
    dtype; with the keys moved first, 0.2-0.3x (tests/kernels/test_segment_attention_backward.py,
    ``test_gradients_at_large_scale``)."""
    cfg, tiles = launch.config, launch.tiles
    if tiles is None:  # the nested loop: moved if a used segment has a delta (on CUDA a sync)
        if not bool((launch.seg_delta[launch.seg_len > 0] != 0).any()):
            return launch  # as configured; the backward cuts its table
        tiles = tile_table(seg_start=launch.seg_start, seg_len=launch.seg_len, seg_delta=launch.seg_delta,
                           block_n=cfg.block_n, device=launch.device)
    elif not tiles.moved:
        return launch
    config = dataclasses.replace(cfg, flat=True, tma=False, prerotate=True)
    return dataclasses.replace(launch, config=config, tiles=tiles)


def dq_flat_stages(num_stages: int, head_dim: int, dtype: torch.dtype) -> int | None:
    """The stages of dq's loop over the tile table (``LaunchConfig.flat_stages``) for a dq tile of ``num_stages``:
    num_stages + 1 at fp16 / bf16 with D <= 128 (see ``backward_configs``), else the LaunchConfig default."""
    return num_stages + 1 if dtype != torch.float32 and head_dim <= 128 else None


def backward_configs(forward_config: LaunchConfig, rows: int, head_dim: int, dtype: torch.dtype,
                     interpret: bool = False) -> tuple[LaunchConfig, LaunchConfig]:
    """Tiles of the two backward kernels, (dq, dkdv), for ``rows`` = S * (H // Hkv) packed query rows.

    The key tile is the forward's ``block_n``, so the forward's tile table serves both passes. Query blocks,
    warps and stages are the largest that compile for sm_90 without spilling registers and fit an H100's 227 KiB
    of shared memory (``ptxas_report``; checked by a test); timed against the earlier tiles on an H100 and an H200
    (1.4-1.6x faster than dq on 64 rows and dkdv on 32 on the H100: ``results/kernels/segment_attention_training.md``
    as committed at 58222f9, in the repository's history; on the H200 the fastest of the sweep on three of four
    prefill workloads: ``segment_attention_1001322_training.md``). A query block is at most
    ``rows`` rounded up to a power of two (>= 16). dq's segment loop loads each K tile twice (as stored and
    half-swapped, for the rotation) and its V tile at addresses from the tile table: at fp16 / bf16, D <= 128 it
    gets stages + 1 stages, the fewest with which Triton 3.7 pipelines it (K/V one tile ahead). At bf16 the prefill
    tiles are 128-row query blocks on 8 warps (203-255 registers: one program per multiprocessor): since dkdv
    rotates its key tile once instead of every query block, its 128-row block compiles without spilling (D 128: 473
    instructions per block on sm_90, about 0.46x the issue cycles of its four dots; 787-831 with per-element masks,
    0.8x; the earlier 32-row block issued 1.55x), and so does dq's (401 instructions per 128 x 64 tile, 0.5x; 537
    with its keys rotated in fp32, 615 with per-element masks; 64 rows: 717, 1.87x). dkdv's 128-row block at D 128
    gets 2 stages (3 would need 242 KiB).
    """
    n = forward_config.block_n
    if interpret:
        one = LaunchConfig(block_m=16, block_n=n, num_warps=1, num_stages=1)
        return one, one
    if dtype == torch.float32:  # IEEE fp32 dots hold twice the registers: small query blocks, one stage
        (m_dq, s_dq), (m_kv, s_kv) = (16, 1), (16, 1)
    elif head_dim <= 128:
        (m_dq, s_dq), (m_kv, s_kv) = (128, 2), (128, 3)
    else:
        (m_dq, s_dq), (m_kv, s_kv) = (32, 1), (32, 1)
    fit = max(16, triton.next_power_of_2(rows))
    m_dq, m_kv = min(m_dq, fit), min(m_kv, fit)
    if head_dim > 64 and m_kv >= 128:  # a third query-block buffer would take dkdv to 242 KiB of shared memory
        s_kv = 2
    return (LaunchConfig(block_m=m_dq, block_n=n, num_warps=8, num_stages=s_dq,
                         flat_stages=dq_flat_stages(s_dq, head_dim, dtype)),
            LaunchConfig(block_m=m_kv, block_n=n, num_warps=8, num_stages=s_kv))


def backward(do, q, k_cache, v_cache, out, lse, launch: Launch, *, need_dq: bool = True, need_dkv: bool = True,
             deterministic: bool | None = None):
    """Gradients of ``segment_attention`` for a checked ``launch``: do, q, out (B, H, S, D); k_cache, v_cache
    (Hkv, N, D); lse (B, H, S) fp32 from ``forward(..., store_lse=True)``. Returns dq (B, H, S, D) in q's dtype
    and dk, dv (Hkv, N, D) in the store's dtype, zero on rows no call read; None for those not needed (that
    kernel is not launched). ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``): dK / dV
    from per-tile partials added in a fixed order instead of atomics, the same bits on every run."""
    B, H, S, D = q.shape
    Hkv, N, _ = k_cache.shape
    if q.numel() == 0 or N == 0:  # no row or no key: nothing attended, zero gradients
        return (torch.zeros_like(q) if need_dq else None, torch.zeros_like(k_cache) if need_dkv else None,
                torch.zeros_like(v_cache) if need_dkv else None)
    interpret = interpreter_active()
    cfg_dq, cfg_kv = backward_configs(launch.config, S * (H // Hkv), D, q.dtype, interpret)
    tiles = launch.tiles
    if tiles is None:  # a nested-loop forward: cut its table here (on CUDA, one synchronisation)
        tiles = tile_table(seg_start=launch.seg_start, seg_len=launch.seg_len, seg_delta=launch.seg_delta,
                           block_n=cfg_dq.block_n, device=q.device)
    q = q.contiguous()
    do = do.to(q.dtype).contiguous()
    di = (do.float() * out.float()).sum(-1)  # (B, H, S): rowsum(dO * O)
    dot_fp32 = interpret or q.dtype == torch.float32
    common = dict(GROUP=H // Hkv, HEAD_DIM=D, DOT_FP32=dot_fp32, INPUT_PRECISION="ieee" if dot_fp32 else "tf32",
                  FIX_BF16=interpret and q.dtype == torch.bfloat16)
    args = (tiles.tiles, tiles.n_tiles, launch.own_start, launch.own_past, launch.new_len, launch.inv_freq,
            launch.scale * LOG2E, launch.scale, *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *tiles.tiles.stride())
    dq = dk = dv = None
    if need_dq:
        dq = torch.empty_like(q)  # do and dq share q's (contiguous) strides
        _attn_bwd_dq[(triton.cdiv(S * (H // Hkv), cfg_dq.block_m), B * Hkv)](
            q, k_cache, v_cache, do, lse, di, dq, *args, H, Hkv, S, **common, **_tiles(cfg_dq),
            FLAT_STAGES=cfg_dq.flat_loop_stages, MOVED=tiles.moved, HALF_ANGLES=half_angles("dq", q.dtype, D))
    if need_dkv:
        # Key tiles per call: its segment tiles, then its own keys (own_past + new_len of them; unless the caller
        # gave the largest, it is read back here: one synchronisation on CUDA).
        own_len = launch.max_own_len
        if own_len is None:
            own_len = int((launch.own_past + launch.new_len.clamp(max=S)).max())
        grid = (tiles.max_tiles + triton.cdiv(own_len, cfg_kv.block_n), B * Hkv)
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        if deterministic:
            rows = B * grid[0] * cfg_kv.block_n
            dk, dv = torch.empty((2, rows, Hkv, D), dtype=torch.float32, device=q.device)  # per-tile partials
            dest = torch.empty(rows, dtype=torch.int64, device=q.device)
        else:
            dk, dv = torch.zeros((2, Hkv, N, D), dtype=torch.float32, device=q.device)  # fp32, added to atomically
            dest = dk  # unused
        _attn_bwd_dkdv[grid](q, k_cache, v_cache, do, lse, di, dk, dv, dest, *args, H, Hkv, S, N, **common,
                             DETERMINISTIC=deterministic, MOVED=tiles.moved,
                             HALF_ANGLES=half_angles("dkdv", q.dtype, D), **_tiles(cfg_kv))
        if deterministic:
            dk, dv = _reduce_partials(dk, dest, N), _reduce_partials(dv, dest, N)
        dk, dv = dk.to(k_cache.dtype), dv.to(v_cache.dtype)
    return dq, dk, dv


def _reduce_partials(part: torch.Tensor, dest: torch.Tensor, N: int) -> torch.Tensor:
    """Add per-tile partials part (P, Hkv, D) into store rows dest (P,) (N: discarded), in the same order on every
    run: ``index_put_`` with ``accumulate=True`` sorts the rows stably and adds each row's partials in turn (on
    CUDA always; on CPU under ``torch.use_deterministic_algorithms``, the flag that selects this path unless
    ``backward`` is called with ``deterministic=True``). Returns (Hkv, N, D) fp32, contiguous."""
    out = torch.zeros((N + 1,) + part.shape[1:], dtype=part.dtype, device=part.device)
    out.index_put_((dest,), part, accumulate=True)
    return out[:N].transpose(0, 1).contiguous()


def _tiles(cfg: LaunchConfig) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class SegmentAttentionFunction(torch.autograd.Function):
    """``segment_attention`` with gradients to q, k_cache and v_cache (``segment_attention`` uses it when any
    of them requires grad). The store is saved by reference: see the module's contract."""

    @staticmethod
    def forward(ctx, q, k_cache, v_cache, launch: Launch):
        launch = scoring_launch(launch)
        out, lse = forward(q, k_cache, v_cache, launch, store_lse=True)
        ctx.save_for_backward(q, out, lse)
        ctx.store = (k_cache.detach(), v_cache.detach())  # by reference: later writes to other rows are allowed
        ctx.launch = launch
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, out, lse = ctx.saved_tensors
        k_cache, v_cache = ctx.store
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = backward(dout, q, k_cache, v_cache, out, lse, ctx.launch, need_dq=need_q,
                              need_dkv=need_k or need_v)
        return dq, dk, dv, None
