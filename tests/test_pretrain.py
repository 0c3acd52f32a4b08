"""The embedded model pair: tokenizer, corpus hygiene, the "test" profile pair, caching."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from muscle import pretrain as P

SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold 48/2 = 24 clips in May.\nThe answer is 72.",
    "To boil an egg, put it in boiling water for nine minutes.",
] * 20


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    v1, v2 = P.build_model_pair(root, profile="test", progress=False)
    return root, v1, v2


def test_tokenizer_bos_eos_pad_roundtrip(tmp_path):
    tok = P.train_tokenizer(SAMPLE, 300, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")  # offline, from disk only
    text = "Héllo  wörld!\n\tTabs, 123 and ünïcode never seen in training: 猫."
    for t in (tok, loaded):
        ids = t(text)["input_ids"]
        assert ids[0] == t.bos_token_id
        assert t.bos_token == "<s>" and t.eos_token == "</s>" and t.pad_token == "<pad>"
        assert len({t.bos_token_id, t.eos_token_id, t.pad_token_id}) == 3
        assert t.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
        assert t(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert len(loaded) == 300


def test_tokenizer_is_deterministic(tmp_path):
    P.train_tokenizer(SAMPLE, 300, tmp_path / "a")
    P.train_tokenizer(SAMPLE, 300, tmp_path / "b")
    a, b = (tmp_path / d / "tokenizer.json" for d in ("a", "b"))
    assert a.read_text() == b.read_text()


def test_corpus_keeps_eval_splits_out():
    corpus = P.build_corpus()
    train = set(corpus.train)
    # Held-out WikiText articles are not trained on.
    assert corpus.heldout and not train.intersection(corpus.heldout)
    # PIQA valid (the evaluation split) is not pretrained on. Upstream PIQA has 4 valid
    # examples whose goal and answer also occur verbatim in train: those are allowed.
    piqa = {}
    for split in ("train", "valid"):
        with open(P.EMBEDDED_DATA / "piqa" / f"{split}.jsonl") as f:
            piqa[split] = {P.piqa_prose(json.loads(line)) for line in f}
    leaked = train & piqa["valid"]
    assert leaked <= piqa["train"] and len(leaked) <= 4
    assert len(train & piqa["train"]) > 15000  # the train split is, with its right answers
    with open(P.EMBEDDED_DATA / "gsm8k" / "test.jsonl") as f:
        assert not train.intersection(P.gsm8k_prose(json.loads(line)) for line in f)


def test_wikitext_spacing_is_undone():
    raw = " \n = Lobster = \n \n It is 1 @,@ 000 km long , and well @-@ known ( red ) .\n"
    raw += " = = Taxonomy = = \n It is Paul 's ship .\n = Next = \n Body .\n"
    arts = P.wikitext_articles(raw)
    assert arts == [
        "Lobster\nIt is 1,000 km long, and well-known (red).\nTaxonomy\nIt is Paul's ship.",
        "Next\nBody.",
    ]


def test_gsm8k_prose_drops_calculator_and_marker():
    row = {"question": "How many?", "answer": "48/2 = <<48/2=24>>24 clips.\n#### 72"}
    assert P.gsm8k_prose(row) == "How many?\n48/2 = 24 clips.\nThe answer is 72."


def test_lr_schedule():
    cfg = P.PretrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert P.lr_at(0, cfg) == pytest.approx(0.1)
    assert P.lr_at(9, cfg) == pytest.approx(1.0)
    assert P.lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [P.lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_pair_loads_and_v2_is_better(pair):
    root, v1, v2 = pair
    tok = AutoTokenizer.from_pretrained(v1)
    tok2 = AutoTokenizer.from_pretrained(v2)
    assert tok.backend_tokenizer.to_str() == tok2.backend_tokenizer.to_str()  # shared tokenizer
    m1 = AutoModelForCausalLM.from_pretrained(v1)
    m2 = AutoModelForCausalLM.from_pretrained(v2)
    assert type(m1).__name__ == "LlamaForCausalLM" and m1.config.tie_word_embeddings
    assert m1.config.vocab_size == len(tok) and m1.config.bos_token_id == tok.bos_token_id

    # Score the held-out WikiText ourselves rather than trusting the recorded numbers.
    corpus = P.build_corpus(heldout_articles=2, max_docs=30)
    blocks = P.pack_documents(tok, corpus.heldout, 64)[:64]  # [64, 64]
    loss1, loss2 = P.heldout_loss(m1, blocks), P.heldout_loss(m2, blocks)
    assert loss1 < math.log(len(tok)) - 0.5  # v1 learned something beyond uniform
    assert loss2 < loss1 - 0.05  # the update is clearly better...
    w1, w2 = m1.model.layers[0].mlp.up_proj.weight, m2.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w1, w2)  # ...and a different model

    summary = json.loads((root / "pair.json").read_text())
    assert summary["v2"]["heldout_ppl"] < summary["v1"]["heldout_ppl"]
    meta2 = json.loads((v2 / P.META_FILE).read_text())
    meta1 = json.loads((v1 / P.META_FILE).read_text())
    assert meta2["init_from_fingerprint"] == meta1["fingerprint"]  # v2 continues from v1


def test_rerun_is_a_noop(pair, monkeypatch):
    root, v1, v2 = pair
    before = {p: p.stat().st_mtime_ns for p in (v1 / "model.safetensors", v2 / "model.safetensors")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was retrained")

    monkeypatch.setattr(P, "_train_loop", no_training)
    assert P.build_model_pair(root, profile="test", progress=False) == (v1, v2)
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_killed_run_is_cleaned_up_and_rebuilt(pair, monkeypatch):
    root, v1, v2 = pair
    weights = (v2 / "model.safetensors").read_bytes()
    shutil.rmtree(v2)

    # A run killed while writing leaves a half-written temp dir and no v2.
    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("transformers.PreTrainedModel.save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            P.build_model_pair(root, profile="test", progress=False)
    tmp = root / "v2.tmp"
    assert tmp.is_dir() and not v2.exists()
    (tmp / "model.safetensors").write_bytes(b"garbage")

    assert P.build_model_pair(root, profile="test", progress=False) == (v1, v2)
    assert not tmp.exists()
    assert (v2 / "model.safetensors").read_bytes() == weights  # same seed: the same model
    AutoModelForCausalLM.from_pretrained(v2)


def test_pair_built_with_the_old_tokenizer_hash_is_reused(pair, monkeypatch):
    # Before pretrain shared muscle.fingerprints, a stage's fingerprint held the sha256 of the
    # tokenizer's whole backend JSON. Pairs built then (e.g. runs/demo/models) must be reused as
    # they are, not retrained: rewrite both metas the old way and build again.
    import hashlib

    from muscle.fingerprints import tokenizer_fingerprint

    root, v1, v2 = pair
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    old_tok = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    assert tokenizer_fingerprint(tok, legacy_pretrain=True) == old_tok
    prof = P.PROFILES["test"]()
    corpus = P.build_corpus(heldout_articles=prof.heldout_articles, max_docs=prof.max_docs)
    corpus_fp = P._sha256_texts(["train", *corpus.train, "heldout", *corpus.heldout])
    parent = None
    for d, cfg in ((v1, prof.v1), (v2, prof.v2)):
        meta = json.loads((d / P.META_FILE).read_text())
        assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)  # the one, 16 hex
        spec = {"kind": "model", "config": dataclasses.asdict(cfg), "init_from": parent}
        meta["fingerprint"] = P._fingerprint(spec, corpus_fp, old_tok)
        meta["tokenizer_fingerprint"] = old_tok
        (d / P.META_FILE).write_text(json.dumps(meta))
        parent = meta["fingerprint"]

    def no_training(*args, **kwargs):
        raise AssertionError("a pair built before the change was retrained")

    monkeypatch.setattr(P, "_train_loop", no_training)
    assert P.build_model_pair(root, profile="test", progress=False) == (v1, v2)
