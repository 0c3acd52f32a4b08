"""Cache format 2 (issue 13): a sampled tail beside the top-K head, built, read, trained,
verified, inspected and refused, on tiny models. The estimator's statistics are tested in
test_tail_estimator.py; here: that the cache stores and feeds exactly what it specifies."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_teacher_cache import assert_same_cache

from muscle import MuscleError
from muscle.config import CompatConfig, DataConfig, ModelSpec, TrainConfig
from muscle.data import IGNORE_INDEX
from muscle.tail_sampling import TailSampling, sample_tail, teacher_key
from muscle.teacher_cache import (
    SCHEMAS,
    CacheConfig,
    CacheReader,
    build_cache,
    inspect_cache,
    render_inspect,
    verify_cache,
)
from tiny import EMBEDDED_DATA, make_model_dir, random_adapter, run_cli_main

K, M, V = 16, 8, 600  # tiny models: vocabulary 600 (tests/tiny.py)
DATA = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40, max_length=96)
CFG2 = CacheConfig(k=K, chunk_tokens=128, shard_chunks=2, batch_size=4, tail_samples=M)
CFG1 = CacheConfig(k=K, chunk_tokens=128, shard_chunks=2, batch_size=4)
HEAD = ("ids", "logprobs", "lse", "label_logprob", "done")  # format 1's teacher arrays
REPO = Path(__file__).resolve().parents[1]


def build(out, spec, name, cfg=CFG2, **kw):
    return build_cache(out, name, spec, DATA, cfg, progress=False, **kw)


@pytest.fixture(scope="module")
def update(tmp_path_factory):
    """Two task models (base + LoRA, as the trainer needs), a format 2 cache of both and a
    format 1 cache of v1 from the same inputs."""
    root = tmp_path_factory.mktemp("fmt2")
    b1 = make_model_dir(root / "base1", seed=0, init_std=0.15)
    b2 = make_model_dir(root / "base2", seed=1, init_std=0.15)
    v1 = ModelSpec(str(b1), str(random_adapter(b1, root / "a1", 10)))
    v2 = ModelSpec(str(b2), str(random_adapter(b2, root / "a2", 11)))
    c2, c1 = root / "cache2", root / "cache1"
    build(c2, v1, "v1")
    build(c2, v2, "v2")
    build(c1, v1, "v1", CFG1)
    return {"root": root, "v1": v1, "v2": v2, "cache2": c2, "cache1": c1}


def nothing_at(path: Path) -> bool:
    """A refused build left no file there (at most an empty directory)."""
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


def group(path: Path):
    import zarr

    return zarr.open_group(str(path), mode="r")


def dense_logits(spec: ModelSpec, input_ids) -> torch.Tensor:
    """(L, V) float32 logits of one example, from the model's own forward (no cache code)."""
    from muscle.models import load_model

    model = load_model(spec)
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(input_ids)])).logits[0].float()


# ------------------------------------------------------------------------------ layout


def test_layout_and_attributes(update):
    g = group(update["cache2"])
    meta = g.attrs["muscle_cache"]
    assert meta["format"] == 2 and meta["tail_samples"] == M and meta["tail_seed"] == 0
    assert meta["proposal_temperature"] == 2.0 == max(meta["temperatures"])
    for name in ("v1", "v2"):
        tg = g["teachers"][name]
        tm = tg.attrs["muscle_teacher"]
        assert tm["format"] == 2 and tm["teacher_key"] == teacher_key(name)
        assert (tm["tail_samples"], tm["tail_seed"], tm["proposal_temperature"]) == (M, 0, 2.0)
        assert (
            sorted(tg.array_keys())
            == sorted([*SCHEMAS[2].teacher_arrays, "done"])
            == sorted([*HEAD, "tail_ids", "tail_logprobs", "negent"])
        )
        n = meta["n_tokens"]
        assert tg["tail_ids"].shape == (n, M) and tg["tail_ids"].dtype == tg["ids"].dtype
        assert tg["tail_logprobs"].shape == (n, M) and tg["tail_logprobs"].dtype == np.float16
        assert tg["negent"].shape == (n, 2) and tg["negent"].dtype == np.float32


