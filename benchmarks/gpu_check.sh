#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions run through `timeout ... bash -c`, which shellcheck cannot follow
# One prepared GPU check, sized for a lent H100/H200 machine (15 minutes in all, start-up included): build with
# CUDA for the visible arch, run the CUDA-parametrised tests, compute-sanitizer (memcheck, racecheck, synccheck)
# over a small subset of them, and every benchmarks/gpu_*.py at a bounded size; at most GPU_CHECK_BUDGET seconds
# (default 480) of wall time in all, each step under its own `timeout`. Ends with ONE summary table.
# benchmarks/GPU_CHECK.md has the budget table, the wheel download command and the device-tool call.
#
#   bash benchmarks/gpu_check.sh [LOGDIR]              # LOGDIR default: $OUT/gpu_logs, else /tmp/lrag_gpu_logs
#   bash benchmarks/gpu_check.sh --dry-run [LOGDIR]    # print the plan (steps, time caps, commands), run nothing
#   options: --budget SECONDS   --wheels DIR   --only STEP[,STEP...] (prefixes too: --only bench,memcheck)
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET, GPU_CHECK_WHEELS (default benchmarks/wheels),
# GPU_CHECK_ONLY, GPU_CHECK_BUNDLE (1/0: bundle the logs for the device tool; default 1 when LOGDIR is under $OUT),
# GPU_CHECK_TESTS_K / GPU_CHECK_SAN_K (pytest -k expressions), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
# Exit status: 0 every step PASS or SKIP; 1 a step FAIL or TIMEOUT; 2 no CUDA device; 64 bad arguments.
set -uo pipefail

usage() { sed -n '3,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

CALLER_DIR=$(pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY_RUN=0
BUDGET=${GPU_CHECK_BUDGET:-480}
WHEELS=${GPU_CHECK_WHEELS:-}
ONLY=${GPU_CHECK_ONLY:-}
LOGDIR=""
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) DRY_RUN=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    --only) ONLY=${2:?--only needs step names}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 64 ;;
    *) [ -z "$LOGDIR" ] || { echo "gpu_check: one LOGDIR only" >&2; exit 64; }; LOGDIR=$1 ;;
  esac
  shift
done
case $BUDGET in ''|*[!0-9]*) echo "gpu_check: --budget must be whole seconds, got '$BUDGET'" >&2; exit 64 ;; esac

