"""``muscle-cache inspect``: what a cache holds (teachers, provenance, sizes, compression,
completeness, top-K probability mass), as a dict and as text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from muscle.teacher_cache.read import stored_logprobs_at
from muscle.teacher_cache.schema import IGNORE_INDEX
from muscle.teacher_cache.store import (
    REBUILD_CACHE,
    REBUILD_TEACHER,
    cache_schema,
    list_teachers,
    open_group,
    read_checked,
    read_meta,
)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def inspect_cache(path: str | Path) -> dict:
    """Everything ``muscle-cache inspect`` prints, as a dict."""
    path = Path(path)
    meta = read_meta(path)
    schema = cache_schema(meta)
    root = open_group(path)
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
        done = tg[schema.done.name][:] if schema.done.name in tg else np.zeros(0)
        on_disk = _dir_bytes(path / "teachers" / name)
        raw = sum(
            int(np.prod(tg[a].shape)) * np.dtype(tg[a].dtype).itemsize
            for a in schema.teacher_arrays
            if a in tg
        )
        rows = tg[schema.teacher_arrays[0]].shape[0] if schema.teacher_arrays[0] in tg else 0
        raw = raw * n_tok // max(rows, 1) if rows else raw  # allocated rows: max(N, 1)
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
            "top_k_mass": _top_k_mass(path, meta, root, name),
        }
    return info


def top_k_mass(path: str | Path, name: str, *, max_rows: int = 4096) -> dict[str, dict]:
    """How much of the teacher's probability its stored top-K holds, at each cached T.

    -> {str(T): {"median", "p10", "tokens"}} over the labelled positions of up to ``max_rows``
    rows (whole chunks, evenly spaced over the written ones; all rows of a smaller cache).
    The (K+1)-bin KL is a lower bound of the full-vocabulary KL that is only tight when this
    mass is near 1 (README, "How much of the paper's loss does a top-K cache keep?").
    """
    path = Path(path)
    return _top_k_mass(path, read_meta(path), open_group(path), name, max_rows)


def _top_k_mass(path: Path, meta: dict, root, name: str, max_rows: int = 4096) -> dict[str, dict]:
    tg = root["teachers"][name]
    temps = [float(t) for t in meta["temperatures"]]
    C, n_tok = int(meta["chunk_tokens"]), int(meta.get("n_tokens", 0))
    written = np.flatnonzero(tg["done"][:]) if "done" in tg else np.zeros(0, dtype=int)
    if written.size == 0 or 1.0 not in temps:
        return {}
    n_pick = min(written.size, -(-max_rows // C))
    picked = np.unique(written[np.linspace(0, written.size - 1, n_pick).round().astype(int)])
    masses = []
    where = f"teachers/{name}"
    for c in picked:
        rows = slice(int(c) * C, min((int(c) + 1) * C, n_tok))
        labels = read_checked(root["stream"]["labels"], path, "stream/labels", rows, REBUILD_CACHE)
        keep = labels != IGNORE_INDEX  # (R,)
        lp1 = read_checked(tg["logprobs"], path, f"{where}/logprobs", rows, REBUILD_TEACHER)
        lse = read_checked(tg["lse"], path, f"{where}/lse", rows, REBUILD_TEACHER)[keep]
        lp1 = lp1[keep].astype(np.float64)  # (R', K) log p at T = 1
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
