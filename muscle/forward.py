"""The forward pass of every model that produces logits at chosen positions: the student and
the teachers of online mode, the cache build's teachers
(:func:`muscle.teacher_cache.compute.forward_logits` keeps the unpadded positions) and
``muscle-eval``'s log-likelihood scoring (:mod:`muscle.eval_scoring`, packed documents under a 4D
mask). One path, so a cached teacher and the same teacher online are one forward pass, and a
teacher's top-K and the student's loss see the same rows of the same logits.

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


def student_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at the labelled positions only, (n, V), in the order of :func:`valid_rows`."""
    return logits_at(model, batch["input_ids"], batch["attention_mask"], labelled(batch))


# Model classes whose forward took a boolean (B, T) ``logits_to_keep`` (True / False), learnt
# on the first call: transformers applies lm_head to the kept positions only (recent 5.x).
_KEEP_MASK_OK: dict[type, bool] = {}


def logits_at(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    keep: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits at the True positions of ``keep`` (B, T) bool, flattened row-major: (n, V).

    ``attention_mask``: (B, T) 1/0 (right padding), an additive (B, 1, T, T) float mask (packed
    evaluation documents), or None (no padding, or right padding that causal attention never
    reads); ``position_ids`` (B, T) where positions are not 0..T-1 (packed documents).
    The LM head runs on the kept positions only where the model supports it: for task data
    (answers after long prompts) that is a small part of B*T, and the (B, T, V) float logits
    and their gradient (2 GB for 8 x 512 tokens and a 128k vocabulary) are never made.
    Otherwise the full logits are computed and the rows selected.
    """
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kw["position_ids"] = position_ids
    cls = type(unwrap_model(model))
    supported = _KEEP_MASK_OK.get(cls)
    if supported is not False:
        try:
            z = model(**kw, logits_to_keep=keep).logits
        except (TypeError, IndexError):  # no such argument, or only int / 1-D positions
            if supported:
                raise
            z = None
        if supported is None:  # the first call for this class: did it keep just those rows?
            supported = z is not None and z.dim() == 2 and z.shape[0] == int(keep.sum())
            _KEEP_MASK_OK[cls] = supported
        if supported:
            return z  # (n, V)
    return model(**kw).logits[keep]  # (B, T, V) -> (n, V)


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