abspath() { case $1 in /*) realpath -m "$1" ;; *) realpath -m "$CALLER_DIR/$1" ;; esac; }
if [ -z "$LOGDIR" ]; then
  if [ -n "${OUT:-}" ]; then LOGDIR=$OUT/gpu_logs; else LOGDIR=${TMPDIR:-/tmp}/lrag_gpu_logs; fi
fi
LOGDIR=$(abspath "$LOGDIR")
if [ -n "$WHEELS" ]; then WHEELS=$(abspath "$WHEELS"); else WHEELS=$ROOT/benchmarks/wheels; fi
BUNDLE=${GPU_CHECK_BUNDLE:-}
if [ -z "$BUNDLE" ]; then
  BUNDLE=0
  if [ -n "${OUT:-}" ]; then
    out_abs=$(abspath "$OUT")
    case $LOGDIR/ in "$out_abs"/*) BUNDLE=1 ;; esac
  fi
fi
cd "$ROOT" || exit 1

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
# The "cuda" parameter of the device fixtures (ids [cuda], [cuda-...], [...-cuda]) and the test_cuda_* tests, never
# an "emu" one (nor tests/test_cuda_emulator.py, which needs no GPU).
CUDA_ONLY="cuda and not emu"
TESTS_K=${GPU_CHECK_TESTS_K:-$CUDA_ONLY}
# One or two CUDA tests per kernel (cosine_topk, gather_kv/write_kv incl. fp8 and out-of-range entries,
# embed_head, pooled_embed): 12 tests when written; compute-sanitizer makes each 10-100x slower.
SAN_K=${GPU_CHECK_SAN_K:-$CUDA_ONLY and (brute_force or empty_ranges or larger_cache or out_of_range or strided or fp8_gather or layouts or empty_batch)}
SAN_FILES="tests/test_cosine_topk.py tests/test_kv_pool.py tests/test_embed_head.py tests/test_pooled_embed.py"
TEST_MODULES="pytest hypothesis safetensors"   # what the test steps need (numpy too, checked, not required)

# --- the plan: step name, time cap (s), what it runs ------------------------------------------------------------
declare -a NAMES=() CAPS=() DESCS=()
plan() { NAMES+=("$1"); CAPS+=("$2"); DESCS+=("$3"); }

bench_args() {  # the size bound of each benchmark in this check (its defaults are unchanged)
  case $1 in
    gpu_generate) echo "--seconds 15 --host-frames 64" ;;  # 20 blocks at the Wan2.1-1.3B geometry (default 160)
    gpu_memory) echo "--quick" ;;                          # no 5000-frame history, one timed baseline block
    *) echo "" ;;                                           # cosine_topk, embed, kv: already seconds at defaults
  esac
}
bench_cap() {
  case $1 in gpu_generate) echo 75 ;; gpu_memory) echo 60 ;; gpu_embed) echo 45 ;; *) echo 50 ;; esac
}

plan gpu 45 "nvidia-smi; $PY: torch.cuda.is_available(), get_device_capability(); nvcc/compute-sanitizer versions"
plan deps 60 "import $TEST_MODULES numpy; missing ones: pip install --no-index --find-links $WHEELS --target <tmp>"
plan build 240 "TORCH_CUDA_ARCH_LIST=<capability> MAX_JOBS=\${MAX_JOBS:-nproc} LRAG_EXT_CUDA=1 LRAG_EXT_EMU=0 $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . ; build_info()['cuda']"
plan tests_cuda 150 "$PY -m pytest -q -k '$TESTS_K' --continue-on-collection-errors tests"
plan memcheck 75 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 $PY -m pytest -k '<SAN_K>' <4 op test files>"
plan racecheck 75 "compute-sanitizer --tool racecheck --error-exitcode 99 $PY -m pytest -k '<SAN_K>' <4 op test files>"
for script in benchmarks/gpu_*.py; do
  [ -e "$script" ] || continue
  base=$(basename "$script" .py)
  plan "bench_${base#gpu_}" "$(bench_cap "$base")" "$PY $script $(bench_args "$base")"
done
plan synccheck 45 "compute-sanitizer --tool synccheck --error-exitcode 99 $PY -m pytest -k '<SAN_K>' <4 op test files>"

selected() {  # whether --only selects step $1 (gpu, deps and build always run: the others need them)
  local s item
  local -a items
  case $1 in gpu|deps|build) return 0 ;; esac
  [ -z "$ONLY" ] && return 0
  IFS=',' read -ra items <<<"$ONLY"
  for item in "${items[@]}"; do
    s=${item// /}
    [ -n "$s" ] && case $1 in "$s"*) return 0 ;; esac
  done
  return 1
}

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check plan (dry run: nothing is executed)"
  echo "  repo     $ROOT"
  echo "  python   $PY ($(command -v "$PY" 2>/dev/null || echo 'not found'))"
  echo "  logs     $LOGDIR$([ "$BUNDLE" = 1 ] && echo '  (bundled at the end: summary.txt + all_steps.log + failed steps'"'"' logs)')"
  nwhl=$(find "$WHEELS" -maxdepth 1 -name '*.whl' 2>/dev/null | wc -l)
  echo "  wheels   $WHEELS ($nwhl .whl files; used only for modules the python lacks)"
  echo "  budget   ${BUDGET}s wall in all; a step runs under timeout min(cap, time left), skipped when < min(cap, 20s) is left"
  if command -v nvidia-smi >/dev/null 2>&1; then echo "  GPU      nvidia-smi present"; else
    echo "  GPU      no nvidia-smi here: a real run stops after step 'gpu' with 'no CUDA device'"; fi
  echo "  sanitizer subset: -k '$SAN_K' over $SAN_FILES"
  printf '\n%-3s %-20s %6s  %s\n' "#" "step" "cap s" "command"
  total=0
  for i in "${!NAMES[@]}"; do
    sel=""; selected "${NAMES[$i]}" || sel="  [not in --only: SKIP]"
    printf '%-3s %-20s %6s  %s%s\n' "$((i + 1))" "${NAMES[$i]}" "${CAPS[$i]}" "${DESCS[$i]}" "$sel"
    total=$((total + CAPS[i]))
  done
  echo "caps add up to ${total}s; the ${BUDGET}s budget bounds the whole run"
  exit 0
fi

# --- step bodies (each runs as `timeout CAP bash -c 'step_NAME ARGS'`, output to its log) ------------------------
STATE=$(mktemp -d "${TMPDIR:-/tmp}/lrag_gpu_check.XXXXXX")
trap 'rm -rf "$STATE"' EXIT
export PY ROOT STATE WHEELS TESTS_K SAN_K SAN_FILES TEST_MODULES PYTHONUNBUFFERED=1
note() { echo "$*" >"$STATE/note"; echo "NOTE: $*"; }

step_gpu() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then note "no CUDA device (nvidia-smi not found)"; return 3; fi
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || { note "no CUDA device (nvidia-smi failed)"; return 3; }
  "$PY" - "$STATE/arch" "$STATE/note" <<'EOF' || return 3
import sys
arch_file, note_file = sys.argv[1:3]


def no_device(why):
    print(f"NOTE: no CUDA device ({why})")
    open(note_file, "w").write(f"no CUDA device ({why})\n")
    sys.exit(3)


try:
    import torch
except Exception as e:  # noqa: BLE001 - any import failure means no usable torch
    no_device(f"torch not importable: {e}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
if not torch.cuda.is_available():
    no_device("torch.cuda.is_available() is False")
major, minor = torch.cuda.get_device_capability()
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name()}: sm_{major}{minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
open(arch_file, "w").write(f"{major}.{minor}")
EOF
  echo "kernel $(uname -r)  (4.4.0 = gVisor: compute-sanitizer is refused there)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  local san; san=$(find_sanitizer) && "$san" --version | head -n 2
  note "sm_$(tr -d . <"$STATE/arch"), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
}

find_sanitizer() {
  local d top
  command -v compute-sanitizer && return 0
  top=$(echo | timeout 30 nvcc -x cu -E -v - 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  for d in "${CUDA_HOME:-}" "$top" /usr/local/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && { echo "$d/bin/compute-sanitizer"; return 0; }
  done
  return 1
}

step_deps() {
  local m missing=() still=()
  for m in $TEST_MODULES; do
    if v=$("$PY" -c "import $m; print($m.__version__)" 2>/dev/null); then echo "$m $v"; else missing+=("$m"); fi
  done
  "$PY" -c "import numpy; print('numpy', numpy.__version__)" 2>/dev/null \
    || echo "numpy missing (not required; the test modules that import it error; add its wheel to $WHEELS)"
  if [ ${#missing[@]} -eq 0 ]; then note "all present"; return 0; fi
  echo "missing from $PY: ${missing[*]}"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing them from $WHEELS (no index) into $STATE/site"
    "$PY" -m pip install --no-index --find-links "$WHEELS" --target "$STATE/site" --no-compile --no-cache-dir \
      "${missing[@]}" || echo "pip could not install ${missing[*]} from $WHEELS (a dependency's wheel missing?)"
    export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in $WHEELS: fill it once with the command in benchmarks/GPU_CHECK.md and carry it"
  fi
  for m in "${missing[@]}"; do "$PY" -c "import $m" 2>/dev/null || still+=("$m"); done
  if [ ${#still[@]} -eq 0 ]; then note "installed from wheels: ${missing[*]}"; return 0; fi
  echo "${still[*]}" >"$STATE/missing"
  note "missing ${still[*]} (no wheels for it in $WHEELS, see benchmarks/GPU_CHECK.md)"
  return 77
}

step_build() {
  local arch=${TORCH_CUDA_ARCH_LIST:-$(cat "$STATE/arch")}
  export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} LRAG_EXT_CUDA=1 LRAG_EXT_EMU=${LRAG_EXT_EMU:-0}
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$MAX_JOBS LRAG_EXT_CUDA=1 LRAG_EXT_EMU=$LRAG_EXT_EMU"
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
    # pip may not write to the interpreter's environment: build in place and import from the tree instead
    grep -qiE 'permission denied|read-only file system|externally-managed' "$STEP_LOG" \
      || { note "pip install -e . failed"; return 1; }
    echo "pip cannot install here: building in place (setup.py build_ext --inplace), PYTHONPATH=$ROOT:$ROOT/python"
    "$PY" setup.py build_ext --inplace || { note "setup.py build_ext --inplace failed"; return 1; }
    echo "$ROOT:$ROOT/python" >"$STATE/pythonpath"
    export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import lrag_ext; i = lrag_ext.build_info(); print(i); assert i['cuda'], 'built without CUDA kernels'" \
    || { note "the built module has no CUDA kernels"; return 1; }
  note "CUDA kernels built for $arch"
}

pytest_tally() {  # pytest_tally LOG: pytest's closing "N passed, N skipped ... in Ns" line
  grep -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$1" \
    | tail -n 1 | sed -E 's/^=+ //; s/ =+$//'
}

last_line() {  # last_line LOG: its last line that is neither blank, a note nor a sanitizer banner
  grep -vE '^[[:space:]]*$|^NOTE: |^=========' "$1" | tail -n 1 | cut -c1-110
}

step_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -k "$TESTS_K" --continue-on-collection-errors --durations=10 tests
  local rc=$? tally; tally=$(pytest_tally "$STEP_LOG")
  note "${tally:-no pytest summary: $(last_line "$STEP_LOG")}"
  [ "$rc" -eq 5 ] && { note "no test selected by -k '$TESTS_K'"; return 1; }
  [ "$rc" -eq 0 ] && ! grep -qE '[0-9]+ passed' <<<"$tally" && { note "no CUDA test passed (all skipped?): $tally"; return 1; }
  return "$rc"
}

step_sanitizer() {
  local tool=$1 san f files=() rc summary tally
  san=$(find_sanitizer) || { note "compute-sanitizer not found"; return 77; }
  for f in $SAN_FILES; do [ -e "$f" ] && files+=("$f"); done
  [ ${#files[@]} -gt 0 ] || { note "none of $SAN_FILES exists"; return 1; }
  local -a env_=()
  [ "$tool" = memcheck ] && env_=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # so that out-of-bounds stays out of the pool
  env "${env_[@]}" "$san" --tool "$tool" --error-exitcode 99 --print-limit 50 \
    "$PY" -m pytest -q -p no:cacheprovider -k "$SAN_K" "${files[@]}"
  rc=$?
  if grep -qiE 'device not supported|not supported on this platform' "$STEP_LOG"; then
    note "compute-sanitizer refuses this device (gVisor runtime? see KINDS.md)"; return 77
  fi
  summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$STEP_LOG" | tail -n 1 | sed 's/^=* *//')
  tally=$(pytest_tally "$STEP_LOG")
  note "${summary:-no sanitizer summary}; ${tally:-no pytest summary: $(last_line "$STEP_LOG")}"
  [ "$rc" -eq 99 ] && { note "$tool reported errors: ${summary:-see log}"; return 1; }
  [ "$rc" -eq 5 ] && { note "no test selected by -k '$SAN_K'"; return 1; }
  return "$rc"
}

