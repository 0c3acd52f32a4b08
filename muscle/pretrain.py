"""Pretrain the embedded default model pair (v1, v2) from the text that ships in this repository.

There is no model hub on a new user's machine, so ``make demo`` builds its own pair of small
Llama-architecture base models. They share one byte-level BPE tokenizer, and v2 is a realistic
*update* of v1 in the sense of the MUSCLE paper (Table 1: more data, longer training): v1 is
pretrained on part of the corpus, and v2 continues from v1's weights on the whole corpus for as
many steps again. v2 therefore has a clearly lower held-out perplexity, yet it is a different
model whose task adapters will get some examples wrong that v1's got right (negative flips).

Everything here is a cached *stage*: each artefact (tokenizer, v1, v2) is written into a temp
directory and renamed into place when complete, with a ``muscle_pretrain.json`` that records
its config and the fingerprint of everything it was built from. A later call with the same
inputs skips the work; a temp directory left by a killed run is removed and rebuilt.

The corpus (WikiText plus task training prose) is built in ``muscle/pretrain_corpus.py``;
this module tokenizes it, trains the pair and writes the stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from muscle.fingerprints import tokenizer_fingerprint
from muscle.pretrain_corpus import (  # the corpus names are re-exported here for old imports
    EMBEDDED_DATA,
    Corpus,  # noqa: F401
    _sha256_texts,
    build_corpus,
    gsm8k_prose,  # noqa: F401
    piqa_prose,  # noqa: F401
    wikitext_articles,  # noqa: F401
)

META_FILE = "muscle_pretrain.json"
FORMAT_VERSION = 1

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Llama architecture of a pretrained model (the vocabulary comes from the tokenizer)."""

    hidden_size: int = 160
    num_layers: int = 3
    num_heads: int = 4
    intermediate_mult: int = 4  # intermediate_size = mult * hidden_size
    max_position: int = 512


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run. Every field enters the fingerprint that decides whether to skip."""

    shape: ModelShape = field(default_factory=ModelShape)
    seq_len: int = 256
    batch_size: int = 16  # sequences per step: 16 x 256 = 4096 tokens per step
    steps: int = 150
    lr: float = 3e-3  # tiny models tolerate (and need, in few steps) a high peak LR
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 15
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # "auto": bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX), else fp32.
    # Measured on a 2-core Xeon with AMX: bf16 autocast 13.4k tok/s vs fp32 8.0k tok/s
    # (hidden 192, 4 layers); on CPUs without native bf16 it is emulated and slower.
    precision: str = "auto"
    data_fraction: float = 1.0  # share of the training documents this run samples from
    data_seed: int = 0  # picks the data_fraction subset and the document order
    eval_tokens: int = 65536  # held-out tokens scored for perplexity (0: skip)
    # torch intra-op threads for this run (None: torch's default, all cores). Tiny models want
    # 1: on 2 shared cores, two threads spin-waiting on each other's tiny ops ran 10x slower.
    threads: int | None = None


@dataclass(frozen=True)
class PairProfile:
    """How to build the (v1, v2) pair: v2 continues from v1 (same shape) on more data."""

    vocab_size: int
    v1: PretrainConfig
    v2: PretrainConfig
    heldout_articles: int = 6  # WikiText articles kept out of every training set
    max_docs: int | None = None  # cap on documents per source: the "test" profile takes seconds


def _demo_profile() -> PairProfile:
    shape = ModelShape(hidden_size=160, num_layers=3, num_heads=4)
    v1 = PretrainConfig(shape=shape, steps=150, data_fraction=0.6, data_seed=1)
    # v2 = v1 continued on the whole corpus: more data and twice the total training. A fresh
    # (lower) warmup + cosine, as when a lab resumes pretraining from a released checkpoint.
    v2 = dataclasses.replace(v1, steps=150, lr=2e-3, data_fraction=1.0, data_seed=2, seed=1)
    return PairProfile(vocab_size=4096, v1=v1, v2=v2)


def _test_profile() -> PairProfile:
    # Seconds on 2 cores; fp32 because bf16 autocast only costs casts at these tiny sizes.
    # 60 steps take v1 past the unigram plateau, so v2's extra training shows in the loss.
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=2, max_position=256)
    v1 = PretrainConfig(
        shape=shape,
        seq_len=64,
        batch_size=16,
        steps=60,
        warmup_steps=5,
        lr=1e-2,
        data_fraction=0.6,
        data_seed=1,
        eval_tokens=4096,
        precision="fp32",
        threads=1,
    )
    v2 = dataclasses.replace(v1, data_fraction=1.0, data_seed=2, seed=1, lr=5e-3)
    return PairProfile(vocab_size=512, v1=v1, v2=v2, heldout_articles=2, max_docs=30)


PROFILES: dict[str, Callable[[], PairProfile]] = {"demo": _demo_profile, "test": _test_profile}


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE tokenizer and save it so ``AutoTokenizer`` loads it offline.

    Byte-level: every string round-trips (no unknown token). ``<s>`` is prepended by the
    post-processor, so ``tokenizer(text)["input_ids"][0] == bos_token_id`` as with Llama
    tokenizers; ``add_special_tokens=False`` leaves it out. Training is deterministic for the
    same texts. Cached: skipped when ``out_dir`` holds a tokenizer built from the same inputs.

    Why 4096 for the demo: the LM head and softmax over V weigh heavily in a tiny model's cost
    on CPU (at hidden 160, 3 layers, V=4096 the head is ~35% of the FLOPs), while 4k merges
    still give realistic subwords (3.3-3.7 characters per token on the embedded corpus).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    spec = {"kind": "tokenizer", "vocab_size": vocab_size}
    fingerprint = _fingerprint(spec, _sha256_texts(texts))
    if _is_done(out_dir, fingerprint):
        return AutoTokenizer.from_pretrained(out_dir)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )

    def write(tmp: Path) -> None:
        fast.save_pretrained(tmp)
        _write_meta(tmp, fingerprint, {"vocab_size": vocab_size, "texts": len(texts)})

    _atomic_build(out_dir, write)
    return AutoTokenizer.from_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Data: documents -> packed blocks
# ---------------------------------------------------------------------------------------------


def pack_documents(tokenizer, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """Token ids of ``<s> doc </s>`` for every doc, concatenated and cut into blocks.

    Returns [n_blocks, seq_len] int64; the tail shorter than a block is dropped. Documents run
    across block boundaries (standard packing): no padding, so every token trains.
    """
    # The backend directly: same ids (its post-processor adds BOS) without the tokenizer's
    # "longer than model_max_length" warning, which does not apply before packing.
    ids = [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(list(docs))]
    eos = tokenizer.eos_token_id
    flat = torch.from_numpy(
        np.fromiter(itertools.chain.from_iterable((*doc, eos) for doc in ids), dtype=np.int64)
    )
    n_blocks = flat.numel() // seq_len
    return flat[: n_blocks * seq_len].view(n_blocks, seq_len)


def select_documents(docs: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded random ``fraction`` of the documents, in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    return [docs[i] for i in order[: max(1, round(fraction * len(docs)))]]


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------


def llama_config(shape: ModelShape, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_mult * shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position,
        tie_word_embeddings=True,  # halves the parameters a 4k x 160 head would add
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def use_bf16(precision: str) -> bool:
    if precision == "auto":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16"


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over blocks [n, seq], in fp32."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]  # [b, seq]
        n_pred = batch.shape[0] * (batch.shape[1] - 1)
        total += model(input_ids=batch, labels=batch).loss.item() * n_pred
        count += n_pred
    model.train(was_training)
    return total / max(1, count)


def pretrain(
    config: PretrainConfig,
    tokenizer,
    texts: Sequence[str],
    out_dir: str | Path,
    init_from: str | Path | None = None,
    *,
    heldout: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Pretrain a LlamaForCausalLM on ``texts`` and save it (with the tokenizer) to ``out_dir``.

    ``init_from``: a model dir written by this function to continue from (same shape), as in
    continued pretraining; otherwise weights are initialised from ``config.seed``. The run
    samples ``config.data_fraction`` of the documents. ``heldout`` texts, if given, are scored
    at the end and the perplexity recorded in ``muscle_pretrain.json``. Skipped when ``out_dir``
    already holds a finished model with the same fingerprint (config, tokenizer, corpus, parent).
    """
    out_dir = Path(out_dir)
    parent_fp = _read_meta(Path(init_from))["fingerprint"] if init_from is not None else None
    corpus_fp = _sha256_texts(["train", *texts, "heldout", *heldout])
    spec = {"kind": "model", "config": dataclasses.asdict(config), "init_from": parent_fp}
    fingerprint = _fingerprint(spec, corpus_fp, tokenizer_fingerprint(tokenizer))
    # Models built before pretrain shared muscle.fingerprints recorded the older tokenizer hash
    # in their stage fingerprint: they are the same models, so they are reused as they are.
    legacy = _fingerprint(spec, corpus_fp, tokenizer_fingerprint(tokenizer, legacy_pretrain=True))
    if _is_done(out_dir, fingerprint) or _is_done(out_dir, legacy):
        return out_dir

    with _num_threads(config.threads):
        model, info = _train_model(config, tokenizer, texts, init_from, heldout, progress)
    info.update(
        {
            "config": dataclasses.asdict(config),
            "init_from": str(init_from) if init_from is not None else None,
            "init_from_fingerprint": parent_fp,
            "corpus_fingerprint": corpus_fp,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        }
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_meta(tmp, fingerprint, info)

    _atomic_build(out_dir, write)
    return out_dir


def _train_model(config: PretrainConfig, tokenizer, texts, init_from, heldout, progress):
    """Initialise (or load ``init_from``), train and score a model; returns (model, info)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.seed)
    if init_from is not None:
        model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        _check_shape(model.config, llama_config(config.shape, tokenizer))
    else:
        model = LlamaForCausalLM(llama_config(config.shape, tokenizer))
    docs = select_documents(texts, config.data_fraction, config.data_seed)
    blocks = pack_documents(tokenizer, docs, config.seq_len)  # [n_blocks, seq_len]
    t0 = time.perf_counter()
    losses = _train_loop(model, blocks, config, progress)
    info = {
        "documents": len(docs),
        "train_blocks": int(blocks.shape[0]),
        "tokens_seen": config.steps * config.batch_size * config.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "bf16": use_bf16(config.precision),
    }
    if heldout and config.eval_tokens > 0:
        eval_blocks = pack_documents(tokenizer, heldout, config.seq_len)
        eval_blocks = eval_blocks[: max(1, config.eval_tokens // config.seq_len)]
        loss = heldout_loss(model, eval_blocks)
        info.update(
            heldout_loss=loss, heldout_ppl=math.exp(loss), heldout_tokens=int(eval_blocks.numel())
        )
    return model, info


@contextlib.contextmanager
def _num_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_loop(model, blocks: torch.Tensor, cfg: PretrainConfig, progress: bool) -> list[float]:
    """AdamW + warmup/cosine over random batches of blocks; returns the per-step losses."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    bf16 = use_bf16(cfg.precision)
    g = torch.Generator().manual_seed(cfg.seed)
    # Epoch-style sampling: a fresh permutation of blocks each pass, so no block repeats
    # before every block has been seen once.
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, mininterval=1.0)
    t0 = time.perf_counter()
    for step in bar:
        if order.numel() < cfg.batch_size:
            order = torch.cat([order, torch.randperm(blocks.shape[0], generator=g)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = blocks[idx]  # [batch, seq]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tok_s = (step + 1) * batch.numel() / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
    return losses


def _check_shape(have, want) -> None:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    diff = {
        k: (getattr(have, k), getattr(want, k))
        for k in keys
        if getattr(have, k) != getattr(want, k)
    }
    if diff:
        raise ValueError(f"init_from model does not match config.shape (have, want): {diff}")


# ---------------------------------------------------------------------------------------------
# The pair
# ---------------------------------------------------------------------------------------------


def build_model_pair(
    out_root: str | Path,
    *,
    profile: str | PairProfile = "demo",
    data_dir: Path = EMBEDDED_DATA,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Build (or reuse) ``out_root/{tokenizer,v1,v2}``; returns ``(v1_dir, v2_dir)``.

    v1: pretrained from scratch on ``v1.data_fraction`` of the corpus. v2: v1's weights
    continued on ``v2.data_fraction`` (all) of it: more data and longer total training. Both
    dirs hold the shared tokenizer and load with ``AutoModelForCausalLM.from_pretrained``;
    their held-out perplexities are in ``muscle_pretrain.json`` and ``out_root/pair.json``.
    """
    prof = PROFILES[profile]() if isinstance(profile, str) else profile
    out_root = Path(out_root)
    corpus = build_corpus(data_dir, heldout_articles=prof.heldout_articles, max_docs=prof.max_docs)
    tokenizer = train_tokenizer(corpus.train, prof.vocab_size, out_root / "tokenizer")
    v1 = pretrain(
        prof.v1, tokenizer, corpus.train, out_root / "v1", heldout=corpus.heldout, progress=progress
    )
    v2 = pretrain(
        prof.v2,
        tokenizer,
        corpus.train,
        out_root / "v2",
        init_from=v1,
        heldout=corpus.heldout,
        progress=progress,
    )
    summary = {
        name: {
            k: _read_meta(d).get(k)
            for k in ("heldout_loss", "heldout_ppl", "tokens_seen", "train_seconds")
        }
        for name, d in (("v1", v1), ("v2", v2))
    }
    (out_root / "pair.json").write_text(json.dumps(summary, indent=2) + "\n")
    return v1, v2


# ---------------------------------------------------------------------------------------------
# Fingerprints and atomic, resumable output
# ---------------------------------------------------------------------------------------------


def _fingerprint(spec: dict, *parts: str) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "spec": spec, "parts": parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


def _write_meta(tmp: Path, fingerprint: str, info: dict) -> None:
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, **info}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _is_done(out_dir: Path, fingerprint: str) -> bool:
    try:
        return _read_meta(out_dir).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _atomic_build(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` in ``<out_dir>.tmp`` and rename it to ``out_dir`` once it returns.

    A ``.tmp`` left by a killed run is deleted first: it is never read. A stale ``out_dir``
    (other fingerprint) is moved aside before the rename and deleted after, so a reader sees
    either the old complete dir or the new one. Not safe for two concurrent builders of the
    same ``out_dir``.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    write(tmp)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
