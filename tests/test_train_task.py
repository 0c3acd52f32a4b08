"""Task-adapter training (`muscle-train --task`) on a tiny Llama and real PIQA text."""

import json

import pytest
import torch
from safetensors.torch import load_file

from muscle.cli.train import main as train_main
from muscle.config import DataConfig, LoraSpec, ModelSpec, TrainConfig
from muscle.run_dir import RunDir, read_log
from muscle.train import train_task_adapter
from tiny import EMBEDDED_DATA, make_model_dir, no_logits_to_keep

LORA = LoraSpec(r=8, alpha=16)
DATA = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=120, max_length=128)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("base") / "m", seed=0)


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("base2") / "m", seed=1)


def cfg(**kw) -> TrainConfig:
    base = {
        "lr": 1e-2,
        "epochs": 3,
        "grad_accum": 2,
        "warmup_steps": 2,
        "batch_size": 8,
        "checkpoint_every": 3,
    }
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "v1"
    res = train_task_adapter(ModelSpec(str(base_dir)), DATA, out, lora=LORA, train_cfg=cfg())
    return out, res


def test_training_lowers_validation_loss(trained):
    out, res = trained
    val = [r["loss"] for r in read_log(RunDir(out)) if r["split"] == "validation"]
    assert len(val) == 3
    assert val[-1] < val[0] - 0.05, val
    assert res.best_epoch == min(range(3), key=lambda i: val[i])
    run = json.loads((out / "muscle_run.json").read_text())
    assert run["status"] == "done" and not (out / ".checkpoint").exists()


def test_adapter_reloads_to_identical_logits_through_plain_peft(trained, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained
    side = json.loads((out / "muscle_adapter.json").read_text())
    assert side["task"] == "piqa" and side["kind"] == "task" and side["tokenizer_fingerprint"]
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and cfg_json["peft_type"] == "LORA"
    x = torch.randint(3, 500, (2, 17))
    m1 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
    m2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
    with torch.no_grad():
        a, b = m1(x).logits, m2(x).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(x).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter really changes the model
    # the weights saved are those of a trained LoRA: B matrices no longer zero
    w = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and w[k].abs().max() > 0 for k in w)


def test_resume_after_interruption_equals_uninterrupted(base_dir, tmp_path):
    c = cfg(epochs=2, max_steps=9)
    full = tmp_path / "full"
    train_task_adapter(ModelSpec(str(base_dir)), DATA, full, lora=LORA, train_cfg=c)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train_task_adapter(
            ModelSpec(str(base_dir)), DATA, part, lora=LORA, train_cfg=c, stop_after_steps=5
        )
    assert (part / ".checkpoint").exists()
    res = train_task_adapter(ModelSpec(str(base_dir)), DATA, part, lora=LORA, train_cfg=c)
    assert res.state == "trained"
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_log(RunDir(part)) if r["split"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated log rows after resume
    # a finished run re-run with the same command is a no-op
    again = train_task_adapter(ModelSpec(str(base_dir)), DATA, part, lora=LORA, train_cfg=c)
    assert again.state == "already done"


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(args)
    err = capsys.readouterr().err
    return e.value.code, err


def test_bad_inputs(base_dir, other_base_dir, trained, tmp_path, capsys):
    common = [
        "--data-dir",
        str(EMBEDDED_DATA),
        "--max-examples",
        "20",
        "--lora-r",
        "4",
        "--max-steps",
        "1",
    ]
    code, err = run_cli(
        ["--task", "nope", "--base", str(base_dir), "--out", str(tmp_path / "a")] + common, capsys
    )
    assert code == 2 and "unknown task 'nope'" in err and "Traceback" not in err
    code, err = run_cli(
        ["--task", "piqa", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "a")]
        + common,
        capsys,
    )
    assert code == 2 and "base model not found" in err
    code, err = run_cli(
        [
            "--task",
            "piqa",
            "--base",
            str(base_dir),
            "--out",
            str(tmp_path / "a"),
            "--data-dir",
            str(tmp_path),
            "--max-steps",
            "1",
        ],
        capsys,
    )
    assert code == 2 and "data file not found" in err
    # an adapter trained on another base
    out, _ = trained
    code, err = run_cli(
        [
            "--task",
            "piqa",
            "--base",
            str(other_base_dir),
            "--adapter",
            str(out),
            "--out",
            str(tmp_path / "b"),
        ]
        + common,
        capsys,
    )
    assert code == 2 and "was trained on base" in err
    # out dir holding a different run: refused, nothing touched
    before = (out / "adapter_model.safetensors").read_bytes()
    code, err = run_cli(
        ["--task", "piqa", "--base", str(base_dir), "--out", str(out)] + common, capsys
    )
    assert code == 2 and "holds a different run" in err and "--overwrite" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    # sequence longer than the model's context, when refusing
    code, err = run_cli(
        [
            "--task",
            "piqa",
            "--base",
            str(base_dir),
            "--out",
            str(tmp_path / "c"),
            "--max-length",
            "8",
            "--truncation",
            "refuse",
        ]
        + common,
        capsys,
    )
    assert code == 2 and "max_length=8" in err
    # no examples left
    code, err = run_cli(
        [
            "--task",
            "piqa",
            "--base",
            str(base_dir),
            "--out",
            str(tmp_path / "d"),
            "--data-dir",
            str(EMBEDDED_DATA),
            "--max-examples",
            "0",
            "--max-steps",
            "1",
        ],
        capsys,
    )
    assert code == 2 and "no examples" in err


