"""MUSCLE compatibility training: cache mode, online mode, golden loss, a full tiny run, bad inputs."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muscle import MuscleError
from muscle.compat_train import (
    CompatObjective,
    LiveTeachers,
    train_compat_from_cache,
    train_compat_online,
)
from muscle.config import CompatConfig, DataConfig, ModelSpec, TrainConfig
from muscle.data import IGNORE_INDEX, encode_examples, iter_batches
from muscle.models import (
    load_adapter,
    load_base,
    load_model,
)
from muscle.tasks import get_task, load_examples
from muscle.teacher_cache import CacheConfig, CacheReader, build_cache
from tiny import EMBEDDED_DATA, build_tokenizer, make_model_dir, random_adapter

K = 16
DATA = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40, max_length=96)
CACHE_CFG = CacheConfig(k=K, chunk_tokens=256, shard_chunks=2)


@pytest.fixture(scope="module")
def update(tmp_path_factory):
    root = tmp_path_factory.mktemp("update")
    b1 = make_model_dir(root / "base1", seed=0, init_std=0.15)
    b2 = make_model_dir(root / "base2", seed=1, init_std=0.15)
    v1 = ModelSpec(str(b1), str(random_adapter(b1, root / "a1", 10)))
    v2 = ModelSpec(str(b2), str(random_adapter(b2, root / "a2", 11)))
    cache = root / "cache"
    build_cache(cache, "v1", v1, DATA, CACHE_CFG, progress=False)
    build_cache(cache, "v2", v2, DATA, CACHE_CFG, progress=False)
    return {"root": root, "v1": v1, "v2": v2, "cache": cache}


def first_batch(reader: CacheReader, T: float = 2.0):
    return next(iter(reader.iter_batches("train", 4, temperature=T, shuffle=False)))


@pytest.mark.parametrize("mask", ["v2c_wrong", "v1_correct", "always_v1", "token_ll", "seq_ll"])
def test_cache_loss_equals_online_loss(update, mask):
    """The same batch scored with cached teachers and with live teachers: equal up to storage
    precision (float16 log-probs)."""
    reader = CacheReader(update["cache"])
    cached = first_batch(reader)
    tok = build_tokenizer()
    task = get_task("piqa")
    exs = load_examples(task, "train", data_dir=DATA.data_dir, max_examples=DATA.max_examples)
    enc = encode_examples(tok, task, exs, max_length=DATA.max_length)
    live_batch = next(iter_batches(enc, 4, tok.pad_token_id, shuffle=False))
    assert torch.equal(live_batch["input_ids"], cached["input_ids"])
    assert torch.equal(live_batch["labels"], cached["labels"])

    v2 = update["v2"]
    student = load_adapter(load_base(ModelSpec(v2.base)), v2.adapter, trainable=True)
    student.load_adapter(v2.adapter, adapter_name="teacher", is_trainable=False)
    student.set_adapter("default")
    live = LiveTeachers(load_model(update["v1"]), student, K, 2.0)(live_batch)
    obj = CompatObjective(CompatConfig(mask=mask))
    with torch.no_grad():
        loss_cache, s_cache = obj(student, cached)
        loss_live, s_live = obj(student, live)
    assert loss_cache.item() > 0
    assert loss_cache.item() == pytest.approx(loss_live.item(), rel=2e-3, abs=1e-5)
    assert s_cache["frac_v1"] == pytest.approx(s_live["frac_v1"], abs=1e-6)


def dense_kl_bins(
    lp_teacher: torch.Tensor, ids: torch.Tensor, z: torch.Tensor, T: float
) -> torch.Tensor:
    """(K+1)-bin KL(p || softmax(z/T)) for one row, float64, written out by hand."""
    logq = torch.log_softmax(z.double() / T, dim=-1)
    p = lp_teacher.double().exp()
    q_s = logq[ids].exp()
    p_tail = (1 - p.sum()).clamp_min(0)
    q_tail = (1 - q_s.sum()).clamp_min(1e-300)
    kl = (p * (lp_teacher.double() - logq[ids])).sum()
    if p_tail > 0:
        kl = kl + p_tail * (p_tail.log() - q_tail.log())
    return kl


def test_golden_first_step_loss(update, tmp_path):
    """The first logged training loss equals the paper's Eq. 2 computed independently, in
    float64, from the cached teachers and the initial student (v2's task model)."""
    cfg = TrainConfig(
        lr=1e-3, epochs=1, grad_accum=1, warmup_steps=0, batch_size=4, max_steps=2, seed=0
    )
    train_compat_from_cache(
        update["cache"], tmp_path / "run", train_cfg=cfg, compat_cfg=CompatConfig()
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["split"] == "train"][0]

    reader = CacheReader(update["cache"])
    batch = next(
        iter(reader.iter_batches("train", 4, temperature=2.0, shuffle=True, seed=0, epoch=0))
    )
    model = load_model(update["v2"])
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms, wrong = [], []
    B, Tn = batch["labels"].shape
    for b in range(B):
        for t in range(Tn):
            y = int(batch["labels"][b, t])
            if y == IGNORE_INDEX:
                continue
            m = int(torch.argmax(z[b, t])) != y  # paper Eq. 1
            who = "v1" if m else "v2"
            terms.append(
                dense_kl_bins(
                    batch[f"{who}_logprobs"][b, t], batch[f"{who}_ids"][b, t].long(), z[b, t], 2.0
                )
            )
            wrong.append(m)
    expected = torch.stack(terms).mean().item()
    assert logged["loss"] == pytest.approx(expected, rel=1e-4)
    assert logged["frac_v1"] == pytest.approx(sum(wrong) / len(wrong), abs=1e-6)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_cache_training_student_dtype(update, tmp_path, monkeypatch, dtype):
    """``--dtype`` with ``--cache`` sets the student's dtype (it used to be ignored: the student
    always loaded in the dtype the cache recorded for v2, here float32); a resume in another
    dtype is refused, since the run identity records it."""
    import muscle.compat_train as ct

    seen = []
    real = ct.load_model

    def spy(spec, *a, **kw):
        model = real(spec, *a, **kw)
        seen.append((spec.dtype, next(model.parameters()).dtype))
        return model

    monkeypatch.setattr(ct, "load_model", spy)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=4, max_steps=1, seed=0)
    run = tmp_path / "run"
    train_compat_from_cache(update["cache"], run, train_cfg=cfg, student_dtype=dtype)
    want = {None: ("float32", torch.float32), "bfloat16": ("bfloat16", torch.bfloat16)}[dtype]
    assert seen and seen[0] == want
    other = "float32" if dtype else "bfloat16"
    with pytest.raises(MuscleError):
        train_compat_from_cache(update["cache"], run, train_cfg=cfg, student_dtype=other)


