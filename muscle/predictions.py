"""The predictions-file contract (format 1): what ``muscle-eval predict`` writes and ``compare`` reads.

A predictions file is UTF-8 JSON Lines, one object per example, each line ending in ``\\n``::

    {"id": 17, "prediction": 1, "target": 0, "correct": false, "score": 0.0, ...}

Required keys:

* ``id`` (str or int, not bool): unique within the file; examples of two files are paired by it.
* ``prediction``: any JSON value; what the model answered, compared across models for NFR_mc
  by value and type (canonical JSON: ``2`` and ``"2"`` differ). Multiple choice: the chosen
  index (int). GSM8K: the extracted, normalised answer (``metrics.gsm8k_answer``). SAMSum: the
  generated summary.
* ``target``: any JSON value; the gold answer in the same form as ``prediction``.
* ``correct``: bool, or null for tasks without a right answer (continuous scores, e.g. ROUGE-1).
  Within one file either every record has a bool or every record has null.
* ``score``: finite number; the per-example task metric (1.0/0.0 for acc and exact match,
  ROUGE-1 F in [0, 1] for SAMSum). The smooth metrics use D = score_new - score_old.

Any other keys are task-specific (e.g. ``loglikelihoods``, ``acc_norm``, ``generation``) and
are carried along untouched. Blank lines are ignored.

Sidecar: ``preds.jsonl`` has its metadata in ``preds.meta.json`` (same stem), one JSON object
with at least ``{"format": 1, "task": "piqa"}`` (plus model, adapter, split, ... as the
writer likes). ``compare`` refuses to pair files whose sidecars name different tasks.

Writing is resumable: :class:`PredictionWriter` appends whole lines and fsyncs each batch; a run
killed mid-write leaves at most one line without its ``\\n``, which the next writer (or
:func:`already_done_ids`) truncates away before appending. The sidecar is written atomically.
A writer holds the lock file :func:`lock_path` beside the predictions file while it writes.
``PREDICTIONS_FORMAT.md`` beside this module is the same contract for readers without Python.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from muscle import MuscleError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("id", "prediction", "target", "correct", "score")
META_SUFFIX = ".meta.json"

PathLike = str | os.PathLike


def lock_path(path: PathLike) -> Path:
    """The writer lock of a predictions file: ``preds.jsonl`` -> ``.preds.jsonl.lock`` beside it
    (``muscle.locking.writer_lock``: held while a writer appends, empty otherwise)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def meta_path(path: PathLike) -> Path:
    """The sidecar of a predictions file: ``preds.jsonl`` -> ``preds.meta.json``."""
    path = Path(path)
    if path.name.endswith(META_SUFFIX):
        return path
    return path.with_name(path.stem + META_SUFFIX) if path.suffix else Path(f"{path}{META_SUFFIX}")


# ------------------------------------------------------------------------------ validation


