"""The message store: allocation, freeing, growth, capacity and reported sizes."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings, strategies as st

import choreo
from choreo.cache import CapacityError, KVStore


def test_kv_bytes_per_token_of_the_embedded_architecture(tiny_gqa):
    spec = tiny_gqa.spec
    assert spec.kv_bytes_per_token == 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 8  # fp64


def test_free_merges_and_reuses_rows(tiny_gqa):
    store = KVStore(tiny_gqa.spec, capacity=100, initial=100)
    a, b, c = store.alloc(10), store.alloc(20), store.alloc(30)
    assert (a, b, c) == (0, 10, 30) and store.used == 60
    store.free(b, 20)
    assert store.alloc(15) == 10  # first fit inside the hole
    store.free(a, 10)
    store.free(10, 15)
    assert store._free[0] == (0, 30)  # neighbours merged
    with pytest.raises(RuntimeError, match="double free"):
        store.free(0, 5)


def test_growth_preserves_contents_and_capacity_is_hard(tiny_gqa):
    store = KVStore(tiny_gqa.spec, capacity=64, initial=8)
    row = store.alloc(8)
    for layer in store.k:
        layer[:, row:row + 8] = 1.0
    big = store.alloc(40)
    assert store.allocated >= 48 and (store.read(0, 8)[0] == 1.0).all()
    assert all(layer.shape == (tiny_gqa.spec.n_kv_heads, store.allocated, tiny_gqa.spec.head_dim)
               for layer in store.k + store.v)
    with pytest.raises(CapacityError, match="64"):
        store.alloc(30)
    store.free(big, 40)
    assert store.report()["tokens_used"] == 8


def _runs(rows) -> list[tuple[int, int]]:
    """The sorted, merged (start, length) runs of a set of rows."""
    runs: list[tuple[int, int]] = []
    for r in sorted(rows):
        if runs and sum(runs[-1]) == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=40))
@example([(False, 20)] * 3 + [(False, 38)])  # fits only by growing over the free tail: 64 + 38 - 4 <= 100 rows
@example([(False, 30), (False, 40), (True, 0), (False, 25), (False, 30), (False, 1)])  # past a small hole; into it
def test_allocator_grants_exactly_what_fits_first_fit_and_keeps_its_books(spec_ops):
    """A model of the allocator: a request fits the first free run long enough, else the rows from the end of the
    last live run up to capacity (the buffers grow over a free tail); it is granted exactly when it fits. After
    every step the live and free rows partition the buffers, the free list is sorted and merged, and the peak is
    the most rows ever in use."""
    import torch

    from choreo.model import ModelSpec

    capacity = 100
    spec = ModelSpec(name="t", model_type="llama", n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, vocab_size=2,
                     dtype=torch.float32, device=torch.device("cpu"))
    store, live, peak = KVStore(spec, capacity=capacity, initial=16), [], 0
    for do_free, n in spec_ops:
        if do_free and live:
            store.free(*live.pop(n % len(live)))
        else:
            held = {r for a, k in live for r in range(a, a + k)}
            holes = _runs(set(range(store.allocated)) - held)
            end = max((a + k for a, k in live), default=0)
            row = next((start for start, length in holes if length >= n), end if end + n <= capacity else None)
            if row is None:
                with pytest.raises(CapacityError, match=f"cannot cache {n} more tokens"):
                    store.alloc(n)
            else:
                assert store.alloc(n) == row, (live, holes, n)
                live.append((row, n))
        held = [r for a, k in live for r in range(a, a + k)]
        assert len(held) == len(set(held)) and set(held) <= set(range(store.allocated)) <= set(range(capacity))
        assert store._free == _runs(set(range(store.allocated)) - set(held))  # sorted, merged, the rest
        peak = max(peak, len(held))
        assert store.used == len(held) and store.peak == peak
        assert store.writes.shape == (store.allocated,) and store.k[0].shape[1] == store.allocated


def test_memory_report_and_freeing(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system")
    ans = ch.decode(role="assistant", parents=[sys], max_tokens=5)
    mem = ch.memory()
    assert mem["tokens_used"] == sys.length + ans.length  # the unused reservation was returned
    assert mem["bytes_used"] == mem["tokens_used"] * tiny_gqa.spec.kv_bytes_per_token
    text, tokens, ids = ans.text, list(ans.tokens), list(ans.ids)
    assert text and tokens and len(ids) > len(tokens)
    ch.free(sys, ans)
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0
    assert (ans.text, ans.tokens, ans.ids) == (text, tokens, ids) and ans.freed  # still readable once freed


def test_read_guard_catches_rows_rewritten_before_the_backward(tiny_gqa):
    """Write counts survive growth; a guard over rows read raises once any of them is written again."""
    import torch

    store = KVStore(tiny_gqa.spec, capacity=64, initial=8)
    row = store.alloc(6)
    store.mark_written(torch.arange(row, row + 6))
    guard = store.read_guard(torch.tensor([row, row + 2, row + 2]))  # repeats allowed (a segment read twice)
    grad = torch.ones(3)
    assert guard(grad) is grad
    store.alloc(20)  # growth keeps the counts
    assert store.writes.shape == (store.allocated,) and store.writes[row:row + 6].tolist() == [1] * 6
    store.mark_written(torch.tensor([row + 1]))  # a row nobody read: fine
    guard(grad)
    store.free(row, 6)
    store.mark_written(torch.tensor([row + 2]))  # freed, reused, rewritten
    with pytest.raises(RuntimeError, match=f"row {row + 2}"):
        guard(grad)


def test_shrink_to_gives_back_only_a_free_tail(tiny_gqa):
    store = KVStore(tiny_gqa.spec, capacity=64, initial=8)
    a = store.alloc(6)
    b = store.alloc(10)  # grows the buffers to 16 rows
    assert store.allocated == 16
    store.shrink_to(8)  # rows 6..15 are b's: nothing changes
    assert store.allocated == 16 and store._free == []
    store.free(b, 10)
    store.shrink_to(8)
    assert store.allocated == 8 == store.k[0].shape[1] == store.writes.shape[0] and store._free == [(6, 2)]
    store.free(a, 6)
    store.shrink_to(4)  # below what was ever allocated at first is fine too: all free
    assert store.allocated == 4 and store._free == [(0, 4)] and store.used == 0
    store.shrink_to(10)  # not a growth
    assert store.allocated == 4
