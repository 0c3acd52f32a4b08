"""How sure is a flip metric: exact sign tests and paired bootstrap intervals.

Two tools over examples paired by id (``muscle.flips``):

* :func:`sign_test`: the exact two-sided binomial test on discordant pairs (exact McNemar). Of
  the ``b + c`` examples on which two outcomes differ, ``b`` favour one side and ``c`` the other;
  under H0 (no difference) ``b ~ Binomial(b + c, 1/2)`` and
  ``p = min(1, 2 * P(X <= min(b, c)))``; ``p = 1`` when ``b + c = 0``.
* :func:`bootstrap_means`: paired bootstrap. Resample ``b`` draws ``n`` example indices with
  replacement, ``rng.integers(0, n, size=n)``, the ``b``-th such draw of
  ``numpy.random.default_rng(seed)``, and every file's record of a drawn example comes along
  (joint across files). Intervals are percentile intervals (numpy's default linear
  interpolation between order statistics) of the metric over the resamples.

Each metric is a function of column means (``muscle.flips.FLIP_METRICS``), so a resample only
needs how often it drew each example: one ``bincount`` per block of resamples, and every
column mean of the block is one matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from muscle import MuscleError
from muscle.flips import (
    FLIP_METRICS,
    METRIC_COLUMNS,
    Columns,
    flip_metrics,
    has_correct,
    paper_fields,
)

# ------------------------------------------------------------------------------- sign test


@dataclass(frozen=True)
class SignTest:
    """Exact two-sided sign test on discordant pairs: ``b`` in favour of the newer side, ``c``
    against it."""

    b: int
    c: int
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"b": self.b, "c": self.c, "p": self.p}


def sign_test_p(b: int, c: int) -> float:
    """Two-sided exact binomial p-value of ``b`` successes in ``b + c`` fair trials."""
    if b < 0 or c < 0:
        raise MuscleError(f"sign test: discordant counts must be >= 0 (got b={b}, c={c})")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # sum_{j <= k} C(n, j) in exact integers (C(n, j + 1) = C(n, j) (n - j) / (j + 1)), then one
    # correctly rounded int / int division: no float underflow of 2^-n for large n.
    term = total = 1
    for j in range(k):
        term = term * (n - j) // (j + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def sign_test(b: int, c: int) -> SignTest:
    return SignTest(int(b), int(c), sign_test_p(int(b), int(c)))


def _count(values: np.ndarray) -> int:
    return int(values.sum())


def comparison_tests(cols: Columns) -> dict[str, SignTest | None]:
    """OLD -> NEW: is the score change more than noise?

    ``flips``: b = gains (OLD wrong, NEW right), c = regressions (exact McNemar on
    correctness; None without ``correct``). ``smooth_flips``: b = examples with D > 0, c = with
    D < 0 (sign test on the score).
    """
    flips = (
        sign_test(_count(cols["gain"]), _count(cols["regression"])) if has_correct(cols) else None
    )
    smooth = sign_test(_count(cols["gain_smooth"]), _count(cols["regression_smooth"]))
    return {"flips": flips, "smooth_flips": smooth}


def paper_tests(plain: Columns, compat: Columns) -> dict[str, SignTest | None]:
    """v2 vs v2c, b in favour of v2c (the compatibility model), c in favour of v2.

    * ``nfr_c_vs_nfr``: on examples v1 got right, b = v2 wrong and v2c right (regressions
      avoided), c = v2 right and v2c wrong (regressions added); ΔNFR_c = (c - b) / n.
    * ``score_c_vs_score``: b = v2c right and v2 wrong, c = v2 right and v2c wrong;
      Δscore_c = (b - c) / n for right/wrong scores.
    * ``nfr_smooth_c_vs_nfr_smooth``: as ``nfr_c_vs_nfr`` with "regression" = D < 0 against v1.
    * ``score_sign_c_vs_score``: b = score(v2c) > score(v2), c = score(v2c) < score(v2).

    The first two are None without ``correct``.
    """
    out: dict[str, SignTest | None] = {"nfr_c_vs_nfr": None, "score_c_vs_score": None}
    if has_correct(plain) and has_correct(compat):
        nf, nf_c = plain["regression"], compat["regression"]
        ok, ok_c = plain["new_correct"], compat["new_correct"]
        out["nfr_c_vs_nfr"] = sign_test(_count(nf * (1 - nf_c)), _count(nf_c * (1 - nf)))
        out["score_c_vs_score"] = sign_test(_count(ok_c * (1 - ok)), _count(ok * (1 - ok_c)))
    snf, snf_c = plain["regression_smooth"], compat["regression_smooth"]
    out["nfr_smooth_c_vs_nfr_smooth"] = sign_test(
        _count(snf * (1 - snf_c)), _count(snf_c * (1 - snf))
    )
    diff = compat["new_score"] - plain["new_score"]
    out["score_sign_c_vs_score"] = sign_test(_count(diff > 0), _count(diff < 0))
    return out


# ------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapSpec:
    """Paired bootstrap settings: ``resamples`` draws from ``default_rng(seed)``, ``level``
    intervals (percentile method)."""

    resamples: int = 10_000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int):
            raise MuscleError(f"--bootstrap must be a whole number (got {self.resamples!r})")
        if self.resamples < 1:
            raise MuscleError(
                f"--bootstrap must be at least 1 resample (got {self.resamples}); "
                "10000 is the default"
            )
        if not 0 < self.level < 1:
            raise MuscleError(f"confidence level must be in (0, 1) (got {self.level})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "paired bootstrap, percentile interval",
            "level": self.level,
            "resamples": self.resamples,
            "seed": self.seed,
        }


# Index elements drawn per block: the (rows, n) int64 index and weight matrices stay ~1 MB, which
# keeps bincount's scattered increments in cache.
_BLOCK_ELEMENTS = 1 << 17


def bootstrap_means(columns: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(B, k) means of the columns of ``columns`` (n, k) over B = ``resamples`` resamples.

    Draws block by block; numpy's Generator gives the same index stream whether the
    (rows, n) indices are drawn at once or one row per call, so resample b is the b-th draw
    ``rng.integers(0, n, size=n)`` whatever the block size.
    """
    n, k = columns.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, k))
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        idx = rng.integers(0, n, size=(rows, n))  # (rows, n) example indices
        # How often each resample drew each example: one bincount over row-offset indices.
        flat = (idx + n * np.arange(rows)[:, None]).ravel()
        weights = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        out[start : start + rows] = weights @ columns / n  # (rows, k)
    return out


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def percentile_interval(samples: np.ndarray, level: float) -> Interval:
    """The central ``level`` percentile interval of 1-D ``samples`` (linear interpolation)."""
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [tail, 1 - tail])
    return Interval(float(low), float(high))


