"""The embedded default: the whole MUSCLE pipeline in one command, on a laptop CPU.

``make demo`` (= ``muscle-demo --out runs/demo``) runs, on a model pair pretrained here from data
shipped in the package (``muscle/embedded``), every stage through the real CLIs:

1. pretrain the v1 / v2 base pair (v2 = v1 continued on more data; :mod:`muscle.pretrain`);
2. ``muscle-train --task piqa`` for v1 and for v2 (task adapters);
3. ``muscle-eval predict`` v1, v2; ``muscle-eval compare v1 v2`` (the update's regression);
4. ``muscle-cache build`` for v1 and v2 (top-K teacher logits);
5. ``muscle-train --cache`` (the MUSCLE compatibility adapter v2c);
6. ``muscle-eval predict`` v2c; ``muscle-eval compare v1 v2 v2c`` -> the paper-style table,
   with a report in ``<out>/report.{md,json}`` and PNG plots.

Each CLI skips work that is already done, so a re-run resumes where it stopped and a finished
demo re-runs in seconds. Each stage's command line is printed, so you can run it by hand.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from muscle import MuscleError

EMBEDDED_DATA = Path(__file__).parent / "embedded" / "data"


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of one demo run. ``demo`` is what ``make demo`` runs; ``test`` is CI's short path."""

    pair: str  # muscle.pretrain profile
    max_examples: int  # PIQA training pool (split 80/20 into train / validation)
    eval_limit: int | None  # PIQA evaluation examples (None: all 1,838)
    epochs: int
    compat_epochs: int
    batch_size: int
    grad_accum: int
    lr: float
    compat_lr: float
    warmup: int
    lora_r: int
    lora_alpha: float
    max_length: int = 192
    top_k: int = 32


PROFILES = {
    # Sizes chosen so the whole demo fits in about 5 minutes on 2 CPU cores. The LoRA is smaller
    # than the paper's r = 128 because the embedded models are tiny (hidden size 160).
    "demo": DemoProfile(
        pair="demo",
        max_examples=4000,
        eval_limit=None,
        epochs=2,
        compat_epochs=2,
        batch_size=16,
        grad_accum=1,
        lr=2e-3,
        compat_lr=1e-3,
        warmup=20,
        lora_r=16,
        lora_alpha=32,
    ),
    "test": DemoProfile(
        pair="test",
        max_examples=160,
        eval_limit=120,
        epochs=1,
        compat_epochs=1,
        batch_size=16,
        grad_accum=1,
        lr=3e-3,
        compat_lr=1e-3,
        warmup=2,
        lora_r=4,
        lora_alpha=8,
        max_length=128,
        top_k=16,
    ),
}


def _cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"muscle.cli.{module}", *args]


