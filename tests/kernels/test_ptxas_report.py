"""The default tiles compile for sm_90 without spilling registers (Triton's ahead-of-time compiler and the ptxas
in its wheel; no GPU needed). A kernel that spills pays local-memory traffic in its inner loop whatever its tiles,
so a change that makes the defaults spill is a performance regression this machine can see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# Register allocation, and the compiler's Python API, change between Triton releases: the budgets below are
# those of the pinned 3.7 line.
pytestmark = pytest.mark.skipif(not triton.__version__.startswith("3.7."),
                                reason=f"spill budgets recorded for Triton 3.7, this is {triton.__version__}")
ROOT = Path(__file__).resolve().parents[2]

# Bytes of spill stores tolerated per kernel: with Triton 3.7 the defaults spill 0-8 bytes at bf16 and up to 56 at
# fp32 (a few registers kept across a loop); anything beyond a handful of registers is a regression.
MAX_SPILL = 64


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("registers")


@pytest.fixture(scope="module")
def default_stats(report_dir):
    if not PTXAS.is_file():
        pytest.skip(f"no ptxas in the Triton wheel ({PTXAS})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for a GPU, not interpret
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", "--json", "--opcodes", "8", "--dtype",
                          "bf16", "fp32", "--head-dim", "64", "128", "--out", str(report_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_report_table_carries_provenance(default_stats, report_dir):
    data = json.loads((report_dir / "registers.json").read_text())
    assert len(data["rows"]) == len(default_stats)
    assert "sm_90" in data["provenance"]["device"] and data["provenance"]["versions"]["triton"] == triton.__version__
    assert "ptxas_report" in data["provenance"]["command"]
    assert "spilled bytes" in (report_dir / "registers.md").read_text()


def test_default_tiles_do_not_spill(default_stats):
    labels = {(s["label"], s["dtype"], s["head_dim"]) for s in default_stats}
    # dtypes x head dims x ((forward, dq, dkdv) x (prefill, decode) + the decode forward's split-K variant), and the
    # bf16 prefill forward's loop over keys copied first (its default at 1024 rows) at both head dims
    assert len(labels) == 2 * 2 * 7 + 2
    assert {(dtype, d) for label, dtype, d in labels if label == "fwd prefill, keys copied first"} == {
        ("bf16", 64), ("bf16", 128)}
    spilling = [s for s in default_stats if s["spill_bytes"] > MAX_SPILL]
    assert not spilling, "\n".join(f"{s['label']} {s['dtype']} D={s['head_dim']} m{s['block_m']} n{s['block_n']} "
                                   f"w{s['num_warps']}: {s['spill_bytes']} B spilled" for s in spilling)
    assert all(s["shared_bytes"] <= 227 * 1024 for s in default_stats)  # an H100's shared memory per block


def test_each_shape_is_compiled_as_it_launches(default_stats):
    """Prefill rows are compiled for 256 new tokens per call, decode rows for one (S = 1, a constant to the JIT as
    in a real decode launch), and the split-K row is the decode forward with partials instead of the output."""
    for s in default_stats:
        shape = s["label"].split()[1].rstrip(",")  # "fwd prefill, keys copied first": a prefill row
        assert s["seq_len"] == {"prefill": 256, "decode": 1}[shape], s["label"]
        assert s["split"] == (s["label"] == "fwd decode split-K"), s["label"]
    split = [s for s in default_stats if s["split"]]
    assert len(split) == 4 and all(s["loop_buffers"] >= 2 for s in split if s["dtype"] == "bf16"), split


@pytest.mark.parametrize("arguments, message", [
    (dict(kernel="dq", split=True), "split=True is the forward's split-K variant; kernel 'dq' has none"),
    (dict(kernel="fwd", seq_len=0), "seq_len must be an integer >= 1, got 0"),
    (dict(kernel="fwd", seq_len=True), "seq_len must be an integer >= 1, got True"),
    (dict(kernel="attn"), "kernel must be one of ('fwd', 'dq', 'dkdv', 'prerotate'), got 'attn'"),
    (dict(kernel="fwd", dtype="fp8"), "dtype must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'"),
])
def test_compile_stats_refuses_bad_arguments(arguments, message):
    from triton_kernels.ptxas_report import compile_stats

    arguments = dict(dtype="bf16") | arguments
    with pytest.raises(ValueError) as err:
        compile_stats(arguments.pop("kernel"), arguments.pop("dtype"), 128, block_m=64, block_n=64, num_warps=4,
                      num_stages=3, **arguments)
    assert str(err.value) == message


def test_refuses_to_compile_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "TRITON_INTERPRET" in run.stderr


def _compiled_stats(kernel: str, **arguments) -> dict:
    """``compile_stats(kernel, 'bf16', 128, **arguments)``, compiled in a fresh process (this one may have imported
    the kernels for the interpreter)."""
    return _compiled_stats_at(kernel, 128, **arguments)


def _compiled_stats_at(kernel: str, head_dim: int, **arguments) -> dict:
    """``compile_stats(kernel, 'bf16', head_dim, **arguments)`` in a fresh process."""
    if not PTXAS.is_file():
        pytest.skip(f"no ptxas in the Triton wheel ({PTXAS})")
    code = ("import dataclasses, json, sys; from triton_kernels.ptxas_report import compile_stats; print(json.dumps("
            "dataclasses.asdict(compile_stats(sys.argv[1], 'bf16', int(sys.argv[3]), **json.loads(sys.argv[2])))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, kernel, json.dumps(arguments), str(head_dim)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def _forward_stats(**options) -> dict:
    """The bf16 D-128 prefill forward tile (m64 n64 w4 s3) compiled with ``options``."""
    return _compiled_stats("fwd", block_m=64, block_n=64, num_warps=4, num_stages=3, **options)


def test_tensor_descriptor_loads_compile_for_hopper(default_stats):
    """The forward's opt-in TMA loads (``LaunchConfig.tma``) compile for sm_90 to bulk tensor copies, spill-free,
    with the default loads' buffers and fewer instructions per tile (no per-lane addresses: 423 against 500 with
    Triton 3.7; zeroing a partial tile's extra values in registers took 730 and a buffer)."""
    stats = _forward_stats(tma=True)
    default = next(s for s in default_stats if s["label"] == "fwd prefill" and s["dtype"] == "bf16"
                   and s["head_dim"] == 128)
    assert stats["tma"] and stats["spill_bytes"] <= MAX_SPILL, stats
    assert stats["loop_buffers"] == default["loop_buffers"], (stats, default)
    assert stats["loop_instructions"] < default["loop_instructions"], (stats, default)


