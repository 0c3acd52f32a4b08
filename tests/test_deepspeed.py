"""DeepSpeed (``--deepspeed ds.json``, ZeRO 0-2) on CPU.

2 ranks through DeepSpeed ZeRO-2 (gloo) follow the plain single-process run with the same global
batch, also across an interruption and resume from DeepSpeed's own checkpoint; configs muscle
cannot honour (ZeRO 3, their own optimizer, contradicting batch sizes) are refused up front with
one line and exit status 2, before anything is loaded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from muscle import MuscleError
from muscle.config import TrainConfig
from muscle.steppers import resolve_deepspeed_config
from tiny import EMBEDDED_DATA, make_model_dir

BIN = Path(sys.executable).parent
ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
}

# Rank processes run muscle-train's CLI with fit() told to stop after 7 optimizer steps, as if
# killed: the run is left with the checkpoint of step 6 (--checkpoint-every 2).
INTERRUPTED = """
import sys
import muscle.recipe
fit = muscle.recipe.fit
muscle.recipe.fit = lambda *a, **k: fit(*a, **(k | {"stop_after_steps": 7}))
from muscle.cli.train import main
main(sys.argv[1:])
"""


def train_args(base, out, batch_size):
    return [
        "--task",
        "piqa",
        "--base",
        str(base),
        "--out",
        str(out),
        "--data-dir",
        str(EMBEDDED_DATA),
        "--max-examples",
        "94",
        "--max-length",
        "128",
        "--epochs",
        "2",
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "2",
        "--warmup",
        "2",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--checkpoint-every",
        "2",
    ]


def log_rows(out, split):
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_two_ranks_match_one_process_across_resume(tmp_path):
    pytest.importorskip("deepspeed")
    base = make_model_dir(tmp_path / "base")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(ZERO2))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MUSCLE_DEBUG": "1", "DS_ACCELERATOR": "cpu"}
    one = subprocess.run(
        [str(BIN / "muscle-train"), *train_args(base, tmp_path / "one", 8)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    two = tmp_path / "two"
    args = [*train_args(base, two, 4), "--deepspeed", str(ds)]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29535"]
    (tmp_path / "interrupted.py").write_text(INTERRUPTED)
    cut = subprocess.run(
        [*torchrun, str(tmp_path / "interrupted.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cut.returncode != 0  # interrupted
    assert (two / ".checkpoint" / "deepspeed").is_dir(), cut.stderr[-3000:]
    assert [r["step"] for r in log_rows(two, "train")] == list(range(1, 8))

    done = subprocess.run(
        [*torchrun, "-m", "muscle.cli.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Resumed from step 6 (not restarted): the log has each step once.
    assert [r["step"] for r in log_rows(two, "train")] == list(range(1, 11))
    run = json.loads((two / "muscle_run.json").read_text())
    assert run["status"] == "done" and run["deepspeed"]["zero_optimization"]["stage"] == 2
    assert not (two / ".checkpoint").exists()

    # The same arithmetic up to the order of float32 sums (the gradient of a global batch of 8
    # is two half-batch gradients averaged by gloo's reduce-scatter, not one backward), so the
    # runs differ by float32 rounding only: seen 3e-8 relative on the loss, 7e-6 absolute on the
    # adapter (|w| <= 0.17) after 10 AdamW steps at lr 1e-2. rel=1e-5 leaves 300x room for that
    # and still catches the subtlest bug tried: dropping the per-rank token weighting moves the
    # loss by 1.3e-4 (a missed accumulation boundary: 1e-2).
    l1 = [r["loss"] for r in log_rows(tmp_path / "one", "validation")]
    l2 = [r["loss"] for r in log_rows(two, "validation")]
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, rel=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))  # a plain PEFT adapter
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def cli(args):
    """muscle-train in-process: (exit status, stderr)."""
    import contextlib
    import io

    from muscle.cli.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
        ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
        (
            {"train_micro_batch_size_per_gpu": 16},
            "train_micro_batch_size_per_gpu=16 but the run has 4",
        ),
    ],
)
def test_unsupported_config_is_one_line_exit_2(tmp_path, bad, message):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(bad))
    out = tmp_path / "out"
    code, err = cli(
        [
            "--task",
            "piqa",
            "--base",
            str(tmp_path / "nowhere"),
            "--out",
            str(out),
            "--data-dir",
            str(EMBEDDED_DATA),
            "--batch-size",
            "4",
            "--deepspeed",
            str(ds),
        ]
    )
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()  # refused before the run directory is claimed


def test_config_is_filled_from_train_options():
    cfg = TrainConfig(batch_size=4, grad_accum=2, max_grad_norm=1.0)
    got = resolve_deepspeed_config(
        {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": "auto"},
        cfg,
        world_size=2,
        check_installed=False,
    )
    assert got["train_micro_batch_size_per_gpu"] == 4 and got["gradient_accumulation_steps"] == 2
    assert got["train_batch_size"] == 16 and got["gradient_clipping"] == 1.0
    assert (
        resolve_deepspeed_config(got, cfg, world_size=2, check_installed=False) == got
    )  # idempotent


def test_unreadable_config(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 2")
    with pytest.raises(MuscleError, match="not valid JSON"):
        resolve_deepspeed_config(bad, TrainConfig(), check_installed=False)
    with pytest.raises(MuscleError, match="cannot read the DeepSpeed config"):
        resolve_deepspeed_config(tmp_path / "missing.json", TrainConfig(), check_installed=False)
