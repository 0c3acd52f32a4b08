"""muscle.fused_head: the LM head fused with the masked KL, against references.

- an independent dense float64 reference written here (logits, log-softmax, (K+1)-bin KL,
  mask, CE, mean; autograd for the gradients of hidden, weight and bias);
- ``masked_kl_with_stats`` on the materialized logits hidden @ weight.T + bias (same impl);
- the Triton path (CUDA, or the interpreter on CPU, set by conftest.py) at small shapes;
- the Hugging Face helpers on tiny Llamas (tied, untied, LoRA on the head) and a tiny
  Gemma-3-shaped model with a vocabulary above 65,536.
Memory is checked by the size of the largest tensor any op creates (a dispatch mode), never by
timing.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from muscle.fused_head import (
    default_fused_chunk_rows,
    final_hidden_at,
    find_lm_head,
    fused_linear_masked_kl,
    fused_linear_masked_kl_with_stats,
    head_inputs,
    probe_fused_head,
)
from muscle.losses import (
    SampledTail,
    masked_kl_with_stats,
    sequence_likelihood_mask,
    token_likelihood_mask,
)
from muscle.masks import STUDENT_MASKS
from tiny import tiny_llama

IGNORE = -100


# ---------------------------------------------------------------------------------------------
# inputs and the independent dense reference


def make_case(n, d, v, k=5, *, dtype=torch.float64, seed=0, bias=True, ignore=(2,), scale=1.0):
    """hidden (n, d), weight (v, d), bias (v,) | None, labels, two top-k teachers (float32)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[list(i for i in ignore if i < n)] = IGNORE

    def teacher():
        lp_full = torch.log_softmax(torch.randn(n, v, generator=g) * 2.0, dim=1)
        lp, ids = lp_full.topk(k, dim=1)
        perm = torch.argsort(torch.rand(n, k, generator=g), dim=1)
        return ids.gather(1, perm), lp.gather(1, perm)

    (i1, l1), (i2, l2) = teacher(), teacher()
    return h, w, b, y, i1, l1, i2, l2


