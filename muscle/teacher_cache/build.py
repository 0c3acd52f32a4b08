"""``build_cache``: add one teacher to a cache, creating the cache (and its token stream) if it
is new, resuming a partial build of the same teacher, refusing to mix incompatible teachers.

The build works in *units* of one shard: a unit's examples are forwarded, its arrays written
whole, fsync'ed, and only then its ``done`` bits set (``write.py``). Units are independent, so a
killed build resumes at the first unit not done, and ``torchrun`` ranks take disjoint unit
ranges (rank 0 alone creates the root and the teacher group; the others wait for it).
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from muscle import MuscleError, __version__, distributed
from muscle.config import DataConfig, ModelSpec
from muscle.locking import writer_lock
from muscle.tail_sampling import teacher_key
from muscle.teacher_cache.compute import (
    _plan_batches,
    _unit_examples,
    check_path_on,
    compute_unit,
)
from muscle.teacher_cache.decide import Plan, cache_lock, decide, discard, teacher_lock
from muscle.teacher_cache.schema import (
    CacheConfig,
    build_schema,
    ids_dtype_for,
)
from muscle.teacher_cache.store import open_group
from muscle.teacher_cache.stream import make_stream
from muscle.teacher_cache.write import (
    _create_teacher,
    _remove_partials,
    _teacher_layout_ok,
    _write_unit,
    finish_teacher,
    prepare_root,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def rank_units(n_units: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced unit (shard) ranges: rank r builds units [a_r, a_{r+1})."""
    a = n_units * rank // world_size
    b = n_units * (rank + 1) // world_size
    return range(a, b)


