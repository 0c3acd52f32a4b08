"""What a teacher stores for one unit (shard) of the stream: its forward pass over the unit's
examples, in a fixed length-sorted batch order, and the top-K values of each position (format
2: also the sampled tail and the negative entropy, CACHE_FORMAT.md §9)."""

from __future__ import annotations

import json

import numpy as np
import torch

from muscle import MuscleError
from muscle.forward import logits_at
from muscle.teacher_cache.schema import FORMAT_1, SPLIT_CODES, CacheConfig, Dims, Schema
from muscle.teacher_cache.stream import StreamData


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the real (unpadded) positions, row-major: (B, T) -> (N_real, V).

    The one forward path (:func:`muscle.forward.logits_at`) with the real positions as the ones
    to keep: where the model takes a boolean ``logits_to_keep`` the head runs on them only (no
    padding FLOPs, no (B, T, V) tensor), else the full logits are made and the rows selected.
    """
    return logits_at(model, input_ids, attention_mask, attention_mask.bool())  # (N_real, V)


def _check_forward_path(model, input_ids, attention_mask, tol: float) -> None:
    """The kept-rows logits must agree with the model's full forward (guards models whose
    forward takes ``logits_to_keep`` but reads a boolean mask some other way)."""
    ours = forward_logits(model, input_ids, attention_mask).float()
    ref = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref = ref[attention_mask.bool()].float()
    rows = torch.isfinite(ref).all(1)  # NaN/inf rows are reported by the build, by example
    err = (ours[rows] - ref[rows]).abs().max().item() if rows.any() else 0.0
    if not err <= tol:
        raise MuscleError(
            f"{type(model).__name__}: the cache's logits at the real positions differ from the "
            f"model's full forward by {err:.3g}; this model architecture is not supported by "
            "muscle-cache"
        )


def _padded(stream: StreamData, examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream's ``examples`` right-padded: input_ids and attention_mask (B, T) int64."""
    off = stream.offsets
    lengths = np.diff(off)
    x = torch.full((len(examples), int(lengths[examples].max())), pad_id, dtype=torch.long)
    m = torch.zeros_like(x)
    for b, e in enumerate(examples):
        n = int(lengths[e])
        x[b, :n] = torch.from_numpy(stream.input_ids[off[e] : off[e + 1]].astype(np.int64))
        m[b, :n] = 1
    return x, m


def check_path_on(model, stream: StreamData, examples, device, pad_id, dtype) -> None:
    """``_check_forward_path`` on a few real examples of the stream."""
    x, m = _padded(stream, examples, pad_id)
    tol = 1e-3 if dtype == torch.float32 else 0.25
    with torch.no_grad():
        _check_forward_path(model, x.to(device), m.to(device), tol)


