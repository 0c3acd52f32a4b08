"""Dense teacher logits -> what the teacher cache stores: top-K ids and raw logits, plus the
per-token log-sum-exp at each cached temperature, so that top-K log-probs (and the tail mass
1 - sum p_S) at temperature T are exact up to value storage precision:

    log p_j(T) = values_j / T - lse_T        (j in the top-K)

Order: ids are sorted by descending logit; equal logits go lower id first. The selection at
the K-th place is deterministic too: among logits tied with the K-th largest, the lowest ids
are kept. Everything is computed on float32-upcast logits, whatever the input dtype.

Cost per row chunk (this runs once per teacher forward in the cache build, so every full-vocab
pass counts): one torch.topk of K+1 (which also gives the row max), a row min (with the max,
the non-finite check), and per temperature one shift pass, an in-place exp and a row sum into
one reused float32 workspace (lse_T is a max-shifted float32 sum-exp). The tie fix-up runs
only on rows whose top K+1 holds two equal values.

With ``negentropy=True`` (cache format 2) it also returns, per temperature, the teacher's
negative entropy sum_j p_j log p_j over the full vocabulary: the constant part of the full KL,
which the sampled-tail estimator does not estimate (muscle/TAIL_ESTIMATOR.md). It reuses the
exp pass of the lse: one (C, V) difference per chunk and one dot per temperature on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

# A torch tensor or a numpy array (the cache reader's stored values): the log-prob formulas
# below are written once for both.
Array = TypeVar("Array", Tensor, np.ndarray)

_CHUNK_BYTES = 64 * 2**20


@dataclass
class TeacherTopK:
    ids: Tensor  # (N, K) int64, descending logit, ties -> lower id first
    values: Tensor  # (N, K) float32 raw logits at ids
    lse: dict[float, Tensor] = field(default_factory=dict)  # T -> (N,) float32 lse(logits / T)
    label_logit: Tensor | None = None  # (N,) float32 raw logit of the label; NaN where ignored
    # T -> (N,) float32 sum_j p_T(j) log p_T(j) over the full vocabulary (only if asked for)
    negent: dict[float, Tensor] = field(default_factory=dict)

    def logprobs(self, temperature: float) -> Tensor:
        """(N, K) float32 log-probs of the top-K at a cached temperature."""
        return logprobs_at(self.values, self._lse(temperature), temperature)

    def label_logprob(self, temperature: float) -> Tensor:
        """(N,) float32 log-prob of the label at a cached temperature (NaN where ignored)."""
        return label_logprob_at(self.label_logit, self._lse(temperature), temperature)

    def _lse(self, temperature: float) -> Tensor:
        key = float(temperature)
        if key not in self.lse:
            raise KeyError(f"temperature {temperature} not cached; have {sorted(self.lse)}")
        return self.lse[key]


def _float(x: Array) -> Array:
    """At least float32 (float64 stays float64), torch tensor or numpy array alike."""
    if isinstance(x, np.ndarray):
        return x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    return x if x.dtype == torch.float64 else x.float()


def logprobs_at(values: Array, lse_t: Array, temperature: float) -> Array:
    """Top-K log-probs at temperature T: values / T - lse_T. (N, K), (N,) -> (N, K) float32
    (float64 for float64 input), torch tensors or numpy arrays."""
    return _float(values) / temperature - _float(lse_t)[:, None]


def label_logprob_at(label_logit: Array, lse_t: Array, temperature: float) -> Array:
    """Label log-prob at temperature T: label_logit / T - lse_T. (N,), (N,) -> (N,) float32."""
    return _float(label_logit) / temperature - _float(lse_t)


def stored_logprobs_at(
    lp1: Array, lse: Array, temperatures: Sequence[float], temperature: float
) -> Array:
    """Log-probs stored at temperature 1 (P, K) -> at ``temperature``, from the stored lse's
    (P, nT) at ``temperatures``: the raw logits are z = log p_1 + lse_1 (CACHE_FORMAT.md §5),
    then :func:`logprobs_at`. ``lp1`` itself (not a copy) at T = 1."""
    if temperature == 1.0:
        return lp1
    temps = [float(t) for t in temperatures]
    z = lp1 + lse[:, temps.index(1.0), None]  # (P, K)
    return logprobs_at(z, lse[:, temps.index(float(temperature))], temperature)


def teacher_topk(
    logits: Tensor,
    labels: Tensor,
    k: int,
    temperatures: tuple[float, ...] = (1.0, 2.0),
    ignore_index: int = -100,
    negentropy: bool = False,
) -> TeacherTopK:
    """Top-K of dense teacher logits (N, V) of any float dtype, with labels (N,) int64.

    ``negentropy``: also fill ``negent`` (sum_j p_j log p_j at each temperature)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a float tensor of shape (N, V)")
    n, v = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    if any(not (t > 0) for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {temperatures}")
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= v))[valid].any()):
        raise ValueError(f"labels out of range [0, {v}) (other than ignore_index={ignore_index})")
    if n == 0:
        return _empty(logits, k, temperatures, negentropy)
    # Rows at a time, so the float32 upcast and the exp workspace stay bounded.
    rows = min(n, max(1, _CHUNK_BYTES // (4 * v * (4 if negentropy else 3))))
    # One float32 workspace for the exp passes of every chunk and temperature, instead of the
    # (C, V) temporaries of x / T and of logsumexp's x - max for each temperature.
    work = torch.empty((rows, v), dtype=torch.float32, device=logits.device)  # (C, V)
    diff = torch.empty_like(work) if negentropy else None  # (C, V) x - max x, for negent
    scales = [1.0 / float(t) for t in temperatures]
    chunks = [slice(lo, lo + rows) for lo in range(0, n, rows)]
    parts = [
        _topk_rows(logits[c], labels[c], valid[c], k, scales, work, diff, c.start) for c in chunks
    ]
    ids, vals, lab = (_cat([p[i] for p in parts]) for i in (0, 1, 3))
    lse = {float(t): _cat([p[2][i] for p in parts]) for i, t in enumerate(temperatures)}
    negent = {}
    if negentropy:
        negent = {float(t): _cat([p[4][i] for p in parts]) for i, t in enumerate(temperatures)}
    return TeacherTopK(ids=ids, values=vals, lse=lse, label_logit=lab, negent=negent)


def _empty(logits: Tensor, k: int, temperatures: tuple[float, ...], negentropy: bool):
    none = logits.new_empty(0, dtype=torch.float32)  # (0,)
    return TeacherTopK(
        ids=logits.new_empty(0, k, dtype=torch.long),
        values=logits.new_empty(0, k, dtype=torch.float32),
        lse={float(t): none for t in temperatures},
        label_logit=none,
        negent={float(t): none for t in temperatures} if negentropy else {},
    )


def _cat(parts: list[Tensor]) -> Tensor:
    """Row chunks -> one contiguous tensor (no copy in the common one-chunk case)."""
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _topk_rows(logits, labels, valid, k, scales, work, diff, row0):
    """One row chunk: (C, V) logits -> ids, values (C, K), [lse (C,) per scale], label logit,
    [negent (C,) per scale] (empty unless ``diff``, a (>= C, V) workspace, is given)."""
    x = logits.float()  # (C, V); no copy when the input is float32 already
    # One place past the K-th shows a tie straddling it: the (K+1)-th value equals the K-th.
    vals, ids = torch.topk(x, min(k + 1, x.shape[1]), dim=1, sorted=True)  # (C, K or K+1)
    top = vals[:, 0]  # (C,) the row max, also the lse shift; +inf shows here
    _check_finite(top, x.amin(1), row0)  # NaN propagates into the row min, -inf shows there
    ids, vals = _canonical_topk(x, vals, ids, k)  # (C, K) each
    lse, negent = [], []
    if diff is not None:
        # x - max x <= 0, clamped so that a spread past the float32 range stays finite (its exp
        # is 0 at every T, and 0 * finite = 0 in the dot below)
        d = torch.sub(x, top[:, None], out=diff[: len(x)]).clamp_(min=torch.finfo(x.dtype).min)
    for s in scales:
        w = work[: len(x)]
        sum_w = _shifted_sumexp(x, top, s, w)  # (C,) >= 1; w = exp(s (x - max x)) now
        lse.append(sum_w.log().add_(top * s))
        if diff is not None:
            # log p_j = s (x_j - max x) - log sum_w, so sum_j p_j log p_j = s <w, d> / sum_w
            # - log sum_w: <w, d> is a sum of non-positive terms, no cancellation
            dot = torch.bmm(w.unsqueeze(1), d.unsqueeze(2)).view(len(x))  # (C,) <w, d>
            negent.append(s * dot / sum_w - sum_w.log())
    lab = x.gather(1, labels.masked_fill(~valid, 0).long()[:, None]).squeeze(1)
    lab = lab.masked_fill(~valid, float("nan"))
    return ids, vals, lse, lab, negent


def _check_finite(row_max: Tensor, row_min: Tensor, row0: int) -> None:
    """Refuse rows with NaN/inf, found from the row max and min (C,): no (C, V) isfinite pass."""
    bad = ~(torch.isfinite(row_max) & torch.isfinite(row_min))  # (C,)
    if bool(bad.any()):
        rows = (bad.nonzero().squeeze(1) + row0).tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"non-finite teacher logits in {len(rows)} row(s): {shown}")


def _shifted_sumexp(x: Tensor, row_max: Tensor, scale: float, work: Tensor) -> Tensor:
    """sum_j exp(scale (x_j - max x)) per row: (C, V), (C,) -> (C,) float32, >= 1; the row's
    lse(x * scale) is its log plus row_max * scale.

    scale = 1/T > 0, so max(x * scale) = max(x) * scale: one max serves every temperature.
    The shifted logits go into the reused workspace, exp runs in place (left there), then a
    row sum.
    """
    shift = row_max * scale  # (C,)
    if scale <= 1.0:
        # x * scale - shift in one fused pass; |x * scale| <= |x| cannot overflow
        torch.add(-shift[:, None], x, alpha=scale, out=work)  # (C, V), every entry <= 0
    else:
        # T < 1: x * scale may overflow float32 where x - max(x) does not; shift first
        torch.sub(x, row_max[:, None], out=work).mul_(scale)  # (C, V), every entry <= 0
    return work.exp_().sum(1)


def _canonical_topk(x: Tensor, vals: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of x (C, V), ids and values (C, K), descending value, ties ->
    lower id first, from torch.topk's values and ids (C, K+1), or (C, K) when k == V."""
    # torch.topk orders equal values arbitrarily: only rows with two equal neighbours among
    # the top K+1 need fixing; elsewhere the values are distinct and the order is canonical.
    tied = (vals[:, 1:] == vals[:, :-1]).any(1)  # (C,)
    straddle = vals[:, k] == vals[:, k - 1] if vals.shape[1] > k else torch.zeros_like(tied)
    vals, ids = vals[:, :k], ids[:, :k]
    if not bool(tied.any()):
        return ids, vals
    r = tied.nonzero().squeeze(1)  # (R,)
    ids = ids.clone()
    ids[r] = _canonical_ids(x, r, ids[r], vals[r], straddle[r], k)
    # Re-read the values: tied 0.0 and -0.0 compare equal but are stored as they are.
    return ids, x.gather(1, ids)


def _canonical_ids(
    x: Tensor, r: Tensor, ids: Tensor, vals: Tensor, straddle: Tensor, k: int
) -> Tensor:
    """Canonical top-k ids of the rows r (R,) of x (C, V), rows with ties, given torch.topk's
    ids and values (R, K) and whether ties straddle the K-th place (R,)."""
    if bool(straddle.any()):
        s = straddle.nonzero().squeeze(1)  # (S,) positions in r
        ids[s] = _lowest_tied_at_kth(x[r[s]], ids[s], vals[s], k)
    # Canonical order: ids ascending, then a stable sort by descending value.
    ids, _ = ids.sort(dim=1)
    order = x[r[:, None], ids].sort(dim=1, descending=True, stable=True).indices  # (R, K)
    return ids.gather(1, order)


def _lowest_tied_at_kth(xs: Tensor, ids: Tensor, vals: Tensor, k: int) -> Tensor:
    """Rows xs (S, V) where entries tied with the K-th value straddle the K-th place: the top-k
    set keeps every entry above the K-th value, then the lowest ids tied with it.

    torch.topk's sorted ids and values (S, K) already hold the entries above it first.
    """
    kth = vals[:, k - 1 :]  # (S, 1)
    above = (vals > kth).sum(1)  # (S,) all of them are in the top-K: the first places
    tied = (xs == kth).nonzero()  # (M, 2) row-major: per row, tied ids ascending
    row, col = tied[:, 0], tied[:, 1]
    first = torch.searchsorted(row, torch.arange(len(xs), device=row.device))  # (S,) row starts
    rank = torch.arange(len(row), device=row.device) - first[row]  # (M,) rank within its row
    lowest = col[rank < (k - above)[row]]  # k - above per row, row-major
    fill = torch.arange(k, device=ids.device) >= above[:, None]  # (S, K) places to take them
    ids = ids.clone()
    ids[fill] = lowest  # boolean assignment is row-major, like `lowest`
    return ids
