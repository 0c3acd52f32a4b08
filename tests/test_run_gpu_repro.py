"""benchmarks/run_gpu_repro.sh (the paper-size reproduction for a GPU) at tiny size on the CPU:
tiny bases, the fixture data, every stage of benchmarks/reproduce.py, then a rerun that skips all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import FIXTURE_DATA, make_model_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_gpu_repro.sh"


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_paper_profile_runs_every_stage_and_resumes(tmp_path):
    v1 = make_model_dir(tmp_path / "v1", seed=1, init_std=0.2)
    v2 = make_model_dir(tmp_path / "v2", seed=2, init_std=0.2)
    results = tmp_path / "results"
    env = {
        "DATA_DIR": str(FIXTURE_DATA),
        "PY": sys.executable,
        "DEVICE": "cpu",
        "ROOT": str(tmp_path / "root"),
        "RESULTS": str(results),
        "OUT": str(tmp_path / "out"),
        "BASE_V1": str(v1),
        "BASE_V2": str(v2),
        "OMP_NUM_THREADS": "1",
        "DEADLINE_S": "1100",  # a loaded 2-core CI box; the GPU default is 540
    }
    args = ("--limit-test", "8", "--online", "--ablation", "--tail", "--answer-only",
            "--ce-weight", "0.3", "--train-pool-eval")  # fmt: skip
    p = _run(env, *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    piqa = results / "piqa"
    labels = ["v1", "v2", "v2c", "v2c-online", "v2c-tail", "v2c-answer", "v2c-ce0.3"] + [
        f"v2c-{m}" for m in ("always_v1", "v1_correct", "token_ll", "seq_ll")
    ]
    rows = {}
    for label in labels:
        f = piqa / "pred" / f"{label}.jsonl"
        rows[label] = [json.loads(line) for line in f.read_text().splitlines()]
        assert len(rows[label]) == 8, label  # the whole fixture validation split
        assert Path(str(f) + ".done").is_file()
    # the paper's Table 7 sizes reached the adapters
    for name in ("v1", "v2", "v2c"):
        cfg = json.loads((piqa / "adapters" / name / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (128, 156.0), name
    run = json.loads((piqa / "adapters" / "v2" / "muscle_run.json").read_text())
    assert "10" in json.dumps(run)  # epochs recorded somewhere in the run record
    # the table's numbers are the predictions' numbers (recomputed here independently)
    rep = json.loads((piqa / "compare-v2c.json").read_text())["paper_row"]
    assert rep["n"] == 8
    for key, label in (("score_v1", "v1"), ("score_v2", "v2"), ("score_v2c", "v2c")):
        want = sum(bool(r["correct"]) for r in rows[label]) / 8
        assert rep[key] == pytest.approx(want), key
    neg = sum(
        bool(a["correct"]) and not b["correct"] for a, b in zip(rows["v1"], rows["v2"], strict=True)
    )
    assert rep["nfr"] == pytest.approx(neg / 8)
    online = json.loads((piqa / "compare-v2c-online.json").read_text())["paper_row"]
    assert online["n"] == 8
    tail = json.loads((piqa / "compare-v2c-tail.json").read_text())["paper_row"]
    assert tail["n"] == 8
    assert json.loads((piqa / "compare-v2c-answer.json").read_text())["paper_row"]["n"] == 8
    # --ce-weight: its v2c trained with that cross-entropy weight, and the table shows it
    assert json.loads((piqa / "pred" / "v2c-ce0.3.muscle_run.json").read_text())["compat"][
        "ce_weight"
    ] == pytest.approx(0.3)
    results_json = json.loads((results / "results.json").read_text())
    assert results_json["tasks"]["piqa"]["ce"]["0.3"]["paper_row"]["n"] == 8
    assert "| piqa | v2c + CE 0.3 | 8 |" in p.stdout

    def learned_tokens(label):  # summed over its logged training steps
        log = (piqa / "pred" / f"{label}.train_log.jsonl").read_text().splitlines()
        return sum(r["n_tokens"] for r in map(json.loads, log) if r.get("split") == "train")

    # the answer-only cache holds the answers' positions only: fewer tokens to learn on
    assert 0 < learned_tokens("v2c-answer") < learned_tokens("v2c")
    # the train-pool evaluation scored every model on the compat training examples: the
    # fixture's 10 training lines, 80% of them (split_indices) -> 8
    pool = piqa / "trainpool"
    for label in labels:
        f = pool / "pred" / f"{label}.jsonl"
        assert len(f.read_text().splitlines()) == 8, label
    assert json.loads((pool / "compare-v2c-tail.json").read_text())["paper_row"]["n"] == 8
    timings = json.loads((results / "timings.json").read_text())
    assert {"piqa-train-v1", "piqa-cache-v2", "piqa-train-v2c-online"} <= set(timings)
    assert {"piqa-cache-tail-v1", "piqa-train-v2c-tail"} <= set(timings)
    assert {"piqa-cache-answer-v2", "piqa-train-v2c-answer"} <= set(timings)
    assert (tmp_path / "out" / "results" / "piqa" / "pred" / "v2c.jsonl").is_file()  # copied out
    # a rerun finds every stage done and trains / predicts nothing
    p2 = _run(env, *args)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    for ran in ("[run ] piqa-train-", "[run ] piqa-predict-", "[run ] piqa-trainpool-predict-"):
        assert ran not in p2.stdout, ran
    assert "[skip] piqa-predict-v1:" in p2.stdout and "[skip] piqa-train+predict-v2c:" in p2.stdout


def test_missing_data_dir_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "MUSCLE_DATA_DIR")}
    p = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "DATA_DIR" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _reproduce_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_a_stage_another_invocation_holds_is_waited_for_then_skipped(tmp_path, capsys):
    import threading
    import time
    from types import SimpleNamespace

    from muscle.locking import writer_lock

    rp = _reproduce_module()
    run = SimpleNamespace(root=tmp_path / "root", out=tmp_path / "out")
    done = tmp_path / "stage.done"
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    held = threading.Event()

    def other_invocation():  # holds the stage, finishes it, lets go
        with writer_lock(run.root / "logs" / "s.stage.lock", what="x"):
            held.set()
            time.sleep(0.5)
            done.touch()

    t = threading.Thread(target=other_invocation)
    t.start()
    held.wait()
    assert rp.stage(run, "s", cmd, done, {}) is False  # waited, then found it done
    t.join()
    assert not marker.exists() and "[wait]" in capsys.readouterr().out
    # Free and not done: it runs, and its wall time lands in timings.json.
    done.unlink()
    times: dict = {}
    assert rp.stage(run, "s", cmd, done, times) is True
    assert marker.exists() and "s" in json.loads((run.out / "timings.json").read_text())
    assert times["s"] >= 0


@pytest.mark.parametrize("weight", ["0", "1.5", "-0.5"])
def test_a_ce_weight_outside_0_1_is_one_line(weight, capsys):
    rp = _reproduce_module()
    with pytest.raises(SystemExit) as e:
        rp.main(["--data-dir", str(FIXTURE_DATA), "--ce-weight", weight])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ce-weight" in err[0] and "(0, 1]" in err[0]
