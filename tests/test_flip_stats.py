"""Sign tests against binomial sums worked out by hand; the vectorised paired bootstrap against
a plain per-resample Python loop on the same random stream."""

from __future__ import annotations

import math

import numpy as np
import pytest

from muscle import MuscleError, flip_stats
from muscle.flip_stats import (
    BootstrapSpec,
    bootstrap_means,
    comparison_uncertainty,
    paper_uncertainty,
    percentile_interval,
    sign_test,
    sign_test_p,
)
from muscle.flips import paired_columns, paper_columns, paper_row_from_columns, result_from_columns

# ------------------------------------------------------------------------------- sign test


@pytest.mark.parametrize(
    "b, c, p",
    [
        (0, 5, 0.0625),  # 2 * (1/2)^5 = 2/32
        (5, 0, 0.0625),  # two-sided: symmetric
        (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
        (2, 8, 112 / 1024),  # 2 * (1 + 10 + 45) / 1024
        (0, 10, 2 / 1024),
        (3, 3, 1.0),  # 2 * (1 + 6 + 15 + 20) / 64 = 84/64, capped at 1
        (4, 5, 1.0),  # 2 * (1 + 9 + 36 + 84 + 126) / 512 = 512/512
        (0, 1, 1.0),  # one discordant pair can never be significant
        (0, 0, 1.0),  # no discordant pair: no evidence
    ],
)
def test_sign_test_hand_computed(b, c, p):
    assert sign_test_p(b, c) == pytest.approx(p, rel=1e-12)
    assert sign_test(b, c).to_dict() == {"b": b, "c": c, "p": sign_test_p(b, c)}


def test_sign_test_large_counts_match_a_log_space_sum():
    # Exact integers in the library; here the same tail in log space with lgamma.
    def log_space(b, c):
        n, k = b + c, min(b, c)
        logs = [
            math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2)
            for j in range(k + 1)
        ]
        top = max(logs)
        return min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))

    for b, c in [(480, 520), (90, 140), (1000, 1100)]:
        assert sign_test_p(b, c) == pytest.approx(log_space(b, c), rel=1e-9)
    assert sign_test_p(0, 3000) == 0.0  # 2^-2999 underflows to zero, without an error
    with pytest.raises(MuscleError, match=">= 0"):
        sign_test_p(-1, 3)


# --------------------------------------------------------------------- random paired files


def make_files(n: int, seed: int, continuous: bool = False):
    """v1, v2, v2c records over the same n ids: 3-way choices (so wrong answers can differ)
    or, with ``continuous``, ROUGE-like scores with ties and correct = None."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, size=n)
    files = []
    for acc in (0.55, 0.62, 0.6):
        if continuous:
            scores = np.round(rng.random(n), 1)  # rounding: many D = 0 ties
            files.append(
                [
                    {"id": i, "prediction": f"s{i}", "target": "r", "correct": None, "score": s}
                    for i, s in enumerate(scores.tolist())
                ]
            )
            continue
        right = rng.random(n) < acc
        wrong = (target + rng.integers(1, 3, size=n)) % 3
        pred = np.where(right, target, wrong)
        files.append(
            [
                {
                    "id": i,
                    "prediction": int(p),
                    "target": int(t),
                    "correct": bool(p == t),
                    "score": float(p == t),
                }
                for i, (p, t) in enumerate(zip(pred, target, strict=True))
            ]
        )
    return files


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), written out."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def reference_metrics(v1, v2, idx):
    """The paper's definitions over one resample (a list of drawn positions), by hand."""
    n = len(idx)
    d = [v2[i]["score"] - v1[i]["score"] for i in idx]
    gains, losses = [x for x in d if x > 0], [-x for x in d if x < 0]
    out = {
        "old_score": sum(v1[i]["score"] for i in idx) / n,
        "new_score": sum(v2[i]["score"] for i in idx) / n,
        "score_diff": sum(d) / n,
        "pfr_smooth": len(gains) / n,
        "nfr_smooth": len(losses) / n,
        "m_g": sum(gains) / len(gains) if gains else 0.0,
        "m_r": sum(losses) / len(losses) if losses else 0.0,
    }
    if v1[0]["correct"] is not None:
        out["nfr"] = sum(v1[i]["correct"] and not v2[i]["correct"] for i in idx) / n
        out["pfr"] = sum(v2[i]["correct"] and not v1[i]["correct"] for i in idx) / n
        out["nfr_mc"] = (
            sum((not v2[i]["correct"]) and v2[i]["prediction"] != v1[i]["prediction"] for i in idx)
            / n
        )
    return out


