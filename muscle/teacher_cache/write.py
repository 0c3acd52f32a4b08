"""Committing to disk: the root and its stream, a teacher's group, one unit, the teacher's
completion. Every step is durable before the flag that publishes it (CACHE_FORMAT.md §6): a
shard's files are fsync'ed before its ``done`` bits, the stream before ``stream_complete``."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from muscle import MuscleError, __version__
from muscle.teacher_cache.compute import UnitResult
from muscle.teacher_cache.schema import (
    FORMAT_1,
    SPLIT_CODES,
    CacheConfig,
    Dims,
    Schema,
    shard_file,
)
from muscle.teacher_cache.stream import StreamData, write_stream

_SLEEP_ENV = "MUSCLE_CACHE_TEST_SLEEP"  # tests: seconds to sleep between a unit's writes


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_sleep() -> None:
    delay = float(os.environ.get(_SLEEP_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def prepare_root(
    path: Path,
    stream: StreamData,
    new: dict,
    meta: dict | None,
    cfg: CacheConfig,
    schema: Schema = FORMAT_1,
):
    """Open the cache for writing; write the root and the token stream unless ``meta`` (the
    cache's complete attributes) says they are there. A new root is created with its muscle
    attributes in one write (whoever looks sees a muscle cache, with an incomplete stream),
    into a directory that holds nothing muscle wrote (the caller discarded it)."""
    import zarr

    if meta is not None:
        return zarr.open_group(str(path), mode="r+")
    attrs = dict(new) | {
        "stream_complete": False,
        "n_tokens": stream.n_tokens,
        "n_examples": stream.n_examples,
        "muscle_version": __version__,
    }
    root = zarr.create_group(str(path), attributes={"muscle_cache": attrs})
    with zarr.config.set({"array.write_empty_chunks": True}):
        write_stream(root, stream, cfg, schema)
    for spec in schema.stream:
        for f in (path / "stream" / spec.name / "c").rglob("*"):
            if f.is_file():
                _fsync(f)
    attrs["stream_complete"] = True  # the commit of the stream: written last
    attrs["n_splits"] = {
        s: int((stream.split == i).sum()) for i, s in enumerate(SPLIT_CODES) if s in new["splits"]
    }
    root.attrs["muscle_cache"] = attrs
    return root


def _create_teacher(
    root,
    name: str,
    cfg: CacheConfig,
    n_tokens: int,
    ids_dtype,
    attrs: dict,
    schema: Schema = FORMAT_1,
):
    """A new (empty) teacher group with every array of the schema; ``complete`` is False."""
    # With its attributes in one write: no reader ever sees a teacher group without them.
    tg = root.require_group("teachers").create_group(
        name, overwrite=True, attributes={"muscle_teacher": attrs}
    )  # complete: False until every unit is done
    dims = Dims(cfg, n_tokens, ids_dtype=ids_dtype)
    for spec in (*schema.teacher, schema.done):
        tg.create_array(spec.name, **dims.create_kwargs(spec))
    return tg


def _teacher_layout_ok(
    tg, cfg: CacheConfig, n_tokens: int, ids_dtype, schema: Schema = FORMAT_1
) -> bool:
    """Whether a partial teacher group has every array with the expected layout (to resume)."""
    dims = Dims(cfg, n_tokens, ids_dtype=ids_dtype)
    try:
        for spec in (*schema.teacher, schema.done):
            a = tg[spec.name]
            if tuple(a.shape) != dims.shape(spec) or np.dtype(a.dtype) != np.dtype(
                dims.dtype(spec)
            ):
                return False
        return True
    except Exception:
        return False


def _write_unit(
    tg, tdir: Path, shard: int, res: UnitResult, cfg: CacheConfig, schema: Schema = FORMAT_1
) -> None:
    """Write one unit: data arrays, fsync them, and only then its done bits (the commit)."""
    import zarr

    lo = shard * cfg.shard_tokens
    hi = lo + len(next(iter(res.values())))
    with zarr.config.set({"array.write_empty_chunks": True}):
        for spec in schema.teacher:
            tg[spec.name][lo:hi] = res[spec.name]
            _test_sleep()
        for spec in schema.teacher:
            _fsync(shard_file(tdir / spec.name, spec.ndim, shard))
        c0, c1 = lo // cfg.chunk_tokens, math.ceil(hi / cfg.chunk_tokens)
        tg[schema.done.name][c0:c1] = 1
        _fsync(shard_file(tdir / schema.done.name, 1, shard))


def _remove_partials(tdir: Path) -> None:
    """Temporary files of writes a kill interrupted (zarr writes temp + rename)."""
    for p in tdir.rglob("*.partial"):
        with contextlib.suppress(OSError):
            p.unlink()


def finish_teacher(tg, name, stream, cfg, world_size, device, secs, tokens) -> None:
    """Set ``complete`` (the teacher's commit) once every ``done`` bit is 1."""
    done = tg["done"][:]
    if not done.all():
        missing = np.flatnonzero(done == 0)[:5].tolist()
        raise MuscleError(f"teacher {name!r}: chunks {missing} are not done after the build")
    attrs = dict(tg.attrs["muscle_teacher"])
    attrs["complete"] = True
    attrs["build"] = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": world_size,
        "device": str(device),
        "seconds_last_run": round(secs, 3),
        "tokens_last_run": int(tokens),
        "torch": torch.__version__,
    }
    tg.attrs["muscle_teacher"] = attrs
