"""GPU benchmarks: the segment-attention kernel vs the PyTorch ways of computing the same attention.

Implementations, all at bf16 on the same workload (each call attends to randomly chosen cached messages,
linearised by per-message position deltas, then causally to its own tokens):

- ``triton``: ``segment_attention`` walks the segment table; no gather, no mask tensor.
- ``triton_in_loop``: the same with ``LaunchConfig.prerotate`` off: moved keys re-rotated in registers in the
  main loop, where the defaults (``launch_config``) copy them first, moved, at prefill; prefill workloads only.
  (Records from before prefill defaulted to the copy hold ``triton_prerotate`` instead: the copy forced on.)
- ``sdpa_dense``: gather + re-rotate each call's keys, SDPA with a dense boolean mask (the engine's torch backend).
- ``flex``: the same gather + re-rotation, compiled FlexAttention with a block mask from the key table.
- ``flex_kernel``: FlexAttention's kernel alone, on keys gathered and re-rotated before timing (a lower bound
  on what a FlexAttention backend could cost).
- ``sdpa_causal``: plain SDPA over contiguous K/V with the same number of attended tokens and a lower-right
  causal mask: no gather, no re-rotation; the speed of light for this much attention.

Host-side tables (dense layout, block mask) are built once outside the timed region: the engine builds them
once per step and shares them across layers. TFLOP/s in ``extra_info`` counts only attended (query, key) pairs
(4 * D flops per pair and head), so it is comparable across implementations whatever work they waste on masks.
A timed round is several calls then one synchronisation (``REPS``), the calls cycling through independent input sets
so that they read the store from device memory, not from the L2 cache (``input_sets``); ``seconds_per_call`` is the
median round over its calls. ``test_segment_attention_tiles`` times the kernel at each candidate tile configuration;
``test_segment_attention_training_speed`` times forward + backward (the kernel's backward against autograd through
the gather + dense-mask SDPA path and through causal SDPA). ``test_segment_attention_vs_base`` times the kernel of
this checkout against another commit's, forward and forward + backward, workload by workload on the same GPU, when
``CHOREO_BASE_KERNELS`` names a directory holding that commit's ``triton_kernels`` package (``git archive REV
triton_kernels | tar -x -C DIR``; a file ``DIR/COMMIT`` names the commit in the records).

Run: ``pytest tests/kernels/bench_segment_attention.py -m gpu --benchmark-group-by=group``; add
``--benchmark-save=NAME`` / ``--benchmark-compare --benchmark-compare-fail=median:10%`` for regression gates (the
median, as the tables report; pytest-benchmark's times are per round: ``calls_per_round`` calls).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

from tests.kernels.cases import QKV, index_tables, segment_table

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.bench,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA"),
]

H, HKV, D = 32, 8, 128  # Llama-3-8B attention shape


@pytest.fixture(scope="module", autouse=True)
def _warm_gpu():
    """About a second of bf16 matrix products before the first timed benchmark: an idle GPU runs its first
    benchmark at lower clocks (on an H100 the first kernel benchmark of a run spread from 190 to 1,300 us per
    call where the same launch later took 91 us)."""
    if torch.cuda.is_available():
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
    yield


DTYPE = torch.bfloat16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """B calls with S new tokens each; each attends to `attended` cached tokens in messages of `msg_len`, picked
    at random from a pool. `deltas`: "per-message" lays them out back to back (each message its own position
    delta, so one re-rotation per message), "shared" moves them all by one common delta (one re-rotation per
    call), "none" reads them where they were encoded (no re-rotation). The attention is the same either way."""

    name: str
    B: int
    S: int
    attended: int
    own_past: int = 0
    msg_len: int = 128
    deltas: str = "per-message"

    def __post_init__(self):
        if self.deltas not in ("per-message", "shared", "none"):
            raise ValueError(f"Workload.deltas must be 'per-message', 'shared' or 'none', got {self.deltas!r}")

    @property
    def pool_messages(self) -> int:  # twice as many cached messages as any call reads
        return 2 * self.attended // self.msg_len


WORKLOADS = [
    Workload(name="decode-B64-T1k", B=64, S=1, attended=1024, own_past=63),
    Workload(name="decode-B32-T4k", B=32, S=1, attended=4096, own_past=63),
    Workload(name="decode-B8-T16k", B=8, S=1, attended=16384, own_past=63),
    Workload(name="prefill-B16-S256-T1k", B=16, S=256, attended=1024),
    Workload(name="prefill-B8-S512-T4k", B=8, S=512, attended=4096),
    Workload(name="prefill-B8-S128-T16k", B=8, S=128, attended=16384),
    # one 4k-token message per call: the same attention as prefill-B8-S512-T4k without per-segment overhead
    Workload(name="prefill-B8-S512-T4k-one-segment", B=8, S=512, attended=4096, msg_len=4096),
    # the same 128-token messages moved by one common delta (the moved loop, its query re-rotated once), and
    # read where they were encoded (``TileTable.moved`` False: no re-rotation, the query stays in shared memory).
    # Beside prefill-B8-S512-T4k they split the cost of moving messages into the per-message re-rotations and
    # the moved loop's own overhead (kernel and causal SDPA only; not in the sweeps)
    Workload(name="prefill-B8-S512-T4k-one-delta", B=8, S=512, attended=4096, deltas="shared"),
    Workload(name="prefill-B8-S512-T4k-unmoved", B=8, S=512, attended=4096, deltas="none"),
]
SWEPT = [w for w in WORKLOADS if w.deltas == "per-message"]  # the tile and training sweeps' workloads


def build_inputs(w: Workload, device, seed=0) -> dict:
    """Random store + segment tables: ``segment_attention``'s arguments by name (as ``cases.Case.tensors``)."""
    gen = torch.Generator().manual_seed(seed)
    n_pick = w.attended // w.msg_len
    pool = w.pool_messages * w.msg_len
    own_rows = w.own_past + w.S
    N = pool + w.B * own_rows
    seg_start = torch.empty(w.B, n_pick, dtype=torch.int32)
    for b in range(w.B):
        seg_start[b] = torch.randperm(w.pool_messages, generator=gen)[:n_pick].int() * w.msg_len
    seg_len = torch.full((w.B, n_pick), w.msg_len, dtype=torch.int32)
    if w.deltas == "per-message":  # laid out back to back
        seg_delta = torch.arange(n_pick, dtype=torch.int32) * w.msg_len - seg_start
    else:  # all moved past the pool, or not at all
        seg_delta = torch.full_like(seg_start, pool if w.deltas == "shared" else 0)
    own_start = pool + torch.arange(w.B, dtype=torch.int32) * own_rows
    own_past = torch.full((w.B,), w.own_past, dtype=torch.int32)
    new_len = torch.full((w.B,), w.S, dtype=torch.int32)
    q = torch.randn(w.B, H, w.S, D, generator=gen)
    k, v = torch.randn(2, HKV, N, D, generator=gen)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    args = dict(q=q.to(DTYPE), k_cache=k.to(DTYPE), v_cache=v.to(DTYPE), seg_start=seg_start, seg_len=seg_len,
                seg_delta=seg_delta, own_start=own_start, own_past=own_past, new_len=new_len, inv_freq=inv_freq)
    return {name: t.to(device) for name, t in args.items()}


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _gather_rotated(args, layout):
    from triton_kernels.reference import rope_shift

    k = args["k_cache"][:, layout.key_rows].transpose(0, 1)  # (B, Hkv, T, D)
    v = args["v_cache"][:, layout.key_rows].transpose(0, 1)
    return rope_shift(k, layout.key_delta[:, None, :], args["inv_freq"]).to(args["q"].dtype), v


