"""Smoke of the real training paths on one device, with tiny models: every step is muscle's own
CLI in a subprocess, as a user runs it. Made for a lent GPU (``--device cuda``); runs the same
steps on a CPU (``--device cpu``) to check the script itself.

Steps (each a CSV row: step, exit code, seconds, the last line it printed):
  task_v2     muscle-train: v2's task adapter on a tiny random Llama (2 optimizer steps);
  cache_v1/2  muscle-cache build in bfloat16 (v1 = base m1, v2 = base m2 + its adapter);
  compat      muscle-train --cache: compatibility training from the cache (3 steps);
  online      muscle-train --online: the same with live teachers, bfloat16 (3 steps);
  deepspeed   torchrun --nproc_per_node 1 muscle-train --cache --deepspeed (ZeRO-2, 3 steps);
  tail_*      a format-2 cache (--tail-samples 4) and 2 steps of training from it.
A step that fails does not stop the others; the exit status is 1 if any failed, 2 on bad usage.

    python benchmarks/gpu_smoke.py --device cuda --out $OUT/smoke_nvidia-h200.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny.py: tiny models and tokenizer from config
COLUMNS = ["date", "device", "step", "rc", "seconds", "note"]
DATA = ["--data-dir", str(REPO / "muscle" / "embedded" / "data"), "--max-examples", "32",
        "--max-length", "96"]  # fmt: skip
TRAIN = ["--epochs", "1", "--batch-size", "4", "--grad-accum", "1", "--warmup", "1", "--lr",
         "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--checkpoint-every", "100"]  # fmt: skip
ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    from bench_common import cpu_name

    return cpu_name()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True, help="CSV to append the step rows to")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--skip", default="", help="steps to skip, comma-separated")
    ap.add_argument("--step-timeout", type=int, default=120)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_smoke: no CUDA device (use --device cpu)", file=sys.stderr)
            return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="muscle-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    from tiny import make_model_dir

    m1 = make_model_dir(work / "m1", seed=1, init_std=0.2)
    m2 = make_model_dir(work / "m2", seed=2, init_std=0.2)
    dev = ["--device", args.device]
    py = [sys.executable, "-m"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if not args.device.startswith("cuda"):
        env.setdefault("DS_ACCELERATOR", "cpu")
    (work / "ds.json").write_text(json.dumps(ZERO2))
    cfg = work / "update.toml"
    cfg.write_text(
        f'task = "piqa"\n[models.v1]\nbase = "{m1}"\n'
        f'[models.v2]\nbase = "{m2}"\nadapter = "{work / "v2"}"\n'
    )
    cache_common = ["--config", str(cfg), *DATA, "--top-k", "16", "--dtype", "bfloat16",
                    "--batch-size", "4", "--quiet", *dev]  # fmt: skip
    train_short = [*TRAIN, "--max-steps", "3", *dev]
    steps = [
        ("task_v2", [*py, "muscle.cli.train", "--task", "piqa", "--base", str(m2), "--out",
                     str(work / "v2"), *DATA, *TRAIN, "--max-steps", "2", *dev]),
        ("cache_v1", [*py, "muscle.cli.cache", "build", "--model", "v1", "--out",
                      str(work / "cache"), *cache_common]),
        ("cache_v2", [*py, "muscle.cli.cache", "build", "--model", "v2", "--out",
                      str(work / "cache"), *cache_common]),
        ("compat", [*py, "muscle.cli.train", "--cache", str(work / "cache"), "--out",
                    str(work / "compat"), *train_short]),
        ("online", [*py, "muscle.cli.train", "--online", "--config", str(cfg), "--task", "piqa",
                    "--out", str(work / "online"), "--dtype", "bfloat16", "--top-k", "16",
                    *DATA, *train_short]),
        ("deepspeed", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                       "--master_port", "29561", "-m", "muscle.cli.train", "--cache",
                       str(work / "cache"), "--out", str(work / "ds"), "--deepspeed",
                       str(work / "ds.json"), *train_short]),
        ("tail_cache_v1", [*py, "muscle.cli.cache", "build", "--model", "v1", "--out",
                           str(work / "tcache"), "--tail-samples", "4", *cache_common]),
        ("tail_cache_v2", [*py, "muscle.cli.cache", "build", "--model", "v2", "--out",
                           str(work / "tcache"), "--tail-samples", "4", *cache_common]),
        ("tail_compat", [*py, "muscle.cli.train", "--cache", str(work / "tcache"), "--out",
                         str(work / "tcompat"), *TRAIN, "--max-steps", "2", *dev]),
    ]  # fmt: skip
    skip = {s for s in args.skip.split(",") if s}
    date = dt.datetime.now().isoformat(timespec="seconds")
    name = device_name(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        with args.out.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()
    failed = 0
    for step, cmd in steps:
        if step in skip:
            continue
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=args.step_timeout)  # fmt: skip
            rc, text = r.returncode, (r.stdout + r.stderr).strip()
            # the command's own last word: stdout's last line (the CLI's summary) when it
            # succeeded, stderr's (the error) when it did not; progress bars are in stderr
            tail = (r.stdout if rc == 0 and r.stdout.strip() else r.stderr).strip()
        except subprocess.TimeoutExpired:
            rc, text = 124, f"timed out after {args.step_timeout}s"
            tail = text
        except KeyboardInterrupt:  # the caller's time limit (timeout --signal=INT): stop here
            rc, text = 130, "interrupted (the script's time limit)"
            tail = text
        secs = time.perf_counter() - t0
        last = tail.splitlines()[-1][:300] if tail else ""
        failed += rc != 0
        with args.out.open("a", newline="") as f:  # row by row: an interrupted run keeps them
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({
                "date": date, "device": name, "step": step, "rc": rc,
                "seconds": round(secs, 1), "note": last,
            })  # fmt: skip
        print(f"[smoke] {step}: rc {rc}, {secs:.1f}s: {last}", flush=True)
        if rc != 0:  # the whole output beside the CSV, so that it comes back with it
            log = args.out.parent / f"smoke_{step}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(text)
            print(f"[smoke] {step} output in {log}", flush=True)
        if rc == 130:
            return 1
    if not failed and args.work is None:
        shutil.rmtree(work, ignore_errors=True)  # our own temp dir; kept when a step failed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
