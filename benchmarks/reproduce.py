#!/usr/bin/env python
"""The MUSCLE reproduction on an update with real regressions, offline, in resumable stages
(benchmarks/README.md, "Reproduction on an update with real regressions"; issue 16).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/reproduce.py \\
        --data-dir "$MUSCLE_DATA_DIR" --tasks piqa --ablation --online

The pair (benchmarks/repro_pair.py): v2 = SmolLM2-135M-Instruct, v1 = v2 without 6 middle
layers, healed by a small committed LoRA. Both bases are rebuilt under ``--root`` (git-ignored)
from the PyPI GGUF and committed files; nothing here needs a machine that is gone.

Stages per task T, each skipped when its committed output exists under ``--out``
(benchmarks/results/repro2/T/), so a new clone resumes where the last session stopped:
  train-v2 / train-v1    task adapters            -> T/adapters/{v2,v1}/   (committed)
  predict-v2 / -v1       the test set             -> T/pred/{v2,v1}.jsonl  (committed)
  cache-v1 / cache-v2    top-K teachers on the training pool (--root/cache/T; rebuilt from the
                         committed adapters when absent: not committed, tens of MB)
  train-v2c, predict-v2c mask v2c_wrong from the cache; v2c's adapter is committed too
  compare                muscle-eval compare v1 v2 v2c   -> T/compare.{json,md}
  ablation (PIQA, --ablation): v2c with each other mask   -> T/pred/v2c-MASK.jsonl, compare-MASK.*
  online (PIQA, --online): v2c trained with both teachers resident, near-full vocabulary
                         (top-K = V - 1: the (K+1)-bin KL is then the full KL) -> T/pred/v2c-online.jsonl
  tail (--tail): v2c from a format-2 cache (top-8 + 40 sampled tail tokens, issue 13)
                         -> T/pred/v2c-tail.jsonl
  answer (--answer-only): v2c from a cache of the answer tokens only -> T/pred/v2c-answer.jsonl
  ce (--ce-weight W):    v2c with an auxiliary cross-entropy, (1-W) L_comp + W CE (paper §5.3:
                         its updates with a large v1/v2 gap) -> T/pred/v2c-ceW.jsonl; W = 1, the
                         control: v2 trained on as long with CE alone, no L_comp
  longer (--longer N): v2c trained N times the profile's epochs, before v2c itself
                         -> T/pred/v2c-xN.jsonl
  train-pool eval (PIQA, --train-pool-eval): v1, v2 and every v2c scored on the examples the
                         compat adapters trained on -> T/trainpool/
Wall seconds of every stage that ran go to OUT/timings.json; the table to OUT/results.json.
``--profile paper`` (benchmarks/run_gpu_repro.sh) uses the paper's Table 7 sizes instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from muscle.locking import LockHeld, writer_lock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class TaskSizes:
    """One task's data and training sizes (CLI options of muscle-train / -eval / -cache)."""

    train_pool: int | None  # --max-examples (80/20 -> train/validation); None: the whole split
    test: int | None  # --limit on the test split; None: all of it
    epochs: int
    lr: float
    max_length: int
    batch: int
    accum: int
    warmup: int
    compat_epochs: int
    compat_lr: float
    max_new_tokens: int | None = None
    num_fewshot: int | None = None


@dataclass(frozen=True)
class Profile:
    lora_r: int
    lora_alpha: float
    dtype: str
    eval_batch: int
    tasks: dict[str, TaskSizes]


# fmt: off
# CPU: 2 shared cores, sessions of ~3 h (benchmarks/README.md has the measured stage times).
# Test sets at their real sizes (issue 16); training pools, rank and epochs cut to fit.
CPU = Profile(lora_r=8, lora_alpha=16.0, dtype="bfloat16", eval_batch=16, tasks={
    "piqa":      TaskSizes(train_pool=400, test=None, epochs=1, lr=5e-4, max_length=128, batch=8,
                           accum=2, warmup=5, compat_epochs=1, compat_lr=5e-4),
    "hellaswag": TaskSizes(train_pool=1000, test=2000, epochs=1, lr=3e-4, max_length=256, batch=8,
                           accum=2, warmup=5, compat_epochs=1, compat_lr=3e-4),
    "samsum":    TaskSizes(train_pool=300, test=300, epochs=1, lr=5e-4, max_length=320, batch=4,
                           accum=2, warmup=5, compat_epochs=1, compat_lr=5e-4, max_new_tokens=48),
    "gsm8k":     TaskSizes(train_pool=1000, test=None, epochs=1, lr=3e-4, max_length=512, batch=4,
                           accum=4, warmup=5, compat_epochs=1, compat_lr=3e-4, max_new_tokens=160,
                           num_fewshot=0),
})
# The paper's Table 7: LoRA r=128, alpha=156, 10 epochs, lr 1e-4, grad-acc 8, 500 warmup steps,
# full training sets (80/20), bf16 on a GPU (benchmarks/run_gpu_repro.sh). Batch 64 x grad-acc 2
# = the 128 sequences per step of a per-device batch 16 x the paper's grad-acc 8, in 4x fewer
# micro-steps (a 135M model on one GPU is launch-bound at batch 16).
PAPER = Profile(lora_r=128, lora_alpha=156.0, dtype="bfloat16", eval_batch=64, tasks={
    t: dataclasses.replace(s, train_pool=None, epochs=10, lr=1e-4, warmup=500, compat_epochs=10,
                           compat_lr=1e-4, batch=64 if t != "gsm8k" else 16,
                           accum=2 if t != "gsm8k" else 8)
    for t, s in CPU.tasks.items()
})
PROFILES = {"cpu": CPU, "paper": PAPER}
# (mask, ce_weight): the paper trains the likelihood masks with an auxiliary cross-entropy
# ("CE + L_comp", Table 6) without giving lambda; 0.5 here.
ABLATION_MASKS = [("always_v1", 0.0), ("v1_correct", 0.0), ("token_ll", 0.5), ("seq_ll", 0.5)]
# fmt: on


