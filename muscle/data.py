"""Examples -> token ids + next-token labels, and batching.

This is the ONE place where text becomes tokens for training. The data path is
``DataConfig -> splits -> encoded examples``: :func:`load_splits` (the examples of each split,
before any model is loaded: they go into the run's identity) then :func:`encode_splits` (token
ids and labels, once the model's context length is known). The task trainer, the compatibility
trainer and the teacher cache all go through :func:`encode_example`, so the token stream a
teacher was cached on is exactly the one the student is trained on.

Conventions
-----------
* ``input_ids`` (T,): BOS (when the tokenizer adds one) + context + delimiter + answer
  (+ EOS for generation tasks, so the model learns to stop).
* ``labels`` (T,): *next-token* labels, already shifted: ``labels[t]`` is the id the model should
  predict at position ``t`` (i.e. ``input_ids[t + 1]``), or ``IGNORE_INDEX``. The last position
  has no next token. Logits at position ``t`` are therefore compared with ``labels[t]`` directly,
  everywhere: loss, cache, masks.
* The paper learns on the entire context and answer (App. A.1): every next token is a target.
  ``answer_only=True`` keeps only the answer tokens as targets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from muscle import MuscleError
from muscle.config import DataConfig
from muscle.tasks import Example, Task, get_task, load_examples

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExample:
    id: str | int
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) next-token labels, IGNORE_INDEX where not a target
    n_context: int  # tokens of BOS + context (before the answer)
    truncated: int  # context tokens dropped from the left to fit max_length


def split_context_answer(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, the way lm-eval-harness splits them.

    The whole string is encoded once and the context's token count decides the split, so the
    continuation's tokens are the ones the model really sees after this context. Trailing
    whitespace of the context moves to the continuation, as lm-eval does.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return list(whole[: len(ctx)]), list(whole[len(ctx) :])


def next_token_labels(input_ids: Sequence[int], is_target: Sequence[bool]) -> list[int]:
    """labels[t] = input_ids[t+1] if token t+1 is a target, else IGNORE_INDEX; last -> IGNORE."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for t in range(len(input_ids) - 1):
        if is_target[t + 1]:
            labels[t] = int(input_ids[t + 1])
    return labels


