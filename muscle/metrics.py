"""Per-example task metrics and the compatibility metrics of the paper (Sec. 3).

Pure functions over plain Python values: nothing here imports torch or a model, so ``muscle-eval
compare`` stays fast and the metrics can be checked by hand.

Per-example metrics (re-implemented from their definitions, matching the reference evaluators):

* GSM8K exact match as lm-eval-harness 0.4.x defines the ``gsm8k`` task
  (``lm_eval/tasks/gsm8k/gsm8k.yaml``, filters from ``lm_eval/filters/extraction.py``,
  ``exact_match`` from ``lm_eval/api/metrics.py``);
* ROUGE-1 F-measure (SAMSum) with Google's ``rouge_score`` package;
* multiple-choice ``acc`` / ``acc_norm`` from per-choice log-likelihoods, as lm-eval's
  ``ConfigurableTask.process_results`` computes them for ``output_type: multiple_choice``.

Compatibility metrics over examples paired by id (paper Sec. 3.1-3.2), with v1 = OLD and
v2 = NEW::

    NF(x)     = [v1(x) = y] and [v2(x) != y]              NFR    = mean NF   ("regression")
    PF(x)     = [v1(x) != y] and [v2(x) = y]              PFR    = mean PF   ("gain")
    NF_mc(x)  = [v2(x) != y] and [v1(x) != v2(x)]         NFR_mc = mean NF_mc
    D(x)      = S(v2(x), y) - S(v1(x), y)
    smooth PFR = mean [D > 0]        smooth NFR = mean [D < 0]
    m_g = mean of D over D > 0       m_r = mean of |D| over D < 0      (0 when the set is empty)

Rates are fractions in [0, 1] (the paper prints them x100).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from muscle import MuscleError

# ----------------------------------------------------------------------------------- GSM8K
#
# lm_eval/tasks/gsm8k/gsm8k.yaml (task version 3.0) defines two filter pipelines over the raw
# generation, each a `regex` filter (lm_eval/filters/extraction.py, RegexFilter) followed by
# `take_first` (which picks the first of several *sampled responses*, not the first match):
#
#   strict-match:     regex_pattern "#### (\-?[0-9\.\,]+)", group_select 0   (first match)
#   flexible-extract: regex_pattern "(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select -1 (last match)
#
# RegexFilter runs `findall`, takes match[group_select]; when the pattern has several groups a
# match is a tuple and the first non-empty group is kept; the result is .strip()-ed. No match
# gives the fallback "[invalid]".
#
# The metric is `exact_match` with ignore_case: true, ignore_punctuation: false and
# regexes_to_ignore [",", "\$", "(?s).*#### ", "\.$"]: each regex is removed (re.sub with "")
# from BOTH the filtered prediction and the reference, in that order, then both are lower-cased,
# and the score is plain string equality. The reference is the whole `answer` field
# (doc_to_target "{{answer}}"); "(?s).*#### " strips the worked solution off it.

GSM8K_INVALID = "[invalid]"
GSM8K_MODES = ("strict-match", "flexible-extract")

_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))


def _regex_filter(pattern: re.Pattern[str], text: str, group_select: int) -> str:
    """One lm-eval `regex` filter applied to one response."""
    matches = pattern.findall(text)
    if not matches:
        return GSM8K_INVALID
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the alternative that matched
        match = next(group for group in match if group)
    return match.strip()


def gsm8k_extract(generation: str, mode: str = "strict-match") -> str:
    """The answer lm-eval's ``gsm8k`` filter ``mode`` extracts from a generation (not normalised).

    ``"[invalid]"`` when nothing matches, as lm-eval does.
    """
    if mode == "strict-match":
        return _regex_filter(_GSM8K_STRICT, generation, 0)
    if mode == "flexible-extract":
        return _regex_filter(_GSM8K_FLEXIBLE, generation, -1)
    raise MuscleError(f"unknown GSM8K extraction mode {mode!r}: use one of {GSM8K_MODES}")


def gsm8k_normalize(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k (regexes removed in order, then lower-case).

    Not idempotent ("5.." -> "5."): apply it once to the raw extraction and once to the reference.
    """
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def gsm8k_target(answer: str) -> str:
    """The gold final answer of a GSM8K ``answer`` field: the text after the last ``#### ``.

    Same as removing lm-eval's greedy ``(?s).*#### `` from the reference; the whole field when it
    has no ``#### ``.
    """
    head, sep, tail = answer.rpartition("#### ")
    return tail if sep else answer


