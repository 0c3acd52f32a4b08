"""Fused masked top-K KL distillation loss (MUSCLE, DESIGN §4-5) in Triton.

Layering, as in Liger-Kernel: ``_masked_kl_fwd_kernel`` (jit, one program per row) ->
``masked_kl_forward`` (launcher: validation, block sizes, allocation) -> ``MaskedKLFunction``
(autograd; the forward computes the gradient, backward only scales it, with
``_scale_rows_kernel``) -> ``masked_kl_triton`` / ``masked_kl_triton_with_stats`` (the entry
points ``muscle.losses`` calls through ``muscle.kernels``).

Per row i (label y, student logits z, temperature T, q = softmax(z / T)) the kernel:

1. sweeps the vocabulary once in BLOCK_V blocks: online max and sum-exp of z / T (and of z for
   the CE term, squared from the same exp when T = 2), and the running argmax of z (lowest id
   on ties) for the "v2c_wrong" mask;
2. picks the teacher (m_i = 1 -> v1), gathers z at its K ids and computes
   KL_S(p || q) = sum_S p (lp - log q) + p_tail (log p_tail - log q_tail);
   log q_tail = log(1 - sum_S q) when that is >= 2^-10 (cancellation costs < ~1e-4 relative),
   otherwise exactly, in log space, by a sum-exp over the complement of S (a second read of the
   row; rare: the student must put > 99.9% of its tempered mass on the teacher's top-K);
3. sweeps again writing the gradient of the per-row loss, scaled by its final weight: the
   "j not in S" formula (q_j / T)(P - p_tail / q_tail) everywhere, one exp per element (plus
   the CE gradient when ce_weight > 0), then,
   after a barrier, overwrites the K entries of S with (P q_j - p_j) / T (plus CE). P =
   sum_S p + p_tail is 1 up to rounding of the stored log-probs (DESIGN §4's closed form);
   keeping it makes the gradient the exact derivative of the returned loss, as
   muscle/losses.py specifies for every implementation.

The row is read twice and written once (three times read in the rare exact-tail case). The
gradient goes into the logits buffer itself by default (``inplace_backward=True``, as Liger's
cross-entropy does): the caller's logits tensor is overwritten, so do not reuse it after the
call. Accumulation is float32 for every input dtype; the gradient is stored in z's dtype.
Neither forward nor backward synchronizes with the host: the mean's 1 / n_valid is read by the
kernel from a device tensor, and backward's "is grad_output 1?" is decided on the device.

Sampled tail (cache format 2, muscle/losses.py and muscle/TAIL_ESTIMATOR.md): when the
selected teacher has M >= 1 tail draws x_m with log p_hat_m (-inf = padding) and a negentropy,
step 2 computes KL_hat = negent - sum_S p log q - sum_m p_hat_m log q_{x_m} instead (no q_tail,
no exact-tail sweep), sweep 3 writes P_hat q_j / T everywhere (P_hat = sum_S p + sum p_hat) and
the fix-up also rewrites the draws' entries with (P_hat q_j - p_hat_j) / T, where p_hat_j sums
the draws of id j (a (BLOCK_M, BLOCK_M) compare: repeated lanes store the same value). Draws
must lie outside S (the caller checks). Without tails (HAS_TAIL = False) the compiled kernel is
the format 1 one.

Assumptions: teacher ids are unique within a row (duplicates would be counted twice in sum_S and
the fix-up pass would write the same entry twice) and lie in [0, V); labels lie in [0, V) or
equal ignore_index. A teacher entry with log-prob -inf (padding) has p = 0 and contributes 0.
If the complement of S is empty (K = V) the tail bin is dropped (p_tail is then only rounding).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from muscle.config import DEFAULT_TEMPERATURE
from muscle.masks import DEFAULT_MASK, STUDENT_MASKS

if TYPE_CHECKING:
    from muscle.losses import SampledTail

# Which teacher each row distils from: a mask name of muscle.masks (STUDENT_MASKS) or a bool
# tensor (N,), True = v1.
Mask = str | torch.Tensor

# 1 - sum_S q below this -> compute log q_tail exactly over the complement (see module doc).
_TAIL_EXACT_BELOW = 2.0**-10

_MASK_MODES = tuple(STUDENT_MASKS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_block(z_row, cols, V, EVICT: tl.constexpr):
    """One block of the row in its own dtype; -inf past V (neutral for max and sum-exp).
    EVICT: the L2 eviction policy ("" = none; "evict_last" / "evict_first")."""
    return tl.load(z_row + cols, mask=cols < V, other=float("-inf"), eviction_policy=EVICT)


@triton.jit
def _grad_block(z_row, g_row, cols, V, y, m, inv_T, base, a_kl, ce_wn, log_s_1,
                CE_GRAD: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """Sweep 2 on one block: g_j = a_kl exp((z_j - m) / T + base) (+ the CE gradient)."""
    vmask = cols < V
    x = _load_block(z_row, cols, V, EVICT).to(tl.float32)
    # entries of S may exceed 1 here (overwritten by the fix-up): cap before exp, never inf
    g = a_kl * tl.exp(tl.minimum((x - m) * inv_T + base, 64.0))
    if CE_GRAD:
        g += ce_wn * (tl.exp(x - m - log_s_1) - tl.where(cols == y, 1.0, 0.0))
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=vmask)


@triton.jit
def _teacher_lanes(ids1_ptr, vals1_ptr, stride1, n1, ids2_ptr, vals2_ptr, stride2, n2, row, sel,
                   BLOCK: tl.constexpr):  # fmt: skip
    """The selected teacher's entries of one row (sel = 1: v1, 0: v2), head or tail alike:
    ids (BLOCK,) (0 on unused lanes), values (BLOCK,) (-inf there) and the used lanes.
    Masked loads touch no memory: only the selected teacher's entries are read."""
    lanes = tl.arange(0, BLOCK)
    on1 = lanes < n1 * sel  # lanes of v1 when it is selected, none otherwise
    on2 = lanes < n2 * (1 - sel)
    use_v1 = sel == 1
    ids = tl.where(
        use_v1,
        tl.load(ids1_ptr + row * stride1 + lanes, mask=on1, other=0),
        tl.load(ids2_ptr + row * stride2 + lanes, mask=on2, other=0),
    )
    vals = tl.where(
        use_v1,
        tl.load(vals1_ptr + row * stride1 + lanes, mask=on1, other=float("-inf")),
        tl.load(vals2_ptr + row * stride2 + lanes, mask=on2, other=float("-inf")),
    )
    return ids, vals, on1 | on2


