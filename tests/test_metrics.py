"""Per-example task metrics (GSM8K, ROUGE-1, multiple choice, ``muscle.task_metrics``) and the
paper's compatibility metrics (``muscle.flips``), checked against numbers worked out by hand."""

from __future__ import annotations

import pytest

from muscle import MuscleError
from muscle.flips import compare, paper_row
from muscle.task_metrics import (
    GSM8K_INVALID,
    gsm8k_answer,
    gsm8k_exact_match,
    gsm8k_extract,
    gsm8k_normalize,
    gsm8k_target,
    multiple_choice,
    rouge1,
)


def rec(i, prediction, target, score=None, correct="auto"):
    """A predictions record; by default right/wrong by equality, score 1.0/0.0."""
    if correct == "auto":
        correct = prediction == target
    if score is None:
        score = float(correct)
    return {"id": i, "prediction": prediction, "target": target, "correct": correct, "score": score}


def records(preds, targets):
    return [rec(i, p, t) for i, (p, t) in enumerate(zip(preds, targets, strict=True))]


# ------------------------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18", "18"),
        ("#### -3", "-3"),
        ("#### 1,000.5 is it. Or #### 7", "1,000.5"),  # the FIRST '#### ' match
        ("The answer is 18.", GSM8K_INVALID),  # strict needs '#### '
        ("####18", GSM8K_INVALID),  # and the space after it
    ],
)
def test_gsm8k_strict_match(generation, expected):
    assert gsm8k_extract(generation, "strict-match") == expected


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("The answer is $1,000.", "$1,000."),  # group 1 keeps '$', ',' and the final '.'
        ("I had 3 apples, then 5, so -3", "-3"),  # last match; '-3' is group 2 (one digit)
        ("5 apples and 7 pears make 12 fruits", "12"),
        ("no number here", GSM8K_INVALID),
        ("Hmm.", GSM8K_INVALID),  # a lone '.' is shorter than {2,}
        ("So it is 12. Done...", "..."),  # lm-eval quirk: '...' matches [$0-9.,]{2,}
    ],
)
def test_gsm8k_flexible_extract(generation, expected):
    assert gsm8k_extract(generation, "flexible-extract") == expected


def test_gsm8k_normalisation_follows_the_yaml_regexes_in_order():
    assert gsm8k_normalize("$1,000.") == "1000"
    assert gsm8k_normalize("Step one...\n#### 1,234") == "1234"  # (?s).*#### spans lines
    assert gsm8k_normalize("5..") == "5."  # '\.$' removes ONE trailing dot: not idempotent
    assert gsm8k_normalize("[invalid]") == "[invalid]"
    assert gsm8k_normalize("18.00") == "18.00"  # no numeric comparison: 18.00 != 18


def test_gsm8k_target_and_exact_match():
    answer = (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"
    )
    assert gsm8k_target(answer) == "1,018"
    assert gsm8k_answer("It is $1,018.", "flexible-extract") == "1018"
    assert gsm8k_exact_match("It is $1,018.", answer, "flexible-extract")
    assert not gsm8k_exact_match("It is $1,018.", answer, "strict-match")  # [invalid]
    assert gsm8k_exact_match("so...\n#### 1018", answer)
    assert not gsm8k_exact_match("#### $1,018", answer, "strict-match")  # no '$' in strict's class
    assert not gsm8k_exact_match("It is 1018.00", answer, "flexible-extract")
    with pytest.raises(MuscleError, match="extraction mode"):
        gsm8k_extract("#### 1", "lenient")


# ---------------------------------------------------------------------------------- ROUGE-1


