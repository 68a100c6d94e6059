#!/usr/bin/env bash
# One call on a GPU machine (H100/H200, python 3.12, torch 2.11, triton 3.6, nvcc 13.0, no network): builds the
# CUDA extension in place, records the card and versions, runs the GPU tests and the benchmark suites, and writes
# every row, log and a table/plot under $OUT. Each section has a time cap and the whole run a budget (default
# 540 s); a failing or timed-out section is reported and the next one runs. Rows are written as they are
# measured, so a section cut short keeps what it measured.
#
#   OUT=/some/dir ADN_GIT_SHA=$(git rev-parse HEAD) bash bench/gpu_check.sh
#   # through a tool that brings back only a few files (the device tool: at most 8 from its $OUT):
#   ADN_GPU_CHECK_PACK=$OUT OUT=/tmp/gpu_check ADN_GIT_SHA=<sha> bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --smoke        # CPU dry run (also ADN_GPU_CHECK_DRY_RUN=1): no build, no GPU tests,
#                                          # suites in smoke mode; checks this script itself (bench/test_gpu_check.py)
# Knobs: PYTHON (default .venv/bin/python if present, else python3); ADN_GPU_CHECK_BUDGET_S (total seconds);
#   ADN_GPU_CHECK_SECTIONS=build,env,... (run only these; in order: build env gpu_tests latency_resnet latency_vit
#   switching kernels_layers train plot); ADN_GPU_CHECK_CAP_<section>=seconds (one section's cap);
#   ADN_GPU_CHECK_PACK=dir: after every section, refresh dir/gpu_check.tgz (all of $OUT) and copy summary.txt,
#   results.md and latency_vs_macs.png there (4 files at most; a run killed midway still leaves what it did);
#   ADN_KERNEL_AUTOTUNE (default 0 here: one config per kernel, see below; 1 autotunes, far past the budget);
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
BUDGET=${ADN_GPU_CHECK_BUDGET_S:-540}
PACK=${ADN_GPU_CHECK_PACK:-}
[ -n "$PACK" ] && mkdir -p "$PACK" && PACK=$(cd "$PACK" && pwd)
START=$(date +%s)
FAILED=0
: >"$SUMMARY"
export ADN_BENCH_OUT="$OUT"
# Autotuning every shape compiles and times ~10 configs per kernel variant (a ResNet-50 engine alone: ~240
# compiles, minutes): far past the budget. One config per kernel instead; rows record it ("autotune": false).
export ADN_KERNEL_AUTOTUNE=${ADN_KERNEL_AUTOTUNE:-0}
export PYTHONUNBUFFERED=1  # a killed section keeps everything it printed
[ "$DRY_RUN" = 1 ] && export ADN_BENCH_SMOKE=1

# Caps (s) are generous; the budget cuts whatever comes late, except plot (last, small), which has a reserve.
# A section cut short can be run alone by a second call with ADN_GPU_CHECK_SECTIONS=env,build,<section> and a
# NEW OUT (a suite rewrites its rows file from scratch).
declare -A CAP=([env]=30 [build]=180 [gpu_tests]=200 [latency_resnet]=130 [latency_vit]=90 [switching]=60
                [kernels_layers]=60 [train]=30 [plot]=20)
PLOT_RESERVE=20

wanted() {
  [ -z "${ADN_GPU_CHECK_SECTIONS:-}" ] && return 0
  [[ ",${ADN_GPU_CHECK_SECTIONS}," == *",$1,"* ]]
}

record() {  # record NAME STATUS SECONDS [NOTE]
  printf '%-15s %-9s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"
  pack
}

pack() {  # everything so far into $PACK/gpu_check.tgz (atomically: a kill mid-pack keeps the previous one)
  [ -n "$PACK" ] || return 0
  tar czf "$PACK/gpu_check.tgz.part" -C "$OUT" . && mv -f "$PACK/gpu_check.tgz.part" "$PACK/gpu_check.tgz"
  local f
  for f in summary.txt results.md latency_vs_macs.png; do
    [ -f "$OUT/$f" ] && cp -f "$OUT/$f" "$PACK/$f"
  done
  return 0
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
  # SIGINT, not TERM: pytest then still prints its failures and summary before it exits.
  timeout --signal=INT --kill-after=15 "$cap" bash -c '"$@"' "$name" "$@" >>"$LOGS/$name.log" 2>&1
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
  "$PYTHON" -m pytest -q -rfE -p no:cacheprovider "$1" "${extra[@]}"
}

gpu_tests() {
  # Compiling each kernel variant (~1-2 s, one CPU core) dominates: four pytest processes share the GPU and
  # Triton's on-disk cache, which the suites after this section reuse. Kernel tests run too, so a failing
  # engine test can be traced to a kernel. Each group logs to logs/gpu_tests_<group>.log.
  local names=(kernels engine_resnet50 engine_vit engine_other) pids=() rc=0 i
  group() { local name=$1; shift
    "$PYTHON" -m pytest -v -rfEs -p no:cacheprovider -m gpu "$@" >"$LOGS/gpu_tests_$name.log" 2>&1; }
  group kernels tests/test_kernels_conv2d.py tests/test_kernels_linear.py tests/test_kernels_layer_norm.py \
    tests/test_kernels_attention.py tests/test_kernels_gather.py & pids+=($!)
  group engine_resnet50 tests/test_engine_gpu.py -k resnet50 & pids+=($!)
  group engine_vit tests/test_engine_gpu.py -k vit_b_16 & pids+=($!)
  group engine_other tests/test_engine_gpu.py -k "not resnet50 and not vit_b_16" & pids+=($!)
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "gpu_tests group ${names[$i]}: FAILED (exit $?)"; rc=1; }
  done
  for i in "${names[@]}"; do echo "-- $i: $(tail -n 1 "$LOGS/gpu_tests_$i.log")"; done
  return $rc
}

plot_rows() {
  local extra=()
  [ "$DRY_RUN" = 1 ] && extra=(--include-smoke)
  "$PYTHON" bench/plot.py --results "$OUT" --out "$OUT" "${extra[@]}"
}

export PYTHON OUT LOGS DRY_RUN
export -f env_record build_ext gpu_tests suite plot_rows pack
echo "gpu_check: OUT=$OUT PACK=${PACK:-none} PYTHON=$PYTHON budget=${BUDGET}s dry_run=$DRY_RUN autotune=$ADN_KERNEL_AUTOTUNE"
# build before env: environment.json then says whether the extension loads
if [ "$DRY_RUN" = 1 ]; then
  dry_skip build "run: TORCH_CUDA_ARCH_LIST=9.0 $PYTHON setup.py build_ext --inplace"
else
  section build build_ext
fi
section env env_record
if [ "$DRY_RUN" = 1 ]; then
  dry_skip gpu_tests "run: the GPU tests (-m gpu) in four parallel groups"
else
  section gpu_tests gpu_tests
fi
# most wanted first: a budget cut loses the tail
section latency_resnet suite bench/test_latency_resnet.py
section latency_vit suite bench/test_latency_vit.py
section switching suite bench/test_switching_cost.py
section kernels_layers suite bench/test_kernels_layers.py
section train suite bench/test_train_step.py
section plot plot_rows
echo "gpu_check: done in $(( $(date +%s) - START ))s; summary in $SUMMARY"
pack
exit $FAILED
