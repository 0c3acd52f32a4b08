"""The LM head fused with the MUSCLE loss: the student's (N, V) logits never exist whole.

:func:`fused_linear_masked_kl_with_stats` takes the student's final hidden states h (N, d) and
the LM head's weight W (V, d) (and bias b (V,) if any) and returns exactly what
:func:`muscle.losses.masked_kl_with_stats` returns on the materialized logits z = h W^T + b,
forward and backward, while only ever holding the logits of one chunk of rows (C, V):

    for each chunk c of C rows (skipped if none of its rows has a label):
        z_c  = h_c W^T + b                           (C, V)
        L_c, g_c = masked_kl_with_stats(z_c, ...)    mean over the chunk's n_c valid rows,
                                                     g_c = dL_c / dz_c (closed form or kernel)
        w_c  = n_c / n                               (n = valid rows of the whole batch)
        dL/dh_c += w_c g_c W;  dL/dW += w_c g_c^T h_c;  dL/db += w_c sum_rows g_c
    L = sum_c w_c L_c

The gradients are accumulated during the forward (the approach of Liger-Kernel's fused linear
losses), so backward only scales them by grad_output. Every row-local part of the loss is
unchanged by chunking: the teachers' rows, a bool mask's rows, the student's argmax (mask
"v2c_wrong") and v1's top-1 ("v1_correct") are all per row; only the mean's denominator spans
chunks, hence the weights w_c. The stats (kl, ce, frac_v1, frac_sampled) are the same
n_c-weighted means and equal the unchunked ones up to rounding; n_tokens is the sum.

Which loss implementation runs on each chunk is ``impl``, as in ``masked_kl``: "chunked" (the
closed-form CPU sweep), "triton" (the fused kernel of ``muscle.kernels``, writing the gradient
into the chunk's logits buffer in place, as Liger's fused linear losses do), "torch" (autograd,
the reference) or "auto" (triton for CUDA tensors when it is available, else chunked).

Compute dtype (decided here): the chunk's logits are h_c W^T in the inputs' dtype, exactly what
``lm_head`` itself returns, so bfloat16 training sees the logits it would see without fusion;
the loss then works in float32 (float64 for float64 inputs), as ``masked_kl`` does, and its
gradient g_c comes back in the logits' dtype. dL/dh and dL/db are formed in the inputs' dtype
with the chunk weight applied inside the matmul (one rounding); dL/dW is accumulated over the
chunks in float32 (float64 for float64) and cast once at the end, so that many chunks do not
add bfloat16 roundings that one materialized matmul would not.

Memory beyond the inputs and the gradients themselves: the chunk's logits (C, V) (one buffer,
reused by every chunk), its gradient (C, V) (the same buffer on the triton path; a fresh one
per chunk from the chunked loss) and the chunked loss's own small scratch; plus, when
the weight needs a gradient and is not float32/float64, a float32 copy of g_c (C, V) and a
float32 accumulator (V, d); plus one (C, V) buffer with a logit soft-cap. Nothing scales with
N x V. The default chunk (:func:`default_fused_chunk_rows`) keeps one (C, V) buffer near
``_CHUNK_BYTES``.

Per-row teacher extras (e.g. ``v1_tail=SampledTail(...)`` for cache format 2) are forwarded to
``masked_kl_with_stats`` sliced by row like the head: any keyword argument that is None, a
tensor with N rows, or a dataclass whose tensor fields all have N rows, so new per-row teacher
arguments work here the moment the loss accepts them.

The other half of the module reaches into a Hugging Face causal LM for the two inputs:
:func:`find_lm_head` (the head's tensors, LoRA folded, soft-cap; or a reason it cannot),
:func:`probe_fused_head` (once per model: is the last hidden state really the head's input?)
and :func:`final_hidden_at` (the final hidden states at the labelled rows, through whatever
wrapper: DDP, DeepSpeed, PEFT).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from muscle.losses import IMPLS, LossStats, masked_kl_with_stats

# One (C, V) buffer of the default chunk takes about this many bytes (see default_fused_chunk_rows).
_CHUNK_BYTES = 128 * 2**20
# Fewer rows than this make the per-chunk matmuls re-read W for too little work.
_MIN_CHUNK_ROWS = 32


# ----------------------------------------------------------------------------------------------
# the fused loss


def fused_linear_masked_kl(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    v1_ids: Tensor,
    v1_logprobs: Tensor,
    v2_ids: Tensor,
    v2_logprobs: Tensor,
    **kwargs,
) -> Tensor:
    """The loss of :func:`fused_linear_masked_kl_with_stats`, without the stats."""
    loss, _ = fused_linear_masked_kl_with_stats(
        hidden, weight, bias, labels, v1_ids, v1_logprobs, v2_ids, v2_logprobs, **kwargs
    )
    return loss


def fused_linear_masked_kl_with_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
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
    logit_softcap: float | None = None,
    **teacher_rows,
) -> tuple[Tensor, LossStats]:
    """``masked_kl_with_stats(hidden @ weight.T + bias, ...)`` without the (N, V) logits.

    hidden (N, d) float: the student's final hidden states at the labelled positions; weight
    (V, d) and bias (V,) or None: the LM head, same dtype and device as hidden. Gradients flow to
    each of the three that requires one (a tied or LoRA-folded head weight included).
    labels (N,) int; v*_ids / v*_logprobs (N, K*): as in ``masked_kl``; ``mask``: a name of
    ``muscle.masks.STUDENT_MASKS`` or a bool (N,) tensor (the likelihood masks).
    ``chunk_rows``: rows of logits held at a time, in [1, N]; None = :func:`default_fused_chunk_rows`
    (at most N). ``logit_softcap``: c > 0 for models whose logits are c tanh(z / c) (Gemma 2;
    Gemma 3 configs may set it). ``teacher_rows``: further per-row teacher arguments of
    ``masked_kl_with_stats`` (e.g. ``v1_tail``, ``v2_tail``), sliced by row per chunk.
    Returns (loss 0-d, :class:`muscle.losses.LossStats`), as ``masked_kl_with_stats``.
    """
    n, v = _validate(
        hidden, weight, bias, labels, v1_ids, v2_ids, mask, ignore_index, impl, chunk_rows,
        logit_softcap, teacher_rows,
    )  # fmt: skip
    if chunk_rows is None:
        chunk_rows = default_fused_chunk_rows(v, hidden.dtype, n)
    grad_on = torch.is_grad_enabled()
    spec = _Spec(
        labels=labels,
        teachers=(v1_ids, v1_logprobs, v2_ids, v2_logprobs),
        mask=mask.to(labels.device) if isinstance(mask, Tensor) else mask,
        extras=teacher_rows,
        loss_kw={
            "temperature": temperature,
            "ce_weight": ce_weight,
            "ignore_index": ignore_index,
            "impl": impl,
            "t2_scale": t2_scale,
        },
        chunk_rows=int(chunk_rows),
        softcap=None if logit_softcap is None else float(logit_softcap),
        want=(
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
        ),
    )
    loss, kl, ce, frac, n_tok, frac_s = _FusedLinearMaskedKL.apply(hidden, weight, bias, spec)
    return loss, LossStats(kl=kl, ce=ce, frac_v1=frac, n_tokens=n_tok, frac_sampled=frac_s)


def default_fused_chunk_rows(vocab: int, dtype: torch.dtype, n_rows: int | None = None) -> int:
    """Rows per chunk so that one (C, V) float32 buffer takes about 128 MiB (at least 32 rows,
    at most ``n_rows``): 128 rows at V = 262,144, 682 at V = 49,152 (sized as float32 whatever
    the dtype, since the loss works in float32).

    A trade-off measured in benchmarks/bench_fused_head.py: every chunk reads all of W twice
    (h_c W^T, then g_c W), so fewer rows per chunk cost time (on the 2-core CPU, V = 262,144:
    16 rows took about twice as long as 256); more rows cost memory (about 2-3 (C, V) buffers
    live at once).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (max(itemsize, 4) * max(vocab, 1)))
    if n_rows is not None:
        rows = min(rows, max(n_rows, 1))
    return rows


