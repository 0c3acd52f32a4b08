"""Gemma 3 through muscle (issue #14, "large vocabulary end to end"), on tiny Gemma3 models
built from config.

What is Gemma-specific and checked here against independent references:
- the fused LM head on a Gemma3ForCausalLM: its input embeddings are scaled by sqrt(d) but its
  tied LM head is not, and its logits may be soft-capped (``final_logit_softcapping``): loss
  and every gradient (full fine-tune, so the tied embedding gets both its input-side and its
  head-side gradient; a PEFT LoRA student) against the MUSCLE loss in dense float64 on the
  model's own logits;
- a vocabulary above 65,536 through the cache: ids stored as uint32, read back exactly (the
  teacher re-run by ``verify_cache``), the fused and the materialized student giving the same
  loss and LoRA gradients on a cached batch, and compatibility training from that cache;
- log-likelihood scoring (``muscle-eval predict``) with Gemma 3's mixed sliding / full attention
  layers: the shared-prefix (packed, 4D mask) path and the unshared path against a plain
  float64 forward per request.

The real Gemma 3 270M run is ``benchmarks/gemma_e2e.sh``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_fused_head import dense_reference

from muscle.fused_head import (
    find_lm_head,
    fused_linear_masked_kl_with_stats,
    head_inputs,
    probe_fused_head,
)
from tiny import EMBEDDED_DATA, build_tokenizer, random_adapter

IGNORE = -100


def tiny_gemma3(vocab: int, *, softcap: float | None = None, window: int = 8, seed: int = 0):
    """A randomly initialised Gemma3ForCausalLM: 3 layers (sliding, sliding, full), tied head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=softcap,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked distributions: argmax masks and top-K mean something
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(cfg)


def _batch(v: int, seed: int = 0, b: int = 3, t: int = 12) -> dict:
    """(B, T) ids with one right-padded row; labels = next token, prompt and padding ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    labels = torch.roll(ids, -1, 1)
    labels[:, :3] = IGNORE
    labels[:, -1] = IGNORE
    labels[att == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def _teachers(n: int, v: int, k: int = 6, seed: int = 1) -> list[torch.Tensor]:
    """Two top-k teachers (ids, log-probs) for n rows, from random float64 distributions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        lp, ids = torch.log_softmax(
            torch.randn(n, v, generator=g, dtype=torch.float64) * 3, 1
        ).topk(k, 1)
        out += [ids, lp]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / (float(b.abs().max()) + 1e-300)


def _fused_and_reference(model, v: int, ce_weight: float = 0.3):
    """(fused loss, its gradients, reference loss, its gradients) over the trainable params.

    Fused: muscle's hidden states + head + fused loss (chunks of 5 rows). Reference: the model's
    own logits (its forward applies the embedding scale, the final norm and the soft-cap) through
    the MUSCLE loss written densely in float64 (``dense_reference``, fed the logits as h with
    an identity head, so its z is exactly the model's logits)."""
    batch = _batch(v)
    rows = (batch["labels"].reshape(-1) != IGNORE).nonzero().squeeze(1)  # (n,)
    labels = batch["labels"].reshape(-1)[rows]
    teach = _teachers(rows.numel(), v)
    params = [p for p in model.parameters() if p.requires_grad]

    assert probe_fused_head(model) is None
    h, head = head_inputs(model, batch, rows)  # (n, d), the head
    loss, _ = fused_linear_masked_kl_with_stats(
        h, head.weight, head.bias, labels, *teach, chunk_rows=5, ce_weight=ce_weight,
        logit_softcap=head.logit_softcap, impl="chunked",
    )  # fmt: skip
    g_fused = torch.autograd.grad(loss, params)

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    z = out.logits.reshape(-1, v)[rows]  # (n, V), float64
    eye = torch.eye(v, dtype=z.dtype)
    ref, _, _ = dense_reference(z, eye, None, labels, *teach, ce_weight=ce_weight)
    g_ref = torch.autograd.grad(ref, params)
    return loss, g_fused, ref, g_ref, head


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["no-softcap", "softcap"])
def test_fused_head_full_finetune_tied_scaled_embeddings_float64(softcap):
    v = 300
    model = tiny_gemma3(v, softcap=softcap).double()
    emb = model.model.embed_tokens
    # The input side is scaled by sqrt(d), the tied head is not: a head taken as the scaled
    # embedding lookup, or the soft-cap dropped, would give other logits.
    assert float(emb.embed_scale) == pytest.approx(math.sqrt(32))
    head, why = find_lm_head(model)
    assert why == "" and head.weight is emb.weight and head.bias is None
    assert head.logit_softcap == softcap
    loss, g_fused, ref, g_ref, _ = _fused_and_reference(model, v)
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert len(g_fused) == len(g_ref) > 10  # every weight, the tied embedding included
    worst = max(_rel(a, b) for a, b in zip(g_fused, g_ref, strict=True))
    assert worst < 1e-9, worst
    # the soft-cap does act at this scale: the capped logits differ from the raw ones
    if softcap is not None:
        with torch.no_grad():
            raw = model.lm_head(model.model(input_ids=torch.arange(4)[None]).last_hidden_state)
        assert float(raw.abs().max()) > 0.5 * softcap


