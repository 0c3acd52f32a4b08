"""The four tasks of the paper, declared once each, as data.

A task says where its examples come from (a Hugging Face hub dataset, or local JSONL files in
muscle's local data layout, DATA_FORMAT.md), how a raw record becomes an :class:`Example`
(context + answer text, choices or stop strings), and which metric scores it. Prompt formats
follow lm-eval-harness where it defines the task (PIQA, HellaSwag, GSM8K) and the paper's App. A.1
for SAMSum.

Logical splits, the same for every task:

* ``train`` / ``validation``: an 80/20 split of the task's *training source*, shuffled by
  ``split_seed`` (paper App. A.1). Used by the trainer and the cache.
* ``test``: the task's *evaluation source* (what lm-eval scores). Used by ``muscle-eval``.

Where the local data lacks a split we carve one out (documented per task below):

* HellaSwag has only its validation set locally (10,042 examples): examples whose ``idx`` is a
  multiple of 4 are the evaluation source (2,511), the rest (7,531) the training source. With
  ``source="hub"`` the real train (39,905) and validation splits are used.
* SAMSum has validation and test locally (the train split's license and size keep it out): the
  validation file (818) is the training source, test (819) the evaluation source. With
  ``source="hub"`` the real train (14,732) and test splits are used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muscle import MuscleError


@dataclass(frozen=True)
class Example:
    """One task example, rendered as text.

    ``context`` is the prompt; the model is trained on ``context + delimiter + answer`` and, for
    multiple choice, scored on ``delimiter + choice`` for each choice.
    """

    id: str | int
    context: str
    answer: str  # the gold continuation (MC: the gold choice text; generation: the reference)
    target: Any  # what the metric compares with: gold index, gold number, or reference text
    choices: tuple[str, ...] | None = None  # multiple choice only


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None
    train_split: str
    eval_split: str


@dataclass(frozen=True)
class LocalSource:
    folder: str  # under the data dir
    train_file: str
    eval_file: str
    # For a task whose local data has a single file: a predicate on the raw record that says
    # "this record belongs to the evaluation source" (the rest is the training source).
    eval_filter: Callable[[dict], bool] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "generate"
    metric: str  # "acc" (also acc_norm) | "exact_match" | "rouge1"
    hub: HubSource
    local: LocalSource
    required_fields: tuple[str, ...]
    to_example: Callable[[dict, int], Example]
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop_strings: tuple[str, ...] = ()
    num_fewshot: int = 0
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 0
    add_eos_to_answer: bool = False  # generation tasks learn to stop

    @property
    def has_correct(self) -> bool:
        """Whether each example has a right answer (so NFR applies), not just a score."""
        return self.metric != "rouge1"


# ---------------------------------------------------------------- PIQA (lm-eval: piqa.yaml)


def _piqa_example(rec: dict, i: int) -> Example:
    choices = (rec["sol1"], rec["sol2"])
    gold = int(rec["label"])
    return Example(
        id=i,
        context=f"Question: {rec['goal']}\nAnswer:",
        answer=choices[gold],
        target=gold,
        choices=choices,
    )


# --------------------------------------------------------- HellaSwag (lm-eval: hellaswag/utils.py)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning: WikiHow markers out, double spaces collapsed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_example(rec: dict, i: int) -> Example:
    if "ctx_a" in rec:  # hub schema: lm-eval capitalises ctx_b
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    else:  # local schema (DATA_FORMAT.md): ctx is ctx_a + " " + ctx_b, ctx_b not capitalised
        ctx = rec["ctx"]
    choices = tuple(hellaswag_preprocess(e) for e in rec["endings"])
    gold = int(rec["label"])
    return Example(
        id=int(rec.get("idx", rec.get("ind", i))),
        context=hellaswag_preprocess(rec["activity_label"] + ": " + ctx),
        answer=choices[gold],
        target=gold,
        choices=choices,
    )


# ------------------------------------------------------------------ GSM8K (lm-eval: gsm8k.yaml)


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K reference solution: the text after ``#### ``."""
    return answer.split("####")[-1].strip()


