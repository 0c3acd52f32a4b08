"""Fused masked top-K KL distillation loss (MUSCLE, DESIGN §4-5) in Triton.

Layering, as in Liger-Kernel: ``_masked_kl_fwd_kernel`` (jit, one program per row, in
``masked_kl_kernel.py``) -> ``masked_kl_forward`` (launcher: validation, block sizes,
allocation) -> ``MaskedKLFunction`` (autograd; the forward computes the gradient, backward only
scales it, with ``_scale_rows_kernel``) -> ``masked_kl_triton`` /
``masked_kl_triton_with_stats`` (the entry points ``muscle.losses`` calls through
``muscle.kernels``). This module holds every rung but the jit code.

The row is read twice and written once (three times read in the rare exact-tail case). The
gradient goes into the logits buffer itself by default (``inplace_backward=True``, as Liger's
cross-entropy does): the caller's logits tensor is overwritten, so do not reuse it after the
call. Accumulation is float32 for every input dtype; the gradient is stored in z's dtype.
Neither forward nor backward synchronizes with the host: the mean's 1 / n_valid is read by the
kernel from a device tensor, and backward's "is grad_output 1?" is decided on the device.

The kernel's algorithm, its sampled-tail variant and its assumptions on the inputs are
described in ``masked_kl_kernel.py``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from muscle.config import DEFAULT_TEMPERATURE
from muscle.kernels.masked_kl_kernel import _masked_kl_fwd_kernel, _scale_rows_kernel
from muscle.masks import DEFAULT_MASK, STUDENT_MASKS

if TYPE_CHECKING:
    from muscle.losses import SampledTail

# Which teacher each row distils from: a mask name of muscle.masks (STUDENT_MASKS) or a bool
# tensor (N,), True = v1.
Mask = str | torch.Tensor

# 1 - sum_S q below this -> compute log q_tail exactly over the complement (masked_kl_kernel.py).
_TAIL_EXACT_BELOW = 2.0**-10

_MASK_MODES = tuple(STUDENT_MASKS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
