"""CPU benchmark of the fused LM head + masked KL (muscle.fused_head) against the path it
replaces: materialized logits h @ W^T, then ``masked_kl`` (impl="chunked") on them.

Both providers compute the same loss and the gradient w.r.t. the hidden states h (N, d) (and
w.r.t. the head weight W (V, d) with --weight-grad: a tied or trainable head); the head has no
bias (SmolLM2, Gemma 3). Shapes: V = 49,152 with d = 576 (SmolLM2) and V = 262,144 with
d = 640 (Gemma 3 270M); K = 64 teachers' ids; T = 2; mask "v2c_wrong"; 10% ignored rows.

Time: one subprocess per shape runs one warm-up of each provider, then --repeats rounds of
A, B (interleaved, so that a change in the shared machine's load hits both); the median and
the minimum of each are reported. Memory: a fresh subprocess per (provider, shape) resets
the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads VmRSS once its
inputs exist, runs ONE forward + backward and reads VmHWM: peak_extra_mb = VmHWM - baseline,
every byte the call made resident at its high point (the materialized logits and their
gradient for the reference; the chunk buffers for the fused path; the returned gradients for
both). tracemalloc cannot see torch's allocations and torch's CPU allocator keeps no peak
statistics, hence RSS. Each row carries the 1-minute load average when it was measured.

    nice -n 5 .venv/bin/python benchmarks/bench_fused_head.py            # the README table
    .venv/bin/python benchmarks/bench_fused_head.py --quick               # a small smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV_PATH = HERE / "results" / "fused_head_cpu.csv"
COLUMNS = ["date", "machine", "load1", "provider", "N", "V", "d", "K", "dtype", "chunk_rows",
           "weight_grad", "ms_median", "ms_min", "repeats", "peak_extra_mb"]  # fmt: skip
PROVIDERS = ("materialized", "fused")
MODELS = {49_152: 576, 262_144: 640}  # V -> d: SmolLM2, Gemma 3 270M


def machine() -> str:
    import torch
    from bench_common import cpu_name

    return f"{cpu_name()} / {os.cpu_count()} cpus / {torch.get_num_threads()} threads"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------------------------
# child processes


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: VmHWM := VmRSS
        f.write("5")


def make_inputs(n: int, v: int, d: int, k: int, dtype_name: str, seed: int = 0):
    """h (N, d), W (V, d), labels (N,), two teachers (N, K): no (N, V) temporaries."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * (3.0 / d**0.5)).to(dtype)  # logits of std ~3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    stride = v // k

    def teacher():  # distinct ids per row: one per stride-wide slot; 90% of the mass on them
        ids = (torch.randint(0, stride, (n, k), generator=g) + torch.arange(k) * stride).int()
        lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, 1) + torch.log(torch.tensor(0.9))
        return ids, lp

    (i1, l1), (i2, l2) = teacher(), teacher()
    return h, w, labels, i1, l1, i2, l2


def make_step(provider: str, inputs, chunk_rows: int | None, weight_grad: bool):
    import torch

    from muscle.fused_head import fused_linear_masked_kl
    from muscle.losses import masked_kl

    h, w, y, i1, l1, i2, l2 = inputs
    h.requires_grad_(True)
    w.requires_grad_(weight_grad)
    wrt = [h, w] if weight_grad else [h]

    def materialized():
        z = h @ w.t()  # (N, V), as lm_head
        loss = masked_kl(z, y, i1, l1, i2, l2, temperature=2.0, impl="chunked")
        return torch.autograd.grad(loss, wrt)

    def fused():
        loss = fused_linear_masked_kl(h, w, None, y, i1, l1, i2, l2, temperature=2.0,
                                      impl="chunked", chunk_rows=chunk_rows)  # fmt: skip
        return torch.autograd.grad(loss, wrt)

    return materialized if provider == "materialized" else fused


def child_memory(provider, n, v, d, k, dtype, chunk_rows, weight_grad) -> dict:
    inputs = make_inputs(n, v, d, k, dtype)
    step = make_step(provider, inputs, chunk_rows, weight_grad)
    _reset_peak()
    base = _status_mb("VmRSS")
    out = step()
    peak = _status_mb("VmHWM")
    del out
    return {"peak_extra_mb": peak - base}


