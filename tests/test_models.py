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
        load_tokenizer(ModelSpec(str(out))))
