"""The teacher-logit cache: write, resume, check, inspect, verify and read a Zarr v3 store.

``muscle/CACHE_FORMAT.md`` is the normative description of the store (format 1); this module is
one implementation of it. In short::

    <cache>/                      group, attrs["muscle_cache"]: format, data config, fingerprints
      stream/input_ids  (N,)      int32   every example's tokens, concatenated
      stream/labels     (N,)      int32   next-token labels, -100 where not a target
      stream/offsets    (E+1,)    int64   example e is tokens [offsets[e], offsets[e+1])
      stream/split      (E,)      uint8   index into attrs splits (train, validation)
      stream/example_id (E,)      string  JSON of the task's example id
      teachers/<name>/            group, attrs["muscle_teacher"]: provenance, complete
        ids           (N, K)      uintX   top-K token ids, descending logit
        logprobs      (N, K)      float16 log-probs at T=1 of those ids
        lse           (N, nT)     float32 logsumexp(z / T) for each cached T
        label_logprob (N,)        float32 log p(label) at T=1, NaN where label == -100
        done          (n_chunks,) uint8   1 = that chunk of every array above is durable

The build works in *units* of one shard (``shard_tokens`` tokens): a unit's examples (those
overlapping it) are forwarded in a fixed, length-sorted batch order, its arrays are written
whole, fsync'ed, and only then its ``done`` bits set. Units are independent, so a killed build
resumes at the first unit not done, ``torchrun`` ranks take disjoint unit ranges, and every
way of building gives the same bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muscle import MuscleError, __version__
from muscle.config import DataConfig, ModelSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IGNORE_INDEX = -100
TEACHER_ARRAYS = ("ids", "logprobs", "lse", "label_logprob")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SLEEP_ENV = "MUSCLE_CACHE_TEST_SLEEP"  # tests: seconds to sleep between a unit's writes
_SPLIT_CODES = ("train", "validation")


@dataclass(frozen=True)
class CacheConfig:
    """How a cache is laid out. ``k``, ``temperatures``, ``splits``, ``chunk_tokens`` and
    ``shard_chunks`` are per cache (every teacher must agree); the rest is per teacher."""

    k: int = 64
    temperatures: tuple[float, ...] = (1.0, 2.0)  # must contain 1.0 (logprobs are stored at T=1)
    splits: tuple[str, ...] = ("train", "validation")
    value_dtype: str = "float16"  # dtype of the stored T=1 log-probs: float16 | float32
    ids_dtype: str = "auto"  # auto: the smallest unsigned int that holds the vocabulary
    codec: str = "zstd"  # Blosc compressor: zstd | lz4 | lz4hc | blosclz | zlib | none
    clevel: int = 5
    shuffle: str = "shuffle"  # Blosc filter: shuffle | bitshuffle | noshuffle
    chunk_tokens: int = 2048  # tokens per chunk: the unit a reader decodes
    shard_chunks: int = 32  # chunks per shard: one file per shard; the build/rank unit
    batch_size: int = 8  # examples per teacher forward pass

    @property
    def shard_tokens(self) -> int:
        return self.chunk_tokens * self.shard_chunks

    def validate(self) -> None:
        if self.k < 1:
            raise MuscleError(f"K must be >= 1, got {self.k}")
        if 1.0 not in [float(t) for t in self.temperatures]:
            raise MuscleError(f"temperatures must include 1 (got {list(self.temperatures)})")
        if any(not (float(t) > 0) for t in self.temperatures):
            raise MuscleError(f"temperatures must be > 0, got {list(self.temperatures)}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise MuscleError(f"duplicate temperatures: {list(self.temperatures)}")
        for s in self.splits:
            if s not in _SPLIT_CODES:
                raise MuscleError(f"a cache holds the splits train and validation, not {s!r}")
        if self.value_dtype not in ("float16", "float32"):
            raise MuscleError(f"value dtype must be float16 or float32, got {self.value_dtype!r}")
        if self.ids_dtype not in ("auto", "uint8", "uint16", "uint32", "int32", "int64"):
            raise MuscleError(f"unknown ids dtype {self.ids_dtype!r}")
        if self.codec not in ("zstd", "lz4", "lz4hc", "blosclz", "zlib", "none"):
            raise MuscleError(f"unknown codec {self.codec!r}")
        if self.shuffle not in ("shuffle", "bitshuffle", "noshuffle"):
            raise MuscleError(f"unknown shuffle {self.shuffle!r}")
        if self.chunk_tokens < 1 or self.shard_chunks < 1 or self.batch_size < 1:
            raise MuscleError("chunk tokens, shard chunks and batch size must be >= 1")


# Settings every teacher of one cache shares; a mismatch is refused (or taken from the cache
# when not given explicitly, see resolve_cache_config).
_CACHE_LEVEL = ("k", "temperatures", "splits", "chunk_tokens", "shard_chunks")


def ids_dtype_for(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..V-1 (or the requested one, checked)."""
    if requested == "auto":
        for dt in (np.uint8, np.uint16, np.uint32):
            if vocab_size - 1 <= np.iinfo(dt).max:
                return np.dtype(dt)
        return np.dtype(np.int64)
    dt = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dt).max:
        raise MuscleError(f"ids dtype {requested} cannot hold a vocabulary of {vocab_size}")
    return dt


def _compressors(cfg: CacheConfig, typesize: int) -> list:
    """Blosc (unless "none") then a CRC32C of every chunk, so corruption is an error, not data."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    out: list = []
    if cfg.codec != "none":
        out.append(
            BloscCodec(cname=cfg.codec, clevel=cfg.clevel, shuffle=cfg.shuffle, typesize=typesize)
        )
    out.append(Crc32cCodec())
    return out


# ================================================================ metadata and refusal checks


@dataclass
class StreamData:
    """The token stream of a cache, in memory. N tokens, E examples."""

    input_ids: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) int32, IGNORE_INDEX where not a target
    offsets: np.ndarray  # (E+1,) int64
    split: np.ndarray  # (E,) uint8, index into splits
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


def make_stream(encoded_by_split: dict[str, list]) -> StreamData:
    """Concatenate encoded examples, split by split, in the order given."""
    ids, labels, lens, split, ex_ids = [], [], [], [], []
    for s, encoded in encoded_by_split.items():
        code = _SPLIT_CODES.index(s)
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


def _open_group(path: Path, mode: str = "r"):
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as e:  # FileNotFoundError, GroupNotFoundError, bad JSON: all "not a cache"
        raise MuscleError(f"not a muscle teacher cache: {path} ({type(e).__name__})") from None


def read_meta(path: str | Path) -> dict:
    """The cache-level attributes (``muscle_cache``), checked for the format version."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise MuscleError(f"not a muscle teacher cache (no zarr.json): {path}")
    meta = dict(_open_group(path).attrs).get("muscle_cache")
    if not isinstance(meta, dict):
        raise MuscleError(f"not a muscle teacher cache (no muscle_cache attribute): {path}")
    if meta.get("format") != FORMAT_VERSION:
        raise MuscleError(
            f"{path}: cache format {meta.get('format')!r}, this muscle reads format "
            f"{FORMAT_VERSION}: rebuild the cache"
        )
    return meta


