#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md §8). On a fresh GPU machine, from any directory:
#   bash bench/gpu_check.sh
# builds the package with the CUDA extension (sm_90 only, to save time), runs the tests that use
# the GPU, runs the GPU benchmarks and a hardware-counter profile of the CUDA embedding_bag forward
# (with GPU_CHECK_CPU_STEPS=1 then the tests of the CPU's AVX-512 / AVX512-VNNI / AMX kernels and a
# path comparison of Int8Linear: that machine's Xeon has them), and writes everything under $OUT (default
# /tmp/recsys_kernels_gpu_check): summary.txt (read this first), nvidia-smi.txt, build.log,
# tests.log, junit.xml, bench.log, bench.json, ncu_embedding_bag.txt (cpu_wide_tests.log and
# cpu_paths.log with GPU_CHECK_CPU_STEPS=1, build_pip_failed.log if pip could not install).
# Everything fits in 8 minutes (DESIGN.md; call it with timeout_s 530): each step runs under `timeout`.
#
# The machine has no network: it uses the python3 that holds PyTorch there (override with
# PYTHON=...), and that torch, whatever its version; nothing is downloaded. Exit status: 0 when
# every step passed, 1 when a step failed, 2 when the machine cannot run the check at all.
# GPU_CHECK_NO_GPU_OK=1 runs it without a GPU (to test the script itself; CUDA tests then skip);
# GPU_CHECK_TESTS narrows the test selection (default: tests, -k "cuda or triton"; GPU_CHECK_CPU_TOO=1
# drops the -k), GPU_CHECK_BENCH the benchmark files, GPU_CHECK_AFTER_BUILD runs a command once the
# build is in place (output in after_build.log); GPU_CHECK_CPU_STEPS=1 adds the two CPU steps (off
# by default: the development machines have had AVX-512 and AMX since 2026-11-30, and the device
# tool brings back 8 files at most); GPU_CHECK_PROFILE=0 skips the Nsight Compute profile of the
# CUDA embedding_bag forward (ncu_embedding_bag.txt); GPU_CHECK_BUDGET_S (470),
# GPU_CHECK_BUILD_S (270) and GPU_CHECK_TESTS_S (250) change the time limits, for slow machines.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/recsys_kernels_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"   # 8 minutes minus a margin for the caller
STATUS=0

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
# Seconds a step may take: its own cap, never past the overall budget.
cap() { local left=$(( BUDGET_S - ($(date +%s) - START) )); (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"; }
step() {  # step NAME CAP_S LOG CMD...: run CMD under timeout, log its outcome
  local name=$1 limit; limit=$(cap "$2"); local logf=$3; shift 3
  log "$name: start (timeout ${limit}s, log $(basename "$logf"))"
  timeout --kill-after=10 "$limit" "$@" > "$logf" 2>&1
  local rc=$?
  if (( rc == 0 )); then log "$name: ok"; else
    (( rc == 124 || rc == 137 )) && log "$name: TIMED OUT after ${limit}s" || log "$name: FAILED (exit $rc)"
    STATUS=1
  fi
  return $rc
}

: > "$OUT/summary.txt"
log "repo $(pwd) at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), output in $OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "WARNING: nvidia-smi failed (see nvidia-smi.txt)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null \
  | sed 's/^/GPU: /' | tee -a "$OUT/summary.txt"

# --- what this machine has: torch with CUDA, a GPU, nvcc
if ! "$PY" -c "import torch" > /dev/null 2>&1; then
  log "FATAL: '$PY' cannot import torch, and this machine has no network to install it."
  log "       Run with PYTHON=/path/to/a/python-with-torch, or carry torch wheels (device README)."
  exit 2
fi
"$PY" -c "
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| torch CUDA', torch.version.cuda,
      '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NOT VISIBLE')
" 2>&1 | tee -a "$OUT/summary.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ "${GPU_CHECK_NO_GPU_OK:-0}" != 1 ]]; then
    log "FATAL: torch sees no CUDA GPU here; nothing to check."
    exit 2
  fi
  log "WARNING: no GPU; going on because GPU_CHECK_NO_GPU_OK=1 (a dry run of this script)"
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc > /dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  log "FATAL: no nvcc found (set CUDA_HOME); the CUDA extension cannot be built."
  exit 2
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"

