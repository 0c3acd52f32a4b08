"""GGUF bases (DESIGN §7), end to end through muscle's own loaders, in seconds.

Real users load SmolLM2-135M as a Q4_1 GGUF file; loading it takes minutes and it must never be
committed. So each test writes a tiny Llama as a .gguf laid out the way llama.cpp's converter
writes the real file: llama tensor names, q/k rows permuted for llama.cpp's rotary embedding, a
byte-level BPE vocabulary with its merges, and -- in the Q4_1 case -- a Q8_0 token embedding
beside Q4_1 linear weights and F32 norms. Everything here is written with the ``gguf`` package;
reading it back is left to transformers, through ``muscle.models``.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from muscle import MuscleError
from muscle.config import LoraSpec, ModelSpec
from muscle.models import (
    attach_lora,
    base_fingerprint,
    load_base,
    load_tokenizer,
    save_plain_checkpoint,
    tokenizer_fingerprint,
)
from tiny import make_model_dir

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
Q = gguf.GGMLQuantizationType

MIB = 1 << 20
TEXTS = [
    "How do I keep bread fresh? Wrap it in a towel and store it in a cool place.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "  two leading spaces,\ttabs\nand new lines\n\n",
    "Unicode: café, naïve, 東京, emoji 🙂 -- and digits 1234567.",
    "an eos token </s> inside the text",
]


# ------------------------------------------------------------------------------ writing a GGUF


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): within each head, interleave the two
    rotary halves of the rows. transformers' GGUF loader undoes exactly this."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LEAVES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.weight
    return f"blk.{layer}.{_LEAVES[rest.removesuffix('.weight')]}.weight"


def _ggml_type(gguf_name: str, ndim: int, storage: str):
    """The type llama.cpp would store a tensor in for a file of ``storage``."""
    if ndim == 1 or storage == "F32":
        return Q.F32  # norms stay F32 in every llama.cpp file
    if storage == "Q4_1" and gguf_name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0  # as in the real SmolLM2-135M Q4_1 file
    return Q[storage]


def _stored(w: np.ndarray, qtype) -> np.ndarray:
    """``w`` as the file holds it, and read back: what a faithful loader must produce."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


def _tokenizer_fields(tok) -> dict:
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert spec["model"]["type"] == "BPE"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    return {
        "tokens": tokens,
        "types": [3 if i in special else 1 for i in range(len(tokens))],  # 3: CONTROL, 1: NORMAL
        "merges": merges,
    }