def read_teacher_meta(path: str | Path, name: str) -> dict:
    path = Path(path)
    tdir = path / "teachers" / name
    if not (tdir / "zarr.json").is_file():
        have = ", ".join(list_teachers(path)) or "none"
        raise MuscleError(f"no teacher {name!r} in cache {path} (it has: {have})")
    return dict(_open_group(tdir).attrs).get("muscle_teacher") or {}


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
            base = {k: meta[k] for k in _CACHE_LEVEL if k in meta}
            base["temperatures"] = tuple(float(t) for t in base.get("temperatures", (1.0, 2.0)))
            base["splits"] = tuple(base.get("splits", _SPLIT_CODES))
    base.update(given)
    if "temperatures" in base:
        base["temperatures"] = tuple(float(t) for t in base["temperatures"])
    if "splits" in base:
        base["splits"] = tuple(base["splits"])
    cfg = CacheConfig(**base)
    cfg.validate()
    return cfg


def _refuse(path: Path, name: str, what: str, mine: Any, theirs: Any, hint: str = "") -> None:
    raise MuscleError(
        f"refusing to add teacher {name!r} to {path}: its {what} ({mine}) differs from the "
        f"cache's ({theirs}); {hint or 'build it into a new --out directory'} "
        "(or pass --overwrite to discard the whole cache)"
    )


def check_compatible(path: Path, name: str, meta: dict, new: dict) -> None:
    """Refuse to mix: K, tokenizer, dataset, split or token stream differing from the cache's."""
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


# ================================================================ forward pass


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the real (unpadded) positions, row-major: (B, T) -> (N_real, V).

    Runs the decoder, then the output head on the real positions only, so padding costs no
    head FLOPs and no (B, T, V) tensor is made.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    h = hidden.last_hidden_state[attention_mask.bool()]  # (N_real, H)
    logits = base.get_output_embeddings()(h)  # (N_real, V)
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _check_forward_path(model, input_ids, attention_mask, tol: float) -> None:
    """Our decoder+head path must agree with the model's own forward (guards exotic heads)."""
    ours = forward_logits(model, input_ids, attention_mask).float()
    ref = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref = ref[attention_mask.bool()].float()
    rows = torch.isfinite(ref).all(1)  # NaN/inf rows are reported by the build, by example
    err = (ours[rows] - ref[rows]).abs().max().item() if rows.any() else 0.0
    if not err <= tol:
        raise MuscleError(
            f"{type(model).__name__}: the cache's decoder+head logits differ from the model's "
            f"forward by {err:.3g}; this model architecture is not supported by muscle-cache"
        )


def _plan_batches(lengths: np.ndarray, examples: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Examples of one unit grouped into batches of similar length (stable, deterministic)."""
    order = examples[np.argsort(-lengths[examples], kind="stable")]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _unit_examples(offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Examples overlapping tokens [lo, hi): offsets[e] < hi and offsets[e+1] > lo."""
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    last = int(np.searchsorted(offsets, hi, side="left"))
    return np.arange(max(first, 0), min(last, len(offsets) - 1))


@dataclass
class UnitResult:
    ids: np.ndarray  # (S, K)
    logprobs: np.ndarray  # (S, K)
    lse: np.ndarray  # (S, nT)
    label_logprob: np.ndarray  # (S,)


def compute_unit(
    model,
    stream: StreamData,
    lo: int,
    hi: int,
    cfg: CacheConfig,
    *,
    device,
    ids_dtype,
    pad_id: int,
    progress=None,
) -> UnitResult:
    """Teacher top-K for tokens [lo, hi) of the stream."""
    from muscle.topk import teacher_topk

    S, K, temps = hi - lo, cfg.k, [float(t) for t in cfg.temperatures]
    out = UnitResult(
        ids=np.zeros((S, K), dtype=ids_dtype),
        logprobs=np.zeros((S, K), dtype=cfg.value_dtype),
        lse=np.zeros((S, len(temps)), dtype=np.float32),
        label_logprob=np.zeros(S, dtype=np.float32),
    )
    off = stream.offsets
    lengths = np.diff(off)
    t1 = temps.index(1.0)
    for batch in _plan_batches(lengths, _unit_examples(off, lo, hi), cfg.batch_size):
        B, T = len(batch), int(lengths[batch].max())
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(batch):
            n = int(lengths[e])
            input_ids[b, :n] = torch.from_numpy(
                stream.input_ids[off[e] : off[e + 1]].astype(np.int64)
            )
            mask[b, :n] = 1
        pos = np.concatenate([np.arange(off[e], off[e + 1]) for e in batch])  # (N_real,)
        labels = torch.from_numpy(stream.labels[pos].astype(np.int64))
        with torch.no_grad():
            logits = forward_logits(model, input_ids.to(device), mask.to(device))
            try:
                top = teacher_topk(logits, labels.to(logits.device), K, tuple(temps))
            except ValueError as e:
                if "non-finite" not in str(e):
                    raise
                bad_row = int((~torch.isfinite(logits.float()).all(1)).nonzero()[0, 0])
                raise _nonfinite_error(stream, pos[bad_row]) from None
        lse = torch.stack([top.lse[t] for t in temps], 1).cpu()  # (N_real, nT)
        lp1 = (top.values.cpu() - lse[:, t1 : t1 + 1]).numpy()  # (N_real, K) log p at T=1
        lab = (top.label_logit.cpu() - lse[:, t1]).numpy()  # (N_real,) NaN where ignored
        keep = (pos >= lo) & (pos < hi)
        dst = pos[keep] - lo
        out.ids[dst] = top.ids.cpu().numpy()[keep].astype(ids_dtype)
        out.logprobs[dst] = lp1[keep].astype(cfg.value_dtype)
        out.lse[dst] = lse.numpy()[keep]
        out.label_logprob[dst] = lab[keep]
        if progress is not None:
            progress.update(int(keep.sum()))
    return out


def _nonfinite_error(stream: StreamData, position: int) -> MuscleError:
    e = int(np.searchsorted(stream.offsets, position, side="right")) - 1
    split = _SPLIT_CODES[int(stream.split[e])]
    return MuscleError(
        f"the teacher produced NaN/inf logits on example {json.loads(stream.example_ids[e])!r} "
        f"({split} split, token {position - int(stream.offsets[e])}): refusing to cache it "
        "(check the model's weights and dtype; float16 overflows are common: try --dtype float32)"
    )


# ================================================================ writing


def _chunk_files(arr_dir: Path, ndim: int, shard: int) -> Path:
    return arr_dir / "c" / str(shard) / "0" if ndim == 2 else arr_dir / "c" / str(shard)


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


def _write_stream(root, stream: StreamData, cfg: CacheConfig) -> None:
    g = root.require_group("stream")
    n = max(stream.n_tokens, 1)
    chunks, shards = (cfg.chunk_tokens,), (cfg.shard_tokens,)
    for name, data, fill in (
        ("input_ids", stream.input_ids, 0),
        ("labels", stream.labels, IGNORE_INDEX),
    ):
        a = g.create_array(
            name,
            shape=(n,),
            dtype="int32",
            chunks=chunks,
            shards=shards,
            compressors=_compressors(cfg, 4),
            fill_value=fill,
            overwrite=True,
        )
        a[: stream.n_tokens] = data
    E = stream.n_examples
    a = g.create_array(
        "offsets",
        shape=(E + 1,),
        dtype="int64",
        chunks=(max(E + 1, 1),),
        compressors=_compressors(cfg, 8),
        fill_value=0,
        overwrite=True,
    )
    a[:] = stream.offsets
    a = g.create_array(
        "split",
        shape=(E,),
        dtype="uint8",
        chunks=(max(E, 1),),
        compressors=_compressors(cfg, 1),
        fill_value=0,
        overwrite=True,
    )
    a[:] = stream.split
    a = g.create_array("example_id", shape=(E,), dtype=str, chunks=(max(E, 1),), overwrite=True)
    a[:] = np.asarray(stream.example_ids, dtype=object)


def read_stream(root) -> StreamData:
    g = root["stream"]
    offsets = g["offsets"][:]
    n = int(offsets[-1])
    return StreamData(
        input_ids=g["input_ids"][:n],
        labels=g["labels"][:n],
        offsets=offsets,
        split=g["split"][:],
        example_ids=[str(x) for x in g["example_id"][:]],
    )


def _create_teacher(root, name: str, cfg: CacheConfig, n_tokens: int, ids_dtype, attrs: dict):
    tg = root.require_group("teachers").create_group(name, overwrite=True)
    tg.attrs["muscle_teacher"] = attrs  # complete: False until every unit is done
    n = max(n_tokens, 1)
    K, nT = cfg.k, len(cfg.temperatures)
    C, S = cfg.chunk_tokens, cfg.shard_tokens
    vsize = np.dtype(cfg.value_dtype).itemsize
    specs = (
        ("ids", (n, K), ids_dtype, (C, K), (S, K), 0),
        ("logprobs", (n, K), cfg.value_dtype, (C, K), (S, K), float("nan")),
        ("lse", (n, nT), "float32", (C, nT), (S, nT), float("nan")),
        ("label_logprob", (n,), "float32", (C,), (S,), float("nan")),
    )
    for arr, shape, dt, chunks, shards, fill in specs:
        tsize = np.dtype(dt).itemsize if arr != "logprobs" else vsize
        tg.create_array(
            arr,
            shape=shape,
            dtype=dt,
            chunks=chunks,
            shards=shards,
            compressors=_compressors(cfg, tsize),
            fill_value=fill,
        )
    n_chunks = math.ceil(n / C)
    from zarr.codecs import Crc32cCodec

    tg.create_array(
        "done",
        shape=(n_chunks,),
        dtype="uint8",
        chunks=(cfg.shard_chunks,),
        compressors=[Crc32cCodec()],
        fill_value=0,
    )
    return tg


def _teacher_layout_ok(tg, cfg: CacheConfig, n_tokens: int, ids_dtype) -> bool:
    """Whether a partial teacher group has every array with the expected layout (to resume)."""
    try:
        n = max(n_tokens, 1)
        want = {
            "ids": ((n, cfg.k), ids_dtype),
            "logprobs": ((n, cfg.k), cfg.value_dtype),
            "lse": ((n, len(cfg.temperatures)), "float32"),
            "label_logprob": ((n,), "float32"),
            "done": ((math.ceil(n / cfg.chunk_tokens),), "uint8"),
        }
        for name, (shape, dt) in want.items():
            a = tg[name]
            if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dt):
                return False
        return True
    except Exception:
        return False


