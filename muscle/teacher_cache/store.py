"""Opening a cache: its attributes (checked for the format), its teachers and their
provenance, and reads that turn a damaged chunk into one line naming it and its shard file."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from muscle import MuscleError
from muscle.config import ModelSpec, fingerprint
from muscle.teacher_cache.schema import (
    CACHE_LEVEL,
    SPLIT_CODES,
    CacheConfig,
    Schema,
    schema_for,
    shard_file,
)


def open_group(path: Path, mode: str = "r"):
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as e:  # FileNotFoundError, GroupNotFoundError, bad JSON: all "not a cache"
        raise MuscleError(f"not a muscle teacher cache: {path} ({type(e).__name__})") from None


def muscle_attrs(path: Path) -> dict | None:
    """The root's ``muscle_cache`` attributes as written, any format; None if ``path`` holds
    no group with them (not something muscle wrote)."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        meta = dict(open_group(path).attrs).get("muscle_cache")
    except MuscleError:
        return None
    return meta if isinstance(meta, dict) and "format" in meta else None


def read_meta(path: str | Path) -> dict:
    """The cache-level attributes (``muscle_cache``), checked for a format this muscle reads."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise MuscleError(f"not a muscle teacher cache (no zarr.json): {path}")
    meta = dict(open_group(path).attrs).get("muscle_cache")
    if not isinstance(meta, dict):
        raise MuscleError(f"not a muscle teacher cache (no muscle_cache attribute): {path}")
    schema_for(meta.get("format"), path)
    return meta


def cache_schema(meta: dict) -> Schema:
    """The schema of an opened cache (``read_meta`` has checked its format)."""
    return schema_for(meta["format"])


def read_teacher_meta(path: str | Path, name: str) -> dict:
    path = Path(path)
    tdir = path / "teachers" / name
    if not (tdir / "zarr.json").is_file():
        have = ", ".join(list_teachers(path)) or "none"
        raise MuscleError(f"no teacher {name!r} in cache {path} (it has: {have})")
    return dict(open_group(tdir).attrs).get("muscle_teacher") or {}


def list_teachers(path: str | Path) -> list[str]:
    root = Path(path) / "teachers"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "zarr.json").is_file())


def cache_teacher_spec(path: str | Path, name: str) -> ModelSpec:
    """The teacher's model as recorded at build time (base + adapter), e.g. to load v2's base."""
    m = read_teacher_meta(path, name).get("model") or {}
    if not m.get("base"):
        raise MuscleError(f"teacher {name!r} in {path} records no model")
    return ModelSpec(
        base=m["base"],
        adapter=m.get("adapter"),
        revision=m.get("revision"),
        gguf_file=m.get("gguf_file"),
        dtype=m.get("dtype", "float32"),
    )


def teacher_provenance(path: str | Path, name: str) -> dict:
    """Recorded provenance of a teacher: base, fingerprints, adapter sha256, dtype, build info."""
    return read_teacher_meta(path, name)


# Where a cache, its data or its teachers' files lie, and when it was built: left out of its
# content fingerprint, so a moved or copied cache is the same cache (a training run resumes on it).
_NOT_CONTENT = {"data_dir", "base", "adapter", "build", "complete", "muscle_version"}


def cache_fingerprint(meta: dict, teachers: dict[str, dict]) -> str:
    """What a cache holds, as a short hash: its settings, token stream and split fingerprints,
    and each teacher's model (base fingerprint, adapter sha256, dtype) and settings; not where
    it lies nor when it was built. ``meta`` and ``teachers`` as :class:`CacheReader` has them."""

    def content(d):
        if isinstance(d, dict):
            return {k: content(v) for k, v in d.items() if k not in _NOT_CONTENT}
        return d

    return fingerprint(content(meta), content(teachers))


def check_teacher_provenance(path: str | Path, name: str) -> None:
    """Refuse a teacher whose recorded adapter no longer hashes the same (it was retrained)."""
    from muscle.models import adapter_sha256

    m = read_teacher_meta(path, name).get("model") or {}
    if m.get("adapter") and m.get("adapter_sha256"):
        if Path(m["adapter"]).is_dir() and adapter_sha256(m["adapter"]) != m["adapter_sha256"]:
            raise MuscleError(
                f"teacher {name!r} of {path} was built from adapter {m['adapter']} with sha256 "
                f"{m['adapter_sha256'][:12]}..., but that adapter has changed since: rebuild it"
            )


def resolve_cache_config(path: str | Path, **given: Any) -> CacheConfig:
    """A CacheConfig from explicit options (None = not given): an existing cache supplies its
    cache-level settings, the defaults fill the rest."""
    given = {k: v for k, v in given.items() if v is not None}
    base: dict[str, Any] = {}
    path = Path(path)
    if (path / "zarr.json").is_file():
        with contextlib.suppress(MuscleError):
            meta = read_meta(path)
            base = {k: meta[k] for k in CACHE_LEVEL if k in meta}
            base.setdefault("tail_samples", 0)  # a format 1 cache: its teachers have no tail
            if "temperatures" in base:
                base["temperatures"] = tuple(float(t) for t in base["temperatures"])
            base["splits"] = tuple(base.get("splits", SPLIT_CODES))
    base.update(given)
    if "temperatures" in base:
        base["temperatures"] = tuple(float(t) for t in base["temperatures"])
    if "splits" in base:
        base["splits"] = tuple(base["splits"])
    cfg = CacheConfig(**base)
    cfg.validate()
    return cfg


# ================================================================ reads that name a bad chunk


def read_checked(arr, cache: Path, rel: str, rows: slice | np.ndarray, remedy: str) -> np.ndarray:
    """``arr[rows]`` (a row slice, or sorted row indices read orthogonally); a chunk that does
    not decode (CRC32C mismatch, truncated shard) is a MuscleError naming the array, the chunk,
    its tokens and its shard file (``rel``: the array's path inside the cache ``cache``)."""
    try:
        return _read(arr, rows)
    except Exception as e:
        error = e
    chunk, shard = arr.chunks[0], (arr.shards or arr.chunks)[0]
    if isinstance(rows, slice):
        lo, hi = rows.start or 0, arr.shape[0] if rows.stop is None else rows.stop
        chunks = range(lo // chunk, math.ceil(hi / chunk))
    else:
        chunks = np.unique(np.asarray(rows) // chunk).tolist()
    for c in chunks:
        try:
            arr[c * chunk : min((c + 1) * chunk, arr.shape[0])]
        except Exception:
            f = shard_file(cache / rel, arr.ndim, c * chunk // shard).relative_to(cache)
            raise MuscleError(
                f"corrupted chunk {c} of {rel} (rows {c * chunk}-{(c + 1) * chunk - 1}, file "
                f"{f}): {type(error).__name__}; {remedy}"
            ) from None
    raise MuscleError(f"cannot read {rel}: {type(error).__name__}: {error}; {remedy}") from None


def _read(arr, rows: slice | np.ndarray) -> np.ndarray:
    if isinstance(rows, slice):
        return arr[rows]
    return arr.get_orthogonal_selection((rows,) + (slice(None),) * (arr.ndim - 1))


REBUILD_TEACHER = "rebuild that teacher (muscle-cache build --overwrite)"
REBUILD_CACHE = "the token stream is damaged: rebuild the cache (muscle-cache build --overwrite)"
