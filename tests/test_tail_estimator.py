"""The sampled-tail estimator (cache format 2): sampler, weights, and the loss's expectation.

The truth is an independent float64 dense full-vocabulary masked KL written here (rows one by
one, autograd for the gradient). The estimator runs through the whole format 2 pipeline as the
cache and the trainer will: teacher_topk (head, lse, negent) -> sample_tail (seeded draws) ->
tail_logweights (importance weights from the stored T = 1 log-probs and lse's) ->
masked_kl(..., v*_tail=SampledTail). Its mean over S sampling seeds must lie within
Z_BOUND standard errors (estimated from the S draws themselves) of the truth, for the value and
for projections of the gradient; a parametrised negative test mutates the weight and asserts
that the same bound rejects it.
"""

from __future__ import annotations

import math

import pytest
import torch

import muscle.tail_sampling as ts
from muscle.losses import SampledTail, masked_kl, masked_kl_with_stats
from muscle.tail_sampling import (
    TailSampling,
    _mix64,
    sample_tail,
    tail_logweights,
    teacher_key,
)
from muscle.topk import teacher_topk

IGN = -100
Z_BOUND = 4.5  # |mean - truth| / standard error; ~7e-6 two-sided per statistic if normal
N_SEEDS = 300


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------------------------
# independent references


def first_argmax(row: torch.Tensor) -> int:
    return int((row == row.max()).nonzero()[0, 0])


def dense_masked_kl(z, labels, t1, t2, T, mask):
    """float64 full-vocabulary masked KL, mean over non-ignored rows; differentiable in z."""
    total, n = z.new_zeros(()), 0
    for i in range(z.shape[0]):
        y = int(labels[i])
        if y == IGN:
            continue
        n += 1
        if mask == "v2c_wrong":
            to_v1 = first_argmax(z[i].detach()) != y
        elif mask == "v1_correct":
            to_v1 = first_argmax(t1[i]) == y  # v1's top-1 (the head's first id)
        else:
            to_v1 = mask == "always_v1"
        t = (t1 if to_v1 else t2)[i].double()
        logp = t / T - torch.logsumexp(t / T, 0)
        logq = z[i] / T - torch.logsumexp(z[i] / T, 0)
        total = total + (logp.exp() * (logp - logq)).sum()
    return total / max(n, 1)


def dense_truth(z, labels, t1, t2, T, mask):
    zz = z.detach().double().clone().requires_grad_()
    loss = dense_masked_kl(zz, labels, t1, t2, T, mask)
    (g,) = torch.autograd.grad(loss, zz)
    return float(loss.detach()), g


def py_mix64(z: int) -> int:
    """splitmix64's finaliser on Python ints (the reference for the torch int64 version)."""
    mask = 2**64 - 1
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def tail_distribution(t_row: torch.Tensor, head: torch.Tensor, T: float) -> torch.Tensor:
    """float64 softmax(t / T) restricted to the complement of head, renormalised. (V,)"""
    p = torch.softmax(t_row.double() / T, 0)
    p[head.long()] = 0.0
    return p / p.sum()


# ----------------------------------------------------------------------------------------------
# the format 2 pipeline


class Teacher:
    """A dense teacher as the cache sees it: head, lse's and negent once; tails per seed."""

    def __init__(self, logits, labels, k, temps, name):
        self.logits = logits
        self.tk = teacher_topk(logits, labels, k, temperatures=temps, negentropy=True)
        self.key = teacher_key(name)

    def head(self, T):
        return self.tk.ids, self.tk.logprobs(T)

    def draws(self, positions, m, seed, Tr):
        d = sample_tail(self.logits, self.tk.ids, positions, TailSampling(m, seed, Tr), self.key)
        return d.ids, d.values - self.tk.lse[1.0][:, None]  # ids, stored T = 1 log-probs

    def tail(self, positions, m, seed, T, Tr, weights=None):
        ids, lp1 = self.draws(positions, m, seed, Tr)
        fn = weights or tail_logweights
        lw = fn(self.tk.logprobs(1.0), lp1, self.tk.lse, T, Tr)
        return SampledTail(ids, lw, self.tk.negent[T])