def gsm8k_answer(generation: str, mode: str = "strict-match") -> str:
    """Extracted *and normalised* answer: the value to store as a GSM8K record's ``prediction``.

    ``correct`` is then ``gsm8k_answer(gen) == gsm8k_normalize(gsm8k_target(answer))``, and two
    models that wrote "18." and "$18" made the same prediction (NF_mc compares these).
    """
    return gsm8k_normalize(gsm8k_extract(generation, mode))


def gsm8k_exact_match(generation: str, answer: str, mode: str = "strict-match") -> bool:
    """lm-eval's gsm8k exact_match for one example (``answer``: the dataset's answer field)."""
    return gsm8k_answer(generation, mode) == gsm8k_normalize(answer)


# ----------------------------------------------------------------------------------- ROUGE-1
#
# The paper scores SAMSum with ROUGE-1 (Sec. 6.4, Table 5) without naming a stemming setting.
# lm-eval has no samsum task; Hugging Face `evaluate`'s rouge defaults to use_stemmer=False,
# while the summarisation recipes (transformers' run_summarization, most SAMSum papers) pass
# use_stemmer=True. We use use_stemmer=True (Porter stemming of tokens longer than 3 characters
# after rouge_score's lower-casing, non-alphanumeric-to-space tokenizer) and report F-measure.


@lru_cache(maxsize=1)
def _rouge1_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported lazily: it pulls in nltk's stemmer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure of ``prediction`` against ``reference``, in [0, 1]."""
    # rouge_score's argument order is (target, prediction).
    return float(_rouge1_scorer().score(reference, prediction)["rouge1"].fmeasure)


# ------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class ChoiceResult:
    """lm-eval's multiple-choice outcome for one example."""

    pred: int  # argmax of the log-likelihoods (ties -> first index, like np.argmax)
    pred_norm: int  # argmax of log-likelihood / character length of the choice
    acc: bool
    acc_norm: bool


def multiple_choice(
    loglikelihoods: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]
) -> ChoiceResult:
    """acc / acc_norm as lm-eval computes them for ``output_type: multiple_choice``.

    ``choices`` are the choice texts as the task's ``doc_to_choice`` gives them, WITHOUT the
    target delimiter (lm-eval scores ``" " + choice`` but normalises by ``len(choice)``).
    ``gold`` may be a list of acceptable indices (lm-eval: ``pred in gold``).
    """
    if len(loglikelihoods) != len(choices) or not choices:
        raise MuscleError(
            f"multiple_choice: {len(loglikelihoods)} log-likelihoods for {len(choices)} choices"
        )
    lengths = np.array([float(len(c)) for c in choices])
    if (lengths == 0).any():
        raise MuscleError("multiple_choice: an empty choice text has no length to normalise by")
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(lls / lengths))
    golds = {int(gold)} if isinstance(gold, (int, np.integer)) else {int(g) for g in gold}
    return ChoiceResult(pred, pred_norm, pred in golds, pred_norm in golds)


# ------------------------------------------------------------------- compatibility metrics

DISCRETE_METRICS = ("pfr", "nfr", "nfr_mc", "both_correct", "gain", "regression", "both_wrong")