def test_rouge1_hand_computed_unigram_f1():
    # Unigrams (no token here is longer than 3 characters, so stemming cannot matter):
    # ref  the x2, cat, sat, on, mat (6)   pred the, cat, lay, on, a, mat (6)
    # overlap min-counts: the 1 + cat 1 + on 1 + mat 1 = 4 -> P = 4/6, R = 4/6, F = 2/3.
    assert rouge1("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3)


def test_rouge1_uses_the_stemmer():
    # With the Porter stemmer dogs->dog, running->run, runs->run:
    # pred {the, dog, were, run} (4), ref {the, dog, run} (3): overlap 3 -> P 3/4, R 1,
    # F = 2 * 0.75 * 1 / 1.75 = 6/7. Without stemming only "the" overlaps: F = 2/7.
    assert rouge1("The dogs were running!", "the dog runs") == pytest.approx(6 / 7)


@pytest.mark.parametrize(
    "prediction, reference",
    [
        (
            "Amanda baked cookies and will bring Jerry some tomorrow.",
            "Amanda will bring Jerry cookies she baked.",
        ),
        ("Tom and Ann meet at 8 at the cinema.", "Ann and Tom are going to the cinema at 8 pm."),
        ("", "Nothing was said."),
    ],
)
def test_rouge1_equals_rouge_score(prediction, reference):
    from rouge_score import rouge_scorer

    own = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    assert rouge1(prediction, reference) == own.score(reference, prediction)["rouge1"].fmeasure


# -------------------------------------------------------------------------- multiple choice


def test_acc_norm_differs_from_acc():
    # acc: argmax(-10, -12) = 0 != gold 1. acc_norm: -10/5 = -2.0 < -12/20 = -0.6 -> 1 == gold.
    r = multiple_choice([-10.0, -12.0], ["short", "a much longer choice"], gold=1)
    assert (r.pred, r.pred_norm, r.acc, r.acc_norm) == (0, 1, False, True)


def test_multiple_choice_ties_go_to_the_first_index_and_gold_lists():
    r = multiple_choice([-3.0, -3.0, -5.0], ["abc", "abc", "abc"], gold=1)
    assert (r.pred, r.acc) == (0, False)
    assert multiple_choice([-3.0, -3.0], ["ab", "ab"], gold=[0, 1]).acc
    with pytest.raises(MuscleError):
        multiple_choice([-1.0], ["a", "b"], gold=0)


# -------------------------------------------------------------------- compatibility metrics

# OLD/NEW predictions against targets, example by example:
#   id  target  old  new   quadrant       NF  NF_mc (new wrong and new != old)   D
#   0   0       0    0     both correct   .   .                                  0
#   1   0       1    0     gain           .   .                                  +1
#   2   2       2    1     regression     x   x                                  -1
#   3   1       3    2     both wrong     .   x  (wrong -> a different wrong)    0
#   4   1       1    1     both correct   .   .                                  0
#   5   0       2    2     both wrong     .   .  (same wrong answer)             0
TARGETS = [0, 0, 2, 1, 1, 0]
OLD = [0, 1, 2, 3, 1, 2]
NEW = [0, 0, 1, 2, 1, 2]


def test_flips_by_hand():
    r = compare(records(OLD, TARGETS), records(NEW, TARGETS))
    assert (r.both_correct, r.gain, r.regression, r.both_wrong) == (2, 1, 1, 2)
    assert r.nfr == pytest.approx(1 / 6)  # id 2
    assert r.pfr == pytest.approx(1 / 6)  # id 1
    assert r.nfr_mc == pytest.approx(2 / 6)  # ids 2 and 3: both-wrong-but-different counts
    assert r.old_score == r.new_score == pytest.approx(3 / 6)
    # Right/wrong scores: the smooth rates equal the discrete ones, |D| = 1 on every flip.
    assert (r.pfr_smooth, r.nfr_smooth, r.m_g, r.m_r) == pytest.approx((1 / 6, 1 / 6, 1, 1))


def test_to_dict_keys_are_exact():
    r = compare(records(OLD, TARGETS), records(NEW, TARGETS))
    assert list(r.to_dict()) == [
        "n",
        "old_score",
        "new_score",
        "pfr",
        "nfr",
        "nfr_mc",
        "pfr_smooth",
        "nfr_smooth",
        "m_g",
        "m_r",
        "both_correct",
        "gain",
        "regression",
        "both_wrong",
    ]


def test_pairing_is_by_id_not_by_position():
    new = list(reversed(records(NEW, TARGETS)))
    assert (
        compare(records(OLD, TARGETS), new).to_dict()
        == compare(records(OLD, TARGETS), records(NEW, TARGETS)).to_dict()
    )


def test_a_tie_in_the_new_model_is_a_negative_flip():
    # Gold is choice 1 for both examples. Old: clear winners. New: example 0 ties choices 0 and 1
    # -> argmax picks 0 (first index) -> wrong: one regression out of two, NFR = 1/2.
    old_mc = [multiple_choice(lls, ["ab", "cd"], 1) for lls in ([-5.0, -1.0], [-5.0, -1.0])]
    new_mc = [multiple_choice(lls, ["ab", "cd"], 1) for lls in ([-2.0, -2.0], [-5.0, -1.0])]
    old = [rec(i, m.pred, 1) for i, m in enumerate(old_mc)]
    new = [rec(i, m.pred, 1) for i, m in enumerate(new_mc)]
    r = compare(old, new)
    assert (r.nfr, r.regression, r.both_correct) == (0.5, 1, 1)


def test_predictions_compare_by_json_value_and_type():
    # Both wrong in all three; only id 0 changes its answer (2 -> "2" is a different JSON value);
    # key order and tuple/list do not count as changes. NFR_mc = 1/3, NFR = 0.
    old = [rec(0, 2, 9), rec(1, {"a": 1, "b": 2}, 9), rec(2, [1, 2], 9)]
    new = [rec(0, "2", 9), rec(1, {"b": 2, "a": 1}, 9), rec(2, (1, 2), 9)]
    r = compare(old, new)
    assert r.nfr == 0 and r.nfr_mc == pytest.approx(1 / 3)


def test_smooth_metrics_on_continuous_scores():
    # SAMSum-like: correct is null, scores are ROUGE-1.
    #   old  0.50 0.40 0.30 0.70
    #   new  0.75 0.40 0.10 0.20
    #   D   +0.25 0   -0.20 -0.50
    # smooth PFR = 1/4, smooth NFR = 2/4, m_g = 0.25, m_r = (0.20 + 0.50) / 2 = 0.35
    old = [rec(i, f"o{i}", "ref", s, None) for i, s in enumerate([0.5, 0.4, 0.3, 0.7])]
    new = [rec(i, f"n{i}", "ref", s, None) for i, s in enumerate([0.75, 0.4, 0.1, 0.2])]
    r = compare(old, new)
    assert r.pfr_smooth == 0.25 and r.nfr_smooth == 0.5
    assert r.m_g == pytest.approx(0.25) and r.m_r == pytest.approx(0.35)
    assert r.old_score == pytest.approx(0.475) and r.new_score == pytest.approx(0.3625)
    d = r.to_dict()
    assert all(
        d[k] is None
        for k in ("pfr", "nfr", "nfr_mc", "both_correct", "gain", "regression", "both_wrong")
    )
    with pytest.raises(MuscleError, match="nfr_smooth"):
        r.metric("nfr")
    assert r.metric("m_r") == pytest.approx(0.35)


def test_m_g_and_m_r_are_zero_when_there_is_nothing_to_average():
    # new never beats old: no gains -> m_g = 0 (not NaN); no change at all -> m_r = 0 too.
    old = [rec(i, "x", "ref", s, None) for i, s in enumerate([0.5, 0.9])]
    worse = [rec(i, "y", "ref", s, None) for i, s in enumerate([0.5, 0.4])]
    r = compare(old, worse)
    assert (r.pfr_smooth, r.m_g, r.nfr_smooth) == (0.0, 0.0, 0.5)
    assert r.m_r == pytest.approx(0.5)
    same = compare(old, old)
    assert (same.m_g, same.m_r, same.nfr_smooth) == (0.0, 0.0, 0.0)


def test_different_ids_need_intersect():
    old = records(OLD, TARGETS)  # ids 0..5
    new = [dict(r, id=r["id"] + 2) for r in records(NEW, TARGETS)]  # ids 2..7
    with pytest.raises(MuscleError, match=r"2 ids only in OLD.*2 only in NEW.*--intersect"):
        compare(old, new)
    assert compare(old, new, intersect=True).n == 4


def test_paper_row_by_hand():
    # v2c fixes id 2 (the regression) and keeps id 3's old wrong answer:
    #   NFR = 1/6, NFR_c = 0 -> dNFR_c = -1/6, d%NFR_c = -100%; NFR_mc_c = 0;
    #   scores v1 3/6, v2 3/6, v2c 4/6 -> dscore_c = +1/6.
    v2c = [0, 0, 2, 3, 1, 2]
    row = paper_row(records(OLD, TARGETS), records(NEW, TARGETS), records(v2c, TARGETS))
    assert row.delta_score_c == pytest.approx(1 / 6)
    assert (row.nfr, row.nfr_c) == pytest.approx((1 / 6, 0.0))
    assert row.delta_nfr_c == pytest.approx(-1 / 6) and row.rel_delta_nfr_c == pytest.approx(-1)
    assert (row.nfr_mc, row.nfr_mc_c) == pytest.approx((2 / 6, 0.0))
    assert row.delta_m_r_c == pytest.approx(-1.0)  # m_r: 1 (one flip of size 1) -> 0 (none)
    assert row.delta_pfr_c == pytest.approx(0.0)


def test_paper_row_relative_delta_is_null_when_nfr_is_zero():
    row = paper_row(records(OLD, TARGETS), records(OLD, TARGETS), records(NEW, TARGETS))
    assert row.nfr == 0 and row.rel_delta_nfr_c is None and row.rel_delta_nfr_smooth_c is None


def test_old_import_path_reexports_the_same_objects():
    # muscle.metrics is kept for one release as a re-export of the two modules it was split into.
    import muscle.flips
    import muscle.metrics
    import muscle.task_metrics

    assert muscle.metrics.compare is muscle.flips.compare
    assert muscle.metrics.paper_row is muscle.flips.paper_row
    assert muscle.metrics.CompareResult is muscle.flips.CompareResult
    assert muscle.metrics.multiple_choice is muscle.task_metrics.multiple_choice
    assert muscle.metrics.gsm8k_answer is muscle.task_metrics.gsm8k_answer
    assert muscle.metrics.rouge1 is muscle.task_metrics.rouge1
