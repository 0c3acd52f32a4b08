#!/usr/bin/env python
"""The MUSCLE reproduction on a real model pair, offline, on CPU (benchmarks/README.md,
"Reproduction (SmolLM2-135M)").

    nice -n 10 .venv/bin/python benchmarks/reproduce.py --tasks piqa,samsum [--ablation]

Stages (each skips finished work, so the script is re-runnable and resumable):
  bases   runs/repro/base-v1 (SmolLM2-135M-Instruct, dequantized GGUF) and base-v2 (v1 after
          continued pretraining): benchmarks/repro_bases.py
  per task T (update config runs/repro/T/update.toml names v1, v2, v2c):
          muscle-train --task T  (v1, v2 task adapters)
          muscle-eval predict    (v1, v2 on the test split, --limit)
          muscle-cache build     (v1, v2 teachers on train+validation)
          muscle-train --cache   (v2c, mask v2c_wrong)   -> muscle-eval predict v2c
          muscle-eval compare v1 v2 v2c
  ablation (PIQA, paper Table 6): v2c trained with each other mask from the same cache.

Writes benchmarks/results/reproduce.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "runs" / "repro"
LOGS = ROOT / "logs"
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results" / "reproduce.json"
# The full task data (DATA_FORMAT.md): set by main from --data-dir or $MUSCLE_DATA_DIR.
DATA_DIR = Path()

# ---- sizes (CPU budget: 2 shared cores). Paper: full train sets, r=128, 10 epochs. ----------
# fmt: off
LORA_R, LORA_ALPHA = 16, 32          # paper r=128 / alpha=156: too slow on CPU for the budget
DTYPE = "bfloat16"                    # AMX bf16 on this CPU; adapters stay float32 (PEFT)
TASKS = {
    # train_pool: --max-examples (80/20 split -> train/validation); test: --limit on the test split
    "piqa":      dict(train_pool=240, epochs=1, lr=5e-4, test=500, max_length=128, batch=8, accum=2,
                      compat_epochs=1, compat_lr=5e-4),
    "samsum":    dict(train_pool=100, epochs=1, lr=5e-4, test=50, max_length=320, batch=4, accum=2,
                      compat_epochs=1, compat_lr=5e-4, max_new_tokens=48),
    "hellaswag": dict(train_pool=600, epochs=1, lr=3e-4, test=500, max_length=256, batch=8, accum=2,
                      compat_epochs=1, compat_lr=3e-4),
    "gsm8k":     dict(train_pool=400, epochs=1, lr=3e-4, test=50, max_length=512, batch=4, accum=4,
                      compat_epochs=1, compat_lr=3e-4, max_new_tokens=160, num_fewshot=0),
}
# (mask, ce_weight): the paper trains the likelihood masks with an auxiliary cross-entropy
# ("CE + L_comp", Table 6) without giving lambda; 0.5 here.
ABLATION_MASKS = [("always_v1", 0.0), ("v1_correct", 0.0), ("token_ll", 0.5), ("seq_ll", 0.5)]
# fmt: on
WARMUP = 5


def data_dir(task: str) -> Path:
    return DATA_DIR


def run(stage: str, cmd: list[str], done: Path | None, times: dict) -> None:
    """Run one CLI step with its log in runs/repro/logs; record wall time when it did work."""
    if done is not None and done.exists():
        print(f"[skip] {stage}: {done.relative_to(REPO)} exists", flush=True)
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    lock = LOGS / f"{stage}.lock"
    if done is not None:
        try:  # another invocation (e.g. a parallel --masks run) may be on this stage
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            print(f"[wait] {stage}: locked by another run ({lock.relative_to(REPO)})", flush=True)
            while not done.exists():
                time.sleep(10)
            return
    try:
        _run(stage, cmd, times)
    finally:
        lock.unlink(missing_ok=True)


def _run(stage: str, cmd: list[str], times: dict) -> None:
    log = LOGS / f"{stage}.log"
    print(f"[run ] {stage}: {' '.join(cmd)}  (log {log.relative_to(REPO)})", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    dt = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{stage} failed (rc {rc}); see {log}")
    times[stage] = round(dt + times.get(stage, 0.0), 1)


def write_config(task: str) -> Path:
    tdir = ROOT / task
    tdir.mkdir(parents=True, exist_ok=True)
    cfg = tdir / "update.toml"
    cfg.write_text(
        f'task = "{task}"\n\n'
        f'[models.v1]\nbase = "../base-v1"\nadapter = "v1"\ndtype = "{DTYPE}"\n\n'
        f'[models.v2]\nbase = "../base-v2"\nadapter = "v2"\ndtype = "{DTYPE}"\n\n'
        f'[models.v2c]\nbase = "../base-v2"\nadapter = "v2c"\ndtype = "{DTYPE}"\n'
    )
    return cfg


def common_data(task: str, s: dict) -> list[str]:
    return [
        "--data-dir",
        str(data_dir(task)),
        "--max-examples",
        str(s["train_pool"]),
        "--max-length",
        str(s["max_length"]),
    ]


def predict(
    task: str, s: dict, cfg: Path, name: str, out: Path, times: dict, adapter: Path | None = None
) -> None:
    cmd = [
        str(BIN / "muscle-eval"),
        "predict",
        "--config",
        str(cfg),
        "--model",
        name.split("-")[0],
        "--out",
        str(out),
        "--data-dir",
        str(data_dir(task)),
        "--limit",
        str(s["test"]),
        "--device",
        "cpu",
        "--batch-size",
        "8",
    ]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    if "max_new_tokens" in s:
        cmd += ["--max-new-tokens", str(s["max_new_tokens"])]
    if "num_fewshot" in s:
        cmd += ["--num-fewshot", str(s["num_fewshot"])]
    run(f"{task}-predict-{name}", cmd, _finished(out), times)


def _finished(pred: Path) -> Path:
    # predict resumes by itself; the sidecar is written at the end -> use it as the done marker
    return Path(str(pred) + ".done")


def compat_train(
    task: str, s: dict, out: Path, mask: str, times: dict, stage: str, ce_weight: float = 0.0
) -> None:
    cmd = [
        str(BIN / "muscle-train"),
        "--cache",
        str(ROOT / "cache" / task),
        "--out",
        str(out),
        "--mask",
        mask,
        "--epochs",
        str(s["compat_epochs"]),
        "--lr",
        str(s["compat_lr"]),
        "--warmup",
        str(WARMUP),
        "--batch-size",
        str(s["batch"]),
        "--grad-accum",
        str(s["accum"]),
        "--temperature",
        "2",
        "--ce-weight",
        str(ce_weight),
        "--device",
        "cpu",
        "--dtype",
        DTYPE,
    ]
    run(stage, cmd, out / "adapter_model.safetensors", times)


def task_pipeline(task: str, times: dict, ablation: bool, masks: list[str] | None = None) -> dict:
    s = TASKS[task]
    cfg = write_config(task)
    tdir = ROOT / task
    for name in ("v1", "v2"):
        if name == "v2":
            ensure_bases(times)
        cmd = [
            str(BIN / "muscle-train"),
            "--task",
            task,
            "--config",
            str(cfg),
            "--model",
            name,
            "--out",
            str(tdir / name),
            *common_data(task, s),
            "--epochs",
            str(s["epochs"]),
            "--lr",
            str(s["lr"]),
            "--warmup",
            str(WARMUP),
            "--batch-size",
            str(s["batch"]),
            "--grad-accum",
            str(s["accum"]),
            "--lora-r",
            str(LORA_R),
            "--lora-alpha",
            str(LORA_ALPHA),
            "--device",
            "cpu",
            "--dtype",
            DTYPE,
        ]
        run(f"{task}-train-{name}", cmd, tdir / name / "adapter_model.safetensors", times)
        if name == "v1":
            (tdir / "pred").mkdir(exist_ok=True)
            _predict_marked(task, s, cfg, "v1", tdir / "pred" / "v1.jsonl", times)
    preds = tdir / "pred"
    preds.mkdir(exist_ok=True)
    for name in ("v2",):
        _predict_marked(task, s, cfg, name, preds / f"{name}.jsonl", times)
    cache = ROOT / "cache" / task
    for name in ("v1", "v2"):
        cmd = [
            str(BIN / "muscle-cache"),
            "build",
            "--config",
            str(cfg),
            "--model",
            name,
            "--out",
            str(cache),
            *common_data(task, s),
            "--device",
            "cpu",
            "--dtype",
            DTYPE,
            "--quiet",
            "--batch-size",
            "8",
        ]
        run(f"{task}-cache-{name}", cmd, cache / f".repro-{name}.done", times)
        (cache / f".repro-{name}.done").touch()
    out = {"sizes": s, "lora": {"r": LORA_R, "alpha": LORA_ALPHA}}
    if not masks:  # (--masks alone: only those ablation runs, e.g. in parallel with the main run)
        compat_train(task, s, tdir / "v2c", "v2c_wrong", times, f"{task}-train-v2c")
        _predict_marked(task, s, cfg, "v2c", preds / "v2c.jsonl", times)
        out["report"] = _compare(
            task,
            [preds / "v1.jsonl", preds / "v2.jsonl", preds / "v2c.jsonl"],
            tdir / "compare",
            times,
        )
    if ablation:
        out["ablation"] = {"v2c_wrong": out["report"]} if "report" in out else {}
        for mask, ce in ABLATION_MASKS:
            if masks and mask not in masks:
                continue
            adir = tdir / f"v2c-{mask}"
            compat_train(task, s, adir, mask, times, f"{task}-train-v2c-{mask}", ce)
            _predict_marked(
                task, s, cfg, f"v2c-{mask}", preds / f"v2c-{mask}.jsonl", times, adapter=adir
            )
            out["ablation"][mask] = _compare(
                task,
                [preds / "v1.jsonl", preds / "v2.jsonl", preds / f"v2c-{mask}.jsonl"],
                tdir / f"compare-{mask}",
                times,
            )
    return out


def _predict_marked(task, s, cfg, name, out: Path, times, adapter=None) -> None:
    predict(task, s, cfg, name, out, times, adapter)
    _finished(out).touch()


def _compare(task: str, files: list[Path], stem: Path, times: dict) -> dict:
    j = stem.with_suffix(".json")
    cmd = [
        str(BIN / "muscle-eval"),
        "compare",
        *map(str, files),
        "--json",
        str(j),
        "--markdown",
        str(stem.with_suffix(".md")),
    ]
    run(f"{task}-compare-{stem.name}", cmd, None, times)
    rep = json.loads(j.read_text())
    rep["paired"] = paired_flips(*files)
    return rep


def paired_flips(v1: Path, v2: Path, v2c: Path) -> dict:
    """How much of ΔNFR_c is noise: the regressions of v2 that v2c avoids vs the new ones it adds.

    Exact two-sided sign test on those discordant examples (H0: MUSCLE changes nothing). For a
    continuous score (ROUGE-1) the same on "D < 0" (smooth negative flips).
    """
    from math import comb

    def load(f):
        return {r["id"]: r for r in map(json.loads, open(f))}

    a, b, c = load(v1), load(v2), load(v2c)
    ids = sorted(set(a) & set(b) & set(c))

    def neg(old, new):
        if old.get("correct") is None:
            return new["score"] < old["score"]
        return bool(old["correct"]) and not new["correct"]

    r2 = {i for i in ids if neg(a[i], b[i])}
    rc = {i for i in ids if neg(a[i], c[i])}
    fixed, added = len(r2 - rc), len(rc - r2)
    k, n = min(fixed, added), fixed + added
    p = min(1.0, 2 * sum(comb(n, j) for j in range(k + 1)) / 2**n) if n else 1.0
    return {
        "n": len(ids),
        "neg_v2": len(r2),
        "neg_v2c": len(rc),
        "avoided": fixed,
        "added": added,
        "sign_test_p": p,
        "v2c_differs_from_v2": sum(c[i]["prediction"] != b[i]["prediction"] for i in ids),
    }


V2_STEPS = 16


def ensure_bases(times: dict) -> None:
    """base-v2 (continued pretraining); waits if another invocation is building it."""
    target = ROOT / "base-v2" / "model.safetensors"
    lock = ROOT / "base-v2.building"
    while lock.exists() and not target.exists():
        time.sleep(10)
    if target.exists():
        return
    lock.touch()
    try:
        run(
            "bases",
            [
                sys.executable,
                str(REPO / "benchmarks" / "repro_bases.py"),
                "--root",
                str(ROOT),
                "--steps",
                str(V2_STEPS),
            ],
            target,
            times,
        )
    finally:
        lock.unlink(missing_ok=True)


def train_walls(tdir: Path) -> dict:
    """Wall seconds of each training run, from its own record (start) to its adapter's mtime:
    also covers runs whose driver was restarted (their times are not in wall_seconds)."""
    from datetime import datetime

    out = {}
    for d in sorted(tdir.iterdir()):
        mr, ad = d / "muscle_run.json", d / "adapter_model.safetensors"
        if mr.is_file() and ad.is_file():
            started = datetime.fromisoformat(json.loads(mr.read_text())["started"]).timestamp()
            out[d.name] = round(ad.stat().st_mtime - started, 1)
    return out


def machine() -> dict:
    import torch
    from bench_common import cpu_name

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "note": "2 cores shared with other jobs; all runs under nice -n 10, so wall times are upper bounds",
    }


def main() -> None:
    if "--table" in sys.argv:  # print the table of the results file only
        print(markdown(json.loads(RESULTS.read_text())))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tasks", default="piqa,samsum", help="comma-separated: piqa,samsum,hellaswag,gsm8k"
    )
    ap.add_argument("--ablation", action="store_true", help="PIQA mask ablation (paper Table 6)")
    ap.add_argument(
        "--masks", default="", help="ablation masks to run (default: all), e.g. seq_ll,token_ll"
    )
    ap.add_argument(
        "--v2-steps", type=int, default=16, help="continued-pretraining steps for base-v2"
    )
    ap.add_argument(
        "--data-dir",
        default=os.environ.get("MUSCLE_DATA_DIR"),
        help="the full task data, laid out as DATA_FORMAT.md says (default: $MUSCLE_DATA_DIR)",
    )
    a = ap.parse_args()
    root = Path(a.data_dir) if a.data_dir else None
    missing = [
        t for t in a.tasks.split(",") if t.strip() and not (root and (root / t.strip()).is_dir())
    ]
    if missing:
        print(
            f"error: no task data for {', '.join(missing)} in {root or 'no folder'}: pass"
            " --data-dir (or set MUSCLE_DATA_DIR) to a folder laid out as DATA_FORMAT.md says",
            file=sys.stderr,
        )
        raise SystemExit(2)
    times: dict = {}
    t0 = time.time()
    global V2_STEPS, DATA_DIR
    V2_STEPS, DATA_DIR = a.v2_steps, root
    run(
        "bases-v1",
        [
            sys.executable,
            str(REPO / "benchmarks" / "repro_bases.py"),
            "--root",
            str(ROOT),
            "--only-v1",
        ],
        ROOT / "base-v1" / "model.safetensors",
        times,
    )
    for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
        res = task_pipeline(
            task,
            times,
            a.ablation and task == "piqa",
            [m for m in a.masks.split(",") if m] if a.masks else None,
        )
        # merge with what other (parallel) invocations wrote meanwhile
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"tasks": {}}
        results.setdefault("tasks", {})
        results["wall_seconds"] = {**results.get("wall_seconds", {}), **times}
        prev = results["tasks"].get(task, {})
        if "report" not in res and "report" in prev:
            res["report"] = prev["report"]
        if "ablation" in prev or "ablation" in res:
            res["ablation"] = {**prev.get("ablation", {}), **res.get("ablation", {})}
        results["tasks"][task] = res
        upd = ROOT / "base-v2" / "repro_update.json"
        if upd.is_file():
            results["update"] = {k: v for k, v in json.loads(upd.read_text()).items() if k != "log"}
        results["machine"] = machine()
        res["train_wall_seconds_from_files"] = train_walls(ROOT / task)
        results["threads"] = int(os.environ.get("OMP_NUM_THREADS", "1"))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    if RESULTS.is_file():
        print(markdown(json.loads(RESULTS.read_text())))
    print(f"total wall {time.time() - t0:.0f}s")


def _p(x, d=1):
    return "–" if x is None else f"{100 * x:.{d}f}"


def _counts(report: dict) -> tuple:
    """(regressions v1->v2, regressions v1->v2c) as counts of examples (None for ROUGE tasks)."""
    c = report.get("comparisons", [])
    return tuple(c[i].get("regression") if i < len(c) else None for i in (0, 1))


def markdown(results: dict) -> str:
    out = [
        "| task | n test | score v1 | score v2 | score v2c | NFR v1→v2 (flips) | NFR v1→v2c (flips) "
        "| ΔNFR_c | Δ%NFR_c | NFR_mc v2 | NFR_mc v2c | smooth NFR v2 → v2c | m_g v2 → v2c | m_r v2 → v2c |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results.get("tasks", {}).items():
        if "report" not in r:
            continue
        row = r["report"]["paper_row"]
        f2, f2c = _counts(r["report"])

        def flips(rate, k):
            return "–" if rate is None else f"{_p(rate)} ({k})"

        out.append(
            f"| {task} | {row['n']} | {_p(row['score_v1'])} | {_p(row['score_v2'])} | {_p(row['score_v2c'])} "
            f"| {flips(row['nfr'], f2)} | {flips(row['nfr_c'], f2c)} | {_p(row['delta_nfr_c'])} "
            f"| {_p(row['rel_delta_nfr_c'])} | {_p(row['nfr_mc'])} | {_p(row['nfr_mc_c'])} "
            f"| {_p(row['nfr_smooth'])} → {_p(row['nfr_smooth_c'])} ({_p(row['rel_delta_nfr_smooth_c'])}%) "
            f"| {_p(row['m_g'])} → {_p(row['m_g_c'])} | {_p(row['m_r'])} → {_p(row['m_r_c'])} |"
        )
    for task, r in results.get("tasks", {}).items():
        if "ablation" not in r:
            continue
        out += [
            "",
            f"Mask ablation ({task}, paper Table 6): v1 → v2c trained with each mask from the same cache",
            "",
            "| mask | score v2c | ΔAcc vs v2 | NFR v1→v2c (flips) | ΔNFR_c | Δ%NFR_c | PFR v1→v2c | ΔPFR_c |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mask, rep in r["ablation"].items():
            row = rep["paper_row"]
            _, k = _counts(rep)
            out.append(
                f"| {mask} | {_p(row['score_v2c'])} | {_p(row['delta_score_c'])} | {_p(row['nfr_c'])} ({k}) "
                f"| {_p(row['delta_nfr_c'])} | {_p(row['rel_delta_nfr_c'])} | {_p(row['pfr_c'])} "
                f"| {_p(row['delta_pfr_c'])} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
