"""What a build does to the cache on disk, and who may do it: the refusal to mix teachers
(``check_compatible``), the decision (create, resume or skip a teacher; discard what muscle
wrote), the discard itself, and the paths of the writer locks (CACHE_FORMAT.md §8)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muscle import MuscleError
from muscle.locking import writer_lock
from muscle.teacher_cache.schema import schema_for
from muscle.teacher_cache.store import muscle_attrs, open_group

log = logging.getLogger(__name__)


def _refuse(path: Path, name: str, what: str, mine: Any, theirs: Any, hint: str = "") -> None:
    raise MuscleError(
        f"refusing to add teacher {name!r} to {path}: its {what} ({mine}) differs from the "
        f"cache's ({theirs}); {hint or 'build it into a new --out directory'} "
        "(or pass --overwrite to discard the whole cache)"
    )


def check_compatible(path: Path, name: str, meta: dict, new: dict) -> None:
    """Refuse to mix: format (sampled tail or not), M, K, tokenizer, dataset, split or token
    stream differing from the cache's."""
    if meta.get("format") != new["format"]:
        if {meta.get("format"), new["format"]} == {1, 2}:
            _refuse_tail_mix(path, name, meta, new)
        _refuse(path, name, "cache format", new["format"], meta.get("format"))
    if new["format"] >= 2:
        for key, flag in (("tail_samples", "--tail-samples"), ("tail_seed", "--tail-seed")):
            if meta.get(key) != new[key]:
                what = key.replace("_", " ")
                _refuse(path, name, what, new[key], meta.get(key), f"pass the cache's {flag}")
    if int(meta["k"]) != int(new["k"]):
        _refuse(path, name, "K", new["k"], meta["k"], "pass the cache's --k")
    for key in ("temperatures", "chunk_tokens", "shard_chunks"):
        if meta[key] != new[key]:
            _refuse(path, name, key.replace("_", " "), new[key], meta[key])
    if meta["tokenizer_fingerprint"] != new["tokenizer_fingerprint"]:
        _refuse(
            path,
            name,
            "tokenizer fingerprint",
            new["tokenizer_fingerprint"],
            meta["tokenizer_fingerprint"],
            "teachers of one cache must share a tokenizer",
        )
    if meta["task"] != new["task"]:
        _refuse(path, name, "task", new["task"], meta["task"])
    old_dc, new_dc = meta["data_config"], new["data_config"]
    if meta["splits"] != new["splits"]:
        _refuse(path, name, "splits", new["splits"], meta["splits"])
    for key in ("val_fraction", "split_seed"):
        if old_dc.get(key) != new_dc.get(key):
            _refuse(path, name, f"split ({key})", new_dc.get(key), old_dc.get(key))
    for s in meta["splits"]:
        a, b = meta["dataset_fingerprints"].get(s), new["dataset_fingerprints"].get(s)
        if a != b:
            _refuse(
                path,
                name,
                f"dataset fingerprint of split {s}",
                b,
                a,
                "the task data or --max-examples differ",
            )
    if "stream_fingerprint" in new and meta.get("stream_fingerprint") != new["stream_fingerprint"]:
        _refuse(
            path,
            name,
            "token stream fingerprint",
            new["stream_fingerprint"],
            meta.get("stream_fingerprint"),
            "tokenization options (--max-length, --truncation, --answer-only) differ",
        )


def _refuse_tail_mix(path: Path, name: str, meta: dict, new: dict) -> None:
    """A format 2 teacher (sampled tail) into a format 1 cache, or the reverse: one line."""
    if new["format"] == 2:
        mine, theirs = f"a sampled tail of M={new['tail_samples']} (format 2)", "none (format 1)"
        hint = "build it with --tail-samples 0 (no tail)"
    else:
        mine, theirs = "no sampled tail (format 1)", f"M={meta.get('tail_samples')} (format 2)"
        hint = f"build it with --tail-samples {meta.get('tail_samples')}"
    raise MuscleError(
        f"refusing to add teacher {name!r} to {path}: it would store {mine} but the cache's "
        f"teachers have {theirs}, and all teachers of one cache share M; {hint}, or into a new "
        "--out directory (or pass --overwrite to discard the whole cache)"
    )


@dataclass
class Plan:
    """What a build does to the cache, decided by the main rank from what is on disk."""

    meta: dict | None  # the cache to add the teacher to; None: write a new token stream
    discard: bool  # remove what muscle wrote here first (interrupted first build, --overwrite)
    teacher: str  # "create" | "resume" | "skip" (complete, same model: nothing to do)