def test_fused_head_peft_lora_student_float64():
    from peft import LoraConfig, get_peft_model

    v = 300
    model = get_peft_model(
        tiny_gemma3(v, softcap=5.0, seed=2).double(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    with torch.no_grad():  # B = 0 at init would make the LoRA gradients of A vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    loss, g_fused, ref, g_ref, head = _fused_and_reference(model, v)
    assert head.kind == "linear" and not head.weight.requires_grad  # all-linear skips the head
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
    worst = max(_rel(a, b) for a, b in zip(g_fused, g_ref, strict=True))
    assert worst < 1e-9, worst


# ---------------------------------------------------------------------------------------------
# a vocabulary above 65,536 through the cache and compatibility training


def _save_gemma_dir(path, vocab: int, seed: int):
    tok = build_tokenizer()  # 600 tokens; the model's head is larger (ids above them are
    model = tiny_gemma3(vocab, window=512, seed=seed)  # never inputs, only teacher entries)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def big_vocab_cache(tmp_path_factory):
    from muscle.config import DataConfig, ModelSpec
    from muscle.teacher_cache import CacheConfig, build_cache

    v = 70_000
    root = tmp_path_factory.mktemp("gemma")
    base = _save_gemma_dir(root / "base", v, seed=0)
    v1 = ModelSpec(str(base), str(random_adapter(base, root / "a1", 10)))
    v2 = ModelSpec(str(base), str(random_adapter(base, root / "a2", 11)))
    data = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=12, max_length=48)
    cfg = CacheConfig(k=8, chunk_tokens=128, shard_chunks=2)
    cache = root / "cache"
    build_cache(cache, "v1", v1, data, cfg, progress=False)
    build_cache(cache, "v2", v2, data, cfg, progress=False)
    return {"root": root, "cache": cache, "v": v, "v1": v1, "v2": v2}


def test_large_vocabulary_ids_are_uint32_and_read_back_exactly(big_vocab_cache):
    import numpy as np
    import zarr

    from muscle.teacher_cache import CacheReader
    from muscle.teacher_cache.verify import verify_cache

    cache, v = big_vocab_cache["cache"], big_vocab_cache["v"]
    group = zarr.open_group(str(cache), mode="r")
    for t in ("v1", "v2"):
        assert group["teachers"][t]["ids"].dtype == np.uint32
    batch = next(iter(CacheReader(cache).iter_batches("train", 4, temperature=2.0, shuffle=False)))
    ids = batch["v1_ids"]
    assert ids.dtype == torch.int64 and int(ids.max()) >= 65_536 and int(ids.max()) < v
    # the teacher re-run on sampled positions gives the stored ids (beyond 65,535) exactly
    rep = verify_cache(cache, rerun=["v1", "v2"], sample=16, device="cpu")
    assert rep.ok, rep.errors
    for t in ("v1", "v2"):
        assert rep.rerun[t]["ids_exact"] == 1.0, rep.rerun[t]


def test_large_vocabulary_fused_equals_materialized_and_trains(big_vocab_cache, tmp_path):
    import json

    from muscle.compat_train import CompatObjective, train_compat_from_cache
    from muscle.config import CompatConfig, ModelSpec, TrainConfig
    from muscle.models import load_adapter, load_base
    from muscle.teacher_cache import CacheReader

    cache, v2 = big_vocab_cache["cache"], big_vocab_cache["v2"]
    batch = next(iter(CacheReader(cache).iter_batches("train", 4, temperature=2.0, shuffle=False)))
    got = {}
    for fused in (True, False):
        student = load_adapter(load_base(ModelSpec(v2.base)), v2.adapter, trainable=True)
        torch.manual_seed(7)  # the same perturbation for both students
        with torch.no_grad():  # a student other than the v2 teacher: a loss far from 0
            for n, p in student.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        obj = CompatObjective(CompatConfig(fused_head=fused, ce_weight=0.2))
        loss, stats = obj(student, batch)
        loss.backward()
        assert obj._fused is fused
        got[fused] = (loss.item(), [p.grad for p in student.parameters() if p.requires_grad])
    assert got[True][0] > 1e-3
    assert got[True][0] == pytest.approx(got[False][0], rel=1e-5)
    worst = max(_rel(a, b) for a, b in zip(got[True][1], got[False][1], strict=True))
    assert worst < 1e-4, worst

    cfg = TrainConfig(lr=1e-3, epochs=1, grad_accum=1, warmup_steps=0, batch_size=4, max_steps=2)
    res = train_compat_from_cache(cache, tmp_path / "v2c", train_cfg=cfg, device="cpu")
    assert res.state == "trained" and math.isfinite(res.best_val_loss)
    rows = [json.loads(x) for x in (tmp_path / "v2c" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)


# ---------------------------------------------------------------------------------------------
# scoring with Gemma 3's sliding / full attention layers


@pytest.mark.parametrize("window", [512, 4], ids=["packed", "short-window-unshared"])
def test_loglikelihoods_match_a_plain_forward(window):
    from muscle import eval_scoring as es

    tok = build_tokenizer()
    model = tiny_gemma3(len(tok), window=window, seed=3).eval()
    bread, jar = "Question: How do I keep bread fresh?\nAnswer:", "Question: Open a jar.\nAnswer:"
    ctxs = [bread] * 3 + [jar] * 2
    conts = [" Put it in a bag.", " Leave it in the sun for a week.", " Freeze it.",
             " Twist the lid.", " Tap the lid, then twist it hard."]  # fmt: skip
    reqs = es.loglikelihood_requests(tok, ctxs, conts)
    docs = [reqs[:3], reqs[3:]]
    # the packed layout only where the window covers a document (Gemma's 512 here, not 4)
    assert es.can_pack(model, 40) is (window == 512)
    ref = []
    model64 = tiny_gemma3(len(tok), window=window, seed=3).double().eval()
    with torch.no_grad():
        for r in reqs:  # one unpadded float64 forward per request
            ids = torch.tensor([r.context + r.continuation])
            lp = torch.log_softmax(model64(ids).logits[0], -1)  # (T, V)
            n = len(r.context)
            ref.append(sum(float(lp[n - 1 + j, t]) for j, t in enumerate(r.continuation)))
    for share in (True, False):
        got = es.score_documents(model, docs, batch_size=2, max_length=256,
                                 pad_id=tok.pad_token_id, share_prefix=share)  # fmt: skip
        flat = [x for d in got for x in d]
        assert flat == pytest.approx(ref, abs=1e-4), (share, flat, ref)