@dataclass
class Run:
    """Where things go and how the CLIs are called for one invocation."""

    data_dir: Path
    root: Path  # git-ignored work: bases, training run dirs, caches, logs
    out: Path  # committed outputs
    profile: Profile
    device: str
    base_v1: Path
    base_v2: Path
    limit_train: int | None = None  # overrides (a slice, a test)
    limit_test: int | None = None

    def sizes(self, task: str) -> TaskSizes:
        s = self.profile.tasks[task]
        if self.limit_train is not None:
            s = dataclasses.replace(s, train_pool=self.limit_train)
        if self.limit_test is not None:
            s = dataclasses.replace(s, test=self.limit_test)
        return s


def data_dir(run: Run, task: str) -> Path:
    return run.data_dir


def rel(p: Path) -> str:
    """Repository-relative when inside the repository (paths recorded in committed files)."""
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def stage(run: Run, name: str, cmd: list[str], done: Path | None, times: dict) -> bool:
    """Run one CLI step (log in ROOT/logs) unless ``done`` exists; record its wall time.

    Returns True when it ran. A writer lock (:mod:`muscle.locking`, released by the kernel
    when its holder dies) keeps two invocations off the same stage: the second waits, then
    skips the stage if the first finished it.
    """
    if done is not None and done.exists():
        print(f"[skip] {name}: {rel(done)} exists", flush=True)
        return False
    logs = run.root / "logs"
    lock, what = logs / f"{name}.stage.lock", f"reproduction stage {name}"
    try:
        with writer_lock(lock, what=what):
            return _run_stage(run, name, cmd, times)
    except LockHeld as held:
        print(f"[wait] {held}", flush=True)
    with writer_lock(lock, what=what, wait=True):
        if done is not None and done.exists():  # the other invocation finished it
            print(f"[skip] {name}: {rel(done)} exists", flush=True)
            return False
        return _run_stage(run, name, cmd, times)


def _run_stage(run: Run, name: str, cmd: list[str], times: dict) -> bool:
    log = run.root / "logs" / f"{name}.log"
    print(f"[run ] {name}: {' '.join(cmd)}  (log {log})", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-8:]
        print("\n".join(f"  | {line[-300:]}" for line in tail), file=sys.stderr)
        raise SystemExit(f"{name} failed (rc {rc}); see {log}")
    times[name] = round(time.time() - t0, 1)
    record_time(run, name, times[name])
    return True


