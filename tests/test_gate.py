"""The --fail-if expression language: what parses, what is refused, when a condition holds."""

from __future__ import annotations

import pytest

from muscle import MuscleError
from muscle.flip_stats import BootstrapSpec, comparison_uncertainty
from muscle.flips import paired_columns, result_from_columns
from muscle.gate import Condition, gate_values, parse_condition, violations

TARGETS = [0, 0, 2, 1, 1, 0]
OLD = [0, 1, 2, 3, 1, 2]  # v1 -> v2 as in test_metrics.py: NFR = PFR = 1/6, scores 3/6 and 3/6
NEW = [0, 0, 1, 2, 1, 2]


def recs(preds, continuous=False):
    return [
        {
            "id": i,
            "prediction": p,
            "target": t,
            "correct": None if continuous else p == t,
            "score": float(p == t),
        }
        for i, (p, t) in enumerate(zip(preds, TARGETS, strict=True))
    ]


def comparison(old=OLD, new=NEW, continuous=False):
    cols = paired_columns(recs(old, continuous), recs(new, continuous))
    return result_from_columns(cols), comparison_uncertainty(cols, BootstrapSpec(resamples=200))


@pytest.mark.parametrize(
    "text, metric, op, threshold",
    [
        ("nfr > 0.03", "nfr", ">", 0.03),
        ("nfr>=3%", "nfr", ">=", 0.03),
        ("  score_drop  <  -0.01 ", "score_drop", "<", -0.01),
        ("score_drop > 5e-3", "score_drop", ">", 0.005),
        ("nfr_ci_high <= .1", "nfr_ci_high", "<=", 0.1),
        ("m_r > 0.5 %", "m_r", ">", 0.005),
        ("new_score < 1", "new_score", "<", 1.0),
    ],
)
def test_conditions_parse(text, metric, op, threshold):
    cond = parse_condition(text)
    assert (cond.metric, cond.op) == (metric, op)
    assert cond.threshold == pytest.approx(threshold)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("nfr >> 0.03", "is not '<metric> <op> <number>'"),
        ("nfr = 0.03", "is not '<metric> <op> <number>'"),
        ("nfr > abc", "is not '<metric> <op> <number>'"),
        ("nfr > 0.03 and pfr < 1", "is not '<metric> <op> <number>'"),
        ("__import__('os').system('true') > 0", "is not '<metric> <op> <number>'"),
        ("", "is not '<metric> <op> <number>'"),
        ("accuracy > 0.5", "unknown metric 'accuracy'"),
        ("nfr > 3", "write 0.03 or 3% for percent"),
        ("nfr > 300%", "a fraction in [-1, 1], not 3"),
    ],
)
def test_bad_conditions_are_one_line_errors(text, fragment):
    with pytest.raises(MuscleError) as err:
        parse_condition(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_each_operator_at_the_boundary():
    assert parse_condition("nfr > 0.5").holds(0.6) and not parse_condition("nfr > 0.5").holds(0.5)
    assert parse_condition("nfr >= 0.5").holds(0.5)
    assert parse_condition("nfr < 0.5").holds(0.4) and not parse_condition("nfr < 0.5").holds(0.5)
    assert parse_condition("nfr <= 0.5").holds(0.5)


def test_gate_values_by_hand():
    result, unc = comparison()
    values = gate_values(result, unc)
    assert values["nfr"] == pytest.approx(1 / 6) and values["score_drop"] == pytest.approx(0.0)
    # score_drop = -(score_diff): its interval is score_diff's, negated and swapped.
    diff = unc.ci["score_diff"]
    assert (values["score_drop_ci_low"], values["score_drop_ci_high"]) == (-diff.high, -diff.low)
    assert values["nfr_ci_high"] == unc.ci["nfr"].high


def test_violations_one_line_per_condition_and_comparison():
    result, unc = comparison()
    conds = [parse_condition(t) for t in ("nfr > 0.1", "pfr > 0.5", "score_drop >= 0")]
    lines = violations(conds, [("v1 -> v2", result, unc), ("v1 -> v2b", result, unc)])
    assert len(lines) == 4  # nfr and score_drop hold, on both comparisons; pfr does not
    assert lines[0].startswith("gate failed for v1 -> v2: --fail-if 'nfr > 0.1' holds (nfr = ")
    assert all("pfr" not in line for line in lines)
    assert violations([parse_condition("nfr > 0.2")], [("a -> b", result, unc)]) == []


def test_a_metric_the_task_does_not_define_is_a_usage_error():
    result, unc = comparison(continuous=True)
    with pytest.raises(MuscleError, match="nfr is undefined for s -> t.*nfr_smooth"):
        violations([parse_condition("nfr > 0.1")], [("s -> t", result, unc)])
    # The smooth metrics are defined: D < 0 on id 2 only, smooth NFR = 1/6 > 0.1.
    assert violations([parse_condition("nfr_smooth > 0.1")], [("s -> t", result, unc)])


def test_condition_keeps_the_text_as_written():
    assert parse_condition(" nfr > 3% ") == Condition("nfr", ">", 0.03, "nfr > 3%")