def check_writable(path: Path) -> None:
    """Refuse an output that cannot be written, creating nothing: the directory is made only
    once every check has passed (a refused build leaves nothing behind)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise MuscleError(f"cannot write the cache at {path}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise MuscleError(f"cannot write the cache at {path}: permission denied ({p})")


def decide(path: Path, name: str, new: dict, model_info: dict, overwrite: bool) -> Plan:
    """What building teacher ``name`` does to the cache at ``path`` as it is now; raises the
    refusals (another cache, another model under this name, not a muscle cache)."""
    check_writable(path)
    meta, discard = _existing_meta(path, overwrite)
    if meta is not None and _mismatch(path, name, meta, new):
        if not overwrite:
            check_compatible(path, name, meta, new)  # raises, saying what differs
        log.warning("--overwrite: discarding the whole cache at %s (it does not match)", path)
        return Plan(None, True, "create")
    tmeta = _existing_teacher(path, name) if meta is not None else None
    if tmeta is None or overwrite:
        return Plan(meta, discard, "create")
    theirs = tmeta.get("model", {})
    if theirs != model_info:
        which = f"({theirs.get('base')}, adapter {theirs.get('adapter')})"
        if tmeta.get("complete"):
            raise MuscleError(
                f"teacher {name!r} is already complete in {path}, built from another model "
                f"{which}: pass --overwrite to rebuild it"
            )
        raise MuscleError(
            f"{path} holds a partial build of teacher {name!r} from another model {which}: "
            "pass --overwrite to replace it"
        )
    return Plan(meta, discard, "skip" if tmeta.get("complete") else "resume")


def _existing_meta(path: Path, overwrite: bool) -> tuple[dict | None, bool]:
    """(the complete cache at ``path`` to add to, or None; whether what muscle wrote there must
    be discarded first). Only what muscle wrote is ever discarded: a directory that holds
    anything else is refused, with or without --overwrite."""
    if not path.exists():
        return None, False
    if not path.is_dir():
        raise MuscleError(f"cannot write the cache at {path}: not a directory")
    # zarr writes every file as <name>.<uuid>.partial, then renames it into place
    if not any(not p.name.endswith(".partial") for p in path.iterdir()):
        return None, False
    raw = muscle_attrs(path)
    if raw is None:
        raise MuscleError(
            f"{path} exists and is not a muscle teacher cache (no muscle_cache attributes in "
            f"its zarr.json): refusing to write into it{' or delete it' if overwrite else ''}; "
            "choose another --out"
        )
    try:
        schema_for(raw.get("format"), path)
    except MuscleError as e:
        if overwrite:  # a muscle cache of a format this muscle does not read: muscle's to remove
            return None, True
        raise MuscleError(f"{e}; choose another --out (or --overwrite)") from None
    if not raw.get("stream_complete"):
        # An interrupted first build (the stream is written under the cache lock, so under it
        # an incomplete stream has no live writer): discarded and rewritten, teachers too.
        return None, True
    return raw, False


def _mismatch(path: Path, name: str, meta: dict, new: dict) -> bool:
    try:
        check_compatible(path, name, meta, new)
        return False
    except MuscleError:
        return True


def _existing_teacher(path: Path, name: str) -> dict | None:
    tdir = path / "teachers" / name
    if not (tdir / "zarr.json").is_file():
        return None
    return dict(open_group(tdir).attrs).get("muscle_teacher") or {"complete": False}


def discard(path: Path, own: str) -> None:
    """Remove what muscle wrote in the cache directory (``zarr.json``, ``stream/``,
    ``teachers/``), nothing else. Every other teacher's lock is taken first: a teacher being
    built by another process is never deleted under it (that refuses, naming the holder).
    The root is marked incomplete before anything goes, so a kill midway leaves a cache that
    the next build discards again, never a complete-looking one with arrays missing."""
    import zarr

    with contextlib.ExitStack() as others:
        teachers = path / "teachers"
        for t in sorted(p.name for p in teachers.iterdir()) if teachers.is_dir() else ():
            if t != own:
                others.enter_context(
                    writer_lock(teacher_lock(path, t), what=f"teacher {t!r} of cache {path}")
                )
        raw = muscle_attrs(path)
        if raw is not None and raw.get("stream_complete"):
            zarr.open_group(str(path), mode="r+").attrs["muscle_cache"] = raw | {
                "stream_complete": False
            }
        for sub in ("teachers", "stream"):
            if (path / sub).is_dir():
                shutil.rmtree(path / sub)
        (path / "zarr.json").unlink(missing_ok=True)


def cache_lock(path: Path) -> Path:
    """The writer lock of a cache's root and stream; beside the cache, not in it (a Zarr
    group lists every file in its directory as a member): ``<parent>/.<name>.muscle-locks/``."""
    return _lock_dir(path) / "cache.lock"


def teacher_lock(path: Path, name: str) -> Path:
    """The writer lock of one teacher of a cache (held for its whole build)."""
    return _lock_dir(path) / f"teacher.{name}.lock"


def _lock_dir(path: Path) -> Path:
    p = Path(os.path.abspath(path))  # one lock for every spelling of the path
    return p.parent / f".{p.name}.muscle-locks"
