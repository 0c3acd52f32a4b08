"""Log-likelihood scoring for multiple-choice evaluation (``muscle-eval predict``).

A document (one example) asks for the summed log-likelihood of each choice's continuation given
the context, lm-eval-harness's ``loglikelihood`` request. Three things make it cheaper than
lm-eval's way (one padded forward per request, logits on every position) while computing the
same numbers:

* **Length-sorted batches over a window.** :func:`score_documents` sorts all the requests (or
  documents) it is given by length, longest first, so a batch pads to similar lengths.
  ``evaluate.predict`` passes a whole window of examples (512 by default), not one write batch.
* **The LM head on the scored rows only.** Only the positions that predict a continuation token
  go through the (hidden, vocabulary) projection and the log-softmax; the (B, T, V) logits of
  every position are never made (``logits_to_keep`` with a boolean mask).
* **Shared-prefix scoring.** The choices of a document share their context. The document is
  packed into one sequence, the context once and then each choice's own tokens, under a 4D
  attention mask that shows each choice the context and itself only, at the positions it has
  in its own request: one row per document instead of one per choice, the context encoded
  once. (Encoding the context into a KV cache and expanding the cache over the choices does
  the same arithmetic, but each batch then needs two forward passes and pads every choice to
  the longest choice of its documents: on HellaSwag windows with SmolLM2's tokenizer 72k
  token positions against 43k packed and 87k unshared, with twice the passes of packing.)
  It pays when contexts are long against the continuations (HellaSwag: a 29-token context,
  four 14-token endings, half the tokens saved) and little when they are short (PIQA: a
  14-token context, two 23-token solutions, 18% saved, about what the longer attention rows
  and the mask cost: a wash in ``benchmarks/bench_eval.py``'s profile). ``share_prefix=None``
  decides per call from the token counts: share when at least :data:`SHARE_MIN_SAVING` of the
  tokens would be saved. Models whose attention does not read a custom mask (flash-attention) or
  whose sliding window is shorter than a packed document are scored unshared.

Every batch is built from the call's requests alone, deterministically, so the same window gives
bit-identical numbers (what makes a resumed ``predict`` byte-identical to a clean run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from muscle import MuscleError
from muscle.data import split_context_answer
from muscle.forward import logits_at, unwrap_model

# Share the context of a document's choices when that saves at least this fraction of the
# tokens of a call (HellaSwag saves ~50%, PIQA ~18%: see the module docstring).
SHARE_MIN_SAVING = 0.3


# ------------------------------------------------------------------------- model calls


def device_of(model) -> torch.device:
    return next(model.parameters()).device


# -------------------------------------------------------------------------- requests


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


def model_inputs(req: LoglikelihoodRequest, max_length: int) -> list[int]:
    """The tokens fed to the model: context + continuation minus the last token (it is only a
    target), keeping the last ``max_length`` tokens, as lm-eval truncates."""
    if len(req.continuation) > max_length:
        raise MuscleError(
            f"a continuation of {len(req.continuation)} tokens does not fit the model's "
            f"{max_length}-token context"
        )
    return (req.context + req.continuation)[-(max_length + 1) :][:-1]


def shared_prefix_length(inputs: Sequence[Sequence[int]], n_cont: Sequence[int]) -> int:
    """How many leading tokens all ``inputs`` share and can be encoded once.

    The prefix stops before each input's first scored position (``len(x) - c``: the logit of
    the last context token predicts the first continuation token), so every choice keeps at
    least that token of its own.
    """
    limit = min(len(x) - c for x, c in zip(inputs, n_cont, strict=True))
    first = inputs[0]
    n = 0
    while n < limit and all(x[n] == first[n] for x in inputs[1:]):
        n += 1
    return n


# --------------------------------------------------------------------------- scoring


@dataclass
class _Row:
    """One request as the model sees it: ``tokens`` after the document's shared prefix."""

    doc: int
    choice: int
    tokens: list[int]  # input tokens after the prefix
    targets: list[int]  # the continuation (what the last len(targets) positions predict)
    offset: int  # position of tokens[0] (= the prefix length)


