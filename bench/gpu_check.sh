#!/usr/bin/env bash
# The GPU check, in TWO calls of at most 540 s each (the device tool runs one command of at most 600 s per call),
# ordered by value. On a GPU machine (H100/H200, python 3.12, torch 2.11, triton 3.6, nvcc 13.0, no network):
#   call 1: build the CUDA extension in place, record the card and versions, the GPU tests, the engine rows (both
#           mechanisms, every sub-network, batch 1 and 64, ResNet-50-ADN and ViT-B/16-ADN) beside eager and one
#           manual CUDA graph per sub-network, table + plot;
#   call 2: (build, versions,) the torch.compile / compile+freezing baselines, switching cost and torch.compile's
#           recompile limit, the per-layer kernel rows, the engine with autotuned kernels (ADN_KERNEL_AUTOTUNE=1,
#           Triton's disk cache), the training step, table + plot.
# Every section has a time cap (the caps of a call add up to at most its 540 s budget); a failing or cut section
# is reported and the next one runs. Suites write each row as soon as it is measured, so a cap cut loses only the
# rest of that section.
#
#   bash bench/gpu_check.sh --plan         # each section of each call with its cap, and each call's total
#   OUT=/some/dir ADN_GIT_SHA=$(git rev-parse HEAD) bash bench/gpu_check.sh --call 1     # then --call 2
#   # through a tool that brings back only a few files (the device tool: at most 8 from its $OUT):
#   ADN_GPU_CHECK_PACK=$OUT OUT=/tmp/gpu_check ADN_GIT_SHA=<sha> bash bench/gpu_check.sh --call 1
#   bash bench/gpu_check.sh --smoke --call 1   # CPU dry run (also ADN_GPU_CHECK_DRY_RUN=1): no build, no GPU tests,
#                                          # suites in smoke mode; checks this script itself
#                                          # (tests/bench/test_bench_gpu_check.py)
# Without --call both calls run, one after the other (each with its own budget; build and env only once).
# Knobs: PYTHON (default .venv/bin/python if present, else python3); ADN_GPU_CHECK_BUDGET_S (seconds per call);
#   ADN_GPU_CHECK_SECTIONS=build,env,... (run only these sections of the selected calls; --plan lists them);
#   ADN_GPU_CHECK_CAP_<section>=seconds (one section's cap);
#   ADN_GPU_CHECK_PACK=dir: after every section, refresh dir/gpu_check.tgz (all of $OUT) and copy summary.txt,
#   results.md and latency_vs_macs.png there (4 files at most; a run killed midway still leaves what it did);
#   ADN_KERNEL_AUTOTUNE (default 0 here: one config per kernel, see below; engine_autotuned sets 1);
#   the suites' own knobs (bench/_harness.py), e.g. ADN_BENCH_COMPILE_ALL=1.
# Output: $OUT/summary.txt (one line per section: status, seconds), $OUT/environment.json, $OUT/*.json (rows,
#   one file per suite and tag: latency_resnet.json = call 1's providers, latency_resnet_compile.json = call 2's
#   torch.compile rows, latency_resnet_autotuned.json = the autotuned engine), $OUT/results.md +
#   latency_vs_macs.png, $OUT/logs/*.log. Exit status 1 if a section failed, or build / gpu_tests hit their cap
#   (a benchmark section cut by its cap is reported TIMEOUT and keeps its rows: not a failure).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${ADN_GPU_CHECK_DRY_RUN:-0}
PLAN=0
CALLS=(1 2)
USAGE="use --plan, --call 1|2, --smoke"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke|--dry-run) DRY_RUN=1 ;;
    --plan) PLAN=1 ;;
    --call)
      case "${2:-}" in
        1|2) CALLS=("$2"); shift ;;
        *) echo "gpu_check.sh: --call takes 1 or 2, got '${2:-}' ($USAGE)" >&2; exit 2 ;;
      esac ;;
    *) echo "gpu_check.sh: unknown argument '$1' ($USAGE)" >&2; exit 2 ;;
  esac
  shift
done

