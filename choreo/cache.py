"""The global message store: a message table over key/value buffers shared by all messages.

Keys and values of every cached token live in one (Hkv, N, D) tensor each per layer. A message owns a
contiguous run of rows; rows are handed out first-fit from a free list and returned when the message
is freed. Keys are stored after RoPE at the message's own positions; moving a message re-rotates keys
at read time, so nothing is ever rewritten.
"""

from __future__ import annotations

import bisect
import dataclasses

import torch

from .checks import check_int
from .model import ModelSpec


class CapacityError(RuntimeError):
    """The store cannot hold the requested tokens within its capacity."""


@dataclasses.dataclass(eq=False, kw_only=True)
class Message:
    """One encoded chat turn. ``ids`` = header + forced prefix + content + footer.

    ``tokens`` are the content token ids (generated ones for a decode), ``text`` their text (without
    the forced prefix). A prefill's turn is tokenized as one string, so a token that merges the header's last
    characters with the text's first (``ChatFormat.encode_turn``) counts as content. Positions run from
    ``start`` to ``end - 1``.
    """

    id: int
    role: str
    parents: tuple[int, ...]
    start: int
    ids: list[int]
    content: tuple[int, int]  # [a, b) index range of the content within ids
    text: str
    prefix: str = ""
    row: int = -1  # first store row; -1 when not held in a store (baseline messages)
    ttft: float | None = None  # seconds from submission to the first sampled token
    latency: float | None = None  # seconds from submission to the end of the turn
    logprobs: list[float] | None = None  # per content token, when teacher-forced with scoring
    logits: torch.Tensor | None = None  # (len(tokens), V) when requested
    freed: bool = False
    decoding: bool = False  # a decode still running: no parent yet and not freeable (its rows are being written)
    floor: int = 0  # the first position after the conversation prefix its executor shares (a BOS token), or 0

    @property
    def tokens(self) -> list[int]:
        return self.ids[self.content[0]:self.content[1]]

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def end(self) -> int:
        return self.start + len(self.ids)

    def __repr__(self) -> str:
        text = self.text if len(self.text) < 40 else self.text[:37] + "..."
        return f"Message(id={self.id}, role={self.role!r}, start={self.start}, len={self.length}, text={text!r})"


