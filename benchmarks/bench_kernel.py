#!/usr/bin/env python
"""Micro-benchmark of the masked top-K KL loss: forward + backward time, peak memory, bandwidth.

Providers:
  torch    muscle.losses.masked_kl(..., impl="torch")   dense autograd reference
  chunked  muscle.losses.masked_kl(..., impl="chunked") chunked closed-form torch path
  triton   muscle.kernels.masked_kl_triton              the fused kernel (in-place gradient)
  liger    liger_kernel LigerKLDIVLoss on a DENSE (N, V) teacher (optional dependency); fed
           precomputed student log-probs, as Liger's own benchmark does, so its time excludes
           the student's log_softmax

A provider whose import fails is skipped with a message. Rows are appended to
benchmarks/results/kernel_<device-slug>.csv: date, device, provider, N, V, K, dtype, ms,
peak_mem_mb, gbps, pct_peak_bw ("oom" / "error" in ms when a run failed).

Measures:
  ms           median over --reps runs of forward + backward (CUDA events on GPU, perf_counter
               on CPU); the logits are re-cloned outside the timed region before each run
               (the in-place kernel overwrites them)
  timing       how a GPU run is started (CPU runs: "wall"):
               "queued" (default): the GPU first spins ~10 ms (torch.cuda._sleep) so that the
                 CPU queues the whole forward + backward before the start event fires: the
                 time is the GPU's, as in a training step where the CPU runs ahead; a host
                 sync inside the provider still shows, since it waits for the queue to drain
               "cold" (--timing cold): synchronize, then start: the time also holds the
                 Python / launch overhead of one isolated call (rows before this column
                 existed were measured this way)
  peak_mem_mb  GPU: torch.cuda.max_memory_allocated() during the run minus the memory allocated
               just before it (inputs and their clone excluded). CPU: the peak increase of the
               process RSS over its value just before the run, sampled every ~1 ms by a thread
               (psutil); a lower bound, and it misses memory reused from the allocator's cache
  gbps         2 * N * V * bytes(dtype) / time: one read + one write of the (N, V) logits, the
               traffic a fused kernel cannot avoid; the same byte count for every provider
  pct_peak_bw  gbps / the device's peak memory bandwidth (table below; blank if unknown)

Tuning (GPU): --tune 8192x8e1,16384x8e0p1,... benchmarks the triton provider once per kernel
config BLOCK_VxNUM_WARPS, e1/e0 = L2 eviction hints on/off, optional p1/p0 = sweep-1 prefetch
on/off, optional r1/r0 = sweep 2 backwards (the MUSCLE_KL_BLOCK_V, MUSCLE_KL_NUM_WARPS,
MUSCLE_KL_EVICT, MUSCLE_KL_PREFETCH and MUSCLE_KL_REVERSE overrides of
muscle.kernels.masked_kl); rows name the provider "triton[8192x8e1]".
--tune default: the grid below (DEFAULT_TUNE).

Usage:
  python benchmarks/bench_kernel.py                 # full grid (GPU), bf16
  python benchmarks/bench_kernel.py --tune default --N 16384 --V 32000,128256
  python benchmarks/bench_kernel.py --quick         # small CPU run (triton skipped on CPU)
  python benchmarks/bench_kernel.py --quick --interpret   # also triton under the interpreter
  python benchmarks/bench_kernel.py --plot out.png
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from unittest import mock

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "date",
    "device",
    "provider",
    "N",
    "V",
    "K",
    "dtype",
    "ms",
    "peak_mem_mb",
    "gbps",
    "pct_peak_bw",
    "timing",
]
DEFAULT_TUNE = (
    "4096x8e1,8192x8e1,8192x16e1,16384x8e1,16384x16e1,32768x32e1,16384x8e0,"
    "8192x8e1p1,16384x8e1p1,8192x16e1p1,16384x8e1p0r1,16384x8e1p1r1,8192x16e1p1r1"
)
_TUNE_ENV = (
    "MUSCLE_KL_BLOCK_V",
    "MUSCLE_KL_NUM_WARPS",
    "MUSCLE_KL_EVICT",
    "MUSCLE_KL_PREFETCH",
    "MUSCLE_KL_REVERSE",
)
_PRELUDE_CYCLES = 20_000_000  # GPU spin before the start event: ~10 ms at ~2 GHz

# Vendor peak memory bandwidth, GB/s, matched in order against torch.cuda.get_device_name().
PEAK_BW = [
    (r"GH200", 4000.0),
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100", 3350.0),  # SXM5 / "H100 80GB HBM3"
    (r"H800", 3350.0),
    (r"B200", 8000.0),
    (r"A100.*80GB", 2039.0),
    (r"A100", 1555.0),
    (r"L40S", 864.0),
    (r"L4\b", 300.0),
    (r"A10G", 600.0),
    (r"RTX 4090", 1008.0),
    (r"V100", 900.0),
    (r"T4\b", 320.0),
]


def peak_bandwidth(name: str) -> float | None:
    for pat, bw in PEAK_BW:
        if re.search(pat, name, flags=re.IGNORECASE):
            return bw
    return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--providers", default="torch,chunked,triton,liger")
    ap.add_argument("--V", default="32000,49152,128256", help="comma-separated vocab sizes")
    ap.add_argument("--N", default="1024,4096,16384", help="comma-separated token counts")
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--mask", default="v2c_wrong")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default 5 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--timing",
        default="queued",
        choices=["queued", "cold"],
        help="GPU: queue the work behind a GPU spin (default) or start from an idle GPU",
    )
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="small CPU-sized grid")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="on CPU, run triton under TRITON_INTERPRET=1 (a correctness run, not a speed one)",
    )
    ap.add_argument(
        "--tune",
        default=None,
        help='kernel configs "BVxNWe1,..." (or "default") to compare; implies triton only',
    )
    ap.add_argument("--out", default=None, help="CSV path (default results/kernel_<dev>.csv)")
    ap.add_argument("--plot", default=None, help="write a plot of this run's rows (PNG)")
    ap.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="skip combos whose (N, V) logits exceed this many bytes",
    )
    return ap.parse_args(argv)


class _RssSampler:
    """Peak RSS increase of this process while active (CPU memory measure)."""

    def __init__(self, interval=0.001):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def make_inputs(N, V, K, dtype, device, torch):
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(N, V, generator=g, device=device, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    ar = torch.arange(K, device=device)

    def teacher(stride):
        # unique ids per row: an offset plus a fixed stride (K * stride < V)
        ids = (torch.randint(0, V, (N, 1), generator=g, device=device) + ar * stride) % V
        lp = torch.log_softmax(torch.randn(N, K, generator=g, device=device), -1) + (-0.1)
        return ids, lp  # sum p = e^-0.1: a tail of ~10%

    stride = max(1, min(97, (V - 1) // K))
    i1, l1 = teacher(stride)
    i2, l2 = teacher(max(1, stride - 1))
    return z, labels, i1, l1, i2, l2


def build_provider(name, args, torch):
    """-> callable(z_leaf, labels, i1, l1, i2, l2, extra) -> loss, or raises ImportError."""
    T, mask = args.temperature, args.mask
    if name in ("torch", "chunked"):
        from muscle.losses import masked_kl

        def run(z, y, i1, l1, i2, l2, extra):
            return masked_kl(z, y, i1, l1, i2, l2, temperature=T, mask=mask, impl=name)

        return run
    if name == "triton":
        from muscle.kernels import masked_kl_triton, triton_available

        if not triton_available():
            raise ImportError("triton cannot run here (no CUDA, TRITON_INTERPRET unset)")

        def run(z, y, i1, l1, i2, l2, extra):
            return masked_kl_triton(z, y, i1, l1, i2, l2, temperature=T, mask=mask)

        return run
    if name == "liger":
        from liger_kernel.transformers import LigerKLDIVLoss

        loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def run(z, y, i1, l1, i2, l2, extra):
            return loss_fn(z, extra["dense_teacher"])

        return run
    raise ValueError(f"unknown provider {name!r}")


def is_oom(exc: BaseException, torch) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return "out of memory" in str(exc).lower()


def bench_one(name, fn, N, V, K, dtype, device, args, torch):
    """-> (ms or 'oom'/'error', peak_mem_mb or '')"""
    cuda = device == "cuda"
    inputs = make_inputs(N, V, K, dtype, device, torch)
    z0, y, i1, l1, i2, l2 = inputs
    extra = {}
    if name == "liger":
        # Liger's KL takes log-probs: a dense teacher and the student's log-probs, both (N, V)
        extra["dense_teacher"] = torch.log_softmax(torch.randn_like(z0), -1)
        z0 = torch.log_softmax(z0.float(), -1).to(dtype)
    times, peaks = [], []
    reps = args.reps or (5 if cuda else 3)
    for i in range(args.warmup + reps):
        z = z0.clone().requires_grad_(True)
        if cuda:
            torch.cuda.synchronize()
            gc.collect()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if args.timing == "queued":
                torch.cuda._sleep(_PRELUDE_CYCLES)  # the CPU queues the run meanwhile
            start.record()
            loss = fn(z, y, i1, l1, i2, l2, extra)
            loss.backward()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with _RssSampler() as s:
                t0 = time.perf_counter()
                loss = fn(z, y, i1, l1, i2, l2, extra)
                loss.backward()
                ms = (time.perf_counter() - t0) * 1e3
            peak = s.mb
        del loss, z
        if i >= args.warmup:
            times.append(ms)
            peaks.append(peak)
    return statistics.median(times), max(peaks)


def device_name(device, torch) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def main(argv=None) -> int:
    args = parse_args(argv)
    want_cuda = args.device in (None, "cuda")
    if args.interpret:
        # must be set before any @triton.jit module is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 on a CUDA run: unset it for timings", file=sys.stderr)
        return 2
    del want_cuda
    if args.quick:
        args.V = "32000" if args.V == "32000,49152,128256" else args.V
        args.N = "256" if args.N == "1024,4096,16384" else args.N
    Vs = [int(v) for v in args.V.split(",")]
    Ns = [int(n) for n in args.N.split(",")]
    dtype = getattr(torch, args.dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if device == "cpu" and "triton" in providers and not args.interpret:
        print("skip triton: on CPU it only runs under the interpreter (pass --interpret)")
        providers.remove("triton")

    configs = parse_tune(args.tune) if args.tune else {}
    if configs:
        providers = ["triton"]
    fns = {}
    for p in providers:
        try:
            fns[p] = build_provider(p, args, torch)
        except Exception as e:  # ImportError, or a missing function in a half-built tree
            print(f"skip {p}: {type(e).__name__}: {e}")
    dev_name = device_name(device, torch)
    peak_bw = peak_bandwidth(dev_name) if device == "cuda" else None
    out = Path(args.out) if args.out else RESULTS / f"kernel_{slug(dev_name)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    print(f"device: {dev_name}  peak bw: {peak_bw or '?'} GB/s  dtype: {args.dtype}  -> {out}")
    t_start = time.perf_counter()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for V in Vs:
            for N in Ns:
                if args.max_bytes and N * V * esize > args.max_bytes:
                    print(f"skip N={N} V={V}: logits over --max-bytes")
                    continue
                for p, fn, env in _variants(fns, configs):
                    try:
                        with mock.patch.dict(os.environ, env):
                            ms, mem = bench_one(p, fn, N, V, args.K, dtype, device, args, torch)
                    except Exception as e:
                        ms = "oom" if is_oom(e, torch) else "error"
                        mem = ""
                        print(f"  {p:8s} N={N:6d} V={V:6d}: {ms} ({type(e).__name__}: {e})"[:300])
                    finally:
                        gc.collect()
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    gbps = pct = ""
                    if isinstance(ms, float):
                        gbps = 2.0 * N * V * esize / (ms * 1e-3) / 1e9
                        pct = 100.0 * gbps / peak_bw if peak_bw else ""
                        print(
                            f"  {p:8s} N={N:6d} V={V:6d}: {ms:9.3f} ms  {mem:9.1f} MB"
                            f"  {gbps:8.1f} GB/s" + (f"  {pct:5.1f}% peak" if pct else "")
                        )
                    row = {
                        "date": date,
                        "device": dev_name,
                        "provider": p,
                        "N": N,
                        "V": V,
                        "K": args.K,
                        "dtype": args.dtype,
                        "ms": f"{ms:.4f}" if isinstance(ms, float) else ms,
                        "peak_mem_mb": f"{mem:.1f}" if isinstance(mem, float) else mem,
                        "gbps": f"{gbps:.1f}" if isinstance(gbps, float) else gbps,
                        "pct_peak_bw": f"{pct:.1f}" if isinstance(pct, float) else pct,
                        "timing": args.timing if device == "cuda" else "wall",
                    }
                    w.writerow(row)
                    f.flush()
                    rows.append(row)
    print(f"done in {time.perf_counter() - t_start:.1f} s; {len(rows)} rows -> {out}")
    if args.plot and rows:
        plot(rows, args.plot, dev_name, f"{args.dtype}, {rows[0]['timing']} timing")
    return 0


def parse_tune(spec: str) -> dict[str, dict[str, str]]:
    """ "8192x8e1,..." -> {"8192x8e1": {env overrides}}."""
    out = {}
    for item in (DEFAULT_TUNE if spec == "default" else spec).split(","):
        m = re.fullmatch(r"(\d+)x(\d+)e([01])(?:p([01]))?(?:r([01]))?", item.strip())
        if not m:
            raise SystemExit(
                f"bad --tune item {item!r}: expected BLOCK_VxNUM_WARPSe0|e1[p0|p1][r0|r1]"
            )
        bv, nw, ev, pf, rv = m.groups()
        out[item.strip()] = dict(zip(_TUNE_ENV, (bv, nw, ev, pf or "0", rv or "0"), strict=True))
    return out


def _variants(fns, configs):
    """(provider label, fn, env overrides) for each run of one (N, V) point."""
    if not configs:
        return [(p, fn, {}) for p, fn in fns.items()]
    return [(f"triton[{c}]", fns["triton"], env) for c, env in configs.items() if "triton" in fns]


def plot(rows, path, dev_name, dtype):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Vs = sorted({int(r["V"]) for r in rows})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, len(Vs), figsize=(4.5 * len(Vs), 7), squeeze=False)
    for j, V in enumerate(Vs):
        for p in provs:
            pts = [
                (int(r["N"]), float(r["ms"]), float(r["peak_mem_mb"] or "nan"))
                for r in rows
                if int(r["V"]) == V and r["provider"] == p and r["ms"] not in ("oom", "error")
            ]
            if not pts:
                continue
            pts.sort()
            n, ms, mem = zip(*pts, strict=True)
            axes[0][j].plot(n, ms, marker="o", label=p)
            axes[1][j].plot(n, mem, marker="o", label=p)
        for i, lab in enumerate(("fwd+bwd ms", "peak extra MB")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(lab)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].set_title(f"V={V}")
    axes[0][0].legend()
    fig.suptitle(f"masked top-K KL, {dev_name}, {dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot -> {path}")


if __name__ == "__main__":
    sys.exit(main())
