"""Compatibility ("flip") metrics of an update over examples paired by id (paper Sec. 3).

With v1 = OLD and v2 = NEW::

    NF(x)     = [v1(x) = y] and [v2(x) != y]              NFR    = mean NF   ("regression")
    PF(x)     = [v1(x) != y] and [v2(x) = y]              PFR    = mean PF   ("gain")
    NF_mc(x)  = [v2(x) != y] and [v1(x) != v2(x)]         NFR_mc = mean NF_mc
    D(x)      = S(v2(x), y) - S(v1(x), y)
    smooth PFR = mean [D > 0]        smooth NFR = mean [D < 0]
    m_g = mean of D over D > 0       m_r = mean of |D| over D < 0      (0 when the set is empty)

Rates are fractions in [0, 1] (the paper prints them x100).

Every metric is a function of the means of a few per-example columns (:func:`flip_columns`,
:data:`FLIP_METRICS`): the point estimates here and the bootstrap resamples of
``muscle.flip_stats`` evaluate the same definitions, on the full sample or on a resample.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from muscle import MuscleError

DISCRETE_METRICS = ("pfr", "nfr", "nfr_mc", "both_correct", "gain", "regression", "both_wrong")


def canonical_prediction(value: Any) -> str:
    """A prediction as canonical JSON, so that predictions compare by value and type.

    2 (a choice index) and "2" (a string answer) differ; so do 1 and true; dict key order and
    tuple-vs-list do not matter.
    """
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------------------------- pairing


def pair_records(
    old_records: Sequence[dict], new_records: Sequence[dict], *, intersect: bool = False
) -> list[tuple[dict, dict]]:
    """Pairs of (old, new) records with the same ``id``, in OLD's order.

    Different id sets are an error unless ``intersect`` (then only common ids are kept).
    """
    old_ids = set(_unique_ids(old_records, "OLD"))
    new_by_id = dict(zip(_unique_ids(new_records, "NEW"), new_records, strict=True))
    only_old = [rec["id"] for rec in old_records if rec["id"] not in new_by_id]
    only_new = [rec["id"] for rec in new_records if rec["id"] not in old_ids]
    common = len(old_records) - len(only_old)
    if (only_old or only_new) and not intersect:
        raise MuscleError(
            f"OLD and NEW cover different examples: {len(only_old)} ids only in OLD"
            f"{_examples(only_old)}, {len(only_new)} only in NEW{_examples(only_new)}; "
            f"pass --intersect to compare the {common} common ids"
        )
    if common == 0:
        raise MuscleError("OLD and NEW have no example id in common: nothing to compare")
    return [(rec, new_by_id[rec["id"]]) for rec in old_records if rec["id"] in new_by_id]


def _unique_ids(records: Sequence[dict], name: str) -> list[Any]:
    ids = [rec["id"] for rec in records]
    if len(set(ids)) != len(ids):
        seen: set[Any] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise MuscleError(f"{name} has id {json.dumps(dup)} more than once")
    return ids


def _examples(ids: list[Any], k: int = 3) -> str:
    if not ids:
        return ""
    shown = ", ".join(json.dumps(i) for i in ids[:k])
    return f" (e.g. {shown}{', ...' if len(ids) > k else ''})"


# ---------------------------------------------------------------------- per-example columns

Columns = dict[str, np.ndarray]  # name -> (n,) float64, one entry per paired example


def flip_columns(pairs: Sequence[tuple[dict, dict]]) -> Columns:
    """Per-example columns (each (n,) float64, 0/1 for indicators) whose means give the metrics.

    Always: ``old_score``, ``new_score``, ``delta`` (D), ``gain_smooth`` [D > 0],
    ``regression_smooth`` [D < 0], ``delta_pos`` (D where D > 0, else 0), ``delta_neg`` (|D|
    where D < 0, else 0). When every record has ``correct``: ``old_correct``, ``new_correct``,
    ``gain`` (PF), ``regression`` (NF), ``nf_mc``, ``both_correct``, ``both_wrong``.
    """
    old = np.array([float(o["score"]) for o, _ in pairs])
    new = np.array([float(w["score"]) for _, w in pairs])
    delta = new - old
    cols: Columns = {
        "old_score": old,
        "new_score": new,
        "delta": delta,
        "gain_smooth": (delta > 0).astype(np.float64),
        "regression_smooth": (delta < 0).astype(np.float64),
        "delta_pos": np.where(delta > 0, delta, 0.0),
        "delta_neg": np.where(delta < 0, -delta, 0.0),
    }
    if all(o["correct"] is not None and w["correct"] is not None for o, w in pairs):
        old_ok = np.array([bool(o["correct"]) for o, _ in pairs])
        new_ok = np.array([bool(w["correct"]) for _, w in pairs])
        changed = np.array(
            [
                canonical_prediction(o["prediction"]) != canonical_prediction(w["prediction"])
                for o, w in pairs
            ]
        )
        indicators = {
            "old_correct": old_ok,
            "new_correct": new_ok,
            "gain": ~old_ok & new_ok,
            "regression": old_ok & ~new_ok,
            "nf_mc": ~new_ok & changed,
            "both_correct": old_ok & new_ok,
            "both_wrong": ~old_ok & ~new_ok,
        }
        cols.update({k: v.astype(np.float64) for k, v in indicators.items()})
    return cols


def has_correct(cols: Columns) -> bool:
    return "regression" in cols


def column_means(cols: Columns) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in cols.items()}


def ratio(num: Any, den: Any) -> Any:
    """num / den, 0 where den is 0 (m_g, m_r of an empty set); scalars or arrays."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)
    return out if out.ndim else float(out)