def test_a_runs_identity_is_its_caches_content_not_its_path(update, tmp_path):
    """A moved cache resumes (here: finds finished) the same run; a cache rebuilt from another
    v1 is a different run; the run record holds no machine path of the cache."""
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=4, max_steps=1, seed=0)
    run = tmp_path / "run"
    train_compat_from_cache(update["cache"], run, train_cfg=cfg)
    record = (run / "muscle_run.json").read_text()
    assert str(update["cache"]) not in record and json.loads(record)["cache_id"]
    moved = tmp_path / "moved"
    shutil.copytree(update["cache"], moved)
    train_compat_from_cache(moved, run, train_cfg=cfg)  # the same run: no "different run"
    assert json.loads((run / "muscle_run.json").read_text())["status"] == "done"
    other = tmp_path / "other"
    other_v1 = ModelSpec(
        update["v1"].base, str(random_adapter(update["v1"].base, tmp_path / "a", 12))
    )
    build_cache(other, "v1", other_v1, DATA, CACHE_CFG, progress=False)
    build_cache(other, "v2", update["v2"], DATA, CACHE_CFG, progress=False)
    with pytest.raises(MuscleError, match="holds a different run"):
        train_compat_from_cache(other, run, train_cfg=cfg)


def v1_top1_logprob(model, reader: CacheReader) -> float:
    """Mean log-probability the model gives to v1's top-1 token (from the cache), validation."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in reader.iter_batches("validation", 8, temperature=1.0, shuffle=False):
            z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            valid = batch["labels"] != IGNORE_INDEX
            top1 = batch["v1_ids"].gather(
                -1, batch["v1_logprobs"].argmax(-1, keepdim=True)
            )  # (B, T, 1)
            lp = torch.log_softmax(z.float(), -1).gather(-1, top1.long()).squeeze(-1)  # (B, T)
            total += float(lp[valid].sum())
            n += int(valid.sum())
    return total / n


@pytest.mark.slow
def test_full_tiny_run_moves_toward_v1(update, tmp_path):
    """Aligning to v1 everywhere: the validation compat loss falls and the student puts more
    probability on v1's top-1 tokens than v2's task model did."""
    reader = CacheReader(update["cache"])
    before = v1_top1_logprob(load_model(update["v2"]), reader)
    cfg = TrainConfig(lr=2e-2, epochs=3, grad_accum=1, warmup_steps=0, batch_size=8, seed=0)
    res = train_compat_from_cache(
        update["cache"], tmp_path / "run", train_cfg=cfg, compat_cfg=CompatConfig(mask="always_v1")
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in rows if r["split"] == "validation"]
    assert val[-1] < val[0]
    assert all(r["frac_v1"] == 1.0 for r in rows if r["split"] == "train")
    v2c = ModelSpec(update["v2"].base, str(tmp_path / "run"))
    after = v1_top1_logprob(load_model(v2c), reader)
    assert after > before + 0.05, (before, after)
    side = json.loads((tmp_path / "run" / "muscle_adapter.json").read_text())
    assert side["kind"] == "compat" and side["best_epoch"] == res.best_epoch


def test_online_mode_trains(update, tmp_path):
    cfg = TrainConfig(lr=1e-3, epochs=1, grad_accum=1, warmup_steps=0, batch_size=8, max_steps=2)
    res = train_compat_online(
        update["v1"], update["v2"], DATA, tmp_path / "online", train_cfg=cfg, top_k=K
    )
    assert res.state == "trained" and math.isfinite(res.best_val_loss)
    assert (tmp_path / "online" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "online" / "teacher").exists()  # only the trained adapter is saved


def test_bad_inputs(update, tmp_path):
    only_v1 = tmp_path / "only_v1"
    build_cache(only_v1, "v1", update["v1"], DATA, CACHE_CFG, progress=False)
    with pytest.raises(MuscleError, match=r"no teacher 'v2'.*muscle-cache build --model v2"):
        train_compat_from_cache(only_v1, tmp_path / "r1")
    with pytest.raises(MuscleError, match="temperature 3.0 is not cached"):
        train_compat_from_cache(
            update["cache"], tmp_path / "r2", compat_cfg=CompatConfig(temperature=3.0)
        )
    # the v2 task adapter recorded in the cache changed since the build
    moved = tmp_path / "cache_copy"
    shutil.copytree(update["cache"], moved)
    adapter = Path(update["v2"].adapter)
    backup = (adapter / "adapter_model.safetensors").read_bytes()
    try:
        (adapter / "adapter_model.safetensors").write_bytes(backup + b" ")
        with pytest.raises(MuscleError, match="changed since"):
            train_compat_from_cache(moved, tmp_path / "r3")
    finally:
        (adapter / "adapter_model.safetensors").write_bytes(backup)
    with pytest.raises(MuscleError, match="unknown mask"):
        CompatObjective(CompatConfig(mask="nope"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one_process_from_cache(update, tmp_path):
    args = [
        "--cache",
        str(update["cache"]),
        "--epochs",
        "1",
        "--grad-accum",
        "1",
        "--warmup",
        "0",
        "--lr",
        "1e-2",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MUSCLE_DEBUG": "1"}
    bindir = Path(sys.executable).parent
    one = subprocess.run(
        [str(bindir / "muscle-train"), *args, "--out", str(tmp_path / "one"), "--batch-size", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            str(bindir / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "muscle.cli.train",
            *args,
            "--out",
            str(tmp_path / "two"),
            "--batch-size",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(d):
        rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "validation"]

    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)


@pytest.mark.parametrize("mask", ["v2c_wrong", "token_ll"])
def test_fused_head_is_the_default_and_equals_materialized_logits(update, mask, capsys):
    """The trainer's objective with the fused LM head (default) and with materialized logits:
    the same loss, statistics and LoRA gradients on a cached batch; the choice is said once."""
    from muscle.run_dir import train_identity

    batch = first_batch(CacheReader(update["cache"]))
    v2 = update["v2"]
    grads, losses, stats = {}, {}, {}
    for fused in (True, False):
        student = load_adapter(load_base(ModelSpec(v2.base)), v2.adapter, trainable=True)
        obj = CompatObjective(CompatConfig(mask=mask, fused_head=fused))
        loss, s = obj(student, batch)
        obj(student, batch)  # a second batch: decided and said once per run
        loss.backward()
        assert obj._fused is fused
        losses[fused], stats[fused] = loss.item(), s
        grads[fused] = [p.grad.clone() for p in student.parameters() if p.requires_grad]
    out = capsys.readouterr().out + capsys.readouterr().err
    assert out.count("student LM head: fused with the loss") == 1
    assert out.count("student LM head: materialized logits (off") == 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert stats[True]["frac_v1"] == pytest.approx(stats[False]["frac_v1"], abs=1e-7)
    assert all(g.abs().sum() > 0 for g in grads[False])
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    # An execution choice, not part of what the run learns: a run may resume with it switched.
    assert train_identity(CompatConfig(fused_head=False)) == train_identity(CompatConfig())
