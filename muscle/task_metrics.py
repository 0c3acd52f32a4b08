"""Per-example task metrics: GSM8K exact match, ROUGE-1 (SAMSum), multiple-choice acc/acc_norm.

Pure functions over plain Python values: nothing here imports torch or a model, so the metrics
can be checked by hand. Re-implemented from their definitions, matching the reference
evaluators:

* GSM8K exact match as lm-eval-harness 0.4.x defines the ``gsm8k`` task
  (``lm_eval/tasks/gsm8k/gsm8k.yaml``, filters from ``lm_eval/filters/extraction.py``,
  ``exact_match`` from ``lm_eval/api/metrics.py``);
* ROUGE-1 F-measure (SAMSum) with Google's ``rouge_score`` package;
* multiple-choice ``acc`` / ``acc_norm`` from per-choice log-likelihoods, as lm-eval's
  ``ConfigurableTask.process_results`` computes them for ``output_type: multiple_choice``.

The compatibility ("flip") metrics between two models' predictions live in ``muscle.flips``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
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
