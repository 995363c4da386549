"""The engine's "triton" backend (the fused kernel; the Triton interpreter on CPU) equals the "torch" backend."""

from __future__ import annotations

import pytest
import torch

import choreo
from tests.conftest import build_tiny

triton_kernels = pytest.importorskip("triton_kernels")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel compiled on a GPU, interpreted on CPU


@pytest.fixture(scope="module")
def tiny32(tokenizer):
    return build_tiny(tokenizer, "llama-gqa", dtype=torch.float32, device=DEVICE)


def program(ch):
    sys = ch.prefill("Answer both questions.", role="system")
    q1 = ch.prefill("What is the capital of France?", role="user", parents=[sys])
    q2 = ch.prefill("What colour is grass?", role="user", parents=[sys])
    calls = [
        choreo.Call(parents=[sys, q1, q2], max_tokens=5),
        choreo.Call(parents=[sys, q1, q2], offsets=choreo.linearize([sys, q1, q2]), max_tokens=4),
        choreo.Call(parents=[q2, sys], offsets=[3, None], max_tokens=3),
    ]
    greedy = ch.decode(calls)
    forced = ch.decode(role="assistant", parents=[sys, q2], offsets=[None, 50], teacher_tokens=[5, 6, 7],
                       keep_logits=True)
    return greedy, forced


def test_triton_backend_matches_torch_backend(tiny32):
    if not triton_kernels.is_available(DEVICE):
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET must be set before triton is imported)")
    greedy_t, forced_t = program(choreo.Choreographer(tiny32, attention="torch"))
    greedy_k, forced_k = program(choreo.Choreographer(tiny32, attention="triton"))
    assert [m.tokens for m in greedy_k] == [m.tokens for m in greedy_t]
    torch.testing.assert_close(forced_k.logits, forced_t.logits, atol=1e-4, rtol=1e-4)


def test_a_model_the_kernel_cannot_run_is_refused_at_construction(tokenizer):
    """fp64 weights (the kernel runs fp32 / fp16 / bf16): refused when the engine is built, naming the reason and
    the backend that runs it, not at the first forward pass."""
    if not triton_kernels.is_available(DEVICE):
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET must be set before triton is imported)")
    with pytest.raises(ValueError, match=r"float64.*use attention='torch'"):
        choreo.Choreographer(build_tiny(tokenizer, dtype=torch.float64, device=DEVICE), attention="triton")


@pytest.mark.parametrize("head_dim, dtype, expected", [
    (64, torch.bfloat16, "triton"), (128, torch.float32, "triton"),
    (100, torch.bfloat16, "torch"),  # open_llama_3b's heads
    (64, torch.float64, "torch"), (None, None, "triton"),
])
def test_default_backend_on_cuda_falls_back_where_the_kernel_cannot_run(head_dim, dtype, expected):
    from choreo.attention import default_backend

    assert default_backend(torch.device("cuda"), head_dim=head_dim, dtype=dtype) == expected
    assert default_backend(torch.device("cpu"), head_dim=head_dim, dtype=dtype) == "torch"


@pytest.mark.gpu
def test_triton_backend_bf16_error_within_torch_backends(tokenizer):
    """At bf16 on a GPU, the kernel's logits are as close to the fp32 result as the torch backend's are
    (at most 2x its error, plus twice bf16's rounding at the logits' size): the flash-attention test of a
    low-precision kernel (``tests.kernels.cases.error_bound``)."""
    from tests.kernels.cases import error_bound

    ref = program(choreo.Choreographer(build_tiny(tokenizer, dtype=torch.float32, device="cuda"), attention="torch"))
    bf16 = build_tiny(tokenizer, dtype=torch.bfloat16, device="cuda")
    torch_bf16 = program(choreo.Choreographer(bf16, attention="torch"))[1].logits
    kernel_bf16 = program(choreo.Choreographer(bf16, attention="triton"))[1].logits
    err_torch = (torch_bf16.float() - ref[1].logits).abs().max().item()
    err_kernel = (kernel_bf16.float() - ref[1].logits).abs().max().item()
    bound = error_bound(ref[1].logits, err_torch, torch.bfloat16)
    assert err_kernel <= bound, (err_kernel, err_torch, bound)


async def moved_messages(ex):
    """Two answers at the same positions, then a call that reads them linearised (the second moved after the
    first) and a call that reads the first moved 40 positions later."""
    sys = await ex.prefill("Be brief.", role="system")
    q = await ex.prefill("Name a colour.", role="user", parents=[sys])
    a, b = await ex.decode([choreo.Call(role="assistant:a", parents=[sys, q], max_tokens=4),
                            choreo.Call(role="assistant:b", parents=[sys, q], max_tokens=4)])
    await ex.decode(role="assistant", parents=[sys, q, a, b], offsets=choreo.linearize([sys, q, a, b]), max_tokens=4)
    await ex.decode(role="assistant", parents=[sys, a], offsets=[None, 40], max_tokens=3)


