"""Tiny models and tokenizers built from scratch for tests (no hub, seconds on a CPU)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Everything the tests read lives in the repository (DATA_FORMAT.md describes the layout).
# The full PIQA and GSM8K files ship inside the package (muscle/embedded): the tokenizer corpus
# and the PIQA-only tests read them, unchanged.
EMBEDDED_DATA = REPO / "muscle" / "embedded" / "data"
# A small data dir with all four tasks (first lines of the real files; synthetic SAMSum; see its
# NOTICE.md), for tests that need HellaSwag or SAMSum, or one data dir holding every task.
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


def corpus_lines(n: int = 3000) -> list[str]:
    """Some real text for the tokenizer: PIQA goals/solutions and GSM8K questions."""
    out: list[str] = []
    with (EMBEDDED_DATA / "piqa" / "train.jsonl").open() as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            out += [r["goal"], r["sol1"], r["sol2"]]
    with (EMBEDDED_DATA / "gsm8k" / "train.jsonl").open() as f:
        for i, line in enumerate(f):
            if i >= n // 4:
                break
            r = json.loads(line)
            out += [r["question"], r["answer"]]
    return out


@lru_cache(maxsize=4)
def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with BOS prepended, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    max_positions: int = 512,
    initializer_range: float = 0.02,
):
    """A tiny randomly initialised Llama (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(cfg)


def make_model_dir(
    path: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int = 600,
    init_std: float = 0.02,
) -> Path:
    """Save a tiny random Llama + the shared tiny tokenizer as a HF model directory."""
    tok = build_tokenizer(vocab_size)
    # A larger init_std gives peaked, model-specific next-token distributions (random models
    # with the default init are nearly uniform, which makes top-1 comparisons meaningless).
    model = tiny_llama(
        len(tok), hidden=hidden, layers=layers, seed=seed, initializer_range=init_std
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli_main(main, args, capsys):
    """Call a muscle CLI entry point in-process: (exit code, stdout, stderr)."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def random_lora(base_dir: Path, seed: int):
    """A trainable LoRA (r = 4) on ``base_dir`` with non-zero B: with B = 0 (a fresh LoRA) it
    would not change the model and every A gradient would be zero."""
    import torch

    from muscle.config import LoraSpec, ModelSpec
    from muscle.models import attach_lora, load_base

    torch.manual_seed(seed)
    model = attach_lora(load_base(ModelSpec(str(base_dir))), LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def random_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """:func:`random_lora` saved as an adapter directory with muscle's sidecar."""
    from muscle.config import ModelSpec
    from muscle.models import base_fingerprint, save_adapter

    spec = ModelSpec(str(base_dir))
    sidecar = {"base": {"path": str(base_dir), "fingerprint": base_fingerprint(spec)}}
    save_adapter(random_lora(base_dir, seed), out, sidecar)
    return out


def no_logits_to_keep(model):
    """``model`` behind a forward without ``logits_to_keep`` (older or custom causal LMs): what
    :func:`muscle.forward.logits_at` must fall back for (full logits, then a row selection)."""
    import torch

    class NoLogitsToKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache)  # fmt: skip

    return NoLogitsToKeep(model)
