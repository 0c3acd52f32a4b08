"""Per-example predictions of a task model: what ``muscle-eval predict`` writes.

Two ways of asking a model, the ways lm-eval-harness asks them:

* **multiple choice** (PIQA, HellaSwag): the log-likelihood of each choice's continuation
  ``target_delimiter + choice`` given the context, summed over the continuation's tokens;
  ``acc`` takes the argmax of the sums, ``acc_norm`` the argmax of the sums divided by the
  choice's character length (``metrics.multiple_choice``). Context and continuation are
  tokenized by ``data.split_context_answer``, lm-eval's split, so the token streams agree.
* **generation** (GSM8K, SAMSum): greedy decoding until a stop string, the EOS token or
  ``max_new_tokens``; the text is cut at the first stop string. GSM8K is scored with lm-eval's
  strict-match / flexible-extract exact match, SAMSum with ROUGE-1 F (paper App. A.1, which
  also asks for ``no_repeat_ngram_size=2``).

The output is a predictions file (``PREDICTIONS_FORMAT.md``) and its sidecar. A run appends one
batch of records at a time, so an interrupted run re-run with the same command resumes: the
sidecar's *identity* (task, split, data, model, adapter, dtype, scoring options) must match,
otherwise the file is refused unless ``overwrite``. ``limit``, ``batch_size`` and ``device`` are
not part of the identity: a larger ``limit`` extends a file, a smaller one adds nothing.

Few-shot prompts (GSM8K: 5 shots by default) draw their shots from the task's ``train`` split.
lm-eval draws each document's shots from one seeded generator shared by all documents, so its
shots depend on the order documents are visited; here each example's shots are drawn from a
generator seeded by ``(fewshot_seed, example id)``, so a resumed run builds the same prompts.
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
from muscle.data import model_max_length, split_context_answer
from muscle.metrics import gsm8k_answer, gsm8k_normalize, gsm8k_target, multiple_choice, rouge1
from muscle.predictions import (
    PredictionWriter,
    meta_path,
    read_meta,
    read_predictions,
    write_meta,
)
from muscle.tasks import Example, Task, dataset_fingerprint, fewshot_prefix, get_task, load_examples

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_BATCH_SIZE = 8
FALLBACK_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither model nor tokenizer says


# --------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PredictOptions:
    """What decides a record's value (and so belongs to a predictions file's identity)."""

    num_fewshot: int
    fewshot_seed: int
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
) -> PredictOptions:
    """The task's defaults with the caller's overrides."""
    n_shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if n_shots < 0:
        raise MuscleError(f"--num-fewshot must be >= 0, got {n_shots}")
    generate = task.kind == "generate"
    if max_new_tokens is not None and max_new_tokens < 1:
        raise MuscleError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    return PredictOptions(
        num_fewshot=n_shots,
        fewshot_seed=fewshot_seed,
        max_new_tokens=(max_new_tokens or task.max_new_tokens) if generate else None,
        no_repeat_ngram_size=task.no_repeat_ngram_size if generate else 0,
        stop_strings=task.stop_strings if generate else (),
        target_delimiter=task.target_delimiter,
        fewshot_delimiter=task.fewshot_delimiter,
    )


# --------------------------------------------------------------------------------- prompts


def fewshot_shots(pool: Sequence[Example], n: int, seed: int, example_id: Any) -> list[Example]:
    """``n`` shots for one example, the same whatever order examples are visited in."""
    if n == 0:
        return []
    if n > len(pool):
        raise MuscleError(f"--num-fewshot {n} but the train split has only {len(pool)} examples")
    # random.Random hashes a str seed with SHA-512: stable across runs and Python versions.
    rng = random.Random(f"{seed}:{json.dumps(example_id)}")
    return rng.sample(list(pool), n)


def build_contexts(
    task: Task, examples: Sequence[Example], pool: Sequence[Example], opts: PredictOptions
) -> list[str]:
    """The prompt of each example: few-shot prefix + the example's context."""
    return [
        fewshot_prefix(task, fewshot_shots(pool, opts.num_fewshot, opts.fewshot_seed, ex.id))
        + ex.context
        for ex in examples
    ]