def validate_record(rec: Any, where: str) -> None:
    """Raise a MuscleError (prefixed with ``where``, e.g. ``preds.jsonl:12``) if ``rec`` breaks
    the contract."""
    if not isinstance(rec, dict):
        raise MuscleError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise MuscleError(f"{where}: missing required key(s) {', '.join(missing)}")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise MuscleError(f"{where}: `id` must be a string or an integer, got {rid!r}")
    if rec["correct"] is not None and not isinstance(rec["correct"], bool):
        raise MuscleError(f"{where}: `correct` must be true, false or null, got {rec['correct']!r}")
    score = rec["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise MuscleError(f"{where}: `score` must be a finite number, got {score!r}")


def _parse_lines(path: Path, text: str) -> list[dict]:
    """Records of a predictions file's text, validated, ids unique, ``correct`` consistent."""
    records: list[dict] = []
    first_line: dict[Any, int] = {}
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if lineno == len(lines) and not text.endswith("\n"):
                hint = " (the last line is incomplete: an interrupted run? rerun predict to resume)"
            raise MuscleError(f"{where}: malformed JSON line ({e.msg}){hint}") from None
        validate_record(rec, where)
        rid = rec["id"]
        if rid in first_line:
            raise MuscleError(
                f"{path}: duplicate id {json.dumps(rid)} on lines {first_line[rid]} and {lineno}"
            )
        first_line[rid] = lineno
        if records and (rec["correct"] is None) != (records[0]["correct"] is None):
            raise MuscleError(
                f"{where}: `correct` is null on some records and true/false on others; "
                "a file is either scored right/wrong or continuous"
            )
        records.append(rec)
    return records


def _read_text(path: Path) -> str:
    if not path.exists():
        raise MuscleError(f"no such predictions file: {path}")
    if path.is_dir():
        raise MuscleError(f"{path} is a directory, not a predictions file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MuscleError(f"{path}: not UTF-8 text (byte {e.start})") from None


# ---------------------------------------------------------------------------------- reading


def read_meta(path: PathLike) -> dict | None:
    """The sidecar of predictions file ``path`` (or the sidecar path itself); None if absent."""
    mpath = meta_path(path)
    if not mpath.exists():
        return None
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MuscleError(f"{mpath}: not a valid JSON metadata file ({e})") from None
    if not isinstance(meta, dict):
        raise MuscleError(f"{mpath}: metadata must be a JSON object")
    version = meta.get("format", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise MuscleError(
            f"{mpath}: predictions format {version!r}; this muscle reads format {FORMAT_VERSION}"
        )
    return meta


def read_predictions(path: PathLike) -> tuple[list[dict], dict | None]:
    """(records, meta) of a predictions file; a MuscleError naming file and line when invalid."""
    path = Path(path)
    records = _parse_lines(path, _read_text(path))
    if not records:
        raise MuscleError(f"{path}: empty predictions file (no records)")
    return records, read_meta(path)


def check_same_task(metas: dict[str, dict | None]) -> str | None:
    """The task shared by the sidecars ``{file: meta}`` (None if none names one).

    A MuscleError when two sidecars name different tasks. Files without a sidecar are not
    checked (compare then relies on the id sets).
    """
    tasks = {p: m["task"] for p, m in metas.items() if m and m.get("task") is not None}
    if len(set(tasks.values())) > 1:
        listed = ", ".join(f"{p} is {t!r}" for p, t in tasks.items())
        raise MuscleError(f"the predictions are of different tasks ({listed})")
    return next(iter(tasks.values()), None)


# ---------------------------------------------------------------------------------- writing


def _repair_tail(path: Path) -> None:
    """Cut a last line that lacks its newline (a write interrupted by a kill)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back for the previous newline in blocks; keep everything up to and including it.
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                break
            pos = start
        else:
            f.truncate(0)
        f.flush()
        os.fsync(f.fileno())


def already_done_ids(path: PathLike) -> set[Any]:
    """Ids already written to ``path`` (empty if it does not exist), for a resumed run.

    A truncated last line from a killed run is removed from the file first; a malformed line
    anywhere else is a MuscleError (that is damage, not an interruption).
    """
    path = Path(path)
    if not path.exists():
        return set()
    _repair_tail(path)
    return {rec["id"] for rec in _parse_lines(path, _read_text(path))}


class PredictionWriter:
    """Appends records to a predictions file, one fsync-ed batch at a time.

    Opening repairs an interrupted tail and learns the ids already present (``done_ids``), so a
    resumed run skips them; writing an id twice is a MuscleError. The file is created by the
    first write, so a writer that writes nothing leaves no empty file. Two writers of one file
    are kept apart by the caller (``muscle-eval predict`` holds :func:`lock_path`).
    """

    def __init__(self, path: PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.done_ids: set[Any] = already_done_ids(self.path)
        self._fsync = fsync
        self._file = None  # opened by the first write, closed by close()

    def write(self, records: Iterable[dict]) -> int:
        """Append one batch durably (flush + fsync); returns how many records were written."""
        lines = []
        batch_ids: set[Any] = set()
        for rec in records:
            validate_record(rec, f"{self.path}: record {rec.get('id')!r}")
            if rec["id"] in self.done_ids or rec["id"] in batch_ids:
                raise MuscleError(f"{self.path}: id {json.dumps(rec['id'])} is already written")
            batch_ids.add(rec["id"])
            lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
        if lines:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write("".join(lines))
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self.done_ids |= batch_ids
        return len(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_meta(path: PathLike, meta: dict) -> Path:
    """Write the sidecar of predictions file ``path`` atomically (temp file + os.replace).

    ``format`` defaults to the current version. Returns the sidecar's path.
    """
    target = meta_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"format": FORMAT_VERSION, **meta}, indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