def test_ids_dtype_holds_large_vocabularies():
    from muscle.teacher_cache import ids_dtype_for

    # tail ids share the head's dtype: uint32 once V > 65,536 (e.g. Llama 3's 128,256)
    assert ids_dtype_for(600) == np.uint16 and ids_dtype_for(65_536) == np.uint16
    assert ids_dtype_for(65_537) == np.uint32 and ids_dtype_for(128_256) == np.uint32


# ------------------------------------------------------------------------------ exactness


def test_stored_fields_equal_dense_recomputation(update):
    """Head exact, tail ids = sample_tail on the same global positions, tail log-probs and
    negent against a float64 softmax of the model's own logits."""
    g = group(update["cache2"])
    reader = CacheReader(update["cache2"])
    off = reader.stream.offsets
    spec = TailSampling(M, 0, 2.0)
    for name in ("v1", "v2"):
        tg = g["teachers"][name]
        drawn_other_seed = []
        for e in (0, 13, reader.stream.n_examples - 1):
            lo, hi = int(off[e]), int(off[e + 1])
            logits = dense_logits(update[name], reader.stream.input_ids[lo:hi])  # (L, V)
            lp64 = torch.log_softmax(logits.double(), 1)  # (L, V)
            ids = torch.from_numpy(tg["ids"][lo:hi].astype(np.int64))  # (L, K)
            assert torch.equal(ids, torch.topk(logits, K).indices)
            pos = torch.arange(lo, hi)  # global positions in the stream
            want = sample_tail(logits, ids, pos, spec, teacher_key(name)).ids
            tail = torch.from_numpy(tg["tail_ids"][lo:hi].astype(np.int64))  # (L, M)
            assert torch.equal(tail, want)
            assert not (tail[:, :, None] == ids[:, None, :]).any()  # never a head id
            other = sample_tail(logits, ids, pos, TailSampling(M, 1, 2.0), teacher_key(name))
            drawn_other_seed.append((other.ids == tail).float().mean())
            tail_lp = torch.from_numpy(tg["tail_logprobs"][lo:hi].astype(np.float64))
            torch.testing.assert_close(tail_lp, lp64.gather(1, tail), atol=1e-3, rtol=2e-3)
            negent = torch.from_numpy(tg["negent"][lo:hi].astype(np.float64))  # (L, 2)
            for i, t in enumerate((1.0, 2.0)):
                lp_t = torch.log_softmax(logits.double() / t, 1)
                want_ne = (lp_t.exp() * lp_t).sum(1)  # (L,) float64, dense
                torch.testing.assert_close(negent[:, i], want_ne, atol=2e-5, rtol=1e-5)
        assert float(torch.stack(drawn_other_seed).mean()) < 0.1  # the seed is used


def test_format1_unchanged(update):
    """M = 0 writes format 1: its arrays and attributes only; its head is byte for byte the
    head of the format 2 build from the same inputs (the tail changes nothing there)."""
    c1, c2 = update["cache1"], update["cache2"]
    g1 = group(c1)
    meta = g1.attrs["muscle_cache"]
    assert meta["format"] == 1
    assert not {"tail_samples", "tail_seed", "proposal_temperature"} & set(meta)
    tm = g1["teachers"]["v1"].attrs["muscle_teacher"]
    assert tm["format"] == 1 and not {"tail_samples", "teacher_key"} & set(tm)
    assert sorted(g1["teachers"]["v1"].array_keys()) == sorted(HEAD)
    for arr in HEAD:
        d1, d2 = c1 / "teachers" / "v1" / arr, c2 / "teachers" / "v1" / arr
        files = sorted(p.relative_to(d1) for p in d1.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(d2) for p in d2.rglob("*") if p.is_file())
        for f in files:
            assert (d1 / f).read_bytes() == (d2 / f).read_bytes(), f"{arr}/{f}"
    # and a format 1 cache reads as before: no tail entries in its batches
    batch = CacheReader(c1).read_batch(np.arange(2), temperature=2.0, teachers=("v1",))
    assert not any("tail" in k or "negent" in k for k in batch)


