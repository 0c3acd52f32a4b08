"""The cache's arrays, declared once per format: name -> rows x columns, dtype, fill, chunking.

The writer creates, the reader and ``verify`` read, and ``inspect`` sizes exactly the arrays
listed here; ``muscle/CACHE_FORMAT.md`` §2 is the normative table of the same schema. Adding a
teacher field means: an :class:`ArraySpec` in a new format's ``teacher`` tuple, the code that
computes it (``compute.compute_unit``), the code that consumes it (``read.TEACHER_ENTRIES``),
and the spec. :class:`CacheConfig`, the settings that size these arrays, lives here too.

Format 1 is the top-K head; format 2 adds a sampled tail (M draws per position, their T=1
log-probs, the teacher's negative entropy per T: ``muscle/TAIL_ESTIMATOR.md``). A build writes
format 2 exactly when ``CacheConfig.tail_samples`` > 0, so a format 1 build is what it was.

Dimensions (resolved by :class:`Dims`):

    rows  "N"      tokens, token-major: chunks of C rows, shards of S = C * shard_chunks rows
                   (one shard = one file), allocated with max(N, 1) rows
          "E"      examples; "E+1" example boundaries: one chunk, no shards
          "chunks" one entry per token chunk (the ``done`` bits): shard_chunks entries per chunk
    cols  None (1-D), "K" (top-K), "nT" (cached temperatures), "M" (tail draws, format 2)
    dtype a numpy name, "str" (UTF-8 strings), or the teacher's "ids" / "values" dtype
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muscle import MuscleError
from muscle.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from muscle.data import IGNORE_INDEX

FORMAT_VERSION = 2  # the newest format this muscle reads and writes (1: no sampled tail)
DEFAULT_TAIL_SAMPLES = 0  # M: 0 writes format 1 (see CacheConfig.tail_samples)
SPLIT_CODES = ("train", "validation")  # stream/split stores the index into this tuple


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store. See the module docstring for ``rows``, ``cols`` and ``dtype``."""

    name: str
    rows: str  # "N" | "E" | "E+1" | "chunks"
    cols: str | None  # None | "K" | "nT" | "M"
    dtype: str  # numpy name | "str" | "ids" | "values"
    fill: Any
    meaning: str

    @property
    def ndim(self) -> int:
        return 1 if self.cols is None else 2


@dataclass(frozen=True)
class Schema:
    """Every array of one cache format: the token stream, a teacher's data arrays, its commit."""

    format: int
    stream: tuple[ArraySpec, ...]
    teacher: tuple[ArraySpec, ...]  # written per unit, committed by ``done``
    done: ArraySpec

    @property
    def teacher_arrays(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.teacher)

    def teacher_spec(self, name: str) -> ArraySpec:
        return next(a for a in (*self.teacher, self.done) if a.name == name)


STREAM = (
    ArraySpec("input_ids", "N", None, "int32", 0, "tokens of all examples, concatenated"),
    ArraySpec("labels", "N", None, "int32", IGNORE_INDEX, "next-token label, -100 = no target"),
    ArraySpec("offsets", "E+1", None, "int64", 0, "example e is rows [offsets[e], offsets[e+1])"),
    ArraySpec("split", "E", None, "uint8", 0, "index into SPLIT_CODES"),
    ArraySpec("example_id", "E", None, "str", "", "the task's example id, JSON-encoded"),
)
DONE = ArraySpec("done", "chunks", None, "uint8", 0, "1 = that chunk of every array is durable")
FORMAT_1 = Schema(
    format=1,
    stream=STREAM,
    teacher=(
        ArraySpec("ids", "N", "K", "ids", 0, "top-K token ids, by descending logit"),
        ArraySpec("logprobs", "N", "K", "values", float("nan"), "log p at T=1 of those ids"),
        ArraySpec("lse", "N", "nT", "float32", float("nan"), "logsumexp(z / T) per cached T"),
        ArraySpec("label_logprob", "N", None, "float32", float("nan"), "log p_1(label); NaN: -100"),
    ),
    done=DONE,
)
FORMAT_2 = Schema(
    format=2,
    stream=STREAM,
    teacher=(
        *FORMAT_1.teacher,
        ArraySpec("tail_ids", "N", "M", "ids", 0, "M draws from the tail at T_r, draw order"),
        ArraySpec("tail_logprobs", "N", "M", "values", float("nan"), "log p at T=1 of the draws"),
        ArraySpec("negent", "N", "nT", "float32", float("nan"), "sum_j p_T log p_T per cached T"),
    ),
    done=DONE,
)
SCHEMAS: dict[int, Schema] = {1: FORMAT_1, 2: FORMAT_2}


