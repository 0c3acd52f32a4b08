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