def _kernel_call(kernels, w: Workload, args, *, config=None, num_splits=None, prepared: bool | None = None):
    """The kernel of the package ``kernels`` (``triton_kernels``, or another commit's) at ``config`` (default: its
    own defaults). Its tile table is built, and its arguments checked and its tables copied (``prepare_launch``),
    once outside timing, as the engine does once per forward pass for every layer: what is timed is the launch
    (``run_launch``), with the own rows' longest length given so that the backward reads nothing back from the
    device. ``prepared=False`` times the whole ``segment_attention`` call instead (a commit without
    ``prepare_launch``: both sides of a comparison must be timed alike); default: whether ``kernels`` has it.
    The tables go by keyword, which commits from before they were keyword-only accept as well (same names)."""
    cfg = config or kernels.launch_config(w.S * H // HKV, D, DTYPE, kernels.interpreter_active())
    tiles = kernels.tile_table(**segment_table(args), block_n=cfg.block_n)
    splits = {} if num_splits is None else {"num_splits": num_splits}
    if prepared is None:
        prepared = hasattr(kernels, "prepare_launch")
    if not prepared:
        return lambda: kernels.segment_attention(**args, config=cfg, tiles=tiles, **splits)
    launch = kernels.prepare_launch(**args, config=cfg, tiles=tiles, max_own_len=w.own_past + w.S,
                                    copy_tables=False, **splits)
    q, k, v = (args[name] for name in QKV)
    return lambda: kernels.run_launch(q, k, v, launch)


def make_impl(name: str, w: Workload, args):
    """A zero-argument function computing the attention one way (host-side tables built here, untimed)."""
    import triton_kernels
    from triton_kernels.reference import dense_layout

    q = args["q"]
    if name == "triton":
        return _kernel_call(triton_kernels, w, args)
    if name == "triton_in_loop":  # moved keys re-rotated in the loop, not copied first (``LaunchConfig.prerotate``)
        cfg = dataclasses.replace(triton_kernels.launch_config(w.S * H // HKV, D, DTYPE), prerotate=False)
        return _kernel_call(triton_kernels, w, args, config=cfg)
    layout = dense_layout(**index_tables(args), num_queries=w.S)
    if name == "sdpa_dense":
        mask = layout.mask[:, None]  # (B, 1, S, T)

        def sdpa_dense():
            k, v = _gather_rotated(args, layout)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        return sdpa_dense
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        key_own, own_past, new_len = layout.key_own, args["own_past"], args["new_len"]

        def mask_mod(b, h, q_idx, kv_idx):
            own = key_own[b, kv_idx]
            seen = (own == -1) | ((own >= 0) & (own <= own_past[b] + q_idx))
            return seen & (q_idx < new_len[b])

        block_mask = create_block_mask(mask_mod, w.B, None, w.S, layout.key_rows.shape[1], device=q.device)
        flex = _compiled_flex()

        def flex_gathered():
            k, v = _gather_rotated(args, layout)
            return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

        flex_gathered.flex, flex_gathered.block_mask = flex, block_mask
        return flex_gathered
    if name == "flex_kernel":  # FlexAttention's kernel alone: keys gathered and re-rotated here, before timing
        gathered = make_impl("flex", w, args)
        k, v = _gather_rotated(args, layout)
        return lambda: gathered.flex(q, k, v, block_mask=gathered.block_mask, enable_gqa=True)
    if name == "sdpa_causal":
        from torch.nn.attention.bias import causal_lower_right

        # Every call its own contiguous cache of T rows, as ordinary batched attention reads: (B, Hkv, T, D). One
        # store expanded over the batch (batch stride 0) would let the B calls share T rows in the L2 cache.
        T = layout.key_rows.shape[1]
        grad = args["k_cache"].requires_grad
        k, v = (torch.randn(w.B, HKV, T, D, device=q.device, dtype=q.dtype).requires_grad_(grad) for _ in range(2))
        mask = causal_lower_right(w.S, T)

        def sdpa_causal():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        sdpa_causal.kv = (k, v)
        sdpa_causal.leaves = (k, v) if grad else ()  # its own keys and values take gradients in a training step
        return sdpa_causal
    raise ValueError(f"unknown implementation {name!r}")


IMPLS = ["triton", "triton_in_loop", "sdpa_dense", "flex", "flex_kernel", "sdpa_causal"]


def skip_reason(w: Workload, impl: str) -> str | None:
    """Why ``test_segment_attention_speed`` does not time ``impl`` on ``w``, or None."""
    if w.deltas != "per-message" and impl not in ("triton", "triton_in_loop", "sdpa_causal"):
        return f"deltas={w.deltas!r} isolates the kernel's re-rotation: kernel and causal SDPA only"
    if impl == "triton_in_loop" and w.S == 1:
        return "decode re-rotates in the loop by default: the other rotation is timed at prefill only"
    return None

# Calls per timed round: a round is REPS launches then one synchronisation, so that the host's launch and
# sync latency (tens of microseconds) does not swamp short kernels. Same for every implementation of a workload.
REPS = {1: 20}  # decode; prefill: 5


def input_sets(w: Workload, device="cuda") -> list[dict]:
    """Independent inputs of ``w`` (``build_inputs`` with seeds 0, 1, ...), enough that a timed round cycling
    through them reads its keys and values from device memory, not from the L2 cache: together their stores hold
    at least 4x the GPU's L2 (at least 2 sets, at most 16). Calls repeated over one store time the cache where
    the store fits in it (decode over 1k keys: an 8 MB pool) and a mix of cache and memory where it is not much
    larger (decode over 16k keys: a 134 MB pool, against an H200's 60 MB of L2). With one set, the same decode
    launch took 131 us a call in one test and 230 us in another of the same run; how much of the cache each
    test's store kept is the likely cause, not established."""
    first = build_inputs(w, device, seed=0)
    per_set = sum(first[name].numel() * first[name].element_size() for name in QKV)
    l2 = torch.cuda.get_device_properties(first["q"].device).L2_cache_size if first["q"].is_cuda else 0
    n = min(16, max(2, -(-4 * l2 // per_set)))
    return [first] + [build_inputs(w, device, seed=seed) for seed in range(1, n)]


WARM_S = 0.2  # seconds of the timed rounds themselves run before timing, in every test


def _time(benchmark, fns, w: Workload, rounds: int = 10) -> float:
    """Median seconds per call over ``rounds`` rounds of REPS calls each, the calls taking the zero-argument
    functions ``fns`` in turn (one per input set, ``input_sets``; each called once before timing)."""
    reps = REPS.get(w.S, 5)
    turn = itertools.cycle(fns)

    def run():
        for _ in range(reps):
            next(turn)()
        torch.cuda.synchronize()

    for fn in fns:
        fn()
    torch.cuda.synchronize()
    end = time.perf_counter() + WARM_S  # the GPU idled while this test built its inputs: back to full clocks
    while time.perf_counter() < end:
        run()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(calls_per_round=reps, input_sets=len(fns))
    return benchmark.stats.stats.median / reps


def _training_step(make, args):
    """A zero-argument forward + backward of the implementation ``make(args)`` builds, with gradients to q and to
    the whole store (``args`` with q, k and v made leaves that require grad): ``step.args`` (those arguments),
    ``step.leaves`` (q, k, v) and ``step.cotangent`` let another implementation differentiate at the same point."""
    leaves = tuple(args[name].detach().requires_grad_() for name in QKV)
    at_leaves = {**args, **dict(zip(QKV, leaves))}
    fn = make(at_leaves)
    g = torch.randn_like(leaves[0])
    wanted = leaves + tuple(getattr(fn, "leaves", ()))  # causal SDPA: its own keys and values, not the store's

    def step():
        return torch.autograd.grad(fn(), wanted, g, allow_unused=True)[:len(leaves)]

    step.args, step.leaves, step.cotangent = at_leaves, leaves, g
    return step


def _assert_grads_close(step, reference):
    """``step``'s gradients (``_training_step``) against those of the implementation ``reference(step.args)``
    builds, at the same inputs and cotangent: max error within 5% of the reference's largest gradient + 0.01."""
    theirs = torch.autograd.grad(reference(step.args)(), step.leaves, step.cotangent)
    for mine, ref in zip(step(), theirs):
        err = (mine.float() - ref.float()).abs().max().item()
        assert err <= 5e-2 * ref.float().abs().max().item() + 1e-2, err


def _machine_info() -> dict:
    import triton

    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("w", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_segment_attention_speed(benchmark, w, impl):
    from triton_kernels.reference import dense_layout, segment_attention_sdpa

    if skip_reason(w, impl):
        pytest.skip(skip_reason(w, impl))
    sets = input_sets(w)
    args = sets[0]
    layout = dense_layout(**index_tables(args), num_queries=w.S)
    fns = [make_impl(impl, w, a) for a in sets]
    fn = fns[0]
    out = fn()  # also compiles before timing
    if impl != "sdpa_causal":  # the same attention: check before timing
        torch.testing.assert_close(out, segment_attention_sdpa(**args, layout=layout), atol=2e-2, rtol=2e-2)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    benchmark.group = w.name
    seconds = _time(benchmark, fns, w)
    pairs = int(layout.mask.sum())  # attended (query, key) pairs per head
    benchmark.extra_info.update(
        impl=impl, **_machine_info(),
        attended_pairs=pairs,
        mask_density=layout.density,
        seconds_per_call=seconds,
        tflops=4 * D * H * pairs / seconds / 1e12,
        new_tokens_per_s=w.B * w.S / seconds,
        peak_extra_mem_mib=(torch.cuda.max_memory_allocated() - base_mem) / 2**20,
    )


def _tile_configs():
    """(workload, LaunchConfig, num_splits) candidates: tiles and loop structure for prefill, split-K for decode,
    tensor-descriptor (TMA) loads for both (tiles that compile for sm_90 with at most a few spilled bytes,
    ``ptxas_report``; at bf16 D 128, m64 n128 w4 s2 spills 36 B and issues about 0.79x the cycles of its dots
    against 0.98x for the default m64 n64, for 144 KiB of shared memory: one program per multiprocessor instead
    of two), and
    a deeper flat-loop ring (``flat_stages=num_stages + 1``: one more K/V tile in flight, for more shared
    memory) beside the default at the default tiles, and the moved keys copied first (``prerotate``) at three
    prefill tiles."""
    from triton_kernels import LaunchConfig

    decode = [(LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, flat=f), n)
              for f, n in ((True, 1), (False, 1), (True, 2), (True, 4), (True, 8), (True, 16))]
    decode += [(LaunchConfig(block_m=16, block_n=128, num_warps=4, num_stages=2), 8),
               (LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, tma=True), 1),
               (LaunchConfig(block_m=16, block_n=128, num_warps=4, num_stages=3, tma=True), 1),
               (LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, flat_stages=4), 1),
               (LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, flat_stages=4), 8)]
    prefill = [(LaunchConfig(block_m=m, block_n=n, num_warps=wp, num_stages=st, flat=f, tma=t), 1)
               for m, n, wp, st, f, t in ((128, 64, 8, 3, True, False), (128, 64, 8, 3, False, False),
                                          (64, 64, 4, 3, True, False), (128, 128, 8, 2, True, False),
                                          (64, 64, 4, 4, True, False), (64, 128, 4, 2, True, False),
                                          (64, 64, 4, 3, True, True),
                                          (128, 64, 8, 3, True, True), (128, 64, 8, 4, True, True),
                                          (128, 128, 8, 2, True, True))]
    prefill += [(LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, flat_stages=4), 1),
                (LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, flat_stages=4, tma=True), 1)]
    prefill += [(LaunchConfig(block_m=m, block_n=n, num_warps=wp, num_stages=st, prerotate=True), 1)
                for m, n, wp, st in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))]
    return [(w, c, n) for w in SWEPT for c, n in (decode if w.S == 1 else prefill)]


