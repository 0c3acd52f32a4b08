"""The predictions-file contract and ``muscle-eval compare`` end to end on small JSONL fixtures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from muscle import MuscleError
from muscle.cli.eval import main
from muscle.flip_stats import COMPARE_CI_KEYS, PAPER_CI_KEYS
from muscle.gate import EXIT_GATE_FAILED
from muscle.predictions import (
    PredictionWriter,
    already_done_ids,
    meta_path,
    read_predictions,
    write_meta,
)
from tiny import run_cli_main

TARGETS = [0, 0, 2, 1, 1, 0]
PREDS = {  # v1 -> v2: 1 gain, 1 regression, 1 both-wrong change (see test_metrics.py)
    "v1": [0, 1, 2, 3, 1, 2],
    "v2": [0, 0, 1, 2, 1, 2],
    "v2c": [0, 0, 2, 3, 1, 2],
}


def _lines(preds, targets=TARGETS, ids=None):
    ids = range(len(preds)) if ids is None else ids
    return [
        json.dumps(
            {"id": i, "prediction": p, "target": t, "correct": p == t, "score": float(p == t)}
        )
        for i, p, t in zip(ids, preds, targets, strict=False)
    ]


def write_file(folder: Path, name: str, lines, task: str | None = "piqa") -> str:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if task:
        write_meta(path, {"task": task})
    return str(path)


@pytest.fixture
def files(tmp_path):
    return [write_file(tmp_path, name, _lines(p)) for name, p in PREDS.items()]


def run_main(args, capsys):
    return run_cli_main(main, args, capsys)


# ------------------------------------------------------------------------ the file contract


def test_sidecar_has_the_same_stem(tmp_path):
    assert meta_path(tmp_path / "preds.jsonl") == tmp_path / "preds.meta.json"
    write_meta(tmp_path / "preds.jsonl", {"task": "gsm8k"})
    assert json.loads((tmp_path / "preds.meta.json").read_text()) == {"format": 1, "task": "gsm8k"}
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_writer_resumes_after_a_truncated_last_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    with PredictionWriter(path) as w:
        assert w.write([json.loads(line) for line in _lines([0, 1])]) == 2
    with open(path, "a", encoding="utf-8") as f:  # a kill in the middle of the next write
        f.write('{"id": 2, "predic')
    assert already_done_ids(path) == {0, 1}
    assert path.read_text(encoding="utf-8").endswith("}\n")  # the partial line is gone
    with PredictionWriter(path) as w:
        assert w.done_ids == {0, 1}
        with pytest.raises(MuscleError, match="already written"):
            w.write([json.loads(_lines([0])[0])])
        w.write([json.loads(line) for line in _lines([2], ids=[2])])
    records, meta = read_predictions(path)
    assert [r["id"] for r in records] == [0, 1, 2] and meta is None


def test_damage_before_the_last_line_is_not_repaired(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(_lines([0])[0] + "\nnot json\n" + _lines([1], ids=[1])[0] + "\n")
    with pytest.raises(MuscleError, match=r"preds.jsonl:2: malformed JSON"):
        already_done_ids(path)


# ---------------------------------------------------------------------------------- the CLI


def row_of(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(label))


def test_compare_prints_the_table_and_paper_row(files, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_main(["compare", *files, "--json", str(out_json)], capsys)
    assert code == 0 and err == ""
    assert "v1 -> v2" in out and "v1 -> v2c" in out
    # Each rate with its interval, in percent, as the JSON has it.
    cells = re.findall(r"(\S+%) \[([-+\d.]+), ([-+\d.]+)\]", row_of(out, "NFR (regression)"))
    assert [c[0] for c in cells] == ["16.7%", "0.0%"]
    ci = json.loads(out_json.read_text())["ci"]["comparisons"]
    for (_, low, high), comp in zip(cells, ci, strict=True):
        assert (low, high) == (
            f"{100 * comp['nfr']['low']:.1f}",
            f"{100 * comp['nfr']['high']:.1f}",
        )
    assert row_of(out, "both wrong").split()[-2:] == ["2", "2"]  # counts print as integers
    # 1 gain and 1 regression v1 -> v2; 1 gain, no regression v1 -> v2c.
    assert row_of(out, "test gain b vs regression c").split()[-6:] == [
        *("b=1", "c=1", "p=1.000"),
        *("b=1", "c=0", "p=1.000"),
    ]
    assert "Paper table row" in out
    assert row_of(out, "Δ%NFR_c").endswith("-100.0%")
    assert row_of(out, "ΔNFR_c").split()[1:3] == ["-16.7", "pp"]
    assert row_of(out, "test ΔNFR_c: b avoided, c added").endswith("b=1 c=0 p=1.000")
    assert "95% paired bootstrap percentile interval (10000 resamples, seed 0)" in out


def test_compare_writes_json_markdown_and_png(files, tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    code, _, _ = run_main(
        [
            "compare",
            files[0],
            files[1],
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--markdown",
            str(out_md),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out_json.read_text())
    assert list(report) == ["comparisons", "paper_row", "ci", "tests"]
    assert report["paper_row"] is None
    (cmp,) = report["comparisons"]
    assert list(cmp) == [
        "old",
        "new",
        "n",
        "old_score",
        "new_score",
        "pfr",
        "nfr",
        "nfr_mc",
        "pfr_smooth",
        "nfr_smooth",
        "m_g",
        "m_r",
        "both_correct",
        "gain",
        "regression",
        "both_wrong",
    ]
    assert (cmp["old"], cmp["new"], cmp["regression"]) == (files[0], files[1], 1)
    assert cmp["nfr_mc"] == pytest.approx(2 / 6)
    ci, tests = report["ci"], report["tests"]
    assert list(ci) == ["method", "level", "resamples", "seed", "comparisons", "paper_row"]
    assert (ci["level"], ci["resamples"], ci["seed"], ci["paper_row"]) == (0.95, 10000, 0, None)
    assert list(ci["comparisons"][0]) == ["old", "new", *COMPARE_CI_KEYS]
    assert list(ci["comparisons"][0]["nfr"]) == ["low", "high"]
    assert list(tests) == ["method", "comparisons", "paper_row"] and tests["paper_row"] is None
    assert tests["comparisons"] == [
        {
            "old": files[0],
            "new": files[1],
            "flips": {"b": 1, "c": 1, "p": 1.0},
            "smooth_flips": {"b": 1, "c": 1, "p": 1.0},
        }
    ]
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| NFR (regression) | 16.7% [" in out_md.read_text()
    assert "| test gain b vs regression c | b=1 c=1 p=1.000 |" in out_md.read_text()


def test_three_files_json_has_the_paper_row(files, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert run_main(["compare", *files, "--json", str(out_json)], capsys)[0] == 0
    report = json.loads(out_json.read_text())
    row = report["paper_row"]
    assert row["nfr"] == pytest.approx(1 / 6) and row["nfr_c"] == 0.0
    assert row["rel_delta_nfr_c"] == pytest.approx(-1.0)
    assert list(report["ci"]["paper_row"]) == PAPER_CI_KEYS
    # v2c never regresses where v1 was right: every resample has NFR_c = 0.
    assert report["ci"]["paper_row"]["nfr_c"] == {"low": 0.0, "high": 0.0}
    assert report["tests"]["paper_row"] == {
        "nfr_c_vs_nfr": {"b": 1, "c": 0, "p": 1.0},
        "score_c_vs_score": {"b": 1, "c": 0, "p": 1.0},
        "nfr_smooth_c_vs_nfr_smooth": {"b": 1, "c": 0, "p": 1.0},
        "score_sign_c_vs_score": {"b": 1, "c": 0, "p": 1.0},
    }


def samsum(folder: Path, name: str, scores) -> str:
    """A continuous-score predictions file (correct null, ROUGE-like scores)."""
    lines = [
        json.dumps(
            {
                "id": f"s{i}",
                "prediction": f"{name} {i}",
                "target": "ref",
                "correct": None,
                "score": s,
            }
        )
        for i, s in enumerate(scores)
    ]
    return write_file(folder, name, lines, task="samsum")


def test_continuous_task_shows_na_for_discrete_metrics(tmp_path, capsys):
    old = samsum(tmp_path, "old", [0.5, 0.4, 0.3, 0.7])
    new = samsum(tmp_path, "new", [0.75, 0.4, 0.1, 0.2])
    code, out, _ = run_main(["compare", old, new, "--plot", str(tmp_path / "s.png")], capsys)
    assert code == 0
    rows = {line[:28].strip(): line[28:].strip() for line in out.splitlines()}
    assert rows["NFR (regression)"] == "n/a"
    assert rows["smooth NFR (D<0)"].startswith("50.0% [")
    assert rows["m_r (mean |D| over D<0)"].startswith("35.0 pp [")
    assert rows["test gain b vs regression c"] == "n/a"
    assert rows["test D>0 b vs D<0 c"] == "b=1 c=2 p=1.000"  # D = +0.25, 0, -0.2, -0.5
    assert (tmp_path / "s.png").stat().st_size > 10_000


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (compare arguments, fragments the error line must contain)."""
    good = write_file(tmp_path, "good", _lines(PREDS["v1"]))
    return {
        "different tasks": (
            [good, write_file(tmp_path, "other", _lines(PREDS["v2"]), task="hellaswag")],
            ["different tasks", "'piqa'", "'hellaswag'"],
        ),
        "different ids": (
            [good, write_file(tmp_path, "shifted", _lines(PREDS["v2"], ids=range(3, 9)))],
            ["3 ids only in OLD", "3 only in NEW", "--intersect"],
        ),
        "duplicate ids": (
            [good, write_file(tmp_path, "dup", _lines(PREDS["v2"], ids=[0, 1, 2, 3, 3, 5]))],
            ["duplicate id 3 on lines 4 and 5"],
        ),
        "malformed line": (
            [good, write_file(tmp_path, "bad", [*_lines(PREDS["v2"])[:2], '{"id": 2,'])],
            ["bad.jsonl:3: malformed JSON"],
        ),
        "empty file": ([good, write_file(tmp_path, "empty", [])], ["empty.jsonl", "empty"]),
        "missing key": (
            [good, write_file(tmp_path, "nokey", ['{"id": 0, "prediction": 1}'])],
            ["nokey.jsonl:1", "missing required key", "target"],
        ),
        "no such file": ([good, str(tmp_path / "nope.jsonl")], ["no such predictions file"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "different tasks",
        "different ids",
        "duplicate ids",
        "malformed line",
        "empty file",
        "missing key",
        "no such file",
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, capsys):
    args, fragments = _bad_inputs(tmp_path)[case]
    code, out, err = run_main(["compare", *args], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


def test_intersect_compares_the_common_ids(tmp_path, capsys):
    args, _ = _bad_inputs(tmp_path)["different ids"]
    code, out, _ = run_main(["compare", *args, "--intersect"], capsys)
    n_row = next(line for line in out.splitlines() if line.startswith("examples (n)"))
    assert code == 0 and n_row.split()[-1] == "3"  # ids 3, 4, 5


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    args, _ = _bad_inputs(tmp_path)["different ids"]
    proc = subprocess.run(
        [sys.executable, "-m", "muscle.cli.eval", "compare", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert len(proc.stderr.splitlines()) == 1


# ------------------------------------------------------------------- uncertainty options


def random_files(folder: Path, n: int = 200) -> list[str]:
    """v1, v2 with many discordant examples (so different seeds give different intervals)."""
    import numpy as np

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=n).tolist()
    out = []
    for name in ("v1", "v2"):
        preds = [t if rng.random() < 0.6 else 1 - t for t in targets]
        out.append(write_file(folder, name, _lines(preds, targets)))
    return out


def test_seed_and_resamples_reach_the_json(tmp_path, capsys):
    files = random_files(tmp_path)

    def run(*opts):
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
        assert run_main(["compare", *files, "--json", str(path), *opts], capsys)[0] == 0
        return json.loads(path.read_text())["ci"]

    a, b = run("--bootstrap", "500", "--seed", "1"), run("--bootstrap", "500", "--seed", "1")
    c = run("--bootstrap", "500", "--seed", "2")
    assert a == b and (a["resamples"], a["seed"]) == (500, 1)
    assert c["comparisons"] != a["comparisons"] and c["seed"] == 2


@pytest.mark.parametrize("count", ["0", "-3"])
def test_bootstrap_count_below_one_is_a_one_line_error(count, files, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_main(
        ["compare", *files, "--bootstrap", count, "--json", str(out_json)], capsys
    )
    assert code == 2 and out == "" and not out_json.exists()
    assert err.startswith("error: --bootstrap must be at least 1") and err.count("\n") == 1


# -------------------------------------------------------------------------------- the gate


def test_gate_violated_exits_3_and_changes_nothing_else(files, tmp_path, capsys):
    plain_json, gated_json = tmp_path / "plain.json", tmp_path / "gated.json"
    code, out_plain, err = run_main(["compare", *files, "--json", str(plain_json)], capsys)
    assert code == 0 and err == ""
    gate = ["--fail-if", "nfr > 0.1", "--fail-if", "score_drop > 0.005", "--fail-if", "pfr > 0.1"]
    code, out, err = run_main(["compare", *files, "--json", str(gated_json), *gate], capsys)
    assert code == EXIT_GATE_FAILED == 3
    assert out == out_plain and gated_json.read_text() == plain_json.read_text()
    # v1 -> v2: NFR 1/6 > 0.1 and PFR 1/6 > 0.1; v1 -> v2c: PFR 1/6 > 0.1. No score drops.
    assert err.splitlines() == [
        "gate failed for v1 -> v2: --fail-if 'nfr > 0.1' holds (nfr = 0.166667 = 16.67%)",
        "gate failed for v1 -> v2: --fail-if 'pfr > 0.1' holds (pfr = 0.166667 = 16.67%)",
        "gate failed for v1 -> v2c: --fail-if 'pfr > 0.1' holds (pfr = 0.166667 = 16.67%)",
    ]


def test_gate_passed_exits_0(files, capsys):
    gate = ["--fail-if", "nfr > 0.2", "--fail-if", "score_drop_ci_high > 0.9"]
    code, _, err = run_main(["compare", *files, *gate], capsys)
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "expr, fragment",
    [
        ("nfr >> 0.1", "is not '<metric> <op> <number>'"),
        ("regressions > 0.1", "unknown metric 'regressions'"),
        ("nfr > 3", "write 0.03 or 3% for percent"),
    ],
)
def test_bad_gate_expression_is_one_line_and_writes_nothing(
    expr, fragment, files, tmp_path, capsys
):
    out_json = tmp_path / "r.json"
    code, out, err = run_main(
        ["compare", *files, "--json", str(out_json), "--fail-if", expr], capsys
    )
    assert code == 2 and out == "" and not out_json.exists()
    assert err.startswith("error: --fail-if") and err.count("\n") == 1 and fragment in err


def test_gate_on_a_metric_the_task_lacks_is_a_usage_error(tmp_path, capsys):
    old = samsum(tmp_path, "old", [0.5, 0.4, 0.3, 0.7])
    new = samsum(tmp_path, "new", [0.75, 0.4, 0.1, 0.2])
    out_json = tmp_path / "r.json"
    args = ["compare", old, new, "--json", str(out_json), "--fail-if", "nfr > 0.01"]
    code, out, err = run_main(args, capsys)
    assert code == 2 and out == "" and not out_json.exists()
    assert "nfr is undefined for old -> new" in err and err.count("\n") == 1
    # The smooth metric is defined: 2 of 4 examples have D < 0.
    code, _, err = run_main(["compare", old, new, "--fail-if", "nfr_smooth >= 50%"], capsys)
    assert code == 3 and "nfr_smooth = 0.5 = 50.00%" in err


def test_gate_exit_status_through_the_module_entry_point(files):
    proc = subprocess.run(
        [sys.executable, "-m", "muscle.cli.eval", "compare", *files[:2], "--fail-if", "nfr > 0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "gate failed for v1 -> v2: --fail-if 'nfr > 0' holds (nfr = 0.166667 = 16.67%)"
    ]