def child_time(n, v, d, k, dtype, chunk_rows, weight_grad, repeats) -> dict:
    inputs = make_inputs(n, v, d, k, dtype)
    steps = {p: make_step(p, inputs, chunk_rows, weight_grad) for p in PROVIDERS}
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for p in PROVIDERS:  # warm-up
        steps[p]()
    for _ in range(repeats):
        for p in PROVIDERS:  # interleaved A/B
            t0 = time.perf_counter()
            steps[p]()
            times[p].append((time.perf_counter() - t0) * 1e3)
    return {p: {"ms_median": statistics.median(t), "ms_min": min(t)} for p, t in times.items()}


# ----------------------------------------------------------------------------------------------
# parent


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_fused_head: child {' '.join(args)} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small shape, 2 repeats (a smoke)")
    ap.add_argument("--N", default="512,2048", help="rows (labelled tokens), comma-separated")
    ap.add_argument("--V", default="49152,262144", help="vocabularies (d from the model)")
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk-rows", type=int, default=None, help="fused chunk (default: library)")
    ap.add_argument("--weight-grad", action="store_true", help="also d loss / d W (tied head)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--child", choices=("memory", "time"))
    ap.add_argument("--provider", choices=PROVIDERS)
    args = ap.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        print("bench_fused_head: needs Linux /proc/self/clear_refs for peak RSS", file=sys.stderr)
        return 2

    if args.child:
        n, v = int(args.N), int(args.V)
        shape = (n, v, MODELS.get(v, 64), args.K, args.dtype, args.chunk_rows, args.weight_grad)
        if args.child == "memory":
            res = child_memory(args.provider, *shape)
        else:
            res = child_time(*shape, args.repeats)
        print(json.dumps(res))
        return 0

    if args.quick:
        shapes, repeats = [(256, 49_152)], 2
    else:
        shapes = [(int(n), int(v)) for v in args.V.split(",") for n in args.N.split(",")]
        repeats = args.repeats
    mach = machine()
    rows = []
    for n, v in shapes:
        common = ["--N", str(n), "--V", str(v), "--K", str(args.K), "--dtype", args.dtype]
        if args.chunk_rows:
            common += ["--chunk-rows", str(args.chunk_rows)]
        if args.weight_grad:
            common.append("--weight-grad")
        mem = {p: _run([*common, "--child", "memory", "--provider", p]) for p in PROVIDERS}
        tim = _run([*common, "--child", "time", "--repeats", str(repeats)])
        from muscle.fused_head import default_fused_chunk_rows

        chunk = args.chunk_rows or default_fused_chunk_rows(v, _torch_dtype(args.dtype), n)
        date = dt.datetime.now().isoformat(timespec="seconds")
        for p in PROVIDERS:
            rows.append({
                "date": date, "machine": mach, "load1": load1(), "provider": p, "N": n, "V": v,
                "d": MODELS.get(v, 64), "K": args.K, "dtype": args.dtype,
                "chunk_rows": chunk if p == "fused" else "", "weight_grad": int(args.weight_grad),
                "ms_median": round(tim[p]["ms_median"], 1), "ms_min": round(tim[p]["ms_min"], 1),
                "repeats": repeats, "peak_extra_mb": round(mem[p]["peak_extra_mb"], 1),
            })  # fmt: skip
            r = rows[-1]
            print(f"{p:12s} N={n} V={v}: {r['ms_median']:.0f} ms (min {r['ms_min']:.0f}), "
                  f"+{r['peak_extra_mb']:.0f} MB, load {r['load1']}", file=sys.stderr)  # fmt: skip
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(markdown(rows))
    return 0


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def markdown(rows: list[dict]) -> str:
    out = [
        "| N | V | d | chunk | materialized ms | fused ms | speed-up | materialized MB "
        "| fused MB | memory ratio | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["N"], r["V"], r["provider"]): r for r in rows}
    for n, v, p in by:
        if p != "fused":
            continue
        m, f = by[(n, v, "materialized")], by[(n, v, "fused")]
        out.append(
            f"| {n} | {v} | {f['d']} | {f['chunk_rows']} | {m['ms_median']:.0f} "
            f"| {f['ms_median']:.0f} | {m['ms_median'] / f['ms_median']:.2f}x "
            f"| {m['peak_extra_mb']:.0f} | {f['peak_extra_mb']:.0f} "
            f"| {f['peak_extra_mb'] / max(m['peak_extra_mb'], 1e-9):.3f} | {f['load1']} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