# ================================================================ build


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise MuscleError(f"bad teacher name {name!r}: use letters, digits, '_', '-', '.'")


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

    Several processes may build teachers of one cache at once (the cache's writer lock
    serialises creating it; a second build of the same teacher is refused, naming the first).
    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; rank 0 alone looks at and
    creates the cache, the others wait for it, then each writes its own shards.
    """
    from muscle.data import encode_splits, load_splits, model_max_length
    from muscle.models import (
        describe_model,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        tokenizer_fingerprint,
    )
    from muscle.tasks import dataset_fingerprint, get_task

    t_start = time.time()
    path = Path(path)
    cfg = cfg or CacheConfig()
    cfg.validate()
    _check_name(name)
    schema = build_schema(cfg)
    skipped = BuildResult(path, name, 0, 0, 0, 0, 0.0, 0.0, extra={"skipped": True})
    with distributed.process_group("gloo") as dist, contextlib.ExitStack() as held:
        device = str(resolve_device(device))  # under torchrun: this rank's GPU
        dtype_name = _effective_dtype(spec, dtype)
        resolved = resolve_dtype(dtype_name, device)
        spec = replace(spec, dtype=str(resolved).replace("torch.", ""))
        model_info = describe_model(spec) | {"dtype": spec.dtype}

        # --- what this teacher would add: checked against the cache before any model load
        task = get_task(data.task)
        tok = load_tokenizer(spec)
        # The trainers' data path (muscle.data): the cache's stream is their tokens exactly.
        examples = load_splits(data, cfg.splits)
        new = {
            "format": schema.format,
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
        if schema.format >= 2:  # format 1's attributes stay exactly what they were
            new |= {
                "tail_samples": cfg.tail_samples,
                "tail_seed": cfg.tail_seed,
                "proposal_temperature": cfg.proposal_temperature,
            }

        # A first look, without locks (it writes nothing): refusals and the no-op come before
        # the model load; the decision that counts is taken again under the locks below.
        def first_look() -> Plan:
            try:
                return decide(path, name, new, model_info, overwrite)
            except MuscleError:
                if not path.is_dir():
                    raise
                # Another build may be creating this cache right now (its root half written
                # looks foreign for a moment): a refusal counts once confirmed under the lock.
                with writer_lock(cache_lock(path), what=f"cache {path}", wait=True):
                    return decide(path, name, new, model_info, overwrite)

        plan = distributed.on_main(first_look)
        if plan.teacher == "skip":
            # The same command run again is a no-op (pipelines re-run finished stages).
            return replace(skipped, seconds=time.time() - t_start)
        if plan.meta is not None and data.max_length is None:
            data = replace(data, max_length=plan.meta["data_config"]["max_length"])

        # --- the teacher and the token stream (still nothing written)
        model = load_model(spec, device)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if cfg.k > vocab:
            raise MuscleError(f"K={cfg.k} is larger than the vocabulary of {name} ({vocab})")
        if cfg.tail_samples > vocab - cfg.k:
            raise MuscleError(
                f"--tail-samples {cfg.tail_samples} is larger than the tail of {name}: V - K = "
                f"{vocab} - {cfg.k} = {vocab - cfg.k} tokens outside the top-K; lower "
                "--tail-samples or --top-k"
            )
        if data.max_length is None:
            data = replace(data, max_length=model_max_length(model))
        stream = make_stream(encode_splits(tok, data, examples, max_length=data.max_length))
        new["data_config"] = asdict(data)
        new["stream_fingerprint"] = stream.fingerprint()
        ids_dt = ids_dtype_for(vocab, cfg.ids_dtype)
        tattrs = {
            "name": name,
            "format": schema.format,
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
        if schema.format >= 2:
            tattrs |= {
                "tail_samples": cfg.tail_samples,
                "tail_seed": cfg.tail_seed,
                "proposal_temperature": cfg.proposal_temperature,
                "teacher_key": teacher_key(name),
            }

        def prepare() -> str:  # rank 0; the other ranks wait for it (on_main)
            held.enter_context(
                writer_lock(teacher_lock(path, name), what=f"teacher {name!r} of cache {path}")
            )
            with writer_lock(cache_lock(path), what=f"cache {path}", wait=True):
                plan = decide(path, name, new, model_info, overwrite)
                if plan.teacher == "skip":
                    return "skip"
                if plan.discard:
                    discard(path, name)
                root = prepare_root(path, stream, new, plan.meta, cfg, schema)
                tg = root["teachers"][name] if plan.teacher == "resume" else None
                if tg is not None and _teacher_layout_ok(tg, cfg, stream.n_tokens, ids_dt, schema):
                    _remove_partials(path / "teachers" / name)
                    return "resume"
                _create_teacher(root, name, cfg, stream.n_tokens, ids_dt, tattrs, schema)
                return "create"

        tdir = path / "teachers" / name
        try:
            if distributed.on_main(prepare) == "skip":  # completed by another process meanwhile
                return replace(skipped, seconds=time.time() - t_start)
            root = open_group(path, "r+")
            tg = root["teachers"][name]
            done = tg[schema.done.name][:]
            n_units = max(1, math.ceil(stream.n_tokens / cfg.shard_tokens))
            mine = rank_units(n_units, dist.rank, dist.world_size)
            todo = [u for u in mine if not _unit_done(done, u, cfg)]
            resumed = len(todo) < len(mine)
            n_todo_tokens = sum(_unit_span(u, cfg, stream.n_tokens) for u in todo)
            if todo:
                first = _plan_batches(
                    np.diff(stream.offsets),
                    _unit_examples(stream.offsets, *_unit_range(todo[0], cfg, stream.n_tokens)),
                    cfg.batch_size,
                )[0][:2]
                check_path_on(model, stream, first, device, tok.pad_token_id, resolved)
            t0 = time.time()
            with _progress_bar(n_todo_tokens, name, enabled=progress and dist.is_main) as bar:
                for u in todo:
                    lo, hi = _unit_range(u, cfg, stream.n_tokens)
                    res = compute_unit(
                        model,
                        stream,
                        lo,
                        hi,
                        cfg,
                        device=device,
                        ids_dtype=ids_dt,
                        pad_id=tok.pad_token_id,
                        progress=bar,
                        schema=schema,
                        teacher=name,
                    )
                    _write_unit(tg, tdir, u, res, cfg, schema)
            secs = time.time() - t0
            distributed.barrier()
            if dist.is_main:
                finish_teacher(tg, name, stream, cfg, dist.world_size, device, secs, n_todo_tokens)
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


def _unit_range(u: int, cfg: CacheConfig, n_tokens: int) -> tuple[int, int]:
    lo = u * cfg.shard_tokens
    return lo, min(lo + cfg.shard_tokens, max(n_tokens, 1))


def _unit_span(u: int, cfg: CacheConfig, n_tokens: int) -> int:
    lo, hi = _unit_range(u, cfg, n_tokens)
    return hi - lo


def _unit_done(done: np.ndarray, u: int, cfg: CacheConfig) -> bool:
    c0 = u * cfg.shard_chunks
    return bool(done[c0 : c0 + cfg.shard_chunks].all())


@contextlib.contextmanager
def _progress_bar(total: int, name: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on stderr (None when disabled), closed however the body ends: an error
    message printed after it then starts on its own line, not on the bar's."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"cache {name}",
        file=sys.stderr,
        smoothing=0.1,
    )
    try:
        yield bar
    finally:
        bar.close()
