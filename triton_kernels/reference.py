"""Slow, obviously correct references for ``segment_attention`` (the oracle of its tests and benchmarks).

- ``segment_attention_ref``: per call, gather the segment keys (re-rotated by their delta) and the own keys,
  build the mask explicitly, softmax. fp64 by default; ``upcast=False`` computes at the input dtype (rotation in
  fp32, as the engine does), which measures PyTorch's own error at that dtype (flash-attn's ``attention_ref``).
- ``dense_layout`` + ``segment_attention_sdpa``: the same computation materialised as a padded key list per call
  (store row, delta, own index) and a dense boolean mask, run through ``F.scaled_dot_product_attention``.

Shapes: q (B, H, S, D); k_cache / v_cache (Hkv, N, D); segment table (B, G); own_* and new_len (B,). As in
``segment_attention``, the tables and inv_freq are keyword-only (same-typed tables cannot be swapped by position).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["rope_shift", "segment_attention_ref", "DenseLayout", "dense_layout", "segment_attention_sdpa"]


def rope_shift(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE'd rows x (..., D) by integer positions delta (broadcastable to x.shape[:-1]).

    HF Llama rotate_half convention: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin with a = delta * inv_freq.
    Computed in inv_freq's dtype (pass float64 for the oracle); the caller casts the result. Written apart from the
    engine's ``choreo.model.rerotate`` on purpose: the two references check each other
    (``tests/test_attention.py::test_the_engine_and_kernel_references_agree``), which one shared shift could not.
    """
    angle = delta.to(inv_freq.dtype)[..., None] * inv_freq  # (..., D/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(inv_freq.dtype).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def segment_attention_ref(q, k_cache, v_cache, *, seg_start, seg_len, seg_delta, own_start, own_past, new_len,
                          inv_freq, scale=None, upcast=True) -> torch.Tensor:
    """Explicit per-call gather + mask + softmax. Same contract as ``segment_attention``.

    upcast=True: everything in fp64. upcast=False: keys re-rotated in fp32 and rounded to q's dtype, scores,
    softmax and output at q's dtype. Returns (B, H, S, D) in q's dtype; invalid rows are zeros.
    """
    B, H, S, D = q.shape
    Hkv = k_cache.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = torch.float64 if upcast else q.dtype
    freq = inv_freq.to(torch.float64 if upcast else torch.float32)
    out = torch.zeros_like(q)
    for b in range(B):
        rows, deltas, own = [], [], []  # one entry per attended key
        for g in range(seg_start.shape[1]):
            start, n, d = int(seg_start[b, g]), int(seg_len[b, g]), int(seg_delta[b, g])
            rows += range(start, start + n)
            deltas += [d] * n
            own += [-1] * n  # segment keys: visible to every valid row
        n_own = int(own_past[b]) + int(new_len[b])
        rows += range(int(own_start[b]), int(own_start[b]) + n_own)
        deltas += [0] * n_own
        own += range(n_own)
        rows_t = torch.tensor(rows, dtype=torch.long, device=q.device)
        k = rope_shift(k_cache[:, rows_t], torch.tensor(deltas, device=q.device), freq).to(dtype)  # (Hkv, T, D)
        v = v_cache[:, rows_t].to(dtype)
        k, v = k.repeat_interleave(H // Hkv, dim=0), v.repeat_interleave(H // Hkv, dim=0)  # (H, T, D)

        i = torch.arange(S, device=q.device)[:, None]  # (S, 1) query row
        own_t = torch.tensor(own, dtype=torch.long, device=q.device)[None, :]  # (1, T)
        allowed = (i < int(new_len[b])) & ((own_t < 0) | (own_t <= int(own_past[b]) + i))  # (S, T)

        scores = torch.einsum("hsd,htd->hst", q[b].to(dtype), k) * scale  # (H, S, T)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        attn = torch.where(allowed.any(-1)[:, None], attn, 0.0)  # rows with nothing to attend: zeros, not NaN
        out[b] = torch.einsum("hst,htd->hsd", attn, v).to(q.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class DenseLayout:
    """Each call's attended keys as one padded list, and the dense mask over it.

    key_rows (B, T) store row of each key (0 for padding); key_delta (B, T) its position shift;
    key_own (B, T) its own index for own keys, -1 for segment keys, -2 for padding; mask (B, S, T) True = attend.
    """

    key_rows: torch.Tensor
    key_delta: torch.Tensor
    key_own: torch.Tensor
    mask: torch.Tensor

    @property
    def density(self) -> float:
        """Fraction of (query row, key) pairs attended: the useful share of dense attention's work."""
        return self.mask.float().mean().item()


def dense_layout(*, seg_start, seg_len, seg_delta, own_start, own_past, new_len, num_queries: int) -> DenseLayout:
    """Flatten a segment table into per-call key lists and a (B, S, T) mask (built on CPU, moved to the tables'
    device). Every argument is keyword-only.

    Example: one call with segment (start 0, len 2, delta 5) and own_start 7, own_past 1, new_len 2 (S = 2)::

        t = lambda x: torch.tensor(x, dtype=torch.int32)
        dense_layout(seg_start=t([[0]]), seg_len=t([[2]]), seg_delta=t([[5]]), own_start=t([7]), own_past=t([1]),
                     new_len=t([2]), num_queries=2)

        key_rows  [[0, 1, 7, 8, 9]]    key_delta [[5, 5, 0, 0, 0]]    key_own [[-1, -1, 0, 1, 2]]
        mask      [[[1, 1, 1, 1, 0],
                    [1, 1, 1, 1, 1]]]
    """
    device = seg_start.device
    seg_start, seg_len, seg_delta, own_start, own_past, new_len = (
        t.cpu().long() for t in (seg_start, seg_len, seg_delta, own_start, own_past, new_len))
    B = own_start.shape[0]
    per_call = []
    for b in range(B):
        used = seg_len[b] > 0
        starts, lens, deltas = seg_start[b, used], seg_len[b, used], seg_delta[b, used]
        seg_rows = [torch.arange(s, s + n) for s, n in zip(starts.tolist(), lens.tolist())]
        n_own = int(own_past[b] + new_len[b])
        rows = torch.cat(seg_rows + [torch.arange(int(own_start[b]), int(own_start[b]) + n_own)])
        delta = torch.cat([deltas.repeat_interleave(lens), torch.zeros(n_own, dtype=torch.long)])
        own = torch.cat([torch.full((int(lens.sum()),), -1), torch.arange(n_own)])
        per_call.append((rows, delta, own))
    T = max([len(r) for r, _, _ in per_call], default=0)
    key_rows = torch.zeros(B, T, dtype=torch.long)
    key_delta = torch.zeros(B, T, dtype=torch.long)
    key_own = torch.full((B, T), -2, dtype=torch.long)
    for b, (rows, delta, own) in enumerate(per_call):
        key_rows[b, : len(rows)], key_delta[b, : len(rows)], key_own[b, : len(rows)] = rows, delta, own
    i = torch.arange(num_queries)[None, :, None]  # (1, S, 1)
    own_b = key_own[:, None, :]  # (B, 1, T)
    mask = ((own_b == -1) | ((own_b >= 0) & (own_b <= own_past[:, None, None] + i))) & (i < new_len[:, None, None])
    return DenseLayout(key_rows.to(device), key_delta.to(device), key_own.to(device), mask.to(device))


def segment_attention_sdpa(q, k_cache, v_cache, *, seg_start, seg_len, seg_delta, own_start, own_past, new_len,
                           inv_freq, scale=None, layout: DenseLayout | None = None) -> torch.Tensor:
    """Gather + re-rotate each call's keys, then one SDPA call with the dense mask, all at q's dtype.

    Re-rotation runs in fp32 and rounds to q's dtype (fp64 stays fp64). Pass ``layout`` to reuse a
    ``dense_layout``. Returns (B, H, S, D); invalid rows are zeros.
    """
    S = q.shape[2]
    if layout is None:
        layout = dense_layout(seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, own_start=own_start,
                              own_past=own_past, new_len=new_len, num_queries=S)
    freq = inv_freq.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    k = k_cache[:, layout.key_rows].transpose(0, 1)  # (B, Hkv, T, D)
    v = v_cache[:, layout.key_rows].transpose(0, 1)
    k = rope_shift(k, layout.key_delta[:, None, :], freq).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask[:, None], scale=scale, enable_gqa=True)
    return torch.where(layout.mask.any(-1)[:, None, :, None], out, 0.0)  # SDPA gives NaN on fully masked rows
