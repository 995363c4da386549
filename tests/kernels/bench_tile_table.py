"""Host cost of ``tile_table``: the engine cuts its segment tables into key tiles once per forward step, on the
CPU, before any layer runs, so the time it takes is added to every step.

Tables: B calls with G segments each (random store rows, lengths 0..199 with some empty entries, random deltas),
and the same with every call's segments laid out one after another in the store (one run per call).

Run: ``pytest tests/kernels/bench_tile_table.py --benchmark-group-by=param:shape``.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import tile_table

pytestmark = pytest.mark.bench

SHAPES = [(8, 6), (64, 32), (8, 128)]  # (B, G): a few calls over a few messages, many calls, long histories


def segment_tables(B: int, G: int, contiguous: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """int32 seg_start, seg_len, seg_delta (B, G), by name; ``contiguous``: each segment starts where the one before
    it ends, with one delta per call (the tile table merges them into one run)."""
    gen = torch.Generator().manual_seed(seed)
    length = torch.randint(0, 200, (B, G), generator=gen, dtype=torch.int32)
    if contiguous:
        start = torch.cumsum(length, 1, dtype=torch.int32) - length
        delta = torch.randint(-500, 500, (B, 1), generator=gen, dtype=torch.int32).expand(B, G).contiguous()
    else:
        start = torch.randint(0, 10**5, (B, G), generator=gen, dtype=torch.int32)
        delta = torch.randint(-500, 500, (B, G), generator=gen, dtype=torch.int32)
    return dict(seg_start=start, seg_len=length, seg_delta=delta)


@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-G{g}" for b, g in SHAPES])
def test_tile_table_host_cost(benchmark, shape, layout):
    tables = segment_tables(*shape, contiguous=layout == "contiguous")
    table = benchmark(tile_table, **tables, block_n=64)
    per_segment = int(((tables["seg_len"].long() + 63) // 64).sum())
    assert int(table.n_tiles.sum()) <= per_segment
    if layout == "contiguous":  # one run per call: every tile but each call's last is whole
        assert int(table.n_tiles.sum()) == int(((tables["seg_len"].long().sum(1) + 63) // 64).sum())
