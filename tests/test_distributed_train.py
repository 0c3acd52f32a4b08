"""torchrun data parallelism: 2 ranks (gloo, CPU) follow the single-process run with the same
global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import EMBEDDED_DATA, make_model_dir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
BIN = Path(sys.executable).parent


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
    ]


def losses(out):
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "validation"]


def test_two_ranks_match_one_process(tmp_path):
    base = make_model_dir(tmp_path / "base")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MUSCLE_DEBUG": "1"}
    one = subprocess.run(
        [str(BIN / "muscle-train"), *train_args(base, tmp_path / "one", 8)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            "-m",
            "muscle.cli.train",
            *train_args(base, tmp_path / "two", 4),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, rel=1e-4)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