# --- build: editable install into that python, no index, no build isolation (use its torch)
export RECSYS_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
if ! step build "${GPU_CHECK_BUILD_S:-270}" "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
  tail -30 "$OUT/build.log" | tee -a "$OUT/summary.txt"
  # pip itself may be what failed (old setuptools, no wheel support): build in place instead and
  # import from the checkout; kernels/ is then reached through a link, as setup.py's package_dir would.
  log "build: retrying without pip (setup.py build_ext --inplace)"
  cp "$OUT/build.log" "$OUT/build_pip_failed.log" 2>/dev/null
  step build-inplace 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace || { tail -30 "$OUT/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  [[ -d kernels && ! -e recsys_kernels/_triton ]] && ln -s ../kernels recsys_kernels/_triton
  STATUS=0  # the fallback worked; the pip failure stays in build_pip_failed.log
fi
grep -E -- "-o [^ ]*_C_cuda[^ ]*\.so" "$OUT/build.log" | tail -1 | cut -c1-300 | sed 's/^/linked: /' | tee -a "$OUT/summary.txt"
"$PY" -c "
import recsys_kernels as rk
from recsys_kernels import _loader
print(rk.format_info())
missing = [n for n in ('_C', '_C_cuda') if n not in _loader.EXTENSIONS]
raise SystemExit('extensions not loaded: ' + str({n: _loader.LOAD_ERRORS.get(n) for n in missing}) if missing else 0)
" 2>&1 | tee -a "$OUT/summary.txt"
(( ${PIPESTATUS[0]} == 0 )) || { log "FATAL: the built extensions do not load"; exit 1; }

# --- an optional diagnostic with the build in place (GPU_CHECK_AFTER_BUILD: a shell command)
if [[ -n "${GPU_CHECK_AFTER_BUILD:-}" ]]; then
  step after-build 150 "$OUT/after_build.log" bash -c "$GPU_CHECK_AFTER_BUILD"
  tail -60 "$OUT/after_build.log"
fi

# --- the tests that run on the GPU (CUDA parametrizations, CUDA-only files, Triton on CUDA
# tensors), spread over processes when pytest-xdist is there; -v prints each outcome as it comes,
# so a step cut short still says what passed. The CPU-only tests are CI's (CPU_TOO=1 adds them).
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_WORKERS:-12}")
SELECT=(-k "cuda or triton"); [[ "${GPU_CHECK_CPU_TOO:-0}" == 1 ]] && SELECT=()
OMP_NUM_THREADS=1 step tests "${GPU_CHECK_TESTS_S:-250}" "$OUT/tests.log" "$PY" -m pytest ${GPU_CHECK_TESTS:-tests} "${SELECT[@]}" \
  "${XDIST[@]}" -v -rfE --tb=short -p no:cacheprovider --junitxml="$OUT/junit.xml"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 | tee -a "$OUT/summary.txt"
tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

# --- the GPU benchmarks (the CPU ones are for the 2-core CI machine), numbers in bench.json
step bench 130 "$OUT/bench.log" "$PY" -m pytest ${GPU_CHECK_BENCH:-bench/bench_embedding_bag_cuda.py \
  bench/bench_int8_linear_cuda.py bench/bench_scoring_cuda.py} -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,ops
sed -n '/throughput (median/,$p' "$OUT/bench.log" | tee -a "$OUT/summary.txt"

# --- hardware counters of the CUDA embedding_bag forward, fp32 / int8 / int4 rows (Nsight Compute;
# the clocks left as they are): occupancy, memory throughput, and what the warps wait on
if [[ "${GPU_CHECK_PROFILE:-1}" == 1 ]] && command -v ncu > /dev/null; then
  step profile 60 "$OUT/ncu_embedding_bag.txt" ncu --clock-control none --nvtx --nvtx-include profile_fp32/ \
    --nvtx-include profile_int8/ --nvtx-include profile_int4/ --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
    "$PY" bench/profile_embedding_bag_cuda.py
  grep -E "embedding_bag|Duration|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Theoretical Occupancy" \
    "$OUT/ncu_embedding_bag.txt" | head -40 | tee -a "$OUT/summary.txt"
fi

# --- the CPU's AVX-512 kernels (some development machines have AVX2 only): embedding_bag's pooling
# and topk_scores' tile and int8 prefilter (the tests there compare them with AVX2), the int8
# GEMM's AVX512-VNNI / AMX kernels, on the real instructions; then each CPU path against the peers
if [[ "${GPU_CHECK_CPU_STEPS:-0}" == 1 ]]; then
OMP_NUM_THREADS=4 step cpu-wide-tests 100 "$OUT/cpu_wide_tests.log" "$PY" -m pytest tests/test_embedding_bag_cpu.py \
  tests/test_int8_matmul_cpu.py tests/test_scoring_cpu.py -q -rfE --tb=short -p no:cacheprovider
grep -E "^(FAILED|ERROR)" "$OUT/cpu_wide_tests.log" | head -20 | tee -a "$OUT/summary.txt"
tail -1 "$OUT/cpu_wide_tests.log" | tee -a "$OUT/summary.txt"
step cpu-paths 150 "$OUT/cpu_paths.log" "$PY" bench/cpu_paths.py --threads 2 --rounds 7
grep -E "^(threads|Int8Linear|embedding_bag|  )" "$OUT/cpu_paths.log" | tee -a "$OUT/summary.txt"
fi

log "done, status $STATUS"
exit $STATUS
