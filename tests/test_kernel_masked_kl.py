"""muscle.kernels.masked_kl_triton against an independent dense float64 reference.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by conftest.py before any
@triton.jit module is imported). The interpreter is slow per loop iteration: shapes are small.
Tolerances are "no worse than plain torch in the same dtype vs float64 ground truth": each check
also evaluates the dense reference in the input's dtype (the yardstick) and allows the kernel
twice the yardstick's error, or a small per-dtype floor, whichever is larger.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from muscle.kernels import (  # noqa: E402
    masked_kl_triton,
    masked_kl_triton_with_stats,
    triton_available,
)

if torch.cuda.is_available():
    DEVICES = ["cuda"]
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICES = ["cpu"]
else:  # pragma: no cover - conftest sets TRITON_INTERPRET when CUDA is absent
    DEVICES = []
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICES = DEVICES or ["cpu"]

# relative floor (of max |truth|) per dtype: the rounding of the inputs' own dtype
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Independent dense reference (autograd for the gradient), in any dtype.
# ---------------------------------------------------------------------------------------------
def reference_loss(
    z,
    labels,
    i1,
    l1,
    i2,
    l2,
    *,
    temperature=2.0,
    mask="v2c_wrong",
    ce_weight=0.0,
    ignore_index=-100,
    t2_scale=False,
    dtype=torch.float64,
    v1_tail=None,
    v2_tail=None,
):
    """Dense MUSCLE loss in `dtype`; z must be a leaf of that dtype (requires_grad).

    A teacher with a tail (ids, logweights, negent; M >= 1) takes the sampled-tail estimate
    negent - sum_S p log q - sum_m p_hat_m log q_{x_m} instead of the (K+1)-bin KL."""
    N, V = z.shape
    T = temperature
    valid = labels != ignore_index
    if isinstance(mask, torch.Tensor):
        m = mask.to(torch.bool)
    elif mask == "v2c_wrong":
        m = z.detach().argmax(-1) != labels  # torch.argmax: first maximal index
    elif mask == "v1_correct":
        m = i1.gather(-1, l1.argmax(-1, keepdim=True)).squeeze(-1) == labels
    elif mask == "always_v1":
        m = torch.ones(N, dtype=torch.bool)
    elif mask == "always_v2":
        m = torch.zeros(N, dtype=torch.bool)
    else:
        raise ValueError(mask)
    m = m.to(z.device)

    logq = torch.log_softmax(z / T, dim=-1)
    lse_all = torch.logsumexp(z / T, dim=-1)
    kls = []
    for ids, lp, tail in ((i1, l1, v1_tail), (i2, l2, v2_tail)):
        if tail is not None and tail.ids.shape[1] > 0:
            p = lp.to(dtype).exp()
            p_hat = tail.logweights.to(dtype).exp()
            cross = torch.where(p > 0, p * logq.gather(-1, ids.long()), 0).sum(-1)
            cross = cross + torch.where(p_hat > 0, p_hat * logq.gather(-1, tail.ids.long()), 0).sum(
                -1
            )
            kls.append(tail.negent.to(dtype) - cross)
            continue
        ids = ids.long()
        lp = lp.to(dtype)
        p = lp.exp()
        p_tail = (1 - p.sum(-1)).clamp(0, 1)
        kl_s = torch.where(p > 0, p * (torch.where(p > 0, lp, 0) - logq.gather(-1, ids)), 0)
        comp = torch.ones(N, V, dtype=torch.bool, device=z.device).scatter(-1, ids, False)
        empty = ~comp.any(-1)
        zc = torch.where(comp, z / T, float("-inf"))
        zc = torch.where(empty[:, None], torch.zeros_like(zc), zc)  # keep autograd NaN-free
        log_q_tail = torch.logsumexp(zc, dim=-1) - lse_all  # exact, in log space
        ok = (~empty) & (p_tail > 0)
        tail = torch.where(ok, p_tail * (torch.log(torch.where(ok, p_tail, 1)) - log_q_tail), 0)
        kls.append(kl_s.sum(-1) + tail)
    L = torch.where(m, kls[0], kls[1])
    ce = F.cross_entropy(z, torch.where(valid, labels, 0), reduction="none")
    n = valid.sum().clamp(min=1)
    t2 = T * T if t2_scale else 1.0
    Lm = torch.where(valid, L, 0).sum() / n
    cem = torch.where(valid, ce, 0).sum() / n
    return (1 - ce_weight) * t2 * Lm + ce_weight * cem


def loss_and_grad(fn, z, grad_output=1.0):
    zz = z.detach().clone().requires_grad_(True)
    loss = fn(zz)
    (loss * grad_output).backward()
    return loss.detach(), zz.grad.detach()


def assert_close_to_truth(name, got, truth, yard, dtype):
    got, truth, yard = got.double().cpu(), truth.double().cpu(), yard.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - truth).abs().max().item()
    yerr = (yard - truth).abs().max().item()
    if not torch.isfinite(torch.tensor(yerr)):
        yerr = 0.0
    scale = truth.abs().max().item()
    tol = max(2.0 * yerr, FLOOR[dtype] * scale, 1e-12)
    assert err <= tol, f"{name}: err {err:.3g} > tol {tol:.3g} (torch {dtype}: {yerr:.3g})"


def check_against_reference(
    z, labels, i1, l1, i2, l2, *, grad_output=1.0, inplace_backward=True, **kw
):
    """Kernel loss and gradient vs float64 truth, with the same-dtype torch yardstick."""
    dtype = z.dtype
    kern = loss_and_grad(
        lambda t: masked_kl_triton(
            t, labels, i1, l1, i2, l2, inplace_backward=inplace_backward, **kw
        ),
        z,
        grad_output,
    )
    truth = loss_and_grad(
        lambda t: reference_loss(t, labels, i1, l1, i2, l2, dtype=torch.float64, **kw),
        z.double(),
        grad_output,
    )
    yard = loss_and_grad(
        lambda t: reference_loss(t, labels, i1, l1, i2, l2, dtype=dtype, **kw),
        z,
        grad_output,
    )
    assert kern[0].dtype == torch.float32 and kern[0].dim() == 0
    assert kern[1].dtype == dtype and kern[1].shape == z.shape
    assert_close_to_truth("loss", kern[0], truth[0], yard[0], dtype)
    assert_close_to_truth("grad", kern[1], truth[1], yard[1], dtype)
    return kern, truth


def make_batch(N, V, K1, K2, *, device, dtype=torch.float32, seed=0, zscale=3.0, tscale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g) * zscale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)

    def teacher(K):
        lp = torch.log_softmax(torch.randn(N, V, generator=g) * tscale / 2.0, dim=-1)
        vals, ids = lp.topk(K, dim=-1)
        perm = torch.argsort(torch.rand(N, K, generator=g), dim=-1)  # ids in no special order
        return ids.gather(-1, perm), vals.gather(-1, perm)

    i1, l1 = teacher(K1)
    i2, l2 = teacher(K2)
    return [t.to(device) for t in (z, labels, i1, l1, i2, l2)]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference_odd_shapes(device, dtype, monkeypatch):
    # V = 1000 is not a multiple of BLOCK_V = 256 (4 blocks, the last one partial); K1 != K2
    monkeypatch.setenv("MUSCLE_KL_BLOCK_V", "256")
    z, y, i1, l1, i2, l2 = make_batch(37, 1000, 7, 5, device=device, dtype=dtype, seed=1)
    y[::5] = z[::5].float().argmax(-1)  # some rows where v2c is right -> teacher v2
    check_against_reference(z, y, i1, l1, i2, l2)


@pytest.mark.parametrize("device", DEVICES)
def test_single_row_int64_and_int16_ids(device):
    z, y, i1, l1, i2, l2 = make_batch(1, 777, 3, 9, device=device, seed=2)
    check_against_reference(z, y, i1.to(torch.int16), l1, i2, l2.half(), mask="always_v2")
    check_against_reference(z, y, i1, l1, i2.to(torch.int16), l2, mask="always_v1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["always_v1", "always_v2", "v1_correct", "tensor"])
def test_mask_modes(device, mode):
    z, y, i1, l1, i2, l2 = make_batch(12, 300, 6, 4, device=device, seed=3)
    top1 = i1.gather(-1, l1.argmax(-1, keepdim=True)).squeeze(-1)
    y[::2] = top1[::2]  # v1_correct is true on even rows, false on odd ones
    mask = mode
    if mode == "tensor":
        mask = torch.arange(12, device=device) % 3 == 0
    check_against_reference(z, y, i1, l1, i2, l2, mask=mask)
    _, stats = masked_kl_triton_with_stats(z, y, i1, l1, i2, l2, mask=mask)
    expect = {"always_v1": 1.0, "always_v2": 0.0, "v1_correct": 0.5, "tensor": 4 / 12}[mode]
    assert stats["frac_v1"].item() == pytest.approx(expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "ce_weight,t2_scale,grad_output,inplace",
    [(0.0, True, 1.0, False), (0.5, False, 2.5, True), (0.5, True, -0.7, False)],
)
def test_ce_t2_grad_output_inplace(device, ce_weight, t2_scale, grad_output, inplace):
    z, y, i1, l1, i2, l2 = make_batch(9, 500, 8, 8, device=device, seed=4)
    y[0] = -100
    check_against_reference(
        z,
        y,
        i1,
        l1,
        i2,
        l2,
        ce_weight=ce_weight,
        t2_scale=t2_scale,
        grad_output=grad_output,
        inplace_backward=inplace,
        temperature=1.5,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_semantics_and_no_grad(device):
    z, y, i1, l1, i2, l2 = make_batch(4, 200, 5, 5, device=device, seed=5)
    # in place: the logits buffer becomes the gradient; out of place: untouched
    zi = z.clone().requires_grad_(True)
    loss = masked_kl_triton(zi, y, i1, l1, i2, l2, inplace_backward=True)
    loss.backward()
    assert not torch.equal(zi.detach(), z)
    assert torch.equal(zi.detach(), zi.grad)  # same buffer
    zo = z.clone().requires_grad_(True)
    loss2 = masked_kl_triton(zo, y, i1, l1, i2, l2, inplace_backward=False)
    loss2.backward()
    assert torch.equal(zo.detach(), z)
    torch.testing.assert_close(zo.grad, zi.grad)
    # no gradient wanted: the logits are never written, whatever inplace_backward says
    zn = z.clone()
    with torch.no_grad():
        loss3 = masked_kl_triton(zn.requires_grad_(True), y, i1, l1, i2, l2)
    assert torch.equal(zn.detach(), z)
    torch.testing.assert_close(loss3, loss.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_rows(device):
    z, y, i1, l1, i2, l2 = make_batch(10, 400, 6, 6, device=device, seed=6)
    y[[1, 4, 5]] = -1
    kern, _ = check_against_reference(z, y, i1, l1, i2, l2, ignore_index=-1)
    assert (kern[1][[1, 4, 5]] == 0).all()
    loss, stats = masked_kl_triton_with_stats(z, y, i1, l1, i2, l2, ignore_index=-1)
    assert stats["n_tokens"].item() == 7


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored(device):
    z, y, i1, l1, i2, l2 = make_batch(5, 300, 4, 4, device=device, seed=7)
    y[:] = -100
    zz = z.clone().requires_grad_(True)
    loss = masked_kl_triton(zz, y, i1, l1, i2, l2, ce_weight=0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert (zz.grad == 0).all()
    _, stats = masked_kl_triton_with_stats(z, y, i1, l1, i2, l2)
    assert all(torch.isfinite(v.float()).all() for v in stats.values())
    assert stats["n_tokens"].item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    # |z| ~ 1e4: q is one-hot; where argmax is in S, q_tail underflows (exact-tail path)
    N, V = 8, 600
    z, y, i1, l1, i2, l2 = make_batch(N, V, 6, 6, device=device, seed=8)
    g = torch.Generator().manual_seed(80)
    z = ((torch.rand(N, V, generator=g) * 2 - 1) * 1e4).to(device)
    top = z.argmax(-1)
    i1[::2, 0] = top[::2]  # student's argmax inside S on even rows
    i1[::2, 1:] = (top[::2, None] + torch.arange(1, 6, device=device)) % V
    check_against_reference(z, y, i1, l1, i2, l2, mask="always_v1", ce_weight=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_peaked_and_flat_teachers(device):
    N, V, K = 6, 500, 5
    z, y, i1, l1, i2, l2 = make_batch(N, V, K, K, device=device, seed=9, zscale=1.0)
    # v1 peaked (tail mass ~0, clamps to 0), v2 flat (tail mass ~ 1 - K/V)
    l1 = torch.full_like(l1, -40.0)
    l1[:, 0] = 0.0
    l2 = torch.full_like(l2, -torch.log(torch.tensor(float(V))).item())
    m = torch.arange(N, device=device) % 2 == 0
    check_against_reference(z, y, i1, l1, i2, l2, mask=m)
    # student concentrated on S with a flat teacher: 1 - sum q_S tiny -> exact-tail path
    zc = z.clone()
    zc.scatter_(-1, i2, 30.0)
    check_against_reference(zc, y, i1, l1, i2, l2, mask=m)


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_ties_lowest_id(device, monkeypatch):
    monkeypatch.setenv("MUSCLE_KL_BLOCK_V", "128")  # ties across block boundaries too
    N, V = 4, 400
    z, y, i1, l1, i2, l2 = make_batch(N, V, 4, 4, device=device, seed=10, zscale=1.0)
    z[:, [50, 130, 390]] = 9.0  # three-way tie: argmax is 50 (lowest id)
    y[:] = torch.tensor([50, 130, 390, 7], device=device)  # rows 1..3: v2c wrong -> v1
    _, stats = masked_kl_triton_with_stats(z, y, i1, l1, i2, l2, mask="v2c_wrong")
    assert stats["frac_v1"].item() == pytest.approx(0.75)
    check_against_reference(z, y, i1, l1, i2, l2, mask="v2c_wrong", ce_weight=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_k_equals_v_is_dense_kl_div(device):
    N, V, T = 5, 64, 2.0
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(N, V, generator=g) * 2).to(device)
    t_lp = torch.log_softmax(torch.randn(N, V, generator=g) / T, -1).to(device)
    perm = torch.argsort(torch.rand(N, V, generator=g), -1).to(device)  # ids in any order
    ids, lp = perm, t_lp.gather(-1, perm)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    got = loss_and_grad(
        lambda t: masked_kl_triton(t, y, ids, lp, ids, lp, temperature=T, mask="always_v1"), z
    )
    want = loss_and_grad(
        lambda t: F.kl_div(
            torch.log_softmax(t / T, -1), t_lp, log_target=True, reduction="batchmean"
        ),
        z,
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    z = torch.zeros(3, 10, device=device)
    y = torch.zeros(3, dtype=torch.long, device=device)
    ids = torch.zeros(3, 2, dtype=torch.long, device=device)
    lp = torch.zeros(3, 2, device=device)
    with pytest.raises(ValueError, match="mask"):
        masked_kl_triton(z, y, ids, lp, ids, lp, mask="bogus")
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        masked_kl_triton(z[0], y, ids, lp, ids, lp)
    with pytest.raises(ValueError, match="v2_ids"):
        masked_kl_triton(z, y, ids, lp, ids[:2], lp[:2])
    with pytest.raises(ValueError, match="mask tensor"):
        masked_kl_triton(
            z, y, ids, lp, ids, lp, mask=torch.ones(2, dtype=torch.bool, device=device)
        )
    with pytest.raises(TypeError):
        masked_kl_triton(z.long(), y, ids, lp, ids, lp)


def test_triton_available_and_cheap_import():
    assert triton_available()
    # muscle.kernels imports, and says "unavailable", when triton cannot be imported
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import muscle.kernels as k\n"
        "assert not k.triton_available()\n"
        "assert 'muscle.kernels.masked_kl' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("device", DEVICES)
def test_overfull_teacher_exact_derivative(device):
    # Stored log-probs whose mass sums past 1 (e.g. a float16 cache): p_tail clamps to 0 and
    # the gradient must still be the exact derivative of the loss (P = sum p != 1).
    z, y, i1, l1, i2, l2 = make_batch(6, 300, 5, 5, device=device, seed=12, tscale=8.0)
    l1 = l1 + 0.05  # sum p1 ~ 1.05 * (top-5 mass of a peaked teacher)
    check_against_reference(z, y, i1, l1, i2, l2, mask="always_v1")


@pytest.mark.parametrize("device", DEVICES)
def test_stats_identity(device):
    z, y, i1, l1, i2, l2 = make_batch(8, 256, 4, 6, device=device, seed=13)
    y[2] = -100
    loss, st = masked_kl_triton_with_stats(
        z, y, i1, l1, i2, l2, ce_weight=0.3, t2_scale=True, temperature=2.0
    )
    torch.testing.assert_close(loss, 0.7 * st["kl"] + 0.3 * st["ce"])
    ce_ref = F.cross_entropy(z.double(), y, ignore_index=-100).float()
    torch.testing.assert_close(st["ce"], ce_ref, rtol=1e-5, atol=1e-6)
    assert st["n_tokens"].item() == 7


@pytest.mark.parametrize("device", DEVICES)
def test_agrees_with_muscle_losses_torch_impl(device):
    losses = pytest.importorskip("muscle.losses")
    z, y, i1, l1, i2, l2 = make_batch(10, 500, 6, 3, device=device, seed=14)
    y[3] = -100
    for kw in ({}, {"ce_weight": 0.5, "t2_scale": True, "mask": "v1_correct"}):
        got = loss_and_grad(lambda t, kw=kw: masked_kl_triton(t, y, i1, l1, i2, l2, **kw), z)
        want = loss_and_grad(
            lambda t, kw=kw: losses.masked_kl(t, y, i1, l1, i2, l2, impl="torch", **kw), z
        )
        torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_q_tail", [-20.0, -63.0, -66.0, -200.0])
def test_small_student_tail_gradient(device, log_q_tail):
    # The gradient sweep takes one exp per element with a per-row shift; below q_tail = e^-64
    # it switches to a shift by -log q_tail (1 / q_tail would overflow). Off S the gradient is
    # about -p_tail q_j / q_tail: O(1) however small q_tail is. Both sides of the switch.
    N, V, K, T = 6, 300, 5, 2.0
    z, y, i1, l1, i2, l2 = make_batch(N, V, K, K, device=device, seed=15, zscale=1.0)
    g = torch.Generator().manual_seed(150)
    z = torch.randn(N, V, generator=g).to(device)  # S entries O(1)
    off = torch.ones(N, V, dtype=torch.bool, device=device).scatter(-1, i1, False)
    # log q_tail ~ (c - lse_S) / T + log(V - K) at off-S logit c: solve for c
    c = T * (log_q_tail - torch.log(torch.tensor(float(V - K)))).item()
    z = torch.where(off, c + 0.5 * torch.randn(N, V, generator=g).to(device), z)
    l1 = l1 - 0.4  # p_tail = 1 - e^-0.4 * (top-K mass): a large teacher tail
    kern, truth = check_against_reference(
        z, y, i1, l1, i2, l2, mask="always_v1", temperature=T, ce_weight=0.25
    )
    off_grad = truth[1][off.cpu()].abs().max().item()
    assert off_grad > 1e-3  # the case is the intended one: off-S gradient is not negligible


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_ce_statistic_each_temperature(device, temperature):
    # sweep 1 derives exp(z - m) from exp((z - m) / T) when T is 1 or 2, else takes its own exp
    z, y, i1, l1, i2, l2 = make_batch(7, 333, 4, 4, device=device, seed=16, zscale=4.0)
    y[5] = -100
    _, st = masked_kl_triton_with_stats(z, y, i1, l1, i2, l2, temperature=temperature)
    ce_ref = F.cross_entropy(z.double(), y, ignore_index=-100).float()
    torch.testing.assert_close(st["ce"], ce_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
@pytest.mark.parametrize("mask", ["v2c_wrong", "v1_correct"])
def test_no_host_sync(mask):
    # forward + backward must not stall the CPU on the GPU (torch raises on a synchronizing op)
    z, y, i1, l1, i2, l2 = make_batch(16, 1000, 8, 8, device="cuda", seed=17)
    zz = z.clone().requires_grad_(True)
    masked_kl_triton(zz, y, i1, l1, i2, l2, mask=mask)  # compile outside the checked region
    zz = z.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = masked_kl_triton(zz, y, i1, l1, i2, l2, mask=mask)
        (loss * 2.0).backward()
        loss, _ = masked_kl_triton_with_stats(z.clone().requires_grad_(True), y, i1, l1, i2, l2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(zz.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch,evict,reverse", [("0", "0", "0"), ("1", "1", "0"),
                                                    ("0", "1", "1"), ("1", "0", "1")])  # fmt: skip
def test_kernel_variants_many_blocks(device, prefetch, evict, reverse, monkeypatch):
    # The --tune switches change code paths, not results: 8 blocks of 128, the last partial.
    monkeypatch.setenv("MUSCLE_KL_BLOCK_V", "128")
    monkeypatch.setenv("MUSCLE_KL_PREFETCH", prefetch)
    monkeypatch.setenv("MUSCLE_KL_EVICT", evict)
    monkeypatch.setenv("MUSCLE_KL_REVERSE", reverse)
    z, y, i1, l1, i2, l2 = make_batch(5, 1000, 7, 9, device=device, seed=18)
    z[0, 999] = 50.0  # argmax in the last, partial block
    z[1, 0] = 50.0  # argmax in the first block
    y[2] = -100
    check_against_reference(z, y, i1, l1, i2, l2, mask="v2c_wrong", ce_weight=0.3)


def test_default_config_compiles_for_sm90_without_spills(tmp_path):
    # Triton compiles to a cubin without a GPU: the config the launcher picks for the largest
    # benchmark vocabulary must build for H100/H200 and keep everything in registers (a spill
    # to local memory would cost bandwidth on every element). Outside the interpreter, so in a
    # subprocess without TRITON_INTERPRET.
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import os; from muscle.kernels.masked_kl import _pick_blocks; "
        "bv, _, _, nw = _pick_blocks(128256, 64); print(f'{bv}x{nw}')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "MUSCLE_KL_"))}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, *a], env=env, capture_output=True, text=True, timeout=300
    )
    picked = run("-c", code)
    assert picked.returncode == 0, picked.stderr
    config = picked.stdout.strip()
    out = tmp_path / "sass.csv"
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernel_sass.py")
    # format 1 without and with the CE statistic, and the sampled-tail variant (format 2)
    for extra in ([], ["--stats"], ["--stats", "--tail-m", "16", "--label", "tail16"]):
        res = run(bench, "--configs", config, "--out", str(out), *extra)
        if res.returncode != 0 and "ptxas" in res.stderr.lower() + res.stdout.lower():
            pytest.skip(f"no usable ptxas here: {res.stderr[-300:]}")
        assert res.returncode == 0, res.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(r["config"] == config for r in rows)
    for r in rows:
        assert int(r["regs"]) > 0 and int(r["ex2"]) > 0
        assert (int(r["spill_st"]), int(r["spill_ld"])) == (0, 0), r


# ---------------------------------------------------------------------------------------------
# Sampled tail (cache format 2): the kernel's KL_hat against the dense reference, and against
# muscle.losses' torch and chunked implementations on the same draws.
# ---------------------------------------------------------------------------------------------
def make_tail(ids, V, M, *, seed, n_pad=1, device="cpu"):
    """A SampledTail for head ids (N, K): M draws outside the head, one repeated id per row,
    n_pad padding lanes (-inf weight) naming a head id, a negative negent."""
    from muscle.losses import SampledTail

    g = torch.Generator().manual_seed(seed)
    N = ids.shape[0]
    ids = ids.cpu().long()
    outside = torch.ones(N, V, dtype=torch.bool).scatter(-1, ids, False)
    draws = torch.multinomial(outside.float(), M, replacement=True, generator=g)  # (N, M)
    draws[:, -1] = draws[:, 0]  # a repeat in every row
    lw = (torch.rand(N, M, generator=g) * 0.2).log()
    draws[:, 1 : 1 + n_pad] = ids[:, :1]
    lw[:, 1 : 1 + n_pad] = float("-inf")
    negent = -3 * torch.rand(N, generator=g)
    return SampledTail(draws.to(device), lw.to(device), negent.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_sampled_tail_matches_reference(device, dtype, monkeypatch):
    monkeypatch.setenv("MUSCLE_KL_BLOCK_V", "256")  # 4 blocks, the last partial
    z, y, i1, l1, i2, l2 = make_batch(19, 1000, 7, 5, device=device, dtype=dtype, seed=21)
    y[::5] = z[::5].float().argmax(-1)  # rows toward v2 under v2c_wrong
    y[3] = -100
    t1 = make_tail(i1, 1000, 9, seed=1, device=device)
    t2 = make_tail(i2, 1000, 3, seed=2, n_pad=0, device=device)
    for kw in ({}, {"ce_weight": 0.4, "t2_scale": True, "temperature": 1.5}):
        check_against_reference(z, y, i1, l1, i2, l2, v1_tail=t1, v2_tail=t2, **kw)
    # one teacher with a tail, the other without: per-row estimators
    check_against_reference(z, y, i1, l1, i2, l2, v1_tail=t1, v2_tail=None, ce_weight=0.2)
    check_against_reference(z, y, i1, l1, i2, l2, v2_tail=t2, inplace_backward=False)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_tail_agrees_with_torch_and_chunked(device):
    """The three implementations on the same draws of the real sampler: value, gradient,
    stats. float32 logits (the torch and chunked paths compute in float32 too)."""
    from muscle.losses import SampledTail, masked_kl_with_stats
    from muscle.tail_sampling import TailSampling, sample_tail, tail_logweights, teacher_key
    from muscle.topk import teacher_topk

    g = torch.Generator().manual_seed(31)
    N, V, K, M, T = 11, 333, 6, 10, 1.0
    z = torch.randn(N, V, generator=g) * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = z[::3].argmax(-1)
    y[4] = -100
    tails, heads = [], []
    for name in ("v1", "v2"):
        t = torch.randn(N, V, generator=g) * 3
        tk = teacher_topk(t, y, K, temperatures=(1.0, 2.0), negentropy=True)
        d = sample_tail(t, tk.ids, torch.arange(N) + 50, TailSampling(M, 9, 2.0), teacher_key(name))
        lw = tail_logweights(tk.logprobs(1.0), d.values - tk.lse[1.0][:, None], tk.lse, T, 2.0)
        heads += [tk.ids.to(device), tk.logprobs(T).to(device)]
        tails.append(SampledTail(d.ids.to(device), lw.to(device), tk.negent[T].to(device)))
    z = z.to(device)
    y = y.to(device)
    for kw in ({"mask": "v2c_wrong"}, {"mask": "v1_correct", "ce_weight": 0.3, "t2_scale": True}):
        got = {}
        for impl in ("torch", "chunked", "triton"):
            zz = z.clone().requires_grad_(True)
            loss, st = masked_kl_with_stats(zz, y, *heads, temperature=T, impl=impl,
                                            v1_tail=tails[0], v2_tail=tails[1], **kw)  # fmt: skip
            loss.backward()
            got[impl] = (loss.detach(), zz.grad, st)
        for impl in ("torch", "chunked"):
            torch.testing.assert_close(got["triton"][0], got[impl][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["triton"][1], got[impl][1], rtol=1e-4, atol=1e-7)
            for key in ("kl", "ce", "frac_v1", "frac_sampled"):
                a, b = got["triton"][2].as_dict()[key], got[impl][2].as_dict()[key]
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), key
        assert got["triton"][2].estimator == "sampled_tail"


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_tail_m0_is_format1_and_no_grad(device):
    from muscle.losses import SampledTail

    z, y, i1, l1, i2, l2 = make_batch(6, 200, 5, 5, device=device, seed=22)
    empty = SampledTail(i1[:, :0], l1[:, :0], l1[:, 0])
    base = loss_and_grad(lambda t: masked_kl_triton(t, y, i1, l1, i2, l2, ce_weight=0.3), z)
    m0 = loss_and_grad(
        lambda t: masked_kl_triton(
            t, y, i1, l1, i2, l2, ce_weight=0.3, v1_tail=empty, v2_tail=empty
        ),  # fmt: skip
        z,
    )
    assert torch.equal(base[0], m0[0]) and torch.equal(base[1], m0[1])
    _, st = masked_kl_triton_with_stats(z, y, i1, l1, i2, l2, v1_tail=empty, v2_tail=empty)
    assert st["frac_sampled"].item() == 0.0
    # no gradient wanted, with a tail: the logits stay untouched, same loss
    t1 = make_tail(i1, 200, 4, seed=3, device=device)
    with_grad = loss_and_grad(lambda t: masked_kl_triton(t, y, i1, l1, i2, l2, v1_tail=t1), z)
    zn = z.clone()
    with torch.no_grad():
        loss = masked_kl_triton(zn.requires_grad_(True), y, i1, l1, i2, l2, v1_tail=t1)
    assert torch.equal(zn.detach(), z)
    torch.testing.assert_close(loss, with_grad[0])
    with pytest.raises(ValueError, match="v1_tail"):
        masked_kl_triton(z, y, i1, l1, i2, l2, v1_tail=SampledTail(t1.ids[:3], t1.logweights[:3],
                                                                   t1.negent))  # fmt: skip