@dataclass
class _Spec:
    """Everything the autograd Function needs besides its three differentiable inputs."""

    labels: Tensor  # (N,)
    teachers: tuple[Tensor, Tensor, Tensor, Tensor]  # v1_ids, v1_lp, v2_ids, v2_lp (N, K*)
    mask: str | Tensor  # name or (N,) bool
    extras: dict  # per-row teacher arguments, sliced by row
    loss_kw: dict  # scalar options of masked_kl_with_stats
    chunk_rows: int
    softcap: float | None
    want: tuple[bool, bool, bool]  # gradient wanted for hidden, weight, bias


class _FusedLinearMaskedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, spec: _Spec):
        n_rows = hidden.shape[0]
        dev = hidden.device
        cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        want_h, want_w, want_b = spec.want
        any_grad = want_h or want_w or want_b
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros_like(hidden) if want_h else None  # (N, d); skipped chunks stay 0
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=dev) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=dev) if want_b else None

        valid = spec.labels != spec.loss_kw["ignore_index"]  # (N,)
        rows = spec.chunk_rows
        starts = list(range(0, n_rows, rows))
        # valid rows per chunk, in one host read (a chunk without any is skipped)
        counts = _chunk_counts(valid, rows, len(starts))
        n_total = sum(counts)
        # the n_c-weighted means, accumulated in float64
        acc = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, kl, ce, frac_v1, frac_s
        w_t = weight.t()  # (d, V) view
        # One (C, V) logits buffer for every chunk: its pages are touched once, not per chunk.
        # Each chunk's loss and gradient are finished before the next chunk overwrites it.
        z_buf = None
        for lo, n_c in zip(starts, counts, strict=True):
            if n_c == 0:
                continue
            sl = slice(lo, min(lo + rows, n_rows))
            w_c = n_c / n_total  # this chunk's share of the mean
            h_c = hidden[sl]  # (C, d)
            if z_buf is None:
                z_buf = torch.empty(min(rows, n_rows), weight.shape[0], dtype=hidden.dtype,
                                    device=dev)  # fmt: skip
            # (C, V) logits in the inputs' dtype: what lm_head would return. detach(): a leaf
            # of its own (not a view) that may require grad below.
            z = z_buf[: h_c.shape[0]].detach()
            if bias is not None:
                torch.addmm(bias, h_c, w_t, out=z)
            else:
                torch.mm(h_c, w_t, out=z)
            dcap = None  # (C, V) d(softcapped)/d(raw), when soft-capping
            if spec.softcap is not None:
                z.div_(spec.softcap).tanh_()  # t = tanh(z / c), as the model computes it
                if any_grad:
                    dcap = torch.mul(z, z).neg_().add_(1.0)  # 1 - t^2, from the same t
                z.mul_(spec.softcap)
            args = _chunk_args(spec, sl)
            if any_grad:
                with torch.enable_grad():
                    z.requires_grad_(True)
                    loss_c, st = masked_kl_with_stats(z, *args[0], **args[1])
                    # the chunk's gradient; on the triton path it is z's own buffer
                    (g,) = torch.autograd.grad(loss_c, z)
                loss_c = loss_c.detach()
                del z
                if dcap is not None:
                    g = g.mul_(dcap) if g.dtype == dcap.dtype else g * dcap
                    del dcap
                if want_h:
                    grad_h[sl].addmm_(g, weight, alpha=w_c)  # (C, d), weight inside the matmul
                if want_w:
                    g_acc = g if g.dtype == acc_dtype else g.to(acc_dtype)  # (C, V)
                    h_acc = h_c if h_c.dtype == acc_dtype else h_c.to(acc_dtype)  # (C, d)
                    grad_w.addmm_(g_acc.t(), h_acc, alpha=w_c)  # (V, d)
                    del g_acc
                if want_b:
                    grad_b.add_(g.sum(0, dtype=acc_dtype), alpha=w_c)  # (V,)
                del g
            else:
                loss_c, st = masked_kl_with_stats(z, *args[0], **args[1])
                del z
            parts = (loss_c, st.kl, st.ce, st.frac_v1, st.frac_sampled)
            acc.add_(torch.stack([p.to(torch.float64) for p in parts]), alpha=w_c)

        loss, kl, ce, frac, frac_s = acc.to(cd).unbind()
        n_tok = torch.tensor(n_total, dtype=torch.int64, device=dev)
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(kl, ce, frac, n_tok, frac_s)
        return loss, kl, ce, frac, n_tok, frac_s

    @staticmethod
    def backward(ctx, grad_loss, *_):
        # The gradients were formed in forward; they stay in ctx so that a second backward
        # (retain_graph, gradcheck) sees them unscaled.
        scale = not (grad_loss.numel() == 1 and float(grad_loss) == 1.0)
        out = tuple(
            None if g is None else (g * grad_loss.to(g.dtype) if scale else g) for g in ctx.grads
        )
        return (*out, None)


