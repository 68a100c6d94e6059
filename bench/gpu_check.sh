#!/usr/bin/env bash
# One call on a GPU machine (H100/H200, python 3.12, torch 2.11, triton 3.6, nvcc 13.0, no network): builds the
# CUDA extension in place, records the card and versions, runs the GPU tests and the benchmark suites, and writes
# every row, log and a table/plot under $OUT. Each section has a time cap and the whole run a budget (default
# 480 s); a failing or timed-out section is reported and the next one runs. Rows are written as they are
# measured, so a section cut short keeps what it measured.
#
#   OUT=/some/dir ADN_GIT_SHA=$(git rev-parse HEAD) bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --smoke        # CPU dry run (also ADN_GPU_CHECK_DRY_RUN=1): no build, no GPU tests,
#                                          # suites in smoke mode; checks this script itself (bench/test_gpu_check.py)
# Knobs: PYTHON (default .venv/bin/python if present, else python3); ADN_GPU_CHECK_BUDGET_S (total seconds);
#   ADN_GPU_CHECK_SECTIONS=build,env,... (run only these; in order: build env gpu_tests latency_resnet switching
#   latency_vit train kernels_layers plot); ADN_GPU_CHECK_CAP_<section>=seconds (one section's cap);
#   the suites' own knobs (bench/_harness.py), e.g. ADN_BENCH_COMPILE_ALL=1.
# Output: $OUT/summary.txt (one line per section: status, seconds), $OUT/environment.json, $OUT/*.json (rows,
#   one file per suite), $OUT/results.md + latency_vs_macs.png, $OUT/logs/*.log. Exit status 1 if a section
#   failed or timed out (after running all of them).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${ADN_GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --smoke|--dry-run) DRY_RUN=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --smoke for a CPU dry run)" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-bench/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS="$OUT/logs"
SUMMARY="$OUT/summary.txt"
BUDGET=${ADN_GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
FAILED=0
: >"$SUMMARY"
export ADN_BENCH_OUT="$OUT"
[ "$DRY_RUN" = 1 ] && export ADN_BENCH_SMOKE=1

# Caps (s) are generous; the budget cuts whatever comes late, except plot (last, small), which has a reserve.
# A section cut short can be run alone by a second call with ADN_GPU_CHECK_SECTIONS=env,build,<section> and a
# NEW OUT (a suite rewrites its rows file from scratch).
declare -A CAP=([env]=30 [build]=180 [gpu_tests]=90 [latency_resnet]=150 [switching]=100 [latency_vit]=120
                [train]=45 [kernels_layers]=90 [plot]=20)
PLOT_RESERVE=20

wanted() {
  [ -z "${ADN_GPU_CHECK_SECTIONS:-}" ] && return 0
  [[ ",${ADN_GPU_CHECK_SECTIONS}," == *",$1,"* ]]
}

record() {  # record NAME STATUS SECONDS [NOTE]
  printf '%-15s %-9s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"
}

# section NAME CMD...: runs CMD under its cap (and the budget), output to $LOGS/NAME.log.
section() {
  local name=$1; shift
  wanted "$name" || return 0
  local cap_var="ADN_GPU_CHECK_CAP_$name"
  local cap=${!cap_var:-${CAP[$name]}}
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$name" != plot ] && left=$(( left - PLOT_RESERVE ))
  if [ "$left" -lt 5 ]; then record "$name" SKIPPED 0 "budget of ${BUDGET}s spent"; return 0; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap ${cap}s): $*" | tee "$LOGS/$name.log"
  local t0; t0=$(date +%s)
  # bash -c: the command may be one of the functions below (exported); timeout signals the whole process group.
  timeout --signal=TERM --kill-after=10 "$cap" bash -c '"$@"' "$name" "$@" >>"$LOGS/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  tail -n 4 "$LOGS/$name.log" | sed "s/^/   [$name] /"
  if [ "$rc" = 0 ]; then record "$name" OK "$dt"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" TIMEOUT "$dt" "cap ${cap}s; rows measured so far are kept"; FAILED=1
  else
    record "$name" FAILED "$dt" "exit $rc, see logs/$name.log"; FAILED=1
  fi
}

dry_skip() {  # dry_skip NAME WHAT
  wanted "$1" && record "$1" SKIPPED 0 "dry run: would $2"
  return 0
}

env_record() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pstate \
      --format=csv >"$LOGS/nvidia-smi.csv"
  else
    echo "nvidia-smi: not found (no GPU driver here)"
  fi
  local nvcc
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$nvcc" ] && "$nvcc" --version
  "$PYTHON" -m bench._harness env >"$OUT/environment.json" && cat "$OUT/environment.json"
}

build_ext() {
  # In place (no pip, no network): the tests and suites import the package from this folder.
  [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
  local nv_inc
  nv_inc=$("$PYTHON" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" \
    2>/dev/null)
  [ -n "$nv_inc" ] && [ -d "$nv_inc" ] && export CPATH="$nv_inc${CPATH:+:$CPATH}"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} ADN_FORCE_EXT=1 "$PYTHON" setup.py build_ext --inplace || return 1
  "$PYTHON" -c "import adaptive_kernels as ak, sys
print('HAS_EXT', ak.HAS_EXT, ak.EXT_ERROR or '')
sys.exit(0 if ak.HAS_EXT else 1)"
}

suite() {  # suite FILE: one benchmark suite, pytest-benchmark's own JSON beside our rows when the plugin exists
  local name; name=$(basename "$1" .py)
  local extra=()
  if "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
    extra=(--benchmark-json="$OUT/logs/pytest_benchmark_${name#test_}.json" --benchmark-columns=min,median,max,rounds)
  fi
  "$PYTHON" -m pytest -q -p no:cacheprovider "$1" "${extra[@]}"
}

plot_rows() {
  local extra=()
  [ "$DRY_RUN" = 1 ] && extra=(--include-smoke)
  "$PYTHON" bench/plot.py --results "$OUT" --out "$OUT" "${extra[@]}"
}

export PYTHON OUT LOGS DRY_RUN
export -f env_record build_ext suite plot_rows
echo "gpu_check: OUT=$OUT PYTHON=$PYTHON budget=${BUDGET}s dry_run=$DRY_RUN"
# build before env: environment.json then says whether the extension loads
if [ "$DRY_RUN" = 1 ]; then
  dry_skip build "run: TORCH_CUDA_ARCH_LIST=9.0 $PYTHON setup.py build_ext --inplace"
else
  section build build_ext
fi
section env env_record
if [ "$DRY_RUN" = 1 ]; then
  dry_skip gpu_tests "run: $PYTHON -m pytest -q -m gpu tests"
else
  # one default config per kernel: autotuning every realistic test shape would not fit the section's cap
  section gpu_tests env ADN_KERNEL_AUTOTUNE=0 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
fi
section latency_resnet suite bench/test_latency_resnet.py
section switching suite bench/test_switching_cost.py
section latency_vit suite bench/test_latency_vit.py
section train suite bench/test_train_step.py
section kernels_layers suite bench/test_kernels_layers.py
section plot plot_rows
echo "gpu_check: done in $(( $(date +%s) - START ))s; summary in $SUMMARY"
exit $FAILED
