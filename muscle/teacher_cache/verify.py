"""``verify_cache``: every shard of every array decodes and is consistent; optionally re-run a
teacher's recorded model on sampled positions and compare with what is stored."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from muscle import MuscleError
from muscle.teacher_cache.schema import IGNORE_INDEX, SPLIT_CODES, Schema, shard_file
from muscle.teacher_cache.store import (
    REBUILD_TEACHER,
    cache_schema,
    cache_teacher_spec,
    check_teacher_provenance,
    list_teachers,
    open_group,
    read_checked,
    read_meta,
)
from muscle.teacher_cache.stream import StreamData, read_stream


@dataclass
class VerifyReport:
    errors: list[str] = field(default_factory=list)
    checked_chunks: int = 0
    rerun: dict = field(default_factory=dict)  # teacher -> stats

    @property
    def ok(self) -> bool:
        return not self.errors


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
    schema = cache_schema(meta)
    rep = VerifyReport()
    root = open_group(path)
    if not meta.get("stream_complete"):
        rep.errors.append("the token stream is incomplete (interrupted first build)")
        return rep
    missing = _missing_files(path, root["stream"], "stream", [a.name for a in schema.stream])
    if missing:
        rep.errors += missing
        return rep
    try:
        stream = read_stream(root, path, schema)
    except MuscleError as e:  # a damaged stream chunk: nothing else can be checked against it
        rep.errors.append(str(e))
        return rep
    _verify_stream(stream, meta, rep)
    for name in list_teachers(path):
        _verify_teacher(path, root, name, stream, meta, schema, rep)
    for name in rerun:
        if name not in list_teachers(path):
            have = ", ".join(list_teachers(path)) or "none"
            raise MuscleError(f"no teacher {name!r} in cache {path} (it has: {have})")
        rep.rerun[name] = _rerun_teacher(path, root, name, stream, meta, sample, seed, device, rep)
    return rep


def _missing_files(path: Path, group, rel: str, arrays: Sequence[str]) -> list[str]:
    out = []
    for name in arrays:
        arr = group[name]
        for s in range(math.ceil(arr.shape[0] / (arr.shards or arr.chunks)[0]) or 1):
            f = shard_file(path / rel / name, arr.ndim, s)
            if not f.is_file():
                out.append(f"{rel}/{name}: shard file {f.relative_to(path)} is missing")
    return out


def _verify_stream(stream: StreamData, meta: dict, rep: VerifyReport) -> None:
    off = stream.offsets
    if off[0] != 0 or np.any(np.diff(off) <= 0):
        rep.errors.append("stream/offsets: not strictly increasing from 0")
    if stream.n_tokens != int(meta.get("n_tokens", -1)):
        rep.errors.append(f"stream: {stream.n_tokens} tokens, attrs say {meta.get('n_tokens')}")
    if stream.split.size and stream.split.max() >= len(SPLIT_CODES):
        rep.errors.append("stream/split: unknown split code")
    if stream.fingerprint() != meta.get("stream_fingerprint"):
        rep.errors.append("stream: its fingerprint does not match the recorded one")


# What must hold for a teacher array's rows (values (R, ...), labels (R,), vocabulary size):
# the problem, or None. An array without an entry is checked for decoding only.
_Check = Callable[[np.ndarray, np.ndarray, int], "str | None"]


def _ids_in_vocab(v: np.ndarray, labels: np.ndarray, vocab: int) -> str | None:
    return "ids >= vocabulary size" if vocab and v.max(initial=0) >= vocab else None


def _descending_logprobs(v: np.ndarray, labels: np.ndarray, vocab: int) -> str | None:
    lp = v.astype(np.float32)
    if np.isnan(lp).any() or (lp > 1e-2).any():
        return "log-probs NaN or > 0"
    if (np.diff(lp, axis=1) > 1e-2).any():
        return "top-K not in descending order"
    return None


def _finite_lse(v: np.ndarray, labels: np.ndarray, vocab: int) -> str | None:
    return None if np.isfinite(v).all() else "non-finite log-sum-exp"


def _nan_iff_ignored(v: np.ndarray, labels: np.ndarray, vocab: int) -> str | None:
    if (np.isnan(v) != (labels == IGNORE_INDEX)).any():
        return "label log-prob NaN exactly where label == -100 violated"
    return None


def _tail_logprobs_ok(v: np.ndarray, labels: np.ndarray, vocab: int) -> str | None:
    lp = v.astype(np.float32)
    return None if np.isfinite(lp).all() and (lp <= 0).all() else "tail log-probs not finite <= 0"


def _negent_ok(v: np.ndarray, labels: np.ndarray, vocab: int) -> str | None:
    # sum_j p log p = -entropy <= 0; float32 rounding of a near-deterministic row stays ~1e-6
    return None if np.isfinite(v).all() and (v <= 1e-4).all() else "negent not finite <= 0"


INVARIANTS: dict[str, _Check] = {
    "ids": _ids_in_vocab,
    "logprobs": _descending_logprobs,
    "lse": _finite_lse,
    "label_logprob": _nan_iff_ignored,
    "tail_ids": _ids_in_vocab,
    "tail_logprobs": _tail_logprobs_ok,
    "negent": _negent_ok,
}


def _tail_outside_head(got: dict[str, np.ndarray]) -> str | None:
    """Format 2, across arrays: every draw lies outside its row's head and below its K-th
    log-prob (rounding is monotone, so this holds exactly in the stored dtype)."""
    if "tail_ids" not in got:
        return None
    for lo in range(0, len(got["ids"]), 4096):  # (R, M, K) compares, a block of rows at a time
        rows = slice(lo, lo + 4096)
        head, tail = got["ids"][rows].astype(np.int64), got["tail_ids"][rows].astype(np.int64)
        if (tail[:, :, None] == head[:, None, :]).any():
            return "tail draws inside the top-K head"
        kth = got["logprobs"][rows].astype(np.float32).min(1, keepdims=True)  # (R, 1)
        if (got["tail_logprobs"][rows].astype(np.float32) > kth).any():
            return "tail draw log-probs above the head's K-th"
    return None


def _verify_teacher(path, root, name, stream, meta, schema: Schema, rep: VerifyReport) -> None:
    tg = root["teachers"][name]
    tm = dict(tg.attrs).get("muscle_teacher") or {}
    where = f"teachers/{name}"
    try:
        done = tg[schema.done.name][:]
    except Exception as e:
        rep.errors.append(f"{where}/done: unreadable ({type(e).__name__})")
        return
    if not tm.get("complete"):
        rep.errors.append(f"{where}: incomplete ({int(done.sum())}/{done.size} chunks done)")
    vocab = int(tm.get("vocab_size") or 0)
    C = int(meta["chunk_tokens"])
    S = C * int(meta["shard_chunks"])
    n = stream.n_tokens
    for u in range(max(1, math.ceil(n / S))):
        lo, hi = u * S, min((u + 1) * S, n)
        unit_done = done[lo // C : math.ceil(hi / C)]
        for a in schema.teacher:
            f = shard_file(path / where / a.name, a.ndim, u)
            if unit_done.any() and not f.is_file():
                rep.errors.append(f"{where}/{a.name}: shard file {f.relative_to(path)} is missing")
        if not unit_done.all():
            continue
        try:
            got = {
                a: read_checked(tg[a], path, f"{where}/{a}", slice(lo, hi), REBUILD_TEACHER)
                for a in schema.teacher_arrays
            }
        except MuscleError as e:
            rep.errors.append(str(e))
            continue
        rep.checked_chunks += math.ceil((hi - lo) / C)
        lab = stream.labels[lo:hi]
        bad = [
            problem
            for a, check in INVARIANTS.items()
            if a in got and (problem := check(got[a], lab, vocab))
        ]
        if not bad and (problem := _tail_outside_head(got)):
            bad.append(problem)
        if bad:
            rep.errors.append(f"{where} shard {u} (tokens {lo}-{hi - 1}): " + "; ".join(bad))


def _rerun_teacher(path, root, name, stream, meta, sample, seed, device, rep) -> dict:
    """Re-run the recorded model on ``sample`` random positions and compare with the store."""
    from muscle.models import load_model, resolve_device
    from muscle.teacher_cache.compute import forward_logits
    from muscle.topk import logprobs_at, teacher_topk

    check_teacher_provenance(path, name)
    spec = cache_teacher_spec(path, name)
    device = resolve_device(device)
    model = load_model(spec, device)
    tg = root["teachers"][name]
    temps = [float(t) for t in meta["temperatures"]]
    K = int(meta["k"])
    rng = np.random.default_rng(seed)
    n = stream.n_tokens
    pos = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    ex = np.unique(np.searchsorted(stream.offsets, pos, side="right") - 1)
    stored = {
        a: read_checked(tg[a], path, f"teachers/{name}/{a}", pos, REBUILD_TEACHER)
        for a in cache_schema(meta).teacher_arrays
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
    fmt2 = "tail_ids" in stored
    fresh = teacher_topk(logits, labels, K, tuple(temps), negentropy=fmt2)
    # Tolerances: fp16 storage (relative 2^-11 of |log p|) plus forward-pass noise of the dtype.
    fwd_tol = 2e-3 if spec.dtype == "float32" else 0.15
    lp_stored = torch.from_numpy(stored["logprobs"].astype(np.float32))  # (P, K)
    ids_stored = torch.from_numpy(stored["ids"].astype(np.int64))
    lse1 = fresh.lse[1.0]
    # (P, K) log p at the stored ids, recomputed
    lp_fresh_at_stored = logprobs_at(logits.gather(1, ids_stored), lse1, 1.0)
    fp16 = np.dtype(tg["logprobs"].dtype) == np.float16
    store_tol = lp_stored.abs() * 2.0**-10 if fp16 else torch.zeros_like(lp_stored)
    err = (lp_stored - lp_fresh_at_stored).abs() - store_tol
    kth_fresh = fresh.logprobs(1.0)[:, -1]  # (P,) K-th largest log p, recomputed
    set_err = (kth_fresh - lp_fresh_at_stored.min(1).values).clamp(min=0)  # stored set is a top-K
    lse_stored = torch.from_numpy(stored["lse"])
    lse_err = torch.stack([(lse_stored[:, i] - fresh.lse[t]).abs() for i, t in enumerate(temps)])
    valid = labels != IGNORE_INDEX
    lab_stored = torch.from_numpy(stored["label_logprob"])
    lab_fresh = fresh.label_logprob(1.0)
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
    tols = dict.fromkeys(("max_logprob_err", "max_topk_set_err", "max_lse_err", "max_label_err"))
    if fmt2:
        stats |= _rerun_tail(name, meta, stored, logits, fresh, pos, ids_stored, fp16)
        # A draw may move to a neighbouring token when the forward's noise moves the CDF
        # (TV(r_fresh, r_stored) <= exp(2 eps / T_r) - 1 for a logit error eps): that bound.
        stats["draw_tolerance"] = math.expm1(2 * fwd_tol / float(meta["proposal_temperature"]))
        tols |= {"max_tail_logprob_err": None, "max_negent_err": None}
        tols["max_tail_draw_err"] = stats["draw_tolerance"]
    for key, tol in tols.items():
        tol = fwd_tol if tol is None else tol
        if not stats[key] <= tol:
            rep.errors.append(
                f"teachers/{name}: re-run differs from the store: {key}={stats[key]:.3g} > "
                f"{tol:.3g}" + ("; its tail draws do not match the model" if "tail" in key else "")
            )
    return stats


def _rerun_tail(name, meta, stored, logits, fresh, pos, ids_stored, fp16) -> dict:
    """Format 2 on re-run rows: the stored draws are what the sampler draws from the model's
    logits (P, V) at those global positions ``pos``, with the stored log-probs and negent.

    ``tail_ids_exact``: fraction of draws redrawn identically (seed, teacher, position; the
    stored head as the excluded set). ``max_tail_draw_err``: over the draws that differ, the
    proposal mass (fresh logits, T_r) strictly between the stored and the redrawn token in
    the sampler's id order: ~0 when forward noise moved a CDF boundary past the uniform, of
    order 1 for draws from another seed, position or teacher."""
    from muscle.tail_sampling import TailSampling, sample_tail, teacher_key

    t_r = float(meta["proposal_temperature"])
    spec = TailSampling(int(meta["tail_samples"]), int(meta["tail_seed"]), t_r)
    tail = torch.from_numpy(stored["tail_ids"].astype(np.int64))  # (P, M)
    lse1 = fresh.lse[1.0]
    lp_tail = torch.from_numpy(stored["tail_logprobs"].astype(np.float32))  # (P, M)
    tol = lp_tail.abs() * 2.0**-10 if fp16 else torch.zeros_like(lp_tail)
    tail_err = (lp_tail - (logits.gather(1, tail) - lse1[:, None])).abs() - tol
    temps = [float(t) for t in meta["temperatures"]]
    negent = torch.from_numpy(stored["negent"])  # (P, nT)
    negent_err = torch.stack([(negent[:, i] - fresh.negent[t]).abs() for i, t in enumerate(temps)])
    try:
        redraw = sample_tail(
            logits, ids_stored, torch.from_numpy(pos), spec, teacher_key(name)
        ).ids  # (P, M)
    except ValueError as e:  # a damaged head (duplicate/out-of-range ids): no redraw possible
        raise MuscleError(f"teachers/{name}: cannot redraw the tail: {e}") from None
    # proposal r at T_r on the fresh logits, head excluded; cumulative in id order (float64)
    x = logits.double().scatter(1, ids_stored, -math.inf) / t_r  # (P, V)
    cdf = (x - x.amax(1, keepdim=True)).exp().cumsum(1)  # (P, V)
    cdf /= cdf[:, -1:].clone()
    lo, hi = torch.minimum(tail, redraw), torch.maximum(tail, redraw)  # (P, M)
    between = (cdf.gather(1, (hi - 1).clamp(min=0)) - cdf.gather(1, lo)).clamp(min=0)
    between = torch.where(lo == hi, 0.0, between)  # (P, M): mass strictly inside (lo, hi)
    return {
        "tail_ids_exact": float((redraw == tail).float().mean()) if tail.numel() else 1.0,
        "max_tail_draw_err": float(between.max()) if between.numel() else 0.0,
        "max_tail_logprob_err": float(tail_err.max().clamp(min=0)) if tail_err.numel() else 0.0,
        "max_negent_err": float(negent_err.max()) if negent_err.numel() else 0.0,
    }