def _sum_logprobs(logits: torch.Tensor, rows: Sequence[_Row]) -> list[float]:
    """Summed log-probabilities of each row's targets; ``logits`` (n, V) hold the rows' scored
    positions, row after row."""
    targets = torch.tensor([t for r in rows for t in r.targets], device=logits.device)  # (n,)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]  # (n,)
    sizes = [len(r.targets) for r in rows]
    # Summed in float64: the float32 terms are exact; the sum keeps no rounding of its own.
    return [float(part.double().sum()) for part in torch.split(logp, sizes)]


@torch.inference_mode()
def _score_plain(model, rows: Sequence[_Row], pad_id: int) -> list[float]:
    """One right-padded forward pass over whole requests (no prefix)."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    keep = torch.zeros((B, T), dtype=torch.bool)  # positions whose logits are scored
    for b, r in enumerate(rows):
        ids[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        keep[b, len(r.tokens) - len(r.targets) : len(r.tokens)] = True  # predict the targets
    device = device_of(model)
    # Right padding leaves the real tokens at positions 0..n-1, and causal attention never
    # looks right: no attention mask or position ids are needed (lm-eval passes none either).
    logits = logits_at(model, ids.to(device), None, keep.to(device))  # (n, V)
    return _sum_logprobs(logits, rows)


def can_pack(model, longest: int) -> bool:
    """Whether ``model`` takes the packed layout of :func:`_score_packed`: an attention that
    reads a custom 4D mask (sdpa, eager) and no sliding window shorter than the sequences."""
    config = unwrap_model(model).config
    window = getattr(config, "sliding_window", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and (
        not window or longest <= window
    )


def _packed(prefix: Sequence[int], rows: Sequence[_Row]) -> tuple[list[int], list[int], list[int]]:
    """One document as one sequence: its prefix, then each choice's own tokens; (tokens,
    positions, segment: 0 for the prefix, k + 1 for choice k)."""
    tokens, pos, seg = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    for k, r in enumerate(rows):
        tokens += r.tokens
        pos += range(r.offset, r.offset + len(r.tokens))
        seg += [k + 1] * len(r.tokens)
    return tokens, pos, seg


@torch.inference_mode()
def _score_packed(
    model, prefixes: Sequence[Sequence[int]], rows: Sequence[_Row], pad_id: int
) -> list[float]:
    """One forward pass over documents packed one per sequence (``rows`` in (doc, choice)
    order): the prefix once, then the choices' own tokens, each choice seeing the prefix and
    itself only (a 4D mask) at its own positions (each continues the prefix's)."""
    device = device_of(model)
    by_doc: list[list[_Row]] = [[] for _ in prefixes]
    for r in rows:
        by_doc[r.doc].append(r)
    packed = [_packed(p, rs) for p, rs in zip(prefixes, by_doc, strict=True)]
    B, T = len(packed), max(len(t) for t, _, _ in packed)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    keep = torch.zeros((B, T), dtype=torch.bool)  # positions whose logits are scored
    for b, ((tokens, positions, segments), rs) in enumerate(zip(packed, by_doc, strict=True)):
        n = len(tokens)
        ids[b, :n], pos[b, :n] = torch.tensor(tokens), torch.tensor(positions)
        seg[b, :n] = torch.tensor(segments)
        end = len(prefixes[b])
        for r in rs:  # a choice's last len(targets) positions predict its targets
            end += len(r.tokens)
            keep[b, end - len(r.targets) : end] = True
    causal = torch.ones((T, T), dtype=torch.bool).tril()  # (T, T): key j <= query i
    q, k = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = causal & (k != -1) & ((k == 0) | (k == q))  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool)  # a padding query sees itself (no empty row)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((B, 1, T, T), dtype=dtype)  # additive: what sdpa and eager both read
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    logits = logits_at(
        model, ids.to(device), mask.to(device), keep.to(device), position_ids=pos.to(device)
    )  # (n, V), row-major: document by document, choice by choice
    return _sum_logprobs(logits, rows)


