"""Model helpers: exporting a base as a plain checkpoint keeps its weights and tokenizer."""

import torch

from muscle.config import ModelSpec
from muscle.models import load_base, load_tokenizer, save_plain_checkpoint, tokenizer_fingerprint
from tiny import make_model_dir


def test_save_plain_checkpoint_round_trips(tmp_path):
    src = make_model_dir(tmp_path / "src", seed=4)
    out = save_plain_checkpoint(ModelSpec(str(src)), tmp_path / "plain")
    assert not (tmp_path / "plain.tmp").exists()
    x = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        a = load_base(ModelSpec(str(src)))(x).logits
        b = load_base(ModelSpec(str(out)))(x).logits
    assert torch.equal(a, b)
    assert tokenizer_fingerprint(load_tokenizer(ModelSpec(str(src)))) == tokenizer_fingerprint(
        load_tokenizer(ModelSpec(str(out)))
    )


def test_base_fingerprint_sees_changes_past_the_head(tmp_path):
    # A merged LoRA changes the attention / MLP matrices but not the leading embedding table:
    # the fingerprint must see a change anywhere in a large weight file, not only its head.
    from muscle.models import base_fingerprint

    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    size = 40 * 2**20 + 12345  # past the 4 MiB "hash whole" limit, odd length
    rng = torch.Generator().manual_seed(0)
    data = bytearray(torch.randint(0, 256, (size,), generator=rng, dtype=torch.uint8).numpy())
    weights = d / "model.safetensors"
    weights.write_bytes(bytes(data))
    spec = ModelSpec(str(d))
    fp = base_fingerprint(spec)
    assert base_fingerprint(spec) == fp
    for lo, hi in (
        (size // 2, size // 2 + 2**20),
        (size - 100, size),
    ):  # a 1 MiB middle region; the tail
        changed = bytearray(data)
        changed[lo:hi] = bytes(hi - lo)
        weights.write_bytes(bytes(changed))
        assert base_fingerprint(spec) != fp
    weights.write_bytes(bytes(data))
    assert base_fingerprint(spec) == fp


def test_adapters_recording_the_legacy_fingerprint_still_load(tmp_path):
    # Sidecars written before the fingerprint sampled whole files record the older definition
    # (file name, size and first MiB of config.json and each weight file, sha256, 16 hex): they
    # must still be accepted, and a wrong fingerprint still refused.
    import hashlib
    import json

    import pytest

    from muscle import MuscleError
    from muscle.models import SIDECAR, check_adapter_matches_base

    base = make_model_dir(tmp_path / "base", seed=5)
    h = hashlib.sha256()
    for p in sorted(base.iterdir()):
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin"):
            h.update(p.name.encode() + str(p.stat().st_size).encode() + p.read_bytes()[: 1 << 20])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for fp, ok in ((h.hexdigest()[:16], True), ("0123456789abcdef", False)):
        (adapter / SIDECAR).write_text(json.dumps({"base": {"path": str(base), "fingerprint": fp}}))
        if ok:
            check_adapter_matches_base(adapter, ModelSpec(str(base)))
        else:
            with pytest.raises(MuscleError, match="was trained on base"):
                check_adapter_matches_base(adapter, ModelSpec(str(base)))


def test_one_device_rule(monkeypatch):
    import torch

    from muscle.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    # Under torchrun a bare "cuda" is this rank's GPU; an explicit index is kept.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda", 1)


def test_base_only_drops_just_the_adapter():
    spec = ModelSpec("b", "a", revision="r", gguf_file="g.gguf", dtype="bfloat16")
    assert spec.base_only() == ModelSpec(
        "b", None, revision="r", gguf_file="g.gguf", dtype="bfloat16"
    )


def test_moved_fingerprints_still_import_from_models():
    import muscle.fingerprints as F
    import muscle.models as M

    for name in ("tokenizer_fingerprint", "base_fingerprint", "adapter_sha256", "describe_model"):
        assert getattr(M, name) is getattr(F, name)