# Metric -> its value from column means. Each mean is a float (the point estimate) or a (B,)
# array (B bootstrap resamples): the same function serves both.
Means = Mapping[str, Any]
FLIP_METRICS: dict[str, Callable[[Means], Any]] = {
    "old_score": lambda m: m["old_score"],
    "new_score": lambda m: m["new_score"],
    "score_diff": lambda m: m["delta"],  # new_score - old_score
    "pfr": lambda m: m["gain"],
    "nfr": lambda m: m["regression"],
    "nfr_mc": lambda m: m["nf_mc"],
    "pfr_smooth": lambda m: m["gain_smooth"],
    "nfr_smooth": lambda m: m["regression_smooth"],
    "m_g": lambda m: ratio(m["delta_pos"], m["gain_smooth"]),
    "m_r": lambda m: ratio(m["delta_neg"], m["regression_smooth"]),
}
# Metrics that need `correct`: None for continuous scores such as ROUGE-1.
NEEDS_CORRECT = frozenset({"pfr", "nfr", "nfr_mc"})
# The columns FLIP_METRICS reads (all that a bootstrap needs to resample).
METRIC_COLUMNS = (
    "old_score",
    "new_score",
    "delta",
    "gain",
    "regression",
    "nf_mc",
    "gain_smooth",
    "regression_smooth",
    "delta_pos",
    "delta_neg",
)


def flip_metrics(means: Means) -> dict[str, Any]:
    """Every FLIP_METRICS entry from column means; None for the discrete ones without `correct`."""
    with_correct = "regression" in means
    return {
        name: None if name in NEEDS_CORRECT and not with_correct else fn(means)
        for name, fn in FLIP_METRICS.items()
    }


# ------------------------------------------------------------------------- OLD -> NEW result


@dataclass(frozen=True)
class CompareResult:
    """Compatibility of an update OLD -> NEW over ``n`` paired examples (paper Sec. 3).

    The discrete fields (flip rates and quadrant counts) are None when the task has no notion
    of a correct answer (``correct`` is null, e.g. SAMSum ROUGE-1); the smooth ones always exist.
    """

    n: int
    old_score: float
    new_score: float
    pfr: float | None
    nfr: float | None
    nfr_mc: float | None
    pfr_smooth: float
    nfr_smooth: float
    m_g: float
    m_r: float
    both_correct: int | None
    gain: int | None
    regression: int | None
    both_wrong: int | None
    # Per-example D = score_new - score_old, in pairing order (for plots; not in to_dict()).
    deltas: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def has_correct(self) -> bool:
        return self.nfr is not None

    @property
    def score_diff(self) -> float:
        """new_score - old_score (not in to_dict(): its keys stay those of the paper)."""
        return self.new_score - self.old_score

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["deltas"]
        return out

    def metric(self, name: str) -> float | int:
        """One metric by name; a MuscleError when it is undefined for this task."""
        if name not in self.to_dict():
            raise MuscleError(f"unknown metric {name!r}: choose one of {', '.join(self.to_dict())}")
        value = getattr(self, name)
        if value is None:
            raise MuscleError(
                f"{name} is undefined here: the predictions have no `correct` field "
                "(a continuous score such as ROUGE-1); use the smooth metrics "
                "nfr_smooth, pfr_smooth, m_g and m_r instead"
            )
        return value


def result_from_columns(cols: Columns) -> CompareResult:
    """The CompareResult of paired per-example columns (from :func:`flip_columns`)."""
    metrics = flip_metrics(column_means(cols))
    counts: dict[str, int | None] = {
        key: int(cols[key].sum()) if has_correct(cols) else None
        for key in ("both_correct", "gain", "regression", "both_wrong")
    }
    return CompareResult(
        n=len(cols["delta"]),
        deltas=tuple(float(d) for d in cols["delta"]),
        **{f.name: metrics[f.name] for f in fields(CompareResult) if f.name in metrics},
        **counts,
    )


def paired_columns(
    old_records: Sequence[dict], new_records: Sequence[dict], *, intersect: bool = False
) -> Columns:
    return flip_columns(pair_records(old_records, new_records, intersect=intersect))


