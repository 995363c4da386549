"""Segment-attention kernel vs the fp64 reference (property tests + awkward cases + wrapper errors).

Without CUDA the kernel runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be set
before the kernel module is first imported), with small shapes; with CUDA, bigger shapes and more examples.
"""

import dataclasses
import sys

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kernels.cases import (AWKWARD, CUDA, DEVICE, EXAMPLES, INDEX_TABLES, QKV,  # sets TRITON_INTERPRET
                                 Case, cases, error_bound, fp64, index_tables, read_rows, segment_table)
from triton_kernels import (LaunchConfig, TileTable, default_splits, interpreter_active, is_available,
                            launch_config, prepare_launch, run_launch, segment_attention, tile_table)
from triton_kernels.reference import dense_layout, segment_attention_ref, segment_attention_sdpa
from triton_kernels.segment_attention import PREROTATE_ROWS

pytestmark = pytest.mark.skipif(
    not is_available(DEVICE),
    reason="no CUDA, and triton_kernels was imported before TRITON_INTERPRET=1 was set (set it in conftest)",
)


HOPPER = not CUDA or torch.cuda.get_device_capability()[0] >= 9  # tensor descriptors (TMA): Hopper, or the interpreter


def check_against_reference(case: Case, **kwargs):
    args = case.tensors()
    out = segment_attention(**args, **kwargs)
    q = args["q"]
    ref = segment_attention_ref(**fp64(args))  # fp64, not rounded to the dtype
    pt = segment_attention_ref(**args, upcast=False)  # PyTorch at the input dtype
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "kernel produced NaN"
    new_len = args["new_len"].cpu()
    for b in range(q.shape[0]):  # padding rows are exact zeros
        assert (out[b, :, int(new_len[b]):] == 0).all(), f"call {b}: rows >= new_len are not zero"
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    err_pt = (pt.double() - ref).abs().max().item() if out.numel() else 0.0
    bound = error_bound(ref, err_pt, case.dtype)
    assert err <= bound, f"kernel error {err:.3g} > {bound:.3g} (2 x PyTorch's {err_pt:.3g} + floor) for {case}"


# One test per (dtype, head dim), so that pytest-xdist spreads the kernel compilations over workers.
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_fp64_reference(dtype, D, data):
    case = data.draw(cases(dtype, D), label="case")
    if HOPPER and data.draw(st.booleans(), label="tma"):  # the default tiles, K/V through tensor descriptors
        cfg = launch_config(case.S * case.H // case.Hkv, case.D, case.dtype, interpreter_active())
        check_against_reference(case, config=dataclasses.replace(cfg, tma=True))
    else:
        check_against_reference(case)


@pytest.mark.parametrize("case", AWKWARD.values(), ids=AWKWARD.keys())
def test_awkward_cases(case):
    check_against_reference(case)


def test_padding_rows_ignore_garbage_queries():
    """Rows >= new_len may hold anything (here NaN): they come out as zeros and do not leak into valid rows."""
    case = AWKWARD["padding-segments-and-rows"]
    args = case.tensors()
    clean = segment_attention(**args)
    args["q"] = args["q"].clone()
    args["q"][0, :, 2:] = float("nan")  # call 0 has new_len 2
    args["q"][1] = float("nan")  # call 1 has new_len 0
    out = segment_attention(**args)
    assert not out.isnan().any()
    assert torch.equal(out, clean)


GARBAGE_CASES = ["overlap-repeat-gap", "multi-tile-segments", "decode-S1", "padding-segments-and-rows", "gqa-3-decode",
                 "gqa-4-to-1", "continued-segments"]


def with_garbage_in_unread_rows(case: Case, args: dict, finite: bool = False) -> dict:
    """``args`` (``Case.tensors``) with NaN in the keys and inf in the values of every store row no call reads
    (``finite``: -1e30 and 1e30): gaps between segments, and the rows just past a segment's last, partial key
    tile."""
    k, v = args["k_cache"].clone(), args["v_cache"].clone()
    unread = ~read_rows(case, k.shape[1])
    assert unread.any(), f"{case} reads every store row"
    k[:, unread], v[:, unread] = (-1e30, 1e30) if finite else (float("nan"), float("inf"))
    return dict(args, k_cache=k, v_cache=v)


@pytest.mark.parametrize("loop", ["flat", "nested", "prerotate"] + (["tma"] if HOPPER else []))
@pytest.mark.parametrize("name", GARBAGE_CASES)
def test_unread_store_rows_ignore_garbage(name, loop):
    """Store rows no call reads may hold anything (freed or never written): the output is bit for bit the one
    with other values there, whether a partial tile's lanes past its count are masked (nested loop) or re-read
    its last key (flat loop); with split-K too. Tensor-descriptor loads read the rows after a partial tile's
    keys and weigh them by zero, so they need finite rows (``LaunchConfig.tma``): huge finite values change
    nothing. The keys copied moved (``LaunchConfig.prerotate``) are the rows the calls read."""
    case = AWKWARD[name]
    cfg = dataclasses.replace(launch_config(case.S * case.H // case.Hkv, case.D, case.dtype, interpreter_active()),
                              flat=loop != "nested", tma=loop == "tma", prerotate=loop == "prerotate")
    args = case.tensors()
    dirty = with_garbage_in_unread_rows(case, args, finite=loop == "tma")
    for splits in (1, 3):
        clean = segment_attention(**args, config=cfg, num_splits=splits)
        assert torch.equal(segment_attention(**dirty, config=cfg, num_splits=splits), clean)


def test_strided_inputs():
    """Non-contiguous q (a transposed view) and a store sliced out of a bigger buffer give the same result."""
    case = AWKWARD["gqa-4-to-1"]
    args = case.tensors()
    q, k = args["q"], args["k_cache"]
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) with S-major memory
    big_k = torch.zeros(k.shape[0], k.shape[1] + 8, k.shape[2], dtype=k.dtype, device=k.device)
    big_k[:, 8:] = k
    assert not q_t.is_contiguous()
    assert torch.equal(segment_attention(**dict(args, q=q_t, k_cache=big_k[:, 8:])), segment_attention(**args))


CONFIGS = [LaunchConfig(block_m=16, block_n=32, num_warps=2, num_stages=1),
           LaunchConfig(block_m=32, block_n=16, num_warps=4, num_stages=2),
           LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, flat=False),
           LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=2, flat_stages=2),
           LaunchConfig(block_m=16, block_n=32, num_warps=2, num_stages=1, prerotate=True)]
