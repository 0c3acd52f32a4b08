"""The predictions-file contract and ``muscle-eval compare`` end to end on small JSONL fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from muscle import MuscleError
from muscle.cli.eval import main
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


def test_compare_prints_the_table_and_paper_row(files, capsys):
    code, out, err = run_main(["compare", *files], capsys)
    assert code == 0 and err == ""
    assert "v1 -> v2" in out and "v1 -> v2c" in out
    nfr_row = next(line for line in out.splitlines() if line.startswith("NFR (regression)"))
    assert nfr_row.split()[-2:] == ["16.7%", "0.0%"]
    gain_row = next(line for line in out.splitlines() if line.startswith("both wrong"))
    assert gain_row.split()[-2:] == ["2", "2"]  # counts print as integers
    assert "Paper table row" in out
    assert next(line for line in out.splitlines() if line.startswith("Δ%NFR_c")).endswith("-100.0%")


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
    assert set(report) == {"comparisons", "paper_row"} and report["paper_row"] is None
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
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| NFR (regression) | 16.7% |" in out_md.read_text()


def test_three_files_json_has_the_paper_row(files, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert run_main(["compare", *files, "--json", str(out_json)], capsys)[0] == 0
    row = json.loads(out_json.read_text())["paper_row"]
    assert row["nfr"] == pytest.approx(1 / 6) and row["nfr_c"] == 0.0
    assert row["rel_delta_nfr_c"] == pytest.approx(-1.0)


def test_continuous_task_shows_na_for_discrete_metrics(tmp_path, capsys):
    def samsum(name, scores):
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
        return write_file(tmp_path, name, lines, task="samsum")

    old, new = samsum("old", [0.5, 0.4, 0.3, 0.7]), samsum("new", [0.75, 0.4, 0.1, 0.2])
    code, out, _ = run_main(["compare", old, new, "--plot", str(tmp_path / "s.png")], capsys)
    assert code == 0
    rows = {line[:28].strip(): line[28:].strip() for line in out.splitlines()}
    assert rows["NFR (regression)"] == "n/a"
    assert rows["smooth NFR (D<0)"] == "50.0%" and rows["m_r (mean |D| over D<0)"] == "35.0 pp"
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
