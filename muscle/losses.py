"""The MUSCLE compatibility loss (paper Eq. 1-2) against top-K teachers.

Per token i with label y_i, student logits z_i (the adapter being trained, on v2) and two
teachers stored as top-K ids S and log-probs at temperature T over the full vocabulary:

    q    = softmax(z / T)
    KL_S(p || q) = sum_{j in S} p_j (log p_j - log q_j) + p_tail (log p_tail - log q_tail)
    L    = mean_i  m_i KL_S(p1_i || q_i) + (1 - m_i) KL_S(p2_i || q_i)

with p_tail = clamp(1 - sum_S p, 0, 1) and q_tail = sum_{j not in S} q_j (DESIGN.md §4).

Numerical conventions (normative for every implementation, the Triton kernel included):

- log q_tail is the log-sum-exp of z/T over the complement of S minus the full log-sum-exp,
  i.e. it keeps full relative precision however small q_tail is; it is NOT log1p(-sum q_S),
  which loses everything once q_tail drops below ~1e-7 in float32.
- 0 log 0 = 0: a teacher entry with p_j = 0 (log-prob -inf) and a tail with p_tail = 0
  contribute nothing, whatever q is.
- If S covers the whole vocabulary (K = V, or ids otherwise exhausting it), the complement is
  empty: the tail term is dropped (p_tail is rounding noise there) and nothing is NaN/inf.
- The gradient is the exact derivative of the returned loss: with P = sum_S p + p_tail (as
  clamped/dropped above), dKL/dz_j = (P q_j - p_j)/T on S and (q_j/T)(P - p_tail/q_tail) off
  S. P = 1 up to rounding of the stored log-probs, where this is DESIGN.md's closed form;
  when stored log-probs sum past 1 (e.g. float16 cache, p_tail clamped to 0) or K = V the
  two differ by O(|1 - P|), and only this one sums to 0 over the row.
- Teacher inputs are constants: no gradient flows to the teachers' log-probs in any impl.
- The ids of one row must be distinct (checked; ``muscle.topk.teacher_topk`` guarantees it).
- The mask selects, it is not differentiated.
- ``t2_scale`` multiplies the KL part (L_comp) by T^2; the CE part is never scaled.
- ``stats.kl`` is L_comp as it enters the loss (T^2 included when asked), so
  ``loss == (1 - ce_weight) * stats.kl + ce_weight * stats.ce``.

Sampled tail (cache format 2; derivation, variance and weights in muscle/TAIL_ESTIMATOR.md).
A teacher given with a :class:`SampledTail` of M >= 1 draws x_1..x_M outside its head, each
with p_hat_m = w_m / M (importance weight over M, ``logweights`` = log p_hat), and its negative
entropy negent = sum_j p_j log p_j over the full vocabulary, enters with

    KL_hat(p || q) = negent - sum_{j in S} p_j log q_j - sum_m p_hat_m log q_{x_m}

instead of KL_S: an unbiased estimate of the full-vocabulary KL(p || q) (it can be negative).
Its gradient, exact for every implementation, is (P_hat q_j - p_hat_j)/T with
p_hat_j = p_j on S, the sum of p_hat_m over the draws with x_m = j (a repeated id counts with
its multiplicity: scatter-add), 0 elsewhere, and P_hat = sum_S p + sum_m p_hat_m (E = 1; rows
sum to 0). Draws with logweight -inf are padding. A teacher without a tail (None, or M = 0)
keeps KL_S exactly, bit for bit; ``stats.frac_sampled`` is the fraction of tokens whose
selected teacher used the sampled estimator. The masks are unchanged: "v1_correct" reads v1's
head top-1 only.

Implementations: ``"torch"`` is a short autograd reference (here); ``"chunked"``
(``muscle/losses_chunked.py``) walks the rows in chunks, computes the loss and the closed-form
gradient in one sweep, and stores the gradient (N, V) in the logits' dtype so that backward is
a scale by grad_output; ``"triton"`` is the fused kernel of ``muscle.kernels``; ``"auto"``
picks triton on CUDA when available. This module holds the public API, validation, dispatch
and the torch reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from muscle.masks import STUDENT_MASKS

MASK_MODES = tuple(STUDENT_MASKS)  # the masks the loss computes itself (muscle.masks)
IMPLS = ("auto", "torch", "chunked", "triton")

_CHUNK_BYTES = 32 * 2**20


ESTIMATORS = {
    "kplus1": "top-K head + one exact tail bin: a lower bound of the full KL (cache format 1)",
    "sampled_tail": "top-K head + importance-sampled tail: unbiased full KL (cache format 2)",
    "mixed": "some tokens' teacher had a sampled tail, others not",
}


@dataclass(frozen=True)
class SampledTail:
    """One teacher's sampled tail at the training temperature, beside its head (format 2).

    Built by the cache reader from the stored draws with
    :func:`muscle.tail_sampling.tail_logweights`; see the module docstring for the estimator.
    """

    ids: Tensor  # (N, M) int: draws outside the teacher's head ids; repeats allowed
    logweights: Tensor  # (N, M) float: log p_hat = log(w / M) per draw; -inf = padding
    negent: Tensor  # (N,) float: sum_j p_j log p_j over the full vocabulary at T


@dataclass(frozen=True)
class LossStats:
    """Diagnostics from the same sweep as the loss; all detached 0-d tensors."""

    kl: Tensor  # L_comp as it enters the loss (mean over non-ignored tokens)
    ce: Tensor  # student cross entropy at T=1, mean over non-ignored tokens
    frac_v1: Tensor  # fraction of non-ignored tokens aligned toward v1 (m = 1)
    n_tokens: Tensor  # number of non-ignored tokens (int64)
    # fraction of non-ignored tokens whose selected teacher used the sampled-tail estimator
    frac_sampled: Tensor

    @property
    def estimator(self) -> str:
        """Which estimator ran: a key of ESTIMATORS."""
        f = float(self.frac_sampled)
        if int(self.n_tokens) and 0.0 < f < 1.0:
            return "mixed"
        return "sampled_tail" if f > 0.0 else "kplus1"

    def as_dict(self) -> dict[str, float]:
        """Plain Python numbers, for a logger."""
        return {
            "kl": float(self.kl),
            "ce": float(self.ce),
            "frac_v1": float(self.frac_v1),
            "n_tokens": int(self.n_tokens),
            "frac_sampled": float(self.frac_sampled),
        }


# ----------------------------------------------------------------------------------------------
# public API


def masked_kl(
    student_logits: Tensor,
    labels: Tensor,
    v1_ids: Tensor,
    v1_logprobs: Tensor,
    v2_ids: Tensor,
    v2_logprobs: Tensor,
    *,
    temperature: float = 2.0,
    mask: str | Tensor = "v2c_wrong",
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    impl: str = "auto",
    t2_scale: bool = False,
    chunk_rows: int | None = None,
    v1_tail: SampledTail | None = None,
    v2_tail: SampledTail | None = None,
) -> Tensor:
    """MUSCLE loss (1 - ce_weight) L_comp + ce_weight CE, a scalar; see the module docstring.

    student_logits (N, V) float; labels (N,) int64 (ignore_index rows contribute nothing);
    v*_ids (N, K*) int of any width; v*_logprobs (N, K*) float, log-probs at ``temperature``
    over the full vocabulary. ``mask``: one of MASK_MODES or a bool (N,) tensor, True = toward v1.
    v*_tail: the teacher's sampled tail at ``temperature`` (format 2), or None for the
    (K+1)-bin KL_S (format 1).
    """
    loss, _ = masked_kl_with_stats(
        student_logits,
        labels,
        v1_ids,
        v1_logprobs,
        v2_ids,
        v2_logprobs,
        temperature=temperature,
        mask=mask,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
        impl=impl,
        t2_scale=t2_scale,
        chunk_rows=chunk_rows,
        v1_tail=v1_tail,
        v2_tail=v2_tail,
    )
    return loss


def masked_kl_with_stats(
    student_logits: Tensor,
    labels: Tensor,
    v1_ids: Tensor,
    v1_logprobs: Tensor,
    v2_ids: Tensor,
    v2_logprobs: Tensor,
    *,
    temperature: float = 2.0,
    mask: str | Tensor = "v2c_wrong",
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    impl: str = "auto",
    t2_scale: bool = False,
    chunk_rows: int | None = None,
    v1_tail: SampledTail | None = None,
    v2_tail: SampledTail | None = None,
) -> tuple[Tensor, LossStats]:
    """Like :func:`masked_kl`, also returning :class:`LossStats` computed in the same sweep."""
    _validate(
        student_logits, labels, v1_ids, v1_logprobs, v2_ids, v2_logprobs,
        temperature, mask, ce_weight, impl, chunk_rows, v1_tail, v2_tail,
    )  # fmt: skip
    # M = 0 is no tail: KL_S for that teacher, exactly as without one
    tails = tuple(t if t is not None and t.ids.shape[1] > 0 else None for t in (v1_tail, v2_tail))
    impl = _resolve_impl(impl, student_logits)
    if impl == "triton":
        return _call_triton(
            student_logits, labels, v1_ids, v1_logprobs, v2_ids, v2_logprobs,
            temperature=temperature, mask=mask, ce_weight=ce_weight,
            ignore_index=ignore_index, t2_scale=t2_scale, v1_tail=tails[0], v2_tail=tails[1],
        )  # fmt: skip
    v1_ids, v2_ids = v1_ids.long(), v2_ids.long()
    # Teachers are constants (module docstring): detach so that no impl differentiates them.
    v1_logprobs, v2_logprobs = v1_logprobs.detach(), v2_logprobs.detach()
    tails = tuple(_detached(t) for t in tails)
    valid = labels != ignore_index  # (N,)
    fixed_mask = _fixed_mask(mask, labels, v1_ids, v1_logprobs)  # (N,) bool or None
    if impl == "torch":
        return _masked_kl_torch(
            student_logits, labels, valid, v1_ids, v1_logprobs, v2_ids, v2_logprobs,
            fixed_mask, temperature, ce_weight, t2_scale, tails,
        )  # fmt: skip
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(student_logits.shape[1], student_logits.dtype)
    # Decided here: inside Function.forward grad mode is always off. Under no_grad (eval) the
    # gradient sweep and its (N, V) buffer are skipped.
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    # Imported here: muscle.losses_chunked imports SampledTail from this module.
    from muscle.losses_chunked import _ChunkedMaskedKL

    outs = _ChunkedMaskedKL.apply(
        student_logits, labels, valid, v1_ids, v1_logprobs, v2_ids, v2_logprobs,
        fixed_mask, float(temperature), float(ce_weight), bool(t2_scale), int(chunk_rows),
        want_grad, tails,
    )  # fmt: skip
    loss, kl, ce, frac, n, frac_s = outs
    return loss, LossStats(kl=kl, ce=ce, frac_v1=frac, n_tokens=n, frac_sampled=frac_s)


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that the chunk's two (C, V) compute buffers take ~32 MiB together."""
    itemsize = 8 if dtype == torch.float64 else 4
    return max(1, _CHUNK_BYTES // (2 * itemsize * vocab))


def token_likelihood_mask(v1_label_logprob: Tensor, v2_label_logprob: Tensor) -> Tensor:
    """Paper Sec. 6.5 LL_L: toward v1 (True) where p2(y_i) < p1(y_i). (N,) -> (N,) bool.

    NaN entries (ignored tokens, as cached) compare False, i.e. toward v2.
    """
    if v1_label_logprob.shape != v2_label_logprob.shape or v1_label_logprob.dim() != 1:
        raise ValueError(
            f"label log-probs must be two (N,) tensors, got {tuple(v1_label_logprob.shape)} "
            f"and {tuple(v2_label_logprob.shape)}"
        )
    return v2_label_logprob < v1_label_logprob


def sequence_likelihood_mask(
    v1_label_logprob: Tensor,
    v2_label_logprob: Tensor,
    example_index: Tensor,
    valid: Tensor,
) -> Tensor:
    """Paper Sec. 6.5 LL_S: instance-wise mask, the same for all tokens of one example.

    The paper writes 1[sum_i [sigma(z_v2,i) < sigma(z_v1,i)]] and describes it as comparing
    "the likelihood of the entire sequence". We read it as the sequence likelihood comparison:
    an example goes toward v1 iff sum_i log p2(y_i) < sum_i log p1(y_i) over its valid tokens
    (v2 assigns the target a lower likelihood than v1). Invalid tokens are False.

    All arguments are (N,): label log-probs (float), example id per token (int, any values),
    valid (bool). Sums are taken in float64 so long examples do not lose the comparison.
    """
    n = v1_label_logprob.shape[0]
    for name, t in (("v2_label_logprob", v2_label_logprob), ("example_index", example_index),
                    ("valid", valid)):  # fmt: skip
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    valid = valid.bool()
    _, inverse = torch.unique(example_index, return_inverse=True)  # (N,) in [0, n_examples)
    n_ex = int(inverse.max()) + 1 if n else 0
    diff = (v1_label_logprob.double() - v2_label_logprob.double()).masked_fill(~valid, 0.0)
    per_ex = torch.zeros(n_ex, dtype=torch.float64, device=diff.device)
    per_ex.index_add_(0, inverse, diff)  # (E,) sum log p1 - sum log p2
    return (per_ex[inverse] > 0) & valid


# ----------------------------------------------------------------------------------------------
# validation and dispatch


def _validate(
    z, labels, ids1, lp1, ids2, lp2, T, mask, ce_weight, impl, chunk_rows, tail1=None, tail2=None
) -> None:
    if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError("student_logits must be a float tensor of shape (N, V)")
    n, v = z.shape
    if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an int tensor of shape ({n},), got {tuple(labels.shape)}")
    for name, ids, lp, tail in (("v1", ids1, lp1, tail1), ("v2", ids2, lp2, tail2)):
        if ids.dim() != 2 or ids.shape[0] != n:
            raise ValueError(f"{name}_ids must have shape ({n}, K), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"{name}_ids must be an integer tensor, got {ids.dtype}")
        if ids.shape[1] < 1:
            raise ValueError(f"{name}_ids must have K >= 1 columns")
        if lp.shape != ids.shape:
            raise ValueError(
                f"{name}_logprobs shape {tuple(lp.shape)} != {name}_ids shape {tuple(ids.shape)}"
            )
        if not lp.is_floating_point():
            raise ValueError(f"{name}_logprobs must be floating point, got {lp.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"{name}_ids out of range [0, {v})")
        srt = ids.sort(dim=1).values  # (N, K): cheap next to the (N, V) work
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"{name}_ids must be distinct within each row")
        if tail is not None:
            _validate_tail(name, tail, n, v, srt)
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {T!r}")
    if not (isinstance(ce_weight, (int, float)) and 0.0 <= ce_weight <= 1.0):
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight!r}")
    if isinstance(mask, str):
        if mask not in MASK_MODES:
            raise ValueError(f"unknown mask {mask!r}; allowed: {', '.join(MASK_MODES)} "
                             "or a bool tensor of shape (N,)")  # fmt: skip
    elif isinstance(mask, Tensor):
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"a mask tensor must be bool of shape ({n},), "
                             f"got {mask.dtype} {tuple(mask.shape)}")  # fmt: skip
    else:
        raise ValueError(f"mask must be one of {MASK_MODES} or a bool tensor, got {type(mask)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")


