"""Attention backends for choreographed calls, behind one function signature.

Each call of a batch attends to a list of cached segments (store rows with a position shift) and,
causally, to its own tokens (already written to the store). ``AttentionPlan`` names that once per
forward step; a backend turns it into attention:

- ``reference``: a dense boolean mask over every store row, fp64 math. Slow and obviously correct; the oracle.
- ``torch``: gathers the attended rows of each call, re-rotates moved keys, one SDPA call (outside autograd, a
  single call over one unmoved run of the store reads it in place). The CPU default.
- ``triton``: the fused kernel of ``triton_kernels`` (segment table in the kernel, keys re-rotated in
  registers, no gather). The default on CUDA for models whose heads it runs (head dim a power of two in
  16..256; fp32, fp16 or bf16); ``torch`` there otherwise.

Shapes: q (B, H, S, D); store k/v (Hkv, N, D); output (B, H, S, D).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .model import rerotate

Segment = tuple[int, int, int]  # (first store row, length, position delta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionPlan:
    """What each of B calls attends to in one forward step.

    Example: call 0 attends to message rows 0..9 moved by +5 and to its own 3 tokens, 2 of them new::

        AttentionPlan(segments=(((0, 10, 5),),), own_start=(40,), own_past=(1,), new_len=(2,))

    Query row i of call b is the token at own index ``own_past[b] + i``; it sees every row of every
    segment of b, and own rows ``own_start[b] .. own_start[b] + own_past[b] + i``.
    """

    segments: tuple[tuple[Segment, ...], ...]
    own_start: tuple[int, ...]
    own_past: tuple[int, ...]
    new_len: tuple[int, ...]
    _index: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def batch(self) -> int:
        return len(self.own_start)

    @property
    def max_new(self) -> int:
        return max(self.new_len)

    def read_rows(self) -> torch.Tensor:
        """Every store row some call reads (segments and own rows, with repeats), int64 on the host."""
        runs = [(s, n) for segs in self.segments for s, n, _ in segs]
        runs += [(o, p + n) for o, p, n in zip(self.own_start, self.own_past, self.new_len)]
        return torch.cat([torch.arange(s, s + n) for s, n in runs] + [torch.zeros(0, dtype=torch.long)])

    @functools.cached_property
    def max_own_len(self) -> int:
        """The most own keys any call attends to (own_past + new_len): the kernel's backward grid."""
        return max(p + n for p, n in zip(self.own_past, self.new_len))

    @functools.cached_property
    def any_delta(self) -> bool:
        return any(d for segs in self.segments for _, _, d in segs)

    @functools.cached_property
    def single_run(self) -> tuple[int, int] | None:
        """(first, stop) store rows when one call reads one unmoved run of the store: its segments back to back,
        none moved, then its own rows (a call over its parents, prefilled in order). None otherwise."""
        if self.batch != 1:
            return None
        at = self.segments[0][0][0] if self.segments[0] else self.own_start[0]
        first = at
        for row, n, d in self.segments[0]:
            if row != at or d:
                return None
            at += n
        if at != self.own_start[0]:
            return None
        return first, at + self.own_past[0] + self.new_len[0]

    def rows(self, b: int) -> tuple[list[int], list[int]]:
        """Store rows attended by call b (segments, then own rows up to its last new token) and their deltas."""
        rows, deltas = [], []
        for row, n, d in self.segments[b]:
            rows.extend(range(row, row + n))
            deltas.extend([d] * n)
        own = self.own_past[b] + self.new_len[b]
        rows.extend(range(self.own_start[b], self.own_start[b] + own))
        deltas.extend([0] * own)
        return rows, deltas

    def gather_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded key rows (B, T), deltas (B, T) and a bool mask (B, 1, S, T) for gathered attention."""
        device = torch.device(device)
        if device not in self._index:  # built once per step, shared by all layers
            self._index[device] = self._build_index(device)
        return self._index[device]

    def additive_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``gather_index``'s mask as SDPA's additive float mask (0 where attended, -inf elsewhere), (B, 1, S, T) of
        ``dtype``: SDPA converts a boolean mask to this in every layer; here it is made once per step."""
        key = ("additive", torch.device(device), dtype)
        if key not in self._index:
            mask = self.gather_index(device)[2]
            self._index[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
        return self._index[key]

    def kernel_tables(self, device: torch.device, block_n: int) -> dict:
        """``segment_attention``'s keyword arguments for this plan's tables, int32 on ``device``: seg_start, seg_len,
        seg_delta (B, G) (G = the most segments of any call, shorter rows padded with empty segments), own_start,
        own_past, new_len (B,), and tiles, their ``triton_kernels.tile_table`` for tiles of ``block_n``. Built on
        the host and copied to ``device`` together: one copy per step and tile size, shared by all layers.

        Example: ``prepare_launch(q, k, v, **plan.kernel_tables(q.device, 64), inv_freq=inv_freq)``.
        """
        from triton_kernels import TileTable, tile_table

        device = torch.device(device)
        key = ("kernel", device, block_n)
        if key not in self._index:
            table, own = self._host_table()
            tiles = tile_table(seg_start=table[0], seg_len=table[1], seg_delta=table[2], block_n=block_n)
            # The int64 tile entries go first, as int32 pairs, so that their view back is 8-byte aligned.
            parts = [tiles.tiles.view(torch.int32), table, own, tiles.n_tiles]
            flat = torch.cat([p.flatten() for p in parts]).to(device)  # one copy
            views, at = [], 0
            for p in parts:
                views.append(flat[at:at + p.numel()].view(p.shape))
                at += p.numel()
            (seg_start, seg_len, seg_delta), (own_start, own_past, new_len) = views[1], views[2]
            self._index[key] = dict(
                seg_start=seg_start, seg_len=seg_len, seg_delta=seg_delta, own_start=own_start, own_past=own_past,
                new_len=new_len, tiles=TileTable(block_n=block_n, tiles=views[0].view(torch.int64), n_tiles=views[3],
                                                 max_tiles=tiles.max_tiles, moved=tiles.moved))
        return dict(self._index[key])  # a copy: a caller's edit of the dict cannot reach the cache

    def _host_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, G) segment rows (start, length, delta) and (3, B) own rows (start, past, new), int32 on the host."""
        G = max((len(s) for s in self.segments), default=0)
        table = torch.zeros(3, self.batch, G, dtype=torch.int32)
        for b, segs in enumerate(self.segments):
            if segs:
                table[:, b, :len(segs)] = torch.tensor(segs, dtype=torch.int32).T
        return table, torch.tensor([self.own_start, self.own_past, self.new_len], dtype=torch.int32)

    def _build_index(self, device):
        S, B = self.max_new, self.batch
        per_call = [self.rows(b) for b in range(B)]
        T = max(len(r) for r, _ in per_call)
        idx = torch.zeros(B, T, dtype=torch.long)
        delta = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, 1, S, T, dtype=torch.bool)
        for b, (rows, deltas) in enumerate(per_call):
            n_ctx = len(rows) - self.new_len[b]  # keys visible to the first new token, minus itself
            idx[b, : len(rows)] = torch.tensor(rows)
            idx[b, len(rows):] = self.own_start[b]
            delta[b, : len(rows)] = torch.tensor(deltas)
            i = torch.arange(S)[:, None]
            mask[b, 0] = torch.arange(T)[None, :] <= n_ctx + i.clamp(max=self.new_len[b] - 1)
        return idx.to(device), delta.to(device), mask.to(device)


# (plan, q, k_store, v_store, inv_freq, scale) -> out
Backend = Callable[[AttentionPlan, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def torch_attention(plan, q, k_store, v_store, inv_freq, scale):
    """Gather each call's attended rows, re-rotate moved keys, one SDPA call with a padding mask."""
    idx, delta, _ = plan.gather_index(q.device)  # (B, T), (B, T)
    mask = plan.additive_mask(q.device, q.dtype)  # (B, 1, S, T)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_store, v_store))
    # The same rows as the gather, read in place (no copy per layer); not under autograd, which would keep the view
    # of a store that later passes write into.
    if plan.single_run is not None and not tracked:
        first, stop = plan.single_run
        return F.scaled_dot_product_attention(q, k_store[None, :, first:stop], v_store[None, :, first:stop],
                                              attn_mask=mask, scale=scale, enable_gqa=True)
    B, T = idx.shape
    k = k_store.index_select(1, idx.flatten()).view(-1, B, T, k_store.shape[-1]).transpose(0, 1)  # (B, Hkv, T, D)
    v = v_store.index_select(1, idx.flatten()).view(-1, B, T, v_store.shape[-1]).transpose(0, 1)
    if plan.any_delta:
        k = rerotate(k, delta[:, None, :], inv_freq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def reference_attention(plan, q, k_store, v_store, inv_freq, scale):
    """Dense boolean mask over all N store rows and a per-row delta per call, in fp64."""
    B, H, S, D = q.shape
    Hkv, N, _ = k_store.shape
    allowed = torch.zeros(B, S, N, dtype=torch.bool)
    delta = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        for row, n, d in plan.segments[b]:
            if allowed[b, 0, row:row + n].any():
                raise ValueError(f"call {b} attends to store rows {row}..{row + n - 1} twice")
            allowed[b, :, row:row + n] = True
            delta[b, row:row + n] = d
        for i in range(S):
            last = plan.own_past[b] + min(i, plan.new_len[b] - 1)  # padding rows copy the last real row
            allowed[b, i, plan.own_start[b]:plan.own_start[b] + last + 1] = True
    k = rerotate(k_store.double()[None].expand(B, -1, -1, -1), delta[:, None, :].to(q.device), inv_freq.double())
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, N, D)
    v = v_store.double()[None].expand(B, -1, -1, -1).repeat_interleave(H // Hkv, dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale  # (B, H, S, N)
    scores = scores.masked_fill(~allowed[:, None].to(q.device), float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def triton_attention(plan, q, k_store, v_store, inv_freq, scale):
    """The fused segment-table kernel (``triton_kernels.segment_attention``), its launch checked once per step."""
    from triton_kernels import interpreter_active, launch_config, prepare_launch, run_launch

    q = q.contiguous()
    # Every layer of a step has the same shapes: the tables are checked (and the tiles chosen) for the first only.
    key = ("launch", q.shape, q.dtype, k_store.shape, k_store.dtype, q.device, scale)
    freq, launch = plan._index.get(key, (None, None))
    if freq is not inv_freq:
        B, H, S, D = q.shape
        cfg = launch_config(S * (H // k_store.shape[0]), D, q.dtype, interpreter_active())
        tables = plan.kernel_tables(q.device, cfg.block_n)  # the six tables and tiles: one host-to-device copy per step
        launch = prepare_launch(q, k_store, v_store, **tables, inv_freq=inv_freq, scale=scale, config=cfg,
                                max_own_len=plan.max_own_len, copy_tables=False)  # the plan's own tables
        plan._index[key] = (inv_freq, launch)
    return run_launch(q, k_store, v_store, launch)


BACKENDS: dict[str, Backend] = {
    "torch": torch_attention,
    "reference": reference_attention,
    "triton": triton_attention,
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def default_backend(device: torch.device, *, head_dim: int | None = None, dtype: torch.dtype | None = None) -> str:
    """"triton" on CUDA, unless the kernel cannot run the model's heads (``head_dim`` and ``dtype``, when given:
    ``triton_unsupported``); "torch" elsewhere."""
    if torch.device(device).type != "cuda":
        return "torch"
    if head_dim is not None and dtype is not None and triton_unsupported(head_dim, dtype):
        return "torch"
    return "triton"


def triton_unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run heads of ``head_dim`` at ``dtype`` (None: it can)."""
    from triton_kernels import unsupported

    return unsupported(head_dim, dtype)
