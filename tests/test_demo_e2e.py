"""CI's end-to-end run: `muscle-demo --profile test` (the same code path as `make demo`, smaller
sizes), then the table it reports is checked against the predictions files it wrote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def read(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [str(Path(sys.executable).parent / "muscle-demo"), "--out", str(out), "--profile", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Paper table row" in proc.stdout
    for f in ("report.md", "report.json", "report.png", "report_v1_v2.png", "update.toml"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    row = report["paper_row"]

    # Recompute the paper's numbers from the predictions files, by hand.
    v1, v2, v2c = (read(out / "preds" / f"{m}.jsonl") for m in ("v1", "v2", "v2c"))
    assert v1.keys() == v2.keys() == v2c.keys() and len(v1) == 120
    n = len(v1)
    acc = {
        name: sum(r["correct"] for r in p.values()) / n
        for name, p in (("v1", v1), ("v2", v2), ("v2c", v2c))
    }
    nfr = sum(v1[i]["correct"] and not v2[i]["correct"] for i in v1) / n
    nfr_c = sum(v1[i]["correct"] and not v2c[i]["correct"] for i in v1) / n
    nfr_mc_c = (
        sum((not v2c[i]["correct"]) and v2c[i]["prediction"] != v1[i]["prediction"] for i in v1) / n
    )
    assert row["n"] == n
    assert row["score_v1"] == pytest.approx(acc["v1"])
    assert row["score_v2"] == pytest.approx(acc["v2"])
    assert row["score_v2c"] == pytest.approx(acc["v2c"])
    assert row["nfr"] == pytest.approx(nfr)
    assert row["nfr_c"] == pytest.approx(nfr_c)
    assert row["delta_nfr_c"] == pytest.approx(nfr_c - nfr)
    assert row["nfr_mc_c"] == pytest.approx(nfr_mc_c)
    if nfr > 0:
        assert row["rel_delta_nfr_c"] == pytest.approx((nfr_c - nfr) / nfr)

    # Every stage's artefacts are real: adapters, a complete cache with both teachers.
    for m in ("v1", "v2", "v2c"):
        assert (out / "piqa" / m / "adapter_model.safetensors").is_file()
    side = json.loads((out / "piqa" / "v2c" / "muscle_adapter.json").read_text())
    assert side["kind"] == "compat" and side["mode"] == "cache"
    from muscle.teacher_cache import CacheReader

    reader = CacheReader(out / "cache" / "piqa", teachers=("v1", "v2"))
    assert reader.num_examples("train") + reader.num_examples("validation") == 160

    # Re-running skips every finished stage and reproduces the same table.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((out / "report.json").read_text())["paper_row"] == row