def _validate_tail(name: str, tail, n: int, v: int, head_sorted: Tensor) -> None:
    """A teacher's SampledTail: shapes, dtypes, id range, weights, draws outside the head."""
    if not isinstance(tail, SampledTail):
        raise ValueError(f"{name}_tail must be a SampledTail or None, got {type(tail).__name__}")
    ids, lw, ne = tail.ids, tail.logweights, tail.negent
    if ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"{name}_tail.ids must have shape ({n}, M), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name}_tail.ids must be an integer tensor, got {ids.dtype}")
    if lw.shape != ids.shape or not lw.is_floating_point():
        raise ValueError(f"{name}_tail.logweights must be float of shape {tuple(ids.shape)}, "
                         f"got {lw.dtype} {tuple(lw.shape)}")  # fmt: skip
    if ne.shape != (n,) or not ne.is_floating_point():
        raise ValueError(f"{name}_tail.negent must be float of shape ({n},), "
                         f"got {ne.dtype} {tuple(ne.shape)}")  # fmt: skip
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= v:
        raise ValueError(f"{name}_tail.ids out of range [0, {v}) (pad with a valid id)")
    if bool((torch.isnan(lw) | (lw == math.inf)).any()):
        raise ValueError(f"{name}_tail.logweights must not be NaN or +inf (-inf = padding)")
    # A real draw inside the head would count its mass twice: look each up in the sorted head.
    head, ids = head_sorted.long(), ids.long()  # searchsorted wants one dtype
    at = torch.searchsorted(head, ids).clamp_(max=head.shape[1] - 1)  # (N, M)
    if bool(((head.gather(1, at) == ids) & (lw > -math.inf)).any()):
        raise ValueError(f"{name}_tail.ids must lie outside {name}_ids (the head) in each row")


