"""Gradient (activation) checkpointing: same loss and LoRA gradients, less kept activation.

Checked on tiny Llamas in float32 on the CPU: one step with and without checkpointing for task
training, compatibility training from a cache and online compatibility training; whole runs
with it on (the loss falls, the adapter reloads through plain PEFT, the run matches the same run
with it off); and a run started without it resumed with it (the flag is not in the run's
identity).
"""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import muscle.loop as loop_mod
from muscle.cli.train import main as train_main
from muscle.compat_train import CompatObjective, LiveTeachers
from muscle.config import CompatConfig, DataConfig, LoraSpec, ModelSpec, TrainConfig
from muscle.data import encode_examples, iter_batches
from muscle.loop import CrossEntropyObjective, enable_gradient_checkpointing
from muscle.models import (
    load_adapter,
    load_base,
    load_model,
)
from muscle.run_dir import RunDir, read_log, train_identity
from muscle.tasks import get_task, load_examples
from muscle.teacher_cache import CacheConfig, CacheReader, build_cache
from muscle.train import train_task_adapter
from tiny import (
    EMBEDDED_DATA,
    build_tokenizer,
    make_model_dir,
    random_adapter,
    random_lora,
    run_cli_main,
)

K = 16
LORA = LoraSpec(r=8, alpha=16.0)  # float, as the CLI passes it (the identity tells 16 from 16.0)
DATA = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=120, max_length=128)
CFG = TrainConfig(lr=1e-2, epochs=3, grad_accum=2, warmup_steps=2, batch_size=8, checkpoint_every=3)


# ------------------------------------------------------------------------------ helpers


def piqa_batch(max_examples: int, max_length: int, batch_size: int = 4) -> dict:
    tok = build_tokenizer()
    task = get_task("piqa")
    exs = load_examples(task, "train", data_dir=str(EMBEDDED_DATA), max_examples=max_examples)
    enc = encode_examples(tok, task, exs, max_length=max_length)
    return next(iter_batches(enc, batch_size, tok.pad_token_id, shuffle=False))


def count_layer_forwards(model) -> list[int]:
    """A counter of MLP forward calls: one per decoder layer per forward, twice that when the
    backward pass recomputes the layers (i.e. when checkpointing is really on). It wraps
    ``forward`` itself: module hooks do not fire during checkpointing's recompute."""
    calls = [0]

    def counted(forward):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)

        return wrapper

    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            module.forward = counted(module.forward)
    return calls


def n_layers(model) -> int:
    return model.get_base_model().config.num_hidden_layers


def student(model, *, checkpointing: bool):
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()  # as in fit: HF checkpoints only in train mode


