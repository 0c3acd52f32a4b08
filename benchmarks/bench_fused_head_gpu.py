"""GPU benchmark of the fused LM head + masked KL against materialized logits and against the
fused linear losses that exist: Liger-Kernel's fused linear cross-entropy, JSD and KL-div, and
Apple's Cut Cross-Entropy (CCE).

Not the same computation (read the rows with that in mind): our loss takes two sparse top-K
teachers (K = 64) and a mask from the student's argmax; Liger's JSD takes a dense teacher as a
second (hidden, head) pair and computes the teacher's logits too; Liger's KL-div takes a dense
(N, V) teacher distribution (an input, not counted in its memory); the cross-entropies take no
teacher at all (the floor for any fused head loss). Providers that are not installed, or fail,
get a row with their reason in ``note``.

Per (provider, N, V, d): one warm-up (compiles), then --repeats timed forward + backward
(CUDA events around the call; median and minimum), and the extra memory =
``torch.cuda.max_memory_allocated()`` during one call minus what was allocated before it
(inputs excluded, returned gradients included). Gradient w.r.t. the hidden states, and w.r.t.
the head weight with --weight-grad. bfloat16 inputs. Our fused and materialized rows also
carry ``max_rel_diff``: the largest difference of loss and dL/dh from the materialized
reference (triton on the (N, V) logits), relative to its largest magnitude.

    python benchmarks/bench_fused_head_gpu.py --out $OUT/fused_head_nvidia-h200.csv
    python benchmarks/bench_fused_head_gpu.py --smoke --device cpu     # plumbing, tiny, CPU
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

COLUMNS = ["date", "device", "provider", "N", "V", "d", "dtype", "weight_grad", "chunk_rows",
           "ms_median", "ms_min", "repeats", "extra_mb", "max_rel_diff", "note"]  # fmt: skip
PROVIDERS = ("materialized", "fused", "liger_flce", "liger_fljsd", "liger_flkl", "cce")
SHAPES = ((128_256, 2048), (262_144, 640), (262_144, 1152))  # Llama 3 1B, Gemma 3 270M / 1B


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from bench_common import cpu_name

    return cpu_name()


def make_inputs(n, v, d, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=g) * (3.0 / d**0.5)).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    stride = v // k

    def teacher():
        ids = torch.randint(0, stride, (n, k), generator=g) + torch.arange(k) * stride
        lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, 1) + torch.log(torch.tensor(0.9))
        return ids.to(device=device, dtype=torch.int32), lp.to(device)

    (i1, l1), (i2, l2) = teacher(), teacher()
    return h, w, y.to(device), i1, l1, i2, l2


def make_call(provider, inputs, *, weight_grad, chunk_rows, impl):
    """A closure running one forward + backward; returns (loss, dL/dh). Raises if unavailable."""
    h, w, y, i1, l1, i2, l2 = inputs
    wrt = [h, w] if weight_grad else [h]

    def grads(loss):
        return loss.detach(), torch.autograd.grad(loss, wrt)[0]

    if provider == "materialized":
        from muscle.losses import masked_kl

        return lambda: grads(masked_kl(h @ w.t(), y, i1, l1, i2, l2, impl=impl))
    if provider == "fused":
        from muscle.fused_head import fused_linear_masked_kl

        return lambda: grads(fused_linear_masked_kl(h, w, None, y, i1, l1, i2, l2, impl=impl,
                                                    chunk_rows=chunk_rows))  # fmt: skip
    if provider == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss()
        return lambda: grads(fn(w, h, y))
    if provider == "liger_fljsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=2.0)  # beta = 0: a KL, as ours
        th = torch.randn_like(h)  # the dense teacher's hidden states and head
        tw = w.detach().clone()
        return lambda: grads(fn(h, w, th, tw, y))
    if provider == "liger_flkl":
        from liger_kernel.transformers import LigerFusedLinearKLDivLoss

        fn = LigerFusedLinearKLDivLoss(temperature=2.0)
        with torch.no_grad():
            target = torch.softmax(torch.randn(h.shape[0], w.shape[0], device=h.device), 1).to(
                h.dtype
            )
        return lambda: grads(fn(h, w, target, y))
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda: grads(linear_cross_entropy(h, w, y))
    raise ValueError(provider)


def measure(call, device, repeats) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    call()  # warm-up: compile, autotune
    sync()
    extra = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = call()
        sync()
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        del out
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            sync()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "extra_mb": extra}


def rel_diff(a, b) -> float:
    (la, ga), (lb, gb) = a, b
    d_loss = (la.double() - lb.double()).abs().item() / max(lb.double().abs().item(), 1e-30)
    d_grad = (ga.double() - gb.double()).abs().max().item() / max(
        gb.double().abs().max().item(), 1e-30
    )
    return max(d_loss, d_grad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="CSV to append rows to")
    ap.add_argument("--N", default="4096,16384")
    ap.add_argument("--shapes", default=",".join(f"{v}x{d}" for v, d in SHAPES),
                    help="VxD pairs, comma-separated")  # fmt: skip
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument(
        "--chunk-rows", default="default,1024,4096", help="fused chunk rows: default or ints"
    )
    ap.add_argument("--weight-grad", default="0,1", help="0 (frozen head), 1 (trainable), both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (plumbing)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_fused_head_gpu: no CUDA device (use --device cpu --smoke)", file=sys.stderr)
        return 2
    impl = "triton" if device.type == "cuda" else "chunked"
    if args.smoke:
        ns, shapes, repeats = [64], [(1000, 32)], 1
        args.chunk_rows = "default,16"
    else:
        ns = [int(x) for x in args.N.split(",")]
        shapes = [tuple(int(p) for p in s.split("x")) for s in args.shapes.split(",")]
        repeats = args.repeats
    chunks = [None if c == "default" else int(c) for c in args.chunk_rows.split(",")]
    dev_name = device_name(device)
    date = dt.datetime.now().isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        with args.out.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def write(row):  # one row at a time: a run stopped by its time limit keeps what it measured
        with args.out.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(
                {k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}
            )

    for v, d in shapes:
        for n in ns:
            for wg in (int(x) for x in args.weight_grad.split(",")):
                inputs = make_inputs(n, v, d, 64, torch.bfloat16, device)
                inputs[0].requires_grad_(True)
                inputs[1].requires_grad_(bool(wg))
                ref = None
                for p in args.providers.split(","):
                    for c in chunks if p == "fused" else [None]:
                        row = {"date": date, "device": dev_name, "provider": p, "N": n, "V": v,
                               "d": d, "dtype": "bfloat16", "weight_grad": wg,
                               "chunk_rows": "" if p != "fused" else (c or "default"),
                               "repeats": repeats, "note": ""}  # fmt: skip
                        try:
                            call = make_call(p, inputs, weight_grad=wg, chunk_rows=c, impl=impl)
                            row.update(measure(call, device, repeats))
                            if p in ("materialized", "fused"):
                                got = call()
                                ref = got if p == "materialized" else ref
                                row["max_rel_diff"] = "" if ref is None else rel_diff(got, ref)
                        except Exception as e:  # a missing or failing baseline is a row, too
                            row["note"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        write(row)
                        print(" ".join(f"{k}={row.get(k, '')}" for k in (
                            "provider", "N", "V", "d", "weight_grad", "chunk_rows", "ms_median",
                            "extra_mb", "max_rel_diff", "note")), flush=True)  # fmt: skip
                del inputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