def record_time(run: Run, name: str, seconds: float) -> None:
    f = run.out / "timings.json"
    with writer_lock(run.root / "logs" / "timings.lock", what="timings.json", wait=True):
        t = json.loads(f.read_text()) if f.is_file() else {}
        t[name] = {"seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **load()}
        write_json(f, t)


def write_json(f: Path, obj) -> None:
    """Atomically (two invocations may write the same results files)."""
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f"{f.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, f)


def load() -> dict:
    try:
        return {"loadavg_1m": round(os.getloadavg()[0], 2)}
    except OSError:
        return {}


def write_config(run: Run, task: str) -> Path:
    """runs/.../T/update.toml: v1, v2 on their bases, adapters from the committed folder."""
    tdir = run.root / task
    tdir.mkdir(parents=True, exist_ok=True)
    ad = run.out / task / "adapters"
    cfg = tdir / "update.toml"
    d = run.profile.dtype

    def at(p: Path) -> str:  # relative to the config, so recorded paths stay repo-relative
        return os.path.relpath(p, tdir)

    cfg.write_text(
        f'task = "{task}"\n\n'
        f'[models.v1]\nbase = "{at(run.base_v1)}"\nadapter = "{at(ad / "v1")}"\ndtype = "{d}"\n\n'
        f'[models.v2]\nbase = "{at(run.base_v2)}"\nadapter = "{at(ad / "v2")}"\ndtype = "{d}"\n\n'
        f'[models.v2c]\nbase = "{at(run.base_v2)}"\nadapter = "{at(ad / "v2c")}"\ndtype = "{d}"\n'
    )
    return cfg


def common_data(run: Run, task: str, s: TaskSizes) -> list[str]:
    out = ["--data-dir", str(data_dir(run, task)), "--max-length", str(s.max_length)]
    if s.train_pool is not None:
        out += ["--max-examples", str(s.train_pool)]
    return out


def train_args(run: Run, s: TaskSizes, compat: bool) -> list[str]:
    return [
        "--epochs",
        str(s.compat_epochs if compat else s.epochs),
        "--lr",
        str(s.compat_lr if compat else s.lr),
        "--warmup",
        str(s.warmup),
        "--batch-size",
        str(s.batch),
        "--grad-accum",
        str(s.accum),
        "--device",
        run.device,
        "--dtype",
        run.profile.dtype,
    ]


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def keep_adapter(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's adapter and its small records into the committed folder (once:
    an invocation that waited for another's run finds the copy made)."""
    if (dest / "adapter_model.safetensors").exists():
        return
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in run_dir.iterdir():
        if p.is_file() and (p.name in ADAPTER_FILES or p.suffix in (".json", ".jsonl")):
            shutil.copy2(p, tmp / p.name)
    try:
        tmp.rename(dest)
    except OSError:  # the other invocation's copy landed first
        shutil.rmtree(tmp, ignore_errors=True)


def task_adapter(run: Run, task: str, cfg: Path, name: str, times: dict) -> None:
    s = run.sizes(task)
    dest = run.out / task / "adapters" / name
    work = run.root / task / name
    cmd = [
        str(BIN / "muscle-train"),
        "--task",
        task,
        "--config",
        rel(cfg),
        "--model",
        name,
        "--out",
        rel(work),
        *common_data(run, task, s),
        *train_args(run, s, compat=False),
        "--lora-r",
        str(run.profile.lora_r),
        "--lora-alpha",
        str(run.profile.lora_alpha),
    ]
    done = dest / "adapter_model.safetensors"
    if done.exists():
        print(f"[skip] {task}-train-{name}: {rel(done)} exists", flush=True)
        return
    stage(run, f"{task}-train-{name}", cmd, work / "adapter_model.safetensors", times)
    keep_adapter(work, dest)


def predict(
    run: Run,
    task: str,
    cfg: Path,
    model: str,
    out: Path,
    times: dict,
    adapter: Path | None = None,
    stage_name: str | None = None,
) -> None:
    s = run.sizes(task)
    cmd = [
        str(BIN / "muscle-eval"),
        "predict",
        "--config",
        rel(cfg),
        "--model",
        model,
        "--out",
        rel(out),
        "--data-dir",
        str(data_dir(run, task)),
        "--device",
        run.device,
        "--batch-size",
        str(run.profile.eval_batch),
    ]
    if s.test is not None:
        cmd += ["--limit", str(s.test)]
    if adapter is not None:
        cmd += ["--adapter", rel(adapter)]
    if s.max_new_tokens is not None:
        cmd += ["--max-new-tokens", str(s.max_new_tokens)]
    if s.num_fewshot is not None:
        cmd += ["--num-fewshot", str(s.num_fewshot)]
    done = Path(str(out) + ".done")  # the sidecar is written first: this marks the end
    out.parent.mkdir(parents=True, exist_ok=True)
    if stage(run, stage_name or f"{task}-predict-{out.stem}", cmd, done, times):
        done.touch()


# Cache format 2 (issue 13): the recommendation of benchmarks/README.md ("Cache format 2"):
# an exact top-8 head and 40 tail tokens sampled per position (~176 B compressed, as top-64).
TAIL_CACHE = {"top_k": 8, "tail_samples": 40}


# The caches beside the top-64 format-1 one, each with a v2c of its own (label v2c-KIND): the
# extra options of their muscle-cache build.
CACHE_VARIANTS = {
    "tail": [
        "--top-k",
        str(TAIL_CACHE["top_k"]),
        "--tail-samples",
        str(TAIL_CACHE["tail_samples"]),
    ],
    # the answer tokens only: the Eq. 1 mask then judges the tokens the task is scored on
    "answer": ["--answer-only"],
}


def cache_dir(run: Run, task: str, kind: str | None = None) -> Path:
    """ROOT/cache/T (top-64, format 1) or, for a ``kind`` of :data:`CACHE_VARIANTS`,
    ROOT/cache/T-KIND."""
    return run.root / "cache" / (f"{task}-{kind}" if kind else task)


def cache_build(
    run: Run, task: str, cfg: Path, name: str, times: dict, kind: str | None = None
) -> Path:
    """The teacher ``name`` into :func:`cache_dir`."""
    s = run.sizes(task)
    cache = cache_dir(run, task, kind)
    done = cache / f".repro-{name}.done"
    cmd = [
        str(BIN / "muscle-cache"),
        "build",
        "--config",
        rel(cfg),
        "--model",
        name,
        "--out",
        rel(cache),
        *common_data(run, task, s),
        "--device",
        run.device,
        "--dtype",
        run.profile.dtype,
        "--quiet",
        "--batch-size",
        str(run.profile.eval_batch),
    ]
    cmd += CACHE_VARIANTS[kind] if kind else []
    if stage(run, f"{task}-cache{f'-{kind}' if kind else ''}-{name}", cmd, done, times):
        done.touch()
    return cache


def compat_adapter(
    run: Run,
    task: str,
    cfg: Path,
    label: str,
    mask: str,
    ce: float,
    times: dict,
    online: bool,
    cache: Path | None = None,
    epochs: int | None = None,
) -> Path:
    """Train v2c (mask, ce weight) from ``cache`` (default ROOT/cache/T) or online, for
    ``epochs`` (default: the profile's compat_epochs); returns its adapter dir."""
    s = run.sizes(task)
    if epochs is not None:
        s = dataclasses.replace(s, compat_epochs=epochs)
    work = run.root / task / label
    cmd = [str(BIN / "muscle-train")]
    if online:
        cmd += [
            "--online",
            "--task",
            task,
            "--config",
            rel(cfg),
            "--v1",
            "v1",
            "--v2",
            "v2",
            "--top-k",
            str(online_top_k(run)),
            *common_data(run, task, s),
        ]
    else:
        cmd += ["--cache", rel(cache or cache_dir(run, task))]
    cmd += [
        "--out",
        rel(work),
        "--mask",
        mask,
        "--temperature",
        "2",
        "--ce-weight",
        str(ce),
        *train_args(run, s, compat=True),
    ]
    stage(run, f"{task}-train-{label}", cmd, work / "adapter_model.safetensors", times)
    return work


def online_top_k(run: Run) -> int:
    """The vocabulary minus one: the (K+1)-bin loss then has one token in its rest bin, i.e.
    it is the full-vocabulary KL (SmolLM2: 49,151)."""
    return int(json.loads((run.base_v2 / "config.json").read_text())["vocab_size"]) - 1


def compare(run: Run, task: str, files: list[Path], stem: str, times: dict) -> dict:
    j = run.out / task / f"{stem}.json"
    cmd = [
        str(BIN / "muscle-eval"),
        "compare",
        *(rel(f) for f in files),
        "--json",
        rel(j),
        "--markdown",
        rel(j.with_suffix(".md")),
    ]
    stage(run, f"{task}-{stem.replace('/', '-')}", cmd, None, times)
    return json.loads(j.read_text())


def variant(
    run: Run,
    task: str,
    cfg: Path,
    label: str,
    mask: str,
    ce: float,
    times,
    online=False,
    cache: Path | None = None,
    epochs: int | None = None,
):
    """One v2c variant: train (unless its predictions or its adapter are committed), predict,
    compare. The main v2c's adapter is always committed; a variant's only by hand, when its
    predictions are left for a later session (they resume on the same adapter path)."""
    pred = run.out / task / "pred" / f"{label}.jsonl"
    done = Path(str(pred) + ".done")
    kept = run.out / task / "adapters" / label
    if done.exists():
        print(f"[skip] {task}-train+predict-{label}: {rel(done)} exists", flush=True)
    else:
        if (kept / "adapter_model.safetensors").exists():
            print(f"[skip] {task}-train-{label}: {rel(kept)} exists", flush=True)
            adapter = kept
        else:
            adapter = compat_adapter(run, task, cfg, label, mask, ce, times, online, cache, epochs)
            for log in ("train_log.jsonl", "muscle_run.json"):  # small records of the run
                if (adapter / log).is_file():
                    shutil.copy2(adapter / log, run.out / task / "pred" / f"{label}.{log}")
            if label == "v2c" or label.startswith("v2c-x"):  # v2c and the --longer ones
                keep_adapter(adapter, kept)
                adapter = kept
        # v2c's own adapter is the config's; the others are passed explicitly
        predict(run, task, cfg, "v2c", pred, times, adapter=None if label == "v2c" else adapter)
    p = run.out / task / "pred"
    return compare(run, task, [p / "v1.jsonl", p / "v2.jsonl", pred], f"compare-{label}", times)


def task_pipeline(
    run: Run,
    task: str,
    times: dict,
    ablation: bool,
    online: bool,
    upto: str,
    caches: tuple[str, ...] = (),
    longer: int | None = None,
    masks: tuple[str, ...] | None = None,
    ce_weight: float | None = None,
) -> None:
    """Every stage of one task that is not finished yet (outputs under OUT/T, see collect).

    ``caches``: kinds of :data:`CACHE_VARIANTS` to train a v2c from as well (label v2c-KIND).
    ``masks``: the ablation's masks (default all of :data:`ABLATION_MASKS`). With ``longer``
    each v2c is also trained for ``longer`` times the epochs (label v2c-xN, v2c-MASK-xN,
    v2c-KIND-xN). ``ce_weight`` W: a v2c with mask v2c_wrong and (1-W) L_comp + W CE as well
    (label v2c-ceW, :func:`ce_label`)."""
    ablation_masks = [(m, ce) for m, ce in ABLATION_MASKS if masks is None or m in masks]
    cfg = write_config(run, task)
    pred = run.out / task / "pred"
    for name in ("v1",) if upto == "v1" else ("v2", "v1"):  # v2 first: it needs no healed v1
        if name == "v1":
            ensure_v1(run, times)
        task_adapter(run, task, cfg, name, times)
        predict(run, task, cfg, name, pred / f"{name}.jsonl", times)
    if upto == "v1":  # a second invocation beside one that does v2
        return
    compare(run, task, [pred / "v1.jsonl", pred / "v2.jsonl"], "compare-v1-v2", times)
    if upto == "pair":
        return
    labels = ["v2c"] + ["v2c-online"] * online + [f"v2c-{m}" for m, _ in ablation_masks] * ablation
    labels += [ce_label(ce_weight)] if ce_weight is not None else []
    if longer:
        labels += [f"v2c-x{longer}"] + [f"v2c-{m}-x{longer}" for m, _ in ablation_masks] * ablation
        labels += [f"{ce_label(ce_weight)}-x{longer}"] if ce_weight is not None else []
        labels += [f"v2c-{kind}-x{longer}" for kind in caches]
    if not all(Path(f"{pred / label}.jsonl.done").exists() for label in labels):
        for name in ("v1", "v2"):  # only when some v2c is still to train (tens of MB, rebuilt)
            cache_build(run, task, cfg, name, times)
    long_epochs = run.sizes(task).compat_epochs * longer if longer else None

    def trained(label: str, ce: float = 0.0, cache: Path | None = None) -> None:
        """v2c ``label`` (mask v2c_wrong) and, with ``longer``, LABEL-xN before it: on PIQA one
        epoch proved under-trained, so the longer run is the row that matters."""
        if longer:
            long_label = f"{label}-x{longer}"
            variant(
                run, task, cfg, long_label, "v2c_wrong", ce, times, cache=cache, epochs=long_epochs
            )
        variant(run, task, cfg, label, "v2c_wrong", ce, times, cache=cache)

    trained("v2c")
    if online:
        variant(run, task, cfg, "v2c-online", "v2c_wrong", 0.0, times, online=True)
    if ce_weight is not None:
        trained(ce_label(ce_weight), ce=ce_weight)
    for kind in caches:
        kind_labels = [f"v2c-{kind}"] + [f"v2c-{kind}-x{longer}"] * bool(longer)
        if not all(Path(f"{pred / label}.jsonl.done").exists() for label in kind_labels):
            for name in ("v1", "v2"):
                cache_build(run, task, cfg, name, times, kind=kind)
        trained(f"v2c-{kind}", cache=cache_dir(run, task, kind))
    for mask, ce in ablation_masks if ablation and longer else ():  # the longer ones first
        label = f"v2c-{mask}-x{longer}"
        variant(run, task, cfg, label, mask, ce, times, epochs=long_epochs)
    for mask, ce in ablation_masks if ablation else ():
        variant(run, task, cfg, f"v2c-{mask}", mask, ce, times)


def ce_label(weight: float) -> str:
    """The label of the v2c trained with cross-entropy weight ``weight``: v2c-ce0.5."""
    return f"v2c-ce{weight:g}"


def train_pool_eval(run: Run, task: str, cfg: Path, times: dict) -> None:
    """The explanation test of a null result: score v1, v2 and every v2c variant on the very
    examples the compatibility adapters trained on (the training part of the pool). If v2c
    avoids v2's regressions there but not on the test set, the method works as an optimiser
    and what is missing is generalisation (pool size, epochs, rank); if not even there, the
    training signal itself is too weak. -> OUT/T/trainpool/{pred/*.jsonl, compare-*.json}."""
    sys.path.insert(0, str(REPO))
    from muscle.tasks import get_task, load_examples, raw_records

    s = run.sizes(task)
    data = run.root / task / "trainpool-data"
    t = get_task(task)
    pool = load_examples(t, "train", data_dir=data_dir(run, task), max_examples=s.train_pool)
    eval_file = data / task / {"piqa": "valid.jsonl"}[task]  # PIQA only: its eval file name
    if not eval_file.is_file():
        records = raw_records(t, "train", data_dir=data_dir(run, task))
        eval_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data_dir(run, task) / task / "train.jsonl", eval_file.parent / "train.jsonl")
        tmp = eval_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(records[int(ex.id)]) + "\n" for ex in pool))
        os.replace(tmp, eval_file)
    out = run.out / task / "trainpool"
    local = dataclasses.replace(run, data_dir=data, limit_test=None)
    labels: dict[str, Path | None] = {"v1": None, "v2": None, "v2c": None}
    trained = (run.out / task / "adapters", run.root / task)  # committed first
    for name in sorted({p.name for where in trained for p in where.glob("v2c-*")}):
        for where in trained:  # every v2c variant with an adapter: online, caches, masks, ...
            if (where / name / "adapter_model.safetensors").is_file():
                labels[name] = where / name
                break
    model = {"v1": "v1", "v2": "v2"}
    for label, adapter in labels.items():
        predict(
            local,
            task,
            cfg,
            model.get(label, "v2c"),
            out / "pred" / f"{label}.jsonl",
            times,
            adapter=adapter,
            stage_name=f"{task}-trainpool-predict-{label}",
        )
    p = out / "pred"
    for label in labels:
        if label.startswith("v2c"):
            compare(
                run,
                task,
                [p / "v1.jsonl", p / "v2.jsonl", p / f"{label}.jsonl"],
                f"trainpool/compare-{label}",
                times,
            )