def compare(
    old_records: Sequence[dict], new_records: Sequence[dict], *, intersect: bool = False
) -> CompareResult:
    """Compatibility metrics of the update OLD -> NEW (records as in PREDICTIONS_FORMAT.md)."""
    return result_from_columns(paired_columns(old_records, new_records, intersect=intersect))


# ---------------------------------------------------------------------- the paper's table row


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Tables 3-5 for v1 -> v2 (plain update) and v1 -> v2c (MUSCLE).

    ``rel_delta_*`` is the paper's "Delta%": the delta divided by the v1 -> v2 value, as a
    fraction (-0.406 is the paper's -40.6); None when that value is 0 or undefined.
    """

    n: int
    score_v1: float
    score_v2: float
    score_v2c: float
    delta_score_c: float  # score(v2c) - score(v2)
    nfr: float | None  # v1 -> v2
    nfr_c: float | None  # v1 -> v2c
    delta_nfr_c: float | None
    rel_delta_nfr_c: float | None
    nfr_smooth: float
    nfr_smooth_c: float
    delta_nfr_smooth_c: float
    rel_delta_nfr_smooth_c: float | None
    m_g: float
    m_g_c: float
    delta_m_g_c: float  # Table 5: m_g(v1 -> v2c) - m_g(v1 -> v2)
    m_r: float
    m_r_c: float
    delta_m_r_c: float
    nfr_mc: float | None
    nfr_mc_c: float | None
    pfr: float | None
    pfr_c: float | None
    delta_pfr_c: float | None  # Table 6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _delta(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a - b


def _relative(delta: float | None, base: float | None) -> float | None:
    return None if delta is None or not base else delta / base


def paper_fields(plain: Mapping[str, Any], compat: Mapping[str, Any]) -> dict[str, Any]:
    """PaperRow's fields except ``n`` and the ``rel_delta_*`` ratios, from the FLIP_METRICS of
    v1 -> v2 (``plain``) and v1 -> v2c (``compat``): floats, or (B,) arrays of resamples."""
    return {
        "score_v1": plain["old_score"],
        "score_v2": plain["new_score"],
        "score_v2c": compat["new_score"],
        "delta_score_c": compat["new_score"] - plain["new_score"],
        "nfr": plain["nfr"],
        "nfr_c": compat["nfr"],
        "delta_nfr_c": _delta(compat["nfr"], plain["nfr"]),
        "nfr_smooth": plain["nfr_smooth"],
        "nfr_smooth_c": compat["nfr_smooth"],
        "delta_nfr_smooth_c": compat["nfr_smooth"] - plain["nfr_smooth"],
        "m_g": plain["m_g"],
        "m_g_c": compat["m_g"],
        "delta_m_g_c": compat["m_g"] - plain["m_g"],
        "m_r": plain["m_r"],
        "m_r_c": compat["m_r"],
        "delta_m_r_c": compat["m_r"] - plain["m_r"],
        "nfr_mc": plain["nfr_mc"],
        "nfr_mc_c": compat["nfr_mc"],
        "pfr": plain["pfr"],
        "pfr_c": compat["pfr"],
        "delta_pfr_c": _delta(compat["pfr"], plain["pfr"]),
    }


def paper_columns(
    v1: Sequence[dict], v2: Sequence[dict], v2c: Sequence[dict], *, intersect: bool = False
) -> tuple[Columns, Columns]:
    """Columns of v1 -> v2 and v1 -> v2c over the same examples, row for row (v1's order).

    With ``intersect`` the ids common to all three files; without it they must be equal.
    """
    if intersect:
        common = {r["id"] for r in v1} & {r["id"] for r in v2} & {r["id"] for r in v2c}
        v1, v2, v2c = ([r for r in recs if r["id"] in common] for recs in (v1, v2, v2c))
    return paired_columns(v1, v2), paired_columns(v1, v2c)


def paper_row_from_columns(plain: Columns, compat: Columns) -> PaperRow:
    values = paper_fields(flip_metrics(column_means(plain)), flip_metrics(column_means(compat)))
    return PaperRow(
        n=len(plain["delta"]),
        rel_delta_nfr_c=_relative(values["delta_nfr_c"], values["nfr"]),
        rel_delta_nfr_smooth_c=_relative(values["delta_nfr_smooth_c"], values["nfr_smooth"]),
        **values,
    )


def paper_row(
    v1: Sequence[dict], v2: Sequence[dict], v2c: Sequence[dict], *, intersect: bool = False
) -> PaperRow:
    """The paper's table row for records of v1, v2 and the compatibility model v2c.

    Both comparisons run over the same examples: with ``intersect`` the ids common to all three.
    """
    return paper_row_from_columns(*paper_columns(v1, v2, v2c, intersect=intersect))