def _write_unit(tg, tdir: Path, shard: int, res: UnitResult, cfg: CacheConfig) -> None:
    """Write one unit: data arrays, fsync them, and only then its done bits (the commit)."""
    import zarr

    lo = shard * cfg.shard_tokens
    hi = lo + len(res.ids)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for name in TEACHER_ARRAYS:
            tg[name][lo:hi] = getattr(res, name)
            _test_sleep()
        for name in TEACHER_ARRAYS:
            _fsync(_chunk_files(tdir / name, 2 if name != "label_logprob" else 1, shard))
        c0, c1 = lo // cfg.chunk_tokens, math.ceil(hi / cfg.chunk_tokens)
        tg["done"][c0:c1] = 1
        _fsync(tdir / "done" / "c" / str(shard))


def _remove_partials(tdir: Path) -> None:
    """Temporary files of writes a kill interrupted (zarr writes temp + rename)."""
    for p in tdir.rglob("*.partial"):
        with contextlib.suppress(OSError):
            p.unlink()


# ================================================================ distributed helpers


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def _dist_from_env() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # only barriers: gloo works with any device
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), owns)


def rank_units(n_units: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced unit (shard) ranges: rank r builds units [a_r, a_{r+1})."""
    a = n_units * rank // world_size
    b = n_units * (rank + 1) // world_size
    return range(a, b)


# ================================================================ build


@dataclass
class BuildResult:
    path: Path
    teacher: str
    n_tokens: int
    n_examples: int
    units_built: int
    units_total: int
    seconds: float
    tokens_per_s: float
    resumed: bool = False
    extra: dict = field(default_factory=dict)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise MuscleError(f"bad teacher name {name!r}: use letters, digits, '_', '-', '.'")


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MuscleError(f"cannot write the cache at {path}: {e.strerror or e}") from None


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _effective_dtype(spec: ModelSpec, dtype: str | None) -> str:
    """Explicit --dtype, else a non-default dtype from the update config, else auto."""
    if dtype:
        return dtype
    return spec.dtype if spec.dtype not in (None, "float32") else "auto"


def build_cache(
    path: str | Path,
    name: str,
    spec: ModelSpec,
    data: DataConfig,
    cfg: CacheConfig | None = None,
    *,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> BuildResult:
    """Add teacher ``name`` (the model ``spec``) to the cache at ``path``, building the token
    stream first if the cache is new. Resumes a partial build of the same teacher.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; each writes its own shards.
    """
    from muscle.data import encode_examples, model_max_length
    from muscle.models import (
        describe_model,
        load_model,
        load_tokenizer,
        resolve_dtype,
        tokenizer_fingerprint,
    )
    from muscle.tasks import dataset_fingerprint, get_task, load_examples

    t_start = time.time()
    path = Path(path)
    cfg = cfg or CacheConfig()
    cfg.validate()
    _check_name(name)
    dist = _dist_from_env()
    try:
        device = device or _default_device()
        if dist.world_size > 1 and device.startswith("cuda") and ":" not in device:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dtype_name = _effective_dtype(spec, dtype)
        resolved = resolve_dtype(dtype_name, device)
        spec = replace(spec, dtype=str(resolved).replace("torch.", ""))

        # --- what this teacher would add: checked against the cache before any model load
        task = get_task(data.task)
        tok = load_tokenizer(spec)
        examples = {
            s: load_examples(
                task,
                s,
                source=data.source,
                data_dir=data.data_dir,
                val_fraction=data.val_fraction,
                split_seed=data.split_seed,
                max_examples=data.max_examples,
            )
            for s in cfg.splits
        }
        new = {
            "format": FORMAT_VERSION,
            "task": task.name,
            "k": cfg.k,
            "temperatures": [float(t) for t in cfg.temperatures],
            "splits": list(cfg.splits),
            "chunk_tokens": cfg.chunk_tokens,
            "shard_chunks": cfg.shard_chunks,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "dataset_fingerprints": {
                s: dataset_fingerprint(task, ex) for s, ex in examples.items()
            },
            "data_config": asdict(data),
        }
        _check_writable(path)
        meta = _existing_meta(path, overwrite)
        if meta is not None and _mismatch(path, name, meta, new):
            if not overwrite:
                check_compatible(path, name, meta, new)  # raises, saying what differs
            log.warning("--overwrite: discarding the whole cache at %s (it does not match)", path)
            meta = None  # _prepare_root deletes it (rank 0, after the barrier below)
        if meta is not None and data.max_length is None:
            data = replace(data, max_length=meta["data_config"]["max_length"])
        tmeta = _existing_teacher(path, name) if meta is not None else None
        if tmeta is not None and tmeta.get("complete") and not overwrite:
            # The same command run again is a no-op (pipelines re-run finished stages); a
            # complete teacher of another model under this name needs --overwrite.
            if tmeta.get("model", {}) != describe_model(spec) | {"dtype": spec.dtype}:
                raise MuscleError(
                    f"teacher {name!r} is already complete in {path}, built from another model "
                    f"({tmeta.get('model', {}).get('base')}, adapter "
                    f"{tmeta.get('model', {}).get('adapter')}): pass --overwrite to rebuild it"
                )
            return BuildResult(
                path, name, 0, 0, 0, 0, time.time() - t_start, 0.0, extra={"skipped": True}
            )

        # --- the teacher and the token stream
        model = load_model(spec, device)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if cfg.k > vocab:
            raise MuscleError(f"K={cfg.k} is larger than the vocabulary of {name} ({vocab})")
        if data.max_length is None:
            data = replace(data, max_length=model_max_length(model))
        encoded = {
            s: encode_examples(
                tok,
                task,
                ex,
                answer_only=data.answer_only,
                max_length=data.max_length,
                truncation=data.truncation,
            )
            for s, ex in examples.items()
        }
        stream = make_stream(encoded)
        new["data_config"] = asdict(data)
        new["stream_fingerprint"] = stream.fingerprint()
        if meta is not None and meta.get("stream_fingerprint") != new["stream_fingerprint"]:
            if not overwrite:
                check_compatible(path, name, meta, new)
            log.warning("--overwrite: discarding the whole cache at %s (other tokens)", path)
            meta, tmeta = None, None
        ids_dt = ids_dtype_for(vocab, cfg.ids_dtype)
        model_info = describe_model(spec) | {"dtype": spec.dtype}
        if tmeta is not None and not overwrite and not tmeta.get("complete"):
            if tmeta.get("model", {}) != model_info:
                raise MuscleError(
                    f"{path} holds a partial build of teacher {name!r} from another model "
                    f"({tmeta.get('model', {}).get('base')}, adapter "
                    f"{tmeta.get('model', {}).get('adapter')}): pass --overwrite to replace it"
                )
        dist.barrier()  # every rank has passed the checks before anything is written

        tdir = path / "teachers" / name
        try:
            if dist.rank == 0:
                root = _prepare_root(path, stream, new, meta, cfg)
                tattrs = {
                    "name": name,
                    "format": FORMAT_VERSION,
                    "complete": False,
                    "model": model_info,
                    "vocab_size": vocab,
                    "ids_dtype": str(ids_dt),
                    "value_dtype": cfg.value_dtype,
                    "value_kind": "logprob_t1",
                    "codec": {"blosc": cfg.codec, "clevel": cfg.clevel, "shuffle": cfg.shuffle},
                    "k": cfg.k,
                    "temperatures": [float(t) for t in cfg.temperatures],
                    "tokenizer_fingerprint": new["tokenizer_fingerprint"],
                    "stream_fingerprint": new["stream_fingerprint"],
                    "muscle_version": __version__,
                }
                resumable = (
                    tmeta is not None
                    and not overwrite
                    and not tmeta.get("complete")
                    and _teacher_layout_ok(root["teachers"][name], cfg, stream.n_tokens, ids_dt)
                )
                if resumable:
                    _remove_partials(tdir)
                else:
                    _create_teacher(root, name, cfg, stream.n_tokens, ids_dt, tattrs)
            dist.barrier()
            root = _open_group(path, "r+")
            tg = root["teachers"][name]
            done = tg["done"][:]
            n_units = max(1, math.ceil(stream.n_tokens / cfg.shard_tokens))
            mine = rank_units(n_units, dist.rank, dist.world_size)
            todo = [u for u in mine if not _unit_done(done, u, cfg)]
            resumed = len(todo) < len(mine)
            n_todo_tokens = sum(_unit_span(u, cfg, stream.n_tokens) for u in todo)
            model_dev = device
            if todo:
                first = _plan_batches(
                    np.diff(stream.offsets),
                    _unit_examples(stream.offsets, *_unit_range(todo[0], cfg, stream.n_tokens)),
                    cfg.batch_size,
                )[0][:2]
                _check_path_on(model, stream, first, model_dev, tok.pad_token_id, resolved)
            bar = _progress_bar(n_todo_tokens, name, enabled=progress and dist.rank == 0)
            t0 = time.time()
            for u in todo:
                lo, hi = _unit_range(u, cfg, stream.n_tokens)
                res = compute_unit(
                    model,
                    stream,
                    lo,
                    hi,
                    cfg,
                    device=model_dev,
                    ids_dtype=ids_dt,
                    pad_id=tok.pad_token_id,
                    progress=bar,
                )
                _write_unit(tg, tdir, u, res, cfg)
            secs = time.time() - t0
            if bar is not None:
                bar.close()
            dist.barrier()
            if dist.rank == 0:
                _finish_teacher(tg, name, stream, cfg, dist.world_size, device, secs, n_todo_tokens)
        except OSError as e:
            raise MuscleError(
                f"writing the cache at {path} failed: {e.strerror or e}"
                f"{' (' + str(e.filename) + ')' if e.filename else ''}; the build is resumable: "
                "fix that and re-run the same command"
            ) from None
        total = time.time() - t_start
        return BuildResult(
            path,
            name,
            stream.n_tokens,
            stream.n_examples,
            len(todo),
            len(mine),
            total,
            n_todo_tokens / max(secs, 1e-9),
            resumed,
        )
    finally:
        dist.close()


def _unit_range(u: int, cfg: CacheConfig, n_tokens: int) -> tuple[int, int]:
    lo = u * cfg.shard_tokens
    return lo, min(lo + cfg.shard_tokens, max(n_tokens, 1))


def _unit_span(u: int, cfg: CacheConfig, n_tokens: int) -> int:
    lo, hi = _unit_range(u, cfg, n_tokens)
    return hi - lo


def _unit_done(done: np.ndarray, u: int, cfg: CacheConfig) -> bool:
    c0 = u * cfg.shard_chunks
    return bool(done[c0 : c0 + cfg.shard_chunks].all())


def _check_path_on(model, stream, examples, device, pad_id, dtype) -> None:
    off = stream.offsets
    lengths = np.diff(off)
    T = int(lengths[examples].max())
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    m = torch.zeros_like(x)
    for b, e in enumerate(examples):
        n = int(lengths[e])
        x[b, :n] = torch.from_numpy(stream.input_ids[off[e] : off[e + 1]].astype(np.int64))
        m[b, :n] = 1
    tol = 1e-3 if dtype == torch.float32 else 0.25
    with torch.no_grad():
        _check_forward_path(model, x.to(device), m.to(device), tol)


def _progress_bar(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"cache {name}",
        file=sys.stderr,
        smoothing=0.1,
    )


def _existing_meta(path: Path, overwrite: bool) -> dict | None:
    if not path.exists():
        return None
    if not path.is_dir():
        raise MuscleError(f"cannot write the cache at {path}: not a directory")
    if not any(path.iterdir()):
        return None
    try:
        meta = read_meta(path)
    except MuscleError as e:
        if overwrite and not (path / "zarr.json").is_file():
            raise MuscleError(
                f"{path} exists and is not a muscle cache: refusing to delete it even with "
                "--overwrite; choose another --out"
            ) from None
        if overwrite:
            return {"_foreign": True}
        raise MuscleError(f"{e}; choose another --out (or --overwrite)") from None
    if not meta.get("stream_complete"):
        return None  # an interrupted first build: the stream is rewritten, teachers too
    return meta


def _mismatch(path: Path, name: str, meta: dict, new: dict) -> bool:
    if meta.get("_foreign"):
        return True
    try:
        check_compatible(
            path, name, meta, {k: v for k, v in new.items() if k != "stream_fingerprint"}
        )
        return False
    except MuscleError:
        return True


def _existing_teacher(path: Path, name: str) -> dict | None:
    tdir = path / "teachers" / name
    if not (tdir / "zarr.json").is_file():
        return None
    return dict(_open_group(tdir).attrs).get("muscle_teacher") or {"complete": False}


def _prepare_root(path: Path, stream: StreamData, new: dict, meta: dict | None, cfg: CacheConfig):
    """Open the cache for writing; (re)write the token stream unless it is already complete."""
    import zarr

    if meta is not None:
        return zarr.open_group(str(path), mode="r+")
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)  # an interrupted first build: nothing in it was committed
    root = zarr.open_group(str(path), mode="w")
    attrs = dict(new) | {
        "stream_complete": False,
        "n_tokens": stream.n_tokens,
        "n_examples": stream.n_examples,
        "muscle_version": __version__,
    }
    root.attrs["muscle_cache"] = attrs
    with zarr.config.set({"array.write_empty_chunks": True}):
        _write_stream(root, stream, cfg)
    for name in ("input_ids", "labels"):
        for f in (path / "stream" / name / "c").glob("*"):
            _fsync(f)
    attrs["stream_complete"] = True  # the commit of the stream: written last
    attrs["n_splits"] = {
        s: int((stream.split == i).sum()) for i, s in enumerate(_SPLIT_CODES) if s in new["splits"]
    }
    root.attrs["muscle_cache"] = attrs
    return root


def _finish_teacher(tg, name, stream, cfg, world_size, device, secs, tokens) -> None:
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


# ================================================================ inspect


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def inspect_cache(path: str | Path) -> dict:
    """Everything ``muscle-cache inspect`` prints, as a dict."""
    path = Path(path)
    meta = read_meta(path)
    root = _open_group(path)
    n_tok = int(meta.get("n_tokens", 0))
    info = {
        "path": str(path),
        "format": meta["format"],
        "task": meta["task"],
        "tokens": n_tok,
        "examples": int(meta.get("n_examples", 0)),
        "splits": meta.get("n_splits", {}),
        "k": meta["k"],
        "temperatures": meta["temperatures"],
        "chunk_tokens": meta["chunk_tokens"],
        "shard_tokens": meta["chunk_tokens"] * meta["shard_chunks"],
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
        "dataset_fingerprints": meta["dataset_fingerprints"],
        "stream_fingerprint": meta.get("stream_fingerprint"),
        "stream_complete": bool(meta.get("stream_complete")),
        "data_config": meta["data_config"],
        "stream_bytes": _dir_bytes(path / "stream") if (path / "stream").is_dir() else 0,
        "teachers": {},
    }
    for name in list_teachers(path):
        tg = root["teachers"][name]
        tm = dict(tg.attrs).get("muscle_teacher") or {}
        done = tg["done"][:] if "done" in tg else np.zeros(0)
        on_disk = _dir_bytes(path / "teachers" / name)
        raw = sum(
            int(np.prod(tg[a].shape)) * np.dtype(tg[a].dtype).itemsize
            for a in TEACHER_ARRAYS
            if a in tg
        )
        raw = raw * n_tok // max(tg["ids"].shape[0], 1) if "ids" in tg else raw
        info["teachers"][name] = {
            "complete": bool(tm.get("complete")) and bool(done.size) and bool(done.all()),
            "chunks_done": int(done.sum()),
            "chunks": int(done.size),
            "model": tm.get("model", {}),
            "vocab_size": tm.get("vocab_size"),
            "ids_dtype": tm.get("ids_dtype"),
            "value_dtype": tm.get("value_dtype"),
            "codec": tm.get("codec"),
            "build": tm.get("build", {}),
            "bytes_on_disk": on_disk,
            "bytes_per_token": on_disk / max(n_tok, 1),
            "compression_ratio": raw / max(on_disk, 1),
            "top_k_mass": _top_k_mass(meta, root, name),
        }
    return info


def stored_logprobs_at(
    lp1: np.ndarray, lse: np.ndarray, temperatures: Sequence[float], temperature: float
) -> np.ndarray:
    """Stored top-K log-probs at temperature 1 (P, K) -> at ``temperature``, from the stored
    lse (P, nT): log p_T = z / T - lse_T with z = log p_1 + lse_1 (CACHE_FORMAT.md §5).
    In place on ``lp1`` (pass the copy, in the float dtype wanted); returns it."""
    if temperature == 1.0:
        return lp1
    lp1 += lse[:, list(temperatures).index(1.0), None]
    lp1 *= lp1.dtype.type(1.0 / temperature)
    lp1 -= lse[:, list(temperatures).index(temperature), None]
    return lp1


def top_k_mass(path: str | Path, name: str, *, max_rows: int = 4096) -> dict[str, dict]:
    """How much of the teacher's probability its stored top-K holds, at each cached T.

    -> {str(T): {"median", "p10", "tokens"}} over the labelled positions of up to ``max_rows``
    rows (whole chunks, evenly spaced over the written ones; all rows of a smaller cache).
    The (K+1)-bin KL is a lower bound of the full-vocabulary KL that is only tight when this
    mass is near 1 (README, "How much of the paper's loss does a top-K cache keep?").
    """
    path = Path(path)
    return _top_k_mass(read_meta(path), _open_group(path), name, max_rows)


def _top_k_mass(meta: dict, root, name: str, max_rows: int = 4096) -> dict[str, dict]:
    tg = root["teachers"][name]
    temps = [float(t) for t in meta["temperatures"]]
    C, n_tok = int(meta["chunk_tokens"]), int(meta.get("n_tokens", 0))
    written = np.flatnonzero(tg["done"][:]) if "done" in tg else np.zeros(0, dtype=int)
    if written.size == 0 or 1.0 not in temps:
        return {}
    n_pick = min(written.size, -(-max_rows // C))
    picked = np.unique(written[np.linspace(0, written.size - 1, n_pick).round().astype(int)])
    masses = []
    for c in picked:
        lo, hi = int(c) * C, min((int(c) + 1) * C, n_tok)
        keep = root["stream"]["labels"][lo:hi] != -100  # (R,)
        lp1 = tg["logprobs"][lo:hi][keep].astype(np.float64)  # (R', K) log p at T = 1
        lse = tg["lse"][lo:hi][keep]  # (R', nT)
        masses.append(
            np.stack(
                [np.exp(stored_logprobs_at(lp1.copy(), lse, temps, t)).sum(1) for t in temps], 1
            )
        )  # (R', nT)
    mass = np.concatenate(masses)
    if mass.shape[0] == 0:
        return {}
    return {
        str(t): {
            "median": float(np.median(mass[:, i])),
            "p10": float(np.quantile(mass[:, i], 0.1)),
            "tokens": int(mass.shape[0]),
        }
        for i, t in enumerate(temps)
    }


def render_inspect(info: dict) -> str:
    lines = [
        f"cache       {info['path']}  (format {info['format']})",
        f"task        {info['task']}   splits {info['splits']}",
        f"tokens      {info['tokens']:,}   examples {info['examples']:,}",
        f"K           {info['k']}   temperatures {info['temperatures']}   "
        f"chunk {info['chunk_tokens']} tokens, shard {info['shard_tokens']} tokens",
        f"tokenizer   {info['tokenizer_fingerprint']}   stream {info['stream_fingerprint']}"
        f"   datasets {info['dataset_fingerprints']}",
        f"stream      {'complete' if info['stream_complete'] else 'INCOMPLETE'}, "
        f"{info['stream_bytes'] / max(info['tokens'], 1):.1f} B/token",
    ]
    if not info["teachers"]:
        lines.append("teachers    none")
    for name, t in info["teachers"].items():
        m = t["model"]
        state = (
            "complete" if t["complete"] else f"INCOMPLETE ({t['chunks_done']}/{t['chunks']} chunks)"
        )
        lines += [
            f"teacher {name}: {state}",
            f"  base      {m.get('base')}  (fingerprint {m.get('base_fingerprint')}, "
            f"dtype {m.get('dtype')})",
            f"  adapter   {m.get('adapter') or '-'}"
            + (f"  (sha256 {m['adapter_sha256'][:16]}...)" if m.get("adapter_sha256") else ""),
            f"  storage   ids {t['ids_dtype']}, log-probs {t['value_dtype']}, codec {t['codec']}",
            f"  size      {t['bytes_on_disk']:,} B = {t['bytes_per_token']:.1f} B/token, "
            f"compression {t['compression_ratio']:.2f}x",
        ]
        if t["build"]:
            lines.append(
                f"  built     {t['build'].get('finished')} on {t['build'].get('device')} "
                f"x{t['build'].get('world_size')}"
            )
        lines += _render_top_k_mass(t.get("top_k_mass") or {}, info["k"])
    return "\n".join(lines) + "\n"


def _render_top_k_mass(mass: dict, k: int) -> list[str]:
    if not mass:
        return []
    n = next(iter(mass.values()))["tokens"]
    cells = "   ".join(
        f"T={float(t):g}: median {m['median']:.0%} (p10 {m['p10']:.0%})" for t, m in mass.items()
    )
    lines = [f"  top-{k} mass {cells}   ({n:,} labelled tokens)"]
    for t, m in mass.items():
        if m["median"] < 0.5:
            lines.append(
                f"  note      at T={float(t):g} the top-{k} holds a median {m['median']:.0%} of the "
                "teacher's probability: the cached loss is a loose lower bound of the full KL "
                "there; a larger --k or a lower temperature tightens it"
            )
    return lines


# ================================================================ verify


@dataclass
class VerifyReport:
    errors: list[str] = field(default_factory=list)
    checked_chunks: int = 0
    rerun: dict = field(default_factory=dict)  # teacher -> stats

    @property
    def ok(self) -> bool:
        return not self.errors


def _shard_file(path: Path, rel: str, ndim: int, shard: int) -> str:
    return str(_chunk_files(path / rel, ndim, shard).relative_to(path))


def _read_checked(
    arr, lo: int, hi: int, where: str, cfg_chunk: int, path: Path, rel: str, shard_tokens: int
):
    """arr[lo:hi]; a decode failure becomes a MuscleError naming the chunk and shard file."""
    try:
        return arr[lo:hi]
    except Exception as e:
        for c in range(lo // cfg_chunk, math.ceil(hi / cfg_chunk)):
            try:
                arr[c * cfg_chunk : min((c + 1) * cfg_chunk, arr.shape[0])]
            except Exception:
                shard = c * cfg_chunk // shard_tokens
                raise MuscleError(
                    f"corrupted chunk {c} of {where} (tokens {c * cfg_chunk}-"
                    f"{(c + 1) * cfg_chunk - 1}, file {_shard_file(path, rel, arr.ndim, shard)}): "
                    f"{type(e).__name__}; rebuild that teacher (muscle-cache build --overwrite)"
                ) from None
        raise MuscleError(
            f"cannot read {where} tokens {lo}-{hi}: {type(e).__name__}: {e}"
        ) from None


def verify_cache(
    path: str | Path,
    *,
    rerun: Sequence[str] = (),
    sample: int = 64,
    seed: int = 0,
    device: str | None = None,
) -> VerifyReport:
    """Check every chunk decodes and is consistent; re-run teachers on sampled positions."""
    path = Path(path)
    meta = read_meta(path)
    rep = VerifyReport()
    root = _open_group(path)
    if not meta.get("stream_complete"):
        rep.errors.append("the token stream is incomplete (interrupted first build)")
        return rep
    stream = read_stream(root)
    C, S = int(meta["chunk_tokens"]), int(meta["chunk_tokens"]) * int(meta["shard_chunks"])
    _verify_stream(stream, meta, rep)
    for name in list_teachers(path):
        _verify_teacher(path, root, name, stream, meta, C, S, rep)
    for name in rerun:
        if name not in list_teachers(path):
            have = ", ".join(list_teachers(path)) or "none"
            raise MuscleError(f"no teacher {name!r} in cache {path} (it has: {have})")
        rep.rerun[name] = _rerun_teacher(path, root, name, stream, meta, sample, seed, device, rep)
    return rep


def _verify_stream(stream: StreamData, meta: dict, rep: VerifyReport) -> None:
    off = stream.offsets
    if off[0] != 0 or np.any(np.diff(off) <= 0):
        rep.errors.append("stream/offsets: not strictly increasing from 0")
    if stream.n_tokens != int(meta.get("n_tokens", -1)):
        rep.errors.append(f"stream: {stream.n_tokens} tokens, attrs say {meta.get('n_tokens')}")
    if stream.split.size and stream.split.max() >= len(_SPLIT_CODES):
        rep.errors.append("stream/split: unknown split code")
    if stream.fingerprint() != meta.get("stream_fingerprint"):
        rep.errors.append("stream: its fingerprint does not match the recorded one")


def _verify_teacher(path, root, name, stream, meta, C, S, rep: VerifyReport) -> None:
    tg = root["teachers"][name]
    tm = dict(tg.attrs).get("muscle_teacher") or {}
    where = f"teachers/{name}"
    try:
        done = tg["done"][:]
    except Exception as e:
        rep.errors.append(f"{where}/done: unreadable ({type(e).__name__})")
        return
    if not tm.get("complete"):
        rep.errors.append(f"{where}: incomplete ({int(done.sum())}/{done.size} chunks done)")
    vocab = int(tm.get("vocab_size") or 0)
    n = stream.n_tokens
    for u in range(max(1, math.ceil(n / S))):
        lo, hi = u * S, min((u + 1) * S, n)
        for a in TEACHER_ARRAYS:
            f = _chunk_files(path / where / a, tg[a].ndim, u)
            if done[lo // C : math.ceil(hi / C)].any() and not f.is_file():
                rep.errors.append(f"{where}/{a}: shard file {f.relative_to(path)} is missing")
        if not done[lo // C : math.ceil(hi / C)].all():
            continue
        try:
            got = {
                a: _read_checked(tg[a], lo, hi, f"{where}/{a}", C, path, f"{where}/{a}", S)
                for a in TEACHER_ARRAYS
            }
        except MuscleError as e:
            rep.errors.append(str(e))
            continue
        rep.checked_chunks += math.ceil((hi - lo) / C)
        lab = stream.labels[lo:hi]
        lp = got["logprobs"].astype(np.float32)
        bad = []
        if vocab and got["ids"].max(initial=0) >= vocab:
            bad.append("ids >= vocabulary size")
        if not np.isfinite(got["lse"]).all():
            bad.append("non-finite log-sum-exp")
        if np.isnan(lp).any() or (lp > 1e-2).any():
            bad.append("log-probs NaN or > 0")
        if (np.diff(lp, axis=1) > 1e-2).any():
            bad.append("top-K not in descending order")
        if (np.isnan(got["label_logprob"]) != (lab == IGNORE_INDEX)).any():
            bad.append("label log-prob NaN exactly where label == -100 violated")
        if bad:
            rep.errors.append(f"{where} shard {u} (tokens {lo}-{hi - 1}): " + "; ".join(bad))


def _rerun_teacher(path, root, name, stream, meta, sample, seed, device, rep) -> dict:
    """Re-run the recorded model on ``sample`` random positions and compare with the store."""
    from muscle.models import load_model
    from muscle.topk import teacher_topk

    check_teacher_provenance(path, name)
    spec = cache_teacher_spec(path, name)
    device = device or _default_device()
    model = load_model(spec, device)
    tg = root["teachers"][name]
    temps = [float(t) for t in meta["temperatures"]]
    K = int(meta["k"])
    rng = np.random.default_rng(seed)
    n = stream.n_tokens
    pos = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    ex = np.unique(np.searchsorted(stream.offsets, pos, side="right") - 1)
    stored = {
        a: tg[a].get_orthogonal_selection((pos,) + ((slice(None),) if tg[a].ndim == 2 else ()))
        for a in TEACHER_ARRAYS
    }
    # Forward each sampled example alone (no padding) and collect logits at the sampled rows.
    rows, lab_rows = [], []
    for e in ex:
        lo, hi = int(stream.offsets[e]), int(stream.offsets[e + 1])
        x = torch.from_numpy(stream.input_ids[lo:hi].astype(np.int64))[None].to(device)
        with torch.no_grad():
            logits = forward_logits(model, x, torch.ones_like(x)).float().cpu()  # (L, V)
        sel = pos[(pos >= lo) & (pos < hi)] - lo
        rows.append(logits[sel])
        lab_rows.append(torch.from_numpy(stream.labels[lo:hi][sel].astype(np.int64)))
    logits = torch.cat(rows)  # (P, V)
    labels = torch.cat(lab_rows)
    fresh = teacher_topk(logits, labels, K, tuple(temps))
    # Tolerances: fp16 storage (relative 2^-11 of |log p|) plus forward-pass noise of the dtype.
    fwd_tol = 2e-3 if spec.dtype == "float32" else 0.15
    lp_stored = torch.from_numpy(stored["logprobs"].astype(np.float32))  # (P, K)
    ids_stored = torch.from_numpy(stored["ids"].astype(np.int64))
    lse1 = fresh.lse[1.0]
    lp_fresh_at_stored = logits.gather(1, ids_stored) - lse1[:, None]  # (P, K) log p at stored ids
    fp16 = np.dtype(tg["logprobs"].dtype) == np.float16
    store_tol = lp_stored.abs() * 2.0**-10 if fp16 else torch.zeros_like(lp_stored)
    err = (lp_stored - lp_fresh_at_stored).abs() - store_tol
    kth_fresh = fresh.values[:, -1] - lse1  # (P,) K-th largest log p, recomputed
    set_err = (kth_fresh - lp_fresh_at_stored.min(1).values).clamp(min=0)  # stored set is a top-K
    lse_stored = torch.from_numpy(stored["lse"])
    lse_err = torch.stack([(lse_stored[:, i] - fresh.lse[t]).abs() for i, t in enumerate(temps)])
    valid = labels != IGNORE_INDEX
    lab_stored = torch.from_numpy(stored["label_logprob"])
    lab_fresh = fresh.label_logit - lse1
    lab_err = (lab_stored - lab_fresh)[valid].abs()
    stats = {
        "positions": int(len(pos)),
        "ids_exact": float((ids_stored == fresh.ids).all(1).float().mean()),
        "max_logprob_err": float(err.max().clamp(min=0)) if err.numel() else 0.0,
        "max_topk_set_err": float(set_err.max()) if set_err.numel() else 0.0,
        "max_lse_err": float(lse_err.max()) if lse_err.numel() else 0.0,
        "max_label_err": float(lab_err.max()) if lab_err.numel() else 0.0,
        "tolerance": fwd_tol,
    }
    for key in ("max_logprob_err", "max_topk_set_err", "max_lse_err", "max_label_err"):
        if not stats[key] <= fwd_tol:
            rep.errors.append(
                f"teachers/{name}: re-run differs from the store: {key}="
                f"{stats[key]:.3g} > {fwd_tol}"
            )
    return stats


# ================================================================ reader for the trainer


class CacheReader:
    """Batches of examples with their teachers' top-K, read as slices of the store.

    Opening checks the format, the stream, and that each requested teacher is complete and has
    all its shard files; every read checks the ``done`` bits of the chunks it touches and turns
    a decode failure (CRC mismatch, truncated shard) into a MuscleError naming the chunk.
    """

    def __init__(self, path: str | Path, teachers: Sequence[str] | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if not self.meta.get("stream_complete"):
            raise MuscleError(f"{self.path}: the token stream is incomplete (interrupted build)")
        self.teachers = {n: read_teacher_meta(self.path, n) for n in list_teachers(self.path)}
        self._root = None
        root = self._group()
        self.stream = read_stream(root)
        self.temperatures = [float(t) for t in self.meta["temperatures"]]
        self.k = int(self.meta["k"])
        self.chunk_tokens = int(self.meta["chunk_tokens"])
        self.shard_tokens = self.chunk_tokens * int(self.meta["shard_chunks"])
        self._done: dict[str, np.ndarray] = {}
        for name in teachers or ():
            self.check_teacher(name)

    def _group(self):
        if self._root is None:  # opened lazily: DataLoader workers open their own handles
            self._root = _open_group(self.path)
        return self._root

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_root"] = None
        return state

    def check_teacher(self, name: str) -> None:
        """Refuse a teacher that is missing, incomplete or lacks a shard file."""
        if name in self._done:
            return
        if name not in self.teachers:
            have = ", ".join(self.teachers) or "none"
            raise MuscleError(f"no teacher {name!r} in cache {self.path} (it has: {have})")
        tg = self._group()["teachers"][name]
        done = tg["done"][:]
        if not self.teachers[name].get("complete") or not done.all():
            raise MuscleError(
                f"teacher {name!r} in {self.path} is incomplete ({int(done.sum())}/{done.size} "
                f"chunks done, first missing: chunk {int(np.argmin(done))}): finish its build "
                "(re-run muscle-cache build)"
            )
        n_units = max(1, math.ceil(self.stream.n_tokens / self.shard_tokens))
        for a in TEACHER_ARRAYS:
            for u in range(n_units):
                f = _chunk_files(self.path / "teachers" / name / a, tg[a].ndim, u)
                if not f.is_file():
                    raise MuscleError(
                        f"teacher {name!r}: shard file {f.relative_to(self.path)} is missing "
                        "(corrupted cache): run muscle-cache verify and rebuild that teacher"
                    )
        self._done[name] = done

    def split_indices(self, split: str) -> np.ndarray:
        if split not in self.meta["splits"]:
            raise MuscleError(
                f"split {split!r} is not in cache {self.path} ({self.meta['splits']})"
            )
        return np.flatnonzero(self.stream.split == _SPLIT_CODES.index(split))

    def num_examples(self, split: str) -> int:
        return int(len(self.split_indices(split)))

    def num_batches(self, split: str, batch_size: int, world_size: int = 1) -> int:
        return math.ceil(self.num_examples(split) / (batch_size * world_size))

    def example_id(self, index: int):
        return json.loads(self.stream.example_ids[index])

    # -- batches ---------------------------------------------------------------------------

    def batch_plan(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[np.ndarray]:
        """This rank's example indices for each global batch (batch_size * world_size)."""
        idx = self.split_indices(split)
        if shuffle:
            idx = idx[np.random.default_rng([seed, epoch]).permutation(len(idx))]
        g = batch_size * world_size
        plan = []
        for i in range(0, len(idx), g):
            parts = np.array_split(idx[i : i + g], world_size)
            plan.append(parts[rank] if rank < len(parts) else parts[-1][:0])
        return plan

    def iter_batches(
        self,
        split: str,
        batch_size: int,
        *,
        temperature: float,
        teachers: Sequence[str] = ("v1", "v2"),
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Batches of examples, shuffled by example (order depends only on seed and epoch).

        Global batch i holds ``batch_size * world_size`` examples; rank r gets its contiguous
        part, so a 2-rank run sees the batches of a 1-rank run with twice the batch size.
        A rank whose part of the (short) last batch is empty gets one example with every label
        set to -100 and ``example_ids == []``. ``skip`` drops the first batches (resume).
        """
        self._check_temperature(temperature)
        for t in teachers:
            self.check_teacher(t)
        plan = self.batch_plan(
            split,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
        )[skip:]
        if num_workers <= 0:
            for group in plan:
                yield self.read_batch(group, temperature=temperature, teachers=teachers)
            return
        ds = _BatchDataset(self, plan, float(temperature), tuple(teachers))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
        )
        yield from loader

    def _check_temperature(self, temperature: float) -> None:
        if float(temperature) not in self.temperatures:
            raise MuscleError(
                f"temperature {temperature} is not cached in {self.path} (cached: "
                f"{self.temperatures}): rebuild the cache with --temperatures"
            )

    def read_batch(
        self, examples: np.ndarray, *, temperature: float, teachers: Sequence[str] = ("v1", "v2")
    ) -> dict[str, Any]:
        """One padded batch of the given example indices (in that order)."""
        examples = np.asarray(examples, dtype=np.int64)
        empty = len(examples) == 0
        if empty:  # a rank with nothing in the last batch: a dummy row contributing no loss
            examples = np.asarray([0], dtype=np.int64)
        off = self.stream.offsets
        starts, lengths = off[examples], off[examples + 1] - off[examples]  # (B,), (B,)
        B, T = len(examples), int(lengths.max())
        # Token positions of the batch, sorted (example ranges are disjoint, so unique):
        # reading them touches only the chunks that hold them.
        order = np.argsort(starts, kind="stable")
        pos = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order])
        # src[b]: where example b's rows start inside the sorted read.
        src = np.empty(B, dtype=np.int64)
        src[order] = np.concatenate([[0], np.cumsum(lengths[order])[:-1]])

        def pad(flat: np.ndarray, fill, dtype) -> np.ndarray:  # (P, ...) -> (B, T, ...)
            out = np.full((B, T) + flat.shape[1:], fill, dtype=dtype)
            for b in range(B):
                out[b, : lengths[b]] = flat[src[b] : src[b] + lengths[b]]
            return out

        labels = self.stream.labels[pos]
        if empty:
            labels = np.full_like(labels, IGNORE_INDEX)
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(pad(self.stream.input_ids[pos], 0, np.int64)),
            "attention_mask": torch.from_numpy(pad(np.ones(len(pos), np.int64), 0, np.int64)),
            "labels": torch.from_numpy(pad(labels, IGNORE_INDEX, np.int64)),
            "example_ids": [] if empty else [self.example_id(int(e)) for e in examples],
            "example_index": torch.from_numpy(examples.copy()),
        }
        ignored = labels == IGNORE_INDEX
        for t in teachers:
            ids, lp, lab = self._read_teacher(t, pos, float(temperature))
            lab[ignored] = 0.0  # NaN in the store; 0 here so masks never propagate NaN
            batch[f"{t}_ids"] = torch.from_numpy(pad(ids, 0, np.int64))
            batch[f"{t}_logprobs"] = torch.from_numpy(pad(lp, 0.0, np.float32))
            batch[f"{t}_label_logprob"] = torch.from_numpy(pad(lab, 0.0, np.float32))
        return batch

    def _read_teacher(self, name: str, pos: np.ndarray, temperature: float):
        """(P, K) ids, (P, K) log-probs at T, (P,) label log-prob at T=1 for sorted positions."""
        self.check_teacher(name)
        chunks = np.unique(pos // self.chunk_tokens)
        done = self._done[name]
        if not done[chunks].all():
            c = int(chunks[~done[chunks].astype(bool)][0])
            raise MuscleError(f"teacher {name!r}: chunk {c} is not done (incomplete build)")
        tg = self._group()["teachers"][name]
        got = {}
        for a in TEACHER_ARRAYS:
            arr = tg[a]
            sel = (pos, slice(None)) if arr.ndim == 2 else (pos,)
            try:
                got[a] = arr.get_orthogonal_selection(sel)
            except Exception as e:
                self._name_bad_chunk(name, a, chunks)
                raise MuscleError(
                    f"teacher {name!r}: cannot read {a}: {type(e).__name__}: {e}"
                ) from None
        lp1 = got["logprobs"].astype(np.float32)  # (P, K) log p at T=1
        lp = stored_logprobs_at(lp1, got["lse"], self.temperatures, temperature)
        return got["ids"], lp, got["label_logprob"]

    def _name_bad_chunk(self, name: str, array: str, chunks: np.ndarray) -> None:
        arr = self._group()["teachers"][name][array]
        rel = f"teachers/{name}/{array}"
        for c in chunks:
            lo = int(c) * self.chunk_tokens
            _read_checked(
                arr,
                lo,
                min(lo + self.chunk_tokens, arr.shape[0]),
                rel,
                self.chunk_tokens,
                self.path,
                rel,
                self.shard_tokens,
            )


class _BatchDataset(torch.utils.data.Dataset):
    """Batch i of a fixed plan; each DataLoader worker reads with its own zarr handles."""

    def __init__(
        self,
        reader: CacheReader,
        plan: list[np.ndarray],
        temperature: float,
        teachers: tuple[str, ...],
    ):
        self.reader, self.plan, self.temperature, self.teachers = (
            reader,
            plan,
            temperature,
            teachers,
        )

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.reader.read_batch(
            self.plan[i], temperature=self.temperature, teachers=self.teachers
        )


def _identity(x):
    return x


__all__ = [
    "FORMAT_VERSION",
    "CacheConfig",
    "CacheReader",
    "BuildResult",
    "VerifyReport",
    "build_cache",
    "cache_teacher_spec",
    "check_teacher_provenance",
    "teacher_provenance",
    "inspect_cache",
    "render_inspect",
    "verify_cache",
    "resolve_cache_config",
    "read_meta",
    "list_teachers",
]
