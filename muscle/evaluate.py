"""Per-example predictions of a task model: what ``muscle-eval predict`` writes.

Two ways of asking a model, the ways lm-eval-harness asks them:

* **multiple choice** (PIQA, HellaSwag): the log-likelihood of each choice's continuation
  ``target_delimiter + choice`` given the context, summed over the continuation's tokens;
  ``acc`` takes the argmax of the sums, ``acc_norm`` the argmax of the sums divided by the
  choice's character length (``task_metrics.multiple_choice``). Context and continuation are
  tokenized by ``data.split_context_answer``, lm-eval's split, so the token streams agree.
  ``eval_scoring`` computes them: length-sorted batches over a window, the LM head on the
  scored rows only, and the context encoded once per document where that pays (HellaSwag,
  not PIQA: the choice is made from the token counts, see its docstring).
* **generation** (GSM8K, SAMSum): greedy decoding until a stop string, the EOS token or
  ``max_new_tokens``; the text is cut at the first stop string. GSM8K is scored with lm-eval's
  strict-match / flexible-extract exact match, SAMSum with ROUGE-1 F (paper App. A.1, which
  also asks for ``no_repeat_ngram_size=2``). ``eval_generation`` decodes: rows refilled as
  they finish, a KV cache written in place, a prefix common to all prompts encoded once.

The output is a predictions file (``PREDICTIONS_FORMAT.md``) and its sidecar. Examples are
computed in **windows** of a fixed number of consecutive examples counted from the start of the
split (:data:`WINDOWS`), each written at once when it is done. A window's batches depend only
on the window, so an interrupted run re-run with the same command recomputes the window it
stopped in and writes what is missing: the file ends byte-identical to an uninterrupted run's
(with the same ``batch_size`` and window; another ``batch_size`` or device gives records that
differ in the last bits of the log-likelihoods). The sidecar's *identity* (task, split, data,
model, adapter, dtype, scoring options) must match, otherwise the file is refused unless
``overwrite``. ``limit``, ``batch_size``, the window and ``device`` are not part of the
identity: a larger ``limit`` extends a file, a smaller one adds nothing. One process writes a
file at a time (a lock file beside it, ``predictions.lock_path``); a second is refused.

Few-shot prompts (GSM8K: 5 shots by default) draw their shots from the task's ``train`` split.
lm-eval draws each document's shots from one seeded generator shared by all documents, so its
shots depend on the order documents are visited; here (``fewshot_sampler="random"``, the
default) each example's shots are drawn from a generator seeded by ``(fewshot_seed, example
id)``, so a resumed run builds the same prompts. ``fewshot_sampler="first_n"`` (lm-eval's
sampler of that name) gives every example the first ``num_fewshot`` training examples: one
prompt prefix for the whole run, which generation encodes once per window.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muscle import MuscleError, __version__
from muscle.config import ModelSpec
from muscle.data import model_max_length
from muscle.eval_generation import generate_texts
from muscle.eval_scoring import loglikelihood_requests, score_documents
from muscle.locking import writer_lock
from muscle.predictions import (
    PredictionWriter,
    lock_path,
    meta_path,
    read_meta,
    read_predictions,
    write_meta,
)
from muscle.task_metrics import (
    gsm8k_answer,
    gsm8k_normalize,
    gsm8k_target,
    multiple_choice,
    rouge1,
)
from muscle.tasks import Example, Task, dataset_fingerprint, fewshot_prefix, get_task, load_examples

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
FEWSHOT_SAMPLERS = ("random", "first_n")
DEFAULT_BATCH_SIZE = 8
FALLBACK_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither model nor tokenizer says
# Examples per window, by task kind. Larger windows sort more requests by length (less
# padding) and keep more generation rows busy; a kill loses at most one window of work.
WINDOWS = {"multiple_choice": 512, "generate": 128}


# --------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PredictOptions:
    """What decides a record's value (and so belongs to a predictions file's identity)."""

    num_fewshot: int
    fewshot_seed: int
    fewshot_sampler: str  # "random" (per example, seeded by its id) | "first_n"
    max_new_tokens: int | None  # generation tasks only
    no_repeat_ngram_size: int
    stop_strings: tuple[str, ...]
    target_delimiter: str
    fewshot_delimiter: str

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["stop_strings"] = list(self.stop_strings)
        return out


def task_options(
    task: Task,
    *,
    num_fewshot: int | None = None,
    max_new_tokens: int | None = None,
    fewshot_seed: int = FEWSHOT_SEED,
    fewshot_sampler: str = "random",
) -> PredictOptions:
    """The task's defaults with the caller's overrides."""
    n_shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if n_shots < 0:
        raise MuscleError(f"--num-fewshot must be >= 0, got {n_shots}")
    if fewshot_sampler not in FEWSHOT_SAMPLERS:
        raise MuscleError(
            f"--fewshot-sampler must be one of {', '.join(FEWSHOT_SAMPLERS)}, "
            f"got {fewshot_sampler!r}"
        )
    generate = task.kind == "generate"
    if max_new_tokens is not None and max_new_tokens < 1:
        raise MuscleError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    return PredictOptions(
        num_fewshot=n_shots,
        fewshot_seed=fewshot_seed,
        fewshot_sampler=fewshot_sampler,
        max_new_tokens=(max_new_tokens or task.max_new_tokens) if generate else None,
        no_repeat_ngram_size=task.no_repeat_ngram_size if generate else 0,
        stop_strings=task.stop_strings if generate else (),
        target_delimiter=task.target_delimiter,
        fewshot_delimiter=task.fewshot_delimiter,
    )


# --------------------------------------------------------------------------------- prompts


def fewshot_shots(
    pool: Sequence[Example], n: int, seed: int, example_id: Any, sampler: str = "random"
) -> list[Example]:
    """``n`` shots for one example, the same whatever order examples are visited in."""
    if n == 0:
        return []
    if n > len(pool):
        raise MuscleError(f"--num-fewshot {n} but the train split has only {len(pool)} examples")
    if sampler == "first_n":
        return list(pool[:n])
    # random.Random hashes a str seed with SHA-512: stable across runs and Python versions.
    rng = random.Random(f"{seed}:{json.dumps(example_id)}")
    return rng.sample(list(pool), n)


def build_contexts(
    task: Task, examples: Sequence[Example], pool: Sequence[Example], opts: PredictOptions
) -> list[str]:
    """The prompt of each example: few-shot prefix + the example's context."""
    return [
        fewshot_prefix(
            task,
            fewshot_shots(pool, opts.num_fewshot, opts.fewshot_seed, ex.id, opts.fewshot_sampler),
        )
        + ex.context
        for ex in examples
    ]


