"""muscle.topk: the cache's view of a dense teacher, checked against dense torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muscle.topk import label_logprob_at, logprobs_at, stored_logprobs_at, teacher_topk

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


def test_logprobs_at_numpy_and_the_cache_reconstruction():
    """One formula for torch and numpy (the cache reader's arrays): the same float32 bits; and
    the cache's stored form (log p at T=1 + the lse's) rebuilt at T against dense float64."""
    x, y = rand_case(n=11, v=300, seed=3)
    temps = (1.0, 2.0, 0.7)
    tk = teacher_topk(x, y, 8, temperatures=temps)
    lp1 = logprobs_at(tk.values, tk.lse[1.0], 1.0).numpy()  # (N, K) what the cache stores
    lse = np.stack([tk.lse[t].numpy() for t in temps], 1)  # (N, nT)
    for t in temps:
        got = logprobs_at(tk.values.numpy(), tk.lse[t].numpy(), t)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, logprobs_at(tk.values, tk.lse[t], t).numpy())
        lab = label_logprob_at(tk.label_logit.numpy(), tk.lse[t].numpy(), t)
        np.testing.assert_array_equal(lab, label_logprob_at(tk.label_logit, tk.lse[t], t).numpy())
        dense = torch.log_softmax(x.double() / t, 1).gather(1, tk.ids).numpy()  # float64 truth
        rebuilt = stored_logprobs_at(lp1.copy(), lse, temps, t)
        assert rebuilt.dtype == np.float32
        np.testing.assert_allclose(rebuilt, dense, rtol=0, atol=3e-5)
        # float64 in, float64 out (inspect's statistics), torch and numpy alike
        assert stored_logprobs_at(lp1.astype(np.float64), lse, temps, t).dtype == np.float64
        assert logprobs_at(tk.values.double(), tk.lse[t], t).dtype == torch.float64
    with pytest.raises(ValueError):  # a temperature the cache does not hold
        stored_logprobs_at(lp1, lse, temps, 3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_negentropy_matches_dense(dtype, monkeypatch):
    import muscle.topk as topk_mod

    x, y = rand_case(n=23, v=500, seed=12, dtype=dtype)
    x[0] *= 40.0  # peaked rows: entropy ~ 0
    x[1] *= 1e-3  # flat rows: entropy ~ log V
    x[2] += 5e3  # a large offset: the shift must cancel exactly
    temps = (1.0, 2.0, 0.7)
    tk = teacher_topk(x, y, 8, temperatures=temps, negentropy=True)
    assert teacher_topk(x, y, 8, temperatures=temps).negent == {}  # only when asked for
    monkeypatch.setattr(topk_mod, "_CHUNK_BYTES", 4 * 500 * 4 * 5)  # 5 rows per chunk
    chunked = teacher_topk(x, y, 8, temperatures=temps, negentropy=True)
    for t in temps:
        logp = torch.log_softmax(x.float().double() / t, 1)  # (N, V) float64 truth
        want = (logp.exp() * logp).sum(1)  # sum_j p_j log p_j <= 0
        got = tk.negent[t]
        assert got.dtype == torch.float32 and got.shape == (23,)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(chunked.negent[t], got, rtol=0, atol=0)
        # the lse is unchanged by the option (the same sum-exp)
        torch.testing.assert_close(tk.lse[t], teacher_topk(x, y, 8, temperatures=temps).lse[t],
                                   rtol=0, atol=0)  # fmt: skip
    assert float(tk.negent[1.0][1]) == pytest.approx(-math.log(500), abs=1e-3)
    empty = teacher_topk(x[:0], y[:0], 8, temperatures=temps, negentropy=True)
    assert empty.negent[2.0].shape == (0,)


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


# ---------------------------------------------------------------- against a dense reference


def dense_reference(x, k, temps):
    """Independent float64 answer: a full lexicographic sort by (-logit, id) of every row."""
    xd = x.float().double().numpy()  # (N, V): the float32 upcast the cache promises, exact
    n, v = xd.shape
    ids = np.lexsort((np.broadcast_to(np.arange(v), (n, v)), -xd), axis=1)[:, :k]  # (N, K)
    values = torch.from_numpy(np.take_along_axis(xd, ids, 1)).float()
    lse = {t: torch.logsumexp(torch.from_numpy(xd) / t, 1) for t in temps}  # (N,) float64
    return torch.from_numpy(ids), values, lse


def check_against_reference(x, y, k, temps=(1.0, 2.0, 0.7)):
    tk = teacher_topk(x, y, k, temperatures=temps)
    ids, values, lse = dense_reference(x, k, temps)
    assert tk.ids.shape == (x.shape[0], k) and tk.values.shape == (x.shape[0], k)
    assert torch.equal(tk.ids, ids)
    assert torch.equal(tk.values, values)  # bit-identical, 0.0 and -0.0 included
    assert torch.equal(tk.values.signbit(), values.signbit())
    for t in temps:
        # max-shifted float32 sum-exp: the float64 truth to float32 rounding (inf where the
        # truth overflows float32, never NaN)
        torch.testing.assert_close(tk.lse[t], lse[t].float(), rtol=2e-6, atol=2e-6)
    valid = y != IGN
    want = x.float()[torch.arange(len(y)), y.clamp_min(0)]
    assert torch.equal(tk.label_logit[valid], want[valid])
    assert bool(tk.label_logit[~valid].isnan().all())
    return tk


def tie_heavy_case(n, v, seed, levels=4, dtype=torch.float32):
    """Logits drawn from a few values: ties everywhere, at and across the K-th place."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, v), generator=gen).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::3] = IGN
    return x, y