def _detached(tail: SampledTail | None) -> SampledTail | None:
    """Teacher inputs are constants: the tail's tensors, detached, ids as int64."""
    if tail is None:
        return None
    return SampledTail(tail.ids.long(), tail.logweights.detach(), tail.negent.detach())


def _resolve_impl(impl: str, z: Tensor) -> str:
    if impl != "auto":
        return impl
    if z.is_cuda and z.dtype != torch.float64 and _triton_available():
        return "triton"
    return "chunked"


def _triton_available() -> bool:
    try:
        from muscle.kernels import triton_available
    except Exception:
        return False
    return bool(triton_available())


def _call_triton(z, labels, ids1, lp1, ids2, lp2, **kw) -> tuple[Tensor, LossStats]:
    if not _triton_available():
        raise RuntimeError(
            "impl='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1); "
            "use impl='chunked' on CPU"
        )
    from muscle.kernels import masked_kl_triton_with_stats

    loss, st = masked_kl_triton_with_stats(z, labels, ids1, lp1, ids2, lp2, **kw)
    if isinstance(st, LossStats):
        return loss, st
    get = st.get if isinstance(st, dict) else lambda k: getattr(st, k)
    keys = ("kl", "ce", "frac_v1", "n_tokens", "frac_sampled")
    stats = LossStats(**{k: torch.as_tensor(get(k)).detach() for k in keys})
    return loss, stats