def ensure_v1(run: Run, times: dict) -> None:
    """base-v1 (and base-v2) from the committed recipe (benchmarks/repro_pair.py)."""
    lock = run.base_v1.parent / "pair.building"  # repro_pair.BUILD_LOCK
    while lock.exists():  # a build started by hand (e.g. healing) is running: wait for it
        time.sleep(30)
    if (run.base_v1 / "model.safetensors").is_file():
        return
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "repro_pair.py"),
        "--data-dir",
        str(run.data_dir),
        "--root",
        str(run.base_v1.parent),
    ]
    stage(run, "bases", cmd, run.base_v1 / "model.safetensors", times)


def machine() -> dict:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_common import cpu_name

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def usage_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("MUSCLE_DATA_DIR"),
        help="the full task data, laid out as DATA_FORMAT.md says (default: $MUSCLE_DATA_DIR)",
    )
    ap.add_argument("--tasks", default="piqa", help="comma-separated: piqa,hellaswag,samsum,gsm8k")
    ap.add_argument("--ablation", action="store_true", help="PIQA mask ablation (paper Table 6)")
    ap.add_argument(
        "--masks",
        help=f"the ablation's masks, comma-separated (default all: "
        f"{','.join(m for m, _ in ABLATION_MASKS)})",
    )
    ap.add_argument("--online", action="store_true", help="PIQA v2c trained online as well")
    ap.add_argument(
        "--train-pool-eval",
        action="store_true",
        help="PIQA: score v1, v2 and the v2c variants on the compat training examples as well",
    )
    ap.add_argument(
        "--longer",
        type=int,
        metavar="N",
        help="v2c trained N times the profile's compat epochs as well (label v2c-xN), every task",
    )
    ap.add_argument(
        "--tail",
        action="store_true",
        help="v2c trained from a format-2 cache as well (top-8 + 40 sampled tail tokens)",
    )
    ap.add_argument(
        "--answer-only",
        action="store_true",
        help="v2c trained from a cache of the answer tokens only as well (the Eq. 1 mask then "
        "judges only the tokens the task scores; the task adapters stay as they are)",
    )
    ap.add_argument(
        "--ce-weight",
        type=float,
        metavar="W",
        help="a v2c trained with (1-W) L_comp + W cross-entropy as well (label v2c-ceW), every "
        "task; the paper adds CE where v1 and v2 are far apart (§5.3). W = 1 is its control: "
        "v2's adapter trained on as long with the task loss alone",
    )
    ap.add_argument(
        "--upto",
        choices=["v1", "pair", "all"],
        default="all",
        help="pair: the v1/v2 stages and their comparison only; v1: v1's task adapter and "
        "predictions only (to run beside an invocation that does v2)",
    )
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "repro2")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "repro2")
    ap.add_argument("--base-v1", type=Path, help="default: ROOT/base-v1 (built by repro_pair.py)")
    ap.add_argument("--base-v2", type=Path, help="default: ROOT/base-v2")
    ap.add_argument("--limit-train", type=int, help="override every task's training pool")
    ap.add_argument("--limit-test", type=int, help="override every task's test size")
    ap.add_argument("--table", action="store_true", help="print the tables of OUT's results only")
    a = ap.parse_args(argv)
    if a.table:
        print(markdown(collect(a.out)))
        print()
        print(stage_times_markdown(a.out))
        return
    masks = tuple(m.strip() for m in a.masks.split(",") if m.strip()) if a.masks else None
    unknown = sorted(set(masks or ()) - {m for m, _ in ABLATION_MASKS})
    if unknown:
        usage_error(
            f"unknown ablation mask(s) {', '.join(unknown)}: choose from "
            f"{', '.join(m for m, _ in ABLATION_MASKS)}"
        )
    if a.ce_weight is not None and not 0.0 < a.ce_weight <= 1.0:
        usage_error(f"--ce-weight {a.ce_weight:g} is outside (0, 1]: pick e.g. 0.5")
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in CPU.tasks]
    if bad:
        usage_error(f"unknown task(s) {', '.join(bad)}: choose from {', '.join(sorted(CPU.tasks))}")
    root = Path(a.data_dir) if a.data_dir else None
    missing = [t for t in tasks if not (root and (root / t).is_dir())]
    if missing:
        usage_error(
            f"no task data for {', '.join(missing)} in {root or 'no folder'}: pass"
            " --data-dir (or set MUSCLE_DATA_DIR) to a folder laid out as DATA_FORMAT.md says"
        )
    run = Run(
        data_dir=root.resolve(),
        root=a.root.resolve(),
        out=a.out.resolve(),
        profile=PROFILES[a.profile],
        device=a.device,
        base_v1=(a.base_v1 or a.root / "base-v1").resolve(),
        base_v2=(a.base_v2 or a.root / "base-v2").resolve(),
        limit_train=a.limit_train,
        limit_test=a.limit_test,
    )
    if not (run.base_v2 / "config.json").is_file():
        ensure_v1(run, {})  # repro_pair.py builds base-v2 first
    t0 = time.time()
    for task in tasks:
        times: dict = {}
        task_pipeline(
            run,
            task,
            times,
            a.ablation and task == "piqa",
            a.online and task == "piqa",
            a.upto,
            caches=("tail",) * a.tail + ("answer",) * a.answer_only,
            longer=a.longer,
            masks=masks,
            ce_weight=a.ce_weight,
        )
        if a.train_pool_eval and task == "piqa" and a.upto == "all":
            train_pool_eval(run, task, write_config(run, task), times)
    results = collect(run.out)  # the committed files are the record, whoever made them
    results["sizes"] = {t: dataclasses.asdict(run.sizes(t)) for t in results["tasks"]}
    results["machine"] = machine()
    results["profile"] = a.profile
    results["lora"] = {"r": run.profile.lora_r, "alpha": run.profile.lora_alpha}
    write_json(run.out / "results.json", results)
    print(markdown(results))
    print(f"total wall {time.time() - t0:.0f}s")


