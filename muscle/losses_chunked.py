"""The chunked CPU path of :func:`muscle.losses.masked_kl` (``impl="chunked"``).

It walks the rows in chunks and computes the loss and its closed-form gradient in one sweep,
storing the gradient (N, V) in the logits' dtype so that backward is a scale by grad_output.
The conventions it implements (log q_tail, 0 log 0, empty complement, exact gradient, sampled
tail) are specified in the docstring of ``muscle/losses.py``, which dispatches here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from muscle.losses import SampledTail, _row_sampled

# The chunked path falls back to an exact per-row complement log-sum-exp when the shifted tail
# sum is below this: there the float sum is denormal-polluted, and p_tail / s_tail could
# overflow. Rows that get here have a student all but certain that the answer is in S.
_TAIL_FLOOR = {torch.float32: 1e-30, torch.float64: 1e-290}


def _pad_cols(ids: Tensor, lp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad (C, k0) to (C, k) by repeating column 0; returns ids, lp, real-column flag (C, k).

    Repeating a real column keeps scatters consistent (a padded slot writes exactly what the
    real one writes); the flag keeps it out of every sum.
    """
    c, k0 = ids.shape
    real = torch.ones(c, k, dtype=torch.bool, device=ids.device)
    if k0 == k:
        return ids, lp, real
    real[:, k0:] = False
    ids = torch.cat([ids, ids[:, :1].expand(c, k - k0)], dim=1)
    lp = torch.cat([lp, lp[:, :1].expand(c, k - k0)], dim=1)
    return ids, lp, real


def _select_teacher(m, ids1, lp1, ids2, lp2, cd):
    """Per row, the teacher the mask picks: ids (C, K), lp (C, K) in cd, real (C, K)."""
    k = max(ids1.shape[1], ids2.shape[1])
    ids1, lp1, r1 = _pad_cols(ids1, lp1.to(cd), k)
    ids2, lp2, r2 = _pad_cols(ids2, lp2.to(cd), k)
    m2 = m[:, None]
    return torch.where(m2, ids1, ids2), torch.where(m2, lp1, lp2), torch.where(m2, r1, r2)


def _exact_tail_lse(zc: Tensor, ids: Tensor, T: float, cd: torch.dtype) -> Tensor:
    """log-sum-exp of z/T over the complement of S, for a few rows. (F, V), (F, K) -> (F,)"""
    x = zc.to(cd) / T  # (F, V)
    x.scatter_(1, ids, -math.inf)
    return torch.logsumexp(x, dim=1)  # -inf iff the complement is empty


def _select_tail(m: Tensor, tails, cd: torch.dtype):
    """Per row, the selected teacher's draws: ids (C, M), p_hat (C, M) in cd (0 on padding and
    where the teacher has no tail), negent (C,) in cd (0 there). tails: the chunk's
    SampledTail or None per teacher, not both None."""
    c = m.shape[0]
    width = max(t.ids.shape[1] for t in tails if t is not None)
    parts = []
    for t in tails:
        ids = torch.zeros(c, width, dtype=torch.long, device=m.device)  # padding: id 0, p_hat 0
        p_hat = torch.zeros(c, width, dtype=cd, device=m.device)
        negent = torch.zeros(c, dtype=cd, device=m.device)
        if t is not None:
            k = t.ids.shape[1]
            ids[:, :k] = t.ids
            p_hat[:, :k] = t.logweights.to(cd).exp()
            negent = t.negent.to(cd)
        parts.append((ids, p_hat, negent))
    m2 = m[:, None]
    (i1, p1, n1), (i2, p2, n2) = parts
    return torch.where(m2, i1, i2), torch.where(m2, p1, p2), torch.where(m, n1, n2)