# ------------------------------------------------------------------------------- records


def multiple_choice_record(ex: Example, lls: Sequence[float]) -> dict[str, Any]:
    assert ex.choices is not None
    res = multiple_choice(lls, ex.choices, ex.target)
    return {
        "id": ex.id,
        "prediction": res.pred,
        "target": int(ex.target),
        "correct": res.acc,
        "score": float(res.acc),
        "loglikelihoods": [float(x) for x in lls],
        "acc": res.acc,
        "acc_norm": res.acc_norm,
        "prediction_norm": res.pred_norm,
        "choice_lengths": [len(c) for c in ex.choices],
    }


def gsm8k_record(ex: Example, generation: str) -> dict[str, Any]:
    target = gsm8k_normalize(gsm8k_target(ex.answer))
    strict = gsm8k_answer(generation, "strict-match")
    flexible = gsm8k_answer(generation, "flexible-extract")
    return {
        "id": ex.id,
        "prediction": strict,
        "target": target,
        "correct": strict == target,
        "score": float(strict == target),
        "flexible": flexible,
        "correct_flexible": flexible == target,
        "generation": generation,
    }


def rouge_record(ex: Example, generation: str) -> dict[str, Any]:
    summary = generation.strip()
    return {
        "id": ex.id,
        "prediction": summary,
        "target": ex.target,
        "correct": None,
        "score": rouge1(summary, ex.target),
        "generation": generation,
    }