def _fixed_mask(mask: str | Tensor, labels: Tensor, v1_ids: Tensor, v1_lp: Tensor) -> Tensor | None:
    """The (N,) bool mask when it does not depend on the student; None for "v2c_wrong"."""
    n = labels.shape[0]
    if isinstance(mask, Tensor):
        return mask.to(labels.device)
    if mask == "v2c_wrong":
        return None
    if mask == "always_v1":
        return torch.ones(n, dtype=torch.bool, device=labels.device)
    if mask == "always_v2":
        return torch.zeros(n, dtype=torch.bool, device=labels.device)
    # "v1_correct": v1's top-1 (by log-prob; ties -> lowest k, as torch.argmax) equals the label
    top1 = v1_ids.gather(1, v1_lp.argmax(dim=1, keepdim=True)).squeeze(1)  # (N,)
    return top1 == labels


def _row_sampled(m: Tensor, tails) -> Tensor:
    """(C,) bool: the row's selected teacher (m = toward v1) has a sampled tail."""
    out = m.clone() if tails[0] is not None else torch.zeros_like(m)
    return out | ~m if tails[1] is not None else out


# ----------------------------------------------------------------------------------------------
# impl="torch": the autograd reference


def _kl_topk_torch(logq: Tensor, ids: Tensor, lp: Tensor) -> Tensor:
    """KL_S(p || q) per row. logq (N, V) log-softmax of z/T; ids, lp (N, K). -> (N,)"""
    lp = lp.to(logq.dtype)
    lq_s = logq.gather(1, ids)  # (N, K)
    p_s = lp.exp()  # (N, K)
    p_tail = (1.0 - p_s.sum(1)).clamp(0.0, 1.0)  # (N,)
    in_s = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, ids, True)  # (N, V)
    empty = in_s.all(1)  # (N,) complement is empty (K covers V)
    # Empty rows get finite dummies so logsumexp's backward does not produce NaN there.
    rest = logq.masked_fill(in_s, -math.inf).masked_fill(empty[:, None], 0.0)  # (N, V)
    lq_tail = torch.logsumexp(rest, dim=1)  # (N,)
    head = torch.where(p_s > 0, p_s * (lp - lq_s), 0.0).sum(1)
    use_tail = (p_tail > 0) & ~empty
    log_p_tail = p_tail.clamp_min(torch.finfo(logq.dtype).tiny).log()
    tail = torch.where(use_tail, p_tail * (log_p_tail - lq_tail), 0.0)
    return head + tail