def _resampled_metrics(cols_list: list[Columns], spec: BootstrapSpec) -> list[dict[str, Any]]:
    """FLIP_METRICS over resamples for several column sets of the same n examples, resampled
    jointly (the same drawn indices for all): one dict of (B,) arrays (or None) per set."""
    names = [[name for name in METRIC_COLUMNS if name in cols] for cols in cols_list]
    matrix = np.column_stack(
        [cols[name] for cols, ns in zip(cols_list, names, strict=True) for name in ns]
    )
    means = bootstrap_means(matrix, spec.resamples, spec.seed)  # (B, total columns)
    out, at = [], 0
    for ns in names:
        out.append(flip_metrics({name: means[:, at + i] for i, name in enumerate(ns)}))
        at += len(ns)
    return out


def _intervals(samples: dict[str, Any], keys: list[str], level: float) -> dict[str, Any]:
    return {
        key: None if samples[key] is None else percentile_interval(samples[key], level)
        for key in keys
    }


COMPARE_CI_KEYS = list(FLIP_METRICS)  # score_diff = new_score - old_score, then the rates
PAPER_CI_KEYS = [
    "score_v1",
    "score_v2",
    "score_v2c",
    "delta_score_c",
    "nfr",
    "nfr_c",
    "delta_nfr_c",
    "nfr_smooth",
    "nfr_smooth_c",
    "delta_nfr_smooth_c",
    "m_g",
    "m_g_c",
    "delta_m_g_c",
    "m_r",
    "m_r_c",
    "delta_m_r_c",
    "nfr_mc",
    "nfr_mc_c",
    "pfr",
    "pfr_c",
    "delta_pfr_c",
]


@dataclass(frozen=True)
class Uncertainty:
    """Intervals (None where the metric is undefined) and sign tests of one comparison or of
    the paper row."""

    ci: dict[str, Interval | None]
    tests: dict[str, SignTest | None]

    def ci_dict(self) -> dict[str, Any]:
        return {k: None if v is None else v.to_dict() for k, v in self.ci.items()}

    def tests_dict(self) -> dict[str, Any]:
        return {k: None if v is None else v.to_dict() for k, v in self.tests.items()}


def uncertainties(
    comparisons: Sequence[Columns],
    paper: tuple[Columns, Columns] | None,
    spec: BootstrapSpec,
) -> tuple[list[Uncertainty], Uncertainty | None]:
    """Intervals and tests of each OLD -> NEW comparison and of the paper row (v1 -> v2,
    v1 -> v2c: PAPER_CI_KEYS, :func:`paper_tests`).

    Column sets over the same number of examples are resampled in one pass, with the same
    drawn indices (joint across files); a set passed twice (the paper row's v1 -> v2 is
    usually the first comparison) is resampled once.
    """
    if paper is not None and len(paper[0]["delta"]) != len(paper[1]["delta"]):
        raise MuscleError("paper row: v1 -> v2 and v1 -> v2c must cover the same examples")
    unique = list({id(c): c for c in [*comparisons, *(paper or ())]}.values())
    samples: dict[int, dict[str, Any]] = {}
    for n in dict.fromkeys(len(c["delta"]) for c in unique):
        group = [c for c in unique if len(c["delta"]) == n]
        for cols, metrics in zip(group, _resampled_metrics(group, spec), strict=True):
            samples[id(cols)] = metrics
    per_comparison = [
        Uncertainty(_intervals(samples[id(c)], COMPARE_CI_KEYS, spec.level), comparison_tests(c))
        for c in comparisons
    ]
    row = None
    if paper is not None:
        plain, compat = paper
        fields = paper_fields(samples[id(plain)], samples[id(compat)])
        row = Uncertainty(_intervals(fields, PAPER_CI_KEYS, spec.level), paper_tests(plain, compat))
    return per_comparison, row


def comparison_uncertainty(cols: Columns, spec: BootstrapSpec) -> Uncertainty:
    """Intervals for COMPARE_CI_KEYS and the tests of :func:`comparison_tests`, OLD -> NEW."""
    return uncertainties([cols], None, spec)[0][0]


def paper_uncertainty(plain: Columns, compat: Columns, spec: BootstrapSpec) -> Uncertainty:
    """Intervals for PAPER_CI_KEYS (v1, v2, v2c resampled jointly) and :func:`paper_tests`."""
    row = uncertainties([], (plain, compat), spec)[1]
    assert row is not None  # a paper pair was given
    return row