def reference_intervals(files, resamples, seed, level=0.95):
    """A direct resampling loop: one rng.integers(0, n, size=n) per resample, metrics by hand."""
    v1, v2, v2c = files
    n = len(v1)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n).tolist()
        plain, compat = reference_metrics(v1, v2, idx), reference_metrics(v1, v2c, idx)
        row = {f"plain.{k}": v for k, v in plain.items()}
        row.update({f"compat.{k}": v for k, v in compat.items()})
        row["delta_nfr_smooth_c"] = compat["nfr_smooth"] - plain["nfr_smooth"]
        row["delta_m_r_c"] = compat["m_r"] - plain["m_r"]
        row["delta_score_c"] = compat["new_score"] - plain["new_score"]
        if "nfr" in plain:
            row["delta_nfr_c"] = compat["nfr"] - plain["nfr"]
        for k, v in row.items():
            draws.setdefault(k, []).append(v)
    tail = (1 - level) / 2
    return {k: (quantile(v, tail), quantile(v, 1 - tail)) for k, v in draws.items()}


@pytest.mark.parametrize("continuous", [False, True])
def test_bootstrap_equals_a_direct_resampling_loop(continuous, monkeypatch):
    files = make_files(37, seed=11, continuous=continuous)
    spec = BootstrapSpec(resamples=400, seed=7)
    ref = reference_intervals(files, spec.resamples, spec.seed)
    # Blocks of one resample, of a few, and all at once: the same intervals.
    for block_elements in (1, 37 * 3, 1 << 20):
        monkeypatch.setattr(flip_stats, "_BLOCK_ELEMENTS", block_elements)
        plain, compat = paper_columns(*files)
        unc = comparison_uncertainty(plain, spec)
        unc_c = comparison_uncertainty(compat, spec)
        row = paper_uncertainty(plain, compat, spec)
        keys = ["old_score", "new_score", "score_diff", "pfr_smooth", "nfr_smooth", "m_g", "m_r"]
        if not continuous:
            keys += ["nfr", "pfr", "nfr_mc"]
        for key in keys:
            for name, u in (("plain", unc), ("compat", unc_c)):
                got = (u.ci[key].low, u.ci[key].high)
                assert got == pytest.approx(ref[f"{name}.{key}"], abs=1e-12), (name, key)
        paper_keys = {
            "delta_nfr_smooth_c": "delta_nfr_smooth_c",
            "delta_m_r_c": "delta_m_r_c",
            "delta_score_c": "delta_score_c",
            "m_g_c": "compat.m_g",
        }
        if not continuous:
            paper_keys |= {"delta_nfr_c": "delta_nfr_c", "nfr_c": "compat.nfr"}
        for key, ref_key in paper_keys.items():
            got = (row.ci[key].low, row.ci[key].high)
            assert got == pytest.approx(ref[ref_key], abs=1e-12), key
        if continuous:
            assert unc.ci["nfr"] is None and row.ci["delta_nfr_c"] is None


def test_bootstrap_mean_and_variance_of_a_mean_are_the_exact_ones():
    # For a column x, a resample mean has expectation mean(x) and variance var(x, ddof=0) / n.
    # 20000 resamples: the variance estimate is within ~1% (sd sqrt(2/B)); a resample of
    # n - 1 draws, or a divisor n - 1, would move it by 1/n = 2.5%: the bounds are 3 sd.
    x = np.random.default_rng(0).random(40)
    means = bootstrap_means(x[:, None], resamples=20_000, seed=3)[:, 0]
    exact_var = x.var() / len(x)
    assert abs(means.mean() - x.mean()) < 4 * math.sqrt(exact_var / 20_000)
    assert means.var() == pytest.approx(exact_var, rel=3 * math.sqrt(2 / 20_000))