def test_triton_backend_trains_like_torch_backend(tokenizer):
    """Fine-tuning through the kernel's backward: the replay loss of a trace (gradients through the cache into
    earlier messages' encodings) and every LoRA gradient equal the torch backend's (fp32)."""
    if not triton_kernels.is_available(DEVICE):
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET must be set before triton is imported)")
    from choreo.finetune import replay_loss
    from choreo.lora import unload_adapter
    from tests.test_finetune import add_test_adapter, collect, lora_gradients

    model = build_tiny(tokenizer, "llama-gqa", dtype=torch.float32, device=DEVICE)
    events = collect(model, ["cats"])[0]
    runner = choreo.Runner(choreo.Baseline(model), progress=False, trace=True)
    with torch.no_grad():  # a trace with moved messages: gradients through the kernel's re-rotation too
        runner.run([moved_messages])
    traces = [events, runner.traces[0]]
    add_test_adapter(model)
    try:
        out = {backend: lora_gradients(model, backend, traces) for backend in ("torch", "triton")}
        torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
        # Two replays before one backward: the second reuses the rows the first freed, which the kernel's
        # backward would read; the engine's guard refuses rather than return wrong gradients.
        ch = choreo.Choreographer(model, attention="triton")
        ch.engine.grad = True
        loss = replay_loss(ch, traces[0]).loss + replay_loss(ch, traces[1]).loss
        with pytest.raises(RuntimeError, match="overwritten before its backward"):
            loss.backward()
        grads_t, grads_k = out["torch"][1], out["triton"][1]
        assert grads_t.abs().sum() > 0
        torch.testing.assert_close(grads_k, grads_t, rtol=1e-3, atol=1e-5 * grads_t.abs().max().item())
    finally:
        unload_adapter(model)


def test_kernel_tables_come_in_one_copy_and_match_their_parts():
    from choreo.attention import AttentionPlan

    plan = AttentionPlan(segments=(((0, 100, 5), (300, 10, 0)), ()), own_start=(400, 500), own_past=(3, 0),
                         new_len=(2, 7))
    tables = plan.kernel_tables("cpu", 64)
    tiles = tables.pop("tiles")
    expected = dict(seg_start=[[0, 300], [0, 0]], seg_len=[[100, 10], [0, 0]], seg_delta=[[5, 0], [0, 0]],
                    own_start=[400, 500], own_past=[3, 0], new_len=[2, 7])
    assert {name: t.tolist() for name, t in tables.items()} == expected
    assert all(t.dtype == torch.int32 for t in tables.values())
    expected = triton_kernels.tile_table(seg_start=tables["seg_start"], seg_len=tables["seg_len"],
                                         seg_delta=tables["seg_delta"], block_n=64)
    assert torch.equal(tiles.tiles, expected.tiles) and torch.equal(tiles.n_tiles, expected.n_tiles)
    assert tiles.max_tiles == 3 and tiles.block_n == 64
    assert tables["seg_start"].untyped_storage().data_ptr() == tiles.tiles.untyped_storage().data_ptr()  # one buffer
    assert plan.kernel_tables("cpu", 64)["tiles"] is tiles  # cached per step
    assert plan.max_own_len == 7


def test_triton_backend_prepares_one_launch_per_step():
    """Every layer of a step shares the plan's tables: the launch is checked and prepared for the first only, and
    the other layers' outputs are those of a fully checked call."""
    from choreo.attention import AttentionPlan, triton_attention

    plan = AttentionPlan(segments=(((0, 20, 5),), ()), own_start=(40, 60), own_past=(3, 0), new_len=(2, 1))
    gen = torch.Generator().manual_seed(0)
    D, inv_freq = 16, (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)).to(DEVICE)
    layers = [tuple(torch.randn(shape, generator=gen).to(DEVICE) for shape in ((2, 4, 2, D), (2, 80, D), (2, 80, D)))
              for _ in range(3)]
    outs = [triton_attention(plan, q, k, v, inv_freq, 0.25) for q, k, v in layers]
    launches = [key for key in plan._index if isinstance(key, tuple) and key[0] == "launch"]
    assert len(launches) == 1
    cfg = plan._index[launches[0]][1].config
    tables = plan.kernel_tables(DEVICE, cfg.block_n)  # the six tables and the tiles, by name
    for (q, k, v), out in zip(layers, outs):
        assert torch.equal(out, triton_kernels.segment_attention(q, k, v, **tables, inv_freq=inv_freq, scale=0.25,
                                                                 config=cfg))
    triton_attention(plan, *(t.half() for t in layers[0]), inv_freq, 0.25)
    assert len([key for key in plan._index if isinstance(key, tuple) and key[0] == "launch"]) == 2  # another dtype


def test_a_move_beyond_the_kernels_tile_deltas_is_refused_before_any_row_is_reserved(tiny32):
    """Tile tables hold position deltas up to +-MAX_TILE_DELTA; a larger move (the torch backend runs it) is
    refused when the call is placed, naming the message, the move and the backend that runs it."""
    if not triton_kernels.is_available(DEVICE):
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET must be set before triton is imported)")
    from triton_kernels.segment_attention import MAX_TILE_DELTA

    ch = choreo.Choreographer(tiny32, attention="triton")
    sys = ch.prefill("Be brief.", role="system")
    far = ch.prefill("Far away.", role="user", new_offset=MAX_TILE_DELTA + 10)
    before = ch.memory()
    for parent, offset in ((sys, MAX_TILE_DELTA + 1), (sys, 1 << 31), (far, 0)):
        with pytest.raises(ValueError, match=f"move message {parent.id} .* by more than the triton backend's "
                                             f"\\+-{MAX_TILE_DELTA} positions; use attention='torch'"):
            ch.decode(parents=[parent], offsets=[offset], max_tokens=1)
        assert ch.memory() == before
    assert len(ch.decode(parents=[sys], offsets=[MAX_TILE_DELTA], max_tokens=1).tokens) == 1