@pytest.mark.parametrize("v", [1, 2, 7, 65])
def test_ties_straddling_kth_place_every_k(v):
    x, y = tie_heavy_case(9, v, seed=v)
    for k in range(1, v + 1):  # includes k == V - 1 and k == V
        check_against_reference(x, y, k)


def test_straddle_at_k_equals_v_minus_one():
    # the K-th and (K+1)-th (last) values tie: the lower id must win the last place
    x = torch.tensor([[5.0, 1.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 2.0, 2.0]])
    y = torch.tensor([0, 1, IGN])
    tk = check_against_reference(x, y, 3)
    assert tk.ids.tolist() == [[0, 2, 1], [0, 1, 2], [0, 2, 3]]
    tk = check_against_reference(x, y, 4)
    assert tk.ids.tolist() == [[0, 2, 1, 3], [0, 1, 2, 3], [0, 2, 3, 1]]


def test_ties_inside_topk_but_not_straddling():
    # equal values inside the top-K, a distinct K-th: the set is right, the order is fixed
    x = torch.tensor([[0.0, 7.0, 3.0, 7.0, 3.0, 9.0, -1.0, 7.0]])
    tk = check_against_reference(x, torch.tensor([IGN]), 6)
    assert tk.ids.tolist() == [[5, 1, 3, 7, 2, 4]]


def test_signed_zeros_are_ties_and_keep_their_sign():
    x = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0, -1.0], [-0.0, -0.0, 0.0, -2.0, 0.0, 0.0]])
    y = torch.tensor([1, IGN])
    for k in range(1, 7):
        check_against_reference(x, y, k)
    assert teacher_topk(x, y, 3).ids.tolist() == [[2, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_reference(dtype):
    # half-precision logits tie often: most rows take the tie path
    x, y = rand_case(n=41, v=700, seed=5, dtype=dtype)
    tk = check_against_reference(x, y, 64)
    assert bool((tk.values[:, 1:] == tk.values[:, :-1]).any(1).float().mean() > 0.5)
    x, y = tie_heavy_case(17, 90, seed=6, levels=6, dtype=dtype)
    for k in (1, 30, 89, 90):
        check_against_reference(x, y, k)


@pytest.mark.parametrize("n,v,k", [(1, 1, 1), (1, 5000, 3), (3, 2, 1), (64, 33, 33), (5, 129, 128)])
def test_odd_shapes_match_reference(n, v, k):
    x, y = rand_case(n=n, v=v, seed=n + v)
    check_against_reference(x, y, k)


def test_non_contiguous_and_extreme_logits():
    x, y = rand_case(n=12, v=300, seed=8)
    x[0] *= 1e6  # a huge spread: the shift must come from the row max
    x[1] += 8e4  # a large offset: exp(x / T) would overflow without the shift
    x[2] = -3e38  # near the float32 limit, all tied: lse at T=0.7 overflows to -inf
    x[3, :7] = 3e38  # x / 0.7 overflows, x - max(x) does not
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    check_against_reference(xt, y, 10)
    check_against_reference(x[:, ::2], y.clamp(max=149), 10)


def test_chunked_with_ties_matches_reference(monkeypatch):
    import muscle.topk as topk_mod

    x, y = tie_heavy_case(23, 40, seed=9)
    monkeypatch.setattr(topk_mod, "_CHUNK_BYTES", 4 * 40 * 3 * 4)  # 4 rows per chunk
    for k in (5, 39, 40):
        check_against_reference(x, y, k)


def test_empty_batch():
    tk = teacher_topk(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), 4)
    assert tk.ids.shape == (0, 4) and tk.ids.dtype == torch.int64
    assert tk.values.shape == (0, 4) and tk.values.dtype == torch.float32
    assert tk.lse[2.0].shape == (0,) and tk.label_logit.shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_kind_of_non_finite_is_refused(bad, dtype):
    x, y = rand_case(n=9, v=50, seed=4)
    x[6, 31] = bad  # one entry (a -inf is not the row max: the row min must catch it)
    with pytest.raises(ValueError, match=r"^non-finite teacher logits in 1 row\(s\): 6$"):
        teacher_topk(x.to(dtype), y, 4)
    x[:, 0] = bad  # every row
    with pytest.raises(ValueError, match=r"in 9 row\(s\): 0, 1, 2, 3, 4, 5, 6, 7, 8$"):
        teacher_topk(x.to(dtype), y, 4)


def test_float64_overflowing_float32_is_refused():
    x, y = rand_case(n=3, v=20, dtype=torch.float64)
    x[1, 2] = 1e39  # finite in float64, +inf once cast to float32: refused like inf
    with pytest.raises(ValueError, match=r"1 row\(s\): 1$"):
        teacher_topk(x, y, 4)


def test_non_finite_rows_numbered_across_chunks(monkeypatch):
    import muscle.topk as topk_mod

    x, y = rand_case(n=30, v=50, seed=2)
    x[3, 1] = float("-inf")
    x[17, 40] = float("nan")
    x[29, 0] = float("inf")
    monkeypatch.setattr(topk_mod, "_CHUNK_BYTES", 4 * 50 * 3 * 7)  # 7 rows per chunk
    # the first chunk with a bad row stops the build: its rows are reported
    with pytest.raises(ValueError, match=r"1 row\(s\): 3$"):
        teacher_topk(x, y, 4)
    x[3, 1] = 0.0
    with pytest.raises(ValueError, match=r"1 row\(s\): 17$"):
        teacher_topk(x, y, 4)
