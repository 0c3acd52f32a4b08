"""benchmarks/repro_pair.py at tiny size: v1 = v2's layer subset + a merged healing LoRA.

What must hold for the committed recipe to rebuild the same v1 on another machine: dropping
layers is exactly "skip those blocks", the merge is W + (alpha/r) B A, healing resumed after an
interruption ends with the same adapter, and the rebuilt weights' digest is reproducible.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import build_tokenizer, corpus_lines, tiny_llama

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import repro_pair as rp  # noqa: E402

KEEP = (0, 1, 4, 5)  # drop a middle block (2, 3) of 6 layers, as the real recipe does


def _v2():
    tok = build_tokenizer(600)
    model = tiny_llama(len(tok), hidden=32, layers=6, heads=4, seed=3, initializer_range=0.2)
    return model.eval(), tok


def _cfg(**kw) -> rp.HealConfig:
    base = dict(keep=KEEP, r=4, alpha=8.0, steps=4, batch=2, seq_len=32, lr=5e-3, warmup=1)
    return rp.HealConfig(**{**base, **kw})


def _docs() -> list[str]:
    return corpus_lines(200)[:300]


def test_truncated_model_is_the_parent_with_blocks_skipped():
    v2, tok = _v2()
    x = torch.tensor([tok("A cup of water is heavier than air.")["input_ids"]])  # [1, T]
    cut = rp.truncated_model(v2, KEEP)
    assert cut.config.num_hidden_layers == len(KEEP)
    # reference: the parent itself with its layer list cut by hand (same modules, same order)
    full_layers = v2.model.layers
    try:
        v2.model.layers = torch.nn.ModuleList([full_layers[i] for i in KEEP])
        v2.config.num_hidden_layers = len(KEEP)
        want = v2(input_ids=x, use_cache=False).logits
    finally:
        v2.model.layers = full_layers
        v2.config.num_hidden_layers = 6
    torch.testing.assert_close(cut(input_ids=x, use_cache=False).logits, want, rtol=0, atol=1e-6)
    for j, i in enumerate(KEEP):
        assert torch.equal(
            cut.model.layers[j].mlp.down_proj.weight, v2.model.layers[i].mlp.down_proj.weight
        )
    assert cut.model.layers[3].self_attn.layer_idx == 3  # renumbered (KV cache index)
    # the parent is untouched and keeps its own full output
    assert len(v2.model.layers) == 6


@pytest.mark.parametrize("keep", [(), (2, 1), (0, 6), (-1, 2)])
def test_truncated_model_refuses_bad_layer_lists(keep):
    v2, _ = _v2()
    with pytest.raises(ValueError, match="increasing layer indices"):
        rp.truncated_model(v2, keep)


def test_merged_v1_is_subset_plus_scaled_lora_product(tmp_path):
    v2, tok = _v2()
    cfg = _cfg()
    rec = rp.heal(v2, tok, cfg, _docs(), tmp_path / "ad", tmp_path / "work", log=lambda s: None)
    assert len(rec["losses"]) == cfg.steps and rec["tokens"] == 4 * 2 * 32
    v1 = rp.merged_v1(v2, cfg, tmp_path / "ad")
    lora = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    n_checked = 0
    for j, i in enumerate(KEEP):
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
            key = f"base_model.model.model.layers.{j}.{mod}"
            a = lora[f"{key}.lora_A.weight"].double()  # [r, in]
            b = lora[f"{key}.lora_B.weight"].double()  # [out, r]
            w2 = v2.get_submodule(f"model.layers.{i}.{mod}").weight.double()  # [out, in]
            want = w2 + (cfg.alpha / cfg.r) * (b @ a)
            got = v1.get_submodule(f"model.layers.{j}.{mod}").weight.double()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert (b @ a).abs().max() > 1e-4  # healing moved it: the check is not vacuous
            n_checked += 1
    assert n_checked == 16
    # not a LoRA model any more: a plain Llama with the kept layers
    assert type(v1).__name__ == "LlamaForCausalLM" and len(v1.model.layers) == len(KEEP)


def test_rebuild_is_deterministic_and_resume_gives_the_same_adapter(tmp_path):
    v2, tok = _v2()
    cfg = _cfg()
    quiet = dict(log=lambda s: None)
    rp.heal(v2, tok, cfg, _docs(), tmp_path / "a", tmp_path / "wa", **quiet)
    # an interrupted run (checkpoint after step 2) resumed by a second call
    assert (
        rp.heal(v2, tok, cfg, _docs(), tmp_path / "b", tmp_path / "wb", stop_after=2, **quiet)
        is None
    )
    assert not (tmp_path / "b").exists() and (tmp_path / "wb" / "heal_ckpt.pt").is_file()
    rec = rp.heal(v2, tok, cfg, _docs(), tmp_path / "b", tmp_path / "wb", **quiet)
    assert len(rec["losses"]) == cfg.steps
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    d1 = rp.state_digest(rp.merged_v1(v2, cfg, tmp_path / "a"))
    d2 = rp.state_digest(rp.merged_v1(v2, cfg, tmp_path / "b"))
    assert d1 == d2
    # a different recipe (one more layer kept) is a different model
    other = rp.HealConfig(**{**cfg.to_json(), "keep": (0, 1, 3, 4, 5)})
    d3 = rp.state_digest(rp.truncated_model(v2, other.keep))
    assert d3 != rp.state_digest(rp.truncated_model(v2, cfg.keep))


def test_reconstruct_v1_checks_the_recorded_digest(tmp_path):
    v2, tok = _v2()
    cfg = _cfg(steps=2)
    pair = tmp_path / "pair"
    rp.heal(v2, tok, cfg, _docs(), pair / "heal_adapter", tmp_path / "w", log=lambda s: None)
    v2_dir = tmp_path / "base-v2"
    v2.save_pretrained(v2_dir)
    tok.save_pretrained(v2_dir)
    loaded, _ = rp.load_plain(v2_dir)
    digest = rp.state_digest(rp.merged_v1(loaded, cfg, pair / "heal_adapter"))
    recipe = {"heal": cfg.to_json(), "v1_sha256": digest}
    (pair / "recipe.json").write_text(json.dumps(recipe))
    rp.reconstruct_v1(v2_dir, pair, tmp_path / "base-v1")
    v1, _ = rp.load_plain(tmp_path / "base-v1")
    assert rp.state_digest(v1) == digest  # saved and reloaded: the same bytes
    assert rp.HealConfig.from_json(json.loads((pair / "recipe.json").read_text())["heal"]) == cfg
    # a recipe whose digest does not match what this machine rebuilds: refused, nothing written
    (pair / "recipe.json").write_text(json.dumps({**recipe, "v1_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="digest"):
        rp.reconstruct_v1(v2_dir, pair, tmp_path / "base-v1b")
    assert not (tmp_path / "base-v1b").exists()
