"""``muscle-cache inspect``: what a cache holds (teachers, provenance, sizes, compression,
completeness, top-K probability mass; format 2: the sampled tail's weight spread and estimator
SD), as a dict and as text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
from muscle.topk import stored_logprobs_at


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
        if "tail_ids" in schema.teacher_arrays:
            info["teachers"][name]["tail"] = {
                "samples": int(meta["tail_samples"]),
                "seed": int(meta["tail_seed"]),
                "proposal_temperature": float(meta["proposal_temperature"]),
                "spread": _tail_spread(path, meta, root, name),
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
    if 1.0 not in temps:
        return {}
    masses = []
    where = f"teachers/{name}"
    for rows, keep in _sampled_rows(path, meta, root, name, max_rows):
        lp1 = read_checked(tg["logprobs"], path, f"{where}/logprobs", rows, REBUILD_TEACHER)
        lse = read_checked(tg["lse"], path, f"{where}/lse", rows, REBUILD_TEACHER)[keep]
        lp1 = lp1[keep].astype(np.float64)  # (R', K) log p at T = 1
        masses.append(
            np.stack([np.exp(stored_logprobs_at(lp1, lse, temps, t)).sum(1) for t in temps], 1)
        )  # (R', nT)
    if not masses or (mass := np.concatenate(masses)).shape[0] == 0:
        return {}
    return {
        str(t): {
            "median": float(np.median(mass[:, i])),
            "p10": float(np.quantile(mass[:, i], 0.1)),
            "tokens": int(mass.shape[0]),
        }
        for i, t in enumerate(temps)
    }


def _sampled_rows(path: Path, meta: dict, root, name: str, max_rows: int):
    """(row slice, labelled (R,) bool) of whole written chunks, evenly spaced, up to
    ``max_rows`` rows (all rows of a smaller cache): what inspect's statistics look at."""
    tg = root["teachers"][name]
    C, n_tok = int(meta["chunk_tokens"]), int(meta.get("n_tokens", 0))
    written = np.flatnonzero(tg["done"][:]) if "done" in tg else np.zeros(0, dtype=int)
    if written.size == 0:
        return
    n_pick = min(written.size, -(-max_rows // C))
    picked = np.unique(written[np.linspace(0, written.size - 1, n_pick).round().astype(int)])
    for c in picked:
        rows = slice(int(c) * C, min((int(c) + 1) * C, n_tok))
        labels = read_checked(root["stream"]["labels"], path, "stream/labels", rows, REBUILD_CACHE)
        yield rows, labels != IGNORE_INDEX


def _tail_spread(path: Path, meta: dict, root, name: str, max_rows: int = 4096) -> dict:
    """How noisy a format 2 teacher's sampled tail is, at each cached T, over labelled rows.

    -> {str(T): {"ess_median", "ess_p10", "sd_median", "sd_rms", "tokens"}}. ``ess``: the
    effective sample size of the row's importance weights w over M, (sum w)^2 / (M sum w^2),
    1 at T = T_r (TAIL_ESTIMATOR.md §3-4). ``sd``: the standard deviation of the row's tail
    estimate sum_m (w_m / M) log q(x_m) for a student equal to the teacher (q = p_T),
    estimated from the row's own M draws (sample SD of w log p_T over sqrt(M); 0 for M = 1):
    the per-token SD of the logged KL near convergence, in nats; a batch mean over n tokens
    has SD ~ sd_rms / sqrt(n)."""
    import torch

    from muscle.tail_sampling import tail_logweights

    tg = root["teachers"][name]
    temps = [float(t) for t in meta["temperatures"]]
    t_r, m = float(meta["proposal_temperature"]), int(meta["tail_samples"])
    where = f"teachers/{name}"
    ess: list[np.ndarray] = []  # per chunk (R', nT)
    sd: list[np.ndarray] = []
    for rows, keep in _sampled_rows(path, meta, root, name, max_rows):
        got = {
            a: read_checked(tg[a], path, f"{where}/{a}", rows, REBUILD_TEACHER)[keep]
            for a in ("logprobs", "tail_logprobs", "lse")
        }
        head = torch.from_numpy(got["logprobs"].astype(np.float64))  # (R', K) T = 1
        tail = torch.from_numpy(got["tail_logprobs"].astype(np.float64))  # (R', M) T = 1
        lse = torch.from_numpy(got["lse"].astype(np.float64))  # (R', nT)
        by_t = {t: lse[:, i] for i, t in enumerate(temps)}
        e_cols, s_cols = [], []
        for t in temps:
            w = tail_logweights(head, tail, by_t, t, t_r).exp() * m  # (R', M) weights
            e_cols.append(w.sum(1) ** 2 / (m * (w**2).sum(1)).clamp(min=1e-300))
            a = w * stored_logprobs_at(tail, lse, temps, t)  # (R', M) w log p_T
            s_cols.append((a.var(1) / m).sqrt() if m > 1 else torch.zeros(len(a)))
        ess.append(torch.stack(e_cols, 1).numpy())
        sd.append(torch.stack(s_cols, 1).numpy())
    if not ess or (e := np.concatenate(ess)).shape[0] == 0:
        return {}
    s = np.concatenate(sd)
    return {
        str(t): {
            "ess_median": float(np.median(e[:, i])),
            "ess_p10": float(np.quantile(e[:, i], 0.1)),
            "sd_median": float(np.median(s[:, i])),
            "sd_rms": float(np.sqrt(np.mean(s[:, i] ** 2))),
            "tokens": int(e.shape[0]),
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
        lines += _render_top_k_mass(t.get("top_k_mass") or {}, info["k"], bool(t.get("tail")))
        lines += _render_tail(t.get("tail"))
    return "\n".join(lines) + "\n"


def _render_tail(tail: dict | None) -> list[str]:
    if not tail:
        return []
    lines = [
        f"  tail      M={tail['samples']} draws/token at T_r={tail['proposal_temperature']:g} "
        f"(seed {tail['seed']}): the loss is the unbiased full-vocabulary KL estimate"
    ]
    for t, s in (tail.get("spread") or {}).items():
        lines.append(
            f"  tail T={float(t):g} weights ESS {s['ess_median']:.0%} of M (p10 "
            f"{s['ess_p10']:.0%}); KL estimate SD per token {s['sd_median']:.3g} nats median, "
            f"{s['sd_rms']:.3g} rms (student = teacher)"
        )
    return lines


def _render_top_k_mass(mass: dict, k: int, sampled: bool = False) -> list[str]:
    if not mass:
        return []
    n = next(iter(mass.values()))["tokens"]
    cells = "   ".join(
        f"T={float(t):g}: median {m['median']:.0%} (p10 {m['p10']:.0%})" for t, m in mass.items()
    )
    lines = [f"  top-{k} mass {cells}   ({n:,} labelled tokens)"]
    for t, m in mass.items():
        if m["median"] < 0.5 and not sampled:  # a sampled tail estimates the full KL anyway
            lines.append(
                f"  note      at T={float(t):g} the top-{k} holds a median {m['median']:.0%} of the "
                "teacher's probability: the cached loss is a loose lower bound of the full KL "
                "there; a larger --k or a lower temperature tightens it"
            )
    return lines