def write_gguf(path, model, tok, storage: str = "F32", *, metadata_padding: int = 0):
    """Write ``model`` + ``tok`` as a llama-architecture GGUF file of ``storage``
    (F32, F16, Q8_0 or Q4_1). ``metadata_padding`` bytes of filler metadata push the tensor data
    back, as the real file's 49k-token vocabulary does (its weights start at 1.7 MiB)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("muscle tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    fields = _tokenizer_fields(tok)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre("smollm")
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    w.add_token_merges(fields["merges"])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)  # the tiny tokenizer prepends BOS, like Llama's
    w.add_add_space_prefix(False)
    if metadata_padding:
        w.add_string("muscle.test.padding", "x" * metadata_padding)

    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight, and the loader ties it back
        name = _gguf_name(hf_name)
        data = tensor.detach().float().numpy()
        if ".attn_q." in name:
            data = _permute_rotary(data, cfg.num_attention_heads)
        elif ".attn_k." in name:
            data = _permute_rotary(data, cfg.num_key_value_heads)
        qtype = _ggml_type(name, data.ndim, storage)
        stored = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def as_stored(model, storage: str):
    """A copy of ``model`` with every weight rounded the way a ``storage`` file rounds it."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for hf_name, p in out.named_parameters():  # a tied lm_head is the embedding: seen once
            qtype = _ggml_type(_gguf_name(hf_name), p.ndim, storage)
            p.copy_(torch.from_numpy(_stored(p.numpy(), qtype)))
    return out


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shared tiny Llama (tied embeddings, 4 heads) and tokenizer, loaded through muscle."""
    # A larger init_std gives peaked, model-specific logits (see tiny.make_model_dir).
    src = make_model_dir(tmp_path_factory.mktemp("gguf-src"), seed=11, init_std=0.2)
    return load_base(ModelSpec(str(src))), load_tokenizer(ModelSpec(str(src)))


@pytest.fixture(scope="module")
def tiny_gqa(tiny):
    """Shaped like SmolLM2 where the tiny Llama is not: grouped-query attention (the k rows are
    permuted per kv head), rope theta 1e5, rms eps 1e-5 -- and an untied output.weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny
    torch.manual_seed(12)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def _inputs(tok) -> torch.Tensor:
    """Real text (BOS first) and random ids over the whole vocabulary."""
    text = torch.tensor([tok(TEXTS[0]).input_ids[:16], tok(TEXTS[1]).input_ids[:16]])
    rand = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    return torch.cat([text, rand])


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _assert_plain(model) -> None:
    """Not flagged quantized: PEFT training refuses models that are."""
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "variant,storage",
    [
        ("tiny", "F32"),
        ("tiny", "F16"),
        ("tiny", "Q8_0"),
        ("tiny", "Q4_1"),
        ("tiny_gqa", "F32"),
        ("tiny_gqa", "Q4_1"),
    ],
)
def test_gguf_base_computes_what_its_file_holds(request, tmp_path, variant, storage):
    model, tok = request.getfixturevalue(variant)
    path = write_gguf(tmp_path / f"{variant}-{storage}.gguf", model, tok, storage)
    loaded = load_base(ModelSpec(str(path)))
    _assert_plain(loaded)

    src_cfg, cfg = model.config, loaded.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(cfg, key) == getattr(src_cfg, key), key
    assert cfg.rope_parameters["rope_theta"] == src_cfg.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(src_cfg.rms_norm_eps, rel=1e-6)  # stored as f32

    x = _inputs(tok)
    got = _logits(loaded, x)
    # The loaded model must compute with exactly the file's weights: the source's rounded to the
    # storage type, rotary permutation undone, in float32. F16 -> F32 is exact; for block types
    # gguf's numpy dequantizer and transformers' torch one could round d*q(+m) an ulp apart, hence
    # a float32 tolerance (they agree bit for bit today).
    want = _logits(as_stored(model, storage), x)
    if storage in ("F32", "F16"):
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The same file named as directory + gguf_file loads the same model.
    again = load_base(ModelSpec(str(tmp_path), gguf_file=path.name))
    assert torch.equal(_logits(again, x), got)

    # Against the unrounded source: exact for F32. For the others the difference is the rounding
    # alone (checked above); this only checks that the file really holds that type. Largest
    # logit error over the largest logit, measured on these peaked models: ~0.003 F16, ~0.06
    # Q8_0, ~0.6 Q4_1 (4 bits); the bounds leave a few times that.
    src = _logits(model, x)
    if storage == "F32":
        assert torch.equal(got, src)
    else:
        rel = ((got - src).abs().max() / src.abs().max()).item()
        assert 0 < rel < {"F16": 0.02, "Q8_0": 0.25, "Q4_1": 2.0}[storage]


def test_gguf_tokenizer_encodes_like_the_source(tiny, tmp_path):
    model, src_tok = tiny
    path = write_gguf(tmp_path / "tiny.gguf", model, src_tok)
    tok = load_tokenizer(ModelSpec(str(path)))
    vocab, src_vocab = tok.get_vocab(), src_tok.get_vocab()
    assert {t: i for t, i in vocab.items() if i < len(src_tok)} == src_vocab
    # transformers builds a GGUF byte-level vocabulary through GPT2Tokenizer, whose default
    # special token "<|endoftext|>" is appended when the vocabulary lacks it, past the model's
    # last row (id 600 here). SmolLM2's vocabulary has it (id 0); this tiny one does not.
    assert set(vocab) - set(src_vocab) <= {"<|endoftext|>"}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        src_tok.bos_token_id,
        src_tok.eos_token_id,
        src_tok.pad_token_id,
    )
    for text in TEXTS:
        ids = src_tok(text).input_ids
        assert ids[0] == src_tok.bos_token_id
        assert tok(text).input_ids == ids, text
        assert tok.decode(ids) == src_tok.decode(ids)
    same = load_tokenizer(ModelSpec(str(tmp_path), gguf_file=path.name))
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tok)


