#!/usr/bin/env bash
# The reproduction at the paper's own sizes (Table 7: LoRA r=128, alpha=156, 10 epochs, lr 1e-4,
# 500 warmup steps, the full training sets split 80/20) on one lent GPU, as one prepared script:
#   benchmarks/reproduce.py --profile paper --device cuda  (same stages, same resumability; the
#   outputs go to their own folder, benchmarks/results/repro2-gpu/, then are copied to $OUT).
# Budget: <= 10 minutes of device time for PIQA (estimate in benchmarks/README.md, not yet
# measured on a GPU); the script stops itself at DEADLINE_S and keeps every finished stage.
#
# Needs: the task data (DATA_DIR), and the pair's bases: BASE_V2 / BASE_V1 as plain
# checkpoints, or the SmolLM2 GGUF (GGUF=...) from which benchmarks/repro_pair.py rebuilds both
# (v1 from the committed recipe + healing adapter, digest-checked; ~1-2 min on CPU).
# Env: DATA_DIR (required; default $MUSCLE_DATA_DIR), PY (default .venv/bin/python; on a
#   fresh CUDA machine make one with `SKIP_TESTS=1 SKIP_BENCH=1 SKIP_COLD=1 SKIP_TUNE=1 bash benchmarks/run_gpu.sh` and pass
#   PY=/tmp/muscle-gpu-venv/bin/python), DEVICE (cuda), TASKS (piqa), ROOT (runs/repro2-gpu),
#   RESULTS (benchmarks/results/repro2-gpu), OUT (where a copy of RESULTS goes, if set),
#   DEADLINE_S (540), GGUF, BASE_V1, BASE_V2. Extra arguments go to reproduce.py
#   (the CPU test passes --limit-train/--limit-test and tiny bases).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-${MUSCLE_DATA_DIR:-}}
if [ -z "$DATA_DIR" ]; then
    echo "error: set DATA_DIR (or MUSCLE_DATA_DIR) to the task data folder (DATA_FORMAT.md)" >&2
    exit 2
fi
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-piqa}
ROOT=${ROOT:-runs/repro2-gpu}
RESULTS=${RESULTS:-benchmarks/results/repro2-gpu}
DEADLINE_S=${DEADLINE_S:-540}
T0=$(date +%s)
say() { echo "[run_gpu_repro +$(($(date +%s) - T0))s] $*"; }

copy_out() {
    if [ -n "${OUT:-}" ] && [ -d "$RESULTS" ]; then
        mkdir -p "$OUT" && cp -r "$RESULTS" "$OUT/" && say "results copied to $OUT/$(basename "$RESULTS")"
    fi
}
trap copy_out EXIT

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

bases=()
if [ -n "${BASE_V1:-}" ] || [ -n "${BASE_V2:-}" ]; then
    : "${BASE_V1:?BASE_V1 and BASE_V2 go together}" "${BASE_V2:?BASE_V1 and BASE_V2 go together}"
    bases=(--base-v1 "$BASE_V1" --base-v2 "$BASE_V2")
else
    say "bases: benchmarks/repro_pair.py (rebuilds v1 from the committed recipe)"
    "$PY" benchmarks/repro_pair.py --data-dir "$DATA_DIR" --root "$ROOT" ${GGUF:+--gguf "$GGUF"}
fi

say "reproduce.py --profile paper --device $DEVICE --tasks $TASKS"
rc=0
timeout --signal=INT "$DEADLINE_S" "$PY" benchmarks/reproduce.py --profile paper \
    --device "$DEVICE" --data-dir "$DATA_DIR" --tasks "$TASKS" --root "$ROOT" --out "$RESULTS" \
    "${bases[@]}" "$@" || rc=$?
if [ "$rc" = 124 ]; then
    say "deadline ${DEADLINE_S}s reached: finished stages are kept; run again to resume"
fi
say "done (rc $rc)"
exit "$rc"