def one_step(model, objective, batch, *, checkpointing: bool) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of every trainable parameter after one forward + backward of
    ``model`` (prepared by :func:`student`); checks the layers were recomputed iff checkpointing.
    """
    decide_head = getattr(objective, "_use_fused_head", None)
    if decide_head is not None:  # the compat objective's one-time head probe is a forward of
        decide_head(model)  # its own (once per run, no grad): not part of the step counted here
    calls = count_layer_forwards(model)
    loss, _ = objective(model, batch)
    loss.backward()
    expected = n_layers(model) * (2 if checkpointing else 1)
    assert calls[0] == expected, f"{calls[0]} layer forwards, expected {expected}"
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
            grads[n] = p.grad.detach().clone()
    return loss.detach(), grads


def assert_same_step(off: tuple, on: tuple) -> None:
    (loss_off, g_off), (loss_on, g_on) = off, on
    assert loss_off.item() > 0
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    assert g_off.keys() == g_on.keys()
    assert any("lora_A" in n for n in g_off) and any("lora_B" in n for n in g_off)
    for n in g_off:
        assert g_off[n].abs().max() > 0, f"{n}: zero gradient"
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("base") / "m", seed=0)


@pytest.fixture(scope="module")
def update(tmp_path_factory):
    """A v1 -> v2 update of tiny Llamas with random task adapters, and a cache of both."""
    root = tmp_path_factory.mktemp("update")
    data = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40, max_length=96)
    b1 = make_model_dir(root / "base1", seed=0, init_std=0.15)
    b2 = make_model_dir(root / "base2", seed=1, init_std=0.15)
    v1 = ModelSpec(str(b1), str(random_adapter(b1, root / "a1", 10)))
    v2 = ModelSpec(str(b2), str(random_adapter(b2, root / "a2", 11)))
    cache_cfg = CacheConfig(k=K, chunk_tokens=256, shard_chunks=2)
    build_cache(root / "cache", "v1", v1, data, cache_cfg, progress=False)
    build_cache(root / "cache", "v2", v2, data, cache_cfg, progress=False)
    return {"v1": v1, "v2": v2, "cache": root / "cache", "data": data}


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """The same task run with checkpointing off and on; the second one spied on."""
    root = tmp_path_factory.mktemp("runs")
    spec = ModelSpec(str(base_dir))
    train_task_adapter(spec, DATA, root / "off", lora=LORA, train_cfg=CFG)
    seen = []
    real = loop_mod.enable_gradient_checkpointing

    def spy(model):
        seen.append(model)
        real(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod, "enable_gradient_checkpointing", spy)
        on_cfg = replace(CFG, gradient_checkpointing=True)
        train_task_adapter(spec, DATA, root / "on", lora=LORA, train_cfg=on_cfg)
    return {"off": root / "off", "on": root / "on", "spied": seen}


# ------------------------------------------------------------------------------ one step


def test_task_step_is_unchanged_by_checkpointing(base_dir):
    batch = piqa_batch(max_examples=16, max_length=96)
    results = []
    for checkpointing in (False, True):
        model = student(random_lora(base_dir, 3), checkpointing=checkpointing)
        results.append(one_step(model, CrossEntropyObjective(), batch, checkpointing=checkpointing))
    assert_same_step(*results)


def test_compat_step_from_cache_is_unchanged_by_checkpointing(update):
    batch = next(iter(CacheReader(update["cache"]).iter_batches("train", 4, temperature=2.0)))
    objective = CompatObjective(CompatConfig())
    results = []
    for checkpointing in (False, True):
        model = student(
            load_model(update["v2"], trainable_adapter=True), checkpointing=checkpointing
        )
        results.append(one_step(model, objective, batch, checkpointing=checkpointing))
    assert_same_step(*results)


def test_online_teachers_and_step_are_unchanged_by_checkpointing(update):
    """The live v2 teacher runs on the student's (checkpointed) base, in the training loop (the
    student in train mode): its top-K must not move, nor the step scored against it."""
    batch = piqa_batch(max_examples=40, max_length=96)
    v1, v2 = update["v1"], update["v2"]
    teacher_batches, results = [], []
    for checkpointing in (False, True):
        model = load_adapter(load_base(ModelSpec(v2.base)), v2.adapter, trainable=True)
        model.load_adapter(v2.adapter, adapter_name="teacher", is_trainable=False)
        model.set_adapter("default")
        model = student(model, checkpointing=checkpointing)
        with_teachers = LiveTeachers(load_model(v1), model, K, 2.0)(batch)
        teacher_batches.append(with_teachers)
        # What OnlineCompatObjective does, with the teachers' pass outside the counted step.
        objective = CompatObjective(CompatConfig())
        results.append(one_step(model, objective, with_teachers, checkpointing=checkpointing))
    off, on = teacher_batches
    for key in (
        "v1_ids",
        "v2_ids",
        "v1_logprobs",
        "v2_logprobs",
        "v1_label_logprob",
        "v2_label_logprob",
    ):
        assert torch.equal(off[key], on[key]), key
    assert_same_step(*results)


# ------------------------------------------------------------------------------ whole runs


def test_run_with_checkpointing_trains_and_matches_run_without(runs, base_dir):
    assert len(runs["spied"]) == 1  # fit switched it on, once
    base = runs["spied"][0].get_base_model()
    assert base.config.use_cache is False
    assert all(layer.gradient_checkpointing for layer in base.model.layers)
    logs = {k: read_log(RunDir(runs[k])) for k in ("off", "on")}
    val = [r["loss"] for r in logs["on"] if r["split"] == "validation"]
    assert len(val) == 3 and val[-1] < val[0] - 0.05, val  # it learns
    train_loss = {k: [r["loss"] for r in logs[k] if r["split"] == "train"] for k in logs}
    assert len(train_loss["on"]) == len(train_loss["off"]) > 0
    assert train_loss["on"] == pytest.approx(train_loss["off"], rel=1e-5)
    a = load_file(str(runs["off"] / "adapter_model.safetensors"))
    b = load_file(str(runs["on"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    side = {k: json.loads((runs[k] / "muscle_adapter.json").read_text()) for k in ("off", "on")}
    assert side["on"]["train"]["gradient_checkpointing"] is True
    assert side["off"]["train"]["gradient_checkpointing"] is False
    # Same identity: the flag does not make it another run.
    fp = {
        k: json.loads((runs[k] / "muscle_run.json").read_text())["fingerprint"]
        for k in runs
        if k != "spied"
    }
    assert fp["on"] == fp["off"]


def test_adapter_trained_with_checkpointing_reloads_through_plain_peft(runs, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = torch.randint(3, 500, (2, 17))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(runs["on"])
    )
    with torch.no_grad():
        logits = model.eval()(x).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(x).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, plain, atol=1e-4)  # the trained adapter is really loaded
    saved = load_file(str(runs["on"] / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    for k, v in saved.items():
        name = k.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), v), k


def test_flag_is_not_part_of_the_run_identity():
    assert "gradient_checkpointing" not in train_identity(TrainConfig())
    assert train_identity(TrainConfig(gradient_checkpointing=True)) == train_identity(TrainConfig())


def test_run_started_without_checkpointing_resumes_with_it_from_the_cli(
    runs, base_dir, tmp_path, capsys
):
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train_task_adapter(
            ModelSpec(str(base_dir)), DATA, part, lora=LORA, train_cfg=CFG, stop_after_steps=4
        )
    assert (part / ".checkpoint").exists()
    started = json.loads((part / "muscle_run.json").read_text())["started"]
    args = [
        "--task",
        "piqa",
        "--base",
        str(base_dir),
        "--out",
        str(part),
        "--data-dir",
        str(EMBEDDED_DATA),
        "--max-examples",
        "120",
        "--max-length",
        "128",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lr",
        "1e-2",
        "--epochs",
        "3",
        "--grad-accum",
        "2",
        "--warmup",
        "2",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "3",
        "--gradient-checkpointing",
    ]
    code, out, err = run_cli_main(train_main, args, capsys)
    assert code in (0, None), err[-2000:]
    assert "already done" not in out and not (part / ".checkpoint").exists()
    side = json.loads((part / "muscle_adapter.json").read_text())
    assert side["train"]["gradient_checkpointing"] is True
    # Accepted as the same run (not refused, not restarted), and ends where the uninterrupted
    # run without checkpointing ended.
    assert json.loads((part / "muscle_run.json").read_text())["started"] == started
    a = load_file(str(runs["off"] / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