def test_reader_tail_entries(update):
    """The batch's tail entries are the stored draws with log p_hat written out by hand in
    float64 from the raw arrays (CACHE_FORMAT.md §9), negent at T, -inf on padding."""
    reader = CacheReader(update["cache2"])
    g = group(update["cache2"])
    tg = g["teachers"]["v2"]
    ex = np.array([5, 2])
    for T, i in ((1.0, 0), (2.0, 1)):
        b = reader.read_batch(ex, temperature=T, teachers=("v2",))
        for row, e in enumerate(ex):
            lo, hi = int(reader.stream.offsets[e]), int(reader.stream.offsets[e + 1])
            L = hi - lo
            lse = tg["lse"][lo:hi].astype(np.float64)
            head = tg["logprobs"][lo:hi].astype(np.float64)
            z = tg["tail_logprobs"][lo:hi].astype(np.float64) + lse[:, :1]  # raw logits
            pi_r = 1 - np.exp((head + lse[:, :1]) / 2 - lse[:, 1:]).sum(1, keepdims=True)
            logw = (z / T - lse[:, i : i + 1]) - (z / 2 - lse[:, 1:]) + np.log(pi_r) - np.log(M)
            got = b["v2_tail_logweights"][row, :L].double().numpy()
            np.testing.assert_allclose(got, logw, rtol=1e-6, atol=1e-6)
            assert np.array_equal(b["v2_tail_ids"][row, :L].numpy(), tg["tail_ids"][lo:hi])
            np.testing.assert_array_equal(b["v2_negent"][row, :L].numpy(), tg["negent"][lo:hi, i])
            assert torch.isneginf(b["v2_tail_logweights"][row, L:]).all()  # padding weighs 0
        if T == 2.0:  # at T = T_r every weight of a row is pi_r / M
            w = b["v2_tail_logweights"][0, : int(np.diff(reader.stream.offsets)[ex[0]])]
            assert torch.allclose(w, w[:, :1].expand_as(w))


# ------------------------------------------------------------------------------ determinism