def test_prerotated_loop_issues_what_the_unmoved_loop_does(default_stats):
    """``LaunchConfig.prerotate``'s main loop, over keys copied moved, issues per tile about what a launch with no
    moved segment issues (bf16 D 128 prefill, Triton 3.7: 405 against 400; the moved loop 449, and 164 more for
    the query's re-rotation at each new delta), with the default loop's buffers, no spill and no re-rotation."""
    pre, unmoved = _forward_stats(prerotate=True), _forward_stats(moved=False)
    moved = next(s for s in default_stats if s["label"] == "fwd prefill" and s["dtype"] == "bf16"
                 and s["head_dim"] == 128)
    assert pre["spill_bytes"] <= MAX_SPILL and pre["loop_buffers"] == moved["loop_buffers"], pre
    assert pre["loop_instructions"] <= unmoved["loop_instructions"] + 16 < moved["loop_instructions"], (pre, unmoved)
    assert pre["switch_instructions"] <= unmoved["switch_instructions"] + 16, (pre, unmoved)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prerotate_pass_compiles_without_spills(head_dim):
    """The pass that copies the moved keys (``_prerotate_keys``, launched with 4 warps over 64-key tiles) compiles
    for sm_90 without spilling (Triton 3.7, bf16: 88 registers at D 64, 94 at D 128)."""
    stats = _compiled_stats_at("prerotate", head_dim, block_m=64, block_n=64, num_warps=4, num_stages=1)
    assert stats["spill_bytes"] == 0 and stats["registers"] <= 255, stats