def test_intervals_contain_the_point_estimate_and_narrow_with_n():
    spec = BootstrapSpec(resamples=2000, seed=1)
    widths = {}
    for n in (100, 1600):
        plain, compat = paper_columns(*make_files(n, seed=5))
        result, row = result_from_columns(plain), paper_row_from_columns(plain, compat)
        unc, row_unc = comparison_uncertainty(plain, spec), paper_uncertainty(plain, compat, spec)
        for key in ("nfr", "pfr", "nfr_mc", "score_diff", "old_score", "nfr_smooth"):
            assert unc.ci[key].contains(getattr(result, key)), (n, key)
        for key in ("delta_nfr_c", "delta_score_c", "nfr_c", "delta_pfr_c"):
            assert row_unc.ci[key].contains(getattr(row, key)), (n, key)
        widths[n] = {k: unc.ci[k].high - unc.ci[k].low for k in ("nfr", "score_diff")}
        widths[n]["delta_nfr_c"] = row_unc.ci["delta_nfr_c"].high - row_unc.ci["delta_nfr_c"].low
    # Width ~ 1/sqrt(n): 16x the examples -> ~1/4 the width; 1/2 leaves room for noise.
    for key, wide in widths[100].items():
        assert 0 < widths[1600][key] < 0.5 * wide, key


def test_same_examples_resample_jointly_across_comparisons():
    # v1 -> v2 and v1 -> v2 again from the paper row's joint resampling: identical intervals.
    v1, v2, _ = make_files(50, seed=2)
    spec = BootstrapSpec(resamples=300, seed=4)
    alone = comparison_uncertainty(paired_columns(v1, v2), spec)
    joint = paper_uncertainty(*paper_columns(v1, v2, v2), spec)
    for key in ("nfr", "m_r"):  # equal up to the summation order of one matrix product
        got, want = joint.ci[key], alone.ci[key]
        assert (got.low, got.high) == pytest.approx((want.low, want.high), abs=1e-12)
    assert joint.ci["delta_nfr_c"].low == joint.ci["delta_nfr_c"].high == 0.0


def test_paper_tests_by_hand():
    # test_metrics.py's six examples: v2 regresses on id 2, v2c does not, nothing else differs
    # between them except id 3 (both wrong, different answers) -> b = 1, c = 0 for both tests.
    targets = [0, 0, 2, 1, 1, 0]
    preds = ([0, 1, 2, 3, 1, 2], [0, 0, 1, 2, 1, 2], [0, 0, 2, 3, 1, 2])

    def recs(p):
        return [
            {"id": i, "prediction": a, "target": t, "correct": a == t, "score": float(a == t)}
            for i, (a, t) in enumerate(zip(p, targets, strict=True))
        ]

    unc = paper_uncertainty(*paper_columns(*map(recs, preds)), BootstrapSpec(resamples=50))
    assert unc.tests_dict()["nfr_c_vs_nfr"] == {"b": 1, "c": 0, "p": 1.0}
    assert unc.tests_dict()["score_c_vs_score"] == {"b": 1, "c": 0, "p": 1.0}
    plain = comparison_uncertainty(paired_columns(recs(preds[0]), recs(preds[1])), BootstrapSpec())
    assert plain.tests_dict()["flips"] == {"b": 1, "c": 1, "p": 1.0}  # 1 gain, 1 regression


def test_discordant_counts_give_the_deltas():
    # dNFR_c = (added - avoided) / n and dscore_c = (v2c-only right - v2-only right) / n.
    files = make_files(300, seed=9)
    plain, compat = paper_columns(*files)
    row = paper_row_from_columns(plain, compat)
    tests = paper_uncertainty(plain, compat, BootstrapSpec(resamples=10)).tests
    nf, sc = tests["nfr_c_vs_nfr"], tests["score_c_vs_score"]
    assert row.delta_nfr_c == pytest.approx((nf.c - nf.b) / 300)
    assert row.delta_score_c == pytest.approx((sc.b - sc.c) / 300)
    assert nf.b + nf.c > 0 and sc.b + sc.c > 0


def test_percentile_interval_of_known_values():
    # 0..100: the 2.5% and 97.5% quantiles by linear interpolation are 2.5 and 97.5.
    interval = percentile_interval(np.arange(101.0), 0.95)
    assert (interval.low, interval.high) == pytest.approx((2.5, 97.5))


@pytest.mark.parametrize("resamples", [0, -5, True, 2.5])
def test_bad_resample_counts_are_refused(resamples):
    with pytest.raises(MuscleError, match="--bootstrap"):
        BootstrapSpec(resamples=resamples)