@triton.jit
def _fixup_block(g_row, ids, keep, q, mass, z_at, big_p, kl_wt, ce_wn, m, log_s_1, y,
                 CE_GRAD: tl.constexpr):  # fmt: skip
    """The fix-up of the entries ``ids`` (lanes ``keep``), head or draws alike: their gradient
    is kl_wt (P q_j - mass_j) (plus CE), mass_j = p_j on S, p_hat_j at the draws."""
    g = kl_wt * (big_p * q - mass)
    if CE_GRAD:
        g += ce_wn * (tl.exp(z_at - m - log_s_1) - tl.where(ids == y, 1.0, 0.0))
    tl.store(g_row + ids, g.to(g_row.dtype.element_ty), mask=keep)


@triton.jit
def _masked_kl_fwd_kernel(
    z_ptr,  # (N, V) student logits, fp32 / bf16 / fp16, unit stride along V
    z_stride,
    g_ptr,  # (N, V) gradient out, z's dtype (== z_ptr when in place); unused w/o COMPUTE_GRAD
    g_stride,
    y_ptr,  # (N,) int64 labels
    mask_ptr,  # (N,) int8, 1 = align to v1; unused when MASK_ARGMAX
    ids1_ptr,  # (N, K1) int32 teacher v1 top-K ids
    lp1_ptr,  # (N, K1) float32 teacher v1 log-probs at temperature T
    ids1_stride,
    K1,
    ids2_ptr,  # (N, K2) int32
    lp2_ptr,  # (N, K2) float32
    ids2_stride,
    K2,
    tids1_ptr,  # (N, M1) int32 v1 tail draws (format 2); unused unless HAS_TAIL
    tlw1_ptr,  # (N, M1) float32 their log p_hat at T (-inf = padding)
    neg1_ptr,  # (N,) float32 v1 negentropy at T
    tids1_stride,
    M1,  # 0: v1 keeps the (K+1)-bin KL
    tids2_ptr,  # (N, M2) int32
    tlw2_ptr,  # (N, M2) float32
    neg2_ptr,  # (N,) float32
    tids2_stride,
    M2,
    kl_out_ptr,  # (N,) float32 per-row KL_S (0 on ignored rows)
    ce_out_ptr,  # (N,) float32 per-row CE at temperature 1 (0 if not COMPUTE_CE)
    m_out_ptr,  # (N,) int8 per-row mask actually used
    V,
    ignore_index,
    inv_T,  # 1 / T
    n_valid_ptr,  # () int64 count of non-ignored rows, read on the device: no host sync
    kl_w,  # gradient weight of the KL term before / n_valid: (1 - ce_weight) * (T^2 if t2_scale)
    ce_w,  # gradient weight of the CE term before / n_valid: ce_weight
    tail_exact_below,
    MASK_ARGMAX: tl.constexpr,  # mask = (argmax z != y), known only after the first sweep
    COMPUTE_CE: tl.constexpr,  # per-row CE (the loss term or only the logged statistic)
    CE_POW: tl.constexpr,  # exp(z - m) from sweep 1's exp((z - m) / T): 1 (T == 1), 2 (T == 2), 0
    CE_GRAD: tl.constexpr,  # the CE term enters the gradient (ce_weight > 0)
    COMPUTE_GRAD: tl.constexpr,
    HAS_TAIL: tl.constexpr,  # some teacher has M >= 1 tail draws
    # L2 eviction policies: sweep 1 "evict_last" (sweep 2 reads the row again soon), sweep 2
    # "evict_first" (last use), or "" for none
    EVICT_SWEEP1: tl.constexpr,
    EVICT_SWEEP2: tl.constexpr,
    PREFETCH: tl.constexpr,  # sweep 1 loads block b + 1 before reducing block b
    REVERSE_SWEEP2: tl.constexpr,  # sweep 2 runs from the last block to the first
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,  # vocab block of the exact-tail sweep (BLOCK_C x BLOCK_K compare)
    BLOCK_M: tl.constexpr,  # tail draws (a power of 2 >= max(M1, M2))
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK_V)
    y = tl.load(y_ptr + row)

    if y == ignore_index:
        # Ignored rows: no loss, zero gradient (the buffer may hold the logits: overwrite them).
        tl.store(kl_out_ptr + row, 0.0)
        tl.store(ce_out_ptr + row, 0.0)
        tl.store(m_out_ptr + row, 0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_V], tl.float32), mask=cols < V)
        return

    # ---- sweep 1: online max / sum-exp of z/T (and z), running argmax of z ------------------
    # One max serves both temperatures: max(z / T) = max(z) / T for T > 0.
    m = float("-inf")
    s_t = 0.0  # sum exp((z - m) / T)
    s_1 = 0.0  # sum exp(z - m)
    amax = 0
    if PREFETCH:
        x_next = _load_block(z_row, offs, V, EVICT_SWEEP1)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        if PREFETCH:
            # Issue the next block's load before this block's arithmetic, so that one CTA's
            # loads and math overlap (the block reductions below keep its warps in lock-step).
            x = x_next.to(tl.float32)
            x_next = _load_block(z_row, cols + BLOCK_V, V, EVICT_SWEEP1)
        else:
            x = _load_block(z_row, cols, V, EVICT_SWEEP1).to(tl.float32)
        bmax = tl.max(x, 0)
        if MASK_ARGMAX:
            barg = tl.argmax(x, 0, tie_break_left=True)
            # strict '>' keeps the earlier block on ties: lowest id wins overall
            amax = tl.where(bmax > m, start + barg, amax)
        m_new = tl.maximum(m, bmax)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no NaN
        e_t = tl.exp((x - m_safe) * inv_T)  # (BLOCK_V,) the one exp per element of this sweep
        s_t = s_t * tl.exp((m - m_safe) * inv_T) + tl.sum(e_t, 0)
        if COMPUTE_CE:
            # exp(z - m) = exp((z - m) / T)^T: no second exp when T is 1 or 2
            if CE_POW == 1:
                e_1 = e_t
            elif CE_POW == 2:
                e_1 = e_t * e_t
            else:
                e_1 = tl.exp(x - m_safe)
            s_1 = s_1 * tl.exp(m - m_safe) + tl.sum(e_1, 0)
        m = m_new
    log_s_t = tl.log(s_t)  # log q_j = (z_j - m) / T - log_s_t: shifted, so exact for |z| ~ 1e4

    # ---- the mask picks one teacher; gather z at its K ids ---------------------------------
    if MASK_ARGMAX:
        sel = tl.where(amax != y, 1, 0)
    else:
        sel = tl.where(tl.load(mask_ptr + row) != 0, 1, 0)
    use_v1 = sel == 1
    ids, lp, kmask = _teacher_lanes(ids1_ptr, lp1_ptr, ids1_stride, K1, ids2_ptr, lp2_ptr,
                                    ids2_stride, K2, row, sel, BLOCK_K)  # fmt: skip
    zs = tl.load(z_row + ids, mask=kmask, other=0.0).to(tl.float32)  # (BLOCK_K,)
    logq = (zs - m) * inv_T - log_s_t
    q = tl.where(kmask, tl.exp(logq), 0.0)
    p = tl.exp(lp)  # 0 on padding lanes and on -inf log-probs
    p_tail = tl.minimum(tl.maximum(1.0 - tl.sum(p, 0), 0.0), 1.0)
    # 0 * log 0 = 0: keep -inf log-probs out of the arithmetic altogether
    kl = tl.sum(p * (tl.where(p > 0.0, lp, 0.0) - logq), 0)

    if HAS_TAIL:
        # ---- the selected teacher's sampled tail (M_sel = 0: none, the (K+1)-bin KL) -------
        m_sel = M1 * sel + M2 * (1 - sel)
        binned = m_sel == 0
        sampled = m_sel > 0
        tids, tlw, tmask = _teacher_lanes(tids1_ptr, tlw1_ptr, tids1_stride, M1, tids2_ptr,
                                          tlw2_ptr, tids2_stride, M2, row, sel, BLOCK_M)  # fmt: skip
        p_hat = tl.exp(tlw)  # 0 on padding lanes
        # z at the draws, read now: in place, sweep 3 overwrites the row with the gradient
        zt = tl.load(z_row + tids, mask=tmask, other=0.0).to(tl.float32)  # (BLOCK_M,)
        lq_t = (zt - m) * inv_T - log_s_t
        negent = tl.where(use_v1, tl.load(neg1_ptr + row), tl.load(neg2_ptr + row))
        # KL_hat = negent - sum_S p log q - sum_m p_hat_m log q_{x_m}
        kl_hat = negent - tl.sum(tl.where(p > 0.0, p * logq, 0.0), 0)
        kl_hat -= tl.sum(tl.where(p_hat > 0.0, p_hat * lq_t, 0.0), 0)
        sum_p_hat = tl.sum(p_hat, 0)

    # ---- log q_tail: cheap complement when well-conditioned, exact sum-exp otherwise -------
    one_minus = 1.0 - tl.sum(q, 0)
    if HAS_TAIL:
        cheap = (one_minus >= tail_exact_below) | sampled  # sampled rows need no q_tail
    else:
        cheap = one_minus >= tail_exact_below
    if cheap:
        log_q_tail = tl.log(one_minus)
    else:
        # Sum-exp over j not in S, with its own running max, so log q_tail stays finite and
        # exact even when q_tail underflows (extreme logits). Membership of each vocab entry
        # in S by a (BLOCK_C, BLOCK_K) compare: no scratch buffer, input left untouched.
        offc = tl.arange(0, BLOCK_C)
        mc = float("-inf")
        sc = 0.0
        for start in range(0, V, BLOCK_C):
            cols = start + offc
            x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            hit = (cols[:, None] == ids[None, :]) & kmask[None, :]  # (BLOCK_C, BLOCK_K)
            in_s = tl.max(hit.to(tl.int32), 1) > 0
            x = tl.where(in_s, float("-inf"), x)
            mc_new = tl.maximum(mc, tl.max(x, 0))
            mc_safe = tl.where(mc_new == float("-inf"), 0.0, mc_new)
            sc = sc * tl.exp((mc - mc_safe) * inv_T) + tl.sum(tl.exp((x - mc_safe) * inv_T), 0)
            mc = mc_new
        # sc == 0 (empty complement, K = V) -> -inf: the tail bin is dropped below
        log_q_tail = tl.where(
            sc > 0.0,
            (mc - m) * inv_T + tl.log(tl.where(sc > 0.0, sc, 1.0)) - log_s_t,
            float("-inf"),
        )
    has_tail = log_q_tail > float("-inf")
    use_tail = has_tail & (p_tail > 0.0)
    if HAS_TAIL:
        use_tail = use_tail & binned
    # both logs guarded so that no lane ever computes 0 * inf (NaN-free, also under the hood)
    log_p_tail = tl.log(tl.where(use_tail, p_tail, 1.0))
    kl += tl.where(use_tail, p_tail * (log_p_tail - tl.where(use_tail, log_q_tail, 0.0)), 0.0)
    if HAS_TAIL:
        kl = tl.where(binned, kl, kl_hat)
    tl.store(kl_out_ptr + row, kl)
    tl.store(m_out_ptr + row, sel.to(tl.int8))

    if COMPUTE_CE:
        y_ok = (y >= 0) & (y < V)
        z_y = tl.load(z_row + y, mask=y_ok, other=0.0).to(tl.float32)
        log_s_1 = tl.log(s_1)
        tl.store(ce_out_ptr + row, m + log_s_1 - z_y)
    else:
        log_s_1 = 0.0
        tl.store(ce_out_ptr + row, 0.0)

    if COMPUTE_GRAD:
        # ---- sweep 2: gradient of the complement formula everywhere ------------------------
        # (q_j / T)(1 - p_tail / q_tail) = (q_j - p_tail * exp(log q_j - log q_tail)) / T;
        # the ratio q_j / q_tail <= 1 is taken in log space so it never overflows.
        # Exact derivative of the returned loss (muscle/losses.py conventions): with
        # P = sum_S p + p_tail (as clamped / dropped), P q_j - p_j on S and
        # q_j (P - p_tail / q_tail) off S, over T. P = 1 up to rounding of the stored log-probs
        # (DESIGN §4's closed form); this form also sums to 0 over the row when it is not.
        # Sampled-tail rows: use_tail is False, so coef = P_hat and shift = 0 below, and the
        # fix-up subtracts p_hat at the draws.
        tail_coef = tl.where(use_tail, p_tail, 0.0)
        big_p = tl.sum(p, 0) + tail_coef
        if HAS_TAIL:
            big_p += tl.where(binned, 0.0, sum_p_hat)
        lqt = tl.where(use_tail, log_q_tail, 0.0)
        inv_n = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        kl_wt = kl_w * inv_n * inv_T
        ce_wn = ce_w * inv_n
        # One exp per element: g_j = kl_wt * coef * exp(lq_j + shift), with per-row scalars.
        # Usually shift = 0 and coef = P - p_tail / q_tail. When q_tail < e^-64, 1 / q_tail
        # would overflow: shift = -log q_tail and coef = P q_tail - p_tail instead (the same
        # product; exp(lq_j + shift) = q_j / q_tail <= 1 off S).
        tiny_tail = lqt < -64.0
        shift = tl.where(tiny_tail, -lqt, 0.0)
        coef = tl.where(
            tiny_tail,
            big_p * tl.exp(lqt) - tail_coef,
            big_p - tail_coef * tl.exp(tl.where(tiny_tail, 0.0, -lqt)),
        )
        a_kl = kl_wt * coef
        base = shift - log_s_t  # lq_j + shift = (x_j - m) / T + base (x - m first: exact)
        if REVERSE_SWEEP2:
            # Backwards, the first blocks read are the ones sweep 1 read last: the likeliest to
            # be still in L2.
            n_blocks = tl.cdiv(V, BLOCK_V)
            for b in range(0, n_blocks):
                _grad_block(z_row, g_row, (n_blocks - 1 - b) * BLOCK_V + offs, V, y, m, inv_T,
                            base, a_kl, ce_wn, log_s_1, CE_GRAD, EVICT_SWEEP2)  # fmt: skip
        else:
            # (a separate loop: indexing blocks by b instead of start cost 67 registers and
            # spills on sm_90, benchmarks/kernel_sass.py)
            for start in range(0, V, BLOCK_V):
                _grad_block(z_row, g_row, start + offs, V, y, m, inv_T, base, a_kl, ce_wn,
                            log_s_1, CE_GRAD, EVICT_SWEEP2)  # fmt: skip
        # The fix-up below rewrites entries that other threads of this program just wrote:
        # order the two writes (and, in place, our reads of z above) with a CTA barrier.
        tl.debug_barrier()
        # ---- fix-up: entries in S get (P q_j - p_j) / T -------------------------------------
        _fixup_block(g_row, ids, kmask, q, p, zs, big_p, kl_wt, ce_wn, m, log_s_1, y, CE_GRAD)
        if HAS_TAIL:
            # ---- fix-up: the draws' entries get (P_hat q_j - p_hat_j) / T ---------------
            # p_hat_j = the sum over the lanes drawing j: every such lane stores one value.
            same = (tids[:, None] == tids[None, :]) & tmask[None, :]  # (BLOCK_M, BLOCK_M)
            p_id = tl.sum(tl.where(same, p_hat[None, :], 0.0), 1)  # (BLOCK_M,)
            # real draws only (a padding lane may name a head id); none on binned rows
            real = tmask & (tlw > float("-inf"))
            _fixup_block(g_row, tids, real, tl.exp(lq_t), p_id, zt, big_p, kl_wt, ce_wn, m,
                         log_s_1, y, CE_GRAD)  # fmt: skip


