"""Deprecated import path, kept for one release: task metrics moved to ``muscle.task_metrics``,
compatibility (flip) metrics to ``muscle.flips``. Import from those instead."""

from muscle.flips import (  # noqa: F401
    DISCRETE_METRICS,
    CompareResult,
    PaperRow,
    canonical_prediction,
    compare,
    pair_records,
    paper_row,
)
from muscle.task_metrics import (  # noqa: F401
    GSM8K_INVALID,
    GSM8K_MODES,
    ChoiceResult,
    gsm8k_answer,
    gsm8k_exact_match,
    gsm8k_extract,
    gsm8k_normalize,
    gsm8k_target,
    multiple_choice,
    rouge1,
)