def test_flat_loop_keeps_the_own_loops_buffers(default_stats):
    """The flat loop's K/V loads are addressed by a tile-table load, and the pipeliner shares the stages between the
    two: with one int64 entry per tile, the default flat_stages = num_stages gives its K/V tiles the own-token
    loops' buffers (num_stages at prefill: num_stages - 1 tiles in flight; two at decode). A deeper ring costs
    shared memory: at bf16 D 128, one more stage takes 144 KiB, and two programs no longer fit an SM."""
    fwd = {(s["label"], s["head_dim"]): s for s in default_stats if s["kernel"] == "fwd" and s["dtype"] == "bf16"}
    for (label, head_dim), s in fwd.items():
        assert s["loop_buffers"] >= 2, (label, head_dim, s)
        if label == "fwd prefill":
            assert s["loop_buffers"] == s["num_stages"], s
    default = fwd[("fwd prefill", 128)]
    assert default["shared_bytes"] <= 114 * 1024, default  # two programs per SM (228 KiB)
    deeper = _forward_stats(flat_stages=default["num_stages"] + 1)
    assert deeper["loop_buffers"] == default["loop_buffers"] + 1 and deeper["shared_bytes"] > 114 * 1024, deeper


def test_loop_buffers_reads_the_first_loops_rings():
    from triton_kernels.ptxas_report import loop_buffers

    ir = ("%a = ttg.local_alloc : () -> !ttg.memdesc<1x1xi32, #s, #smem, mutable>\n"
          "%k = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #s, #smem, mutable>\n"
          "%v = ttg.local_alloc : () -> !ttg.memdesc<2x64x128xbf16, #s, #smem, mutable>\n"
          "%q = ttg.local_alloc %x : (tensor<64x128xbf16>) -> !ttg.memdesc<64x128xbf16, #s, #smem>\n"
          "scf.for ...\n"
          "%w = ttg.local_alloc : () -> !ttg.memdesc<4x64x128xbf16, #s, #smem, mutable>\nscf.for ...\n")
    assert loop_buffers(ir, 64, 128) == 2  # the least of the first loop's K (3) and V (2) rings
    assert loop_buffers(ir, 32, 128) == 1  # no ring of that tile: loads wait where they are used
    with pytest.raises(ValueError, match="no loop"):
        loop_buffers("tt.return", 64, 128)


def test_backward_loops_are_pipelined(default_stats):
    """At half precision the backward kernels load their next tile while computing on this one: dq's loop over
    the tile table (``backward_configs`` gives it stages + 1 stages) and dkdv's loop over query blocks. fp32
    keeps one stage (its dots hold twice the registers)."""
    bwd = [s for s in default_stats if s["kernel"] in ("dq", "dkdv") and s["dtype"] == "bf16"]
    assert len(bwd) == 8 and all(s["loop_buffers"] >= 2 for s in bwd), bwd


def test_deterministic_dkdv_compiles_like_the_atomic_one(default_stats):
    """dkdv's deterministic variant (partials written with plain stores instead of atomics) compiles for sm_90 at
    the default bf16 D-128 prefill tile with no more spill than the budget and the same pipelined loop."""
    atomic = next(s for s in default_stats if s["label"] == "dkdv prefill" and s["dtype"] == "bf16"
                  and s["head_dim"] == 128)
    tiles = {k: atomic[k] for k in ("block_m", "block_n", "num_warps", "num_stages")}
    det = _compiled_stats("dkdv", deterministic=True, **tiles)
    assert det["deterministic"] and not atomic["deterministic"]
    assert det["spill_bytes"] <= MAX_SPILL and det["loop_buffers"] == atomic["loop_buffers"], (det, atomic)


# Instructions per whole key tile the forward's flat loop may issue (Triton 3.7, sm_90, bf16 D 128): with masked
# loads and scores it issued 674 at prefill and 481 at decode; unmasked loads brought that to 534 and 372, one
# table entry per tile (one load instead of three) to 500 and 344, and the softmax scale in the exponent's fused
# multiply-add with unmasked query loads at the re-rotation to 453 and 336 (449 since the re-rotation returns a bf16
# query computed in bf16).
FLAT_LOOP_BUDGET = {"fwd prefill": 460, "fwd decode": 350}


