"""Registers, spills, shared memory and pipelining of the segment-attention kernels, compiled for a GPU without one.

Triton compiles ahead of time for any target (``triton.compile`` with a ``GPUTarget``), and its wheel ships
``ptxas``; ``ptxas -v`` reports each kernel's registers per thread and the bytes it spills to local memory. A
spilling kernel is slow whatever its tiles, so this is how the default tiles are checked on a machine with no
GPU (a regression test runs it), and a first filter before timing tiles on one. The Triton GPU IR shows how far
ahead the software pipeliner loads each loop's tiles (``loop_buffers``): a loop that waits for every load leaves
the tensor cores idle for a memory latency per tile, whatever its tiles.

Arguments are specialised as the JIT specialises a real launch of the engine's layout: pointers 16-byte aligned,
unit strides as constants, strides that are multiples of 16 marked so (``values``).

Usage (TRITON_INTERPRET must be unset: interpreted kernels cannot be compiled)::

    python -m triton_kernels.ptxas_report                 # the default tiles, sm_90
    python -m triton_kernels.ptxas_report --sweep dq --head-dim 128 --dtype bf16
    python -m triton_kernels.ptxas_report --sweep fwd --seq-len 1      # the forward's tiles for decode
    python -m triton_kernels.ptxas_report --flat-stages 3 5     # the flat loops at other stage counts
    python -m triton_kernels.ptxas_report --dtype bf16 --head-dim 128 --opcodes 12   # where the loops' issue goes
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["KernelStats", "compile_stats", "default_stats", "loop_instructions", "switch_instructions", "opcodes"]

KERNELS = ("fwd", "dq", "dkdv")
FLAT_KERNELS = ("fwd", "dq")  # those with a loop over the tile table (``LaunchConfig.flat_stages``)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Compute capabilities x10 (--arch) the whole report runs for with Triton 3.7's wheel: its nvdisasm fails on an
# sm_70 cubin, its ptxas on the sm_100a and sm_120a PTX, and 0 aborts in LLVM.
ARCHES = (75, 80, 86, 89, 90)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelStats:
    """One compiled kernel: ``registers`` per thread, ``spill_bytes`` (local-memory stores), ``shared_bytes``,
    ``loop_buffers``: the shared-memory buffers of each tile its first loop loads (forward: the segments' K/V
    tiles; dq: K/V; dkdv: the query blocks); 1 = not pipelined, b = tiles loaded b - 1 iterations ahead; and
    ``loop_instructions``: what one iteration of that loop issues on its common path (``loop_instructions``;
    None without nvdisasm); ``switch_instructions``: what the largest block that loop jumps over issues when it
    runs (the forward's re-rotation at a new segment, ``switch_instructions``); ``loop_opcodes`` /
    ``switch_opcodes``: how many of each opcode those are (``opcodes``), when asked for. The loop figures are
    None for a kernel without a loop (``prerotate``, the pass that copies moved keys). ``seq_len``: the new tokens
    per call it was compiled for (1: a decode launch); ``split``: the forward's split-K variant."""

    kernel: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool
    flat_stages: int | None
    deterministic: bool
    moved: bool
    seq_len: int
    split: bool
    registers: int
    spill_bytes: int
    shared_bytes: int
    loop_buffers: int | None
    loop_instructions: int | None
    switch_instructions: int | None
    arch: int
    loop_opcodes: dict[str, int] | None = None
    switch_opcodes: dict[str, int] | None = None


def _kernel(name: str):
    import triton_kernels.segment_attention_backward as bwd

    fwd = sys.modules["triton_kernels.segment_attention"]
    if fwd.interpreter_active():
        raise RuntimeError("the kernels were imported for the Triton interpreter: unset TRITON_INTERPRET to compile "
                           "them for a GPU")
    return {"fwd": fwd._attn_fwd, "dq": bwd._attn_bwd_dq, "dkdv": bwd._attn_bwd_dkdv,
            "prerotate": fwd._prerotate_keys}[name]


def values(head_dim: int, seq_len: int = 256) -> dict[str, int]:
    """Representative integer arguments: q (B, H, S, D) and out contiguous with S = ``seq_len`` new tokens per call
    (1 at decode, which the JIT then compiles as a constant), store (Hkv, N, D), tile table (B, T), segment table
    (B, G), H = 32 query heads over Hkv = 8."""
    S, H, Hkv, T, N, G, D = seq_len, 32, 8, 40, 40000, 8, head_dim
    q = {"b": H * S * D, "h": S * D, "s": D, "d": 1}
    kv = {"h": N * D, "n": D, "d": 1}
    return ({f"stride_q{k}": v for k, v in q.items()} | {f"stride_o{k}": v for k, v in q.items()}
            | {f"stride_k{k}": v for k, v in kv.items()} | {f"stride_v{k}": v for k, v in kv.items()}
            | {"stride_segb": G, "stride_segg": 1, "stride_tb": T, "stride_tt": 1,
               "stride_pb": Hkv * T * 64 * D, "stride_ph": T * 64 * D, "stride_pn": D,
               "H": H, "Hkv": Hkv, "S": S, "G": G, "N": N})


FLOAT_ARGS = ("qk_scale", "sm_scale")
FP32_POINTERS = ("LSE", "DI", "DK", "DV", "INV_FREQ", "PART_ACC", "PART_M", "PART_L")
DATA_POINTERS = ("Q", "K", "V", "DO", "DQ", "OUT", "K_DESC", "V_DESC", "KP")
I64_POINTERS = ("DEST", "TILES")


def compile_stats(kernel: str, dtype: str, head_dim: int, *, block_m: int, block_n: int, num_warps: int,
                  num_stages: int, tma: bool = False, flat_stages: int | None = None, group: int = 4,
                  arch: int = 90, deterministic: bool = False, moved: bool = True, prerotate: bool = False,
                  half_angles: bool | None = None, seq_len: int = 256, split: bool = False,
                  with_opcodes: bool = False) -> KernelStats:
    """Compile one kernel for ``sm_<arch>`` and read its resource use from ``ptxas -v`` and its pipelining from
    the Triton GPU IR (``tma`` and ``flat_stages``: the forward's ``LaunchConfig`` options; ``deterministic``:
    dkdv's partials instead of atomics; ``moved=False``: the launch has no moved segment, no re-rotation;
    ``prerotate``: the forward's ``LaunchConfig.prerotate`` main loop, over keys copied moved;
    ``half_angles``: how it evaluates the rotation's cosines and sines, None: as launches do,
    ``segment_attention.half_angles``; ``seq_len``: new tokens per call, S (1: a decode launch, S a constant);
    ``split``: the forward's split-K variant, which writes partials instead of the output and its log-sum-exp (what
    ``default_splits`` gives a launch that leaves half the multiprocessors idle); ``with_opcodes``: also count the
    opcodes of its main loop and of the largest block that loop skips, ``opcodes``)."""
    if kernel not in (*KERNELS, "prerotate"):
        raise ValueError(f"kernel must be one of {(*KERNELS, 'prerotate')}, got {kernel!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if split and kernel != "fwd":
        raise ValueError(f"split=True is the forward's split-K variant; kernel {kernel!r} has none")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = _kernel(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    dot_fp32 = dtype == "fp32"
    constexprs = {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                  "DOT_FP32": dot_fp32, "INPUT_PRECISION": "ieee" if dot_fp32 else "tf32", "FIX_BF16": False}
    if kernel in FLAT_KERNELS:
        from .segment_attention import LaunchConfig

        constexprs["FLAT_STAGES"] = LaunchConfig(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                                 num_stages=num_stages, flat_stages=flat_stages).flat_loop_stages
    constexprs["MOVED"] = moved and not prerotate
    if half_angles is None:
        from .segment_attention import half_angles as rule

        half_angles = rule(kernel, DTYPES[dtype], head_dim)
    constexprs["HALF_ANGLES"] = half_angles
    if kernel == "fwd":
        constexprs |= {"FLAT": True, "SPLIT": split, "STORE_LSE": not split, "TMA": tma, "PREROTATED": prerotate}
    if kernel == "dkdv":
        constexprs["DETERMINISTIC"] = deterministic
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # the prerotate pass takes few
    ints = values(head_dim, seq_len)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in ints:
            if ints[name] == 1:  # the JIT turns integer arguments equal to 1 into constants
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if ints[name] % 16 == 0:
                    attrs[(i,)] = backend.parse_attr("D")
        elif name in ("K_DESC", "V_DESC") and tma:
            signature[name] = f"tensordesc<{dtype}[1,{block_n},{head_dim}]>"
        else:
            signature[name] = (f"*{dtype}" if name in DATA_POINTERS else "*fp32" if name in FP32_POINTERS
                               else "*i64" if name in I64_POINTERS else "*i32")
            attrs[(i,)] = backend.parse_attr("D")
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    registers, spills = _ptxas_verbose(compiled.asm["ptx"], arch)
    tile = block_m if kernel == "dkdv" else block_n
    loop = kernel != "prerotate"  # the pass that copies moved keys has no loop to count
    sass = _disassemble(compiled.asm["cubin"]) if loop else None
    loop_ins, switch_ins = (None, None) if sass is None else (loop_instructions(sass), switch_instructions(sass))
    counts = {} if sass is None or not with_opcodes else dict(loop_opcodes=dict(opcodes(sass, "loop")),
                                                               switch_opcodes=dict(opcodes(sass, "skipped")))
    return KernelStats(kernel=kernel, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
                       num_warps=num_warps, num_stages=num_stages, tma=tma, flat_stages=flat_stages,
                       deterministic=deterministic, moved=moved, seq_len=seq_len, split=split,
                       registers=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                       loop_buffers=loop_buffers(compiled.asm["ttgir"], tile, head_dim) if loop else None,
                       loop_instructions=loop_ins, switch_instructions=switch_ins, arch=arch, **counts)


def loop_buffers(ttgir: str, tile: int, head_dim: int) -> int:
    """Shared-memory buffers per tile of the first loop in a kernel's Triton GPU IR: the pipeliner allocates a ring
    of b buffers, ``local_alloc : () -> memdesc<b x R x C>``, before the loop it pipelines, for each load it keeps
    b - 1 iterations ahead (R x C: the tile, (tile, head_dim) in either order). The least over that loop's tiles;
    1 where it allocates none (loads wait in the iteration that uses them)."""
    head, found, _ = ttgir.partition("scf.for")
    if not found:
        raise ValueError("the kernel's IR has no loop (scf.for)")
    rings = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x(\d+)x(\d+)x", head)
    shapes = {(tile, head_dim), (head_dim, tile)}
    counts = [int(b) for b, r, c in rings if (int(r), int(c)) in shapes]
    return min(counts, default=1)


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+`?\(?\.?(L_x_\d+)")


def _parse_sass(sass: str) -> tuple[list[str], dict[str, int]]:
    """Instructions of ``nvdisasm`` output, in order, and each label's index among them."""
    ins, labels = [], {}
    for line in sass.splitlines():
        if m := _SASS_LABEL.match(line):
            labels[m.group(1)] = len(ins)
        elif m := _SASS_LINE.match(line):
            ins.append(m.group(1))
    return ins, labels


def _main_loop(ins: list[str], labels: dict[str, int]) -> tuple[int, int]:
    """First and last instruction of the main loop: the first innermost loop (code from a label to a branch back
    to it) holding a tensor-core instruction (HGMMA / HMMA); in a kernel with none, the longest loop."""
    # A loop: code from a label to a branch back to it, with no EXIT between (a block the compiler placed after
    # the function's end, e.g. a slow path, jumps back into the body: that is not a loop).
    loops = [(labels[m.group(1)], i) for i, text in enumerate(ins)
             if (m := _SASS_BRANCH.search(text)) and labels.get(m.group(1), len(ins)) <= i
             and not any(re.search(r"\bEXIT\b", t) for t in ins[labels[m.group(1)]:i])]
    mma = [(lo, hi) for lo, hi in loops if any(re.search(r"\bH(GMMA|MMA)\b", t) for t in ins[lo:hi + 1])]
    if not loops:
        raise ValueError("the kernel's SASS has no loop")
    innermost = [a for a in mma if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in mma)]
    return min(innermost, key=lambda r: r[0]) if innermost else max(loops, key=lambda r: r[1] - r[0])


def _skips(ins: list[str], labels: dict[str, int], lo: int, hi: int) -> list[tuple[int, int]]:
    """The blocks [first, end) that forward branches between ``lo`` and ``hi`` jump over, landing at most at
    ``hi`` (a branch one past the end leaves the range: it is an exit, not a skip)."""
    out = []
    for i in range(lo, hi + 1):
        if (m := _SASS_BRANCH.search(ins[i])) and i < labels.get(m.group(1), -1) <= hi:
            out.append((i + 1, labels[m.group(1)]))
    return out


def _common_path(ins: list[str], labels: dict[str, int], lo: int, hi: int) -> list[int]:
    """The indices from ``lo`` to ``hi`` (inclusive) that run with every forward branch inside taken."""
    skipped = set()
    for first, end in _skips(ins, labels, lo, hi):
        skipped.update(range(first, end))
    return [i for i in range(lo, hi + 1) if i not in skipped]


def _issued(sass: str, part: str) -> list[str]:
    """The instructions of the main loop's common path (``part="loop"``) or of its largest skipped block's
    (``"skipped"``), in order."""
    if part not in ("loop", "skipped"):
        raise ValueError(f"part must be 'loop' or 'skipped', got {part!r}")
    ins, labels = _parse_sass(sass)
    lo, hi = _main_loop(ins, labels)
    if part == "loop":
        return [ins[i] for i in _common_path(ins, labels, lo, hi)]
    blocks = _skips(ins, labels, lo, hi)
    if not blocks:
        return []
    first, end = max(blocks, key=lambda b: b[1] - b[0])
    # up to its landing instruction (an inner branch may land there too), which is not the block's
    return [ins[i] for i in _common_path(ins, labels, first, end)][:-1]


def loop_instructions(sass: str) -> int:
    """Instructions one iteration of a kernel's main loop issues on its common path, from its SASS (``nvdisasm``
    output). The main loop: the first innermost loop (code from a label to a branch back to it) holding a
    tensor-core instruction (HGMMA / HMMA): the forward's and dq's loop over the segments' key tiles, dkdv's over
    query blocks (in a kernel with no tensor-core instruction, IEEE fp32 dots on the FMA units: the longest loop). Its
    common path takes every forward branch that lands inside it: the blocks the compiler jumps over run only
    sometimes (a new segment's re-rotation, a partial tile's mask, a sine's slow argument reduction); a branch
    out of the loop is its exit, not taken while it runs."""
    return len(_issued(sass, "loop"))


def switch_instructions(sass: str) -> int:
    """Instructions the largest block the main loop jumps over issues when it runs, on its own common path (its
    inner forward branches taken): in the forward, the query's re-rotation where a new segment's delta begins;
    in dq, the new delta's cosines and sines; in dkdv, an own-key tile's causal mask. 0 where the loop jumps
    over nothing."""
    return len(_issued(sass, "skipped"))


def opcodes(sass: str, part: str = "loop") -> collections.Counter:
    """How many instructions of each opcode (with its modifiers: ``LDG.E.128``, ``F2FP.BF16.F32.PACK_AB``; past
    any predicate) the main loop's common path issues (``part="loop"``: ``loop_instructions`` in all) or its
    largest skipped block does (``"skipped"``: ``switch_instructions``). Where a loop's issue slots go: e.g. a
    bf16 -> fp32 conversion is one ``IMAD.U32`` or ``LOP3.LUT`` per element, a K / V address two ``LEA``s."""
    return collections.Counter(t.split()[1] if t.startswith("@") else t.split()[0] for t in _issued(sass, part))


def _disassemble(cubin: bytes) -> str | None:
    """``nvdisasm`` output of a cubin (None without nvdisasm)."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        run = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True)
    return run.stdout


def _ptxas_verbose(ptx: str, arch: int) -> tuple[int, int]:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    if regs is None:
        raise RuntimeError(f"ptxas -v printed no register count:\n{run.stderr}")
    return int(regs.group(1)), int(spills.group(1)) if spills else 0


GROUP = 4  # query heads per KV head in ``values`` (H = 32 over Hkv = 8)
SHAPES = {"prefill": 256, "decode": 1}  # new tokens per call: 1024 and 4 packed query rows (S x GROUP)


def default_configs(dtype: str, head_dim: int) -> dict[str, tuple["object", int]]:
    """The tiles ``segment_attention`` and its backward pick for prefill (S = 256 new tokens per call, S * group =
    1024 packed query rows) and decode (S = 1, 4 rows), each with its S: {label: (config, S)}."""
    from .segment_attention import launch_config
    from .segment_attention_backward import backward_configs

    torch_dtype = DTYPES[dtype]
    out = {}
    for shape, seq_len in SHAPES.items():
        rows = seq_len * GROUP
        fwd = launch_config(rows, head_dim, torch_dtype)
        dq, dkdv = backward_configs(fwd, rows, head_dim, torch_dtype)
        out |= {f"fwd {shape}": (fwd, seq_len), f"dq {shape}": (dq, seq_len), f"dkdv {shape}": (dkdv, seq_len)}
    return out


SPLIT_LABEL = "fwd decode split-K"


def default_stats(dtypes: Sequence[str] = ("bf16",), head_dims: Sequence[int] = (64, 128), arch: int = 90,
                  flat_stages: Sequence[int | None] = (None,), with_opcodes: bool = False):
    """``KernelStats`` of every default tile configuration (prefill and decode, forward and backward), each compiled
    for its S, and of the decode forward's split-K variant (``SPLIT_LABEL``: what a decode launch of few calls
    runs, ``default_splits``); those of the kernels with a flat tile loop (forward, dq) once per ``flat_stages``
    (None: the default). A default that copies moved keys first (``LaunchConfig.prerotate``: prefill at 16-bit
    dtypes) gives two rows: ``label`` with the re-rotation in the loop (what decode, short prefills and launches
    past the copy's budget run) and ``label + ", keys copied first"`` (the loop over the copy). Returns
    [(label, stats)]."""
    stats = []
    for dtype, head_dim in itertools.product(dtypes, head_dims):
        configs = default_configs(dtype, head_dim)
        jobs = [(label, label.split()[0], default, seq_len, False) for label, (default, seq_len) in configs.items()]
        jobs.append((SPLIT_LABEL, "fwd", *configs["fwd decode"], True))
        for label, kernel, default, seq_len, split in jobs:
            if default.prerotate:  # both loops a moved launch may run: re-rotating in the loop, and over the copy
                variants = [(label, dataclasses.replace(default, prerotate=False)),
                            (f"{label}, keys copied first", default)]
            else:
                variants = [(label, default)]
            for row, variant in variants:
                for cfg in ([dataclasses.replace(variant, flat_stages=f) if f else variant for f in flat_stages]
                            if kernel in FLAT_KERNELS else [variant]):
                    stats.append((row, compile_stats(kernel, dtype, head_dim, block_m=cfg.block_m,
                                                       block_n=cfg.block_n, num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages, tma=cfg.tma, group=GROUP,
                                                       prerotate=cfg.prerotate, flat_stages=cfg.flat_stages,
                                                       arch=arch, seq_len=seq_len, split=split,
                                                       with_opcodes=with_opcodes)))
    return stats


COLUMNS = ["kernel", "dtype", "D", "tiles (block_m, block_n, warps, stages)", "registers / thread", "spilled bytes",
           "shared memory", "first loop's buffers per tile", "first loop's instructions per tile",
           "instructions of its largest skipped block"]


def tiles_label(st: KernelStats) -> str:
    """'m64 n64 w4 s3', with ' flat-s5' for a flat loop's own stages and ' TMA'."""
    return (f"m{st.block_m} n{st.block_n} w{st.num_warps} s{st.num_stages}"
            + (f" flat-s{st.flat_stages}" if st.flat_stages else "") + (" TMA" if st.tma else ""))


def write_report(rows, out: Path, *, command: str) -> Path:
    """``out/registers.{md,json}``: one row per compiled kernel, with provenance (the compiler is the device)."""
    import triton

    from choreo.provenance import provenance
    from choreo.report import write_table

    arch = {st.arch for _, st in rows}
    table = [[label, st.dtype, st.head_dim,
              tiles_label(st), st.registers, st.spill_bytes, f"{st.shared_bytes / 1024:.0f} KiB", st.loop_buffers,
              "-" if st.loop_instructions is None else st.loop_instructions,
              "-" if st.switch_instructions is None else st.switch_instructions]
             for label, st in rows]
    prov = provenance(command=command, device=f"none: compiled for sm_{'/'.join(map(str, sorted(arch)))} by Triton "
                                             f"{triton.__version__} and its ptxas")
    notes = ["Compiled ahead of time with arguments specialised as the JIT specialises the engine's layout (16-byte "
             "aligned pointers, unit strides as constants, multiples of 16 marked); registers and spills from "
             "`ptxas -v`. A GPU has 255 registers per thread at most; spilled bytes go to local memory in the "
             "inner loop. 'prefill': 256 new tokens per call, 1024 packed query rows (S x H / Hkv); 'decode': one "
             "token per call (S = 1, which the JIT compiles as a constant), 4 rows. 'fwd decode split-K': the decode "
             "forward as a launch that leaves half the multiprocessors idle runs it (few calls, default_splits), "
             "writing fp32 partials that a second kernel merges. Compiled for launches "
             "with moved segments (the re-rotation on); a launch with none (TileTable.moved False) compiles "
             "without it: compile_stats(..., moved=False).",
             "Buffers per tile, from the Triton GPU IR: the ring of shared-memory buffers the software pipeliner "
             "gives each tile the kernel's first loop loads (forward and dq: the segments' K/V tiles; dkdv: the "
             "query blocks); b buffers load tiles b - 1 iterations ahead, 1 means the loop waits for every load. "
             "The flat loops of the forward and dq kernels address K/V through a tile-table load, which takes part "
             "of their stages (LaunchConfig.flat_stages): the forward's gets num_stages, which gives it its "
             "own-token loops' buffers, and dq's stages + 1, the fewest that pipeline it. 'flat-sN': a loop "
             "compiled with N stages.",
             "Instructions per tile, from the SASS (nvdisasm): what one iteration of that first loop issues on its "
             "common path, every forward branch in it taken (a new segment's re-rotation, a partial tile's mask "
             "and a sine's slow argument reduction run only sometimes), per warp. An SM's 4 schedulers issue one "
             "warp instruction a cycle each: with two 4-warp programs per SM a loop needs about as many issue "
             "cycles per tile as it has instructions per tile, while a bf16 D-128 forward tile's dots (2 x 64 x 64 "
             "x 128 multiply-adds) keep the tensor cores busy for about 512 cycles.",
             "Largest skipped block: the instructions the biggest block that loop jumps over issues when it runs, "
             "its own rare branches taken: in the forward, the query's re-rotation where a new segment's delta "
             "begins (loads of the query and its half-swapped copy, their conversion to fp32, the cosines and "
             "sines, the rotation, the store for the score dot), once per segment; in dq, a new delta's cosines "
             "and sines; in dkdv, the causal mask of a program over the call's own keys. Prefill over 128-token "
             "messages pays the first two every two 64-key tiles.",
             "tests/kernels/test_ptxas_report.py fails if a default tile spills more than 64 bytes, or if the "
             "forward's flat loop issues more per tile than its budget."]
    title = "Segment-attention kernels: registers, spills, shared memory and pipelining"
    return write_table(out, "registers", title=title,
                       columns=COLUMNS, rows=table, data={"kernels": [dict(label=label, **dataclasses.asdict(st))
                                                                      for label, st in rows]},
                       provenance=prov, notes=notes)


def top_opcodes(counts: dict[str, int], n: int) -> str:
    """'66 FMUL, 36 FADD, ..., 40 other': the ``n`` most issued opcodes of ``counts`` (``opcodes``), the rest summed."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{c} {op}" for op, c in ranked[:n]]
    rest = sum(c for _, c in ranked[n:])
    return ", ".join(parts + ([f"{rest} other"] if rest else [])) or "nothing"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_kernels.ptxas_report", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--arch", type=int, default=90, choices=ARCHES,
                        help="compute capability x10 (80: A100, 90: H100/H200; default %(default)s)")
    parser.add_argument("--sweep", choices=KERNELS, default=None,
                        help="every block_m x block_n x warps x stages of one kernel instead of the defaults")
    parser.add_argument("--seq-len", type=int, default=None, metavar="S",
                        help=f"with --sweep: the new tokens per call to compile for (default {SHAPES['prefill']}; 1: "
                             f"decode); the defaults are compiled at each shape's own")
    parser.add_argument("--flat-stages", nargs="+", type=int, default=None,
                        help="compile the forward and dq kernels with each of these LaunchConfig.flat_stages "
                             "(default: their own)")
    parser.add_argument("--opcodes", type=int, default=0, metavar="N",
                        help="also print the N most issued opcodes of each kernel's main loop and of the largest "
                             "block it skips (with --json: every opcode's count)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write <out>/registers.{md,json} (the table, with provenance)")
    args = parser.parse_args(argv)
    from triton import knobs

    if knobs.runtime.interpret:  # Triton's own reading of TRITON_INTERPRET ("0" is off)
        parser.error(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} turns the interpreter on: interpreted "
                     f"kernels cannot be compiled for a GPU")
    bad = [d for d in args.head_dim if d < 16 or d > 256 or d & (d - 1)]
    if bad:
        parser.error(f"--head-dim must be powers of two in 16..256 (the kernels' domain), got {bad}")
    flat_stages = args.flat_stages or [None]
    if args.flat_stages and min(args.flat_stages) < 1:
        parser.error(f"--flat-stages must be >= 1, got {args.flat_stages}")
    if args.opcodes < 0:
        parser.error(f"--opcodes must be >= 0, got {args.opcodes}")
    if args.seq_len is not None and not args.sweep:
        parser.error(f"--seq-len applies to --sweep only: the default tiles are compiled at their shapes' own S "
                     f"({', '.join(f'{k} {v}' for k, v in SHAPES.items())})")
    seq_len = SHAPES["prefill"] if args.seq_len is None else args.seq_len
    if seq_len < 1:
        parser.error(f"--seq-len must be >= 1, got {seq_len}")
    if args.out is not None:  # before compiling: a file named as the folder fails at once, not after every kernel
        from choreo.cli import output_dir

        try:
            output_dir(args.out, option="--out")
        except ValueError as error:
            parser.error(str(error))
    counted = args.opcodes > 0
    if args.sweep:
        from .segment_attention_backward import dq_flat_stages

        def own(s, h, d):  # the stages the defaults would give this loop (None: LaunchConfig's)
            return dq_flat_stages(s, h, DTYPES[d]) if args.sweep == "dq" else None

        rows = [(args.sweep, compile_stats(args.sweep, d, h, block_m=m, block_n=n, num_warps=w, num_stages=s,
                                           flat_stages=f or own(s, h, d), arch=args.arch,
                                           seq_len=seq_len, with_opcodes=counted))
                for d, h in itertools.product(args.dtype, args.head_dim)
                for m, n, w, s in itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
                for f in (flat_stages if args.sweep in FLAT_KERNELS else [None])]
    else:
        rows = default_stats(args.dtype, args.head_dim, args.arch, flat_stages, with_opcodes=counted)
    if args.out is not None:
        print(write_report(rows, args.out, command=" ".join(["python -m triton_kernels.ptxas_report",
                                                             *(argv if argv is not None else sys.argv[1:])])))
    for label, st in rows:
        if args.json:
            print(json.dumps({"label": label} | dataclasses.asdict(st)), flush=True)
        else:
            print(f"{label:<18} {st.dtype} D={st.head_dim:<4} {tiles_label(st)}: {st.registers} registers, "
                  f"{st.spill_bytes} B spilled, {st.shared_bytes / 1024:.0f} KiB shared, {st.loop_buffers} "
                  f"buffer(s) and {st.loop_instructions} instructions per tile in the first loop, "
                  f"{st.switch_instructions} in its largest skipped block (sm_{st.arch})",
                  flush=True)
            for name, counts in (("loop", st.loop_opcodes), ("largest skipped block", st.switch_opcodes)):
                if counted and counts is not None:
                    print(f"    {name}: {top_opcodes(counts, args.opcodes)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