def collect(out: Path) -> dict:
    """Every finished comparison under OUT (whichever invocation or session made it)."""
    tasks = {}
    for tdir in sorted(p for p in out.iterdir() if (p / "pred").is_dir()):
        pred, r = tdir / "pred", {}
        if (tdir / "compare-v1-v2.json").is_file():
            r["report_v1_v2"] = json.loads((tdir / "compare-v1-v2.json").read_text())
            r["disagreement_v1_v2"] = disagreement(pred / "v1.jsonl", pred / "v2.jsonl")
        for key, stem in (("report", "v2c"), ("online", "v2c-online")):
            if (tdir / f"compare-{stem}.json").is_file():
                r[key] = json.loads((tdir / f"compare-{stem}.json").read_text())
        for kind in CACHE_VARIANTS:  # --tail, --answer-only (and with --longer N)
            if (tdir / f"compare-v2c-{kind}.json").is_file():
                r[kind] = json.loads((tdir / f"compare-v2c-{kind}.json").read_text())
            for f in sorted(tdir.glob(f"compare-v2c-{kind}-x*.json")):
                key = f.stem.rsplit("-", 1)[1]
                r.setdefault(f"{kind}_longer", {})[key] = json.loads(f.read_text())
        for f in sorted(tdir.glob("compare-v2c-ce*.json")):  # --ce-weight W (and --longer N)
            r.setdefault("ce", {})[f.stem.removeprefix("compare-v2c-ce")] = json.loads(
                f.read_text()
            )
        for f in sorted(tdir.glob("compare-v2c-x*.json")):  # --longer N
            r.setdefault("longer", {})[f.stem.removeprefix("compare-v2c-")] = json.loads(
                f.read_text()
            )
        masks = [m for m, _ in ABLATION_MASKS if (tdir / f"compare-v2c-{m}.json").is_file()]
        if masks:
            r["ablation"] = {"v2c_wrong": r.get("report")} | {
                m: json.loads((tdir / f"compare-v2c-{m}.json").read_text()) for m in masks
            }
        for m, _ in ABLATION_MASKS:  # --ablation --longer N: the masks trained N times longer
            for f in sorted(tdir.glob(f"compare-v2c-{m}-x*.json")):
                key = f"{m} {f.stem.rsplit('-', 1)[1]}"
                r.setdefault("ablation", {"v2c_wrong": r.get("report")})[key] = json.loads(
                    f.read_text()
                )
        if r:
            tasks[tdir.name] = r
    return {"tasks": tasks}


