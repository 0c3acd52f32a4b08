#!/usr/bin/env bash
# One prepared GPU check of the fused masked-KL kernel, for a fresh CUDA machine with this repo:
#   1. a venv that reuses the machine's CUDA torch / triton (--system-site-packages) when
#      python3 already has them, else installs torch from PyPI;
#   2. `pip install -e .[gpu,bench]`, or, with no network, an install without dependencies
#      (the machine's own packages), or, failing that, a PYTHONPATH shim of the package layout;
#   3. pytest tests/test_kernel_masked_kl.py on CUDA;
#   4. benchmarks/bench_kernel.py over the full grid ("queued" timing), CSV + plot in $OUT/;
#   5. the triton and liger providers again with "cold" timing (comparable with older rows);
#   6. the kernel-config sweep (--tune default) at N=16384.
# Env: OUT (default ./gpu_out), BENCH_ARGS (extra bench_kernel.py arguments), SKIP_TESTS=1,
# SKIP_BENCH=1 (no benchmark at all), SKIP_GRID=1 (no full grid: only the cold rows and / or the
# sweep), SKIP_COLD=1, SKIP_TUNE=1, TUNE_V (the sweep's vocabularies, default 32000,128256),
# VENV (default /tmp/muscle-gpu-venv). benchmarks/run_gpu_fused.sh calls this for its setup,
# kernel tests and sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
VENV=${VENV:-/tmp/muscle-gpu-venv}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[run_gpu +$(($(date +%s) - T0))s] $*"; }

say "machine: $(uname -m), $(nproc) cores"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    say "system python3 has CUDA torch $(python3 -c 'import torch; print(torch.__version__)'): reusing it"
    python3 -m venv --system-site-packages "$VENV"
    # python3 may itself be a venv (e.g. /opt/torch/.venv): --system-site-packages then sees
    # the base interpreter only, so point a .pth at python3's own site-packages too.
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
        >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_system_site.pth"
    HAVE_TORCH=1
else
    python3 -m venv "$VENV"
    HAVE_TORCH=0
fi
PY="$VENV/bin/python"

# Is PyPI reachable? (the lent GPU machines have no network at all)
if "$PY" - <<'EOF' 2>/dev/null; then NET=1; else NET=0; fi
import socket
socket.create_connection(("pypi.org", 443), timeout=3).close()
EOF
say "network to PyPI: $NET"

if [ "$NET" = 1 ]; then
    "$PY" -m pip install -q --upgrade pip
    [ "$HAVE_TORCH" = 1 ] || "$PY" -m pip install -q torch
    "$PY" -m pip install -q -e ".[gpu,bench]" pytest
elif "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>"$OUT/pip_err.txt"; then
    say "installed muscle without dependencies (offline)"
else
    # Offline and no setuptools editable install: mirror the package-dir mapping by hand.
    say "pip install failed offline ($(tail -1 "$OUT/pip_err.txt")); using a PYTHONPATH shim"
    SHIM=/tmp/muscle-shim
    rm -rf "$SHIM" && mkdir -p "$SHIM/muscle"
    cp -r "$ROOT"/muscle/. "$SHIM/muscle/"
    cp -r "$ROOT/kernels" "$SHIM/muscle/kernels"
    [ -d "$ROOT/bin" ] && cp -r "$ROOT/bin" "$SHIM/muscle/cli"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
# Optional wheels carried next to the repo (e.g. liger-kernel for the baseline), offline.
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps "$ROOT"/.whl/*.whl && say "installed $(ls "$ROOT"/.whl)" \
        || say "could not install carried wheels"
fi
"$PY" - <<'EOF'
import torch, triton
import muscle.kernels as k
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "triton_available", k.triton_available())
EOF
unset TRITON_INTERPRET

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    say "pytest tests/test_kernel_masked_kl.py (CUDA)"
    set +e
    "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_masked_kl.py 2>&1 | tee "$OUT/pytest.txt"
    RC_TEST=${PIPESTATUS[0]}
    set -e
    say "pytest exit code $RC_TEST"
else
    RC_TEST=0
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    CSV="$OUT/kernel_bench.csv"
    if [ "${SKIP_GRID:-0}" != 1 ]; then
        say "benchmark (full grid)"
        # shellcheck disable=SC2086
        PYTHONUNBUFFERED=1 "$PY" benchmarks/bench_kernel.py --out "$CSV" --plot "$OUT/kernel_bench.png" \
            ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
    fi
    # also keep the per-device CSV name that the repo uses
    DEV=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
    if [ "${SKIP_COLD:-0}" != 1 ]; then
        say "cold-start timing (triton, liger)"
        PYTHONUNBUFFERED=1 "$PY" benchmarks/bench_kernel.py --out "$CSV" --timing cold \
            --providers triton,liger 2>&1 | tee -a "$OUT/bench.txt"
    fi
    if [ "${SKIP_TUNE:-0}" != 1 ]; then
        say "kernel config sweep"
        PYTHONUNBUFFERED=1 "$PY" benchmarks/bench_kernel.py --out "$CSV" --tune default \
            --N 16384 --V "${TUNE_V:-32000,128256}" 2>&1 | tee -a "$OUT/bench.txt"
    fi
    [ -f "$CSV" ] && cp "$CSV" "$OUT/kernel_${DEV}.csv"
fi
say "done (pytest rc=$RC_TEST)"
exit "$RC_TEST"
