"""Load base models and tokenizers, attach / load / save LoRA adapters, and fingerprint them.

A base is a hub id (``org/name``), a local Hugging Face model directory, or a ``.gguf`` file
(DESIGN §7: SmolLM2 and Gemma arrive as GGUF). Adapters are plain PEFT directories
(``adapter_config.json`` + ``adapter_model.safetensors``) with a muscle sidecar,
``muscle_adapter.json``, that records what they were trained on.

Fingerprints let later stages refuse silent mixes:

* :func:`tokenizer_fingerprint` hashes the vocabulary, merges and special tokens;
* :func:`base_fingerprint` hashes a base's config and samples of every weight file: the first
  MiB and 32 windows spread over the rest (3 MiB read per file: cheap for 7B models, yet it
  sees changes anywhere in the tensors, e.g. a merged LoRA);
* :func:`adapter_sha256` hashes the adapter's config and weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from muscle import MuscleError
from muscle.config import LoraSpec, ModelSpec

SIDECAR = "muscle_adapter.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto``: bf16 on a CUDA device that supports it, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise MuscleError(
            f"unknown dtype {name!r}: use float32, bfloat16, float16 or auto"
        ) from None


def _split_gguf(spec: ModelSpec) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    if spec.gguf_file:
        return spec.base, spec.gguf_file
    if spec.base.endswith(".gguf"):
        p = Path(spec.base)
        return str(p.parent), p.name
    return spec.base, None


def check_base_exists(spec: ModelSpec) -> None:
    base, gguf = _split_gguf(spec)
    if Path(base).exists():
        if gguf and not (Path(base) / gguf).is_file():
            raise MuscleError(f"GGUF file not found: {Path(base) / gguf}")
        return
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        if gguf:  # name the file, not just the directory it should be in
            raise MuscleError(f"GGUF file not found: {Path(base) / gguf}")
        raise MuscleError(
            f"base model not found: {base} (a local directory, a .gguf file or a hub id org/name)"
        )


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    check_base_exists(spec)
    base, gguf = _split_gguf(spec)
    kwargs = {"revision": spec.revision} if spec.revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(base, **kwargs)
    except OSError as e:
        raise MuscleError(f"could not load the tokenizer of {base}: {e}".splitlines()[0]) from None
    except _GGUF_READ_ERRORS as e:
        if not gguf:
            raise
        raise MuscleError(_bad_gguf(base, gguf, e)) from None
    # muscle truncates examples itself (muscle.data); silence the tokenizer's own length warning.
    tok.model_max_length = int(1e9)
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere; any id will do, EOS is the convention.
        tok.pad_token = tok.eos_token
    return tok


def load_base(spec: ModelSpec, device: str | torch.device = "cpu"):
    """The base causal LM, in eval mode, in ``spec.dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    check_base_exists(spec)
    base, gguf = _split_gguf(spec)
    dtype = resolve_dtype(spec.dtype, device)
    kwargs = {"revision": spec.revision} if spec.revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kwargs)
    except OSError as e:
        raise MuscleError(f"could not load base model {base}: {e}".splitlines()[0]) from None
    except _GGUF_READ_ERRORS as e:
        if not gguf:
            raise
        raise MuscleError(_bad_gguf(base, gguf, e)) from None
    if gguf:
        model = _dequantized_copy(model, dtype)
    return model.to(device).eval()


# what transformers' GGUF reader raises on a file that is not (a whole) GGUF
_GGUF_READ_ERRORS = (ValueError, struct.error, EOFError, IndexError)