if HOPPER:
    CONFIGS += [LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, tma=True)]
if CUDA:  # the tiles the default picks on a GPU for prefill and decode, and their neighbours
    CONFIGS += [LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
                LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
                LaunchConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
                LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, flat_stages=4),
                LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, prerotate=True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"m{c.block_m}-n{c.block_n}-w{c.num_warps}-s{c.num_stages}"
                         + ("-nested" if not c.flat else "-tma" if c.tma else "-prerotate" if c.prerotate else "")
                         + (f"-flat{c.flat_stages}" if c.flat_stages else ""))
@pytest.mark.parametrize("name", ["seqlen-97", "multi-tile-segments", "gqa-3-decode", "continued-segments"])
def test_tile_configs_agree(name, cfg):
    """Any tile configuration gives the default's result up to rounding (the tiles change only the order of
    the online softmax's sums)."""
    case = dataclasses.replace(AWKWARD[name], dtype=torch.float32)
    args = case.tensors()
    torch.testing.assert_close(segment_attention(**args, config=cfg), segment_attention(**args), atol=2e-5, rtol=0)


SPLIT_CASES = ["decode-S1", "empty-segment-list-G0", "padding-segments-and-rows", "all-calls-padding",
               "overlap-repeat-gap", "gqa-3-decode", "multi-tile-segments", "bf16", "continued-segments"]