def test_flat_loop_instruction_budget(default_stats):
    """The forward's flat loop issues few enough instructions per whole tile that the tensor cores, not the
    schedulers, bound it at prefill (about 512 cycles of dots per tile: see ``ptxas_report``)."""
    for label, budget in FLAT_LOOP_BUDGET.items():
        s = next(s for s in default_stats if s["label"] == label and s["dtype"] == "bf16" and s["head_dim"] == 128)
        assert s["loop_instructions"] is not None and s["loop_instructions"] <= budget, s


# Instructions per iteration of the backward kernels' main loops (bf16 D 128, sm_90): dq's segment loop per 64-key
# tile and dkdv's per 128-row query block took 615 and 828 with a mask on every score, 537 and 586 with masks only
# where a valid row does not attend a key (padding rows get P = 0 from their log-sum-exp of +inf); dkdv 473 with
# its rows' heads computed once and its query and dO loads unmasked; dq 401 with its key tile rotated in bf16
# arithmetic (``_rotate_bf16``: no widening to fp32 and packing back).
BACKWARD_LOOP_BUDGET = {"dq prefill": 420, "dkdv prefill": 500}


def test_backward_loop_instruction_budget(default_stats):
    """The backward loops keep their masks off the common path."""
    for label, budget in BACKWARD_LOOP_BUDGET.items():
        s = next(s for s in default_stats if s["label"] == label and s["dtype"] == "bf16" and s["head_dim"] == 128)
        assert s["loop_instructions"] is not None and s["loop_instructions"] <= budget, s


# Instructions of the largest block the main loop skips (bf16 D 128, sm_90): dq's new-delta cosines and sines took
# 431 evaluated once per column and take 64 on the D / 2 frequencies (``half_angles``); the forward's re-rotation
# took 542 before the rotation's sign moved into its sine table, 482 after, 368 with unmasked loads and one
# instruction per bf16 -> fp32 conversion, and 164 rotating in bf16 arithmetic (``_rotate_bf16``).
SWITCH_BUDGET = {"dq prefill": 100, "dq decode": 100, "fwd prefill": 200}


def test_switch_instruction_budget(default_stats):
    """What a new segment's delta costs the flat loops, per thread, stays near what the compiled code gave."""
    for label, budget in SWITCH_BUDGET.items():
        s = next(s for s in default_stats if s["label"] == label and s["dtype"] == "bf16" and s["head_dim"] == 128)
        assert s["switch_instructions"] is not None and s["switch_instructions"] <= budget, s


def test_loop_instructions_counts_the_main_loops_common_path():
    from triton_kernels.ptxas_report import loop_instructions, switch_instructions

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
        /*0020*/                   FFMA R2, R2, R3, R4 ;
        /*0030*/                   FFMA R2, R2, R3, R4 ;
        /*0040*/                   FFMA R2, R2, R3, R4 ;
        /*0050*/                   FFMA R2, R2, R3, R4 ;
        /*0060*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0070*/                   LDS R5, [R6] ;
        /*0080*/              @!P1 BRA `(.L_x_2) ;
        /*0090*/                   MUFU.COS R7, R8 ;
        /*00a0*/                   MUFU.SIN R9, R8 ;
.L_x_2:
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, R120, gdesc[UR8], R24 ;
        /*00c0*/               @P2 BRA `(.L_x_1) ;
        /*00d0*/                   EXIT ;