def _bad_gguf(base: str, gguf: str, err: Exception) -> str:
    """One line for a file that the GGUF reader refuses (a truncated download, a git-lfs
    pointer, another format under a .gguf name)."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"{Path(base) / gguf} is not a readable GGUF file ({first}); "
        "download it again or name another base"
    )


def _dequantized_copy(model, dtype: torch.dtype):
    """GGUF models load dequantized but flagged as quantized, which PEFT training refuses.

    Rebuild a plain model of the same class from its config and copy the weights in.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config).to(dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def save_plain_checkpoint(spec: ModelSpec, out_dir: str | Path) -> Path:
    """Write ``spec``'s base (e.g. a quantized GGUF file) as a plain float32 HF checkpoint +
    tokenizer, so later loads skip the slow GGUF path (DESIGN §7). Atomic: temp dir, then rename.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    base, gguf = _split_gguf(spec)
    model = load_base(ModelSpec(spec.base, None, spec.revision, spec.gguf_file, "float32"))
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(base, **kwargs)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def attach_lora(model, lora: LoraSpec):
    """A fresh, trainable LoRA on every linear layer (paper Table 7 defaults)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def load_adapter(
    model,
    adapter_dir: str | Path,
    *,
    trainable: bool = False,
    base_spec: ModelSpec | None = None,
    adapter_name: str = "default",
):
    """Load a PEFT adapter onto ``model``; refuse one whose recorded base differs from ours."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MuscleError(f"not a PEFT adapter directory (no adapter_config.json): {adapter_dir}")
    if base_spec is not None:
        check_adapter_matches_base(adapter_dir, base_spec)
    return PeftModel.from_pretrained(
        model, str(adapter_dir), is_trainable=trainable, adapter_name=adapter_name
    )


def check_adapter_matches_base(adapter_dir: Path, base_spec: ModelSpec) -> None:
    side = read_sidecar(adapter_dir)
    if side and side.get("base", {}).get("fingerprint"):
        want = side["base"]["fingerprint"]
        have = base_fingerprint(base_spec)
        # adapters saved before the fingerprint sampled whole files record the older one
        if want != have and want != base_fingerprint(base_spec, legacy=True):
            raise MuscleError(
                f"adapter {adapter_dir} was trained on base {side['base'].get('path')!r} "
                f"(fingerprint {want}), not on {base_spec.base!r} (fingerprint {have}): "
                "pass the base it was trained on"
            )


def load_model(
    spec: ModelSpec, device: str | torch.device = "cpu", *, trainable_adapter: bool = False
):
    """Base (+ adapter if ``spec.adapter``): the task model ``M = base + Delta`` of the paper."""
    model = load_base(spec, device)
    if spec.adapter:
        model = load_adapter(model, spec.adapter, trainable=trainable_adapter, base_spec=spec)
        model = model.to(device)
    return model


# ------------------------------------------------------------------------------ fingerprints


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what decides token ids: vocabulary, merges, special/added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        keep = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    else:  # a slow tokenizer: the vocabulary is all we can see
        keep = {"vocab": sorted(tokenizer.get_vocab().items())}
    keep["special"] = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    return _sha(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode())[:16]


def base_fingerprint(spec: ModelSpec, *, legacy: bool = False) -> str:
    """Config + sampled bytes of each weight file (:func:`_hash_samples`), for local bases;
    the hub id@revision otherwise. ``legacy=True``: the definition of muscle <= 249a04b (file
    names + the first MiB of each file), which sidecars written before then record."""
    base, gguf = _split_gguf(spec)
    if gguf:
        check_base_exists(spec)  # a missing .gguf is a MuscleError, not a FileNotFoundError
    root = Path(base)
    if not root.exists():
        return _sha(f"hub:{base}@{spec.revision or 'main'}".encode())[:16]
    h = hashlib.sha256()
    files = (
        [root / gguf]
        if gguf
        else sorted(
            p
            for p in root.iterdir()
            if p.suffix in (".safetensors", ".bin", ".json") and p.name != SIDECAR
        )
    )
    for p in files:
        if p.name in ("config.json",) or p.suffix in (".safetensors", ".bin", ".gguf"):
            # a GGUF is one self-contained file: its content, not its name, is the model
            h.update(b"gguf" if p.suffix == ".gguf" and not legacy else p.name.encode())
            h.update(str(p.stat().st_size).encode())
            if legacy:
                with p.open("rb") as f:
                    h.update(f.read(_HEAD_BYTES))
            else:
                _hash_samples(h, p)
    return h.hexdigest()[:16]


_HEAD_BYTES = 1 << 20  # file headers: safetensors' tensor table, GGUF's metadata
_WINDOW_BYTES = 1 << 16
_WINDOWS = 32


def _hash_samples(h, path: Path) -> None:
    """Feed h the first MiB of a file and 32 windows of 64 KiB spread evenly over the rest (the
    last one ends the file); files up to 4 MiB whole. Weight files store tensors one after the
    other, so the head alone can miss what an update changes: a merged LoRA leaves the leading
    embedding table as it was, and SmolLM2's GGUF metadata fills its first 1.7 MiB."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= 4 * _HEAD_BYTES:
            h.update(f.read())
            return
        h.update(f.read(_HEAD_BYTES))
        span = size - _HEAD_BYTES - _WINDOW_BYTES
        for i in range(_WINDOWS):
            f.seek(_HEAD_BYTES + span * (i + 1) // _WINDOWS)
            h.update(f.read(_WINDOW_BYTES))


def adapter_sha256(adapter_dir: str | Path) -> str:
    adapter_dir = Path(adapter_dir)
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        p = adapter_dir / name
        if not p.is_file():
            raise MuscleError(f"adapter file missing: {p}")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ saving


def read_sidecar(adapter_dir: str | Path) -> dict | None:
    p = Path(adapter_dir) / SIDECAR
    return json.loads(p.read_text()) if p.is_file() else None


def save_adapter(peft_model, out_dir: str | Path, sidecar: dict) -> None:
    """Write a plain PEFT adapter + sidecar into ``out_dir``, each file atomically.

    ``out_dir`` may hold other files of the run (logs, checkpoints); each adapter file is
    written to a temporary name and then renamed, weights first and the sidecar last, so a
    reader never sees a half-written file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out_dir))
    try:
        # Only the adapter being trained ("default"): online mode also holds a frozen teacher adapter.
        peft_model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
        for name in ("adapter_model.safetensors", "adapter_config.json", SIDECAR):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_model(spec: ModelSpec) -> dict:
    """Provenance of a task model, for sidecars and cache attributes."""
    out = {
        "base": spec.base,
        "revision": spec.revision,
        "gguf_file": spec.gguf_file,
        "base_fingerprint": base_fingerprint(spec),
        "adapter": spec.adapter,
        "adapter_sha256": None,
    }
    if spec.adapter:
        out["adapter_sha256"] = adapter_sha256(spec.adapter)
    return out


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
    """A tiny randomly initialised Llama, for tests and examples (no download)."""
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