step_bench() {
  local script=$1; shift
  "$PY" "$script" "$@"
}
export -f note last_line find_sanitizer step_gpu step_deps step_build pytest_tally step_tests step_sanitizer step_bench

# --- the runner -----------------------------------------------------------------------------------------------
mkdir -p "$LOGDIR" || { echo "gpu_check: cannot create $LOGDIR" >&2; exit 1; }
T0=$SECONDS
DEADLINE=$((T0 + BUDGET))
declare -a STATUS=() SECS=() LOGS=() NOTES=()
NO_GPU=0 BUILD_OK=0 DEPS_MISSING=""
echo "gpu_check: $(date -u +%FT%TZ)  repo $ROOT  python $PY  logs $LOGDIR  budget ${BUDGET}s"

record() { STATUS[$1]=$2; SECS[$1]=$3; NOTES[$1]=$4; }

run_step() {  # run_step INDEX FUNCTION ARGS...
  local i=$1 fn=$2; shift 2
  local name=${NAMES[$i]} cap=${CAPS[$i]} log left t rc start status n
  log=$(printf '%s/%02d_%s.log' "$LOGDIR" "$((i + 1))" "$name")
  LOGS[i]=$(basename "$log")
  left=$((DEADLINE - SECONDS))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt $((cap < 20 ? cap : 20)) ]; then
    echo "budget: ${left}s left, not enough for ${name}" >"$log"
    record "$i" SKIP 0 "budget of ${BUDGET}s spent (${left}s left)"; report "$i"; return
  fi
  printf '\n=== [%d/%d] %s  (cap %ds, %ds of the budget left)  %s\n' "$((i + 1))" "${#NAMES[@]}" "$name" "$t" \
    "$left" "$(date -u +%T)"
  rm -f "$STATE/note"
  start=$SECONDS
  STEP_LOG=$log timeout -k 10 "$t" bash -c 'set -uo pipefail; "$@"' _ "$fn" "$@" >"$log" 2>&1 </dev/null
  rc=$?
  n=""; [ -s "$STATE/note" ] && n=$(tail -n 1 "$STATE/note")
  case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124|137) status=TIMEOUT; n="killed after ${t}s${n:+; last note: $n}"; echo "gpu_check: TIMEOUT after ${t}s" >>"$log" ;;
    *) status=FAIL
       # no note from the step: its last log line (a Python exception's message, say)
       [ -n "$n" ] || n=$(last_line "$log")
       n="exit $rc${n:+; $n}" ;;
  esac
  record "$i" "$status" $((SECONDS - start)) "$n"
  report "$i"
}