def build_schema(cfg: CacheConfig) -> Schema:
    """The format a build with these settings writes: 2 with a sampled tail (M > 0), else 1."""
    return SCHEMAS[2 if cfg.tail_samples > 0 else 1]


def schema_for(fmt: Any, where: str | Path = "cache") -> Schema:
    """The schema of a cache's ``format`` attribute; a format this muscle cannot read is one
    clear error (a newer one says to upgrade, anything else to rebuild)."""
    if fmt in SCHEMAS and not isinstance(fmt, bool):
        return SCHEMAS[fmt]
    readable = ", ".join(str(f) for f in sorted(SCHEMAS))
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > max(SCHEMAS):
        raise MuscleError(
            f"{where}: cache format {fmt} is newer than this muscle reads (format {readable}): "
            "upgrade muscle, or rebuild the cache with this version"
        )
    raise MuscleError(
        f"{where}: cache format {fmt!r}, this muscle reads format {readable}: rebuild the cache"
    )


# ================================================================ settings


@dataclass(frozen=True)
class CacheConfig:
    """How a cache is laid out. ``k``, ``temperatures``, ``splits``, ``chunk_tokens`` and
    ``shard_chunks`` are per cache (every teacher must agree); the rest is per teacher."""

    k: int = DEFAULT_TOP_K
    # must contain 1.0 (logprobs are stored at T=1)
    temperatures: tuple[float, ...] = (1.0, DEFAULT_TEMPERATURE)
    splits: tuple[str, ...] = SPLIT_CODES
    value_dtype: str = "float16"  # dtype of the stored T=1 log-probs: float16 | float32
    ids_dtype: str = "auto"  # auto: the smallest unsigned int that holds the vocabulary
    codec: str = "zstd"  # Blosc compressor: zstd | lz4 | lz4hc | blosclz | zlib | none
    clevel: int = 5
    shuffle: str = "shuffle"  # Blosc filter: shuffle | bitshuffle | noshuffle
    chunk_tokens: int = 2048  # tokens per chunk: the unit a reader decodes
    shard_chunks: int = 32  # chunks per shard: one file per shard; the build/rank unit
    batch_size: int = 8  # examples per teacher forward pass
    # M tail tokens drawn per position and teacher (format 2); 0 writes format 1. The default
    # stays 0 until issue 13's measurements pick M for the byte budget: format 2 costs
    # M * (ids + value bytes) + 4 nT bytes more per token and teacher (CACHE_FORMAT.md §9).
    tail_samples: int = DEFAULT_TAIL_SAMPLES
    tail_seed: int = 0  # the sampler's seed, in [0, 2^63) (TAIL_ESTIMATOR.md §6)

    @property
    def shard_tokens(self) -> int:
        return self.chunk_tokens * self.shard_chunks

    @property
    def proposal_temperature(self) -> float:
        """T_r, the temperature the tail is drawn at: the highest cached one (TAIL_ESTIMATOR.md
        §4: the importance weights to every cached T <= T_r are then bounded)."""
        return max(float(t) for t in self.temperatures)

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
            if s not in SPLIT_CODES:
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
        if isinstance(self.tail_samples, bool) or not (
            isinstance(self.tail_samples, int) and self.tail_samples >= 0
        ):
            raise MuscleError(
                f"--tail-samples must be an integer >= 0 (0: no sampled tail), "
                f"got {self.tail_samples!r}"
            )
        if isinstance(self.tail_seed, bool) or not (
            isinstance(self.tail_seed, int) and 0 <= self.tail_seed < 2**63
        ):
            raise MuscleError(
                f"--tail-seed must be an integer in [0, 2^63), got {self.tail_seed!r}"
            )


