"""muscle.losses against an independent dense float64 reference written here.

The reference walks the rows one by one with plain torch ops and autograd; it shares no code
with muscle. Tolerances in low precision are relative: an impl may be at most a small factor
worse than impl="torch" in the same dtype, both measured against float64 truth.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muscle.losses import (
    SampledTail,
    default_chunk_rows,
    masked_kl,
    masked_kl_with_stats,
    sequence_likelihood_mask,
    token_likelihood_mask,
)

IGN = -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead (and contend on shared 2-core boxes).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


MODES = ("v2c_wrong", "v1_correct", "always_v1", "always_v2")


# ----------------------------------------------------------------------------------------------
# independent reference


def first_argmax(row: torch.Tensor) -> int:
    """Lowest index among the maxima, without torch.argmax."""
    return int((row == row.max()).nonzero()[0, 0])


def ref_mask(mode, z, labels, ids1, lp1):
    if isinstance(mode, torch.Tensor):
        return mode.tolist()
    out = []
    for i in range(z.shape[0]):
        y = int(labels[i])
        if mode == "v2c_wrong":
            out.append(first_argmax(z[i]) != y)
        elif mode == "v1_correct":
            out.append(int(ids1[i, first_argmax(lp1[i].double())]) == y)
        else:
            out.append(mode == "always_v1")
    return out


def ref_kl_row(zrow, ids, lp, T):
    """KL over S + one tail bin, float64, for one row; differentiable in zrow."""
    logq = zrow / T - torch.logsumexp(zrow / T, 0)  # (V,)
    lp = lp.double()
    p = lp.exp()
    p_tail = float(min(max(1.0 - float(p.sum()), 0.0), 1.0))
    kl = zrow.new_zeros(())
    for k in range(ids.shape[0]):
        if float(p[k]) > 0:
            kl = kl + p[k] * (lp[k] - logq[int(ids[k])])
    keep = torch.ones(zrow.shape[0], dtype=torch.bool)
    keep[ids] = False
    if bool(keep.any()) and p_tail > 0:
        lq_tail = torch.logsumexp(logq[keep], 0)
        kl = kl + p_tail * (math.log(p_tail) - lq_tail)
    return kl


def ref_sampled_row(zrow, ids, lp, tail_ids, tail_lw, negent, T):
    """The sampled-tail estimate for one row, float64, differentiable in zrow:
    negent - sum_S p log q - sum_m p_hat_m log q_{x_m} (draw by draw, repeats included)."""
    logq = zrow / T - torch.logsumexp(zrow / T, 0)  # (V,)
    kl = zrow.new_zeros(()) + float(negent)
    for k in range(ids.shape[0]):
        p = math.exp(float(lp[k]))
        if p > 0:
            kl = kl - p * logq[int(ids[k])]
    for m in range(tail_ids.shape[0]):
        p_hat = math.exp(float(tail_lw[m]))
        if p_hat > 0:
            kl = kl - p_hat * logq[int(tail_ids[m])]
    return kl


def ref_loss(z, labels, ids1, lp1, ids2, lp2, *, T=2.0, mask="v2c_wrong", c=0.0, t2=False,
             tails=(None, None)):  # fmt: skip
    """float64 loss, frac_v1, mean CE; the loss is differentiable in z (float64)."""
    m = ref_mask(mask, z.detach(), labels, ids1, lp1)
    kl_sum, ce_sum, n, n1 = z.new_zeros(()), z.new_zeros(()), 0, 0
    for i in range(z.shape[0]):
        if int(labels[i]) == IGN:
            continue
        n += 1
        n1 += int(m[i])
        ids, lp = (ids1[i], lp1[i]) if m[i] else (ids2[i], lp2[i])
        tail = tails[0] if m[i] else tails[1]
        if tail is not None and tail.ids.shape[1] > 0:
            kl_sum = kl_sum + ref_sampled_row(z[i], ids, lp, tail.ids[i], tail.logweights[i],
                                              tail.negent[i], T)  # fmt: skip
        else:
            kl_sum = kl_sum + ref_kl_row(z[i], ids.long(), lp, T)
        ce_sum = ce_sum + torch.logsumexp(z[i], 0) - z[i, int(labels[i])]
    if n == 0:
        return z.sum() * 0.0, 0.0, 0.0
    kl = kl_sum / n * (T * T if t2 else 1.0)
    return (1 - c) * kl + c * ce_sum / n, n1 / n, float(ce_sum.detach()) / n


# ----------------------------------------------------------------------------------------------
# cases


def teacher(n, v, k, T, gen, scale=3.0, kind="normal"):
    """Top-k ids (int32) and float32 log-probs at T, as the cache stores them."""
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    if kind == "peaked":  # tail mass ~ 0
        t[torch.arange(n), torch.randint(0, v, (n,), generator=gen)] += 200.0
    elif kind == "flat":  # tail mass ~ 1 - k/v
        t = t * 1e-3
    logp = torch.log_softmax(t / T, 1)
    if k == v:
        ids = torch.arange(v).expand(n, v).clone()
        return ids.int(), logp.float()
    lp, ids = logp.topk(k, 1)
    return ids.to(torch.int32), lp.float()


def make_case(n, v, k1, k2, T=2.0, seed=0, zscale=3.0, kind1="normal", kind2="normal",
              n_ignored=None):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * zscale
    labels = torch.randint(0, v, (n,), generator=gen)
    # Make some students right so that "v2c_wrong" selects both teachers.
    right = torch.rand(n, generator=gen) < 0.4
    labels = torch.where(right, z.argmax(1), labels)
    n_ign = n // 5 if n_ignored is None else n_ignored
    labels[torch.randperm(n, generator=gen)[:n_ign]] = IGN
    i1, l1 = teacher(n, v, k1, T, gen, kind=kind1)
    i2, l2 = teacher(n, v, k2, T, gen, kind=kind2)
    return z, labels, i1, l1, i2, l2


def truth(z, labels, i1, l1, i2, l2, **kw):
    z = z.detach().double().requires_grad_()
    loss, frac, ce = ref_loss(z, labels, i1, l1, i2, l2, **kw)
    (g,) = torch.autograd.grad(loss, z, allow_unused=True)
    truth.ce = ce  # the CE diagnostic, for the tests that check it
    return loss.detach(), (torch.zeros_like(z) if g is None else g), frac


def run(z, labels, i1, l1, i2, l2, *, impl, T=2.0, mask="v2c_wrong", c=0.0, t2=False,
        chunk_rows=None, scale=1.0, tails=(None, None)):  # fmt: skip
    z = z.detach().clone().requires_grad_()
    loss, st = masked_kl_with_stats(
        z, labels, i1, l1, i2, l2, temperature=T, mask=mask, ce_weight=c, t2_scale=t2,
        impl=impl, chunk_rows=chunk_rows, v1_tail=tails[0], v2_tail=tails[1],
    )  # fmt: skip
    (loss * scale).backward()
    return loss.detach(), z.grad, st


CASES = [
    # (n, v, k1, k2, T, mask, c, t2)
    (37, 1000, 7, 7, 2.0, "v2c_wrong", 0.0, False),
    (37, 1000, 7, 3, 2.0, "v2c_wrong", 0.3, False),
    (37, 1000, 3, 7, 1.0, "v1_correct", 0.0, False),
    (37, 1000, 7, 7, 2.0, "always_v1", 1.0, False),
    (37, 1000, 7, 5, 1.5, "always_v2", 0.3, True),
    (37, 1000, 7, 7, 0.7, "v2c_wrong", 0.0, True),
    (1, 50, 5, 5, 2.0, "v2c_wrong", 0.0, False),
    (5, 3, 1, 1, 2.0, "always_v1", 0.3, False),
    (6, 3, 1, 2, 1.0, "v2c_wrong", 0.0, False),
    (16, 20, 20, 20, 2.0, "v2c_wrong", 0.0, False),  # K = V: dense
    (16, 20, 20, 4, 1.0, "always_v1", 0.3, True),  # K = V for v1 only
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_float64(case):
    n, v, k1, k2, T, mode, c, t2 = case
    z, y, i1, l1, i2, l2 = make_case(n, v, k1, k2, T=T)
    # Teacher columns need not be sorted: shuffle them (the same way for ids and log-probs).
    perm = torch.randperm(k1, generator=torch.Generator().manual_seed(1))
    i1, l1 = i1[:, perm], l1[:, perm]
    want, gwant, frac = truth(z, y, i1, l1, i2, l2, T=T, mask=mode, c=c, t2=t2)
    for impl, rows in (("torch", None), ("chunked", None), ("chunked", 1), ("chunked", 5)):
        loss, g, st = run(z, y, i1, l1, i2, l2, impl=impl, T=T, mask=mode, c=c, t2=t2,
                          chunk_rows=rows)  # fmt: skip
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12, msg=f"{impl} {rows}")
        torch.testing.assert_close(g, gwant, rtol=1e-9, atol=1e-13, msg=f"{impl} {rows}")
        assert float(st.frac_v1) == pytest.approx(frac)
        assert float(st.ce) == pytest.approx(truth.ce, rel=1e-12)
        assert int(st.n_tokens) == int((y != IGN).sum())
        # stats decompose the loss
        assert float(loss) == pytest.approx((1 - c) * float(st.kl) + c * float(st.ce), rel=1e-12)


def test_bool_mask_tensor():
    z, y, i1, l1, i2, l2 = make_case(37, 1000, 7, 4, seed=3)
    m = torch.rand(37, generator=torch.Generator().manual_seed(1)) < 0.5
    want, gwant, _ = truth(z, y, i1, l1, i2, l2, mask=m)
    for impl in ("torch", "chunked"):
        loss, g, st = run(z, y, i1, l1, i2, l2, impl=impl, mask=m, chunk_rows=8)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, gwant, rtol=1e-9, atol=1e-13)
        assert float(st.frac_v1) == pytest.approx(
            float((m & (y != IGN)).sum()) / int((y != IGN).sum())
        )


@pytest.mark.parametrize("mode", MODES)
def test_mask_modes_differ_and_match(mode):
    z, y, i1, l1, i2, l2 = make_case(24, 200, 6, 6, seed=7)
    want, gwant, _ = truth(z, y, i1, l1, i2, l2, mask=mode, c=0.3)
    loss, g, _ = run(z, y, i1, l1, i2, l2, impl="chunked", mask=mode, c=0.3, chunk_rows=7)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gwant, rtol=1e-9, atol=1e-13)
    # the mask matters: always_v1 and always_v2 differ on these teachers
    a1 = masked_kl(z, y, i1, l1, i2, l2, mask="always_v1", impl="chunked")
    a2 = masked_kl(z, y, i1, l1, i2, l2, mask="always_v2", impl="chunked")
    assert abs(float(a1 - a2)) > 1e-3


@pytest.mark.parametrize("kinds", [("peaked", "flat"), ("flat", "peaked")])
def test_peaked_and_flat_teachers(kinds):
    z, y, i1, l1, i2, l2 = make_case(30, 500, 5, 8, seed=2, kind1=kinds[0], kind2=kinds[1])
    # tail ~ 0 for the peaked teacher, ~ 1 for the flat one
    tails = [1 - lp.double().exp().sum(1) for lp in (l1, l2)]
    peaked = tails[0] if kinds[0] == "peaked" else tails[1]
    flat = tails[1] if kinds[0] == "peaked" else tails[0]
    assert float(peaked.abs().max()) < 1e-6 and float(flat.min()) > 0.98
    for mode in ("always_v1", "always_v2", "v2c_wrong"):
        want, gwant, _ = truth(z, y, i1, l1, i2, l2, mask=mode, c=0.3)
        for impl in ("torch", "chunked"):
            loss, g, _ = run(z, y, i1, l1, i2, l2, impl=impl, mask=mode, c=0.3, chunk_rows=7)
            torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g, gwant, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits(dtype):
    # |z| ~ 1e4: the student is one-hot, q_tail underflows every float format; the loss is
    # large but finite and the chunked path takes its exact-tail fallback.
    z, y, i1, l1, i2, l2 = make_case(12, 300, 5, 3, seed=5, zscale=1e4)
    z = z.to(dtype).double()  # ground truth on the values the impls see
    want, gwant, _ = truth(z, y, i1, l1, i2, l2, mask="v2c_wrong", c=0.3)
    assert math.isfinite(float(want)) and float(want) > 100
    errs = {}
    for impl in ("torch", "chunked"):
        loss, g, _ = run(z.to(dtype), y, i1, l1, i2, l2, impl=impl, mask="v2c_wrong", c=0.3,
                         chunk_rows=5)  # fmt: skip
        assert torch.isfinite(loss) and bool(torch.isfinite(g).all())
        errs[impl] = (abs(float(loss) - float(want)), float((g.double() - gwant).abs().max()))
    if dtype == torch.float64:
        assert errs["chunked"][0] <= 1e-9 * float(want)
        assert errs["chunked"][1] <= 1e-12
    assert errs["chunked"][0] <= 2 * errs["torch"][0] + 1e-6 * float(want)
    assert errs["chunked"][1] <= 2 * errs["torch"][1] + 1e-7


def test_argmax_ties_lowest_id():
    n, v = 6, 10
    z, y, i1, l1, i2, l2 = make_case(n, v, 3, 3, seed=9, n_ignored=0)
    z = torch.zeros(n, v, dtype=torch.float64)
    z[:, 2] = 5.0
    z[:, 7] = 5.0  # tie between ids 2 and 7: argmax is 2
    y = torch.tensor([2, 7, 2, 7, 1, 7])
    # v1's columns unsorted, log-probs tied between k=1 and k=2: top-1 is ids[:, 1]
    l1 = torch.log(torch.tensor([[0.1, 0.4, 0.4]] * n))
    i1 = torch.tensor([[0, 7, 2]] * n, dtype=torch.int16)
    for mode, want_frac in (("v2c_wrong", 4 / 6), ("v1_correct", 3 / 6)):
        want, gwant, frac = truth(z, y, i1, l1, i2, l2, mask=mode)
        assert frac == pytest.approx(want_frac)
        for impl in ("torch", "chunked"):
            loss, g, st = run(z, y, i1, l1, i2, l2, impl=impl, mask=mode, chunk_rows=4)
            assert float(st.frac_v1) == pytest.approx(want_frac)
            torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g, gwant, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_ignored(impl, dtype):
    z, y, i1, l1, i2, l2 = make_case(9, 40, 4, 4, n_ignored=9)
    loss, g, st = run(z.to(dtype), y, i1, l1, i2, l2, impl=impl, c=0.3)
    assert float(loss) == 0.0 and loss.dtype == torch.float32
    assert bool((g == 0).all()) and g.dtype == dtype
    assert int(st.n_tokens) == 0 and float(st.frac_v1) == 0.0
    assert all(math.isfinite(x) for x in st.as_dict().values())


def test_dense_equals_kl_div():
    n, v, T = 11, 64, 2.0
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    ids = torch.arange(v).expand(n, v)
    lp = torch.log_softmax(t / T, 1)
    y = torch.randint(0, v, (n,), generator=gen)
    want = F.kl_div(torch.log_softmax(z / T, 1), lp, log_target=True, reduction="batchmean")
    for impl in ("torch", "chunked"):
        got = masked_kl(z, y, ids, lp, ids, lp, temperature=T, impl=impl, chunk_rows=3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_closed_form_gradient():
    # dL/dz_j = (q_j - p_j)/T on S, (q_j/T)(1 - p_tail/q_tail) off S, over n rows
    n, v, k, T = 5, 30, 4, 2.0
    z, y, i1, l1, i2, l2 = make_case(n, v, k, k, T=T, n_ignored=0)
    _, g, _ = run(z, y, i1, l1, i2, l2, impl="chunked", mask="always_v1", chunk_rows=2)
    q = torch.softmax(z / T, 1)
    want = torch.empty_like(z)
    for i in range(n):
        s = i1[i].long()
        p = l1[i].double().exp()
        p_tail = 1 - p.sum()
        q_tail = 1 - q[i, s].sum()
        want[i] = q[i] / T * (1 - p_tail / q_tail)
        want[i, s] = (q[i, s] - p) / T
    torch.testing.assert_close(g, want / n, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_gradcheck(impl):
    z, y, i1, l1, i2, l2 = make_case(5, 7, 3, 2, T=1.5, n_ignored=1)
    l1, l2 = l1.double(), l2.double()
    for mode, c, t2, zs in (("v2c_wrong", 0.3, True, 1.0), ("v1_correct", 0.0, False, 1.0),
                            ("always_v1", 1.0, False, 1.0), ("always_v2", 0.0, False, 1e3)):  # fmt: skip

        def f(zz, mode=mode, c=c, t2=t2):
            return masked_kl(zz, y, i1, l1, i2, l2, temperature=1.5, mask=mode, ce_weight=c,
                             t2_scale=t2, impl=impl, chunk_rows=4)  # fmt: skip

        zz = (z * zs).clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (zz,), eps=1e-6, atol=1e-7)


def test_gradcheck_dense_chunked():
    z, y, i1, l1, i2, l2 = make_case(4, 6, 6, 6, n_ignored=0)
    zz = z.clone().requires_grad_()
    l1, l2 = l1.double(), l2.double()
    assert torch.autograd.gradcheck(
        lambda t: masked_kl(t, y, i1, l1, i2, l2, impl="chunked", chunk_rows=3), (zz,)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch(dtype):
    z, y, i1, l1, i2, l2 = make_case(37, 1000, 7, 3, seed=11)
    z = z.to(dtype)
    for mode, c, T in (("v2c_wrong", 0.0, 2.0), ("v1_correct", 0.3, 1.0), ("always_v1", 1.0, 1.5)):
        want, gwant, _ = truth(z.double(), y, i1, l1, i2, l2, T=T, mask=mode, c=c)
        gscale = float(gwant.abs().max())
        errs = {}
        for impl, rows in (("torch", None), ("chunked", 8), ("chunked", None)):
            loss, g, _ = run(z, y, i1, l1, i2, l2, impl=impl, T=T, mask=mode, c=c,
                             chunk_rows=rows, scale=3.7)  # fmt: skip
            assert loss.dtype == torch.float32 and g.dtype == dtype
            errs[impl] = (abs(float(loss) - float(want)),
                          float((g.double() - 3.7 * gwant).abs().max()) / gscale)  # fmt: skip
            if impl == "chunked":
                el, eg = errs["chunked"]
                assert el <= 2 * errs["torch"][0] + 2e-6 * (1 + float(want)), (mode, errs)
                # grads are stored in dtype: allow one extra rounding of the scale by 3.7
                ulp = torch.finfo(dtype).eps
                assert eg <= 2 * errs["torch"][1] + 4 * ulp, (mode, errs)


def test_grad_output_scale_and_retain_graph():
    z, y, i1, l1, i2, l2 = make_case(10, 40, 4, 4)
    zz = z.clone().requires_grad_()
    loss = masked_kl(zz, y, i1, l1, i2, l2, impl="chunked", ce_weight=0.3, chunk_rows=3)
    (g1,) = torch.autograd.grad(loss, zz, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.7, zz)
    torch.testing.assert_close(g2, 3.7 * g1, rtol=1e-14, atol=0)
    _, gwant, _ = truth(z, y, i1, l1, i2, l2, c=0.3)
    torch.testing.assert_close(g1, gwant, rtol=1e-9, atol=1e-13)


def test_no_grad_forward_and_auto():
    z, y, i1, l1, i2, l2 = make_case(10, 40, 4, 4)
    want = masked_kl(z, y, i1, l1, i2, l2, impl="torch")
    with torch.no_grad():
        got = masked_kl(z, y, i1, l1, i2, l2, impl="chunked", chunk_rows=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(masked_kl(z, y, i1, l1, i2, l2), want, rtol=1e-12, atol=0)
    zz = z.clone().requires_grad_()
    with torch.no_grad():  # eval: no gradient sweep, no graph
        got = masked_kl(zz, y, i1, l1, i2, l2, impl="chunked")
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_default_chunk_rows_about_32mb():
    rows = default_chunk_rows(49152, torch.bfloat16)
    assert 2 * rows * 49152 * 4 <= 32 * 2**20 < 2 * (rows + 1) * 49152 * 4
    assert default_chunk_rows(10**9, torch.float32) == 1


def test_bad_inputs():
    z, y, i1, l1, i2, l2 = make_case(5, 20, 3, 3)

    def call(**over):
        a = dict(student_logits=z, labels=y, v1_ids=i1, v1_logprobs=l1, v2_ids=i2,
                 v2_logprobs=l2)  # fmt: skip
        kw = {k: over.pop(k) for k in list(over) if k not in a}
        a.update(over)
        return masked_kl(**a, **kw)

    with pytest.raises(ValueError, match="labels"):
        call(labels=y[:4])
    with pytest.raises(ValueError, match="v1_ids"):
        call(v1_ids=i1[:4])
    with pytest.raises(ValueError, match="v2_logprobs"):
        call(v2_logprobs=l2[:, :2])
    with pytest.raises(ValueError, match="out of range"):
        call(v1_ids=i1 + 20)
    dup = i2.clone()
    dup[3, 1] = dup[3, 0]
    with pytest.raises(ValueError, match="distinct"):
        call(v2_ids=dup)
    with pytest.raises(ValueError, match="integer"):
        call(v1_ids=i1.float())
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=-1.0)
    with pytest.raises(ValueError, match="ce_weight"):
        call(ce_weight=1.5)
    with pytest.raises(ValueError, match="ce_weight"):
        call(ce_weight=-0.1)
    with pytest.raises(ValueError, match="v2c_wrong.*v1_correct.*always_v1.*always_v2"):
        call(mask="v1_wrong")
    with pytest.raises(ValueError, match="bool"):
        call(mask=torch.ones(5))
    with pytest.raises(ValueError, match="bool"):
        call(mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="impl"):
        call(impl="cuda")
    with pytest.raises(ValueError, match="chunk_rows"):
        call(chunk_rows=0)
    with pytest.raises(ValueError, match="student_logits"):
        call(student_logits=z[0])


def test_token_likelihood_mask():
    lp1 = torch.tensor([-1.0, -2.0, -3.0, float("nan")])
    lp2 = torch.tensor([-2.0, -1.0, -3.0, -1.0])
    assert token_likelihood_mask(lp1, lp2).tolist() == [True, False, False, False]


def test_sequence_likelihood_mask():
    lp1 = torch.tensor([-1.0, -1.0, -5.0, -1.0, -1.0, float("nan"), -2.0])
    lp2 = torch.tensor([-0.5, -2.0, -0.1, -0.2, -0.3, -9.0, -1.0])
    ex = torch.tensor([10, 10, 10, 3, 3, 3, 7])
    valid = torch.tensor([True, True, True, True, True, False, True])
    # ex 10: sum lp1 = -7 < sum lp2 = -2.6 -> v2 likelier -> False
    # ex 3: valid only: -2 vs -0.5 -> False; ex 7: -2 vs -1 -> False
    assert sequence_likelihood_mask(lp1, lp2, ex, valid).tolist() == [False] * 7
    # swap teachers: v2 less likely everywhere valid -> True on valid tokens only
    got = sequence_likelihood_mask(lp2, lp1, ex, valid).tolist()
    assert got == [True, True, True, True, True, False, True]
    # equal sequence likelihoods: not below, so toward v2
    eq = sequence_likelihood_mask(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]),
                                  torch.tensor([0, 0]), torch.tensor([True, True]))  # fmt: skip
    assert eq.tolist() == [False, False]
    with pytest.raises(ValueError):
        sequence_likelihood_mask(lp1, lp2, ex[:3], valid)


# ----------------------------------------------------------------------------------------------
# sampled tail (cache format 2): the formula on arbitrary tails, against ref_sampled_row


def random_tail(ids, v, m, gen, *, n_pad=1, dtype=torch.float32):
    """A SampledTail for head ids (N, K): m draws outside the head with repeats, arbitrary
    positive weights (log p_hat), n_pad padding draws (-inf, an id inside the head), a negent."""
    n, k = ids.shape
    if m == 0 or k == v:
        return SampledTail(ids.new_zeros(n, 0), torch.zeros(n, 0, dtype=dtype),
                           torch.zeros(n, dtype=dtype))  # fmt: skip
    out = torch.ones(n, v, dtype=torch.bool).scatter_(1, ids.long(), False)  # (N, V) tail
    pick = torch.multinomial(out.double(), m, replacement=True, generator=gen)  # (N, M)
    pick[:, -1] = pick[:, 0]  # a repeated draw in every row
    lw = (torch.rand(n, m, generator=gen, dtype=torch.float64) * 0.2).log()
    if n_pad:
        pick[:, 1 : 1 + n_pad] = ids[:, :1].long()  # padding: any id, weight 0
        lw[:, 1 : 1 + n_pad] = -math.inf
    negent = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    return SampledTail(pick.to(ids.dtype), lw.to(dtype), negent.to(dtype))


TAIL_CASES = [
    # (n, v, k1, k2, m1, m2, T, mask, c, t2)
    (37, 1000, 7, 7, 12, 12, 2.0, "v2c_wrong", 0.0, False),
    (37, 1000, 7, 3, 12, 5, 1.0, "v2c_wrong", 0.3, False),
    (37, 1000, 3, 7, 4, 9, 1.5, "v1_correct", 0.0, True),
    (37, 1000, 7, 7, 8, 0, 2.0, "always_v1", 0.5, False),
    (37, 1000, 7, 5, 0, 8, 0.7, "always_v2", 0.3, True),
    (1, 50, 5, 5, 6, 6, 2.0, "v2c_wrong", 0.0, False),
    (6, 3, 1, 2, 3, 2, 1.0, "v2c_wrong", 0.3, False),
    (16, 20, 20, 4, 0, 16, 2.0, "v2c_wrong", 0.0, False),  # K = V for v1: M = 0 there
]


@pytest.mark.parametrize("case", TAIL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sampled_tail_matches_reference_float64(case):
    n, v, k1, k2, m1, m2, T, mode, c, t2 = case
    z, y, i1, l1, i2, l2 = make_case(n, v, k1, k2, T=T, seed=21)
    gen = torch.Generator().manual_seed(22)
    tails = (random_tail(i1, v, m1, gen, n_pad=int(m1 > 2)),
             random_tail(i2, v, m2, gen, n_pad=int(m2 > 2)))  # fmt: skip
    want, gwant, frac = truth(z, y, i1, l1, i2, l2, T=T, mask=mode, c=c, t2=t2, tails=tails)
    base, _, _ = truth(z, y, i1, l1, i2, l2, T=T, mask=mode, c=c, t2=t2)
    assert abs(float(want - base)) > 1e-3  # the tails change the loss
    for impl, rows in (("torch", None), ("chunked", None), ("chunked", 1), ("chunked", 5)):
        loss, g, st = run(z, y, i1, l1, i2, l2, impl=impl, T=T, mask=mode, c=c, t2=t2,
                          chunk_rows=rows, tails=tails)  # fmt: skip
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12, msg=f"{impl} {rows}")
        torch.testing.assert_close(g, gwant, rtol=1e-9, atol=1e-13, msg=f"{impl} {rows}")
        assert float(st.frac_v1) == pytest.approx(frac)
        assert float(loss) == pytest.approx((1 - c) * float(st.kl) + c * float(st.ce), rel=1e-12)
        valid = y != IGN
        m = torch.tensor(ref_mask(mode, z, y, i1, l1), dtype=torch.bool)
        on = torch.where(m, m1 > 0 and k1 < v, m2 > 0 and k2 < v)
        assert float(st.frac_sampled) == pytest.approx(float((on & valid).sum() / valid.sum()))
        # the gradient sums to 0 over each row (softmax shift invariance, P_hat kept)
        torch.testing.assert_close(g.sum(1), torch.zeros(n, dtype=g.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_sampled_tail_gradcheck(impl):
    z, y, i1, l1, i2, l2 = make_case(5, 9, 3, 2, T=1.5, n_ignored=1)
    l1, l2 = l1.double(), l2.double()
    gen = torch.Generator().manual_seed(3)
    tails = (random_tail(i1, 9, 4, gen, dtype=torch.float64),
             random_tail(i2, 9, 3, gen, dtype=torch.float64))  # fmt: skip
    for mode, c, t2 in (("v2c_wrong", 0.3, True), ("v1_correct", 0.0, False),
                        ("always_v1", 1.0, False), ("always_v2", 0.0, False)):  # fmt: skip

        def f(zz, mode=mode, c=c, t2=t2):
            return masked_kl(zz, y, i1, l1, i2, l2, temperature=1.5, mask=mode, ce_weight=c,
                             t2_scale=t2, impl=impl, chunk_rows=2, v1_tail=tails[0],
                             v2_tail=tails[1])  # fmt: skip

        assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_tail_low_precision_no_worse_than_torch(dtype):
    z, y, i1, l1, i2, l2 = make_case(37, 1000, 7, 3, seed=11)
    gen = torch.Generator().manual_seed(5)
    tails = (random_tail(i1, 1000, 16, gen), random_tail(i2, 1000, 8, gen))
    z = z.to(dtype)
    for mode, c, T in (("v2c_wrong", 0.0, 2.0), ("v1_correct", 0.3, 1.0)):
        want, gwant, _ = truth(z.double(), y, i1, l1, i2, l2, T=T, mask=mode, c=c, tails=tails)
        gscale = float(gwant.abs().max())
        errs = {}
        for impl, rows in (("torch", None), ("chunked", 8)):
            loss, g, _ = run(z, y, i1, l1, i2, l2, impl=impl, T=T, mask=mode, c=c,
                             chunk_rows=rows, tails=tails)  # fmt: skip
            assert loss.dtype == torch.float32 and g.dtype == dtype
            errs[impl] = (abs(float(loss) - float(want)),
                          float((g.double() - gwant).abs().max()) / gscale)  # fmt: skip
        el, eg = errs["chunked"]
        assert el <= 2 * errs["torch"][0] + 2e-6 * (1 + abs(float(want))), (mode, errs)
        assert eg <= 2 * errs["torch"][1] + 4 * torch.finfo(dtype).eps, (mode, errs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampled_tail_extreme_logits(dtype):
    # |z| ~ 1e4: log q at the draws is ~ -1e4; the estimate is large and finite, no fallback
    # path is involved (the sampled estimator has no q_tail)
    z, y, i1, l1, i2, l2 = make_case(12, 300, 5, 3, seed=5, zscale=1e4)
    gen = torch.Generator().manual_seed(6)
    tails = (random_tail(i1, 300, 6, gen), random_tail(i2, 300, 6, gen))
    z = z.to(dtype).double()
    want, gwant, _ = truth(z, y, i1, l1, i2, l2, mask="v2c_wrong", c=0.3, tails=tails)
    for impl in ("torch", "chunked"):
        loss, g, _ = run(z.to(dtype), y, i1, l1, i2, l2, impl=impl, mask="v2c_wrong", c=0.3,
                         chunk_rows=5, tails=tails)  # fmt: skip
        assert torch.isfinite(loss) and bool(torch.isfinite(g).all())
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(g.double(), gwant, rtol=1e-5, atol=1e-6)


def test_sampled_tail_no_grad_and_all_ignored():
    z, y, i1, l1, i2, l2 = make_case(10, 40, 4, 4)
    gen = torch.Generator().manual_seed(7)
    tails = dict(v1_tail=random_tail(i1, 40, 5, gen), v2_tail=random_tail(i2, 40, 5, gen))
    want = masked_kl(z, y, i1, l1, i2, l2, impl="torch", **tails)
    zz = z.clone().requires_grad_()
    with torch.no_grad():
        got = masked_kl(zz, y, i1, l1, i2, l2, impl="chunked", chunk_rows=3, **tails)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    y_ign = torch.full_like(y, IGN)
    for impl in ("torch", "chunked"):
        loss, g, st = run(z, y_ign, i1, l1, i2, l2, impl=impl, c=0.3,
                          tails=(tails["v1_tail"], tails["v2_tail"]))  # fmt: skip
        assert float(loss) == 0.0 and bool((g == 0).all())
        assert float(st.frac_sampled) == 0.0 and st.estimator == "kplus1"