@pytest.mark.parametrize("loop", ["flat", "nested", "prerotate"] + (["tma"] if HOPPER else []))
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("name", SPLIT_CASES)
def test_split_k_matches_reference(name, splits, loop):
    """Split-K (more splits than some calls have tiles or segments, so some splits are empty), both loop
    structures, the tensor-descriptor loads and the keys copied moved against the fp64 reference, on the
    awkward cases."""
    case = AWKWARD[name]
    cfg = dataclasses.replace(launch_config(case.S * case.H // case.Hkv, case.D, case.dtype, interpreter_active()),
                              flat=loop != "nested", tma=loop == "tma", prerotate=loop == "prerotate")
    args = case.tensors()
    out = segment_attention(**args, config=cfg, num_splits=splits)
    ref = segment_attention_ref(**fp64(args))
    pt = segment_attention_ref(**args, upcast=False)
    err, err_pt = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert not out.isnan().any()
    assert err <= error_bound(ref, err_pt, case.dtype), (err, err_pt)


def test_tile_table_docstring_example():
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    table = tile_table(seg_start=t([[0, 300], [7, 0]]), seg_len=t([[100, 10], [0, 0]]),
                       seg_delta=t([[5, 0], [1, 2]]), block_n=64)
    assert table.max_tiles == 3 and table.n_tiles.tolist() == [3, 0]
    assert table.tiles.dtype == torch.int64 and table.tiles.shape == (2, 3)  # one entry per tile
    assert table.fields()[:, 0].T.tolist() == [[0, 64, 5], [64, 36, 5], [300, 10, 0]]
    assert (table.tiles[1] == 0).all()
    no_segments = t([[]]).reshape(1, 0)
    empty = tile_table(seg_start=no_segments, seg_len=no_segments, seg_delta=no_segments, block_n=16)
    assert empty.max_tiles == 0 and empty.tiles.shape == (1, 1)
    # one segment continuing the other: one run
    run = tile_table(seg_start=t([[0, 40]]), seg_len=t([[40, 40]]), seg_delta=t([[0, 0]]), block_n=64)
    assert run.fields()[:, 0].T.tolist() == [[0, 64, 0], [64, 16, 0]]


def _keys(rows_deltas) -> list[tuple[int, int]]:
    return [(r, d) for start, n, d in rows_deltas for r in range(start, start + n)]


@settings(max_examples=200, deadline=None)
@given(case=cases(torch.float32, 16), block_n=st.sampled_from([16, 32, 64]))
def test_tile_table_walks_each_calls_keys_in_order(case, block_n):
    """A call's tiles hold exactly its segments' keys, in table order, each with its segment's delta (segments
    that continue each other cut as one run, so no more tiles than cutting each segment alone), at most
    ``block_n`` keys a tile, and each tile within one segment's run of store rows."""
    table = tile_table(**segment_table(case.tensors("cpu")), block_n=block_n)
    fields = table.fields()
    assert table.max_tiles == int(table.n_tiles.max())
    for b, segs in enumerate(case.segments):
        n = int(table.n_tiles[b])
        tiles = fields[:, b, :n].T.tolist()
        assert _keys(tiles) == _keys(segs)
        assert all(1 <= cnt <= block_n for _, cnt, _ in tiles)
        assert n <= sum(-(-length // block_n) for _, length, _ in segs)
        assert (table.tiles[b, n:] == 0).all()
    assert table.moved == any(d != 0 for segs in case.segments for _, length, d in segs if length > 0)


UNMOVED = Case(segments=[[(0, 65, 0), (70, 33, 0), (0, 9, 0)], [(10, 20, 0), (40, 0, 5)]], own_start=[110, 140],
               own_past=[49, 3], new_len=[2, 5], S=5)


def test_unmoved_launch_skips_the_rotation():
    """A launch none of whose segments is moved (the engine's calls without ``offsets``) runs without the
    re-rotation (``TileTable.moved``; an empty segment's delta does not count): the same output, bit for bit,
    as the rotating loop (a rotation by 0 is exact), and the reference's."""
    args = UNMOVED.tensors()
    cfg = launch_config(UNMOVED.S * UNMOVED.H // UNMOVED.Hkv, UNMOVED.D, UNMOVED.dtype, interpreter_active())
    tiles = tile_table(**segment_table(args), block_n=cfg.block_n)
    moved = tile_table(**segment_table(AWKWARD["multi-tile-segments"].tensors()), block_n=cfg.block_n)
    assert not tiles.moved and moved.moved
    out = segment_attention(**args, tiles=tiles)
    assert torch.equal(out, segment_attention(**args, tiles=dataclasses.replace(tiles, moved=True)))
    check_against_reference(UNMOVED)


def test_tile_entries_round_trip_and_refuse_deltas_out_of_range():
    """A tile's row, count and delta share one int64 (one load per tile): every delta the format holds, either
    sign, survives packing; a larger move is refused, naming it (the nested loop has no such limit)."""
    from triton_kernels.segment_attention import MAX_TILE_DELTA, pack_tiles, unpack_tiles

    row = torch.tensor([0, 1, 2**31 - 1, 7, 123456])
    count = torch.tensor([1, 64, 256, 511, 17])
    delta = torch.tensor([0, -1, MAX_TILE_DELTA, -MAX_TILE_DELTA, 4000])
    assert unpack_tiles(pack_tiles(row, count, delta)).tolist() == [row.tolist(), count.tolist(), delta.tolist()]
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError, match=str(MAX_TILE_DELTA + 1)):
        tile_table(seg_start=t([[0, 9]]), seg_len=t([[5, 4]]), seg_delta=t([[0, MAX_TILE_DELTA + 1]]), block_n=64)
    # an empty segment's delta
    assert tile_table(seg_start=t([[0, 9]]), seg_len=t([[5, 0]]), seg_delta=t([[0, 2**30]]), block_n=64).max_tiles == 1
    with pytest.raises(ValueError, match="block_n"):
        tile_table(seg_start=t([[0]]), seg_len=t([[5]]), seg_delta=t([[0]]), block_n=512)
    with pytest.raises(ValueError, match=r"\(B, G\) tables of one shape, got \(2,\)"):
        tile_table(seg_start=t([0, 9]), seg_len=t([5, 4]), seg_delta=t([0, 0]), block_n=64)
    with pytest.raises(ValueError, match="one shape"):
        tile_table(seg_start=t([[0, 9]]), seg_len=t([[5]]), seg_delta=t([[0, 0]]), block_n=64)


def test_prebuilt_tiles_and_their_errors():
    case = AWKWARD["multi-tile-segments"]
    args = case.tensors()
    cfg = launch_config(case.S * case.H // case.Hkv, case.D, case.dtype, interpreter_active())
    tiles = tile_table(**segment_table(args), block_n=cfg.block_n)
    assert isinstance(tiles, TileTable)
    torch.testing.assert_close(segment_attention(**args, tiles=tiles), segment_attention(**args), atol=0, rtol=0)
    with pytest.raises(ValueError, match="block_n"):
        segment_attention(**args, tiles=tile_table(**segment_table(args), block_n=2 * cfg.block_n))
    with pytest.raises(TypeError, match="tiles"):
        segment_attention(**args, tiles=(tiles.tiles, tiles.n_tiles))
    with pytest.raises(ValueError, match="num_splits"):
        segment_attention(**args, num_splits=0)
    # counts the kernels cannot read as they are: strided (read with stride 1), or of a float dtype
    strided = torch.stack([tiles.n_tiles, torch.zeros_like(tiles.n_tiles)], 1)[:, 0]
    assert strided.stride() == (2,)
    as_strided = TileTable(block_n=tiles.block_n, tiles=tiles.tiles, n_tiles=strided, max_tiles=tiles.max_tiles)
    torch.testing.assert_close(segment_attention(**args, tiles=as_strided), segment_attention(**args), atol=0, rtol=0)
    floats = TileTable(block_n=tiles.block_n, tiles=tiles.tiles, n_tiles=tiles.n_tiles.float(),
                       max_tiles=tiles.max_tiles)
    with pytest.raises(ValueError, match="int32 counts.*float32"):
        segment_attention(**args, tiles=floats)
    elsewhere = TileTable(block_n=tiles.block_n, tiles=tiles.tiles, n_tiles=tiles.n_tiles.to("meta"),
                          max_tiles=tiles.max_tiles)
    with pytest.raises(ValueError, match="tiles.n_tiles on meta"):
        segment_attention(**args, tiles=elsewhere)


def test_default_splits_only_on_an_idle_gpu(monkeypatch):
    assert default_splits(8, 10**6, torch.device("cpu")) == 1
    sa = sys.modules["triton_kernels.segment_attention"]  # the module (the package exports the function by its name)
    with monkeypatch.context() as m:  # the heuristic on a 132-multiprocessor GPU, checked without one
        m.setattr(sa, "_sm_count", lambda index: 132)
        m.setattr(sa, "interpreter_active", lambda: False)
        cuda = torch.device("cuda", 0)
        assert default_splits(0, 10**6, cuda) == 1  # no query rows: nothing to split (no division by zero)
        assert default_splits(66, 10**6, cuda) == 1  # half the GPU is busy already
        assert default_splits(8, 1024, cuda) == 1  # too few keys to share out
        assert default_splits(8, 16384, cuda) == 16  # 2 programs per multiprocessor would take 33; keys allow 16
        assert default_splits(64, 16384, cuda) == 4  # decode-B8-T16k: 64 programs, 264 // 64 = 4 splits
        assert default_splits(1, 10**8, cuda) == 64  # at most 64
    if CUDA:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert default_splits(sms // 2, 10**6, DEVICE) == 1  # half the GPU is busy already
        assert default_splits(8, 512, DEVICE) == 1  # too few keys to share out
        assert default_splits(8, 10**6, DEVICE) > 1


def test_default_launch_config():
    assert launch_config(4, 64, torch.bfloat16) == LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    assert launch_config(1024, 128, torch.bfloat16) == LaunchConfig(block_m=64, block_n=64, num_warps=4,
                                                                     num_stages=3, prerotate=True)
    # prefill copies its moved keys first from PREROTATE_ROWS rows (8 query blocks of 64) at 16-bit dtypes, D <= 128
    assert launch_config(PREROTATE_ROWS, 64, torch.float16).prerotate
    assert not launch_config(PREROTATE_ROWS - 1, 128, torch.bfloat16).prerotate
    assert not launch_config(1024, 128, torch.float32).prerotate
    assert not launch_config(1024, 256, torch.bfloat16).prerotate
    assert not launch_config(1024, 128, torch.bfloat16, interpret=True).prerotate
    assert launch_config(1024, 128, torch.float32).block_m == 64  # fp32 tiles twice the bytes: smaller
    assert launch_config(1024, 256, torch.float16).block_n == 32
    assert launch_config(4, 64, torch.float32, interpret=True).block_m == 16
    # the flat loop: num_stages (its K/V buffers match the own-token loops'), unless set
    assert launch_config(1024, 128, torch.bfloat16).flat_loop_stages == 3
    assert LaunchConfig(block_m=16, block_n=16, num_stages=3, flat_stages=5).flat_loop_stages == 5


def test_default_copy_of_moved_keys_keeps_within_its_budget(monkeypatch):
    """A default launch that would copy its moved keys first (``launch_config``'s prerotate) keeps the in-loop
    re-rotation where the copy (B x Hkv x max_tiles x block_n x D elements) would exceed PREROTATE_MAX_BYTES; an
    explicit config is run as given, and an unmoved launch copies nothing."""
    kernels = sys.modules["triton_kernels.segment_attention"]  # the module (the package exports a function so named)
    args = AWKWARD["multi-tile-segments"].tensors()
    q = args["q"]
    B, _, _, D = q.shape
    Hkv = args["k_cache"].shape[0]
    copying = LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, prerotate=True)
    monkeypatch.setattr(kernels, "launch_config", lambda *a, **k: copying)
    tiles = tile_table(**segment_table(args), block_n=16)
    copy_bytes = B * Hkv * tiles.max_tiles * 16 * D * q.element_size()
    monkeypatch.setattr(kernels, "PREROTATE_MAX_BYTES", copy_bytes)
    assert prepare_launch(**args).config.prerotate  # at the budget
    monkeypatch.setattr(kernels, "PREROTATE_MAX_BYTES", copy_bytes - 1)
    assert prepare_launch(**args).config == dataclasses.replace(copying, prerotate=False)
    assert prepare_launch(**args, config=copying).config.prerotate  # asked for: run as given
    expected = segment_attention(**args, config=dataclasses.replace(copying, prerotate=False))
    assert torch.equal(run_launch(q, args["k_cache"], args["v_cache"], prepare_launch(**args)), expected)


def test_tma_needs_an_aligned_store():
    case = AWKWARD["multi-tile-segments"]
    args = case.tensors()
    k = args["k_cache"]
    cfg = LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, tma=True)
    padded = torch.zeros(k.shape[0], k.shape[1], k.shape[2] + 1, device=DEVICE)[..., :-1]  # row stride 65 floats
    padded.copy_(k)
    with pytest.raises(ValueError, match="16-byte"):
        segment_attention(**dict(args, k_cache=padded), config=cfg)


@pytest.mark.parametrize("kwargs, word", [
    (dict(block_m=8, block_n=16), "block_m"), (dict(block_m=16, block_n=48), "block_n"),
    (dict(block_m=16, block_n=16, num_warps=3), "num_warps"),
    (dict(block_m=16, block_n=16, num_stages=0), "num_stages"),
    (dict(block_m=16, block_n=16, flat=False, tma=True), "tma"),
    (dict(block_m=16, block_n=16, flat_stages=0), "flat_stages"),
    (dict(block_m=16, block_n=16, flat_stages=True), "flat_stages"),
    (dict(block_m=16, block_n=16, flat=False, flat_stages=3), "flat_stages"),
    (dict(block_m=16, block_n=16, flat=False, prerotate=True), "prerotate"),
    (dict(block_m=16, block_n=16, tma=True, prerotate=True), "prerotate"),
    (dict(block_m=16, block_n=16, prerotate=1), "prerotate"),
    (dict(block_m=16, block_n=512), "block_n"), (dict(block_m=True, block_n=16), "block_m"),
])
def test_launch_config_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LaunchConfig(**kwargs)


def test_config_must_be_a_launch_config():
    with pytest.raises(TypeError, match="config"):
        segment_attention(**_args(), config=(16, 16))


def test_scale_argument():
    case = AWKWARD["decode-S1"]
    args = case.tensors()
    out = segment_attention(**args, scale=0.3)
    ref = segment_attention_ref(**fp64(args), scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.0, -0.3, float("inf"), float("nan"), True, "0.3"])
def test_scale_must_be_positive_and_finite(scale):
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        segment_attention(**AWKWARD["decode-S1"].tensors(), scale=scale)


# ----------------------------------------------------------------------------------- the references agree
@pytest.mark.parametrize("name", ["decode-S1", "overlap-repeat-gap", "padding-segments-and-rows", "gqa-3-decode"])
def test_dense_sdpa_helper_matches_reference(name):
    args = fp64(AWKWARD[name].tensors(device="cpu"))
    torch.testing.assert_close(segment_attention_sdpa(**args), segment_attention_ref(**args), atol=1e-12, rtol=0)


def test_dense_layout_docstring_example():
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    lay = dense_layout(seg_start=t([[0]]), seg_len=t([[2]]), seg_delta=t([[5]]), own_start=t([7]), own_past=t([1]),
                       new_len=t([2]), num_queries=2)
    assert lay.key_rows.tolist() == [[0, 1, 7, 8, 9]]
    assert lay.key_delta.tolist() == [[5, 5, 0, 0, 0]]
    assert lay.key_own.tolist() == [[-1, -1, 0, 1, 2]]
    assert lay.mask.int().tolist() == [[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]]


# ----------------------------------------------------------------------------------- wrapper errors
def _args(**over):
    return dict(AWKWARD["decode-S1"].tensors(), **over)


def _bad(name, fn):
    args = _args()
    args[name] = fn(args[name])
    return args


BAD_ARGS = {
    "q-int-dtype": (lambda: _bad("q", lambda t: t.to(torch.int32)), TypeError, "q"),
    "q-3d": (lambda: _bad("q", lambda t: t[0]), ValueError, "q"),
    "k-dtype-mismatch": (lambda: _bad("k_cache", lambda t: t.double()), TypeError, "k_cache"),
    "v-wrong-shape": (lambda: _bad("v_cache", lambda t: t[:, :-1]), ValueError, "v_cache"),
    "k-head-dim": (lambda: _args(k_cache=_args()["k_cache"][..., :32], v_cache=_args()["v_cache"][..., :32]),
                   ValueError, "head dim"),
    "h-not-multiple-of-hkv": (lambda: _args(q=torch.randn(2, 3, 1, 64, device=DEVICE)), ValueError, "Hkv"),
    "seg-float-dtype": (lambda: _bad("seg_len", lambda t: t.float()), TypeError, "seg_len"),
    "seg-wrong-shape": (lambda: _bad("seg_delta", lambda t: t[:, :0]), ValueError, "seg_delta"),
    "own-wrong-shape": (lambda: _bad("own_past", lambda t: t[:1]), ValueError, "own_past"),
    "new-len-device": (lambda: _bad("new_len", lambda t: t.to("meta")), ValueError, "new_len"),
    "inv-freq-shape": (lambda: _bad("inv_freq", lambda t: t[:-1]), ValueError, "inv_freq"),
    "k-device": (lambda: _bad("k_cache", lambda t: t.to("meta")), ValueError, "k_cache"),
    "seg-start-a-list": (lambda: _bad("seg_start", lambda t: t.tolist()), TypeError, "seg_start must be a torch"),
    "head-dim-not-pow2": (lambda: _args(q=torch.randn(2, 4, 1, 48, device=DEVICE),
                                        k_cache=torch.randn(2, 90, 48, device=DEVICE),
                                        v_cache=torch.randn(2, 90, 48, device=DEVICE)), ValueError, "power of two"),
}
if not CUDA:  # data checks run only where they need no device sync
    BAD_ARGS["new-len-above-S"] = (lambda: _bad("new_len", lambda t: t + 1), ValueError, "new_len")
    BAD_ARGS["segment-out-of-store"] = (lambda: _bad("seg_start", lambda t: t + 1000), ValueError,
                                        r"store rows 0 \.\. N - 1 = \d+: call 0, segment 0 reads rows 10\d\d")
    BAD_ARGS["negative-seg-len"] = (lambda: _bad("seg_len", lambda t: t.masked_fill(t > 0, -1)), ValueError,
                                    r"seg_len must be >= 0, got -1 at call 0, segment 0")
    BAD_ARGS["negative-new-len"] = (lambda: _bad("new_len", lambda t: t - 5), ValueError,
                                    r"new_len must be >= 0, got -\d at call 0")
    # rows near 2**31: an int32 sum would wrap back into the store
    BAD_ARGS["segment-end-wraps-int32"] = (lambda: _bad("seg_start", lambda t: t.masked_fill(
        _args()["seg_len"] > 0, 2**31 - 5)), ValueError, "segment")
    BAD_ARGS["own-end-wraps-int32"] = (lambda: _bad("own_start", lambda t: t + (2**31 - 5)), ValueError, "own rows")
    # int64 values are converted to int32: out-of-range ones are refused, not wrapped
    for _name in ("seg_start", "seg_len", "seg_delta", "own_start", "own_past", "new_len"):
        BAD_ARGS[f"{_name}-int64-beyond-int32"] = (
            lambda n=_name: _bad(n, lambda t: t.long() + 2**32), ValueError, f"{_name}.*outside int32")


@pytest.mark.parametrize("make, exc, word", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_wrapper_rejects_bad_arguments(make, exc, word):
    with pytest.raises(exc, match=word):
        segment_attention(**make())


@pytest.mark.parametrize("fn", [segment_attention, prepare_launch, segment_attention_ref, segment_attention_sdpa],
                         ids=lambda fn: fn.__name__)
def test_table_arguments_are_keyword_only(fn):
    """The six index tables share a dtype and their shapes ((B, G) or (B,)): passed by position, a swapped pair
    (own_start for own_past, seg_len for seg_delta) would pass every check. Only q, k_cache and v_cache are taken
    by position; a table, even one, is refused before anything runs."""
    args = _args()
    q, k, v = (args.pop(name) for name in QKV)
    with pytest.raises(TypeError, match="positional argument"):
        fn(q, k, v, args.pop("seg_start"), **args)  # one table by position, the others by name
    with pytest.raises(TypeError, match="positional argument"):
        fn(q, k, v, *index_tables(_args()).values(), args["inv_freq"])  # all, in the old signature's order


def test_tile_table_and_dense_layout_take_keywords_only():
    table = segment_table(_args())
    assert tile_table(**table, block_n=16).max_tiles > 0
    with pytest.raises(TypeError, match="positional argument"):
        tile_table(*table.values(), block_n=16)
    with pytest.raises(TypeError, match="positional argument"):
        tile_table(*table.values(), 16)
    tables = index_tables(_args())
    assert dense_layout(**tables, num_queries=1).mask.any()
    with pytest.raises(TypeError, match="positional argument"):
        dense_layout(*tables.values(), num_queries=1)


@pytest.mark.parametrize("name", ["num_splits", "max_own_len"])
def test_a_bool_is_no_count(name):
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        segment_attention(**_args(), **{name: True})


def test_the_nested_loops_larger_moves_are_refused_before_a_forward_that_needs_a_backward():
    """The nested loop runs moves beyond the tile tables' range forward only: with inputs that require grad, the
    call is refused at once instead of failing in the backward."""
    from triton_kernels.segment_attention import MAX_TILE_DELTA

    args = _args()
    args["seg_delta"] = args["seg_delta"].masked_fill(args["seg_len"] > 0, MAX_TILE_DELTA + 1)
    B, H, S, D = args["q"].shape
    nested = dataclasses.replace(launch_config(S * H // args["k_cache"].shape[0], D, args["q"].dtype,
                                               interpreter_active()), flat=False)
    segment_attention(**args, config=nested)  # forward only: runs
    args["q"] = args["q"].clone().requires_grad_()
    with pytest.raises(ValueError, match=r"moved by 4194304 positions has no backward"):
        segment_attention(**args, config=nested)
    with torch.no_grad():
        segment_attention(**args, config=nested)


@pytest.mark.skipif(CUDA, reason="tile tables are checked against the segment table on CPU only")
def test_a_callers_tile_table_must_be_the_segment_tables():
    """Tiles cut from another table, ``moved`` cleared on moved segments, or fewer tiles than the calls have
    would make the kernels read the wrong keys, skip the re-rotation or walk past their buffer: refused."""
    args = _args()
    table = segment_table(args)
    assert table["seg_delta"].ne(0).any() and table["seg_len"].gt(0).any()
    good = tile_table(**table, block_n=16)
    segment_attention(**args, tiles=good, config=LaunchConfig(block_m=16, block_n=16, num_warps=1, num_stages=1))
    other = tile_table(**dict(table, seg_start=table["seg_start"] + 1), block_n=16)
    still = TileTable(block_n=16, tiles=good.tiles, n_tiles=good.n_tiles, max_tiles=good.max_tiles, moved=False)
    short = TileTable(block_n=16, tiles=good.tiles[:, :-1], n_tiles=good.n_tiles, max_tiles=good.max_tiles - 1)
    for tiles, word in ((other, "not this segment table"), (still, "moved is False"), (short, "max_tiles")):
        with pytest.raises(ValueError, match=word):
            segment_attention(**args, tiles=tiles)


def test_prepared_launch_runs_other_layers_and_checks_their_tensors():
    args = _args()
    launch = prepare_launch(**args)
    q, k, v = args["q"], args["k_cache"], args["v_cache"]
    assert torch.equal(run_launch(q, k, v, launch), segment_attention(**args))
    q2, k2, v2 = (torch.randn_like(t) for t in (q, k, v))  # another layer: same shapes, other values
    assert torch.equal(run_launch(q2, k2, v2, launch), segment_attention(**_args(q=q2, k_cache=k2, v_cache=v2)))
    with pytest.raises(ValueError, match=r"q is \(2, 4, 2, 64\).*prepared for \(2, 4, 1, 64\)"):
        run_launch(torch.cat([q, q], 2), k, v, launch)
    with pytest.raises(ValueError, match="k_cache is .* torch.float64"):
        run_launch(q, k.double(), v, launch)
    with pytest.raises(ValueError, match="v_cache is .* on meta"):
        run_launch(q, k, v.to("meta"), launch)
    with pytest.raises(TypeError, match="launch must be a Launch"):
        run_launch(q, k, v, dict(launch=launch))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_prepared_launch_keeps_the_tables_it_was_checked_with(dtype):
    """Editing a table in place after ``prepare_launch`` changes nothing (the launch holds copies), so an edit
    cannot get past the checks; ``copy_tables=False`` shares them, for callers whose tables are private."""
    args = {n: (t.to(dtype) if n in INDEX_TABLES else t) for n, t in _args().items()}
    expected = segment_attention(**args)
    launch = prepare_launch(**args)
    args["seg_len"].fill_(0)
    args["new_len"].fill_(0)
    torch.testing.assert_close(run_launch(args["q"], args["k_cache"], args["v_cache"], launch), expected,
                               atol=0, rtol=0)
    shared = prepare_launch(**_args(), copy_tables=False)
    assert shared.seg_len.data_ptr() != launch.seg_len.data_ptr()
    plain = _args()
    assert prepare_launch(**plain, copy_tables=False).seg_len.data_ptr() == plain["seg_len"].data_ptr()


@pytest.mark.skipif(CUDA, reason="table values are checked on CPU only")
@pytest.mark.parametrize("own_start", [-1, 10 ** 6])
def test_a_call_without_own_rows_may_have_any_own_start(own_start):
    """own_start is read only for own rows: a call with own_past = new_len = 0 (a padding row of the batch) is not
    refused for where its unused own_start points, as an empty segment is not for its start."""
    args = _args()
    own_past, new_len, start = (args[n].clone() for n in ("own_past", "new_len", "own_start"))
    own_past[-1] = new_len[-1] = 0
    assert own_past[0] + new_len[0] > 0
    out = segment_attention(**_args(own_past=own_past, new_len=new_len, own_start=start))
    start[-1] = own_start
    moved = segment_attention(**_args(own_past=own_past, new_len=new_len, own_start=start))
    torch.testing.assert_close(moved, out, atol=0, rtol=0)
    start[0] = own_start  # a call that has own rows is still checked
    with pytest.raises(ValueError, match="own rows"):
        segment_attention(**_args(own_past=own_past, new_len=new_len, own_start=start))


def test_unsupported_device_is_refused():
    meta = {name: t.to("meta") for name, t in _args().items()}
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        segment_attention(**meta)


def test_availability_helpers():
    kernel_module = sys.modules["triton_kernels.segment_attention"]
    assert kernel_module.segment_attention is segment_attention
    assert is_available(DEVICE) and not is_available("meta")
    assert is_available("cpu") == interpreter_active()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_kernel_matches_its_reference(dtype):
    """The one-launch split-K merge against ``_merge_splits`` on random partials, with rows that one split, or
    every split, saw no key of (max -inf, sum 0)."""
    kernel_module = sys.modules["triton_kernels.segment_attention"]
    splits, B, H, S, D = 3, 2, 3, 5, 64  # rows = 30: not a multiple of the merge's block
    gen = torch.Generator().manual_seed(0)
    acc = torch.randn(splits, B, H, S, D, generator=gen)
    row_max = torch.randn(splits, B, H, S, generator=gen) * 4
    row_sum = torch.rand(splits, B, H, S, generator=gen) + 0.5
    row_max[0, 0, 0, :2], row_sum[0, 0, 0, :2], acc[0, 0, 0, :2] = float("-inf"), 0.0, 0.0  # one split empty
    row_max[:, 1, 2, 4], row_sum[:, 1, 2, 4], acc[:, 1, 2, 4] = float("-inf"), 0.0, 0.0  # no key anywhere
    acc, row_max, row_sum = (t.to(DEVICE) for t in (acc, row_max, row_sum))
    ref, ref_lse = kernel_module._merge_splits(acc, row_max, row_sum, dtype)
    out = torch.empty(B, H, S, D, dtype=dtype, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    lse = torch.empty(B, H, S, device=DEVICE)
    kernel_module._merge_splits_kernel[(triton.cdiv(B * H * S, kernel_module.MERGE_ROWS),)](
        acc, row_max, row_sum, out, lse, B * H * S, splits, *out.stride(), H, S, HEAD_DIM=D,
        BLOCK_R=kernel_module.MERGE_ROWS, STORE_LSE=True, FIX_BF16=interpreter_active() and dtype == torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert (out[1, 2, 4] == 0).all() and lse[1, 2, 4] == float("inf")
