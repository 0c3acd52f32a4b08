"""muscle.topk: the cache's view of a dense teacher, checked against dense torch."""

from __future__ import annotations

import math

import pytest
import torch

from muscle.topk import label_logprob_at, logprobs_at, teacher_topk

IGN = -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead (and contend on shared 2-core boxes).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def rand_case(n=37, v=1000, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::4] = IGN
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_dense_torch(dtype):
    x, y = rand_case(dtype=dtype)
    k = 16
    tk = teacher_topk(x, y, k, temperatures=(1.0, 2.0, 0.7))
    xf = x.float()
    assert tk.ids.dtype == torch.int64 and tk.ids.shape == (37, k)
    assert tk.values.dtype == torch.float32
    # the same values as torch.topk, in descending order
    ref_vals, ref_ids = torch.topk(xf, k, dim=1)
    torch.testing.assert_close(tk.values, ref_vals, rtol=0, atol=0)
    if dtype in (torch.float32, torch.float64):  # random floats: no ties, ids must agree too
        assert torch.equal(tk.ids, ref_ids)
    assert bool((tk.values[:, :-1] >= tk.values[:, 1:]).all())
    torch.testing.assert_close(tk.values, xf.gather(1, tk.ids), rtol=0, atol=0)
    for t in (1.0, 2.0, 0.7):
        assert tk.lse[t].dtype == torch.float32
        torch.testing.assert_close(tk.lse[t], torch.logsumexp(xf / t, 1), rtol=1e-6, atol=1e-6)
        dense = torch.log_softmax(x.double() / t, 1)  # (N, V) float64 truth
        lp = logprobs_at(tk.values, tk.lse[t], t)
        torch.testing.assert_close(lp.double(), dense.gather(1, tk.ids), rtol=0, atol=2e-5)
        torch.testing.assert_close(tk.logprobs(t), lp)
        # exact tail: 1 - sum of top-K equals the dense mass outside the top-K
        tail = 1 - lp.double().exp().sum(1)
        mask = torch.ones_like(dense, dtype=torch.bool).scatter_(1, tk.ids, False)
        dense_tail = (dense.exp() * mask).sum(1)
        torch.testing.assert_close(tail, dense_tail, rtol=0, atol=1e-5)
        # label log-prob, NaN where ignored
        llp = label_logprob_at(tk.label_logit, tk.lse[t], t)
        valid = y != IGN
        want = dense.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
        torch.testing.assert_close(llp[valid].double(), want[valid], rtol=0, atol=2e-5)
        assert bool(llp[~valid].isnan().all())
        torch.testing.assert_close(tk.label_logprob(t), llp, equal_nan=True)
    assert bool(tk.label_logit[~(y != IGN)].isnan().all())


def test_ties_deterministic_lower_id_first():
    v = 12
    x = torch.zeros(4, v)
    x[1, [3, 5, 9]] = 2.0  # three tied maxima
    x[2] = torch.tensor([1.0, 3, 3, 1, 1, 3, 0, 1, 1, 1, 1, 1])
    x[3, 7] = 5.0
    y = torch.tensor([0, 1, 2, IGN])
    tk = teacher_topk(x, y, 5)
    assert tk.ids[0].tolist() == [0, 1, 2, 3, 4]  # all tied: lowest ids, ascending
    assert tk.ids[1].tolist() == [3, 5, 9, 0, 1]
    assert tk.ids[2].tolist() == [1, 2, 5, 0, 3]  # ties at the k-th place straddle: lowest ids
    assert tk.ids[3].tolist() == [7, 0, 1, 2, 3]
    # same answer whatever row batch it comes in
    torch.testing.assert_close(teacher_topk(x[2:3], y[2:3], 5).ids, tk.ids[2:3])


def test_k_equals_v_is_a_permutation():
    x, y = rand_case(n=5, v=30)
    tk = teacher_topk(x, y, 30)
    assert torch.equal(tk.ids.sort(1).values, torch.arange(30).expand(5, 30))
    lp = tk.logprobs(2.0)
    torch.testing.assert_close(lp.double().exp().sum(1), torch.ones(5, dtype=torch.float64),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_refuses_non_finite_rows_and_bad_args():
    x, y = rand_case(n=8, v=50)
    x[2, 7] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 row\(s\): 2, 5"):
        teacher_topk(x, y, 4)
    x, y = rand_case(n=8, v=50)
    with pytest.raises(ValueError, match="k must be"):
        teacher_topk(x, y, 51)
    with pytest.raises(ValueError, match="k must be"):
        teacher_topk(x, y, 0)
    with pytest.raises(ValueError, match="labels"):
        teacher_topk(x, y[:3], 4)
    with pytest.raises(ValueError, match="out of range"):
        teacher_topk(x, y.clamp_min(0) + 50, 4)
    with pytest.raises(ValueError, match="temperatures"):
        teacher_topk(x, y, 4, temperatures=(0.0,))
    with pytest.raises(KeyError):
        teacher_topk(x, y, 4, temperatures=(1.0,)).logprobs(2.0)


def test_many_rows_chunked_consistently(monkeypatch):
    import muscle.topk as topk_mod

    x, y = rand_case(n=23, v=40, seed=3)
    whole = teacher_topk(x, y, 6)
    monkeypatch.setattr(topk_mod, "_CHUNK_BYTES", 4 * 40 * 3 * 5)  # 5 rows per chunk
    parts = teacher_topk(x, y, 6)
    assert torch.equal(whole.ids, parts.ids)
    torch.testing.assert_close(whole.lse[2.0], parts.lse[2.0], rtol=0, atol=0)
    torch.testing.assert_close(whole.label_logit, parts.label_logit, equal_nan=True)
    assert not math.isnan(float(whole.label_logit[1]))