def _gsm8k_example(rec: dict, i: int) -> Example:
    return Example(
        id=i,
        context=f"Question: {rec['question']}\nAnswer:",
        answer=rec["answer"],
        target=gsm8k_gold(rec["answer"]),
    )


# --------------------------------------------------------------- SAMSum (paper App. A.1)


def _samsum_example(rec: dict, i: int) -> Example:
    dialogue = rec["dialogue"].replace("\r\n", "\n")
    return Example(
        id=str(rec.get("id", i)),
        context=f"Dialogue: {dialogue}\nSummary:",
        answer=rec["summary"],
        target=rec["summary"],
    )


TASKS: dict[str, Task] = {
    "piqa": Task(
        name="piqa",
        kind="multiple_choice",
        metric="acc",
        hub=HubSource("baber/piqa", None, "train", "validation"),
        local=LocalSource("piqa", "train.jsonl", "valid.jsonl"),
        required_fields=("goal", "sol1", "sol2", "label"),
        to_example=_piqa_example,
    ),
    "hellaswag": Task(
        name="hellaswag",
        kind="multiple_choice",
        metric="acc",
        hub=HubSource("Rowan/hellaswag", None, "train", "validation"),
        local=LocalSource(
            "hellaswag",
            "validation.jsonl",
            "validation.jsonl",
            eval_filter=lambda rec: int(rec["idx"]) % 4 == 0,
        ),
        required_fields=("idx", "activity_label", "endings", "label"),
        to_example=_hellaswag_example,
    ),
    "gsm8k": Task(
        name="gsm8k",
        kind="generate",
        metric="exact_match",
        hub=HubSource("openai/gsm8k", "main", "train", "test"),
        local=LocalSource("gsm8k", "train.jsonl", "test.jsonl"),
        required_fields=("question", "answer"),
        to_example=_gsm8k_example,
        # lm-eval gsm8k.yaml: until ["Question:", "</s>", "<|im_end|>"], 5-shot by default.
        stop_strings=("Question:", "</s>", "<|im_end|>"),
        num_fewshot=5,
        max_new_tokens=256,
        add_eos_to_answer=True,
    ),
    "samsum": Task(
        name="samsum",
        kind="generate",
        metric="rouge1",
        hub=HubSource("Samsung/samsum", None, "train", "test"),
        local=LocalSource("samsum", "validation.jsonl", "test.jsonl"),
        required_fields=("dialogue", "summary"),
        to_example=_samsum_example,
        # Paper App. A.1: no_repeat_ngram_size=2; stop at "Dialogue:", "Summary:", EOS, "\n\n".
        stop_strings=("Dialogue:", "Summary:", "</s>", "\n\n"),
        max_new_tokens=128,
        no_repeat_ngram_size=2,
        add_eos_to_answer=True,
    ),
}

SPLITS = ("train", "validation", "test")


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise MuscleError(
            f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}"
        ) from None


# ------------------------------------------------------------------------------ loading