_GENERATION_RECORDS: dict[str, Callable[[Example, str], dict[str, Any]]] = {
    "exact_match": gsm8k_record,
    "rouge1": rouge_record,
}


def summarize(task: Task, records: Sequence[dict]) -> dict[str, Any]:
    """Means of the task's metrics over ``records``."""
    n = len(records)

    def mean(key: str) -> float:
        return math.fsum(float(r[key]) for r in records) / n if n else 0.0

    out: dict[str, Any] = {"n": n, "metric": task.metric, "score": mean("score")}
    if task.kind == "multiple_choice":
        out |= {"acc": mean("acc"), "acc_norm": mean("acc_norm")}
    elif task.metric == "exact_match":
        out |= {"exact_match": mean("correct"), "exact_match_flexible": mean("correct_flexible")}
    else:
        out |= {"rouge1": mean("score")}
    return out


# ---------------------------------------------------------------------------- the scorer


@dataclass
class Scorer:
    """A loaded model + tokenizer and how to ask it about one task."""

    model: Any
    tokenizer: Any
    task: Task
    opts: PredictOptions
    batch_size: int
    max_length: int
    share_prefix: bool | None = None  # multiple choice; None: decided per window (eval_scoring)

    def records(
        self,
        examples: Sequence[Example],
        contexts: Sequence[str],
        on_done: Callable[[int], None] | None = None,
    ) -> list[dict]:
        """One record per example, in order. ``on_done(n)``: n more examples are finished."""
        if self.task.kind == "multiple_choice":
            return self._multiple_choice(examples, contexts, on_done)
        return self._generate(examples, contexts, on_done)

    def _multiple_choice(self, examples, contexts, on_done) -> list[dict]:
        docs = [
            loglikelihood_requests(
                self.tokenizer,
                [ctx] * len(ex.choices or ()),
                [self.opts.target_delimiter + choice for choice in ex.choices or ()],
            )
            for ex, ctx in zip(examples, contexts, strict=True)
        ]
        lls = score_documents(
            self.model,
            docs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_id=self.tokenizer.pad_token_id,
            share_prefix=self.share_prefix,
        )
        for ex, ll in zip(examples, lls, strict=True):
            if not all(math.isfinite(x) for x in ll):
                raise MuscleError(
                    f"the model gave a non-finite log-likelihood ({ll}) on {self.task.name} "
                    f"example {json.dumps(ex.id)}: its weights or dtype are broken (try --dtype "
                    "float32); nothing of this window was written"
                )
        if on_done:
            on_done(len(examples))
        return [multiple_choice_record(ex, ll) for ex, ll in zip(examples, lls, strict=True)]

    def _generate(self, examples, contexts, on_done) -> list[dict]:
        texts = generate_texts(
            self.model,
            self.tokenizer,
            contexts,
            stop_strings=self.opts.stop_strings,
            max_new_tokens=self.opts.max_new_tokens or self.task.max_new_tokens,
            batch_size=self.batch_size,
            no_repeat_ngram_size=self.opts.no_repeat_ngram_size,
            max_length=self.max_length,
            on_done=(lambda _i: on_done(1)) if on_done else None,
        )
        make = _GENERATION_RECORDS[self.task.metric]
        return [make(ex, text) for ex, text in zip(examples, texts, strict=True)]


def _max_length(model, tokenizer) -> int:
    """The model's context length, found the way lm-eval's HFLM finds it."""
    n = model_max_length(model)
    if n:
        return int(n)
    tok_n = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    return int(tok_n) if tok_n and tok_n < 1_000_000 else FALLBACK_MAX_LENGTH


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_scorer(
    spec: ModelSpec,
    task: Task,
    opts: PredictOptions,
    *,
    batch_size: int,
    device: str,
    share_prefix: bool | None = None,
) -> Scorer:
    from muscle.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec)
    model = load_model(spec, device)
    return Scorer(
        model, tokenizer, task, opts, batch_size, _max_length(model, tokenizer), share_prefix
    )