"""
    # the loop with the HGMMA, not the longer FFMA loop; the re-rotation block jumped over is not counted
    assert loop_instructions(sass) == 4
    assert switch_instructions(sass) == 2  # ... but is the loop's largest skipped block
    nested = sass.replace("        /*00a0*/                   MUFU.SIN R9, R8 ;\n",
                          "        /*00a0*/              @!P3 BRA `(.L_x_2) ;\n"
                          "        /*00a8*/                   FFMA R9, R8, R8, R8 ;\n")
    assert switch_instructions(nested) == 2  # its own branch to the landing label is taken: FFMA skipped
    assert switch_instructions(sass.replace("@!P1 BRA `(.L_x_2)", "IADD3 R1, R1, 1")) == 0
    assert loop_instructions(sass.replace("HGMMA.64x64x16.F32.BF16 R24, R120, gdesc[UR8], R24", "IADD3 R1, R1, 1")) == 6
    with pytest.raises(ValueError, match="no loop"):
        loop_instructions("        /*0000*/                   EXIT ;")
    from triton_kernels.ptxas_report import opcodes, top_opcodes

    assert opcodes(sass) == {"LDS": 1, "BRA": 2, "HGMMA.64x64x16.F32.BF16": 1}  # predicates dropped
    assert opcodes(sass, "skipped") == {"MUFU.COS": 1, "MUFU.SIN": 1}
    assert top_opcodes(opcodes(sass), 1) == "2 BRA, 2 other"
    assert top_opcodes({}, 3) == "nothing"
    with pytest.raises(ValueError, match="part must be"):
        opcodes(sass, "switch")


def test_opcode_counts_add_up_to_the_instruction_counts(default_stats):
    for s in default_stats:
        assert sum(s["loop_opcodes"].values()) == s["loop_instructions"], s["label"]
        assert sum(s["switch_opcodes"].values()) == s["switch_instructions"], s["label"]
    fwd = next(s for s in default_stats
               if s["label"] == "fwd prefill" and s["dtype"] == "bf16" and s["head_dim"] == 128)
    assert sum(n for op, n in fwd["loop_opcodes"].items() if op.startswith("HGMMA")) > 0  # the dots are in the loop
    assert fwd["switch_opcodes"].get("LDG.E.128", 0) > 0  # the re-rotation's query loads are in its skipped block


def test_bf16_rotations_run_on_packed_bf16_instructions(default_stats):
    """At bf16 the forward's query re-rotation and dq's key rotation are bf16x2 multiplies and fused multiply-adds
    (``_rotate_bf16``), with no fp32 multiply-add per element left in the re-rotation."""
    stats = {s["label"]: s for s in default_stats if s["dtype"] == "bf16" and s["head_dim"] == 128}
    fwd, dq = stats["fwd prefill"], stats["dq prefill"]
    assert fwd["switch_opcodes"].get("HFMA2.BF16_V2", 0) > 0 and fwd["switch_opcodes"].get("FFMA", 0) == 0, fwd
    assert dq["loop_opcodes"].get("HFMA2.BF16_V2", 0) > 0, dq


def test_opcodes_option_is_checked():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", "--opcodes", "-1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--opcodes must be >= 0, got -1" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--head-dim", "48"], "--head-dim must be powers of two in 16..256"),
    (["--head-dim", "0", "64"], "got [0]"),
    (["--sweep", "fwd", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--seq-len", "1"], "--seq-len applies to --sweep only"),
])
def test_head_dim_option_is_checked(args, message):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]


def test_triton_interpret_0_is_off():
    """TRITON_INTERPRET=0 does not turn Triton's interpreter on, so the compiler runs (checked here on an option
    error that comes after that check)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", "--opcodes", "-1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--opcodes must be >= 0" in run.stderr and "TRITON_INTERPRET" not in run.stderr


@pytest.mark.parametrize("arch", ["0", "70", "100"])
def test_arch_option_is_checked(arch):
    """--arch 0 aborted in LLVM (exit 134), --arch 70 failed in nvdisasm with a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", "--arch", arch], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--arch: invalid choice: {arch} (choose from 75, 80, 86, 89, 90)" in run.stderr


def test_out_option_is_checked_before_compiling(tmp_path):
    """A file as --out failed with FileExistsError only after every kernel was compiled."""
    taken = tmp_path / "registers"
    taken.write_text("a file")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "triton_kernels.ptxas_report", "--out", str(taken)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--out {str(taken)!r} is a file, not a folder" in run.stderr, run.stderr[-2000:]
    assert taken.read_text() == "a file"