report() {  # one line per finished step, plus the tail of its log when useful
  local i=$1 lines=0
  printf -- '--> %-18s %-7s %4ss  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  case ${STATUS[$i]} in FAIL|TIMEOUT) lines=25 ;; PASS) case ${NAMES[$i]} in bench_*) lines=40 ;; esac ;; esac
  [ "$lines" -gt 0 ] && [ -f "$LOGDIR/${LOGS[$i]}" ] && tail -n "$lines" "$LOGDIR/${LOGS[$i]}" | sed 's/^/    /'
  return 0
}

skip_step() {  # skip_step INDEX REASON
  local i=$1
  LOGS[i]=-
  record "$i" SKIP 0 "$2"; report "$i"
}

for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  if ! selected "$name"; then skip_step "$i" "not in --only $ONLY"; continue; fi
  if [ "$NO_GPU" = 1 ]; then skip_step "$i" "no CUDA device"; continue; fi
  case $name in
    gpu)
      run_step "$i" step_gpu
      [ "${STATUS[$i]}" = PASS ] || NO_GPU=1 ;;
    deps)
      run_step "$i" step_deps
      [ -d "$STATE/site" ] && export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
      [ -s "$STATE/missing" ] && DEPS_MISSING=$(cat "$STATE/missing") ;;
    build)
      run_step "$i" step_build
      if [ -s "$STATE/pythonpath" ]; then
        PYTHONPATH="$(cat "$STATE/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"; export PYTHONPATH
      fi
      [ "${STATUS[$i]}" = PASS ] && BUILD_OK=1 ;;
    *)
      if [ "$BUILD_OK" != 1 ]; then skip_step "$i" "the CUDA build failed"; continue; fi
      case $name in
        tests_cuda|memcheck|racecheck|synccheck)
          if [ -n "$DEPS_MISSING" ]; then
            skip_step "$i" "needs $DEPS_MISSING: put their wheels in $WHEELS (benchmarks/GPU_CHECK.md)"; continue
          fi ;;
      esac
      case $name in
        tests_cuda) run_step "$i" step_tests ;;
        memcheck|racecheck|synccheck)
          if [ -n "${SAN_SKIP:-}" ]; then skip_step "$i" "$SAN_SKIP"; continue; fi
          run_step "$i" step_sanitizer "$name"
          [ "${STATUS[$i]}" = SKIP ] && SAN_SKIP=${NOTES[$i]} ;;
        bench_*)
          base=gpu_${name#bench_}
          read -ra args <<<"$(bench_args "$base")"
          run_step "$i" step_bench "benchmarks/$base.py" "${args[@]}" ;;
      esac ;;
  esac
done

# --- the summary ----------------------------------------------------------------------------------------------
WALL=$((SECONDS - T0))
FAILED=0 NSKIP=0
for i in "${!NAMES[@]}"; do
  case ${STATUS[$i]} in FAIL|TIMEOUT) FAILED=1 ;; SKIP) NSKIP=$((NSKIP + 1)) ;; esac