def dense_reference(h, w, b, y, i1, l1, i2, l2, *, temperature=2.0, mask="v2c_wrong",
                    ce_weight=0.0, t2_scale=False, softcap=None):  # fmt: skip
    """The MUSCLE loss (DESIGN.md §4) on dense float64 logits, in plain torch."""
    z = h @ w.T + (b if b is not None else 0.0)  # (N, V)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    n_rows, v = z.shape
    T = temperature
    valid = y != IGNORE
    logq = torch.log_softmax(z / T, dim=1)
    kls = []
    for ids, lp in ((i1, l1), (i2, l2)):
        ids, lp = ids.long(), lp.double()
        p = lp.exp()
        p_tail = (1 - p.sum(1)).clamp(0, 1)
        comp = torch.ones(n_rows, v, dtype=torch.bool).scatter(1, ids, False)
        log_q_tail = torch.logsumexp(torch.where(comp, logq, -math.inf), dim=1)
        head = (p * (lp - logq.gather(1, ids))).sum(1)
        kls.append(head + torch.where(p_tail > 0, p_tail * (p_tail.log() - log_q_tail), 0.0))
    if isinstance(mask, torch.Tensor):
        m = mask
    elif mask == "v2c_wrong":
        m = z.detach().argmax(1) != y
    elif mask == "v1_correct":
        m = i1.gather(1, l1.argmax(1, keepdim=True)).squeeze(1) == y
    else:
        m = torch.full((n_rows,), mask == "always_v1")
    kl = torch.where(m, kls[0], kls[1])
    ce = F.cross_entropy(z, y.masked_fill(~valid, 0), reduction="none")
    cnt = valid.sum().clamp(min=1)
    t2 = T * T if t2_scale else 1.0
    kl_mean = torch.where(valid, kl, 0.0).sum() / cnt * t2
    ce_mean = torch.where(valid, ce, 0.0).sum() / cnt
    return (1 - ce_weight) * kl_mean + ce_weight * ce_mean, kl_mean, ce_mean


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def grads(loss, ts):
    live = [t for t in ts if t is not None]
    got = iter(torch.autograd.grad(loss, live))
    return [None if t is None else next(got) for t in ts]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel(a, b):
    return max_err(a, b) / (b.double().abs().max().item() + 1e-300)


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize(
    "n,v,chunk", [(13, 37, 4), (10, 61, 10), (7, 29, 1), (9, 101, 8)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float64_against_dense_reference(impl, n, v, chunk, bias):
    # N not a multiple of the chunk, odd V, a chunk of 1, a chunk of N; an ignored row.
    h, w, b, y, i1, l1, i2, l2 = make_case(n, 6, v, seed=n + v, bias=bias)
    kw = dict(temperature=2.0, ce_weight=0.25)
    h1, w1, b1 = leaves(h, w, b)
    loss, st = fused_linear_masked_kl_with_stats(
        h1, w1, b1, y, i1, l1, i2, l2, impl=impl, chunk_rows=chunk, **kw
    )
    h2, w2, b2 = leaves(h, w, b)
    ref, ref_kl, ref_ce = dense_reference(h2, w2, b2, y, i1, l1, i2, l2, **kw)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    assert abs(st.kl.item() - ref_kl.item()) <= 1e-12 * max(1.0, abs(ref_kl.item()))
    assert abs(st.ce.item() - ref_ce.item()) <= 1e-12 * max(1.0, abs(ref_ce.item()))
    assert int(st.n_tokens) == int((y != IGNORE).sum())
    for got, want in zip(grads(loss, [h1, w1, b1]), grads(ref, [h2, w2, b2]), strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == torch.float64
        assert rel(got, want) <= 1e-11


def test_tied_head_gradient_from_both_uses():
    # Tied embeddings: the same matrix embeds the tokens and is the head; its gradient is the
    # sum of both paths (autograd adds the fused loss's dW to the embedding's).
    n, d, v = 11, 5, 43
    _, w, _, y, i1, l1, i2, l2 = make_case(n, d, v, seed=3, bias=False)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, v, (n,), generator=g)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)

    def body(emb):  # (N, d): a toy "transformer" reading the embeddings
        return torch.tanh(emb[tokens] @ mix)

    (w1,) = leaves(w)
    loss = fused_linear_masked_kl(body(w1), w1, None, y, i1, l1, i2, l2, chunk_rows=3)
    (w2,) = leaves(w)
    ref, _, _ = dense_reference(body(w2), w2, None, y, i1, l1, i2, l2)
    (gw1,), (gw2,) = grads(loss, [w1]), grads(ref, [w2])
    assert abs(loss.item() - ref.item()) <= 1e-12
    assert rel(gw1, gw2) <= 1e-11
    # and the head path alone is not the whole gradient (the test would notice a missing one)
    (w3,) = leaves(w)
    head_only = fused_linear_masked_kl(body(w3).detach(), w3, None, y, i1, l1, i2, l2)
    (gw3,) = grads(head_only, [w3])
    assert rel(gw3, gw2) > 1e-3


@pytest.mark.parametrize("mask", [*STUDENT_MASKS, "token_ll", "seq_ll"])
@pytest.mark.parametrize("ce_weight,t2", [(0.0, False), (0.4, True), (1.0, False)])
def test_every_mask_against_materialized_masked_kl(mask, ce_weight, t2):
    n, v = 17, 53
    h, w, b, y, i1, l1, i2, l2 = make_case(n, 7, v, seed=11, dtype=torch.float32, ignore=(0, 9))
    if mask in STUDENT_MASKS:
        m = mask
        if mask == "v1_correct":  # make v1's top-1 the label on some rows
            top = i1.gather(1, l1.argmax(1, keepdim=True)).squeeze(1)
            y = torch.where(torch.arange(n) % 3 == 0, top, y)
            y[[0, 9]] = IGNORE
    else:  # the likelihood masks arrive as bool (N,) tensors
        g = torch.Generator().manual_seed(5)
        lp1, lp2 = -torch.rand(n, generator=g) * 5, -torch.rand(n, generator=g) * 5
        if mask == "token_ll":
            m = token_likelihood_mask(lp1, lp2)
        else:
            m = sequence_likelihood_mask(lp1, lp2, torch.arange(n) // 4, y != IGNORE)
        assert 0 < int(m.sum()) < n
    kw = dict(temperature=2.0, mask=m, ce_weight=ce_weight, t2_scale=t2, impl="chunked")
    h1, w1, b1 = leaves(h, w, b)
    loss, st = fused_linear_masked_kl_with_stats(h1, w1, b1, y, i1, l1, i2, l2, chunk_rows=5, **kw)
    h2, w2, b2 = leaves(h, w, b)
    ref, st_ref = masked_kl_with_stats(h2 @ w2.T + b2, y, i1, l1, i2, l2, **kw)
    assert rel(loss, ref) <= 2e-6
    for key in ("kl", "ce", "frac_v1", "frac_sampled"):
        assert abs(float(getattr(st, key)) - float(getattr(st_ref, key))) <= 2e-6 * max(
            1.0, abs(float(getattr(st_ref, key)))
        ), key
    assert int(st.n_tokens) == int(st_ref.n_tokens) == n - 2
    for got, want in zip(grads(loss, [h1, w1, b1]), grads(ref, [h2, w2, b2]), strict=True):
        assert rel(got, want) <= 2e-5
    # the float64 reference agrees too (same mask)
    h3, w3, b3 = (t.double() for t in (h, w, b))
    ref64, _, _ = dense_reference(h3, w3, b3, y, i1, l1, i2, l2, temperature=2.0, mask=m,
                                  ce_weight=ce_weight, t2_scale=t2)  # fmt: skip
    assert abs(loss.item() - ref64.item()) <= 1e-5 * max(1.0, abs(ref64.item()))


def test_ignored_rows_empty_chunks_and_all_ignored():
    n, v = 12, 31
    h, w, b, y, i1, l1, i2, l2 = make_case(n, 4, v, seed=7, ignore=(4, 5, 6, 7, 10))
    h1, w1, b1 = leaves(h, w, b)
    # chunk 4: rows 4..7 are all ignored -> skipped; their hidden gradient is exactly 0
    loss = fused_linear_masked_kl(h1, w1, b1, y, i1, l1, i2, l2, chunk_rows=4)
    gh, gw, gb = grads(loss, [h1, w1, b1])
    assert torch.equal(gh[4:8], torch.zeros_like(gh[4:8])) and torch.equal(gh[10], gh[10] * 0)
    h2, w2, b2 = leaves(h, w, b)
    ref, _, _ = dense_reference(h2, w2, b2, y, i1, l1, i2, l2)
    rh, rw, rb = grads(ref, [h2, w2, b2])
    assert abs(loss.item() - ref.item()) < 1e-12
    assert rel(gh, rh) < 1e-11 and rel(gw, rw) < 1e-11 and rel(gb, rb) < 1e-11
    # every row ignored: loss 0, gradients 0, n_tokens 0 (as masked_kl)
    y_all = torch.full_like(y, IGNORE)
    h3, w3, b3 = leaves(h, w, b)
    loss, st = fused_linear_masked_kl_with_stats(h3, w3, b3, y_all, i1, l1, i2, l2, chunk_rows=5)
    assert loss.item() == 0.0 and int(st.n_tokens) == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads(loss, [h3, w3, b3]))


def test_zero_rows():
    h, w, b, y, i1, l1, i2, l2 = make_case(0, 4, 9, ignore=())
    h1, w1, b1 = leaves(h, w, b)
    loss, st = fused_linear_masked_kl_with_stats(h1, w1, b1, y, i1, l1, i2, l2)
    assert loss.item() == 0.0 and int(st.n_tokens) == 0
    gh, gw, _ = grads(loss, [h1, w1, b1])
    assert gh.shape == (0, 4) and torch.count_nonzero(gw) == 0


def test_frozen_head_grad_output_no_grad_and_defaults():
    h, w, b, y, i1, l1, i2, l2 = make_case(9, 4, 23, seed=2)
    h1 = h.clone().requires_grad_(True)
    # only hidden requires grad (a frozen head: the usual LoRA setup); grad_output 3
    loss = fused_linear_masked_kl(h1, w, b, y, i1, l1, i2, l2, chunk_rows=2, impl="auto")
    (3.0 * loss).backward(retain_graph=True)
    g3 = h1.grad.clone()
    h1.grad = None
    loss.backward()  # a second backward sees the stored gradient unscaled
    assert torch.allclose(g3, 3.0 * h1.grad, rtol=1e-14, atol=0)
    h2 = h.clone().requires_grad_(True)
    ref, _, _ = dense_reference(h2, w, b, y, i1, l1, i2, l2)
    (rh,) = torch.autograd.grad(ref, h2)
    assert rel(h1.grad, rh) < 1e-11
    # under no_grad (evaluation) the value is the same and nothing is differentiable
    with torch.no_grad():
        ev = fused_linear_masked_kl(h1, w, b, y, i1, l1, i2, l2)  # default chunk (<= N)
    assert ev.grad_fn is None and abs(ev.item() - ref.item()) < 1e-12
    assert 1 <= default_fused_chunk_rows(262_144, torch.float32, 5) == 5
    assert default_fused_chunk_rows(262_144, torch.float32) == 128
    assert default_fused_chunk_rows(262_144, torch.bfloat16) == 128  # sized as float32
    assert default_fused_chunk_rows(49_152, torch.float64) == 341
    assert default_fused_chunk_rows(10**9, torch.float32) == 32  # the floor


def test_bfloat16_no_worse_than_materialized_bfloat16():
    # Ground truth: float64 on the same (bf16-rounded) inputs. Yardstick: materialized bf16
    # logits + masked_kl (what the trainer does without fusion). The mask is fixed from the
    # bf16 logits so that a near-tie argmax cannot flip between the three.
    n, d, v = 24, 32, 211
    h, w, b, y, i1, l1, i2, l2 = make_case(n, d, v, seed=21, dtype=torch.bfloat16, scale=2.0)
    m = (h @ w.T + b).argmax(1) != y
    kw = dict(mask=m, ce_weight=0.3)
    h1, w1, b1 = leaves(h, w, b)
    loss = fused_linear_masked_kl(h1, w1, b1, y, i1, l1, i2, l2, chunk_rows=5, **kw)
    got = [loss, *grads(loss, [h1, w1, b1])]
    h2, w2, b2 = leaves(h, w, b)
    yl = masked_kl_with_stats(h2 @ w2.T + b2, y, i1, l1, i2, l2, impl="chunked", **kw)[0]
    yard = [yl, *grads(yl, [h2, w2, b2])]
    h3, w3, b3 = leaves(*(t.double() for t in (h, w, b)))
    tl = dense_reference(h3, w3, b3, y, i1, l1, i2, l2, **kw)[0]
    truth = [tl, *grads(tl, [h3, w3, b3])]
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for name, g_, y_, t_ in zip(("loss", "dh", "dW", "db"), got, yard, truth, strict=True):
        err, yerr = max_err(g_, t_), max_err(y_, t_)
        tol = max(1.5 * yerr, 4e-3 * t_.abs().max().item())
        assert err <= tol, f"{name}: fused err {err:.3g} > {tol:.3g} (materialized {yerr:.3g})"


def test_logit_softcap():
    h, w, b, y, i1, l1, i2, l2 = make_case(10, 5, 41, seed=8, scale=4.0)
    h1, w1, b1 = leaves(h, w, b)
    loss = fused_linear_masked_kl(h1, w1, b1, y, i1, l1, i2, l2, chunk_rows=3, logit_softcap=2.5,
                                  ce_weight=0.2)  # fmt: skip
    h2, w2, b2 = leaves(h, w, b)
    ref, _, _ = dense_reference(h2, w2, b2, y, i1, l1, i2, l2, softcap=2.5, ce_weight=0.2)
    assert abs(loss.item() - ref.item()) < 1e-12
    for got, want in zip(grads(loss, [h1, w1, b1]), grads(ref, [h2, w2, b2]), strict=True):
        assert rel(got, want) < 1e-11
    # the cap matters at this scale (a test that ignored it would fail)
    assert abs(fused_linear_masked_kl(h, w, b, y, i1, l1, i2, l2).item() - ref.item()) > 1e-3


def _tails(i_head, v, m, seed):
    """A valid SampledTail per row: m draws outside the head, some padding, any negent."""
    g = torch.Generator().manual_seed(seed)
    n = i_head.shape[0]
    ids = torch.empty(n, m, dtype=torch.long)
    for r in range(n):
        outside = torch.tensor([j for j in range(v) if j not in set(i_head[r].tolist())])
        ids[r] = outside[torch.randint(0, len(outside), (m,), generator=g)]  # repeats allowed
    lw = torch.log(torch.rand(n, m, generator=g) * 0.05)
    lw[0, -1] = -math.inf  # padding
    negent = -torch.rand(n, generator=g) * 3
    return SampledTail(ids, lw, negent)


@pytest.mark.parametrize("impl", ["chunked", "torch"])
def test_sampled_tails_forwarded_by_row(impl):
    # Per-row teacher extras (here cache format 2's sampled tails) are sliced like the head.
    n, v = 11, 47
    h, w, b, y, i1, l1, i2, l2 = make_case(n, 5, v, seed=9)
    t1, t2 = _tails(i1, v, 6, 1), _tails(i2, v, 4, 2)
    kw = dict(v1_tail=t1, v2_tail=t2, impl=impl, ce_weight=0.1)
    h1, w1, b1 = leaves(h, w, b)
    loss, st = fused_linear_masked_kl_with_stats(h1, w1, b1, y, i1, l1, i2, l2, chunk_rows=4, **kw)
    h2, w2, b2 = leaves(h, w, b)
    ref, st_ref = masked_kl_with_stats(h2 @ w2.T + b2, y, i1, l1, i2, l2, **kw)
    assert float(st.frac_sampled) == float(st_ref.frac_sampled) == 1.0
    assert abs(loss.item() - ref.item()) < 1e-12
    for got, want in zip(grads(loss, [h1, w1, b1]), grads(ref, [h2, w2, b2]), strict=True):
        assert rel(got, want) < 1e-11
    # without the tails the loss is another number (the extras are really used)
    plain = fused_linear_masked_kl(h, w, b, y, i1, l1, i2, l2, impl=impl, ce_weight=0.1)
    assert abs(plain.item() - ref.item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# the Triton path (CUDA, or the interpreter on CPU)


def _triton_devices():
    try:
        from muscle.kernels import triton_available
    except Exception:
        return []
    if not triton_available():
        return []
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _triton_devices() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="needs triton with CUDA or TRITON_INTERPRET=1"))])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_triton_per_chunk_against_reference(device, dtype):
    n, v = 9, 67
    h, w, b, y, i1, l1, i2, l2 = make_case(n, 8, v, seed=13, dtype=dtype)
    on = [t.to(device) for t in (h, w, b, y, i1, l1, i2, l2)]
    m = ((h @ w.T + b).argmax(1) != y).to(device)  # fixed from the dtype's own logits
    kw = dict(mask=m, ce_weight=0.3, temperature=2.0)
    h1, w1, b1 = leaves(*on[:3])
    loss, st = fused_linear_masked_kl_with_stats(h1, w1, b1, *on[3:], impl="triton",
                                                 chunk_rows=4, **kw)  # fmt: skip
    got = [loss, *grads(loss, [h1, w1, b1])]
    h2, w2, b2 = leaves(*on[:3])
    yl = masked_kl_with_stats(h2 @ w2.T + b2, *on[3:], impl="torch", **kw)[0]
    yard = [yl, *grads(yl, [h2, w2, b2])]
    h3, w3, b3 = leaves(*(t.double() for t in (h, w, b)))
    tl = dense_reference(h3, w3, b3, y, i1, l1, i2, l2, mask=m.cpu(), ce_weight=0.3)[0]
    truth = [tl, *grads(tl, [h3, w3, b3])]
    assert int(st.n_tokens) == n - 1
    floor = 2e-5 if dtype == torch.float32 else 4e-3
    for name, g_, y_, t_ in zip(("loss", "dh", "dW", "db"), got, yard, truth, strict=True):
        err, yerr = max_err(g_.cpu(), t_), max_err(y_.cpu(), t_)
        tol = max(2 * yerr, floor * t_.abs().max().item())
        assert err <= tol, f"{name}: triton fused err {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------