def _kl_sampled_torch(logq: Tensor, ids: Tensor, lp: Tensor, tail: SampledTail) -> Tensor:
    """KL_hat(p || q) per row: negent - sum_S p log q - sum_m p_hat_m log q_{x_m}. -> (N,)

    gather's backward scatter-adds, so a repeated draw gets its multiplicity in the gradient.
    """
    p_s = lp.to(logq.dtype).exp()  # (N, K)
    head = torch.where(p_s > 0, p_s * logq.gather(1, ids), 0.0).sum(1)
    p_hat = tail.logweights.to(logq.dtype).exp()  # (N, M), 0 on padding
    drawn = torch.where(p_hat > 0, p_hat * logq.gather(1, tail.ids), 0.0).sum(1)
    return tail.negent.to(logq.dtype) - head - drawn


def _masked_kl_torch(z, labels, valid, ids1, lp1, ids2, lp2, fixed_mask, T, c, t2, tails):
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf = z.to(cd)  # (N, V)
    logq = torch.log_softmax(zf / T, dim=1)  # (N, V)
    kl1, kl2 = (
        _kl_topk_torch(logq, ids, lp) if tail is None else _kl_sampled_torch(logq, ids, lp, tail)
        for ids, lp, tail in ((ids1, lp1, tails[0]), (ids2, lp2, tails[1]))
    )  # (N,) each
    m = (z.argmax(1) != labels) if fixed_mask is None else fixed_mask  # (N,)
    kl = torch.where(m, kl1, kl2)  # (N,)
    sampled = _row_sampled(m, tails)  # (N,) bool
    safe_y = labels.masked_fill(~valid, 0).long()
    ce = torch.logsumexp(zf, 1) - zf.gather(1, safe_y[:, None]).squeeze(1)  # (N,)
    n = valid.sum()
    denom = n.clamp_min(1).to(cd)
    kl_mean = torch.where(valid, kl, 0.0).sum() / denom * (T * T if t2 else 1.0)
    ce_mean = torch.where(valid, ce, 0.0).sum() / denom
    loss = (1.0 - c) * kl_mean + c * ce_mean
    frac = (m & valid).sum().to(cd) / denom
    frac_s = (sampled & valid).sum().to(cd) / denom
    stats = LossStats(kl=kl_mean.detach(), ce=ce_mean.detach(), frac_v1=frac, n_tokens=n,
                      frac_sampled=frac_s)  # fmt: skip
    return loss, stats