# -------------------------------------------------------------------------- log-likelihood


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: list[int]  # token ids, BOS included when the tokenizer adds one
    continuation: list[int]


def loglikelihood_requests(
    tokenizer, contexts: Sequence[str], continuations: Sequence[str]
) -> list[LoglikelihoodRequest]:
    out = []
    for context, continuation in zip(contexts, continuations, strict=True):
        ctx, cont = split_context_answer(tokenizer, context, continuation)
        if not cont:
            raise MuscleError(f"the continuation {continuation!r} encodes to no tokens")
        out.append(LoglikelihoodRequest(ctx, cont))
    return out


def _model_inputs(req: LoglikelihoodRequest, max_length: int) -> list[int]:
    """The tokens fed to the model: context + continuation minus the last token (it is only a
    target), keeping the last ``max_length`` tokens, as lm-eval truncates."""
    if len(req.continuation) > max_length:
        raise MuscleError(
            f"a continuation of {len(req.continuation)} tokens does not fit the model's "
            f"{max_length}-token context"
        )
    return (req.context + req.continuation)[-(max_length + 1) :][:-1]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _score_batch(
    model, inputs: list[list[int]], conts: list[list[int]], pad_id: int
) -> list[float]:
    """Summed log-probabilities of each continuation, one right-padded forward pass."""
    B, T = len(inputs), max(len(x) for x in inputs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
    device = _device_of(model)
    # Right padding leaves the real tokens' positions 0..n-1, so no position ids are needed.
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    sums = []
    for b, (x, cont) in enumerate(zip(inputs, conts, strict=True)):
        # Logits at position t predict token t+1: the continuation's are the last len(cont).
        rows = logits[b, len(x) - len(cont) : len(x)].float()  # (C, V)
        targets = torch.tensor(cont, device=rows.device)  # (C,)
        logp = torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (C,)
        sums.append(float(logp.sum()))
    return sums


def loglikelihoods(
    model,
    requests: Sequence[LoglikelihoodRequest],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
) -> list[float]:
    """The summed log-likelihood of each request's continuation, in request order.

    Each forward pass holds (batch_size, longest input, vocabulary) logits: lower
    ``batch_size`` for long prompts or large vocabularies.
    """
    inputs = [_model_inputs(r, max_length) for r in requests]
    # Longest first, so each batch pads to similar lengths (lm-eval orders the same way).
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        sums = _score_batch(
            model, [inputs[i] for i in group], [requests[i].continuation for i in group], pad_id
        )
        for i, s in zip(group, sums, strict=True):
            out[i] = s
    return out


# ------------------------------------------------------------------------------ generation


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (lm-eval's ``until``)."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class StopOnStrings:
    """A ``transformers`` stopping criterion: a row is done once its new text holds a stop string.

    Returns one flag per row (generate then pads finished rows while the others go on).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :]  # (B, generated so far)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        done = [any(s in t for s in self.stop_strings) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    stop_strings: Sequence[str],
    max_new_tokens: int,
    no_repeat_ngram_size: int = 0,
    max_length: int = FALLBACK_MAX_LENGTH,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first stop string or EOS."""
    from transformers import StoppingCriteriaList

    eos = tokenizer.eos_token_id
    stops = list(stop_strings) + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    # Leave room for the new tokens: the prompt keeps its last (max_length - max_new_tokens).
    room = max(1, max_length - max_new_tokens)
    rows = [tokenizer(p)["input_ids"][-room:] for p in prompts]
    ids, mask = _left_pad(rows, tokenizer.pad_token_id)  # (B, T): decoder-only pads on the left
    device = _device_of(model)
    kwargs = {"no_repeat_ngram_size": no_repeat_ngram_size} if no_repeat_ngram_size else {}
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        num_beams=1,
        temperature=None,  # greedy: silence a model's sampling defaults
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, stops, ids.shape[1])]),
        **kwargs,
    )  # (B, T + new)
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stops))
    return texts


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

    def records(self, examples: Sequence[Example], contexts: Sequence[str]) -> list[dict]:
        """One record per example, in order."""
        if self.task.kind == "multiple_choice":
            return self._multiple_choice(examples, contexts)
        return self._generate(examples, contexts)

    def _multiple_choice(self, examples, contexts) -> list[dict]:
        flat_ctx, flat_cont, owner = [], [], []
        for k, (ex, ctx) in enumerate(zip(examples, contexts, strict=True)):
            for choice in ex.choices or ():
                flat_ctx.append(ctx)
                flat_cont.append(self.opts.target_delimiter + choice)
                owner.append(k)
        requests = loglikelihood_requests(self.tokenizer, flat_ctx, flat_cont)
        lls = loglikelihoods(
            self.model,
            requests,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_id=self.tokenizer.pad_token_id,
        )
        per_example: list[list[float]] = [[] for _ in examples]
        for k, ll in zip(owner, lls, strict=True):
            per_example[k].append(ll)
        return [
            multiple_choice_record(ex, ll) for ex, ll in zip(examples, per_example, strict=True)
        ]

    def _generate(self, examples, contexts) -> list[dict]:
        texts = generate_batch(
            self.model,
            self.tokenizer,
            contexts,
            stop_strings=self.opts.stop_strings,
            max_new_tokens=self.opts.max_new_tokens or self.task.max_new_tokens,
            no_repeat_ngram_size=self.opts.no_repeat_ngram_size,
            max_length=self.max_length,
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
    spec: ModelSpec, task: Task, opts: PredictOptions, *, batch_size: int, device: str
) -> Scorer:
    from muscle.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec)
    model = load_model(spec, device)
    return Scorer(model, tokenizer, task, opts, batch_size, _max_length(model, tokenizer))


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