# memory: no op creates a tensor with more than chunk x V elements


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel among the outputs of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", ["chunked", "torch"])
def test_no_tensor_larger_than_a_chunk(impl):
    # d is small so that every legitimate (V, d), (N, d) tensor is below chunk x V; the
    # materialized path must exceed it (the detector works), the fused one must not.
    n, d, v, chunk = 96, 4, 101, 8
    h, w, b, y, i1, l1, i2, l2 = make_case(n, d, v, seed=1, dtype=torch.float32)
    h1, w1, b1 = leaves(h, w, b)
    with _LargestTensor() as probe:
        loss = fused_linear_masked_kl(h1, w1, b1, y, i1, l1, i2, l2, chunk_rows=chunk,
                                      impl=impl, ce_weight=0.5)  # fmt: skip
        loss.backward()
    assert probe.largest <= chunk * v, probe.largest
    h2, w2, b2 = leaves(h, w, b)
    with _LargestTensor() as probe2:
        ref = masked_kl_with_stats(h2 @ w2.T + b2, y, i1, l1, i2, l2, impl=impl, ce_weight=0.5)[0]
        ref.backward()
    assert probe2.largest >= n * v
    assert rel(h1.grad, h2.grad) < 1e-5


# ---------------------------------------------------------------------------------------------
# bad input: one clear ValueError each