# The two calls, most wanted first within each (a cut loses the tail), and every section's cap (s). The caps are
# estimates (no GPU run has timed these sections yet); each call's caps add up to at most BUDGET (--plan shows it).
CALL1=(build env gpu_tests latency_resnet latency_vit plot)
CALL2=(build env compile_resnet compile_vit switching kernels_layers engine_autotuned train plot)
declare -A CAP=([build]=100 [env]=15 [gpu_tests]=170 [latency_resnet]=120 [latency_vit]=110 [plot]=15
                [compile_resnet]=130 [compile_vit]=70 [switching]=80 [kernels_layers]=40 [engine_autotuned]=60
                [train]=20)
BUDGET=${ADN_GPU_CHECK_BUDGET_S:-540}
for name in "${!CAP[@]}"; do
  cap_var="ADN_GPU_CHECK_CAP_$name"
  CAP[$name]=${!cap_var:-${CAP[$name]}}
  if ! [[ "${CAP[$name]}" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: $cap_var='${CAP[$name]}' is not a whole number of seconds" >&2; exit 2
  fi
done
call_sections() {  # call_sections N: the section names of call N
  local -n sections="CALL$1"
  echo "${sections[@]}"
}

sections_wanted=${ADN_GPU_CHECK_SECTIONS:-}
for name in ${sections_wanted//,/ }; do
  if [ -z "${CAP[$name]+set}" ]; then
    echo "gpu_check.sh: ADN_GPU_CHECK_SECTIONS names an unknown section '$name' (--plan lists them)" >&2; exit 2
  fi
done

if [ "$PLAN" = 1 ]; then  # prints the plan and runs nothing; exit 1 if a call's caps exceed the budget
  echo "budget: $BUDGET s per call"
  over=0
  for call in "${CALLS[@]}"; do
    total=0
    for name in $(call_sections "$call"); do
      printf 'call %s: %-17s cap %4s s\n' "$call" "$name" "${CAP[$name]}"
      total=$(( total + CAP[$name] ))
    done
    echo "call $call: total $total s"
    [ "$total" -le "$BUDGET" ] || { echo "call $call: over the budget of $BUDGET s" >&2; over=1; }
  done
  exit $over
fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9' '_' \
       | tr 'A-Z' 'a-z' | sed 's/_$//')
CALLS_TAG=$(IFS=_; echo "${CALLS[*]}")
OUT=${OUT:-bench/results/gpu/$(date -u +%Y-%m-%d)_${CARD:-nogpu}/call$CALLS_TAG}  # where the rows are committed
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS="$OUT/logs"
SUMMARY="$OUT/summary.txt"
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

# The budget cuts whatever comes late (start-up overheads add up), except plot (last, small), which has a reserve.
# A section cut short can be run alone by another call with ADN_GPU_CHECK_SECTIONS=build,env,<section> and a
# NEW OUT (a suite rewrites its rows file from scratch).
PLOT_RESERVE=${CAP[plot]}
# benchmark sections: cut by their cap they keep their rows, reported TIMEOUT without failing the run
MEASURING=" latency_resnet latency_vit compile_resnet compile_vit switching kernels_layers engine_autotuned train "

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
  local cap=${CAP[$name]}
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
    if [[ "$MEASURING" == *" $name "* ]]; then record "$name" TIMEOUT "$dt" "cap ${cap}s; rows measured so far are kept"
    else record "$name" TIMEOUT "$dt" "cap ${cap}s"; FAILED=1
    fi
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

with_env() {  # with_env NAME=VALUE... CMD...: CMD (a function too) with those variables set
  while [[ "${1:-}" == *=* ]]; do export "${1?}"; shift; done
  "$@"
}

suite() {  # suite FILE: one benchmark suite, pytest-benchmark's own JSON beside our rows when the plugin exists
  local name; name=$(basename "$1" .py)${ADN_BENCH_ROWS_TAG:+_$ADN_BENCH_ROWS_TAG}
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
  group kernels tests/kernels/test_kernels_conv2d.py tests/kernels/test_kernels_linear.py \
    tests/kernels/test_kernels_layer_norm.py tests/kernels/test_kernels_attention.py \
    tests/kernels/test_kernels_gather.py & pids+=($!)
  group engine_resnet50 tests/engine/test_engine_gpu.py -k resnet50 & pids+=($!)
  group engine_vit tests/engine/test_engine_gpu.py -k vit_b_16 & pids+=($!)
  group engine_other tests/engine/test_engine_gpu.py tests/serving/test_serving_gpu.py -k "not resnet50 and not vit_b_16" & pids+=($!)
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "gpu_tests group ${names[$i]}: FAILED (exit $?)"; rc=1; }
  done
  for i in "${names[@]}"; do echo "-- $i: $(tail -n 1 "$LOGS/gpu_tests_$i.log")"; done
  return $rc
}

plot_rows() {
  local extra=() rows
  rows=$(find "$OUT" -maxdepth 1 -name '*.json' ! -name environment.json | head -n 1)
  if [ -z "$rows" ]; then echo "no row files in $OUT yet: nothing to plot"; return 0; fi
  [ "$DRY_RUN" = 1 ] && extra=(--include-smoke)
  "$PYTHON" bench/plot.py --results "$OUT" --out "$OUT" "${extra[@]}"
}

export PYTHON OUT LOGS DRY_RUN
export -f env_record build_ext gpu_tests with_env suite plot_rows pack
echo "gpu_check: calls ${CALLS[*]} OUT=$OUT PACK=${PACK:-none} PYTHON=$PYTHON budget=${BUDGET}s per call" \
  "dry_run=$DRY_RUN autotune=$ADN_KERNEL_AUTOTUNE"
CALL1_PROVIDERS=engine_conditional,engine_early_exit,eager,cuda_graph
run_section() {  # run_section NAME: one section of the plan
  case "$1" in
    build)  # before env: environment.json then says whether the extension loads
      if [ "$DRY_RUN" = 1 ]; then dry_skip build "run: TORCH_CUDA_ARCH_LIST=9.0 $PYTHON setup.py build_ext --inplace"
      else section build build_ext; fi ;;
    env) section env env_record ;;
    gpu_tests)
      if [ "$DRY_RUN" = 1 ]; then dry_skip gpu_tests "run: the GPU tests (-m gpu) in four parallel groups"
      else section gpu_tests gpu_tests; fi ;;
    latency_resnet|latency_vit)
      section "$1" with_env ADN_BENCH_PROVIDERS=$CALL1_PROVIDERS suite "bench/test_$1.py" ;;
    compile_resnet|compile_vit)
      section "$1" with_env ADN_BENCH_PROVIDERS=compile,compile_freeze ADN_BENCH_ROWS_TAG=compile \
        suite "bench/test_latency_${1#compile_}.py" ;;
    engine_autotuned)  # tunes every kernel shape once (minutes from a cold Triton cache): ResNet-50 batch 1 only
      section engine_autotuned with_env ADN_KERNEL_AUTOTUNE=1 ADN_BENCH_PROVIDERS=engine_conditional,engine_early_exit \
        ADN_BENCH_BATCHES=1 ADN_BENCH_ROWS_TAG=autotuned suite bench/test_latency_resnet.py ;;
    switching) section switching suite bench/test_switching_cost.py ;;
    kernels_layers) section kernels_layers suite bench/test_kernels_layers.py ;;
    train) section train suite bench/test_train_step.py ;;
    plot) section plot plot_rows ;;
  esac
}
ALL_START=$(date +%s)
first=1
for call in "${CALLS[@]}"; do
  START=$(date +%s)  # each call has its own budget
  echo "== call $call: $(call_sections "$call")"
  for name in $(call_sections "$call"); do
    # build and env once per invocation (a later call on the same machine has them already)
    if [ "$first" = 0 ] && { [ "$name" = build ] || [ "$name" = env ]; }; then continue; fi
    run_section "$name"
  done
  first=0
done
echo "gpu_check: done in $(( $(date +%s) - ALL_START ))s; summary in $SUMMARY"
pack
exit $FAILED