def encode_example(
    tokenizer,
    task: Task,
    ex: Example,
    *,
    answer_only: bool = False,
    max_length: int | None = None,
    truncation: str = "left",
) -> EncodedExample:
    """Tokenize one training example (context + delimiter + gold answer)."""
    ctx_ids, ans_ids = split_context_answer(
        tokenizer, ex.context, task.target_delimiter + ex.answer
    )
    if task.add_eos_to_answer and tokenizer.eos_token_id is not None:
        ans_ids = ans_ids + [tokenizer.eos_token_id]
    if not ans_ids:
        raise MuscleError(f"{task.name} example {ex.id!r}: the answer encodes to no tokens")
    dropped = 0
    if max_length is not None and len(ctx_ids) + len(ans_ids) > max_length:
        if truncation == "refuse":
            raise MuscleError(
                f"{task.name} example {ex.id!r} has {len(ctx_ids) + len(ans_ids)} tokens, more "
                f"than max_length={max_length}: raise --max-length or use --truncation left"
            )
        # Keep the answer whole and the end of the context; keep BOS if the tokenizer adds one.
        keep_head = 1 if ctx_ids and ctx_ids[0] == tokenizer.bos_token_id else 0
        room = max_length - len(ans_ids) - keep_head
        if room >= 1:
            dropped = len(ctx_ids) - keep_head - room
            ctx_ids = ctx_ids[:keep_head] + ctx_ids[len(ctx_ids) - room :]
        else:
            # The answer alone does not fit: keep the first max_length tokens (the answer's
            # tail is lost; counted like any other truncation).
            dropped = len(ctx_ids) + len(ans_ids) - max_length
            keep_ctx = min(len(ctx_ids), max(1, max_length // 4))
            ctx_ids, ans_ids = ctx_ids[:keep_ctx], ans_ids[: max_length - keep_ctx]
    input_ids = ctx_ids + ans_ids
    is_target = [not answer_only] * len(ctx_ids) + [True] * len(ans_ids)
    return EncodedExample(
        id=ex.id,
        input_ids=input_ids,
        labels=next_token_labels(input_ids, is_target),
        n_context=len(ctx_ids),
        truncated=dropped,
    )


def encode_examples(
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    answer_only: bool = False,
    max_length: int | None = None,
    truncation: str = "left",
) -> list[EncodedExample]:
    """Encode many examples; truncations are counted and reported once, not per example."""
    out = [
        encode_example(
            tokenizer,
            task,
            ex,
            answer_only=answer_only,
            max_length=max_length,
            truncation=truncation,
        )
        for ex in examples
    ]
    n_trunc = sum(1 for e in out if e.truncated)
    if n_trunc:
        log.warning(
            "%s: %d of %d examples were longer than max_length=%s and lost context tokens "
            "from the left (--truncation refuse makes this an error)",
            task.name,
            n_trunc,
            len(out),
            max_length,
        )
    return out


TRAINING_SPLITS = ("train", "validation")


def load_splits(
    cfg: DataConfig, splits: Sequence[str] = TRAINING_SPLITS
) -> dict[str, list[Example]]:
    """The examples of each of ``splits`` as ``cfg`` selects them (source, data dir, 80/20
    split by ``split_seed``, ``max_examples`` cap)."""
    task = get_task(cfg.task)
    return {
        s: load_examples(
            task,
            s,
            source=cfg.source,
            data_dir=cfg.data_dir,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            max_examples=cfg.max_examples,
        )
        for s in splits
    }


def encode_splits(
    tokenizer,
    cfg: DataConfig,
    examples: Mapping[str, Sequence[Example]],
    *,
    max_length: int | None,
) -> dict[str, list[EncodedExample]]:
    """Each split of :func:`load_splits` tokenized as ``cfg`` says (answer_only, truncation).

    ``max_length``: the token limit in force; callers pass ``cfg.max_length`` or, when it is
    None, the model's context (:func:`model_max_length`).
    """
    task = get_task(cfg.task)
    return {
        s: encode_examples(
            tokenizer,
            task,
            ex,
            answer_only=cfg.answer_only,
            max_length=max_length,
            truncation=cfg.truncation,
        )
        for s, ex in examples.items()
    }


def model_max_length(model_or_config) -> int | None:
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "max_position_embeddings", None)


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors: input_ids, attention_mask, labels (B, T)."""
    T = max(len(e.input_ids) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(
    n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int
) -> list[list[int]]:
    """Example indices grouped into batches; the order depends only on (seed, epoch)."""
    idx = np.arange(n)
    if shuffle:
        idx = np.random.default_rng([seed, epoch]).permutation(n)
    return [idx[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def iter_batches(
    encoded: Sequence[EncodedExample],
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of ``encoded``; ``skip`` drops the first batches (to resume mid-epoch).

    With ``world_size`` > 1 the batches are *global* (``batch_size * world_size`` examples, the
    same order on every rank) and each rank yields its own contiguous slice of each one.
    """
    groups = batch_order(
        len(encoded), batch_size * world_size, shuffle=shuffle, seed=seed, epoch=epoch
    )
    for i, group in enumerate(groups):
        if i < skip:
            continue
        mine = group[rank * batch_size : (rank + 1) * batch_size]
        if mine:
            yield collate([encoded[j] for j in mine], pad_id)
        else:
            # The last global batch can leave a rank without examples. It still has to take
            # part in the step (DDP's all-reduce), so it gets one example with no targets.
            dummy = collate([encoded[group[0]]], pad_id)
            dummy["labels"].fill_(IGNORE_INDEX)
            yield dummy


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