def test_bad_inputs():
    h, w, b, y, i1, l1, i2, l2 = make_case(6, 4, 19, dtype=torch.float32)
    call = lambda **kw: fused_linear_masked_kl(  # noqa: E731
        kw.pop("h", h), kw.pop("w", w), kw.pop("b", b), kw.pop("y", y), kw.pop("i1", i1), l1,
        kw.pop("i2", i2), l2, **kw,
    )  # fmt: skip
    cases = [
        (dict(chunk_rows=0), "chunk_rows must be a positive int"),
        (dict(chunk_rows=7), "larger than the 6 rows"),
        (dict(h=h.double()), "hidden is torch.float64 but the head weight is torch.float32"),
        (dict(w=w.to("meta")), "hidden is on cpu but the head weight is on meta"),
        (dict(b=b[:-1]), "bias must have shape (19,)"),
        (dict(w=w[:, :3]), "must have shape (V, 4)"),
        (dict(i1=i1 + 19), "the student's head has 19 rows"),
        (dict(i2=torch.full_like(i2, 25)), "v2_ids reach 25"),
        (dict(y=torch.full_like(y, 19)), "outside the head's vocabulary"),
        (dict(logit_softcap=0.0), "logit_softcap must be"),
        (dict(impl="cuda"), "unknown impl"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), "mask tensor must be bool of shape (6,)"),
        (dict(v1_tail=torch.zeros(5, 2)), "v1_tail must have N=6 rows"),
        (dict(v1_tail=SampledTail(i1[:4] + 19, l1[:4], l1[:4, 0])), "v1_tail.ids must have N=6"),
        (dict(v1_tail=SampledTail(i1 + 19, l1, l1[:, 0])), "v1_tail.ids reach"),
        (dict(v1_tail="x"), "per-row teacher argument"),
        (dict(v1_tails=None), "unknown argument 'v1_tails'"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError) as e:
            call(**kw)
        assert msg in str(e.value), (kw, str(e.value))
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Hugging Face models: reaching the head and the final hidden states