class Stages:
    """Runs the stage commands, prints them, and times them."""

    def __init__(self, out: Path):
        self.out = out
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, cmd: list[str]) -> None:
        shown = " ".join(shlex.quote(c) for c in cmd[2:]).replace("-m muscle.cli.", "muscle-", 1)
        print(f"\n=== {title}\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.out)
        if proc.returncode != 0:
            raise MuscleError(
                f"demo stage '{title}' failed (exit {proc.returncode}); re-run to resume"
            )
        self.timings.append((title, time.perf_counter() - t0))

    def call(self, title: str, fn, *args, **kwargs):
        print(f"\n=== {title}", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings.append((title, time.perf_counter() - t0))
        return result


def write_update_config(out: Path, v1_base: Path, v2_base: Path) -> Path:
    path = out / "update.toml"
    path.write_text(
        "# The demo's update: v1 -> v2 (task adapters), and the compatibility model v2c.\n"
        'task = "piqa"\n\n'
        f'[models.v1]\nbase = "{v1_base}"\nadapter = "piqa/v1"\n\n'
        f'[models.v2]\nbase = "{v2_base}"\nadapter = "piqa/v2"\n\n'
        f'[models.v2c]\nbase = "{v2_base}"\nadapter = "piqa/v2c"\n'
    )
    return path


def run_demo(
    out: str | Path = "runs/demo", profile: str = "demo", data_dir: str | Path | None = None
) -> dict:
    """Run (or resume) the demo; returns the paper-row dict of ``muscle-eval compare``."""
    from muscle.pretrain import build_model_pair

    if profile not in PROFILES:
        raise MuscleError(f"unknown demo profile {profile!r}: choose {', '.join(PROFILES)}")
    p = PROFILES[profile]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(data_dir).resolve()) if data_dir else str(EMBEDDED_DATA)
    st = Stages(out)
    t_start = time.perf_counter()

    v1_base, v2_base = st.call(
        "1/9 pretrain the v1 / v2 base models",
        build_model_pair,
        out / "models",
        profile=p.pair,
        data_dir=Path(data),
    )
    cfg = str(write_update_config(out, Path(v1_base), Path(v2_base)))
    data_opts = [
        "--data-dir",
        data,
        "--max-examples",
        str(p.max_examples),
        "--max-length",
        str(p.max_length),
    ]
    train_opts = [
        "--batch-size",
        str(p.batch_size),
        "--grad-accum",
        str(p.grad_accum),
        "--warmup",
        str(p.warmup),
        "--lora-r",
        str(p.lora_r),
        "--lora-alpha",
        str(p.lora_alpha),
    ]
    for i, name in ((2, "v1"), (3, "v2")):
        st.run(
            f"{i}/9 task adapter {name}",
            _cli(
                "train",
                "--task",
                "piqa",
                "--config",
                cfg,
                "--model",
                name,
                "--out",
                f"piqa/{name}",
                "--epochs",
                str(p.epochs),
                "--lr",
                str(p.lr),
                *data_opts,
                *train_opts,
            ),
        )
    eval_opts = ["--task", "piqa", "--data-dir", data, "--config", cfg]
    if p.eval_limit:
        eval_opts += ["--limit", str(p.eval_limit)]
    for name in ("v1", "v2"):
        st.run(
            f"4/9 predictions of {name}",
            _cli("eval", "predict", *eval_opts, "--model", name, "--out", f"preds/{name}.jsonl"),
        )
    st.run(
        "5/9 the update's regression (v1 -> v2)",
        _cli(
            "eval",
            "compare",
            "preds/v1.jsonl",
            "preds/v2.jsonl",
            "--json",
            "report_v1_v2.json",
            "--plot",
            "report_v1_v2.png",
        ),
    )
    for name in ("v1", "v2"):
        st.run(
            f"6/9 teacher cache: {name}",
            _cli(
                "cache",
                "build",
                "--config",
                cfg,
                "--model",
                name,
                "--task",
                "piqa",
                "--out",
                "cache/piqa",
                "--top-k",
                str(p.top_k),
                *data_opts,
            ),
        )
    st.run(
        "7/9 MUSCLE compatibility adapter v2c (from the cache)",
        _cli(
            "train",
            "--cache",
            "cache/piqa",
            "--out",
            "piqa/v2c",
            "--epochs",
            str(p.compat_epochs),
            "--lr",
            str(p.compat_lr),
            "--batch-size",
            str(p.batch_size),
            "--grad-accum",
            str(p.grad_accum),
            "--warmup",
            str(p.warmup),
        ),
    )
    st.run(
        "8/9 predictions of v2c",
        _cli("eval", "predict", *eval_opts, "--model", "v2c", "--out", "preds/v2c.jsonl"),
    )
    st.run(
        "9/9 the paper's table (v1, v2, v2c)",
        _cli(
            "eval",
            "compare",
            "preds/v1.jsonl",
            "preds/v2.jsonl",
            "preds/v2c.jsonl",
            "--json",
            "report.json",
            "--markdown",
            "report.md",
            "--plot",
            "report.png",
        ),
    )
    total = time.perf_counter() - t_start
    report = json.loads((out / "report.json").read_text())
    report["demo"] = {
        "profile": profile,
        "wall_seconds": round(total, 1),
        "stages": [{"stage": t, "seconds": round(s, 1)} for t, s in st.timings],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\ndemo finished in {total:.0f} s; report: {out / 'report.md'} (+ report.json, report.png)"
    )
    return report