def _chunk_counts(valid: Tensor, rows: int, n_chunks: int) -> list[int]:
    """Valid rows in each chunk of ``rows`` rows (the last may be short), one host read."""
    n = valid.shape[0]
    if n == 0:
        return []
    pad = n_chunks * rows - n
    v = valid.to(torch.int64)
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return v.view(n_chunks, rows).sum(1).tolist()


def _chunk_args(spec: _Spec, sl: slice) -> tuple[tuple, dict]:
    """Positional and keyword arguments of masked_kl_with_stats for the rows ``sl``."""
    pos = (spec.labels[sl], *(t[sl] for t in spec.teachers))
    kw = dict(spec.loss_kw)
    kw["mask"] = spec.mask[sl] if isinstance(spec.mask, Tensor) else spec.mask
    kw.update({k: _rows_of(val, sl) for k, val in spec.extras.items()})
    return pos, kw


def _rows_of(value, sl: slice):
    """The rows ``sl`` of a per-row argument: a tensor, a dataclass of them, or None."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[sl]
    changes = {
        f.name: getattr(value, f.name)[sl]
        for f in dataclasses.fields(value)
        if isinstance(getattr(value, f.name), Tensor)
    }
    return dataclasses.replace(value, **changes)


# ----------------------------------------------------------------------------------------------
# validation


def _validate(
    h, w, b, labels, ids1, ids2, mask, ignore_index, impl, chunk_rows, softcap, extras
) -> tuple[int, int]:
    """Shapes, dtypes, devices and ranges; the rest is checked by masked_kl_with_stats."""
    if not isinstance(h, Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError("hidden must be a float tensor of shape (N, d)")
    n, d = h.shape
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != d:
        raise ValueError(
            f"the head weight must have shape (V, {d}) to match hidden (N, {d}), "
            f"got {tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}"
        )
    v = w.shape[0]
    if w.dtype != h.dtype:
        raise ValueError(
            f"hidden is {h.dtype} but the head weight is {w.dtype}: cast one to the other "
            "(the logits are computed in the inputs' dtype)"
        )
    if w.device != h.device:
        raise ValueError(
            f"hidden is on {h.device} but the head weight is on {w.device}: move them together"
        )
    if b is not None:
        if not isinstance(b, Tensor) or b.shape != (v,):
            raise ValueError(f"the head bias must have shape ({v},) or be None")
        if b.dtype != h.dtype or b.device != h.device:
            raise ValueError(
                f"the head bias is {b.dtype} on {b.device}, hidden is {h.dtype} on {h.device}: "
                "give all three the same dtype and device"
            )
    if not isinstance(labels, Tensor) or labels.shape != (n,):
        raise ValueError(f"labels must be an int tensor of shape ({n},)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an int tensor, got {labels.dtype}")
    real = labels[labels != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= v):
        raise ValueError(
            f"labels reach {int(real.max())}, outside the head's vocabulary [0, {v}): the data "
            "was tokenized for another model"
        )
    for name, ids in (("v1_ids", ids1), ("v2_ids", ids2)):
        _check_vocab(name, ids, v)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        if n and chunk_rows > n:
            raise ValueError(
                f"chunk_rows={chunk_rows} is larger than the {n} rows given: pass at most {n}, "
                "or None for the default"
            )
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"logit_softcap must be a finite number > 0 or None, got {softcap!r}")
    if isinstance(mask, Tensor) and mask.shape != (n,):
        raise ValueError(f"a mask tensor must be bool of shape ({n},), got {tuple(mask.shape)}")
    known = _per_row_params()
    for name, val in extras.items():
        if name not in known:
            raise ValueError(
                f"unknown argument {name!r}: masked_kl_with_stats takes no such keyword "
                f"(per-row teacher arguments it takes: {', '.join(sorted(known)) or 'none'})"
            )
        _check_rows(name, val, n, v)
    return n, v


def _per_row_params() -> set[str]:
    """Keywords of masked_kl_with_stats that this module does not name itself: the per-row
    teacher arguments (``v1_tail``, ``v2_tail`` today), read from its signature so that new
    ones are forwarded without a change here."""
    own = {"temperature", "mask", "ce_weight", "ignore_index", "impl", "t2_scale", "chunk_rows"}
    params = inspect.signature(masked_kl_with_stats).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in own}


def _check_vocab(name: str, ids, v: int) -> None:
    if isinstance(ids, Tensor) and ids.numel() and not ids.is_floating_point():
        top = int(ids.max())
        if top >= v:
            raise ValueError(
                f"{name} reach {top} but the student's head has {v} rows: the teachers (cache) "
                "were built with a larger vocabulary than this model's; rebuild them for it"
            )


def _check_rows(name: str, val, n: int, v: int) -> None:
    """A per-row teacher extra: None, a tensor with n rows, or a dataclass of such tensors."""
    if val is None:
        return
    if isinstance(val, Tensor):
        parts = {name: val}
    elif dataclasses.is_dataclass(val) and not isinstance(val, type):
        parts = {
            f"{name}.{f.name}": getattr(val, f.name)
            for f in dataclasses.fields(val)
            if isinstance(getattr(val, f.name), Tensor)
        }
    else:
        raise ValueError(
            f"{name}: a per-row teacher argument must be None, a tensor or a dataclass of "
            f"tensors with N={n} rows, got {type(val).__name__}"
        )
    for key, t in parts.items():
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"{key} must have N={n} rows, got shape {tuple(t.shape)}")
        if key.endswith("ids"):
            _check_vocab(key, t, v)


# ----------------------------------------------------------------------------------------------
# reaching a Hugging Face causal LM's head and final hidden states


@dataclass(frozen=True)
class LMHead:
    """A causal LM's head as the fused loss takes it: logits = softcap(hidden @ weight.T + bias).

    ``weight`` is the module's own parameter for a plain ``nn.Linear`` head (tied to the input
    embeddings or not), or, for a head carrying a vanilla LoRA, the folded W + sum_a s_a B_a A_a
    (a fresh tensor each call, differentiable in A and B, in the base weight's dtype).
    """

    weight: Tensor  # (V, d)
    bias: Tensor | None  # (V,)
    logit_softcap: float | None  # c of c tanh(z / c), or None
    kind: str  # "linear" | "lora-folded" | "lora-merged-or-disabled"


def find_lm_head(model) -> tuple[LMHead | None, str]:
    """The head of ``model`` (plain, PEFT-, DDP- or DeepSpeed-wrapped): (LMHead, "") or
    (None, why not). Structural only: :func:`probe_fused_head` also checks, on a real forward,
    that the final hidden state through this head gives the model's logits.

    Reached: ``get_output_embeddings()`` that is exactly a ``torch.nn.Linear``, or a PEFT LoRA
    ``Linear`` on one whose active adapters are vanilla LoRA without dropout in training (folded:
    W + s B A, so A and B get their gradients through the fused loss). Not reached (the caller
    falls back to materialized logits): no output embeddings, any other module type (quantized
    or custom heads, DoRA and other LoRA variants, fan_in_fan_out), LoRA dropout > 0 while
    training, a LoRA bias.
    """
    from muscle.forward import unwrap_model

    base = unwrap_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None, f"{type(base).__name__} exposes no LM head (get_output_embeddings() is None)"
    cap = _softcap_of(base)
    if type(head) is torch.nn.Linear:
        return LMHead(head.weight, head.bias, cap, "linear"), ""
    lora = _lora_fold(head)
    if isinstance(lora, str):
        return None, lora
    if lora is not None:
        w, b, kind = lora
        return LMHead(w, b, cap, kind), ""
    return None, (
        f"the LM head of {type(base).__name__} is a {type(head).__module__}."
        f"{type(head).__name__}, not a torch.nn.Linear (or a vanilla LoRA on one)"
    )


def _softcap_of(base) -> float | None:
    cfg = getattr(base, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    cap = getattr(cfg, "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def _lora_fold(head):
    """(weight, bias, kind) for a PEFT LoRA Linear head; a reason string when it cannot be
    folded exactly; None when ``head`` is not a LoRA layer at all."""
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # peft absent: no LoRA heads either
        return None
    if not isinstance(head, LoraLayer):
        return None
    base_layer = head.get_base_layer()
    if type(base_layer) is not torch.nn.Linear or getattr(head, "fan_in_fan_out", False):
        return f"the LM head is a LoRA on a {type(base_layer).__name__} (fan_in_fan_out or not a Linear)"
    w, b = base_layer.weight, base_layer.bias
    # forward() runs the base layer alone when adapters are disabled or merged into it
    if head.disable_adapters or head.merged:
        return w, b, "lora-merged-or-disabled"
    delta = None
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}):
            return f"the LM head's LoRA adapter {name!r} is a variant (e.g. DoRA): not folded"
        drop = head.lora_dropout[name]
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and drop.training:
            return (
                f"the LM head's LoRA adapter {name!r} has dropout {drop.p} in training: "
                "W + s B A would not be the same function"
            )
        a, bmat = head.lora_A[name], head.lora_B[name]
        if getattr(bmat, "bias", None) is not None:
            return f"the LM head's LoRA adapter {name!r} has a bias (lora_bias): not folded"
        # (V, r) @ (r, d) in the adapter's dtype, as its forward computes B(A(x))
        d = (bmat.weight @ a.weight) * head.scaling[name]
        delta = d if delta is None else delta + d
    if delta is None:
        return w, b, "lora-merged-or-disabled"
    return (w.to(delta.dtype) + delta).to(w.dtype), b, "lora-folded"


def final_hidden_at(model, batch: dict, rows: Tensor) -> Tensor:
    """The final hidden states (the LM head's input) at the flat positions ``rows``. (n, d)

    One forward through ``model`` itself (so DDP, DeepSpeed and PEFT wrappers see it), asking
    for the hidden states and the logits of the last position only (``logits_to_keep=1``: a
    (B, 1, V) buffer instead of (n, V)). transformers returns the final, normalised
    ``last_hidden_state`` as ``hidden_states[-1]``; :func:`probe_fused_head` checks that once
    per model. The other layers' hidden states it returns are the tensors autograd keeps for
    the backward anyway (checkpoint boundaries under gradient checkpointing).
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
    )
    h = out.hidden_states[-1]  # (B, T, d)
    return h.reshape(-1, h.shape[-1]).index_select(0, rows)


def head_inputs(model, batch: dict, rows: Tensor) -> tuple[Tensor, LMHead]:
    """(hidden (n, d) at ``rows``, the model's :class:`LMHead`) for one training step.

    Call :func:`probe_fused_head` once first; this raises ValueError if the head is not
    reachable (the caller should have fallen back to materialized logits).
    """
    head, why = find_lm_head(model)
    if head is None:
        raise ValueError(f"fused LM head not available: {why}")
    return final_hidden_at(model, batch, rows), head


def probe_fused_head(model) -> str | None:
    """None if the fused loss reproduces ``model``'s logits, else the reason (one line).

    Runs :func:`find_lm_head`, then one no-grad forward of three tokens as
    :func:`final_hidden_at` runs it and compares the head applied to ``hidden_states[-1]`` at
    the last position with the model's own logits there. This catches models whose logits are
    not softcap(h W^T + b) of the last hidden state (a logit scale, a hidden state taken before
    the final norm, a forward that does not take ``logits_to_keep``). Call once per model; the
    model's train/eval mode is left as it was.
    """
    head, why = find_lm_head(model)
    if head is None:
        return why
    w = head.weight
    v = w.shape[0]
    ids = (torch.arange(3, device=w.device) % v)[None]  # (1, 3)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inner = model
    while hasattr(inner, "module"):  # DDP / DeepSpeed: no gradient bookkeeping for a probe
        inner = inner.module
    try:
        with torch.no_grad():
            out = inner(**batch, output_hidden_states=True, logits_to_keep=1)
            hs, logits = getattr(out, "hidden_states", None), getattr(out, "logits", None)
            if not hs or logits is None or tuple(logits.shape[-2:]) != (1, v):
                return (
                    f"{type(inner).__name__}'s forward gave no hidden states or not (B, 1, {v}) "
                    "logits for output_hidden_states=True, logits_to_keep=1"
                )
            h = hs[-1][:, -1]  # (1, d)
            if h.dtype != w.dtype or h.shape[-1] != w.shape[1]:
                return (
                    f"the last hidden state is {h.dtype} (*, {h.shape[-1]}), the head "
                    f"{w.dtype} {tuple(w.shape)}"
                )
            z = torch.nn.functional.linear(h, w, head.bias)
            if head.logit_softcap is not None:
                z = torch.tanh(z / head.logit_softcap) * head.logit_softcap
            ref = logits[:, -1].to(z.dtype)
    except (TypeError, ValueError) as e:  # no such arguments
        return (
            f"{type(inner).__name__}'s forward rejects output_hidden_states / logits_to_keep: {e}"
        )
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    err = float((z - ref).abs().max())
    if not err <= tol * (1.0 + float(ref.abs().max())):
        return (
            f"{type(inner).__name__}'s logits are not the head applied to its last hidden state "
            f"(max difference {err:.3g}): a logit scale or another final transform"
        )
    return None