@triton.jit
def _scale_rows_kernel(
    g_ptr,  # (N, V) gradient, scaled in place
    g_stride,
    s_ptr,  # () float32 scale (autograd's grad_output)
    V,
    BLOCK_V: tl.constexpr,
):
    # The usual loss.backward() passes 1: every program returns after one scalar load, so the
    # check costs one tiny launch instead of a host sync (torch.equal) or an (N, V) pass.
    s = tl.load(s_ptr)
    if s != 1.0:
        g_row = g_ptr + tl.program_id(0).to(tl.int64) * g_stride
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            vmask = cols < V
            g = tl.load(g_row + cols, mask=vmask, other=0.0).to(tl.float32)
            tl.store(g_row + cols, (g * s).to(g_row.dtype.element_ty), mask=vmask)


def scale_grad_inplace(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad (N, V) *= scale (one element), in float32, without a host sync."""
    N, V = grad.shape  # unit stride along V: the forward's own gradient buffer
    if N == 0:
        return
    s = scale.detach().reshape(()).to(device=grad.device, dtype=torch.float32)
    block_v, _, _, num_warps = _pick_blocks(V, 1)
    _scale_rows_kernel[(N,)](grad, grad.stride(0), s, V, BLOCK_V=block_v, num_warps=num_warps)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pick_blocks(V: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_V, BLOCK_K, BLOCK_C, num_warps). One fixed config: autotune with several configs
    fails under the interpreter, and the kernel is memory-bound, so a large block suffices."""
    block_k = max(2, _next_pow2(K))
    env_bv = os.environ.get("MUSCLE_KL_BLOCK_V")
    if _interpreting():
        # The interpreter pays per loop iteration, not per element: few, large blocks.
        block_v = min(_next_pow2(V), int(env_bv) if env_bv else 4096)
        return block_v, block_k, block_v, 1
    # Measured on an H200, bf16, N=16384 (BLOCK_V x warps, ms at V=32000 / 128256):
    # 4096x8 2.35 / 6.69, 8192x8 2.14 / 5.85, 16384x8 2.06 / 5.56, 16384x16 2.39 / 5.75,
    # 2048x4 2.78 / 9.52. Override with MUSCLE_KL_BLOCK_V / MUSCLE_KL_NUM_WARPS to re-tune.
    block_v = min(_next_pow2(V), int(env_bv) if env_bv else 16384)
    env_nw = os.environ.get("MUSCLE_KL_NUM_WARPS")
    num_warps = int(env_nw) if env_nw else 8
    # keep the (BLOCK_C, BLOCK_K) membership tile at ~8k elements: no register spills
    block_c = max(16, min(_next_pow2(V), 8192 // block_k))
    return block_v, block_k, block_c, num_warps


def _ce_pow(temperature: float) -> int:
    """How sweep 1 gets exp(z - m) from exp((z - m) / T): 1 = the same, 2 = its square,
    0 = a second exp (any other T)."""
    return {1.0: 1, 2.0: 2}.get(float(temperature), 0)


def _env_flag(name: str, default: bool) -> bool:
    """A kernel variant switch for A/B runs (benchmarks/bench_kernel.py --tune): MUSCLE_KL_EVICT
    (L2 eviction hints, default on), MUSCLE_KL_PREFETCH (sweep 1 prefetch) and MUSCLE_KL_REVERSE
    (sweep 2 backwards), both off until timed on a GPU."""
    v = os.environ.get(name)
    return default if v is None else v not in ("0", "")


def _resolve_mask(
    mask: Mask, labels: torch.Tensor, v1_ids: torch.Tensor, v1_logprobs: torch.Tensor
) -> tuple[bool, torch.Tensor | None]:
    """-> (mask_is_argmax, int8 (N,) mask or None)."""
    N = labels.shape[0]
    if isinstance(mask, torch.Tensor):
        if mask.shape != (N,):
            raise ValueError(f"mask tensor must have shape ({N},), got {tuple(mask.shape)}")
        return False, mask.to(device=labels.device, dtype=torch.int8).contiguous()
    if mask == "v2c_wrong":
        return True, None
    if mask == "v1_correct":
        # torch.argmax returns the first maximal index: ties -> lowest k, as specified
        k = v1_logprobs.argmax(dim=-1, keepdim=True)
        top1 = v1_ids.gather(-1, k).squeeze(-1).to(labels.dtype)
        return False, (top1 == labels).to(torch.int8).contiguous()
    if mask == "always_v1":
        return False, torch.ones(N, dtype=torch.int8, device=labels.device)
    if mask == "always_v2":
        return False, torch.zeros(N, dtype=torch.int8, device=labels.device)
    raise ValueError(f"unknown mask {mask!r}; expected one of {_MASK_MODES} or a bool tensor")


def masked_kl_forward(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    v1_ids: torch.Tensor,
    v1_logprobs: torch.Tensor,
    v2_ids: torch.Tensor,
    v2_logprobs: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    mask: Mask = DEFAULT_MASK,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    t2_scale: bool = False,
    inplace_backward: bool = True,
    compute_grad: bool = True,
    compute_ce: bool | None = None,
    v1_tail: SampledTail | None = None,
    v2_tail: SampledTail | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Launch the kernel. Returns (loss, grad or None, per-row dict).

    v*_tail: None or the teacher's sampled tail (``muscle.losses.SampledTail``: ids (N, M) int,
    logweights (N, M) float, negent (N,) float), drawn outside that teacher's ids (checked by
    ``muscle.losses``, not here); M = 0 is no tail.

    loss: float32 scalar (no autograd). grad: (N, V) in z's dtype, already the full gradient of
    loss (weights and 1/n_valid applied); it IS ``student_logits`` when ``inplace_backward``.
    per-row dict: kl (N,) f32, ce (N,) f32, mask (N,) bool, valid (N,) bool, n_valid (0-dim).
    """
    z = student_logits
    if z.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"student_logits dtype {z.dtype} not supported (fp32/bf16/fp16)")
    N, V = z.shape
    if labels.shape != (N,):
        raise ValueError(f"labels must be ({N},), got {tuple(labels.shape)}")
    for name, ids, lp in (("v1", v1_ids, v1_logprobs), ("v2", v2_ids, v2_logprobs)):
        if ids.dim() != 2 or ids.shape[0] != N or lp.shape != ids.shape:
            raise ValueError(
                f"{name}_ids / {name}_logprobs must both be (N={N}, K), got "
                f"{tuple(ids.shape)} / {tuple(lp.shape)}"
            )
        if ids.shape[1] < 1 or ids.shape[1] > V:
            raise ValueError(f"{name} K={ids.shape[1]} must be in [1, V={V}]")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{name}_ids must be an integer tensor, got {ids.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    dev = z.device
    if dev.type == "cpu" and not _interpreting():
        raise RuntimeError("masked_kl_triton on CPU tensors needs TRITON_INTERPRET=1")
    for t in (labels, v1_ids, v1_logprobs, v2_ids, v2_logprobs):
        if t.device != dev:
            raise ValueError(f"all inputs must be on {dev}, got a tensor on {t.device}")
    tail1 = _tail_args("v1", v1_tail, N, dev)
    tail2 = _tail_args("v2", v2_tail, N, dev)
    has_tail = tail1[4] > 0 or tail2[4] > 0

    if z.stride(-1) != 1:
        z = z.contiguous()  # then "in place" writes into this copy, not the caller's tensor
    labels = labels.to(torch.int64).contiguous()
    # (N, K) tensors are small next to (N, V): normalise dtypes here, keep the kernel simple.
    ids1 = v1_ids.to(torch.int32).contiguous()
    lp1 = v1_logprobs.detach().to(torch.float32).contiguous()
    ids2 = v2_ids.to(torch.int32).contiguous()
    lp2 = v2_logprobs.detach().to(torch.float32).contiguous()
    mask_argmax, mask_t = _resolve_mask(mask, labels, v1_ids, v1_logprobs)
    if mask_t is None:
        mask_t = torch.zeros(1, dtype=torch.int8, device=dev)  # placeholder pointer

    if compute_ce is None:
        compute_ce = ce_weight > 0
    compute_ce = bool(compute_ce or ce_weight > 0)
    valid = labels != ignore_index
    # The 1 / n_valid of the mean stays on the device (the kernel reads the count): no host
    # sync, so the CPU keeps queueing work ahead of the GPU as in the rest of a training step.
    n_valid = valid.sum()  # () int64
    t2 = temperature * temperature if t2_scale else 1.0
    kl_coef = (1.0 - ce_weight) * t2
    ce_coef = ce_weight

    if compute_grad:
        grad = z if inplace_backward else torch.empty_like(z)
    else:
        grad = z  # never written: COMPUTE_GRAD is a constexpr False
    kl_rows = torch.empty(N, dtype=torch.float32, device=dev)
    ce_rows = torch.empty(N, dtype=torch.float32, device=dev)
    m_rows = torch.empty(N, dtype=torch.int8, device=dev)

    block_v, block_k, block_c, num_warps = _pick_blocks(V, max(ids1.shape[1], ids2.shape[1]))
    evict = _env_flag("MUSCLE_KL_EVICT", True)
    if N > 0:
        _masked_kl_fwd_kernel[(N,)](
            z,
            z.stride(0),
            grad,
            grad.stride(0),
            labels,
            mask_t,
            ids1,
            lp1,
            ids1.stride(0),
            ids1.shape[1],
            ids2,
            lp2,
            ids2.stride(0),
            ids2.shape[1],
            *tail1,
            *tail2,
            kl_rows,
            ce_rows,
            m_rows,
            V,
            ignore_index,
            1.0 / temperature,
            n_valid,
            kl_coef,
            ce_coef,
            _TAIL_EXACT_BELOW,
            MASK_ARGMAX=mask_argmax,
            COMPUTE_CE=compute_ce,
            CE_POW=_ce_pow(temperature),
            CE_GRAD=compute_grad and ce_weight > 0,
            COMPUTE_GRAD=compute_grad,
            HAS_TAIL=has_tail,
            EVICT_SWEEP1="evict_last" if evict else "",
            EVICT_SWEEP2="evict_first" if evict else "",
            PREFETCH=_env_flag("MUSCLE_KL_PREFETCH", False),
            REVERSE_SWEEP2=_env_flag("MUSCLE_KL_REVERSE", False),
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            BLOCK_C=block_c,
            BLOCK_M=max(2, _next_pow2(max(tail1[4], tail2[4]))),
            num_warps=num_warps,
        )
    loss = kl_coef * kl_rows.sum()
    if ce_weight > 0:
        loss = loss + ce_coef * ce_rows.sum()
    loss = loss / n_valid.clamp(min=1)
    mask_rows = (m_rows != 0) & valid
    rows = {
        "kl": kl_rows,
        "ce": ce_rows,
        "mask": mask_rows,
        "valid": valid,
        "n_valid": n_valid,
        # the rows whose selected teacher had a sampled tail
        "sampled": _sampled_rows(m_rows != 0, valid, tail1[4] > 0, tail2[4] > 0),
    }
    return loss, (grad if compute_grad else None), rows


def _has(tail: SampledTail | None) -> bool:
    return tail is not None and tail.ids.shape[1] > 0


def _sampled_rows(to_v1: torch.Tensor, valid: torch.Tensor, has1: bool, has2: bool) -> torch.Tensor:
    """(N,) bool: valid rows whose selected teacher has a sampled tail."""
    out = to_v1 if has1 else torch.zeros_like(to_v1)
    return (out | ~to_v1 if has2 else out) & valid


def _tail_args(name: str, tail: SampledTail | None, N: int, dev: torch.device) -> tuple:
    """Kernel arguments (ids, logweights, negent, stride, M) of one teacher's tail; placeholders
    with M = 0 when it has none (the kernel reads nothing through them then but the negent)."""
    if tail is None or tail.ids.shape[1] == 0:
        dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
        dummy_f = torch.zeros(max(N, 1), dtype=torch.float32, device=dev)
        return dummy_i, dummy_f, dummy_f, 0, 0
    ids, lw, ne = tail.ids, tail.logweights, tail.negent
    if ids.dim() != 2 or ids.shape[0] != N or lw.shape != ids.shape or ne.shape != (N,):
        raise ValueError(
            f"{name}_tail: ids / logweights must both be (N={N}, M) and negent (N,), got "
            f"{tuple(ids.shape)} / {tuple(lw.shape)} / {tuple(ne.shape)}"
        )
    for t in (ids, lw, ne):
        if t.device != dev:
            raise ValueError(f"all inputs must be on {dev}, got a tensor on {t.device}")
    ids = ids.to(torch.int32).contiguous()
    lw = lw.detach().to(torch.float32).contiguous()
    ne = ne.detach().to(torch.float32).contiguous()
    return ids, lw, ne, ids.stride(0), ids.shape[1]


class MaskedKLFunction(torch.autograd.Function):
    """Forward runs the fused kernel and keeps its gradient buffer; backward scales it."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,  # (N, V)
        labels: torch.Tensor,  # (N,)
        v1_ids: torch.Tensor,  # (N, K1)
        v1_lp: torch.Tensor,  # (N, K1)
        v2_ids: torch.Tensor,  # (N, K2)
        v2_lp: torch.Tensor,  # (N, K2)
        mask: Mask,
        opts: dict[str, Any],  # masked_kl_forward's other keyword options
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, grad, rows = masked_kl_forward(
            student_logits, labels, v1_ids, v1_lp, v2_ids, v2_lp, mask=mask, **opts
        )
        # In place, grad aliases the (now overwritten) input: detach so autograd does not
        # track it as a view of a leaf it must version-check.
        ctx.save_for_backward(grad.detach())
        kl, ce, m = rows["kl"], rows["ce"], rows["mask"]
        ctx.mark_non_differentiable(kl, ce, m)
        return loss, kl, ce, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor | None, *_unused) -> tuple:
        (grad,) = ctx.saved_tensors
        if grad_output is not None:
            scale_grad_inplace(grad, grad_output)
        return grad, None, None, None, None, None, None, None


def _run(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    v1_ids: torch.Tensor,
    v1_lp: torch.Tensor,
    v2_ids: torch.Tensor,
    v2_lp: torch.Tensor,
    *,
    mask: Mask,
    compute_ce: bool | None,
    **opts: Any,  # masked_kl_forward's keyword options
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Through the autograd Function when a gradient is wanted, else the launcher alone."""
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if needs_grad:
        opts["compute_ce"] = compute_ce
        loss, kl, ce, m = MaskedKLFunction.apply(
            student_logits, labels, v1_ids, v1_lp, v2_ids, v2_lp, mask, opts
        )
        valid = labels != opts.get("ignore_index", -100)
        rows = {"kl": kl, "ce": ce, "mask": m, "valid": valid, "n_valid": valid.sum()}
        rows["sampled"] = _sampled_rows(m, valid, _has(opts.get("v1_tail")),
                                        _has(opts.get("v2_tail")))  # fmt: skip
        return loss, rows
    # No gradient wanted: never touch the caller's logits.
    loss, _, rows = masked_kl_forward(
        student_logits.detach(),
        labels,
        v1_ids,
        v1_lp,
        v2_ids,
        v2_lp,
        mask=mask,
        compute_grad=False,
        compute_ce=compute_ce,
        **opts,
    )
    return loss, rows


def masked_kl_triton(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    v1_ids: torch.Tensor,
    v1_logprobs: torch.Tensor,
    v2_ids: torch.Tensor,
    v2_logprobs: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    mask: Mask = DEFAULT_MASK,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    t2_scale: bool = False,
    inplace_backward: bool = True,
    v1_tail: SampledTail | None = None,
    v2_tail: SampledTail | None = None,
) -> torch.Tensor:
    """MUSCLE loss: (1-w) mean_i[m_i KL_S(p1||q) + (1-m_i) KL_S(p2||q)] (x T^2) + w mean_i CE_i.

    student_logits (N, V) fp32/bf16/fp16; labels (N,) int; v*_ids (N, K*) int (unique per row);
    v*_logprobs (N, K*) teacher log-probs at temperature T over the full vocabulary. mask:
    "v2c_wrong" | "v1_correct" | "always_v1" | "always_v2" | bool tensor (N,) (True = v1).
    v*_tail: the teacher's sampled tail (``muscle.losses.SampledTail``) or None: its rows then
    take the unbiased full-KL estimate KL_hat instead of KL_S (module docstring).
    Returns a float32 scalar, differentiable w.r.t. student_logits. With
    ``inplace_backward=True`` (default) and a gradient wanted, the logits buffer is overwritten
    by the gradient during the forward: do not read ``student_logits`` afterwards.
    """
    loss, _ = _run(
        student_logits,
        labels,
        v1_ids,
        v1_logprobs,
        v2_ids,
        v2_logprobs,
        mask=mask,
        compute_ce=None,
        temperature=temperature,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
        inplace_backward=inplace_backward,
        v1_tail=v1_tail,
        v2_tail=v2_tail,
    )
    return loss


def masked_kl_triton_with_stats(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    v1_ids: torch.Tensor,
    v1_logprobs: torch.Tensor,
    v2_ids: torch.Tensor,
    v2_logprobs: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    mask: Mask = DEFAULT_MASK,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    t2_scale: bool = False,
    inplace_backward: bool = True,
    v1_tail: SampledTail | None = None,
    v2_tail: SampledTail | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats), the arguments of :func:`masked_kl_triton`: stats are detached 0-dim
    tensors over non-ignored rows: kl (mean KL_S of the selected teacher, times T^2 if
    t2_scale, i.e. as it enters the loss), ce (mean CE at T=1; computed even when ce_weight=0,
    one extra exp per element), frac_v1 (fraction of rows aligned to v1), n_tokens (count,
    int64), frac_sampled (fraction of rows on the sampled-tail estimator)."""
    loss, rows = _run(
        student_logits,
        labels,
        v1_ids,
        v1_logprobs,
        v2_ids,
        v2_logprobs,
        mask=mask,
        compute_ce=True,
        temperature=temperature,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
        inplace_backward=inplace_backward,
        v1_tail=v1_tail,
        v2_tail=v2_tail,
    )
    n = rows["n_valid"]
    denom = n.clamp(min=1).to(torch.float32)
    t2 = temperature * temperature if t2_scale else 1.0
    stats = {
        # as it enters the loss: loss == (1 - ce_weight) * kl + ce_weight * ce
        "kl": (rows["kl"].sum() * t2 / denom).detach(),
        "ce": (rows["ce"].sum() / denom).detach(),
        "frac_v1": (rows["mask"].sum().to(torch.float32) / denom).detach(),
        "n_tokens": n.detach(),
        # tokens whose selected teacher used the sampled-tail estimator (0: all (K+1)-bin)
        "frac_sampled": (rows["sampled"].sum().to(torch.float32) / denom).detach(),
    }
    return loss, stats
