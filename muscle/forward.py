"""The forward pass of every model that produces logits in training: the student, and the
teachers of online mode. One path, so a teacher's top-K and the student's loss see the same
rows of the same logits.
The cache build runs its teachers through it too
(:func:`muscle.teacher_cache.compute.forward_logits` keeps the unpadded positions), so a cached
teacher and the same teacher online are one forward pass.

A batch holds right-padded ``input_ids``, ``attention_mask`` and next-token ``labels`` (B, T)
(:func:`muscle.data.collate`); the positions that matter are those with a label.

Log-probs at a temperature T from logits and their log-sum-exp have one home too:
:func:`muscle.topk.logprobs_at` (and :func:`muscle.topk.label_logprob_at` for the label).
"""

from __future__ import annotations

import torch

from muscle.data import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def valid_rows(batch: Batch) -> torch.Tensor:
    """Flat indices of the positions that have a next-token label. (n,)"""
    return (batch["labels"].reshape(-1) != IGNORE_INDEX).nonzero(as_tuple=True)[0]


def labelled(batch: Batch) -> torch.Tensor:
    """(B, T) bool: the positions that have a next-token label (the rows of :func:`valid_rows`)."""
    return batch["labels"] != IGNORE_INDEX


def student_logits(model, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """Logits at the labelled positions only, (n, V), in the order of ``rows``."""
    return logits_at(model, batch, labelled(batch), rows)


# Model classes whose forward took a boolean (B, T) ``logits_to_keep`` (True / False), learnt
# on first use: transformers applies lm_head to the kept positions only (recent 5.x releases).
_KEEP_MASK_OK: dict[type, bool] = {}


def logits_at(model, batch: Batch, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits at the True positions of ``keep`` (B, T) bool, flattened row-major: (n, V).

    ``rows``: the same positions as flat indices into B*T (``keep.reshape(-1).nonzero()``).
    The LM head runs on the kept positions only where the model supports it: for task data
    (answers after long prompts) that is a small part of B*T, and the (B, T, V) float logits
    and their gradient (2 GB for 8 x 512 tokens and a 128k vocabulary) are never made.
    Otherwise the full logits are computed and the rows selected.
    """
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cls = type(unwrap_model(model))
    if _KEEP_MASK_OK.get(cls, True):
        try:
            z = model(**kw, logits_to_keep=keep).logits
        except (TypeError, IndexError):  # no such argument, or only int / 1-D positions
            z = None
        ok = z is not None and z.dim() == 2 and z.shape[0] == rows.numel()
        _KEEP_MASK_OK[cls] = ok
        if ok:
            return z  # (n, V)
    z = model(**kw).logits  # (B, T, V)
    return z.reshape(-1, z.shape[-1]).index_select(0, rows)


def unwrap_model(model):
    """The Hugging Face model under DDP / DeepSpeed (.module) and PEFT (get_base_model)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def empty_batch_loss(model, batch: Batch) -> torch.Tensor:
    """A zero loss that still touches every trainable parameter (a rank with nothing to learn
    in this step must still join DDP's gradient all-reduce)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.sum() * 0.0