class KVStore:
    """Key/value rows for all cached tokens, with first-fit allocation and a hard token capacity.

    Example::

        store = KVStore(model.spec, capacity=4096)
        row = store.alloc(10)            # rows row .. row+9
        store.k[layer][:, row:row + 10]  # (Hkv, 10, D)
        store.free(row, 10)
    """

    def __init__(self, spec: ModelSpec, *, capacity: int, initial: int = 1024):
        capacity = check_int("capacity", capacity)
        self.spec, self.capacity = spec, capacity
        n = min(initial, capacity)
        shape = (spec.n_kv_heads, n, spec.head_dim)
        # One tensor per layer, not one (L, Hkv, N, D) for all: under autograd, the backward of a layer's in-place
        # write clones and fills the whole tensor written into, so with one tensor every layer's write cost a copy
        # of all layers' rows (a CPU LoRA step over 8 traces, ``tests/kernels/bench_finetune_step.py``: 17.3 s with
        # one tensor, 7.2 s with one per layer).
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.n_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.n_layers)]
        self._free: list[tuple[int, int]] = [(0, n)]  # sorted, merged (start, length) runs
        self.used = 0
        self.peak = 0
        # (N,) on the host: how many times each row has been written (``mark_written``), so that a read whose
        # backward needs the rows themselves can check they are unchanged (``read_guard``).
        self.writes = torch.zeros(n, dtype=torch.int64)

    @property
    def allocated(self) -> int:
        return self.k[0].shape[1]

    def alloc(self, n: int) -> int:
        """Reserve n contiguous rows; grows the buffers (up to capacity) when no free run fits."""
        if n < 1:
            raise ValueError(f"cannot allocate {n} rows")
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                self._free[i:i + 1] = [(start + n, length - n)] if length > n else []
                self.used += n
                self.peak = max(self.peak, self.used)
                return start
        self._grow(n)
        return self.alloc(n)

    def _grow(self, n: int) -> None:
        old = self.allocated
        tail = self._free[-1][1] if self._free and sum(self._free[-1]) == old else 0
        need = old + n - tail
        if need > self.capacity:
            raise CapacityError(
                f"cannot cache {n} more tokens: {self.used} of {self.capacity} rows in use "
                f"(largest free run {max((l for _, l in self._free), default=0)}); free messages or raise capacity"
            )
        new = min(self.capacity, max(need, 2 * old))
        # torch.cat rather than an in-place resize: keeps the autograd graph when replaying with gradients.
        self.k, self.v = ([torch.cat([t, t.new_zeros(t.shape[0], new - old, t.shape[2])], dim=1) for t in layers]
                          for layers in (self.k, self.v))
        self.writes = torch.cat([self.writes, torch.zeros(new - old, dtype=torch.int64)])
        self.free(old, new - old, _count=False)

    def shrink_to(self, n: int) -> None:
        """Give back the buffers' rows from ``n`` on when all of them are free (a refused batch that grew the store
        on its way leaves it as it found it); otherwise leave the store as it is."""
        old = self.allocated
        if n >= old or not self._free or self._free[-1][0] > n or sum(self._free[-1]) != old:
            return
        self.k, self.v = ([t[:, :n].clone() for t in layers] for layers in (self.k, self.v))
        self.writes = self.writes[:n].clone()
        start = self._free[-1][0]
        self._free[-1:] = [(start, n - start)] if n > start else []

    def free(self, row: int, n: int, *, _count: bool = True) -> None:
        """Return rows row .. row+n-1 to the free list (merging neighbours)."""
        if n <= 0:
            return
        i = bisect.bisect_left(self._free, (row, 0))
        if i > 0 and sum(self._free[i - 1]) > row or i < len(self._free) and row + n > self._free[i][0]:
            raise RuntimeError(f"double free of rows {row}..{row + n - 1}")
        if _count:
            self.used -= n
        self._free.insert(i, (row, n))
        if i + 1 < len(self._free) and row + n == self._free[i + 1][0]:
            self._free[i:i + 2] = [(row, n + self._free[i + 1][1])]
        if i > 0 and sum(self._free[i - 1]) == row:
            self._free[i - 1:i + 1] = [(self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])]

    def mark_written(self, rows: torch.Tensor) -> None:
        """Count a write of ``rows`` (host int64 indices; every layer's K/V of those rows)."""
        self.writes[rows] += 1

    def read_guard(self, rows: torch.Tensor):
        """A gradient hook for the output of an attention that read ``rows`` (host int64) and keeps the store by
        reference for its backward (the fused kernel): it raises if any of those rows has been written since,
        e.g. a freed message's rows reused by a later replay before the earlier one's backward. Gradients computed
        from overwritten keys would otherwise be silently wrong."""
        snapshot = self.writes[rows].clone()

        def check(grad):
            changed = (self.writes[rows] != snapshot).nonzero()
            if len(changed):
                raise RuntimeError(
                    f"store rows read by this attention were overwritten before its backward (first: row "
                    f"{int(rows[changed[0, 0]])}): call backward() before the rows are freed and reused, e.g. once "
                    f"per replay, or train with attention='torch', which copies what it reads")
            return grad

        return check

    def detach_(self) -> None:
        """Drop any autograd history held by the buffers (after a training step)."""
        self.k, self.v = [t.detach() for t in self.k], [t.detach() for t in self.v]

    def read(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows row .. row + n - 1 in every layer: two (L, Hkv, n, D) tensors (copies)."""
        return tuple(torch.stack([t[:, row:row + n] for t in layers]) for layers in (self.k, self.v))

    def report(self) -> dict:
        """Token counts and bytes: what is in use, allocated, the peak and the capacity."""
        per_token = self.spec.kv_bytes_per_token
        return {
            "tokens_used": self.used,
            "tokens_peak": self.peak,
            "tokens_allocated": self.allocated,
            "tokens_capacity": self.capacity,
            "kv_bytes_per_token": per_token,
            "bytes_used": self.used * per_token,
            "bytes_allocated": self.allocated * per_token,
        }