done
BUNDLED=""
if [ "$BUNDLE" = 1 ]; then
  # The device tool returns at most 8 files from $OUT: keep summary.txt, one all_steps.log (every step's log, its
  # last MiB) and the separate logs of at most 6 FAIL/TIMEOUT steps; the other step logs live in all_steps.log.
  kept=0
  : >"$LOGDIR/all_steps.log"
  for i in "${!NAMES[@]}"; do
    f=$LOGDIR/${LOGS[$i]}
    if [ "${LOGS[$i]}" = - ] || [ ! -f "$f" ]; then continue; fi
    { echo "##### ${LOGS[$i]}  ${STATUS[$i]} ${SECS[$i]}s  ${NOTES[$i]}"; tail -c 1048576 "$f"; echo; } >>"$LOGDIR/all_steps.log"
    case ${STATUS[$i]} in FAIL|TIMEOUT) [ $kept -lt 6 ] && { kept=$((kept + 1)); continue; } ;; esac
    rm -f "$f"
  done
  BUNDLED="logs: every step's in all_steps.log; $kept FAIL/TIMEOUT step log(s) also as separate files"
fi
{
  echo
  echo "=== gpu_check summary ($(date -u +%FT%TZ), ${WALL}s of ${BUDGET}s, logs in $LOGDIR)"
  printf '%-18s %-7s %5s %5s  %-26s %s\n' step status secs cap log note
  for i in "${!NAMES[@]}"; do
    printf '%-18s %-7s %5s %5s  %-26s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${CAPS[$i]}" \
      "${LOGS[$i]}" "${NOTES[$i]}"
  done
  [ -n "$BUNDLED" ] && echo "$BUNDLED"
  if [ "$NO_GPU" = 1 ]; then
    echo "RESULT: no CUDA device - nothing ran past step 'gpu' (run this on the GPU machine; --dry-run shows the plan)"
  elif [ "$FAILED" = 1 ]; then echo "RESULT: FAILED (see the logs of the FAIL/TIMEOUT steps)"
  elif [ "$NSKIP" -eq 0 ]; then echo "RESULT: OK (every step PASS)"
  else echo "RESULT: OK, but $NSKIP step(s) SKIPPED (see their notes): not a full check"; fi
} | tee "$LOGDIR/summary.txt"

[ "$NO_GPU" = 1 ] && exit 2
exit $FAILED
