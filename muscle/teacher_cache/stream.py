"""The token stream of a cache: every example's tokens and labels, concatenated, with the
example boundaries, splits and ids (CACHE_FORMAT.md §2, ``stream/``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muscle.teacher_cache.schema import FORMAT_1, SPLIT_CODES, CacheConfig, Dims, Schema
from muscle.teacher_cache.store import REBUILD_CACHE, read_checked


@dataclass
class StreamData:
    """The token stream of a cache, in memory. N tokens, E examples."""

    input_ids: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) int32, IGNORE_INDEX where not a target
    offsets: np.ndarray  # (E+1,) int64
    split: np.ndarray  # (E,) uint8, index into SPLIT_CODES
    example_ids: list[str]  # (E,) JSON of each example id

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_examples(self) -> int:
        return len(self.example_ids)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (
            self.offsets.astype("<i8"),
            self.input_ids.astype("<i4"),
            self.labels.astype("<i4"),
            self.split.astype("u1"),
        ):
            h.update(a.tobytes())
        h.update(json.dumps(self.example_ids).encode())
        return h.hexdigest()[:16]

    def columns(self) -> dict[str, np.ndarray]:
        """Stream array name -> its values (the ``stream`` part of the schema)."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "offsets": self.offsets,
            "split": self.split,
            "example_id": np.asarray(self.example_ids, dtype=object),
        }


def make_stream(encoded_by_split: dict[str, list]) -> StreamData:
    """Concatenate encoded examples, split by split, in the order given."""
    ids, labels, lens, split, ex_ids = [], [], [], [], []
    for s, encoded in encoded_by_split.items():
        code = SPLIT_CODES.index(s)
        for e in encoded:
            ids.extend(e.input_ids)
            labels.extend(e.labels)
            lens.append(len(e.input_ids))
            split.append(code)
            ex_ids.append(json.dumps(e.id))
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return StreamData(
        input_ids=np.asarray(ids, dtype=np.int32),
        labels=np.asarray(labels, dtype=np.int32),
        offsets=offsets,
        split=np.asarray(split, dtype=np.uint8),
        example_ids=ex_ids,
    )


def write_stream(root, stream: StreamData, cfg: CacheConfig, schema: Schema = FORMAT_1) -> None:
    """Create and fill every ``stream/`` array of the schema (the caller fsyncs and commits)."""
    g = root.require_group("stream")
    dims = Dims(cfg, stream.n_tokens, stream.n_examples)
    values = stream.columns()
    for spec in schema.stream:
        a = g.create_array(spec.name, **dims.create_kwargs(spec), overwrite=True)
        a[: len(values[spec.name])] = values[spec.name]


def read_stream(root, path: Path | None = None, schema: Schema = FORMAT_1) -> StreamData:
    """The stream, in memory; a damaged chunk is a MuscleError naming it (``path``: the cache
    directory, for the message; default: the group's own path)."""
    cache = Path(path) if path is not None else Path(str(root.store.root))
    g = root["stream"]
    got = {}
    for spec in sorted(schema.stream, key=lambda s: s.rows != "E+1"):  # offsets first: N
        rows = slice(0, int(got["offsets"][-1])) if spec.rows == "N" else slice(None)
        got[spec.name] = read_checked(
            g[spec.name], cache, f"stream/{spec.name}", rows, REBUILD_CACHE
        )
    return StreamData(
        input_ids=got["input_ids"],
        labels=got["labels"],
        offsets=got["offsets"],
        split=got["split"],
        example_ids=[str(x) for x in got["example_id"]],
    )
