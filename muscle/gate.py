"""A regression gate for CI: ``muscle-eval compare OLD NEW --fail-if 'nfr > 0.03'``.

A condition is ``<metric> <op> <number>``: op one of ``>``, ``>=``, ``<``, ``<=``; the number a
decimal (``0.03``, ``-1e-3``) or a percentage (``3%`` = 0.03). Every metric is a fraction
(rates, scores, score differences), so a bare number outside [-1, 1] (``nfr > 3``) is refused
as a likely percent typo. The condition states what FAILS the gate; it is checked on every
OLD -> NEW comparison of the report (each NEW file against OLD). Parsed with one regular
expression and a table of operators: no ``eval``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from muscle import MuscleError
from muscle.flip_stats import Uncertainty
from muscle.flips import CompareResult

EXIT_GATE_FAILED = 3  # the report was produced, and a --fail-if condition holds

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}

# Point metrics a condition can name (-> what it is); each also as <name>_ci_low / _ci_high.
_BASE: dict[str, str] = {
    "nfr": "negative flip rate (needs `correct`)",
    "pfr": "positive flip rate (needs `correct`)",
    "nfr_mc": "NFR_mc: new wrong and changed (needs `correct`)",
    "nfr_smooth": "fraction of examples with D < 0",
    "pfr_smooth": "fraction of examples with D > 0",
    "m_g": "mean D over D > 0",
    "m_r": "mean |D| over D < 0",
    "old_score": "OLD's mean score",
    "new_score": "NEW's mean score",
    "score_drop": "old_score - new_score",
}
GATE_METRICS: dict[str, str] = {
    **_BASE,
    **{f"{m}_ci_low": f"low end of the bootstrap interval of {m}" for m in _BASE},
    **{f"{m}_ci_high": f"high end of the bootstrap interval of {m}" for m in _BASE},
}

_CONDITION = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<pct>%?)\s*$"
)


@dataclass(frozen=True)
class Condition:
    """``metric op threshold``: the gate fails where it holds."""

    metric: str
    op: str
    threshold: float
    text: str  # as the user wrote it

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)


def parse_condition(text: str) -> Condition:
    """One ``--fail-if`` expression; a one-line MuscleError when it is not one."""
    m = _CONDITION.match(text)
    if m is None:
        raise MuscleError(
            f"--fail-if {text!r} is not '<metric> <op> <number>' "
            "(op: > >= < <=; e.g. 'nfr > 0.03' or 'score_drop > 0.5%')"
        )
    metric = m["metric"]
    if metric not in GATE_METRICS:
        raise MuscleError(
            f"--fail-if {text!r}: unknown metric {metric!r}; known: {', '.join(_BASE)}, "
            "each also as <metric>_ci_low and <metric>_ci_high"
        )
    threshold = float(m["number"]) / (100 if m["pct"] else 1)
    if abs(threshold) > 1:
        hint = "" if m["pct"] else f": write {threshold / 100:g} or {threshold:g}% for percent"
        raise MuscleError(
            f"--fail-if {text!r}: {metric} is a fraction in [-1, 1], not {threshold:g}{hint}"
        )
    return Condition(metric, m["op"], threshold, text.strip())


def parse_conditions(texts: Sequence[str]) -> list[Condition]:
    return [parse_condition(t) for t in texts]


def gate_values(result: CompareResult, uncertainty: Uncertainty) -> dict[str, float | None]:
    """Every GATE_METRICS value of one comparison (None where undefined for the task)."""
    point = {name: getattr(result, name) for name in _BASE if name != "score_drop"}
    point["score_drop"] = result.old_score - result.new_score
    values: dict[str, float | None] = dict(point)
    for name in _BASE:
        if name == "score_drop":  # the interval of -(score_diff): bounds swap
            diff = uncertainty.ci["score_diff"]
            low = None if diff is None else -diff.high
            high = None if diff is None else -diff.low
        else:
            interval = uncertainty.ci[name]
            low = None if interval is None else interval.low
            high = None if interval is None else interval.high
        values[f"{name}_ci_low"], values[f"{name}_ci_high"] = low, high
    return values


def violations(
    conditions: Sequence[Condition],
    comparisons: Sequence[tuple[str, CompareResult, Uncertainty]],
) -> list[str]:
    """One line per (condition, comparison) where the condition holds.

    ``comparisons``: (label such as "v1 -> v2", result, uncertainty). A MuscleError when a
    condition names a metric these predictions do not define (NFR without `correct`).
    """
    lines = []
    for label, result, uncertainty in comparisons:
        values = gate_values(result, uncertainty)
        for cond in conditions:
            value = values[cond.metric]
            if value is None:
                raise MuscleError(
                    f"--fail-if {cond.text!r}: {cond.metric} is undefined for {label}: the "
                    "predictions have no `correct` field; gate on nfr_smooth, pfr_smooth, m_g, "
                    "m_r or score_drop instead"
                )
            if cond.holds(value):
                lines.append(
                    f"gate failed for {label}: --fail-if '{cond.text}' holds "
                    f"({cond.metric} = {value:.6g} = {100 * value:.2f}%)"
                )
    return lines
