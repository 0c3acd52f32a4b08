"""The test data in tests/fixtures/data: a valid data dir for every task, and what NOTICE.md says.

Its real-data files are the first lines of the full files, unedited; its SAMSum files are
synthetic. The checks against the full HellaSwag and SAMSum files need a full data dir
(``MUSCLE_DATA_DIR``, laid out as DATA_FORMAT.md says) and are skipped without one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from muscle.tasks import SPLITS, TASKS, load_examples
from tiny import EMBEDDED_DATA, FIXTURE_DATA

FULL_DATA = Path(os.environ["MUSCLE_DATA_DIR"]) if os.environ.get("MUSCLE_DATA_DIR") else None


def _notice_rows() -> dict[str, str]:
    """NOTICE.md's table: file -> its "lines" cell."""
    rows = re.findall(
        r"^\| `([^`]+)` \| ([^|]+) \|", (FIXTURE_DATA / "NOTICE.md").read_text(), re.M
    )
    return {path: lines.strip() for path, lines in rows}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("split", SPLITS)
def test_every_task_loads_every_split(task, split):
    examples = load_examples(task, split, data_dir=FIXTURE_DATA)
    assert examples and all(ex.context and ex.answer for ex in examples)


def test_notice_lists_every_data_file_with_its_line_count():
    rows = _notice_rows()
    files = sorted(str(p.relative_to(FIXTURE_DATA)) for p in FIXTURE_DATA.glob("*/*.jsonl"))
    assert sorted(rows) == files
    for name in files:
        n = len((FIXTURE_DATA / name).read_text(encoding="utf-8").splitlines())
        assert rows[name].split()[0] == str(n), name


@pytest.mark.parametrize(
    "name", ["piqa/train.jsonl", "piqa/valid.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl"]
)
def test_piqa_and_gsm8k_are_unedited_first_lines_of_the_embedded_files(name):
    part = (FIXTURE_DATA / name).read_bytes()
    assert part.endswith(b"\n") and (EMBEDDED_DATA / name).read_bytes().startswith(part)


def test_hellaswag_slice_holds_the_first_idx_in_order():
    with (FIXTURE_DATA / "hellaswag" / "validation.jsonl").open(encoding="utf-8") as f:
        idx = [json.loads(line)["idx"] for line in f]
    # 24 evaluation records (idx % 4 == 0) for tests/test_lm_eval_agreement.py.
    assert idx == list(range(96))


@pytest.mark.skipif(
    FULL_DATA is None, reason="set MUSCLE_DATA_DIR to a full data dir (DATA_FORMAT.md) to compare"
)
def test_hellaswag_slice_is_the_first_lines_of_the_full_file():
    full = FULL_DATA / "hellaswag" / "validation.jsonl"
    if not full.is_file():
        pytest.skip(f"{full} not found")
    part = (FIXTURE_DATA / "hellaswag" / "validation.jsonl").read_bytes()
    assert full.read_bytes().startswith(part)


def _samsum_texts(folder: Path) -> set[str]:
    """Every dialogue (line breaks normalised) and summary of a samsum/ folder."""
    out = set()
    for path in folder.glob("*.jsonl"):
        for line in path.open(encoding="utf-8"):
            rec = json.loads(line)
            out |= {rec["dialogue"].replace("\r\n", "\n").strip(), rec["summary"].strip()}
    return out


def test_samsum_is_synthetic():
    for name in ("validation", "test"):
        recs = [json.loads(x) for x in (FIXTURE_DATA / "samsum" / f"{name}.jsonl").open()]
        assert all(r["id"].startswith("synth-") for r in recs)
        assert {"\r\n" in r["dialogue"] for r in recs} == {True, False}  # both line breaks


@pytest.mark.skipif(
    FULL_DATA is None, reason="set MUSCLE_DATA_DIR to a full data dir (DATA_FORMAT.md) to compare"
)
def test_samsum_fixtures_hold_no_text_of_the_real_corpus():
    real = FULL_DATA / "samsum"
    if not real.is_dir():
        pytest.skip(f"{real} not found")
    assert not _samsum_texts(real) & _samsum_texts(FIXTURE_DATA / "samsum")