def _identity_items(meta: dict) -> dict[str, Any]:
    """The identity keys, ``options`` flattened (``options.num_fewshot``) for short messages."""
    out = {k: meta.get(k) for k in IDENTITY_KEYS if k != "options"}
    options = meta.get("options")
    if isinstance(options, dict):
        out |= {f"options.{k}": v for k, v in options.items()}
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


def _predict_batch(
    scorer: Scorer, examples: Sequence[Example], contexts: Sequence[str]
) -> list[dict]:
    """One batch of records (a seam: tests interrupt a run here)."""
    return scorer.records(examples, contexts)


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
    device: str | None = "auto",
    overwrite: bool = False,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write per-example predictions of ``spec`` on ``task`` to ``out_path`` (+ sidecar).

    Resumes a file of the same identity; returns the summary of the whole file (``n`` and the
    task's metric means, over every record in it, also those of an earlier, larger ``limit``),
    which the sidecar also records, plus ``written``: the records this call added.
    """
    from muscle.models import check_adapter_matches_base, check_base_exists

    task = get_task(task) if isinstance(task, str) else task
    if batch_size < 1:
        raise MuscleError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise MuscleError(f"--limit must be >= 1, got {limit}")
    # Bad model inputs fail here, before the output file or its sidecar is touched.
    check_base_exists(spec)
    if spec.adapter:
        check_adapter_matches_base(Path(spec.adapter), spec)
    opts = task_options(
        task, num_fewshot=num_fewshot, max_new_tokens=max_new_tokens, fewshot_seed=fewshot_seed
    )
    out_path = Path(out_path)

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
    prepare_output(out_path, meta, overwrite=overwrite)

    selected = examples[:limit] if limit else examples
    device = resolve_device(device)
    run = {
        "limit": limit,
        "batch_size": batch_size,
        "device": device,
        "muscle_version": __version__,
    }
    with PredictionWriter(out_path) as writer:
        todo = [ex for ex in selected if ex.id not in writer.done_ids]
        write_meta(out_path, {**meta, "run": run, "status": "running"})
        if todo:
            scorer = load_scorer(spec, task, opts, batch_size=batch_size, device=device)
            contexts = dict(
                zip([ex.id for ex in todo], build_contexts(task, todo, pool, opts), strict=True)
            )
            with _progress(len(todo), progress, f"{task.name} {meta['model']}") as bar:
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    writer.write(_predict_batch(scorer, batch, [contexts[ex.id] for ex in batch]))
                    bar.update(len(batch))
    records, _ = read_predictions(out_path)
    summary = summarize(task, records)
    write_meta(out_path, {**meta, "run": run, "status": "done", "summary": summary})
    return {
        **summary,
        "task": task.name,
        "model": meta["model"],
        "out": str(out_path),
        "written": len(todo),
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