def test_resume_after_failure_equals_clean_build(update, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    out = tmp_path / "c"
    shutil.copytree(update["cache2"], out)
    shutil.rmtree(out / "teachers" / "v2")
    real_set, calls = LocalStore.set, {"n": 0}

    async def flaky_set(self, key, value):
        if key.startswith("teachers/v2/") and "/c/" in key:
            calls["n"] += 1
            if calls["n"] == 12:  # part-way through the second unit (7 data arrays + done)
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", flaky_set)
    with pytest.raises(MuscleError, match="No space left.*resumable"):
        build(out, update["v2"], "v2")
    monkeypatch.setattr(LocalStore, "set", real_set)
    res = build(out, update["v2"], "v2")
    assert res.resumed and 0 < res.units_built < res.units_total
    assert_same_cache(out, update["cache2"])


def _cli_build(out: Path, base: Path, extra=(), env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "muscle.cli.cache", "build", "--base", str(base)]
    cmd += ["--name", "v1", "--out", str(out), *CLI_COMMON, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


CLI_COMMON = [
    "--task",
    "piqa",
    "--data-dir",
    str(EMBEDDED_DATA),
    "--max-examples",
    "40",
    "--top-k",
    "16",
    "--chunk-tokens",
    "64",
    "--shard-chunks",
    "2",
    "--batch-size",
    "4",
    "--tail-samples",
    "5",
    "--tail-seed",
    "123",
    "--quiet",
]


@pytest.fixture(scope="module")
def cli_ref(update):
    """A format 2 cache of v1's base built by the CLI in one clean run."""
    ref = update["root"] / "cli_ref"
    proc = _cli_build(ref, Path(update["v1"].base))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return ref


@pytest.mark.slow
def test_sigkill_resume_equals_clean_build(update, cli_ref):
    out = update["root"] / "killed"
    env = dict(os.environ, MUSCLE_CACHE_TEST_SLEEP="0.05")
    rng = random.Random(1)
    done_dir = out / "teachers" / "v1" / "done" / "c"
    kills = 0
    for _ in range(3):
        proc = _cli_build(out, Path(update["v1"].base), env=env)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not done_dir.is_dir():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # kill at a random moment once units are committed
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    proc = _cli_build(out, Path(update["v1"].base), env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert_same_cache(out, cli_ref)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_build_equals_one_rank(update, cli_ref):
    out = update["root"] / "two-ranks"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200)]
    cmd += ["-m", "muscle.cli.cache", "build", "--base", update["v1"].base, "--name", "v1"]
    cmd += ["--out", str(out), *CLI_COMMON]
    res = subprocess.run(cmd, capture_output=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert_same_cache(out, cli_ref)


# ------------------------------------------------------------------------------ training


def test_golden_first_step_loss_sampled_tail(update, tmp_path, capsys):
    """The first logged loss from a format 2 cache is the sampled-tail estimate of the full
    KL, written out by hand in float64 from the raw stored arrays and the initial student."""
    from muscle.compat_train import train_compat_from_cache
    from muscle.models import load_model

    cache = update["cache2"]
    cfg = TrainConfig(
        lr=1e-3, epochs=1, grad_accum=1, warmup_steps=0, batch_size=4, max_steps=2, seed=0
    )
    train_compat_from_cache(cache, tmp_path / "run", train_cfg=cfg, compat_cfg=CompatConfig())
    out = capsys.readouterr()
    assert "compat loss estimator: sampled_tail" in out.out + out.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if r["split"] == "train")
    assert logged["frac_sampled"] == 1.0
    sidecar = json.loads((tmp_path / "run" / "muscle_adapter.json").read_text())
    assert sidecar["loss_estimator"] == "sampled_tail"

    reader = CacheReader(cache)
    examples = reader.batch_plan("train", 4, shuffle=True, seed=0, epoch=0)[0]
    g = group(cache)
    model = load_model(update["v2"])
    T = 2.0  # = T_r: i_T = i_r = 1, i_1 = 0
    terms, wrong = [], []
    for e in examples:
        lo, hi = int(reader.stream.offsets[e]), int(reader.stream.offsets[e + 1])
        with torch.no_grad():
            x = torch.from_numpy(reader.stream.input_ids[lo:hi].astype(np.int64))[None]
            z = model(input_ids=x).logits[0].double()  # (L, V)
        logq = torch.log_softmax(z / T, 1)
        raw = {
            (who, a): g["teachers"][who][a][lo:hi]
            for who in ("v1", "v2")
            for a in ("ids", "logprobs", "lse", "tail_ids", "tail_logprobs", "negent")
        }
        for t in range(hi - lo):
            y = int(reader.stream.labels[lo + t])
            if y == IGNORE_INDEX:
                continue
            m = int(z[t].argmax()) != y  # paper Eq. 1: toward v1 where v2c is wrong
            who = "v1" if m else "v2"
            lse = raw[who, "lse"][t].astype(np.float64)  # (lse_1, lse_2)
            head_lp1 = raw[who, "logprobs"][t].astype(np.float64)  # (K,)
            p_head = np.exp((head_lp1 + lse[0]) / T - lse[1])  # (K,) at T
            pi_r = 1.0 - p_head.sum()  # T = T_r
            tail_z = raw[who, "tail_logprobs"][t].astype(np.float64) + lse[0]  # (M,)
            w = np.exp((tail_z / T - lse[1]) - (tail_z / T - lse[1])) * pi_r  # = pi_r here
            lq = logq[t].numpy()
            kl = (
                float(raw[who, "negent"][t][1])
                - (p_head * lq[raw[who, "ids"][t].astype(np.int64)]).sum()
                - (w / M * lq[raw[who, "tail_ids"][t].astype(np.int64)]).sum()
            )
            terms.append(kl)
            wrong.append(m)
    assert logged["loss"] == pytest.approx(float(np.mean(terms)), rel=1e-4)
    assert logged["frac_v1"] == pytest.approx(sum(wrong) / len(wrong), abs=1e-6)


def test_training_at_a_temperature_below_t_r_weights_the_draws(update):
    """At T = 1 < T_r the objective's loss is the estimator with non-constant weights: the
    same batch, scored by the objective and by hand from the reader's entries in float64."""
    from muscle.compat_train import CompatObjective
    from muscle.models import load_model

    reader = CacheReader(update["cache2"])
    batch = reader.read_batch(np.array([3, 8]), temperature=1.0)
    model = load_model(update["v2"])
    obj = CompatObjective(CompatConfig(temperature=1.0, mask="always_v1"))
    with torch.no_grad():
        loss, stats = obj(model, batch)
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logq = torch.log_softmax(z.double(), -1)  # (B, T, V)
    keep = batch["labels"] != IGNORE_INDEX
    lq_head = logq.gather(-1, batch["v1_ids"])  # (B, T, K)
    lq_tail = logq.gather(-1, batch["v1_tail_ids"])  # (B, T, M)
    p_hat = batch["v1_tail_logweights"].double().exp()
    kl = (
        batch["v1_negent"].double()
        - (batch["v1_logprobs"].double().exp() * lq_head).sum(-1)
        - (p_hat * lq_tail).sum(-1)
    )
    assert loss.item() == pytest.approx(float(kl[keep].mean()), rel=1e-4)
    assert stats["frac_sampled"] == 1.0
    w = batch["v1_tail_logweights"][keep]
    assert float((w - w[:, :1]).abs().max()) > 1e-3  # below T_r the weights differ by draw


# ------------------------------------------------------------------------------ verify, inspect


def test_verify_and_inspect(update):
    rep = verify_cache(update["cache2"], rerun=("v1", "v2"), sample=40)
    assert rep.ok, rep.errors
    for st in rep.rerun.values():
        assert st["tail_ids_exact"] == 1.0 and st["max_tail_draw_err"] == 0.0
        assert st["max_tail_logprob_err"] == 0.0 and st["max_negent_err"] < 1e-4
    info = inspect_cache(update["cache2"])
    tail = info["teachers"]["v1"]["tail"]
    assert (tail["samples"], tail["seed"], tail["proposal_temperature"]) == (M, 0, 2.0)
    s1, s2 = tail["spread"]["1.0"], tail["spread"]["2.0"]
    assert s2["ess_median"] == pytest.approx(1.0, abs=1e-6)  # T = T_r: constant weights
    assert 0 < s1["ess_p10"] <= s1["ess_median"] <= 1.0
    assert s1["sd_median"] > 0 and s2["sd_median"] > 0 and s1["tokens"] > 0
    text = render_inspect(info)
    assert f"tail      M={M} draws/token at T_r=2" in text and "tail T=1 weights ESS" in text
    assert "loose lower bound" not in text  # that note is format 1's


def test_inspect_spread_equals_hand_computation(update):
    """ESS and SD of one labelled row at T = 1, from its stored draws, by hand."""
    from muscle.teacher_cache.inspect import _tail_spread

    g = group(update["cache2"])
    tg = g["teachers"]["v1"]
    meta = g.attrs["muscle_cache"]
    spread = _tail_spread(update["cache2"], meta, g, "v1", max_rows=10**9)
    labels = g["stream"]["labels"][:]
    keep = labels != IGNORE_INDEX
    lse = tg["lse"][:].astype(np.float64)[keep]
    head = tg["logprobs"][:].astype(np.float64)[keep]
    z = tg["tail_logprobs"][:].astype(np.float64)[keep] + lse[:, :1]
    pi_r = 1 - np.exp((head + lse[:, :1]) / 2 - lse[:, 1:]).sum(1, keepdims=True)
    w = np.exp((z - lse[:, :1]) - (z / 2 - lse[:, 1:])) * pi_r  # (R, M) weights at T = 1
    ess = w.sum(1) ** 2 / (M * (w**2).sum(1))
    sd = np.sqrt((w * (z - lse[:, :1])).var(1, ddof=1) / M)
    assert spread["1.0"]["tokens"] == int(keep.sum())
    assert spread["1.0"]["ess_median"] == pytest.approx(float(np.median(ess)), rel=1e-6)
    assert spread["1.0"]["sd_median"] == pytest.approx(float(np.median(sd)), rel=1e-6)
    assert spread["1.0"]["sd_rms"] == pytest.approx(float(np.sqrt((sd**2).mean())), rel=1e-6)


# ------------------------------------------------------------------------------ bad input


def _copy(update, tmp_path, name="c") -> Path:
    out = tmp_path / name
    shutil.copytree(update["cache2"], out)
    return out


def _set_attrs(path: Path, key: str, **changes) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    g.attrs[key] = dict(g.attrs[key]) | changes


def test_verify_refuses_tail_log_probs_that_do_not_match(update, tmp_path):
    import zarr

    bad = _copy(update, tmp_path)
    a = zarr.open_array(str(bad / "teachers" / "v1" / "tail_logprobs"), mode="r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        a[:] = a[:] - np.float16(0.5)  # still <= 0 and below the head: structurally fine
    assert verify_cache(bad).ok  # without re-running, nothing tells
    rep = verify_cache(bad, rerun=("v1",), sample=40)
    assert any("max_tail_logprob_err" in e and "tail draws do not match" in e for e in rep.errors)


def test_verify_refuses_draws_from_another_seed(update, tmp_path):
    bad = _copy(update, tmp_path)
    _set_attrs(bad, "muscle_cache", tail_seed=7)  # the stored draws are seed 0's
    rep = verify_cache(bad, rerun=("v2",), sample=40)
    assert any("max_tail_draw_err" in e for e in rep.errors), rep.errors
    assert rep.rerun["v2"]["tail_ids_exact"] < 0.1


def test_verify_refuses_a_draw_inside_the_head(update, tmp_path):
    import zarr

    bad = _copy(update, tmp_path)
    tdir = bad / "teachers" / "v1"
    ids = zarr.open_array(str(tdir / "ids"), mode="r")
    tail = zarr.open_array(str(tdir / "tail_ids"), mode="r+")
    row = tail[5]
    row[0] = ids[5, 3]
    tail[5] = row
    rep = verify_cache(bad)
    assert any("tail draws inside the top-K head" in e for e in rep.errors), rep.errors


def test_m_larger_than_the_tail_is_refused(update, tmp_path):
    out = tmp_path / "big"
    cfg = CacheConfig(k=K, chunk_tokens=128, shard_chunks=2, tail_samples=V - K + 1)
    with pytest.raises(MuscleError, match=r"larger than the tail .* V - K = 600 - 16 = 584"):
        build(out, update["v1"], "v1", cfg)
    assert nothing_at(out)
    ok = CacheConfig(k=V - 2, chunk_tokens=128, shard_chunks=2, tail_samples=3)
    with pytest.raises(MuscleError, match="larger than the tail"):
        build(out, update["v1"], "v1", ok)
    assert nothing_at(out)


@pytest.mark.parametrize(
    ("cache", "cfg", "match"),
    [
        ("cache1", CFG2, r"sampled tail of M=8 \(format 2\) but the cache's teachers have none"),
        ("cache2", CFG1, r"no sampled tail \(format 1\) but the cache's teachers have M=8"),
        (
            "cache2",
            CacheConfig(k=K, chunk_tokens=128, shard_chunks=2, batch_size=4, tail_samples=4),
            r"its tail samples \(4\) differs from the cache's \(8\); pass the cache's --tail-samples",
        ),
        (
            "cache2",
            CacheConfig(k=K, chunk_tokens=128, shard_chunks=2, tail_samples=M, tail_seed=3),
            r"its tail seed \(3\) differs",
        ),
    ],
)
def test_refuses_to_mix_formats_and_tails(update, tmp_path, cache, cfg, match):
    out = tmp_path / "c"
    shutil.copytree(update[cache], out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(MuscleError, match=match):
        build(out, update["v2"], "v3", cfg)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_bad_tail_settings():
    for bad in ({"tail_samples": -1}, {"tail_samples": 1.5}, {"tail_seed": -1}):
        with pytest.raises(MuscleError, match="--tail-"):
            CacheConfig(**bad).validate()
    with pytest.raises(MuscleError, match=r"--tail-seed must be an integer in \[0, 2\^63\)"):
        CacheConfig(tail_seed=2**63).validate()


def test_newer_format_is_refused(update, tmp_path):
    from muscle.compat_train import train_compat_from_cache

    newer = _copy(update, tmp_path)
    _set_attrs(newer, "muscle_cache", format=3)
    with pytest.raises(MuscleError, match="format 3 is newer than this muscle reads"):
        CacheReader(newer)
    with pytest.raises(MuscleError, match="format 3 is newer than this muscle reads"):
        train_compat_from_cache(newer, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    before = sorted(str(p.relative_to(newer)) for p in newer.rglob("*"))
    with pytest.raises(MuscleError, match="newer than this muscle reads.*upgrade muscle"):
        build(newer, update["v1"], "v3")
    assert sorted(str(p.relative_to(newer)) for p in newer.rglob("*")) == before


def test_training_temperature_not_cached(update, tmp_path):
    from muscle.compat_train import train_compat_from_cache

    with pytest.raises(MuscleError, match=r"temperature 3.0 is not cached .*--temperatures"):
        train_compat_from_cache(
            update["cache2"], tmp_path / "r", compat_cfg=CompatConfig(temperature=3.0)
        )
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ CLI


def test_cli_build_inspect_verify_and_errors(update, cli_ref, tmp_path, capsys):
    from muscle.cli.cache import main

    meta = group(cli_ref).attrs["muscle_cache"]
    assert (meta["format"], meta["tail_samples"], meta["tail_seed"]) == (2, 5, 123)
    code, out, _ = run_cli_main(main, ["inspect", str(cli_ref)], capsys)
    assert code == 0 and "tail      M=5 draws/token at T_r=2 (seed 123)" in out
    code, out, _ = run_cli_main(main, ["verify", str(cli_ref), "--model", "v1"], capsys)
    assert code == 0 and "tail draws redrawn exactly 100.0%" in out and out.strip().endswith("ok")

    def build_args(out, *extra):
        args = ["build", "--base", update["v1"].base, "--name", "v1", "--out", str(out)]
        return [*args, *CLI_COMMON, *extra]

    for extra, match in (
        (("--tail-samples", "585"), "larger than the tail"),
        (("--tail-samples", "-2"), "--tail-samples must be an integer >= 0"),
        (("--tail-seed", "-1"), "--tail-seed must be an integer in [0, 2^63)"),
    ):
        code, _, err = run_cli_main(main, build_args(tmp_path / "x", *extra), capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and match in last, err
        assert len(err.strip().splitlines()) == 1, err
        assert nothing_at(tmp_path / "x")
    # a format 1 teacher asked for into the format 2 cache
    copy = tmp_path / "ref"
    shutil.copytree(cli_ref, copy)
    code, _, err = run_cli_main(main, build_args(copy, "--tail-samples", "0"), capsys)
    assert code == 2 and "no sampled tail (format 1)" in err and "--tail-samples 5" in err
    _set_attrs(copy, "muscle_cache", format=3)
    code, _, err = run_cli_main(main, ["inspect", str(copy)], capsys)
    assert code == 2 and "format 3 is newer than this muscle reads" in err
    assert len(err.strip().splitlines()) == 1