def canonical_prediction(value: Any) -> str:
    """A prediction as canonical JSON, so that predictions compare by value and type.

    2 (a choice index) and "2" (a string answer) differ; so do 1 and true; dict key order and
    tuple-vs-list do not matter.
    """
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


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


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def compare(
    old_records: Sequence[dict], new_records: Sequence[dict], *, intersect: bool = False
) -> CompareResult:
    """Compatibility metrics of the update OLD -> NEW (records as in PREDICTIONS_FORMAT.md)."""
    pairs = pair_records(old_records, new_records, intersect=intersect)
    n = len(pairs)
    old_scores = [float(o["score"]) for o, _ in pairs]
    new_scores = [float(w["score"]) for _, w in pairs]
    deltas = [s_new - s_old for s_old, s_new in zip(old_scores, new_scores, strict=True)]
    gains = [d for d in deltas if d > 0]
    losses = [-d for d in deltas if d < 0]

    discrete: dict[str, Any] = dict.fromkeys(DISCRETE_METRICS)
    if all(o["correct"] is not None and w["correct"] is not None for o, w in pairs):
        discrete = _discrete_metrics(pairs)

    return CompareResult(
        n=n,
        old_score=_mean(old_scores),
        new_score=_mean(new_scores),
        pfr_smooth=len(gains) / n,
        nfr_smooth=len(losses) / n,
        m_g=_mean(gains),
        m_r=_mean(losses),
        deltas=tuple(deltas),
        **discrete,
    )


def _discrete_metrics(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    n = len(pairs)
    quad = {"both_correct": 0, "gain": 0, "regression": 0, "both_wrong": 0}
    nf_mc = 0
    for old, new in pairs:
        key = {
            (True, True): "both_correct",
            (False, True): "gain",
            (True, False): "regression",
            (False, False): "both_wrong",
        }[(bool(old["correct"]), bool(new["correct"]))]
        quad[key] += 1
        changed = canonical_prediction(old["prediction"]) != canonical_prediction(new["prediction"])
        nf_mc += (not new["correct"]) and changed
    return {
        "pfr": quad["gain"] / n,
        "nfr": quad["regression"] / n,
        "nfr_mc": nf_mc / n,
        **quad,
    }


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


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _relative(delta: float | None, base: float | None) -> float | None:
    return None if delta is None or not base else delta / base


def paper_row(
    v1: Sequence[dict], v2: Sequence[dict], v2c: Sequence[dict], *, intersect: bool = False
) -> PaperRow:
    """The paper's table row for records of v1, v2 and the compatibility model v2c.

    Both comparisons run over the same examples: with ``intersect`` the ids common to all three.
    """
    if intersect:
        common = {r["id"] for r in v1} & {r["id"] for r in v2} & {r["id"] for r in v2c}
        v1, v2, v2c = ([r for r in recs if r["id"] in common] for recs in (v1, v2, v2c))
    plain = compare(v1, v2)
    compat = compare(v1, v2c)
    delta_nfr = _delta(compat.nfr, plain.nfr)
    delta_smooth = compat.nfr_smooth - plain.nfr_smooth
    return PaperRow(
        n=plain.n,
        score_v1=plain.old_score,
        score_v2=plain.new_score,
        score_v2c=compat.new_score,
        delta_score_c=compat.new_score - plain.new_score,
        nfr=plain.nfr,
        nfr_c=compat.nfr,
        delta_nfr_c=delta_nfr,
        rel_delta_nfr_c=_relative(delta_nfr, plain.nfr),
        nfr_smooth=plain.nfr_smooth,
        nfr_smooth_c=compat.nfr_smooth,
        delta_nfr_smooth_c=delta_smooth,
        rel_delta_nfr_smooth_c=_relative(delta_smooth, plain.nfr_smooth),
        m_g=plain.m_g,
        m_g_c=compat.m_g,
        delta_m_g_c=compat.m_g - plain.m_g,
        m_r=plain.m_r,
        m_r_c=compat.m_r,
        delta_m_r_c=compat.m_r - plain.m_r,
        nfr_mc=plain.nfr_mc,
        nfr_mc_c=compat.nfr_mc,
        pfr=plain.pfr,
        pfr_c=compat.pfr,
        delta_pfr_c=_delta(compat.pfr, plain.pfr),
    )