def test_save_plain_checkpoint_of_a_gguf_loads_with_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, src_tok = tiny
    spec = ModelSpec(str(write_gguf(tmp_path / "tiny-q4_1.gguf", model, src_tok, "Q4_1")))
    from_gguf = load_base(spec)
    out = save_plain_checkpoint(spec, tmp_path / "plain")
    assert not (tmp_path / "plain.tmp").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    _assert_plain(plain)
    x = _inputs(src_tok)
    assert torch.equal(_logits(plain, x), _logits(from_gguf, x))
    assert torch.equal(_logits(load_base(ModelSpec(str(out))), x), _logits(from_gguf, x))

    gguf_tok, plain_tok = load_tokenizer(spec), load_tokenizer(ModelSpec(str(out)))
    assert tokenizer_fingerprint(plain_tok) == tokenizer_fingerprint(gguf_tok)
    for text in TEXTS:
        assert plain_tok(text).input_ids == src_tok(text).input_ids, text

    # And the GGUF-loaded model trains: a LoRA on it gets gradients.
    peft = attach_lora(from_gguf, LoraSpec(r=4, alpha=8.0))
    peft.train()
    peft(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_gguf_fingerprint_follows_the_weights(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "a").mkdir()
    # Laid out like the real file, whose metadata (49k tokens + merges) fills its first 1.7 MiB.
    path = write_gguf(tmp_path / "a" / "tiny.gguf", model, tok, "Q4_1", metadata_padding=MIB)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert min(int(t.data_offset) for t in tensors.values()) > MIB

    spec = ModelSpec(str(path))
    fp = base_fingerprint(spec)
    x = _inputs(tok)
    before = _logits(load_base(spec), x)
    assert base_fingerprint(spec) == fp  # stable across loads
    assert base_fingerprint(ModelSpec(str(tmp_path / "a"), gguf_file="tiny.gguf")) == fp
    (tmp_path / "b").mkdir()
    copy_path = tmp_path / "b" / "tiny.gguf"
    shutil.copyfile(path, copy_path)
    copied = ModelSpec(str(copy_path))
    assert base_fingerprint(copied) == fp  # the content decides, not where the file lies

    def flip(offset: int) -> None:
        data = bytearray(copy_path.read_bytes())
        data[offset] ^= 1
        copy_path.write_bytes(bytes(data))

    # One byte of one weight of the last block (what a fine-tune changes; the token embedding,
    # first in the file, a LoRA leaves alone).
    down = tensors["blk.1.ffn_down.weight"]
    offset = int(down.data_offset) + int(down.n_bytes) // 2
    flip(offset)
    assert base_fingerprint(copied) != fp
    assert not torch.equal(_logits(load_base(copied), x), before)  # it was a weight
    flip(offset)
    assert base_fingerprint(copied) == fp
    # One byte of the metadata.
    flip(MIB // 2)
    assert base_fingerprint(copied) != fp


MISSING = {
    "path": lambda tmp: ModelSpec(str(tmp / "absent.gguf")),
    "dir+gguf_file": lambda tmp: ModelSpec(str(tmp), gguf_file="absent.gguf"),
    "missing dir": lambda tmp: ModelSpec(str(tmp / "no-such-dir" / "absent.gguf")),
}
CALLS = {
    "load_base": load_base,
    "load_tokenizer": load_tokenizer,
    "base_fingerprint": base_fingerprint,
    "save_plain_checkpoint": lambda spec, tmp: save_plain_checkpoint(spec, tmp / "plain"),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("form", MISSING)
def test_missing_gguf_is_a_muscle_error(tmp_path, form, call):
    spec = MISSING[form](tmp_path)
    args = (spec, tmp_path) if call == "save_plain_checkpoint" else (spec,)
    with pytest.raises(MuscleError, match=r"^GGUF file not found: \S*absent\.gguf$"):
        CALLS[call](*args)
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("content", ["lfs-pointer", "truncated"])
@pytest.mark.parametrize("call", ["load_base", "load_tokenizer"])
def test_unreadable_gguf_is_a_muscle_error(tmp_path, content, call):
    path = tmp_path / "model.gguf"
    if content == "lfs-pointer":  # what a clone without git-lfs leaves behind
        path.write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 9\n"
        )
    else:  # the first bytes of a real GGUF header only
        path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x07\x00")
    with pytest.raises(MuscleError, match=r"model\.gguf is not a readable GGUF file \(.*\)"):
        CALLS[call](ModelSpec(str(path)))