def stage_times_markdown(out: Path) -> str:
    """Every recorded stage's wall time and the load when it ended, task by task (from
    OUT/timings.json: stages of several sessions and machines, each as it ran)."""
    f = out / "timings.json"
    times = json.loads(f.read_text()) if f.is_file() else {}
    rows = ["| stage | wall (min) | load (1 min) at its end | finished |", "|---|---:|---:|---|"]
    for name, t in sorted(times.items(), key=lambda kv: (kv[0].split("-")[0], kv[1]["finished"])):
        if t["seconds"] < 5:  # compare stages: instant
            continue
        rows.append(
            f"| {name} | {t['seconds'] / 60:.1f} | {t.get('loadavg_1m', '–')} | {t['finished']} |"
        )
    return "\n".join(rows)


def disagreement(a: Path, b: Path) -> dict:
    """How often two models' answers differ (issue 16 asks >= 10% for the pair on PIQA)."""
    pa = {r["id"]: r["prediction"] for r in map(json.loads, a.read_text().splitlines())}
    pb = {r["id"]: r["prediction"] for r in map(json.loads, b.read_text().splitlines())}
    ids = pa.keys() & pb.keys()
    k = sum(pa[i] != pb[i] for i in ids)
    return {"n": len(ids), "differ": k, "rate": k / len(ids) if ids else None}


