"""Fingerprints: what a model is, so later stages refuse silent mixes.

* :func:`tokenizer_fingerprint` hashes the vocabulary, merges and special tokens (the one
  tokenizer fingerprint: sidecars, caches, runs and the embedded pair's stages record it);
* :func:`base_fingerprint` hashes a base's config and samples of every weight file: the first
  MiB and 32 windows spread over the rest (3 MiB read per file: cheap for 7B models, yet it
  sees changes anywhere in the tensors, e.g. a merged LoRA);
* :func:`adapter_sha256` hashes the adapter's config and weights;
* :func:`describe_model` is a task model's provenance, :func:`check_adapter_matches_base`
  refuses an adapter trained on another base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from muscle import MuscleError
from muscle.config import ModelSpec
from muscle.models import SIDECAR, check_base_exists, read_sidecar, split_gguf


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer, *, legacy_pretrain: bool = False) -> str:
    """A stable hash of what decides token ids: vocabulary, merges, special/added tokens.

    ``legacy_pretrain=True``: the sha256 of the whole backend JSON that :mod:`muscle.pretrain`
    used before it shared this one; only to recognise stage directories built then.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if legacy_pretrain:
        return _sha(backend.to_str().encode())
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
    base, gguf = split_gguf(spec)
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
