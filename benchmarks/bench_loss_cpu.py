"""CPU benchmark of the MUSCLE loss: impl="torch" (autograd reference) vs impl="chunked".

Times forward + backward (gradient w.r.t. the student logits) and measures peak extra memory.

How memory is measured (and why it is honest): each (provider, shape, dtype) runs in a fresh
subprocess. After the inputs exist, the child resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), reads VmRSS as the baseline, runs ONE
forward + backward, and reads VmHWM (peak RSS). peak_mem_mb = VmHWM - baseline: every byte
the call made resident at its high point, the returned (N, V) gradient included (both
providers return one). tracemalloc cannot see torch's allocations, hence RSS. Where
clear_refs is not writable the child falls back to ru_maxrss and says so on stderr. Timing
runs come after the memory run, on the warmed-up process (median of --repeats).

The gradient is taken with torch.autograd.grad, as for logits that come out of lm_head in
training (a non-leaf): no AccumulateGrad copy for either provider.

    python benchmarks/bench_loss_cpu.py --quick
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV_PATH = HERE / "results" / "loss_cpu.csv"
COLUMNS = ["date", "machine", "provider", "N", "V", "K", "dtype", "ms_fwd_bwd", "peak_mem_mb"]
PROVIDERS = ("torch", "chunked")


def machine() -> str:
    import torch
    from bench_common import cpu_name

    return f"{cpu_name()} / {os.cpu_count()} cpus / {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------
# child: one provider, one shape


def _status_mb(field: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(n: int, v: int, k: int, dtype, seed: int = 0):
    """Inputs built without (N, V) temporaries beyond z itself, so the baseline is clean."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=dtype) * 3  # (N, V) student logits
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    stride = v // k

    def teacher():
        # Distinct ids per row without an (N, V) topk: one id per stride-wide slot.
        ids = (torch.randint(0, stride, (n, k), generator=g) + torch.arange(k) * stride).int()
        lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, 1) + torch.log(
            torch.tensor(0.9)
        )  # (N, K) top-K carries 90% of the mass
        return ids, lp

    (i1, l1), (i2, l2) = teacher(), teacher()
    return z, labels, i1, l1, i2, l2


def child(provider: str, n: int, v: int, k: int, dtype_name: str, repeats: int) -> dict:
    import torch

    from muscle.losses import masked_kl

    dtype = getattr(torch, dtype_name)
    z, y, i1, l1, i2, l2 = make_inputs(n, v, k, dtype)
    z.requires_grad_()

    def step():
        loss = masked_kl(z, y, i1, l1, i2, l2, temperature=2.0, impl=provider)
        (g,) = torch.autograd.grad(loss, z)
        return g

    exact = _reset_peak()
    base = (
        _status_mb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    g = step()
    peak = (
        _status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    if not exact:
        print("warning: clear_refs not writable; peak from ru_maxrss", file=sys.stderr)
    del g
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_mb": peak - base}


# ----------------------------------------------------------------------------------------------
# parent


def run_child(provider, n, v, k, dtype, repeats) -> dict:
    cmd = [sys.executable, __file__, "--child", provider, str(n), str(v), str(k), dtype,
           "--repeats", str(repeats)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--child", nargs=5, metavar=("PROVIDER", "N", "V", "K", "DTYPE"))
    args = ap.parse_args()
    if args.child:
        p, n, v, k, d = args.child
        print(json.dumps(child(p, int(n), int(v), int(k), d, args.repeats or 3)))
        return

    if args.quick:
        shapes = [(256, 32000, 64), (1024, 49152, 64)]
        repeats = args.repeats or 3
    else:
        shapes = [(n, v, 64) for n in (256, 1024) for v in (32000, 49152)]
        repeats = args.repeats or 5
    dtypes = args.dtypes.split(",")
    date, mach = dt.datetime.now().isoformat(timespec="seconds"), machine()
    rows = []
    for n, v, k in shapes:
        for d in dtypes:
            for p in PROVIDERS:
                r = run_child(p, n, v, k, d, repeats)
                rows.append({"date": date, "machine": mach, "provider": p, "N": n, "V": v,
                             "K": k, "dtype": d, "ms_fwd_bwd": round(r["ms"], 2),
                             "peak_mem_mb": round(r["peak_mb"], 1)})  # fmt: skip
                print(f"{p:8s} N={n} V={v} K={k} {d}: {r['ms']:.1f} ms, {r['peak_mb']:.1f} MB",
                      file=sys.stderr)  # fmt: skip
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(markdown(rows, mach))


def markdown(rows: list[dict], mach: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = [f"Machine: {mach}; 1-min load average at the end: {load:.1f}", "",
           "| N | V | K | dtype | torch ms | chunked ms | speedup | torch MB | chunked MB "
           "| mem ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {(r["N"], r["V"], r["K"], r["dtype"], r["provider"]): r for r in rows}
    for n, v, k, d, p in by:
        if p != "torch":
            continue
        t, c = by[(n, v, k, d, "torch")], by[(n, v, k, d, "chunked")]
        out.append(
            f"| {n} | {v} | {k} | {d} | {t['ms_fwd_bwd']:.1f} | {c['ms_fwd_bwd']:.1f} "
            f"| {t['ms_fwd_bwd'] / c['ms_fwd_bwd']:.2f}x | {t['peak_mem_mb']:.0f} "
            f"| {c['peak_mem_mb']:.0f} | {c['peak_mem_mb'] / max(t['peak_mem_mb'], 1e-9):.3f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