TILES = _tile_configs()
TILE_IDS = [f"{w.name}-m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}"
            f"{'-tma' if c.tma else '-prerotate' if c.prerotate else '' if c.flat else '-nested'}"
            f"{f'-flat{c.flat_stages}' if c.flat_stages else ''}-k{n}" for w, c, n in TILES]


@pytest.mark.parametrize("w, cfg, splits", TILES, ids=TILE_IDS)
def test_segment_attention_tiles(benchmark, w, cfg, splits):
    """The kernel at each candidate tile configuration and split count (what the defaults are chosen from)."""
    from triton_kernels import default_splits, launch_config, tile_table
    from triton_kernels.reference import dense_layout

    if cfg.tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor-descriptor (TMA) loads need compute capability >= 9")
    sets = input_sets(w)
    args = sets[0]

    import triton_kernels

    benchmark.group = f"{w.name} tiles"
    seconds = _time(benchmark, [_kernel_call(triton_kernels, w, a, config=cfg, num_splits=splits) for a in sets], w)
    tiles = tile_table(**segment_table(args), block_n=cfg.block_n)
    pairs = int(dense_layout(**index_tables(args), num_queries=w.S).mask.sum())
    default = launch_config(w.S * H // HKV, D, DTYPE)
    default_k = default_splits(triton.cdiv(w.S * H // HKV, default.block_m) * w.B * HKV,
                               tiles.max_tiles * cfg.block_n, torch.device("cuda"))
    benchmark.extra_info.update(config=dataclasses.asdict(cfg), num_splits=splits,
                                is_default=cfg == default and splits == default_k, default_splits=default_k,
                                **_machine_info(), seconds_per_call=seconds, tflops=4 * D * H * pairs / seconds / 1e12)


TRAIN_IMPLS = ["triton", "sdpa_dense", "sdpa_causal"]
TRAIN_WORKLOADS = [w for w in SWEPT if w.S > 1]  # training replays teacher-forced calls: prefill shapes


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("w", TRAIN_WORKLOADS, ids=[w.name for w in TRAIN_WORKLOADS])
def test_segment_attention_training_speed(benchmark, w, impl):
    """Forward + backward with gradients to q and to the whole store (a LoRA step through the cache needs
    both). TFLOP/s charge 3.5x the forward's flops (the backward's 5 matmuls per tile against the forward's 2)."""
    from triton_kernels.reference import dense_layout

    sets = input_sets(w)
    args = sets[0]
    steps = [_training_step(lambda a: make_impl(impl, w, a), a) for a in sets]
    steps[0]()  # also compiles before timing
    if impl == "triton":  # the same gradients as the dense-mask backend: check before timing
        _assert_grads_close(steps[0], lambda a: make_impl("sdpa_dense", w, a))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    benchmark.group = f"{w.name} training"
    seconds = _time(benchmark, steps, w)
    pairs = int(dense_layout(**index_tables(args), num_queries=w.S).mask.sum())
    benchmark.extra_info.update(
        impl=impl, **_machine_info(), attended_pairs=pairs, seconds_per_call=seconds,
        tflops=3.5 * 4 * D * H * pairs / seconds / 1e12,
        peak_extra_mem_mib=(torch.cuda.max_memory_allocated() - base_mem) / 2**20,
    )


def _backward_tile_configs():
    """(label, dq LaunchConfig, dkdv LaunchConfig; None: the default) candidates of the backward sweep at D 128:
    the defaults (128-row query blocks for both kernels: about 0.8x the issue cycles of their dots on sm_90,
    ``ptxas_report``), the earlier ones (dq 64 rows, dkdv 32: 1.87x and 1.55x), and dkdv on 32 rows and 4 warps
    (1.05x, two programs per multiprocessor). The key tile is the forward's (its tile table serves the backward)."""
    from triton_kernels import LaunchConfig

    earlier_dq = LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=2, flat_stages=3)
    earlier_dkdv = LaunchConfig(block_m=32, block_n=64, num_warps=8, num_stages=3)
    return [("default", None, None), ("dq m64 w8 s2, dkdv m32 w8 s3", earlier_dq, earlier_dkdv),
            ("dkdv m32 w4 s3", None, LaunchConfig(block_m=32, block_n=64, num_warps=4, num_stages=3))]


BACKWARD_TILES = _backward_tile_configs()


@pytest.mark.parametrize("label, dq, dkdv", BACKWARD_TILES,
                         ids=[label.replace(", ", "-").replace(" ", "-") for label, *_ in BACKWARD_TILES])
@pytest.mark.parametrize("w", TRAIN_WORKLOADS, ids=[w.name for w in TRAIN_WORKLOADS])
def test_segment_attention_backward_tiles(benchmark, monkeypatch, w, label, dq, dkdv):
    """The kernel's forward + backward with each candidate backward tile (what ``backward_configs`` is chosen
    from)."""
    import triton_kernels.segment_attention_backward as bwd
    from triton_kernels.reference import dense_layout

    default = bwd.backward_configs
    monkeypatch.setattr(bwd, "backward_configs", lambda *a, **k: tuple(
        mine or theirs for mine, theirs in zip((dq, dkdv), default(*a, **k))))
    sets = input_sets(w)
    args = sets[0]
    benchmark.group = f"{w.name} backward tiles"
    seconds = _time(benchmark, [_training_step(lambda a: make_impl("triton", w, a), a) for a in sets], w)
    pairs = int(dense_layout(**index_tables(args), num_queries=w.S).mask.sum())
    benchmark.extra_info.update(backward_tiles=label, **_machine_info(), seconds_per_call=seconds,
                                tflops=3.5 * 4 * D * H * pairs / seconds / 1e12)


BASE_ENV = "CHOREO_BASE_KERNELS"


@functools.cache
def _base_kernels():
    """Another commit's ``triton_kernels`` from ``$CHOREO_BASE_KERNELS/triton_kernels``, imported as the package
    ``triton_kernels_base`` (its modules import each other relatively), with that commit's name from
    ``$CHOREO_BASE_KERNELS/COMMIT`` (or the directory's path)."""
    root = Path(os.environ[BASE_ENV])
    init = root / "triton_kernels" / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{BASE_ENV}={root}: no triton_kernels/__init__.py there")
    spec = importlib.util.spec_from_file_location("triton_kernels_base", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    commit = root / "COMMIT"
    return module, commit.read_text().strip() if commit.is_file() else str(root)


@pytest.mark.parametrize("which", ["base", "head"])  # innermost: the two commits of a workload run back to back
@pytest.mark.parametrize("w, mode", [(w, "forward") for w in WORKLOADS] + [(w, "training") for w in TRAIN_WORKLOADS],
                         ids=[f"{w.name}-forward" for w in WORKLOADS] + [f"{w.name}-training" for w in TRAIN_WORKLOADS])
def test_segment_attention_vs_base(benchmark, w, mode, which):
    """This checkout's kernel against another commit's (``CHOREO_BASE_KERNELS``), each at its own defaults:
    forward, or forward + backward with gradients to q and the whole store. Both must give the same outputs."""
    import triton_kernels
    from triton_kernels.reference import dense_layout

    if not os.environ.get(BASE_ENV):
        pytest.skip(f"set {BASE_ENV} to a directory holding another commit's triton_kernels package")
    base, base_commit = _base_kernels()
    sets = input_sets(w)
    args = sets[0]
    mine, other = (base, triton_kernels) if which == "base" else (triton_kernels, base)
    prepared = hasattr(base, "prepare_launch")  # both commits timed alike: the launch alone, or the whole call
    if mode == "forward":
        torch.testing.assert_close(_kernel_call(mine, w, args, prepared=prepared)(),
                                   _kernel_call(other, w, args, prepared=prepared)(), atol=2e-2, rtol=2e-2)
        fns = [_kernel_call(mine, w, a, prepared=prepared) for a in sets]
    else:
        fns = [_training_step(lambda a: _kernel_call(mine, w, a, prepared=prepared), a) for a in sets]
        _assert_grads_close(fns[0], lambda a: _kernel_call(other, w, a, prepared=prepared))
    torch.cuda.synchronize()
    benchmark.group = f"{w.name} vs base {mode}"
    seconds = _time(benchmark, fns, w)
    pairs = int(dense_layout(**index_tables(args), num_queries=w.S).mask.sum())
    flops = (3.5 if mode == "training" else 1.0) * 4 * D * H * pairs
    benchmark.extra_info.update(which=which, mode=mode, base_commit=base_commit, prepared=prepared, **_machine_info(),
                                seconds_per_call=seconds, tflops=flops / seconds / 1e12)
