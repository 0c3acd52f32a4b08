#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (issue #14 part 5), within ~9 minutes:
#   1. benchmarks/run_gpu.sh without its full grid: the venv (reusing the machine's CUDA torch),
#      muscle installed, tests/test_kernel_masked_kl.py on CUDA, the kernel-config sweep
#      (--tune default, N = 16384, V = $TUNE_V) -> $OUT/kernel_<device>.csv;
#   2. tests/test_fused_head.py on CUDA (the fused head with the Triton kernel per chunk);
#   3. benchmarks/bench_fused_head_gpu.py: fused head vs materialized logits vs Liger's fused
#      linear CE / JSD / KL-div and Cut Cross-Entropy at V = 128,256 and 262,144
#      -> $OUT/fused_head_<device>.csv;
#   4. benchmarks/gpu_smoke.py: cache build in bf16, compat training from the cache (bf16),
#      online mode, DeepSpeed ZeRO-2 on one GPU, a format-2 (sampled tail) cache, with tiny
#      models -> $OUT/smoke_<device>.csv.
# Every stage runs under its own time limit (and the total under TOTAL_S); a failing stage does
# not stop the next; $OUT/stages.csv says what each returned and how long it took; the exit
# status is 0 only if every stage returned 0.
#
# The lent machines have no network: baselines come as wheels carried beside the repository,
#   pip download --no-deps -d .whl liger-kernel cut-cross-entropy     (on a machine with PyPI)
# and run_gpu.sh installs .whl/*.whl with --no-deps. A baseline that is missing still gets a
# row, with the reason in its note. DeepSpeed likewise (its smoke step fails with
# "--deepspeed needs DeepSpeed" when absent).
#
# Without a GPU: DRY_RUN=1 prints the stages and their commands; DEVICE=cpu runs stages 2-4 on
# this CPU at tiny sizes (the fused tests under TRITON_INTERPRET=1, the benchmark with --smoke,
# the smoke on CPU with DeepSpeed's CPU accelerator) to check the script itself.
# Env: OUT (default ./gpu_out), VENV (/tmp/muscle-gpu-venv), TOTAL_S (560), TUNE_V (128256),
#   DEVICE (cuda | cpu), DRY_RUN, SKIP (stage names to skip: kernel,fused_tests,bench,smoke),
#   BENCH_FUSED_ARGS (extra bench_fused_head_gpu.py arguments),
#   SMOKE_S (the smoke stage's limit: 160 s on CUDA, 420 s on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
VENV=${VENV:-/tmp/muscle-gpu-venv}
TOTAL_S=${TOTAL_S:-560}
DEVICE=${DEVICE:-cuda}
DRY_RUN=${DRY_RUN:-0}
SKIP=${SKIP:-}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[run_gpu_fused +$(($(date +%s) - T0))s] $*"; }
RC_ALL=0
[ -f "$OUT/stages.csv" ] || echo "date,device,stage,rc,seconds,limit_s" >"$OUT/stages.csv"

# stage NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left of TOTAL_S), record the row
stage() {
    local name=$1 limit=$2
    shift 2
    case ",$SKIP," in *",$name,"*) say "skip $name"; return 0 ;; esac
    local left=$((TOTAL_S - ($(date +%s) - T0)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$DRY_RUN" = 1 ]; then
        say "stage $name (limit ${limit}s): $*"
        return 0
    fi
    if [ "$limit" -lt 10 ]; then
        say "stage $name: no time left (TOTAL_S=$TOTAL_S)"
        echo "$(date -Iseconds),$DEV,$name,124,0,$limit" >>"$OUT/stages.csv"
        RC_ALL=1
        return 0
    fi
    say "stage $name (limit ${limit}s)"
    local t=$(date +%s) rc=0
    timeout --signal=INT --kill-after=15 "$limit" "$@" || rc=$?
    say "stage $name: rc $rc after $(($(date +%s) - t))s"
    echo "$(date -Iseconds),$DEV,$name,$rc,$(($(date +%s) - t)),$limit" >>"$OUT/stages.csv"
    [ "$rc" = 0 ] || RC_ALL=1
}

if [ "$DEVICE" = cuda ]; then
    DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
        tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
    DEV=${DEV:-cuda}
    PY="$VENV/bin/python"
else
    DEV=cpu
    PY=${PY:-$ROOT/.venv/bin/python}
    SKIP="$SKIP,kernel"  # the kernel tests and sweep need CUDA (interpreted they take long)
    export TRITON_INTERPRET=1
fi
say "device $DEVICE ($DEV), OUT=$OUT, total limit ${TOTAL_S}s"

# 1. setup, kernel tests, sweep (run_gpu.sh makes the venv that every later stage uses)
stage kernel 220 env OUT="$OUT" VENV="$VENV" SKIP_GRID=1 SKIP_COLD=1 TUNE_V="${TUNE_V:-128256}" \
    bash benchmarks/run_gpu.sh

# run_gpu.sh's PYTHONPATH shim (offline, no editable install) does not outlive it: redo it here
if [ "$DRY_RUN" != 1 ] && ! "$PY" -c 'import muscle.fused_head, muscle.cli.train' 2>/dev/null; then
    SHIM=/tmp/muscle-shim
    rm -rf "$SHIM" && mkdir -p "$SHIM/muscle"
    cp -r "$ROOT"/muscle/. "$SHIM/muscle/"
    cp -r "$ROOT/kernels" "$SHIM/muscle/kernels"
    cp -r "$ROOT/bin" "$SHIM/muscle/cli"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    say "muscle not importable from $PY: using a PYTHONPATH shim"
fi

# 2. the fused head's tests (Triton per chunk on CUDA; interpreted on CPU), without the two
#    that check this script and the benchmark's plumbing
[ "$DEVICE" = cuda ] && TESTS_S=90 || TESTS_S=240
stage fused_tests "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_head.py \
    -k "not gpu_script and not gpu_benchmark" -o junit_family=xunit2 \
    --junitxml="$OUT/fused_head_pytest_${DEV}.xml"

# 3. the fused-linear benchmark
if [ "$DEVICE" = cuda ]; then
    # shellcheck disable=SC2086
    stage bench 120 env PYTHONUNBUFFERED=1 "$PY" benchmarks/bench_fused_head_gpu.py \
        --out "$OUT/fused_head_${DEV}.csv" ${BENCH_FUSED_ARGS:-}
else
    stage bench 150 "$PY" benchmarks/bench_fused_head_gpu.py --smoke --device cpu \
        --out "$OUT/fused_head_${DEV}.csv"
fi

# 4. the real paths, tiny models
# (on a CPU each step takes 15-35 s: give it longer when checking the script there)
[ "$DEVICE" = cuda ] && SMOKE_S=${SMOKE_S:-160} || SMOKE_S=${SMOKE_S:-420}
stage smoke "$SMOKE_S" env PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_smoke.py --device "$DEVICE" \
    --out "$OUT/smoke_${DEV}.csv" --step-timeout 120

say "done: rc $RC_ALL (stages: $OUT/stages.csv)"
exit "$RC_ALL"
