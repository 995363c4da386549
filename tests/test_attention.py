"""The torch backend's reads (in place for a single unmoved run, else gathered), against a plain index gather and the
dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from choreo.attention import AttentionPlan, reference_attention, torch_attention


def plan(segments, own_start, own_past, new_len):
    return AttentionPlan(segments=segments, own_start=own_start, own_past=own_past, new_len=new_len)


@pytest.mark.parametrize("p, expected", [
    (plan(((),), (7,), (0,), (4,)), (7, 11)),                                  # no parents: own rows only
    (plan((((0, 10, 0),),), (10,), (2,), (3,)), (0, 15)),                      # parent, then own rows
    (plan((((5, 3, 0), (8, 4, 0)),), (12,), (0,), (1,)), (5, 13)),             # parents back to back
    (plan((((0, 10, 0),),), (11,), (0,), (2,)), None),                         # a gap before the own rows
    (plan((((0, 10, 0), (11, 2, 0)),), (13,), (0,), (2,)), None),              # a gap between parents
    (plan((((0, 10, 3),),), (10,), (0,), (2,)), None),                         # a moved parent
    (plan((((8, 4, 0), (0, 8, 0)),), (12,), (0,), (1,)), None),               # parents out of store order
    (plan((((0, 10, 0),), ((0, 10, 0),)), (10, 20), (0, 0), (2, 2)), None),    # two calls
])
def test_single_run_only_when_one_call_reads_one_unmoved_run(p, expected):
    assert p.single_run == expected


def gathered(p, q, k_store, v_store, scale):
    """The general path: every attended row gathered by index, one SDPA call."""
    idx, _, mask = p.gather_index(q.device)
    k, v = k_store[:, idx].transpose(0, 1), v_store[:, idx].transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [
    plan((((0, 37, 0),),), (37,), (0,), (1,)),          # decode: one query
    plan((((3, 20, 0), (23, 17, 0)),), (40,), (5,), (9,)),  # prefill after own past rows, lengths off any block
    plan(((),), (0,), (0,), (6,)),                      # a prompt with no parents
    plan((((0, 10, 0), (30, 5, 0)), ((12, 7, 0),)), (40, 50), (2, 0), (3, 1)),  # two calls, padded: the gather
])
def test_torch_backend_equals_the_index_gather_bit_for_bit_and_the_reference(p, dtype):
    gen = torch.Generator().manual_seed(0)
    H, Hkv, D, N = 6, 2, 16, 64
    q = torch.randn(p.batch, H, p.max_new, D, generator=gen, dtype=dtype)
    k_store = torch.randn(Hkv, N, D, generator=gen, dtype=dtype)
    v_store = torch.randn(Hkv, N, D, generator=gen, dtype=dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    out = torch_attention(p, q, k_store, v_store, inv_freq, D ** -0.5)
    assert torch.equal(out, gathered(p, q, k_store, v_store, D ** -0.5))
    torch.testing.assert_close(out, reference_attention(p, q, k_store, v_store, inv_freq, D ** -0.5))


def test_under_autograd_the_store_is_gathered_so_later_writes_do_not_break_backward():
    p = plan((((0, 10, 0),),), (10,), (0,), (3,))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 8, generator=gen, requires_grad=True)
    k_store = torch.randn(2, 32, 8, generator=gen, requires_grad=True)
    v_store = torch.randn(2, 32, 8, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    keys = k_store.clone()  # the store as the engine holds it: written in place by every pass
    out = torch_attention(p, q, keys, v_store, inv_freq, 8 ** -0.5)
    keys[:, 20] = 0.0  # a later pass writes other rows
    out.sum().backward()
    assert q.grad is not None and k_store.grad[:, :13].abs().sum() > 0 and k_store.grad[:, 13:].abs().sum() == 0


@pytest.mark.parametrize("seed", range(12))
def test_the_engine_and_kernel_references_agree(seed):
    """The engine's dense reference (``reference_attention``) and the kernel's (``segment_attention_ref``) are two
    oracles of one semantics: on the rows both define (a call's real query rows; padding rows differ by design:
    the engine's copy the last real row, the kernel's are zero) they give the same output. Random plans: segments
    anywhere in the store, in any order, with deltas of either sign, an empty segment list, a decode, GQA."""
    from triton_kernels.reference import segment_attention_ref

    g = torch.Generator().manual_seed(seed)
    rand = lambda n: int(torch.randint(n, (), generator=g))  # noqa: E731
    B, Hkv, D, N = 1 + rand(3), 1 + rand(2), 8, 64
    H = Hkv * (1 + rand(3))
    segments, own_past, new_len = [], [], []
    for _ in range(B):
        starts = (10 * torch.randperm(4, generator=g)[:rand(5)]).tolist()  # 0-4 disjoint runs, any order
        segments.append(tuple((s, 1 + rand(10), rand(41) - 20) for s in starts))
        own_past.append(rand(3))
        new_len.append(1 + rand(4))
    own_start = [40 + 8 * b for b in range(B)]  # each call's own rows after the segments
    p = plan(tuple(segments), tuple(own_start), tuple(own_past), tuple(new_len))
    S = max(new_len)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k_store, v_store = (torch.randn(Hkv, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    engine = reference_attention(p, q, k_store, v_store, inv_freq, 0.4)
    table, own = (t.long() for t in p._host_table())  # (3, B, G) start, length, delta; (3, B) start, past, new
    kernel = segment_attention_ref(q, k_store, v_store, seg_start=table[0], seg_len=table[1], seg_delta=table[2],
                                   own_start=own[0], own_past=own[1], new_len=own[2], inv_freq=inv_freq, scale=0.4)
    for b in range(B):
        torch.testing.assert_close(engine[b, :, :new_len[b]], kernel[b, :, :new_len[b]], rtol=0, atol=1e-12)
