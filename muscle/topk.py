"""Dense teacher logits -> what the teacher cache stores: top-K ids and raw logits, plus the
per-token log-sum-exp at each cached temperature, so that top-K log-probs (and the tail mass
1 - sum p_S) at temperature T are exact up to value storage precision:

    log p_j(T) = values_j / T - lse_T        (j in the top-K)

Order: ids are sorted by descending logit; equal logits go lower id first. The selection at
the K-th place is deterministic too: among logits tied with the K-th largest, the lowest ids
are kept. Everything is computed on float32-upcast logits, whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

_CHUNK_BYTES = 64 * 2**20


@dataclass
class TeacherTopK:
    ids: Tensor  # (N, K) int64, descending logit, ties -> lower id first
    values: Tensor  # (N, K) float32 raw logits at ids
    lse: dict[float, Tensor] = field(default_factory=dict)  # T -> (N,) float32 lse(logits / T)
    label_logit: Tensor | None = None  # (N,) float32 raw logit of the label; NaN where ignored

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


def logprobs_at(values: Tensor, lse_t: Tensor, temperature: float) -> Tensor:
    """Top-K log-probs at temperature T: values / T - lse_T. (N, K), (N,) -> (N, K) float32."""
    return values.float() / temperature - lse_t.float()[:, None]


def label_logprob_at(label_logit: Tensor, lse_t: Tensor, temperature: float) -> Tensor:
    """Label log-prob at temperature T: label_logit / T - lse_T. (N,), (N,) -> (N,) float32."""
    return label_logit.float() / temperature - lse_t.float()


def teacher_topk(
    logits: Tensor,
    labels: Tensor,
    k: int,
    temperatures: tuple[float, ...] = (1.0, 2.0),
    ignore_index: int = -100,
) -> TeacherTopK:
    """Top-K of dense teacher logits (N, V) of any float dtype, with labels (N,) int64."""
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
    # Rows at a time, so the float32 upcast and its temporaries stay bounded.
    rows = max(1, _CHUNK_BYTES // (4 * v * 3))
    parts = [
        _topk_rows(logits[lo : lo + rows], labels[lo : lo + rows], valid[lo : lo + rows], k,
                   temperatures, lo)  # fmt: skip
        for lo in range(0, n, rows)
    ]
    ids = torch.cat([p[0] for p in parts]) if parts else logits.new_empty(0, k, dtype=torch.long)
    vals = torch.cat([p[1] for p in parts]) if parts else logits.new_empty(0, k).float()
    lab = torch.cat([p[3] for p in parts]) if parts else logits.new_empty(0).float()
    lse = {
        float(t): torch.cat([p[2][i] for p in parts]) if parts else logits.new_empty(0).float()
        for i, t in enumerate(temperatures)
    }
    return TeacherTopK(ids=ids, values=vals, lse=lse, label_logit=lab)


def _topk_rows(logits, labels, valid, k, temperatures, row0):
    x = logits.float()  # (C, V)
    bad = ~torch.isfinite(x).all(1)  # (C,)
    if bool(bad.any()):
        rows = (bad.nonzero().squeeze(1) + row0).tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"non-finite teacher logits in {len(rows)} row(s): {shown}")
    ids = _topk_ids_deterministic(x, k)  # (C, K)
    vals = x.gather(1, ids)  # (C, K)
    lse = [torch.logsumexp(x / t, dim=1) for t in temperatures]  # each (C,)
    lab = x.gather(1, labels.masked_fill(~valid, 0).long()[:, None]).squeeze(1)
    lab = lab.masked_fill(~valid, float("nan"))
    return ids, vals, lse, lab


def _topk_ids_deterministic(x: Tensor, k: int) -> Tensor:
    """Ids of the k largest of each row of x (C, V), descending, ties -> lower id first."""
    # (C, K): the right set unless logits tied with the K-th largest straddle the K-th place
    vals, ids = torch.topk(x, k, dim=1, sorted=True)
    kth = vals[:, -1:]  # (C, 1) the K-th largest value
    straddle = (x >= kth).sum(1) > k  # (C,)
    if bool(straddle.any()):
        r = straddle.nonzero().squeeze(1)
        xs, kt = x[r], kth[r]  # (R, V), (R, 1)
        above = xs > kt
        tied = xs == kt
        # Keep the lowest-id tied entries that fill the row up to k.
        need = k - above.sum(1, keepdim=True)  # (R, 1)
        keep = above | (tied & (tied.cumsum(1) <= need))  # (R, V), exactly k per row
        ids[r] = keep.nonzero()[:, 1].view(-1, k)
    # Canonical order: ids ascending, then a stable sort by descending value.
    ids, _ = ids.sort(dim=1)
    order = x.gather(1, ids).sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)
