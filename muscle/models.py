"""Load base models and tokenizers; attach, load and save LoRA adapters; dtype and device.

A base is a hub id (``org/name``), a local Hugging Face model directory, or a ``.gguf`` file
(DESIGN §7: SmolLM2 and Gemma arrive as GGUF). Adapters are plain PEFT directories
(``adapter_config.json`` + ``adapter_model.safetensors``) with a muscle sidecar,
``muscle_adapter.json``, that records what they were trained on. Fingerprints of tokenizers,
bases and adapters are :mod:`muscle.fingerprints`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import replace
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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The one device rule. ``None`` / ``"auto"``: CUDA if available, else the CPU. Under
    torchrun a CUDA device without an index is this rank's GPU, ``cuda:LOCAL_RANK``."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def split_gguf(spec: ModelSpec) -> tuple[str, str | None]:
    """Where a base's files are: (directory or hub id, gguf file name or None)."""
    if spec.gguf_file:
        return spec.base, spec.gguf_file
    if spec.base.endswith(".gguf"):
        p = Path(spec.base)
        return str(p.parent), p.name
    return spec.base, None


def check_base_exists(spec: ModelSpec) -> None:
    base, gguf = split_gguf(spec)
    if Path(base).exists():
        if gguf and not (Path(base) / gguf).is_file():
            raise MuscleError(f"GGUF file not found: {Path(base) / gguf}")
        root = Path(base)
        if (
            not gguf
            and (root / "adapter_config.json").is_file()
            and not (root / "config.json").is_file()
        ):
            raise MuscleError(
                f"{base} is a PEFT adapter directory, not a base model: pass it as --adapter, "
                "and the base it was trained on as --base"
            )
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
    base, gguf = split_gguf(spec)
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
    base, gguf = split_gguf(spec)
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
    base, gguf = split_gguf(spec)
    model = load_base(replace(spec.base_only(), dtype="float32"))
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
        # fingerprints builds on this module (split_gguf, the sidecar): imported when used
        from muscle.fingerprints import check_adapter_matches_base

        check_adapter_matches_base(adapter_dir, base_spec)
    return PeftModel.from_pretrained(
        model, str(adapter_dir), is_trainable=trainable, adapter_name=adapter_name
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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out_dir))
        try:
            # Only the adapter being trained ("default"): online mode also holds a frozen
            # teacher adapter.
            peft_model.save_pretrained(
                str(tmp), safe_serialization=True, selected_adapters=["default"]
            )
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
            for name in ("adapter_model.safetensors", "adapter_config.json", SIDECAR):
                os.replace(tmp / name, out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a full disk, permissions: one line, the temp files gone
        raise MuscleError(f"cannot save the adapter in {out_dir}: {e.strerror or e}") from None


# Moved to muscle.fingerprints; importable from here for one release.
_MOVED = {
    "tokenizer_fingerprint",
    "base_fingerprint",
    "adapter_sha256",
    "describe_model",
    "check_adapter_matches_base",
}


def __getattr__(name: str):
    if name in _MOVED:
        import muscle.fingerprints

        return getattr(muscle.fingerprints, name)
    raise AttributeError(f"module 'muscle.models' has no attribute {name!r}")