def plan_sharing(
    docs: Sequence[Sequence[LoglikelihoodRequest]], max_length: int
) -> tuple[list[list[list[int]]], list[int], float]:
    """(model inputs per document and choice, shared prefix length per document, the fraction
    of input tokens that sharing would save)."""
    inputs = [[model_inputs(r, max_length) for r in reqs] for reqs in docs]
    prefixes = []
    total = saved = 0
    for reqs, xs in zip(docs, inputs, strict=True):
        p = shared_prefix_length(xs, [len(r.continuation) for r in reqs]) if len(xs) > 1 else 0
        prefixes.append(p)
        total += sum(len(x) for x in xs)
        saved += (len(xs) - 1) * p
    return inputs, prefixes, (saved / total if total else 0.0)


def score_documents(
    model,
    docs: Sequence[Sequence[LoglikelihoodRequest]],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    share_prefix: bool | None = None,
) -> list[list[float]]:
    """The summed log-likelihood of every request of every document, ``[doc][choice]``.

    ``batch_size`` is the number of sequences per forward pass, as lm-eval counts them:
    requests, or with ``share_prefix`` (None: decided from the token counts, see the module
    docstring) the prefixes of ``batch_size`` documents, whose choices then go through the
    second pass together (``batch_size`` x choices short rows: about as many tokens as
    ``batch_size`` whole requests).
    """
    inputs, prefixes, saving = plan_sharing(docs, max_length)
    if share_prefix is None:
        share_prefix = saving >= SHARE_MIN_SAVING
    longest = max((sum(len(x) for x in xs) for xs in inputs), default=0)
    share_prefix = share_prefix and can_pack(model, longest)
    out: list[list[float]] = [[0.0] * len(reqs) for reqs in docs]

    def rows_of(d: int, p: int) -> list[_Row]:
        return [
            _Row(d, k, x[p:], r.continuation, p)
            for k, (x, r) in enumerate(zip(inputs[d], docs[d], strict=True))
        ]

    shared = [d for d in range(len(docs)) if share_prefix and prefixes[d] > 0]
    shared_set = set(shared)
    plain = [row for d in range(len(docs)) if d not in shared_set for row in rows_of(d, 0)]

    # Plain requests: longest first (lm-eval's order), ties in document order.
    plain.sort(key=lambda r: (-len(r.tokens), r.doc, r.choice))
    for start in range(0, len(plain), batch_size):
        batch = plain[start : start + batch_size]
        for r, s in zip(batch, _score_plain(model, batch, pad_id), strict=True):
            out[r.doc][r.choice] = s

    # Shared documents, packed: longest packed sequence first, batch_size per forward pass.
    def packed_length(d: int) -> int:
        return prefixes[d] + sum(len(x) - prefixes[d] for x in inputs[d])

    shared.sort(key=lambda d: (-packed_length(d), d))
    for start in range(0, len(shared), batch_size):
        group = shared[start : start + batch_size]
        rows = [
            _Row(j, r.choice, r.tokens, r.targets, r.offset)
            for j, d in enumerate(group)
            for r in rows_of(d, prefixes[d])
        ]
        sums = _score_packed(model, [inputs[d][0][: prefixes[d]] for d in group], rows, pad_id)
        for r, s in zip(rows, sums, strict=True):
            out[group[r.doc]][r.choice] = s
    return out


def loglikelihoods(
    model,
    requests: Sequence[LoglikelihoodRequest],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
) -> list[float]:
    """The summed log-likelihood of each request's continuation, in request order (each request
    its own document: no prefix sharing)."""
    docs = [[r] for r in requests]
    sums = score_documents(model, docs, batch_size=batch_size, max_length=max_length, pad_id=pad_id)
    return [s[0] for s in sums]