def _plan_batches(lengths: np.ndarray, examples: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Examples of one unit grouped into batches of similar length (stable, deterministic)."""
    order = examples[np.argsort(-lengths[examples], kind="stable")]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _unit_examples(offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Examples overlapping tokens [lo, hi): offsets[e] < hi and offsets[e+1] > lo."""
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    last = int(np.searchsorted(offsets, hi, side="left"))
    return np.arange(max(first, 0), min(last, len(offsets) - 1))


class UnitResult(dict):
    """Teacher array name -> its rows for one unit, (S, ...): one entry per data array of the
    teacher schema (``UnitResult(ids=..., logprobs=..., ...)``)."""

    @classmethod
    def allocate(cls, schema: Schema, dims: Dims, n_rows: int) -> UnitResult:
        return cls(
            {a.name: np.zeros((n_rows, *dims.cols(a)), dtype=dims.dtype(a)) for a in schema.teacher}
        )


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
    schema: Schema = FORMAT_1,
    teacher: str | None = None,
) -> UnitResult:
    """Every teacher array of the schema for tokens [lo, hi) of the stream.

    ``teacher``: the teacher's name, which keys its tail draws (format 2 only; the draws of a
    position depend on (cfg.tail_seed, teacher, global position) alone, so any split of the
    stream into units, ranks or runs writes the same bytes)."""
    from muscle.tail_sampling import TailSampling, teacher_key
    from muscle.topk import label_logprob_at, logprobs_at, teacher_topk

    K, temps = cfg.k, [float(t) for t in cfg.temperatures]
    tail = None
    if schema.format >= 2:
        if teacher is None:
            raise ValueError("a format 2 unit needs the teacher's name (its tail draws' key)")
        spec = TailSampling(cfg.tail_samples, cfg.tail_seed, cfg.proposal_temperature)
        tail = (spec, teacher_key(teacher))
    out = UnitResult.allocate(schema, Dims(cfg, stream.n_tokens, ids_dtype=ids_dtype), hi - lo)
    off = stream.offsets
    lengths = np.diff(off)
    t1 = temps.index(1.0)
    for batch in _plan_batches(lengths, _unit_examples(off, lo, hi), cfg.batch_size):
        input_ids, mask = _padded(stream, batch, pad_id)  # (B, T) each
        pos = np.concatenate([np.arange(off[e], off[e + 1]) for e in batch])  # (N_real,)
        labels = torch.from_numpy(stream.labels[pos].astype(np.int64))
        with torch.no_grad():
            logits = forward_logits(model, input_ids.to(device), mask.to(device))
            try:
                top = teacher_topk(
                    logits, labels.to(logits.device), K, tuple(temps), negentropy=tail is not None
                )
            except ValueError as e:
                if "non-finite" not in str(e):
                    raise
                bad_row = int((~torch.isfinite(logits.float()).all(1)).nonzero()[0, 0])
                raise _nonfinite_error(stream, pos[bad_row]) from None
        lse = torch.stack([top.lse[t] for t in temps], 1).cpu()  # (N_real, nT)
        rows = {
            "ids": top.ids.cpu().numpy(),  # (N_real, K)
            "logprobs": logprobs_at(top.values.cpu(), lse[:, t1], 1.0).numpy(),  # (N_real, K)
            "lse": lse.numpy(),
            # (N_real,) at T=1, NaN where ignored
            "label_logprob": label_logprob_at(top.label_logit.cpu(), lse[:, t1], 1.0).numpy(),
        }
        if tail is not None:
            rows |= _tail_rows(logits, top, pos, tail, lse[:, t1], temps)
        keep = (pos >= lo) & (pos < hi)
        dst = pos[keep] - lo
        for name, arr in out.items():
            arr[dst] = rows[name][keep].astype(arr.dtype)
        if progress is not None:
            progress.update(int(keep.sum()))
    return out


def _tail_rows(logits, top, pos: np.ndarray, tail, lse1: torch.Tensor, temps) -> dict:
    """Format 2's arrays for a batch's rows: M draws outside the head at T_r keyed by the
    rows' global stream positions ``pos`` (N_real,), their log p at T=1 (raw logit - lse_1,
    like the head's), and the negative entropy at each cached T."""
    from muscle.tail_sampling import sample_tail
    from muscle.topk import logprobs_at

    spec, key = tail
    where = torch.from_numpy(pos.astype(np.int64)).to(logits.device)  # (N_real,)
    d = sample_tail(logits, top.ids, where, spec, key)  # (N_real, M) ids and raw logits
    return {
        "tail_ids": d.ids.cpu().numpy(),  # (N_real, M)
        "tail_logprobs": logprobs_at(d.values.cpu(), lse1, 1.0).numpy(),  # (N_real, M) at T=1
        "negent": torch.stack([top.negent[t] for t in temps], 1).cpu().numpy(),  # (N_real, nT)
    }


def _nonfinite_error(stream: StreamData, position: int) -> MuscleError:
    e = int(np.searchsorted(stream.offsets, position, side="right")) - 1
    split = SPLIT_CODES[int(stream.split[e])]
    return MuscleError(
        f"the teacher produced NaN/inf logits on example {json.loads(stream.example_ids[e])!r} "
        f"({split} split, token {position - int(stream.offsets[e])}): refusing to cache it "
        "(check the model's weights and dtype; float16 overflows are common: try --dtype float32)"
    )