# Settings every teacher of one cache shares; a mismatch is refused (or taken from the cache
# when not given explicitly, see store.resolve_cache_config).
CACHE_LEVEL = (
    "k",
    "temperatures",
    "splits",
    "chunk_tokens",
    "shard_chunks",
    "tail_samples",
    "tail_seed",
)


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


# ================================================================ resolved layout


@dataclass(frozen=True)
class Dims:
    """The numbers a schema's symbolic dimensions and dtypes resolve to, for one writer."""

    cfg: CacheConfig
    n_tokens: int
    n_examples: int = 0
    ids_dtype: Any = None  # the teacher's ids dtype (np.dtype); None for the stream

    @property
    def token_rows(self) -> int:
        return max(self.n_tokens, 1)

    def rows(self, spec: ArraySpec) -> int:
        return {
            "N": self.token_rows,
            "E": self.n_examples,
            "E+1": self.n_examples + 1,
            "chunks": math.ceil(self.token_rows / self.cfg.chunk_tokens),
        }[spec.rows]

    def cols(self, spec: ArraySpec) -> tuple[int, ...]:
        if spec.cols is None:
            return ()
        return (
            {"K": self.cfg.k, "nT": len(self.cfg.temperatures), "M": self.cfg.tail_samples}[
                spec.cols
            ],
        )

    def dtype(self, spec: ArraySpec) -> Any:
        if spec.dtype == "ids":
            return self.ids_dtype
        if spec.dtype == "values":
            return self.cfg.value_dtype
        return str if spec.dtype == "str" else spec.dtype

    def shape(self, spec: ArraySpec) -> tuple[int, ...]:
        return (self.rows(spec), *self.cols(spec))

    def create_kwargs(self, spec: ArraySpec) -> dict[str, Any]:
        """Keyword arguments of ``zarr.Group.create_array`` for this array (CACHE_FORMAT §2)."""
        from zarr.codecs import Crc32cCodec

        dtype, cols = self.dtype(spec), self.cols(spec)
        kw: dict[str, Any] = {"shape": self.shape(spec), "dtype": dtype, "fill_value": spec.fill}
        if spec.rows == "N":
            kw["chunks"] = (self.cfg.chunk_tokens, *cols)
            kw["shards"] = (self.cfg.shard_tokens, *cols)
        elif spec.rows == "chunks":
            kw["chunks"] = (self.cfg.shard_chunks,)
        else:
            kw["chunks"] = (max(self.rows(spec), 1), *cols)
        if spec.rows == "chunks":
            kw["compressors"] = [Crc32cCodec()]  # bits: nothing to compress, still checked
        elif dtype is not str:  # strings keep zarr's default codecs (vlen-utf8, zstd)
            kw["compressors"] = compressors(self.cfg, np.dtype(dtype).itemsize)
        return kw


def compressors(cfg: CacheConfig, typesize: int) -> list:
    """Blosc (unless "none") then a CRC32C of every chunk, so corruption is an error, not data."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    out: list = []
    if cfg.codec != "none":
        out.append(
            BloscCodec(cname=cfg.codec, clevel=cfg.clevel, shuffle=cfg.shuffle, typesize=typesize)
        )
    out.append(Crc32cCodec())
    return out


def shard_file(array_dir: Path, ndim: int, shard: int) -> Path:
    """The file holding shard ``shard`` (rows along axis 0) of an array: ``c/<s>[/0]``."""
    return array_dir.joinpath("c", str(shard), *(["0"] * (ndim - 1)))