def _chunk(zc, yc, wc, m, ids1, lp1, ids2, lp2, T, c, t2f, a_buf, b_buf, out, tails=None):
    """Loss terms of one chunk; writes the chunk's gradient into ``out`` unless it is None.

    zc (C, V) student logits in their dtype; yc (C,) labels, 0 where ignored; wc (C,) per-row
    weight 1/n (0 where ignored); m (C,) bool toward-v1, or None for "v2c_wrong"; out (C, V)
    in the logits' dtype or None. a_buf, b_buf: (>= C, V) compute-dtype scratch (may alias).
    tails: None, or the chunk's SampledTail or None per teacher (v1, v2).
    Returns kl (C,), ce (C,), m (C,), sampled (C,) bool.

    Full (C, V) passes, c = 0: copy in, max, scale+shift, exp, [CE dot], tail sum, gradient
    write. The complement sum zeroes S in place instead of masking a copy.
    """
    cd = a_buf.dtype
    rows = zc.shape[0]
    a, b = a_buf[:rows], b_buf[:rows]  # (C, V) scratch
    need_grad = out is not None
    a.copy_(zc)  # exact upcast of z
    # max(dim) returns the first maximal index, like torch.argmax: on the exact upcast this is
    # argmax_j z_j with ties -> lowest id (z/T could round two float32 logits together).
    zmax, amax = a.max(dim=1, keepdim=True)  # (C, 1)
    if m is None:
        m = amax.squeeze(1) != yc
    ids, lp, real = _select_teacher(m, ids1, lp1, ids2, lp2, cd)  # (C, K)
    sampled = None  # (C,) bool rows on the sampled-tail estimator, when there is a tail
    if tails is not None:
        sampled = _row_sampled(m, tails)
        t_ids, p_hat, negent = _select_tail(m, tails, cd)  # (C, M), (C, M), (C,)

    # e = exp((z - max z)/T) in place, fused as z * (1/T) + (-max/T); q = e / s.
    xmax = zmax / T  # (C, 1) max of z/T
    if T == 1.0:
        a.sub_(zmax)
    else:
        torch.add(-xmax, a, alpha=1.0 / T, out=a)
    a.exp_()

    # CE at T=1 uses e^T = exp(z - max z): no second copy of the logits. When its softmax
    # enters the gradient (c > 0, T != 1) it needs its own buffer, as a is overwritten.
    e1 = None
    if T == 1.0:
        s1 = None  # = s, known below
    elif c > 0 and need_grad:
        e1 = torch.mul(a, a, out=b) if T == 2.0 else torch.pow(a, T, out=b)
        s1 = e1.sum(1)
    elif T == 2.0:
        s1 = torch.bmm(a.unsqueeze(1), a.unsqueeze(2)).view(rows)  # sum e^2, no temporary
    else:
        s1 = torch.pow(a, T, out=b).sum(1)

    # Teacher side on (C, K); then the complement sum: zero S in place and sum. The full sum is
    # s_tail + sum_S e (two sums of positives, no cancellation; ids are distinct per row).
    e_s = a.gather(1, ids)  # (C, K)
    e1_s = e1.gather(1, ids) if e1 is not None else None
    a.scatter_(1, ids, 0.0)
    s_tail = a.sum(1)  # (C,)
    s = s_tail + (e_s * real).sum(1)  # (C,)
    log_s = s.log()
    lse = xmax.squeeze(1) + log_s  # (C,) log-sum-exp of z/T
    if s1 is None:
        s1 = s
    z_y = zc.gather(1, yc[:, None]).squeeze(1).to(cd)  # (C,)
    ce = zmax.squeeze(1) + s1.log() - z_y  # (C,)

    lq_s = zc.gather(1, ids).to(cd) / T - lse[:, None]  # (C, K) log q_S
    p_raw = lp.exp()  # (C, K) padded slots repeat column 0
    p_s = p_raw * real
    p_tail = (1.0 - p_s.sum(1)).clamp(0.0, 1.0)  # (C,)
    log_q_tail = s_tail.log() - log_s  # (C,)
    fb = s_tail < _TAIL_FLOOR[cd]  # (C,) underflowed tail or empty complement: exact path
    if sampled is not None:
        fb &= ~sampled  # the sampled estimator has no q_tail
    fb_rows = fb.nonzero().squeeze(1)
    lse_tail_fb = None
    if fb_rows.numel():
        lse_tail_fb = _exact_tail_lse(zc[fb_rows], ids[fb_rows], T, cd)  # (F,)
        log_q_tail[fb_rows] = lse_tail_fb - lse[fb_rows]
        p_tail[fb_rows] = torch.where(torch.isinf(lse_tail_fb), 0.0, p_tail[fb_rows])
    head = torch.where(p_s > 0, p_s * (lp - lq_s), 0.0).sum(1)
    log_p_tail = p_tail.clamp_min(torch.finfo(cd).tiny).log()
    tail = torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), 0.0)
    kl = head + tail  # (C,)
    if sampled is not None:
        # KL_hat = negent - sum_S p log q - sum_m p_hat_m log q_{x_m}; P_hat for the gradient
        lq_t = zc.gather(1, t_ids).to(cd) / T - lse[:, None]  # (C, M) log q at the draws
        cross = torch.where(p_s > 0, p_s * lq_s, 0.0).sum(1)
        cross = cross + torch.where(p_hat > 0, p_hat * lq_t, 0.0).sum(1)
        kl = torch.where(sampled, negent - cross, kl)
    if not need_grad:
        return kl, ce, m, sampled

    # Gradient, closed form, times the row weight:
    #   KL: (P q_j - p_j)/T on S; (q_j/T)(P - p_tail/q_tail) off S, q_j/q_tail = e_j/s_tail,
    #       with P = sum_S p + p_tail as used above. P = 1 unless the teacher's stored
    #       log-probs sum past 1 (clamped tail) or the complement is empty; keeping P makes
    #       this the exact derivative of the returned loss (rows sum to 0).
    #   CE: softmax(z)_j - 1[j = y] = e1_j / s1 - 1[j = y].
    #   Sampled-tail rows: (P_hat q_j - p_hat_j)/T everywhere, P_hat = sum_S p + sum p_hat,
    #       i.e. P_hat q / T off S, the S entries as above, minus p_hat / T scatter-added at the
    #       draws (repeats add up: multiplicity).
    ka = wc * ((1.0 - c) * t2f / T)  # (C,)
    kb = wc * c  # (C,)
    big_p = p_s.sum(1) + p_tail  # (C,)
    ratio = torch.where(fb, 0.0, p_tail / torch.where(fb, 1.0, s_tail))  # p_tail / s_tail
    if sampled is not None:
        big_p = torch.where(sampled, p_s.sum(1) + p_hat.sum(1), big_p)
        ratio = torch.where(sampled, 0.0, ratio)
    coef = ka * (big_p / s - ratio)  # (C,) off-S gradient is coef * e
    if c > 0 and T == 1.0:
        coef = coef + kb / s1  # the CE softmax is e / s too
    g_s = ka[:, None] * (e_s * (big_p / s)[:, None] - p_raw)  # (C, K) on-S gradient
    if c > 0:
        g_s = g_s + (kb / s1)[:, None] * (e_s if T == 1.0 else e1_s)
    # c = 0 in the compute dtype writes straight into out. An out= of another dtype would
    # make torch allocate a compute-dtype temporary and copy: scale in place, copy once.
    dst = out if (c == 0 and out.dtype == cd) else a
    torch.mul(a, coef[:, None], out=dst)  # S entries of a are 0
    if fb_rows.numel():
        # Here every off-S e_j is ~0, so q_j ~ 0 and -p_tail q_j/q_tail dominates, with
        # q_j/q_tail = exp(z_j/T - lse_tail); empty complements have p_tail = 0.
        x = zc[fb_rows].to(cd) / T  # (F, V)
        x.scatter_(1, ids[fb_rows], -math.inf)
        x.sub_(lse_tail_fb.clamp_min(torch.finfo(cd).min)[:, None]).exp_()
        fix = a[fb_rows] * coef[fb_rows, None] - (ka[fb_rows] * p_tail[fb_rows])[:, None] * x
        dst[fb_rows] = fix.to(dst.dtype)
    if c > 0 and e1 is not None:
        a.add_(e1.mul_((kb / s1)[:, None]))  # CE softmax off S; S entries reset below
    # c > 0 always finishes in a (dst is a); c = 0 in a when out has another dtype
    fin = out if dst is out else a
    fin.scatter_(1, ids, g_s)
    if sampled is not None:
        fin.scatter_add_(1, t_ids, (-ka[:, None] * p_hat).to(fin.dtype))  # 0 on padding
    if c > 0:
        fin.scatter_add_(1, yc[:, None], -kb[:, None])
    if fin is a:
        out.copy_(a)
    return kl, ce, m, sampled