def default_data_dir() -> Path | None:
    """Where local task files are looked for when no data dir is given.

    ``$MUSCLE_DATA_DIR`` first, then the data embedded in the package (``muscle/embedded/data``).
    """
    env = os.environ.get("MUSCLE_DATA_DIR")
    if env:
        return Path(env)
    embedded = Path(__file__).parent / "embedded" / "data"
    return embedded if embedded.is_dir() else None


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; a bad line is a one-line error naming the file and line number."""
    if not path.is_file():
        raise MuscleError(
            f"data file not found: {path} (pass --data-dir pointing at the task data)"
        )
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MuscleError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise MuscleError(f"{path}:{lineno}: expected a JSON object per line")
            missing = [k for k in required if k not in rec]
            if missing:
                raise MuscleError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            records.append(rec)
    return records


def _local_records(task: Task, which: str, data_dir: str | Path | None) -> list[dict]:
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise MuscleError(
            f"no local data for {task.name}: pass --data-dir (a folder with "
            f"{task.local.folder}/{task.local.train_file}) or use --source hub"
        )
    fname = task.local.train_file if which == "train" else task.local.eval_file
    records = read_jsonl(root / task.local.folder / fname, task.required_fields)
    if task.local.eval_filter is not None:
        want_eval = which == "eval"
        records = [r for r in records if task.local.eval_filter(r) == want_eval]
    return records


def _hub_records(task: Task, which: str) -> list[dict]:
    """Load from the Hugging Face hub (needs the ``datasets`` package and network access)."""
    try:
        import datasets
    except ImportError:
        raise MuscleError(
            "--source hub needs the datasets package: pip install 'muscle-llm[hub]'"
        ) from None
    split = task.hub.train_split if which == "train" else task.hub.eval_split
    try:
        ds = datasets.load_dataset(task.hub.path, task.hub.name, split=split)
    except Exception as e:  # network, auth, missing split: all user-facing
        raise MuscleError(
            f"could not load {task.hub.path} [{split}] from the hub: {type(e).__name__}: {e}"
        ) from None
    return [dict(r) for r in ds]


def raw_records(task: Task, which: str, source: str = "local", data_dir=None) -> list[dict]:
    """The raw records of the training source (``which="train"``) or the evaluation source."""
    if which not in ("train", "eval"):
        raise ValueError(which)
    if source == "local":
        return _local_records(task, which, data_dir)
    if source == "hub":
        return _hub_records(task, which)
    raise MuscleError(f"unknown data source {source!r}: use 'local' or 'hub'")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 80/20 (by default) split of ``range(n)``: (train_idx, val_idx)."""
    if not 0.0 < val_fraction < 1.0:
        raise MuscleError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def load_examples(
    task: Task | str,
    split: str,
    *,
    source: str = "local",
    data_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_examples: int | None = None,
) -> list[Example]:
    """Examples of one logical split (``train``, ``validation`` or ``test``).

    ``max_examples`` caps the pool first (a seeded random subset of the source), so that the
    train/validation split of a small run is still disjoint and deterministic.
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise MuscleError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    records = raw_records(task, "eval" if split == "test" else "train", source, data_dir)
    examples = [task.to_example(r, i) for i, r in enumerate(records)]
    if split == "test":
        if max_examples is not None:
            examples = examples[:max_examples]
    else:
        if max_examples is not None and max_examples < len(examples):
            keep = np.sort(
                np.random.default_rng(split_seed).permutation(len(examples))[:max_examples]
            )
            examples = [examples[i] for i in keep]
        train_idx, val_idx = split_indices(len(examples), val_fraction, split_seed)
        examples = [examples[i] for i in (train_idx if split == "train" else val_idx)]
    if not examples:
        raise MuscleError(f"{task.name} [{split}]: no examples left after filtering")
    _check_unique_ids(task, examples)
    return examples


def _check_unique_ids(task: Task, examples: list[Example]) -> None:
    seen: set = set()
    for ex in examples:
        if ex.id in seen:
            raise MuscleError(f"{task.name}: duplicate example id {ex.id!r} in the data")
        seen.add(ex.id)


def fewshot_prefix(task: Task, shots: list[Example]) -> str:
    """lm-eval style few-shot prefix: each shot is context + delimiter + answer, then a blank line."""
    return "".join(
        ex.context + task.target_delimiter + ex.answer + task.fewshot_delimiter for ex in shots
    )


def dataset_fingerprint(task: Task, examples: list[Example]) -> str:
    """A hash of the rendered examples: what a cache or a prediction file was built from."""
    import hashlib

    h = hashlib.sha256(task.name.encode())
    for ex in examples:
        h.update(json.dumps([ex.id, ex.context, ex.answer], ensure_ascii=False).encode())
    return h.hexdigest()[:16]
