#!/usr/bin/env python
"""Static profile of the fused masked-KL kernel as compiled for a GPU, on a machine with none.

Triton compiles to a cubin without a device (ptxas and cuobjdump ship in its wheel). For each
kernel config (BLOCK_V x num_warps) this script compiles ``_masked_kl_fwd_kernel`` for the
chosen architecture (default sm_90: H100 / H200) and reads off the cubin:

  regs, stack          registers per thread and stack bytes (cuobjdump -res-usage)
  spill_st, spill_ld   local-memory stores / loads in the SASS (STL / LDL): register spills
  ctas_per_sm          resident CTAs per SM allowed by registers and the 64-warp limit
  warps_per_sm         ctas_per_sm * num_warps: what is left to hide memory latency
  ex2, bar, ldg, stg   static counts of MUFU.EX2 (exp), BAR.SYNC (CTA barriers, one or more
                       per block reduction), global loads and stores in the SASS

These are instruction counts in the code, not executed counts or times: they compare configs
and kernel versions (--module), they do not replace a GPU run (benchmarks/run_gpu.sh).
Rows go to benchmarks/results/kernel_sass_sm<arch>.csv.

Usage:
  python benchmarks/kernel_sass.py                      # default configs, current kernel
  python benchmarks/kernel_sass.py --module old.py --label before   # another kernel version
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = "2048x4,4096x8,8192x8,8192x16,16384x8,16384x16,32768x16,32768x32"
FIELDS = [
    "date", "label", "arch", "config", "dtype", "mask", "stats", "prefetch", "reverse", "regs", "stack", "spill_st",
    "spill_ld", "ctas_per_sm", "warps_per_sm", "ex2", "bar", "ldg", "stg", "compile_s",
]  # fmt: skip

# Triton signature types of the kernel's runtime arguments, by name.
_ARG_TYPES = {
    "z_stride": "i64", "g_stride": "i64", "y_ptr": "*i64", "mask_ptr": "*i8",
    "ids1_ptr": "*i32", "lp1_ptr": "*fp32", "ids1_stride": "i64", "K1": "i32",
    "ids2_ptr": "*i32", "lp2_ptr": "*fp32", "ids2_stride": "i64", "K2": "i32",
    "kl_out_ptr": "*fp32", "ce_out_ptr": "*fp32", "m_out_ptr": "*i8", "V": "i32",
    "ignore_index": "i32", "inv_T": "fp32", "n_valid_ptr": "*i64", "kl_w": "fp32",
    "ce_w": "fp32", "tail_exact_below": "fp32",
    "tids1_ptr": "*i32", "tlw1_ptr": "*fp32", "neg1_ptr": "*fp32", "tids1_stride": "i64",
    "M1": "i32", "tids2_ptr": "*i32", "tlw2_ptr": "*fp32", "neg2_ptr": "*fp32",
    "tids2_stride": "i64", "M2": "i32",
}  # fmt: skip
_SM_REGS, _SM_WARPS, _SM_CTAS = 65536, 64, 32  # per SM on sm_80 .. sm_90


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="BLOCK_VxNUM_WARPS,...")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--K", type=int, default=64, help="teacher top-K (sets BLOCK_K)")
    ap.add_argument("--V", type=int, default=128256, help="vocabulary (sets BLOCK_C)")
    ap.add_argument("--mask", default="v2c_wrong", choices=["v2c_wrong", "tensor"])
    ap.add_argument("--stats", action="store_true", help="CE statistic on (the trainer's call)")
    ap.add_argument("--tail-m", type=int, default=0,
                    help="sampled tail draws per teacher (cache format 2); 0 = format 1")  # fmt: skip
    ap.add_argument("--prefetch", action="store_true", help="the sweep-1 prefetch variant")
    ap.add_argument("--reverse", action="store_true", help="the backwards sweep-2 variant")
    ap.add_argument("--module", default=None, help="kernel file to load instead of muscle's")
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def load_kernel(path: str | None):
    if path is None:
        from muscle.kernels.masked_kl import _masked_kl_fwd_kernel

        return _masked_kl_fwd_kernel
    spec = importlib.util.spec_from_file_location("_masked_kl_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._masked_kl_fwd_kernel


def compile_config(kernel, block_v, num_warps, args):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from muscle.kernels.masked_kl import _pick_blocks

    # the teacher and exact-tail blocks as the launcher picks them for this K and vocabulary
    _, block_k, block_c, _ = _pick_blocks(args.V, args.K)
    constexprs = {
        "MASK_ARGMAX": args.mask == "v2c_wrong",
        "COMPUTE_CE": args.stats,
        "CE_POW": 2,  # T = 2, the default
        "CE_GRAD": False,
        "COMPUTE_GRAD": True,
        "HAS_TAIL": args.tail_m > 0,
        "EVICT_SWEEP1": "evict_last",  # the launcher's default (MUSCLE_KL_EVICT unset)
        "EVICT_SWEEP2": "evict_first",
        "PREFETCH": args.prefetch,
        "REVERSE_SWEEP2": args.reverse,
        "BLOCK_V": block_v,
        "BLOCK_K": block_k,
        "BLOCK_C": block_c,
        "BLOCK_M": max(2, 1 << max(0, args.tail_m - 1).bit_length()),
    }
    sig, consts = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in ("z_ptr", "g_ptr"):
            sig[name] = f"*{args.dtype}"
        elif name in _ARG_TYPES:
            sig[name] = _ARG_TYPES[name]
        elif name in constexprs:
            sig[name] = "constexpr"
            consts[(i,)] = constexprs[name]
        else:
            raise SystemExit(f"kernel argument {name!r} unknown to this script: add its type")
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    t0 = time.perf_counter()
    target = GPUTarget("cuda", args.arch, 32)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
    return compiled, time.perf_counter() - t0


def cubin_stats(cubin: bytes) -> dict:
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run(
            [tools / "cuobjdump", "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tools / "cuobjdump", "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output: {res[:200]}")
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    count = lambda prefix: sum(op.startswith(prefix) for op in ops)  # noqa: E731
    return {
        "regs": int(m.group(1)),
        "stack": int(m.group(2)),
        "spill_st": count("STL"),
        "spill_ld": count("LDL"),
        "ex2": count("MUFU.EX2"),
        "bar": count("BAR.SYNC"),
        "ldg": count("LDG"),
        "stg": count("STG"),
    }


def occupancy(regs: int, num_warps: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp, 256-register units)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = _SM_REGS // (per_warp * num_warps)
    return max(0, min(by_regs, _SM_WARPS // num_warps, _SM_CTAS))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences a warning
    warnings.filterwarnings("ignore", category=UserWarning, module="triton")
    kernel = load_kernel(args.module)
    out = Path(args.out) if args.out else RESULTS / f"kernel_sass_sm{args.arch}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{'config':>10} {'regs':>4} {'spills':>7} {'CTA/SM':>6} {'warps':>5} {'ex2':>4} "
          f"{'bar':>4}  ({args.label}, sm_{args.arch}, {args.dtype}, {args.mask})")  # fmt: skip
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for item in args.configs.split(","):
            m = re.fullmatch(r"(\d+)x(\d+)", item.strip())
            if not m:
                raise SystemExit(f"bad config {item!r}: expected BLOCK_VxNUM_WARPS")
            block_v, num_warps = int(m.group(1)), int(m.group(2))
            compiled, secs = compile_config(kernel, block_v, num_warps, args)
            st = cubin_stats(compiled.asm["cubin"])
            ctas = occupancy(st["regs"], num_warps)
            row = {
                "date": date, "label": args.label, "arch": args.arch, "config": item.strip(),
                "dtype": args.dtype, "mask": args.mask, "stats": int(args.stats),
                "prefetch": int(args.prefetch), "reverse": int(args.reverse), **st,
                "ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps,
                "compile_s": f"{secs:.1f}",
            }  # fmt: skip
            w.writerow(row)
            f.flush()
            spills = f"{st['spill_st']}/{st['spill_ld']}"
            print(f"{item:>10} {st['regs']:>4} {spills:>7} {ctas:>6} {ctas * num_warps:>5} "
                  f"{st['ex2']:>4} {st['bar']:>4}")  # fmt: skip
    print(f"rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