# ------------------------------------------------------------------------ file identity

# Sidecar keys that must match for a resumed run to append to a file.
IDENTITY_KEYS = (
    "task",
    "split",
    "data_fingerprint",
    "model_fingerprint",
    "adapter_sha256",
    "dtype",
    "options",
)


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What the records depend on about the model (content hashes, not paths)."""
    from muscle.models import describe_model

    info = describe_model(spec)
    return {
        "model_fingerprint": info["base_fingerprint"],
        "adapter_sha256": info["adapter_sha256"],
        "dtype": spec.dtype,
        "base": info["base"],
        "revision": info["revision"],
        "gguf_file": info["gguf_file"],
        "adapter": info["adapter"],
    }


# Options added after files were first written, with the value such files were computed with.
_LATER_OPTIONS = {"fewshot_sampler": "random"}


def _identity_items(meta: dict) -> dict[str, Any]:
    """The identity keys, ``options`` flattened (``options.num_fewshot``) for short messages."""
    out = {k: meta.get(k) for k in IDENTITY_KEYS if k != "options"}
    options = meta.get("options")
    if isinstance(options, dict):
        out |= {f"options.{k}": v for k, v in (_LATER_OPTIONS | options).items()}
    else:
        out["options"] = options
    return out


def _differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    a, b = _identity_items(old), _identity_items(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def prepare_output(out_path: Path, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Make ``out_path`` ready to append to: fresh, or a resumable file of the same identity."""
    mpath = meta_path(out_path)
    if overwrite:
        out_path.unlink(missing_ok=True)
        mpath.unlink(missing_ok=True)
        return
    if out_path.is_dir():
        raise MuscleError(f"{out_path} is a directory, not a predictions file")
    meta = read_meta(out_path)
    has_records = out_path.exists() and out_path.stat().st_size > 0
    if meta is None:
        if has_records:
            raise MuscleError(
                f"{out_path} already holds records but has no sidecar {mpath.name}: cannot tell "
                "what they are predictions of; pass --overwrite to replace them"
            )
        return
    if meta.get("task") != identity["task"]:
        raise MuscleError(
            f"{out_path} holds predictions of task {meta.get('task')!r}, not {identity['task']!r}; "
            "pass --overwrite to replace it, or write to another --out"
        )
    diff = _differences(meta, identity)
    if diff:
        detail = "; ".join(
            f"{k}: file has {json.dumps(was)}, this run {json.dumps(now)}" for k, was, now in diff
        )
        raise MuscleError(
            f"{out_path} holds predictions of a different run ({detail}); pass --overwrite to "
            "replace it, or write to another --out"
        )


# --------------------------------------------------------------------------------- predict


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # disable=None: tqdm hides itself when stderr is not a terminal (CI logs stay clean).
    return tqdm(total=total, desc=desc, unit="ex", disable=None if enabled else True)