def _batch(v, seed=0, b=3, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0  # right padding
    labels = torch.roll(ids, -1, 1)
    labels[:, :3] = IGNORE  # the prompt
    labels[:, -1] = IGNORE
    labels[att == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def _teachers_for(rows, v, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = rows.numel()
    out = []
    for _ in range(2):
        lp, ids = torch.log_softmax(torch.randn(n, v, generator=g) * 3, 1).topk(k, dim=1)
        out += [ids, lp]
    return out


def _untied_llama(v, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _tiny_gemma3(v, softcap=None, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=64, sliding_window=8,
                           final_logit_softcapping=softcap)  # fmt: skip
    return Gemma3ForCausalLM(cfg)


def _fused_vs_materialized(model, v, ce_weight=0.2):
    """Loss and trainable-parameter gradients: fused head vs materialized logits + masked_kl."""
    from muscle.forward import student_logits, valid_rows

    batch = _batch(v)
    rows = valid_rows(batch)
    labels = batch["labels"].reshape(-1)[rows]
    teach = _teachers_for(rows, v)
    params = [p for p in model.parameters() if p.requires_grad]
    assert probe_fused_head(model) is None
    h, head = head_inputs(model, batch, rows)
    assert h.shape == (rows.numel(), head.weight.shape[1])
    loss = fused_linear_masked_kl(h, head.weight, head.bias, labels, *teach, chunk_rows=5,
                                  logit_softcap=head.logit_softcap, ce_weight=ce_weight)  # fmt: skip
    g_fused = torch.autograd.grad(loss, params)
    z = student_logits(model, batch)
    ref = masked_kl_with_stats(z, labels, *teach, ce_weight=ce_weight)[0]
    g_ref = torch.autograd.grad(ref, params)
    assert rel(loss, ref) < 1e-5
    worst = max(rel(a, b) for a, b in zip(g_fused, g_ref, strict=True))
    assert worst < 1e-4, worst
    return head


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_full_finetune_tied_and_untied(tied):
    v = 97
    model = tiny_llama(v, hidden=32) if tied else _untied_llama(v)
    head, why = find_lm_head(model)
    assert why == "" and head.kind == "linear"
    assert (head.weight is model.model.embed_tokens.weight) == tied
    _fused_vs_materialized(model, v)  # every weight trains: the head's gradient included


def test_llama_peft_lora_body_and_lora_head():
    from peft import LoraConfig, get_peft_model

    v = 89
    model = get_peft_model(tiny_llama(v, hidden=32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj", "lm_head"]))  # fmt: skip
    with torch.no_grad():  # B = 0 at init would hide a wrong fold
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    head = _fused_vs_materialized(model, v)
    assert head.kind == "lora-folded"
    # dropout on the head's LoRA while training cannot be folded: a reason, not a wrong loss
    drop = get_peft_model(tiny_llama(v, hidden=32),
                          LoraConfig(r=4, lora_dropout=0.1, target_modules=["lm_head"]))  # fmt: skip
    drop.train()
    assert find_lm_head(drop)[0] is None and "dropout" in probe_fused_head(drop)
    drop.eval()
    assert probe_fused_head(drop) is None


def test_gemma3_large_vocabulary_with_and_without_softcap():
    v = 70_000  # above 65,536: ids no longer fit uint16
    for cap in (None, 30.0):
        model = _tiny_gemma3(v, softcap=cap)
        head = _fused_vs_materialized(model, v)
        assert head.logit_softcap == cap and head.weight.shape == (v, 32)


def test_unreachable_heads_say_why():
    v = 50
    model = tiny_llama(v, hidden=32)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, v, bias=False))  # a custom head
    head, why = find_lm_head(model)
    assert head is None and "not a torch.nn.Linear" in why and "Sequential" in why

    class Scaled(type(tiny_llama(v, hidden=32))):  # logits scaled after the head
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits * 2.0
            return out

    scaled = Scaled(tiny_llama(v, hidden=32).config)
    why = probe_fused_head(scaled)
    assert why is not None and "not the head applied to its last hidden state" in why


def test_final_hidden_at_rows_are_the_heads_input():
    from muscle.forward import student_logits, valid_rows

    v = 61
    model = _untied_llama(v, seed=3)
    batch = _batch(v, seed=4)
    rows = valid_rows(batch)
    with torch.no_grad():
        h = final_hidden_at(model, batch, rows)
        z = student_logits(model, batch)
    assert torch.allclose(model.lm_head(h), z, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the prepared GPU script and its benchmark, checked without a GPU


def test_gpu_script_dry_run_lists_every_stage(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for script in ("run_gpu.sh", "run_gpu_fused.sh"):
        assert subprocess.run(["bash", "-n", str(repo / "benchmarks" / script)]).returncode == 0
    r = subprocess.run(
        ["bash", str(repo / "benchmarks" / "run_gpu_fused.sh")],
        env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    for stage in ("kernel", "fused_tests", "bench", "smoke"):
        assert f"stage {stage} (limit" in r.stdout
    assert "bench_fused_head_gpu.py" in r.stdout and "gpu_smoke.py --device cuda" in r.stdout


def test_gpu_benchmark_plumbing_on_cpu(tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "fused.csv"
    r = subprocess.run(
        [sys.executable, "bench_fused_head_gpu.py", "--smoke", "--device", "cpu", "--out",
         str(out), "--providers", "materialized,fused,cce", "--weight-grad", "1"],
        cwd=repo / "benchmarks", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert [x["provider"] for x in rows] == ["materialized", "fused", "fused", "cce"]
    for x in rows[:3]:
        assert float(x["ms_median"]) > 0 and x["note"] == ""
        assert float(x["max_rel_diff"]) < 2e-2  # bf16: fused vs materialized, one rounding
    assert rows[3]["note"] or float(rows[3]["ms_median"]) > 0  # absent here: a reason