def make_case(n=7, v=90, k=6, seed=0, tscale=2.5, zscale=2.0, temps=(1.0, 2.0)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * zscale
    labels = torch.randint(0, v, (n,), generator=g)
    t1 = torch.randn(n, v, generator=g) * tscale
    t2 = torch.randn(n, v, generator=g) * tscale
    right = torch.rand(n, generator=g) < 0.4  # some rows where the student is right
    labels = torch.where(right, z.argmax(1), labels)
    labels[torch.rand(n, generator=g) < 0.4] = t1.argmax(1)[0]  # some v1-correct rows
    labels[n // 2] = IGN
    teachers = [Teacher(t, labels, k, temps, name) for t, name in ((t1, "v1"), (t2, "v2"))]
    positions = torch.arange(n, dtype=torch.long) * 7 + 1000
    return z, labels, teachers, positions


def estimate(z, labels, teachers, positions, *, m, seed, T, Tr, mask, impl, weights=None):
    """One draw of the estimator: loss and gradient (float64)."""
    (i1, l1), (i2, l2) = (t.head(T) for t in teachers)
    t1, t2 = (t.tail(positions, m, seed, T, Tr, weights) for t in teachers)
    zz = z.clone().requires_grad_()
    loss, st = masked_kl_with_stats(
        zz, labels, i1, l1, i2, l2, temperature=T, mask=mask, impl=impl, v1_tail=t1,
        v2_tail=t2, chunk_rows=3,
    )  # fmt: skip
    loss.backward()
    assert st.estimator == "sampled_tail"
    return float(loss.detach()), zz.grad


def z_score(samples: torch.Tensor, truth: float) -> float:
    """|mean - truth| in standard errors of the mean, estimated from the samples (S,)."""
    se = float(samples.std()) / math.sqrt(samples.numel())
    diff = abs(float(samples.mean()) - truth)
    if se == 0.0:
        return 0.0 if diff <= 1e-10 * (1.0 + abs(truth)) else math.inf
    return diff / se


def seed_statistics(case, *, T, Tr, mask, impl="chunked", m=6, weights=None):
    """z-scores of the loss and of gradient projections over N_SEEDS sampling seeds."""
    z, labels, teachers, positions = case
    truth, gtruth = dense_truth(z, labels, teachers[0].logits, teachers[1].logits, T, mask)
    g = torch.Generator().manual_seed(123)
    dirs = torch.randn(4, *z.shape, generator=g, dtype=torch.float64)
    dirs = torch.cat([dirs, gtruth[None] / gtruth.norm()])  # (D, N, V) incl. the truth's own
    losses, projs, grads = [], [], []
    for s in range(N_SEEDS):
        loss, grad = estimate(z, labels, teachers, positions, m=m, seed=s, T=T, Tr=Tr,
                              mask=mask, impl=impl, weights=weights)  # fmt: skip
        losses.append(loss)
        projs.append((dirs * grad).sum((1, 2)))
        grads.append(grad)
    losses, projs = torch.tensor(losses, dtype=torch.float64), torch.stack(projs)  # (S,), (S, D)
    zs = [z_score(losses, truth)]
    zs += [z_score(projs[:, d], float((dirs[d] * gtruth).sum())) for d in range(len(dirs))]
    return zs, truth, gtruth, torch.stack(grads)


# ----------------------------------------------------------------------------------------------
# the estimator's expectation


@pytest.mark.parametrize(
    "T,mask,impl",
    [
        (2.0, "v2c_wrong", "chunked"),  # T = T_r: constant weights
        (1.0, "v2c_wrong", "chunked"),  # T < T_r: weights vary, P_hat != 1
        (1.0, "v1_correct", "torch"),
        (2.0, "always_v2", "torch"),
    ],
)
def test_mean_over_seeds_is_the_full_kl(T, mask, impl):
    case = make_case(seed=1)
    zs, truth, gtruth, grads = seed_statistics(case, T=T, Tr=2.0, mask=mask, impl=impl)
    assert max(zs) < Z_BOUND, zs
    # the estimate is not trivially exact: it does vary between seeds
    assert float(grads.std(0).max()) > 1e-4
    if T == 2.0:
        # at T = T_r every weight is p_tail / M, so P_hat = 1: the gradient on the selected
        # teacher's head, (q - p) / T, is exact in every draw
        z, labels, teachers, _ = case
        to_v1 = z.argmax(1) != labels if mask == "v2c_wrong" else torch.zeros_like(labels) > 0
        heads = torch.where(to_v1[:, None], teachers[0].tk.ids, teachers[1].tk.ids)  # (N, K)
        rows = (labels != IGN).nonzero().squeeze(1)
        for grad in grads[:20]:
            torch.testing.assert_close(
                grad[rows].gather(1, heads[rows]),
                gtruth[rows].gather(1, heads[rows]),
                rtol=1e-5,
                atol=1e-9,
            )


def _p_not_over_r(head1, tail1, lse, T, Tr):
    """Mutation: weight p_T(x) instead of p_T(x) / r(x)."""
    return (
        (tail1.double() + lse[1.0].double()[:, None]) / T
        - lse[T].double()[:, None]
        - math.log(tail1.shape[1])
    )


def _no_over_m(head1, tail1, lse, T, Tr):
    """Mutation: drop the 1 / M."""
    return tail_logweights(head1, tail1, lse, T, Tr) + math.log(tail1.shape[1])


def _proposal_at_t1(head1, tail1, lse, T, Tr):
    """Mutation: weights for a proposal at T = 1 while the draws came from T_r = 2."""
    lw = tail_logweights(head1, tail1, lse, T, T)  # valid only if the draws were at T
    return lw


MUTATIONS = {"p_not_over_r": _p_not_over_r, "no_over_M": _no_over_m}


@pytest.mark.parametrize("name", sorted(MUTATIONS) + ["proposal_T"])
def test_wrong_weight_is_rejected(name):
    # The same statistic and bound as above, with a wrong weight: the bound must bite.
    case = make_case(seed=1)
    if name == "proposal_T":
        zs, *_ = seed_statistics(case, T=1.0, Tr=2.0, mask="v2c_wrong", weights=_proposal_at_t1)
    else:
        zs, *_ = seed_statistics(case, T=2.0, Tr=2.0, mask="v2c_wrong", weights=MUTATIONS[name])
    assert max(zs) > Z_BOUND, zs  # the test that accepts the right weights rejects this one
    if name != "proposal_T":  # gross errors: the loss alone and the gradient alone reject them
        assert zs[0] > Z_BOUND and max(zs[1:]) > Z_BOUND, zs


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_single_token_tail_is_exact(impl):
    # K = V - 1: the tail is one token, every draw is it, w = p_T of it: the estimate is the
    # full KL in every draw (value and gradient), at T = T_r and below.
    z, labels, teachers, positions = make_case(n=5, v=12, k=11, seed=4)
    for T in (2.0, 1.0):
        truth, gtruth = dense_truth(z, labels, teachers[0].logits, teachers[1].logits, T,
                                    "v2c_wrong")  # fmt: skip
        loss, grad = estimate(z, labels, teachers, positions, m=1, seed=7, T=T, Tr=2.0,
                              mask="v2c_wrong", impl=impl)  # fmt: skip
        assert loss == pytest.approx(truth, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad, gtruth, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_k_equals_v_is_the_dense_kl(impl):
    # K = V: the tail is empty, M must be 0 and the loss is the dense KL.
    z, labels, teachers, positions = make_case(n=5, v=16, k=16, seed=5)
    T = 2.0
    truth, gtruth = dense_truth(z, labels, teachers[0].logits, teachers[1].logits, T, "v2c_wrong")
    t1, t2 = (t.tail(positions, 0, 3, T, 2.0) for t in teachers)
    assert t1.ids.shape == (5, 0)
    (i1, l1), (i2, l2) = (t.head(T) for t in teachers)
    zz = z.clone().requires_grad_()
    loss, st = masked_kl_with_stats(zz, labels, i1, l1, i2, l2, temperature=T, impl=impl,
                                    v1_tail=t1, v2_tail=t2)  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == pytest.approx(truth, rel=1e-5)
    torch.testing.assert_close(zz.grad, gtruth, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="tail has only V - K = 0"):
        teachers[0].tail(positions, 1, 3, T, 2.0)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_m_zero_is_format_1_bit_for_bit(impl):
    z, labels, teachers, positions = make_case(seed=6)
    (i1, l1), (i2, l2) = (t.head(2.0) for t in teachers)
    t1, t2 = (t.tail(positions, 0, 3, 2.0, 2.0) for t in teachers)

    def run(**tails):
        zz = z.clone().requires_grad_()
        loss, st = masked_kl_with_stats(zz, labels, i1, l1, i2, l2, impl=impl, ce_weight=0.2,
                                        chunk_rows=2, **tails)  # fmt: skip
        loss.backward()
        return loss, zz.grad, st

    base, gbase, st0 = run()
    loss, grad, st = run(v1_tail=t1, v2_tail=t2)
    assert torch.equal(loss, base) and torch.equal(grad, gbase)
    assert st.estimator == st0.estimator == "kplus1" and float(st.frac_sampled) == 0.0


# ----------------------------------------------------------------------------------------------
# the sampler


def test_mix64_matches_python_reference():
    xs = [0, 1, 2, 12345678901234567, 2**63 - 1, -1, -(2**63), 0x9E3779B97F4A7C15 - 2**64]
    got = _mix64(torch.tensor(xs, dtype=torch.long))
    assert [int(v) % 2**64 for v in got] == [py_mix64(x % 2**64) for x in xs]
    # a stream of counters, as sample_tail uses them (wrapping adds and multiplies)
    key = 0x0123456789ABCDEF
    ctr = torch.arange(1, 6) * (0x9E3779B97F4A7C15 - 2**64)
    got = _mix64(torch.tensor(key) + ctr)
    want = [py_mix64(key + i * 0x9E3779B97F4A7C15) for i in range(1, 6)]
    assert [int(v) % 2**64 for v in got] == want


def sampler_case(n=40, v=300, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    head = logits.topk(k, 1).indices
    positions = torch.randperm(10**6, generator=g)[:n] + 10**12  # large, distinct
    return logits, head, positions


def test_draws_depend_only_on_seed_teacher_position_and_row(monkeypatch):
    logits, head, pos = sampler_case()
    spec = TailSampling(m=16, seed=11, proposal_temperature=2.0)
    whole = sample_tail(logits, head, pos, spec, teacher_key("v1"))
    assert whole.ids.shape == (40, 16) and whole.ids.dtype == torch.int64
    assert torch.equal(whole.values, logits.gather(1, whole.ids))
    assert not bool((whole.ids[:, :, None] == head[:, None, :]).any())  # never a head id
    # another batch composition, order and chunking: the same draws per row
    monkeypatch.setattr(ts, "_CHUNK_BYTES", 24 * 300 * 3)  # 3 rows per chunk
    rows = torch.tensor([33, 2, 17, 5, 39, 0, 21])
    part = sample_tail(logits[rows], head[rows], pos[rows], spec, teacher_key("v1"))
    assert torch.equal(part.ids, whole.ids[rows])
    # bf16 logits of the same values: the sampler sees the float32 upcast, same draws
    lb = logits.bfloat16()
    a = sample_tail(lb, head, pos, spec, teacher_key("v1"))
    b = sample_tail(lb.float(), head, pos, spec, teacher_key("v1"))
    assert torch.equal(a.ids, b.ids)
    # each key changes the draws (most rows differ)
    others = [
        sample_tail(logits, head, pos, TailSampling(16, 12, 2.0), teacher_key("v1")),
        sample_tail(logits, head, pos, spec, teacher_key("v2")),
        sample_tail(logits, head, pos + 1, spec, teacher_key("v1")),
    ]
    for o in others:
        assert float((o.ids != whole.ids).any(1).float().mean()) > 0.9


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over bins with expected count >= 5 (the rest pooled in one)."""
    total = float(counts.sum())
    exp = probs * total
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs - exp) ** 2 / exp)[keep].sum())
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("Tr", [2.0, 1.0])
def test_draw_frequencies_match_the_tail_distribution(Tr):
    # one teacher row at 300 positions, 50 draws each: 15,000 draws from one distribution
    g = torch.Generator().manual_seed(3)
    row = torch.randn(120, generator=g) * 2.0
    logits = row.expand(300, 120).contiguous()
    head = logits.topk(10, 1).indices
    d = sample_tail(logits, head, torch.arange(300), TailSampling(50, 5, Tr), teacher_key("v1"))
    counts = torch.bincount(d.ids.flatten(), minlength=120).double()
    assert float(counts[head[0]].sum()) == 0.0
    stat, df = chi_square(counts, tail_distribution(row, head[0], Tr))
    bound = df + 5 * math.sqrt(2 * df)  # ~5 standard deviations of a chi-square(df)
    assert df > 30 and stat < bound, (stat, df)
    # the bound bites: the tail at the other temperature is rejected
    wrong, _ = chi_square(counts, tail_distribution(row, head[0], 3.0 - Tr))
    assert wrong > bound, (wrong, bound)


def test_each_draw_uses_its_own_uniform():
    # draws of one row at one position are i.i.d.: pairs (x_m, x_m+1) are not all equal and
    # the draws of a row are not one repeated value
    logits, head, pos = sampler_case(n=200, v=60, k=4, seed=9)
    logits = logits * 0.0  # a uniform tail: 56 equally likely tokens
    d = sample_tail(logits, head, pos, TailSampling(40, 2, 2.0), teacher_key("v2"))
    distinct = torch.tensor([len(set(r)) for r in d.ids.tolist()], dtype=torch.float64)
    # E[#distinct of 40 uniform draws from 56] = 56 (1 - (55/56)^40) ~ 28.4
    # (per-row sd ~ 2.0, so the mean of 200 rows is within +-0.7 at 5 sd)
    assert 27.7 < float(distinct.mean()) < 29.1, float(distinct.mean())
    assert not bool((d.ids[:, :, None] == head[:, None, :]).any())


def test_sampler_bad_inputs():
    logits, head, pos = sampler_case(n=5, v=20, k=4)
    key = teacher_key("v1")
    spec = TailSampling(4, 0, 2.0)
    with pytest.raises(ValueError, match=r"17 tail samples but the tail has only V - K = 16"):
        sample_tail(logits, head, pos, TailSampling(17, 0, 2.0), key)
    full = torch.arange(20).expand(5, 20)
    with pytest.raises(ValueError, match="V - K = 0"):
        sample_tail(logits, full, pos, TailSampling(1, 0, 2.0), key)
    assert sample_tail(logits, full, pos, TailSampling(0, 0, 2.0), key).ids.shape == (5, 0)
    dup = head.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(ValueError, match="distinct"):
        sample_tail(logits, dup, pos, spec, key)
    with pytest.raises(ValueError, match="out of range"):
        sample_tail(logits, head + 20, pos, spec, key)
    with pytest.raises(ValueError, match="positions"):
        sample_tail(logits, head, pos[:3], spec, key)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        sample_tail(logits, head, pos - 10**13, spec, key)
    with pytest.raises(ValueError, match="head_ids"):
        sample_tail(logits, head.float(), pos, spec, key)
    with pytest.raises(ValueError, match="logits"):
        sample_tail(logits[0], head, pos, spec, key)
    with pytest.raises(ValueError, match="teacher key"):
        sample_tail(logits, head, pos, spec, -1)
    with pytest.raises(ValueError, match="TailSampling"):
        sample_tail(logits, head, pos, (4, 0, 2.0), key)
    bad = logits.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite teacher logits in 1 row\(s\): 3"):
        sample_tail(bad, head, pos, spec, key)
    for kw, match in (({"m": -1}, "M must"), ({"seed": 2**63}, "seed"),
                      ({"proposal_temperature": 0.0}, "proposal temperature"),
                      ({"proposal_temperature": math.inf}, "proposal temperature")):  # fmt: skip
        args = {"m": 4, "seed": 0, "proposal_temperature": 2.0, **kw}
        with pytest.raises(ValueError, match=match):
            TailSampling(**args)


def test_teacher_key_is_stable():
    # a fixed function of the name (sha256), so caches built anywhere agree
    assert teacher_key("v1") == 0x1264EF949526FC3B
    assert teacher_key("v2") == 0x3D4C0E97B6DC04FB


# ----------------------------------------------------------------------------------------------
# the weights


def test_tail_logweights_against_dense():
    g = torch.Generator().manual_seed(8)
    n, v, k, m = 9, 70, 5, 12
    t = torch.randn(n, v, generator=g) * 3
    tk = teacher_topk(t, torch.zeros(n, dtype=torch.long), k, temperatures=(1.0, 0.5, 2.0))
    d = sample_tail(t, tk.ids, torch.arange(n), TailSampling(m, 1, 2.0), teacher_key("v1"))
    lp1 = d.values - tk.lse[1.0][:, None]
    for T in (2.0, 1.0, 0.5):
        lw = tail_logweights(tk.logprobs(1.0), lp1, tk.lse, T, 2.0)
        assert lw.dtype == torch.float32 and lw.shape == (n, m)
        pT = torch.softmax(t.double() / T, 1).gather(1, d.ids)  # (N, M) float64 truth
        r = torch.stack([tail_distribution(t[i], tk.ids[i], 2.0) for i in range(n)]).gather(
            1, d.ids
        )
        torch.testing.assert_close(lw.double().exp(), pT / r / m, rtol=2e-5, atol=0)
    # at T = T_r every weight is p_tail(T_r) / M
    p2 = torch.softmax(t.double() / 2.0, 1)
    tail_mass = 1 - p2.gather(1, tk.ids).sum(1, keepdim=True)
    lw = tail_logweights(tk.logprobs(1.0), lp1, tk.lse, 2.0, 2.0)
    torch.testing.assert_close(lw.double().exp(), (tail_mass / m).expand(n, m), rtol=2e-5, atol=0)
    # padding draws (NaN / -inf stored log-probs) weigh 0; float64 in, float64 out
    lp1p = lp1.double().clone()
    lp1p[0, 3], lp1p[2, 0] = math.nan, -math.inf
    lw = tail_logweights(tk.logprobs(1.0), lp1p, tk.lse, 1.0, 2.0)
    assert lw.dtype == torch.float64 and lw[0, 3] == -math.inf and lw[2, 0] == -math.inf
    assert bool(torch.isfinite(lw).sum() == n * m - 2)


def test_tail_logweights_bad_inputs():
    n = 4
    lse = {1.0: torch.zeros(n), 2.0: torch.zeros(n)}
    head, tail = torch.full((n, 3), -2.0), torch.full((n, 5), -6.0)
    with pytest.raises(ValueError, match="above the proposal temperature"):
        tail_logweights(head, tail, lse, 2.0, 1.0)
    with pytest.raises(ValueError, match=r"lse lacks temperature\(s\) \[1.5\]"):
        tail_logweights(head, tail, lse, 1.5, 2.0)
    with pytest.raises(ValueError, match="row counts"):
        tail_logweights(head[:3], tail, lse, 1.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        tail_logweights(head, tail, lse, 0.0, 2.0)
    assert tail_logweights(head, tail[:, :0], lse, 1.0, 2.0).shape == (n, 0)


# ----------------------------------------------------------------------------------------------
# the loss side: stats, multiplicity, bad tails


def test_stats_say_which_estimator_ran():
    z, labels, teachers, positions = make_case(seed=2)
    (i1, l1), (i2, l2) = (t.head(2.0) for t in teachers)
    t1, t2 = (t.tail(positions, 4, 0, 2.0, 2.0) for t in teachers)
    for impl in ("torch", "chunked"):
        _, st = masked_kl_with_stats(z, labels, i1, l1, i2, l2, impl=impl, mask="always_v1",
                                     v1_tail=t1, v2_tail=None)  # fmt: skip
        assert st.estimator == "sampled_tail" and float(st.frac_sampled) == 1.0
        _, st = masked_kl_with_stats(z, labels, i1, l1, i2, l2, impl=impl, mask="always_v2",
                                     v1_tail=t1, v2_tail=None)  # fmt: skip
        assert st.estimator == "kplus1" and float(st.frac_sampled) == 0.0
        m = torch.arange(z.shape[0]) % 2 == 0
        _, st = masked_kl_with_stats(z, labels, i1, l1, i2, l2, impl=impl, mask=m,
                                     v1_tail=t1, v2_tail=None)  # fmt: skip
        valid = labels != IGN
        assert st.estimator == "mixed"
        assert float(st.frac_sampled) == pytest.approx(float((m & valid).sum() / valid.sum()))
        assert st.as_dict()["frac_sampled"] == float(st.frac_sampled)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_repeated_draws_count_with_multiplicity(impl):
    # Two draws of one id with weights a and b are one draw of weight a + b: same loss, same
    # gradient (scatter-add), and the padding slot (-inf) changes nothing.
    z, labels, teachers, positions = make_case(n=4, v=30, k=3, seed=3)
    (i1, l1), (i2, l2) = (t.head(1.0) for t in teachers)
    t1 = teachers[0].tail(positions, 5, 0, 1.0, 2.0)
    ids, lw = t1.ids.clone(), t1.logweights.clone()
    ids[:, 1] = ids[:, 0]  # draw 1 repeats draw 0, with its own weight
    merged_ids = ids.clone()
    merged_lw = lw.clone()
    merged_lw[:, 0] = torch.logaddexp(lw[:, 0], lw[:, 1])
    merged_lw[:, 1] = -math.inf  # padding
    merged_ids[:, 1] = i1[:, 0]  # a padding slot may hold any id, the head's included
    outs = []
    for tid, tlw in ((ids, lw), (merged_ids, merged_lw)):
        zz = z.clone().requires_grad_()
        loss = masked_kl(zz, labels, i1, l1, i2, l2, temperature=1.0, mask="always_v1",
                         impl=impl, v1_tail=SampledTail(tid, tlw, t1.negent))  # fmt: skip
        loss.backward()
        outs.append((loss.detach(), zz.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-9)
    # and the repeated id's gradient is (P_hat q - (a + b)) / T / n
    row = 0
    j = int(ids[row, 0])
    q = torch.softmax(z[row], 0)
    p_head = l1[row].double().exp()
    p_hat = lw[row].double().exp()
    n = int((labels != IGN).sum())
    want = (float(p_head.sum() + p_hat.sum()) * q[j] - float(p_hat[:2].sum())) / n
    if int(labels[row]) != IGN:
        assert float(outs[0][1][row, j]) == pytest.approx(float(want), rel=1e-5)


def test_bad_tails_are_refused():
    z, labels, teachers, positions = make_case(n=5, v=30, k=3, seed=4)
    (i1, l1), (i2, l2) = (t.head(2.0) for t in teachers)
    t1 = teachers[0].tail(positions, 4, 0, 2.0, 2.0)

    def call(tail):
        return masked_kl(z, labels, i1, l1, i2, l2, v1_tail=tail, impl="chunked")

    with pytest.raises(ValueError, match="SampledTail"):
        call((t1.ids, t1.logweights, t1.negent))
    with pytest.raises(ValueError, match=r"v1_tail.ids must have shape \(5, M\)"):
        call(SampledTail(t1.ids[:4], t1.logweights[:4], t1.negent))
    with pytest.raises(ValueError, match="v1_tail.logweights"):
        call(SampledTail(t1.ids, t1.logweights[:, :2], t1.negent))
    with pytest.raises(ValueError, match="v1_tail.negent"):
        call(SampledTail(t1.ids, t1.logweights, t1.negent[:2]))
    with pytest.raises(ValueError, match="integer"):
        call(SampledTail(t1.ids.float(), t1.logweights, t1.negent))
    with pytest.raises(ValueError, match="out of range"):
        call(SampledTail(t1.ids + 30, t1.logweights, t1.negent))
    nan = t1.logweights.clone()
    nan[1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        call(SampledTail(t1.ids, nan, t1.negent))
    inside = t1.ids.clone()
    inside[2, 0] = i1[2, 1]
    with pytest.raises(ValueError, match="outside v1_ids"):
        call(SampledTail(inside, t1.logweights, t1.negent))