def _p(x, d=1, signed=False):
    return "–" if x is None else f"{100 * x:{'+' if signed else ''}.{d}f}"


def _ci(ci: dict | None, key: str, signed: bool = False) -> str:
    iv = (ci or {}).get(key)
    if not iv:
        return ""
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    return f" [{f(iv['low'])}, {f(iv['high'])}]"


def _test(t: dict | None) -> str:
    return "–" if not t else f"{t['b']} / {t['c']} (p = {t['p']:.3g})"


def ce_name(key: str) -> str:
    """A key of results' "ce" ("0.5", "0.5-x5") as the tables name it ("0.5 ×5 epochs")."""
    weight, _, times = key.partition("-x")
    return f"{weight} ×{times} epochs" if times else weight


def markdown(results: dict) -> str:
    """Tables for benchmarks/README.md from OUT/results.json: the pair (v1 -> v2) and every v2c
    variant, with compare's 95% paired-bootstrap intervals and exact sign tests. A task without
    per-example correctness (SAMSum: ROUGE-1) shows the smooth metrics (paper §3.1) in the NFR
    columns, marked "smooth": a regression is an example v2 (v2c) scores lower than v1."""
    out = [
        "| task | n | score v1 | score v2 | v1/v2 answers differ | NFR v1→v2 (flips) | PFR v1→v2 "
        "| gains / regressions (sign-test p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results.get("tasks", {}).items():
        rep = r.get("report_v1_v2")
        if not rep:
            continue
        c, ci = rep["comparisons"][0], rep["ci"]["comparisons"][0]
        tests = rep["tests"]["comparisons"][0]
        d = r.get("disagreement_v1_v2", {})
        if c["nfr"] is None:  # continuous score: smooth NFR / PFR, regressions = D < 0
            t = tests["smooth_flips"]
            nfr, pfr, name = "nfr_smooth", "pfr_smooth", f"{task} (smooth)"
            regressions = t["c"] if t else "–"
        else:
            t, nfr, pfr, name, regressions = tests["flips"], "nfr", "pfr", task, c["regression"]
        out.append(
            f"| {name} | {c['n']} | {_p(c['old_score'])}{_ci(ci, 'old_score')} "
            f"| {_p(c['new_score'])}{_ci(ci, 'new_score')} | {_p(d.get('rate'))} ({d.get('differ')}) "
            f"| {_p(c[nfr])}{_ci(ci, nfr)} ({regressions}) | {_p(c[pfr])}{_ci(ci, pfr)} "
            f"| {_test(t)} |"
        )
    out += [
        "",
        "| task | v2c | n | score v2c | Δscore v2c−v2 | NFR v1→v2c | ΔNFR_c | Δ%NFR_c "
        "| v2 regressions avoided / added (sign-test p) | PFR v1→v2c |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results.get("tasks", {}).items():
        variants = {
            "v2c": r.get("report"),
            "v2c online": r.get("online"),
            "v2c format 2": r.get("tail"),
            "v2c answer-only cache": r.get("answer"),
        }
        variants |= {f"v2c ×{n[1:]} epochs": v for n, v in r.get("longer", {}).items()}
        variants |= {
            f"v2c format 2 ×{n[1:]} epochs": v for n, v in r.get("tail_longer", {}).items()
        }
        variants |= {
            f"v2c answer-only cache ×{n[1:]} epochs": v
            for n, v in r.get("answer_longer", {}).items()
        }
        variants |= {f"v2c + CE {ce_name(k)}": v for k, v in r.get("ce", {}).items()}
        variants |= {f"mask {m}": v for m, v in r.get("ablation", {}).items() if m != "v2c_wrong"}
        for label, rep in variants.items():
            if not rep or not rep.get("paper_row"):
                continue
            row, ci = rep["paper_row"], rep["ci"]["paper_row"]
            smooth = row["nfr_c"] is None  # continuous score: the smooth metrics
            key = "nfr_smooth" if smooth else "nfr"
            t = (rep["tests"]["paper_row"] or {}).get(f"{key}_c_vs_{key}")
            out.append(
                f"| {task}{' (smooth)' * smooth} | {label} | {row['n']} "
                f"| {_p(row['score_v2c'])}{_ci(ci, 'score_v2c')} "
                f"| {_p(row['delta_score_c'], signed=True)}{_ci(ci, 'delta_score_c', True)} "
                f"| {_p(row[f'{key}_c'])}{_ci(ci, f'{key}_c')} "
                f"| {_p(row[f'delta_{key}_c'], signed=True)}{_ci(ci, f'delta_{key}_c', True)} "
                f"| {_p(row[f'rel_delta_{key}_c'], signed=True)} | {_test(t)} | {_p(row['pfr_c'])} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