def _predict_window(
    scorer: Scorer,
    examples: Sequence[Example],
    contexts: Sequence[str],
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """The records of one window (a seam: tests interrupt a run here)."""
    return scorer.records(examples, contexts, on_done)


def predict(
    spec: ModelSpec,
    task: Task | str,
    out_path: str | Path,
    *,
    split: str = "test",
    data_dir: str | Path | None = None,
    source: str = "local",
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_fewshot: int | None = None,
    max_new_tokens: int | None = None,
    fewshot_seed: int = FEWSHOT_SEED,
    fewshot_sampler: str = "random",
    device: str | None = "auto",
    overwrite: bool = False,
    model_name: str | None = None,
    progress: bool = True,
    window: int | None = None,
    share_prefix: bool | None = None,
) -> dict[str, Any]:
    """Write per-example predictions of ``spec`` on ``task`` to ``out_path`` (+ sidecar).

    Resumes a file of the same identity; returns the summary of the whole file (``n`` and the
    task's metric means, over every record in it, also those of an earlier, larger ``limit``),
    which the sidecar also records, plus ``written``: the records this call added.
    ``window``: examples per window (default :data:`WINDOWS` of the task's kind);
    ``share_prefix``: multiple choice only, None decides per window (``eval_scoring``).
    """
    from muscle.models import check_adapter_matches_base, check_base_exists

    task = get_task(task) if isinstance(task, str) else task
    if batch_size < 1:
        raise MuscleError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise MuscleError(f"--limit must be >= 1, got {limit}")
    window = window or WINDOWS[task.kind]
    if window < 1:
        raise MuscleError(f"window must be >= 1, got {window}")
    # Bad model inputs fail here, before the output file or its sidecar is touched.
    check_base_exists(spec)
    if spec.adapter:
        check_adapter_matches_base(Path(spec.adapter), spec)
    opts = task_options(
        task,
        num_fewshot=num_fewshot,
        max_new_tokens=max_new_tokens,
        fewshot_seed=fewshot_seed,
        fewshot_sampler=fewshot_sampler,
    )
    out_path = Path(out_path)
    if out_path.is_dir():
        raise MuscleError(f"{out_path} is a directory, not a predictions file")

    examples = load_examples(task, split, source=source, data_dir=data_dir)
    pool = (
        load_examples(task, "train", source=source, data_dir=data_dir) if opts.num_fewshot else []
    )
    options = opts.to_dict()
    if pool:
        options["fewshot_fingerprint"] = dataset_fingerprint(task, pool)
    meta: dict[str, Any] = {
        "task": task.name,
        "split": split,
        "source": source,
        "data_fingerprint": dataset_fingerprint(task, examples),
        "n_split": len(examples),
        "model": model_name or Path(spec.adapter or spec.base).name,
        **model_identity(spec),
        "metric": task.metric,
        "options": options,
    }
    selected = examples[:limit] if limit else examples
    device = resolve_device(device)
    run = {
        "limit": limit,
        "batch_size": batch_size,
        "window": window,
        "device": device,
        "muscle_version": __version__,
    }
    with writer_lock(lock_path(out_path), what=f"predictions file {out_path}"):
        prepare_output(out_path, meta, overwrite=overwrite)
        fresh = not out_path.exists() and not meta_path(out_path).exists()
        written = 0
        try:
            with PredictionWriter(out_path) as writer:
                write_meta(out_path, {**meta, "run": run, "status": "running"})
                windows = [selected[i : i + window] for i in range(0, len(selected), window)]
                windows = [w for w in windows if any(ex.id not in writer.done_ids for ex in w)]
                scorer = None
                total = sum(len(w) for w in windows)
                with _progress(total, progress, f"{task.name} {meta['model']}") as bar:
                    for win in windows:
                        if scorer is None:
                            scorer = load_scorer(
                                spec,
                                task,
                                opts,
                                batch_size=batch_size,
                                device=device,
                                share_prefix=share_prefix,
                            )
                        contexts = build_contexts(task, win, pool, opts)
                        records = _predict_window(scorer, win, contexts, bar.update)
                        written += writer.write(
                            [r for r in records if r["id"] not in writer.done_ids]
                        )
        except BaseException:
            if fresh and written == 0:
                # Nothing was computed: leave no empty file and no sidecar behind.
                for path in (out_path, meta_path(out_path)):
                    if path.exists() and (path != out_path or path.stat().st_size == 0):
                        path.unlink()
            raise
        records, _ = read_predictions(out_path)
        summary = summarize(task, records)
        write_meta(out_path, {**meta, "run": run, "status": "done", "summary": summary})
    return {
        **summary,
        "task": task.name,
        "model": meta["model"],
        "out": str(out_path),
        "written": written,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """One line: ``piqa v1: n=100 acc=0.5400 acc_norm=0.5600 -> preds.jsonl``."""
    keys = [
        k
        for k in ("acc", "acc_norm", "exact_match", "exact_match_flexible", "rouge1")
        if k in summary
    ]
    metrics = " ".join(f"{k}={summary[k]:.4f}" for k in keys)
    return f"{summary['task']} {summary['model']}: n={summary['n']} {metrics} -> {summary['out']}"