class _ChunkedMaskedKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, z, labels, valid, ids1, lp1, ids2, lp2, fixed_mask, T, c, t2, chunk_rows, need_grad,
        tails,
    ):  # fmt: skip
        n_rows, v = z.shape
        cd = torch.float64 if z.dtype == torch.float64 else torch.float32
        n = valid.sum()
        denom = n.clamp_min(1).to(cd)
        w = valid.to(cd) / denom  # (N,) per-row weight of the mean
        safe_y = labels.masked_fill(~valid, 0).long()
        t2f = T * T if t2 else 1.0
        rows = min(chunk_rows, max(n_rows, 1))
        # A second buffer only holds e^T for the CE term when T is neither 1 nor 2 or when the
        # CE softmax enters the gradient.
        a_buf = torch.empty(rows, v, dtype=cd, device=z.device)
        two = T not in (1.0, 2.0) or (c > 0 and need_grad and T != 1.0)
        b_buf = torch.empty(rows, v, dtype=cd, device=z.device) if two else a_buf
        grad = torch.empty_like(z) if need_grad else None
        kl = torch.empty(n_rows, dtype=cd, device=z.device)
        ce = torch.empty(n_rows, dtype=cd, device=z.device)
        m = torch.empty(n_rows, dtype=torch.bool, device=z.device)
        smp = torch.zeros(n_rows, dtype=torch.bool, device=z.device)
        any_tail = any(t is not None for t in tails)
        for lo in range(0, n_rows, rows):
            sl = slice(lo, min(lo + rows, n_rows))
            fm = None if fixed_mask is None else fixed_mask[sl]
            zc = z[sl]
            tc = tuple(_rows(t, sl) for t in tails) if any_tail else None
            kl[sl], ce[sl], m[sl], s_c = _chunk(
                zc, safe_y[sl], w[sl], fm, ids1[sl], lp1[sl], ids2[sl], lp2[sl],
                T, c, t2f, a_buf, b_buf, None if grad is None else grad[sl], tc,
            )  # fmt: skip
            if s_c is not None:
                smp[sl] = s_c
        kl_mean = (w * kl).where(valid, 0.0).sum() * t2f
        ce_mean = (w * ce).where(valid, 0.0).sum()
        loss = (1.0 - c) * kl_mean + c * ce_mean
        frac = (m & valid).sum().to(cd) / denom
        frac_s = (smp & valid).sum().to(cd) / denom
        ctx.grad = grad
        ctx.mark_non_differentiable(kl_mean, ce_mean, frac, n, frac_s)
        return loss, kl_mean, ce_mean, frac, n, frac_s

    @staticmethod
    def backward(ctx, grad_loss, *_):
        # Scale the stored gradient. It stays in ctx (retain_graph and gradcheck's reentrancy
        # check call backward twice); in training the logits come out of lm_head, so autograd
        # hands it straight to that matmul's backward without a copy.
        grad = ctx.grad
        if not (grad_loss.numel() == 1 and float(grad_loss) == 1.0):
            grad = grad * grad_loss.to(grad.dtype)
        return (grad,) + (None,) * 13


def _rows(tail: SampledTail | None, sl: slice) -> SampledTail | None:
    """The rows sl of a tail (views)."""
    if tail is None:
        return None
    return SampledTail(tail.ids[sl], tail.logweights[sl], tail.negent[sl])