def test_logits_at_labelled_positions_only(base_dir):
    # The LM head runs on the labelled positions only (logits_to_keep), or, for a model without
    # that argument, on all of them followed by a row selection: the same (n, V) rows either way,
    # and the same gradient for the LoRA weights.
    from muscle.forward import _KEEP_MASK_OK, logits_at
    from muscle.models import attach_lora, load_base

    torch.manual_seed(0)
    model = attach_lora(load_base(ModelSpec(str(base_dir))), LoraSpec(r=4, alpha=8.0))
    with torch.no_grad():  # B = 0 at init would give every A a zero gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    B, T = 3, 13
    ids = torch.randint(3, 500, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 9:] = 0  # right padding
    labels = torch.full((B, T), -100)
    labels[0, 4:7], labels[1, 12], labels[2, 2:9] = 5, 7, 1
    keep = labels != -100
    rows = keep.reshape(-1).nonzero(as_tuple=True)[0]
    full = model(input_ids=ids, attention_mask=mask).logits.reshape(B * T, -1)[rows]
    got = {}
    fallback = no_logits_to_keep(model)
    for name, m in (("keep", model), ("fallback", fallback)):
        model.zero_grad()
        z = logits_at(m, ids, mask, keep)
        assert z.shape == (rows.numel(), full.shape[1])
        torch.testing.assert_close(z, full, rtol=1e-5, atol=1e-6)
        z.square().sum().backward()
        got[name] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert _KEEP_MASK_OK[type(model.get_base_model())] is True
    assert _KEEP_MASK_OK[type(fallback)] is False
    assert all(g.abs().sum() > 0 for g in got["keep"])
    for a, b in zip(got["keep"], got["fallback"], strict=True):
        # The same sums in another float32 order: entries near zero differ by ~4e-7 absolute
        # (seen: 1 of 256, 1.4e-4 relative), so the absolute tolerance follows the gradient's
        # scale; a wrong row or a missing term moves entries by far more.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_an_int_for_a_float_option_is_the_same_config():
    # The library user's LoraSpec(alpha=16) and the CLI's alpha=16.0 must not be two runs
    # (a resume from the CLI of a library-started run was refused before).
    from muscle.config import CompatConfig, fingerprint

    assert fingerprint(LoraSpec(r=4, alpha=16)) == fingerprint(LoraSpec(r=4, alpha=16.0))
    assert fingerprint(cfg(lr=1)) == fingerprint(cfg(lr=1.0))
    assert fingerprint(CompatConfig(temperature=2)) == fingerprint(CompatConfig())
    assert (
        type(LoraSpec(alpha=16).alpha) is float
        and TrainConfig(max_grad_norm=None).max_grad_norm is None
    )
    assert LoraSpec(r=4).r == 4 and type(LoraSpec(r=4).r) is int  # int fields stay ints


def test_only_the_main_rank_truncates_the_log_on_resume(tmp_path, monkeypatch):
    # Every rank used to rewrite the log on resume; a rank reading it while another had just
    # emptied it wrote back an empty log (a flaky 2-rank DeepSpeed resume).
    from muscle.run_dir import append_log, truncate_log

    run = RunDir(tmp_path)
    for step in range(1, 8):
        append_log(run, {"kind": "train", "step": step})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    truncate_log(run, 6)
    assert [r["step"] for r in read_log(run)] == list(range(1, 8))  # untouched on rank 1
    monkeypatch.setenv("RANK", "0")
    truncate_log(run, 6)
    assert [r["step"] for r in read_log(run)] == list(range(1, 7))
    assert not list(tmp_path.glob("*.tmp"))


def test_train_and_cache_read_the_same_data_options():
    # One option group for the task data: muscle-train and muscle-cache build declare the same
    # options (names, defaults, types), one per DataConfig field, so their tokens cannot drift.
    from dataclasses import fields

    from muscle.cli.cache import build_cmd
    from muscle.cli.train import cli as train_cli

    def data_params(cmd):
        names = {f.name for f in fields(DataConfig)}
        return {
            p.name: (p.opts, p.default, type(p.type).__name__)
            for p in cmd.params
            if p.name in names
        }

    train, cache = data_params(train_cli), data_params(build_cmd)
    assert set(train) == {f.name for f in fields(DataConfig)}
    assert train == cache
    d = DataConfig(task="piqa")
    assert train["val_fraction"][1] == d.val_fraction and train["truncation"][1] == d.truncation
    # K has one name, --top-k, in both commands; the cache keeps --k as an alias.
    (k,) = [p for p in build_cmd.params if p.name == "k"]
    assert k.opts[0] == "--top-k" and "--k" in k.opts
    assert any(p.opts == ["--top-k"] for p in train_cli.params)
