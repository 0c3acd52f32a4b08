"""muscle-cache end to end: the CLI, SIGKILL + resume, and a 2-rank torchrun build."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_teacher_cache import assert_same_cache

from muscle.cli.cache import main
from tiny import EMBEDDED_DATA, make_model_dir, run_cli_main

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--task",
    "piqa",
    "--data-dir",
    str(EMBEDDED_DATA),
    "--max-examples",
    "40",
    "--k",
    "16",
    "--chunk-tokens",
    "64",
    "--shard-chunks",
    "2",
    "--batch-size",
    "4",
    "--quiet",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    m1 = make_model_dir(root / "m1", seed=1)
    m2 = make_model_dir(root / "m2", seed=2)
    cfg = root / "update.toml"
    cfg.write_text(f'task = "piqa"\n[models.v1]\nbase = "{m1}"\n[models.v2]\nbase = "{m2}"\n')
    ref = root / "ref"
    assert main(["build", "--config", str(cfg), "--model", "v1", "--out", str(ref), *COMMON]) == 0
    return {"root": root, "config": cfg, "ref": ref, "m1": m1, "m2": m2}


def run_main(args, capsys):
    return run_cli_main(main, args, capsys)


def test_build_inspect_verify(setup, capsys):
    code, out, _ = run_main(["inspect", str(setup["ref"])], capsys)
    assert code == 0 and "teacher v1: complete" in out and "B/token" in out
    code, out, _ = run_main(
        ["verify", str(setup["ref"]), "--model", "v1", "--sample", "16"], capsys
    )
    assert code == 0 and "ids exact 100.0%" in out and out.strip().endswith("ok")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model", "v3"], "unknown model 'v3'"),
        (["--model", "v1", "--k", "100000", "--out", "{fresh}"], "larger than the vocabulary"),
        (["--model", "v2", "--name", "v1"], "built from another model"),
        (["--model", "v2", "--k", "8"], "its K"),
    ],
)
def test_build_errors_are_one_line(setup, capsys, args, match):
    args = [a.replace("{fresh}", str(setup["root"] / "fresh")) for a in args]
    code, _, err = run_main(
        ["build", "--config", str(setup["config"]), "--out", str(setup["ref"]), *COMMON, *args],
        capsys,
    )
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and match in last


def test_rebuilding_a_complete_teacher_is_a_no_op(setup, capsys):
    ref = setup["ref"]
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*") if p.is_file()}
    code, out, _ = run_main(
        ["build", "--config", str(setup["config"]), "--out", str(ref), *COMMON, "--model", "v1"],
        capsys,
    )
    assert code == 0 and "already complete" in out and "nothing to do" in out
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*") if p.is_file()} == before


def test_verify_unknown_teacher(setup, capsys):
    code, _, err = run_main(["verify", str(setup["ref"]), "--model", "v9"], capsys)
    assert code == 2 and "no teacher 'v9'" in err


def _cli(out: Path, setup, env=None, extra=()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "muscle.cli.cache",
        "build",
        "--config",
        str(setup["config"]),
        "--model",
        "v1",
        "--out",
        str(out),
        *COMMON,
        *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted(setup):
    out = setup["root"] / "killed"
    env = dict(os.environ, MUSCLE_CACHE_TEST_SLEEP="0.05")
    rng = random.Random(0)
    done_dir = out / "teachers" / "v1" / "done" / "c"
    kills = 0
    for _ in range(3):
        proc = _cli(out, setup, env)
        # Wait until units are being committed, then kill at a random moment.
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not done_dir.is_dir():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    proc = _cli(out, setup, env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert_same_cache(out, setup["ref"])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_build_equals_one_rank(setup):
    out = setup["root"] / "two-ranks"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 500),
        "-m",
        "muscle.cli.cache",
        "build",
        "--config",
        str(setup["config"]),
        "--model",
        "v1",
        "--out",
        str(out),
        *COMMON,
    ]
    res = subprocess.run(cmd, capture_output=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert_same_cache(out, setup["ref"])
