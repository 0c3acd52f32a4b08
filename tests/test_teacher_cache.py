"""The teacher cache, in process, on tiny random models: exactness, reader, refusals, damage."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from muscle import MuscleError
from muscle.config import DataConfig, ModelSpec
from muscle.data import IGNORE_INDEX as IGNORE
from muscle.teacher_cache import (
    CacheConfig,
    CacheReader,
    build_cache,
    cache_teacher_spec,
    inspect_cache,
    render_inspect,
    verify_cache,
)
from tiny import EMBEDDED_DATA, make_model_dir

K = 16
DATA = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40)
CFG = CacheConfig(k=K, chunk_tokens=128, shard_chunks=2, batch_size=4)


def build(out, base, name="v1", data=DATA, cfg=CFG, **kw):
    return build_cache(
        out, name, ModelSpec(str(base), kw.pop("adapter", None)), data, cfg, progress=False, **kw
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"m1": make_model_dir(root / "m1", seed=1), "m2": make_model_dir(root / "m2", seed=2)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, models) -> Path:
    out = tmp_path_factory.mktemp("cache") / "piqa"
    build(out, models["m1"], "v1")
    build(out, models["m2"], "v2")
    return out


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cache, by path inside it."""
    import zarr

    out = {}
    root = zarr.open_group(str(path), mode="r")
    for name, arr in root.arrays():
        out[name] = arr[:]
    for group in ("stream",):
        for name, arr in root[group].arrays():
            out[f"{group}/{name}"] = arr[:]
    for t in root["teachers"].group_keys():
        for name, arr in root["teachers"][t].arrays():
            out[f"teachers/{t}/{name}"] = arr[:]
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    xa, xb = cache_arrays(a), cache_arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype, k
        if xa[k].dtype.kind == "f":
            assert np.array_equal(xa[k], xb[k], equal_nan=True), k
        else:
            assert np.array_equal(xa[k], xb[k]), k


def dense(model_dir: Path, input_ids: list[int]) -> torch.Tensor:
    from muscle.models import load_model

    model = load_model(ModelSpec(str(model_dir)))
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0].float()  # (L, V)


# ------------------------------------------------------------------------------ exactness


def test_stored_topk_equals_direct_forward(cache, models):
    import zarr

    reader = CacheReader(cache, teachers=("v1", "v2"))
    root = zarr.open_group(str(cache), mode="r")
    for name, mdir in (("v1", models["m1"]), ("v2", models["m2"])):
        tg = root["teachers"][name]
        for e in (0, 7, reader.stream.n_examples - 1):
            lo, hi = reader.stream.offsets[e], reader.stream.offsets[e + 1]
            logits = dense(mdir, reader.stream.input_ids[lo:hi].tolist())  # (L, V)
            vals, ids = torch.topk(logits, K)
            lse1 = torch.logsumexp(logits, 1)
            lse2 = torch.logsumexp(logits / 2, 1)
            assert np.array_equal(tg["ids"][lo:hi].astype(np.int64), ids.numpy())
            lp = torch.from_numpy(tg["logprobs"][lo:hi].astype(np.float32))
            torch.testing.assert_close(lp, vals - lse1[:, None], atol=1e-3, rtol=2e-3)
            lse = torch.from_numpy(tg["lse"][lo:hi])
            torch.testing.assert_close(lse, torch.stack([lse1, lse2], 1), atol=1e-5, rtol=1e-5)
            labels = torch.from_numpy(reader.stream.labels[lo:hi].astype(np.int64))
            lab = torch.from_numpy(tg["label_logprob"][lo:hi])
            valid = labels != -100
            want = logits.log_softmax(1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
            torch.testing.assert_close(lab[valid], want[valid], atol=1e-5, rtol=1e-5)
            assert torch.isnan(lab[~valid]).all()


def test_reader_reconstructs_temperature_logprobs_and_tail(cache, models):
    reader = CacheReader(cache)
    idx = reader.split_indices("validation")[:3]
    batch = reader.read_batch(idx, temperature=2.0, teachers=("v1",))
    for b, e in enumerate(idx):
        lo, hi = reader.stream.offsets[e], reader.stream.offsets[e + 1]
        L = hi - lo
        logits = dense(models["m1"], reader.stream.input_ids[lo:hi].tolist())
        lp_dense = (logits / 2).log_softmax(1)  # (L, V) at T=2
        ids = batch["v1_ids"][b, :L]
        lp = batch["v1_logprobs"][b, :L]
        torch.testing.assert_close(lp, lp_dense.gather(1, ids), atol=2e-3, rtol=2e-3)
        tail = 1 - lp.exp().sum(1)
        tail_dense = 1 - lp_dense.gather(1, ids).exp().sum(1)
        torch.testing.assert_close(tail, tail_dense, atol=1e-3, rtol=1e-3)
        assert (tail > 0).all()
        assert batch["input_ids"][b, :L].tolist() == reader.stream.input_ids[lo:hi].tolist()
        assert batch["attention_mask"][b].sum() == L
        # padding: ids 0, log-probs 0, labels -100
        assert (batch["v1_ids"][b, L:] == 0).all() and (batch["v1_logprobs"][b, L:] == 0).all()
        assert (batch["labels"][b, L:] == -100).all()
        lab = batch["v1_label_logprob"][b, :L]
        labels = batch["labels"][b, :L]
        want = logits.log_softmax(1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
        torch.testing.assert_close(lab[labels != -100], want[labels != -100], atol=1e-5, rtol=1e-5)
        assert (lab[labels == -100] == 0).all()


def test_reader_order_ranks_and_workers(cache):
    reader = CacheReader(cache)
    n = reader.num_examples("train")
    assert n + reader.num_examples("validation") == 40
    kw = dict(temperature=2.0, teachers=("v1", "v2"), seed=3, epoch=1)
    one = list(reader.iter_batches("train", 4, **kw))
    again = list(reader.iter_batches("train", 4, **kw))
    assert [b["example_ids"] for b in one] == [b["example_ids"] for b in again]
    other = list(reader.iter_batches("train", 4, **(kw | {"epoch": 2})))
    assert [b["example_ids"] for b in one] != [b["example_ids"] for b in other]
    seen = sorted(i for b in one for i in b["example_ids"])
    assert len(seen) == n == len(set(seen))
    # two ranks with batch 2 see the global batches of one rank with batch 4
    r0 = list(reader.iter_batches("train", 2, rank=0, world_size=2, **kw))
    r1 = list(reader.iter_batches("train", 2, rank=1, world_size=2, **kw))
    assert len(r0) == len(r1) == len(one)
    for g, a, b in zip(one, r0, r1, strict=True):
        assert a["example_ids"] + b["example_ids"] == g["example_ids"]
    # skip resumes mid-epoch; DataLoader workers give the same batches
    assert [b["example_ids"] for b in reader.iter_batches("train", 4, skip=2, **kw)] == [
        b["example_ids"] for b in one[2:]
    ]
    workers = list(reader.iter_batches("train", 4, num_workers=2, **kw))
    for a, b in zip(one, workers, strict=True):
        assert a["example_ids"] == b["example_ids"]
        assert torch.equal(a["v2_logprobs"], b["v2_logprobs"])
    with pytest.raises(MuscleError, match="temperature 3"):
        next(reader.iter_batches("train", 4, temperature=3.0))
    with pytest.raises(MuscleError, match="no teacher 'v3'"):
        next(reader.iter_batches("train", 4, temperature=2.0, teachers=("v3",)))


def test_inspect_and_verify(cache, models):
    info = inspect_cache(cache)
    assert info["k"] == K and set(info["teachers"]) == {"v1", "v2"}
    assert all(t["complete"] for t in info["teachers"].values())
    assert 0 < info["teachers"]["v1"]["bytes_per_token"] < 200
    rep = verify_cache(cache, rerun=("v1",), sample=20)
    assert rep.ok, rep.errors
    assert rep.rerun["v1"]["ids_exact"] == 1.0
    assert cache_teacher_spec(cache, "v2") == ModelSpec(str(models["m2"]), dtype="float32")


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"cfg": CacheConfig(k=8, chunk_tokens=128, shard_chunks=2)}, "its K"),
        (
            {"data": DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=30)},
            "dataset fingerprint",
        ),
        (
            {
                "data": DataConfig(
                    task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40, val_fraction=0.3
                )
            },
            "split",
        ),
        (
            {
                "data": DataConfig(
                    task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40, max_length=20
                )
            },
            "token stream",
        ),
    ],
)
def test_refuses_to_mix(cache, models, change, match):
    with pytest.raises(MuscleError, match=match):
        build(cache, models["m2"], "v3", **change)
    assert not (cache / "teachers" / "v3").exists()


def test_refuses_other_tokenizer_and_needs_overwrite(cache, models, tmp_path):
    other = make_model_dir(tmp_path / "other", seed=3, vocab_size=500)
    with pytest.raises(MuscleError, match="tokenizer fingerprint"):
        build(cache, other, "v3")
    # the same teacher again: a no-op; another model under its name: refused without --overwrite
    again = build(cache, models["m1"], "v1")
    assert again.extra.get("skipped") and again.units_built == 0
    with pytest.raises(MuscleError, match="already complete.*another model.*--overwrite"):
        build(cache, models["m2"], "v1")


def test_stream_is_the_trainers_tokens(models, tmp_path):
    """The cache's stream for a DataConfig is, example by example, what the trainers encode for
    it (muscle.data: load_splits + encode_splits, max_length from the model when unset): token
    ids, next-token labels, ids and splits, in split order. Settings that change the tokens
    (answer_only, a max_length that truncates) are on, so a second encoding would show."""
    from muscle.data import encode_splits, load_splits, model_max_length
    from muscle.models import load_tokenizer
    from muscle.teacher_cache.schema import SPLIT_CODES
    from muscle.teacher_cache.store import read_meta

    spec = ModelSpec(str(models["m1"]))
    tok = load_tokenizer(spec)
    for data in (
        DataConfig(
            task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=24, max_length=40,
            answer_only=True,
        ),
        DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=12),
    ):  # fmt: skip
        out = tmp_path / f"c{data.max_length}"
        build(out, models["m1"], data=data)
        stream = CacheReader(out).stream
        max_length = data.max_length or model_max_length(load_model_config(models["m1"]))
        assert read_meta(out)["data_config"]["max_length"] == max_length
        enc = encode_splits(tok, data, load_splits(data), max_length=max_length)
        want = [(s, e) for s in ("train", "validation") for e in enc[s]]
        assert stream.n_examples == len(want)
        for i, (split, e) in enumerate(want):
            lo, hi = stream.offsets[i], stream.offsets[i + 1]
            assert stream.input_ids[lo:hi].tolist() == e.input_ids, i
            assert stream.labels[lo:hi].tolist() == e.labels, i
            assert json.loads(stream.example_ids[i]) == e.id
            assert SPLIT_CODES[int(stream.split[i])] == split
        if data.answer_only:  # the settings took effect: truncated contexts, context not learnt
            assert any(e.truncated for _, e in want)
            assert all(lab == IGNORE for _, e in want for lab in e.labels[: e.n_context - 1])


def load_model_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def test_k_larger_than_vocabulary(models, tmp_path):
    with pytest.raises(MuscleError, match="larger than the vocabulary"):
        build(tmp_path / "c", models["m1"], cfg=CacheConfig(k=100_000))
    assert sorted(tmp_path.iterdir()) == []  # refused before anything was created


def test_unwritable_output(models, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MuscleError, match="cannot write the cache"):
        build(tmp_path / "file" / "c", models["m1"])


def test_nan_logits_name_the_example(models, tmp_path):
    from muscle.models import load_base
    from muscle.tasks import load_examples

    model = load_base(ModelSpec(str(models["m1"])))
    # Untie the head so a NaN in one embedding row only poisons examples containing that token.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    tok_dir = tmp_path / "nan"
    model.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["m1"])
    tok.save_pretrained(tok_dir)
    ex = load_examples("piqa", "train", data_dir=EMBEDDED_DATA, max_examples=40)
    bad_token = tok(ex[5].context)["input_ids"][3]
    poisoned = {e.id for e in ex if bad_token in tok(e.context + " " + e.answer)["input_ids"]}
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    model.save_pretrained(tok_dir)
    with pytest.raises(MuscleError, match="NaN/inf logits on example") as err:
        build(tmp_path / "c", tok_dir)
    named = int(str(err.value).split("example ")[1].split(" ")[0])
    assert named in poisoned


def test_adapter_teacher_and_mismatched_base(models, tmp_path):
    from muscle.config import LoraSpec
    from muscle.models import (
        adapter_sha256,
        attach_lora,
        base_fingerprint,
        load_base,
        save_adapter,
    )

    spec1 = ModelSpec(str(models["m1"]))
    peft = attach_lora(load_base(spec1), LoraSpec(r=4, alpha=8))
    sidecar = {"base": {"path": str(models["m1"]), "fingerprint": base_fingerprint(spec1)}}
    save_adapter(peft, tmp_path / "ad", sidecar)
    with pytest.raises(MuscleError, match="was trained on base"):
        build(tmp_path / "c", models["m2"], "v2", adapter=str(tmp_path / "ad"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no cache directory left
    build(tmp_path / "c", models["m1"], "v2", adapter=str(tmp_path / "ad"))
    spec = cache_teacher_spec(tmp_path / "c", "v2")
    assert spec.adapter == str(tmp_path / "ad")
    meta = json.loads((tmp_path / "c" / "teachers" / "v2" / "zarr.json").read_text())
    assert meta["attributes"]["muscle_teacher"]["model"]["adapter_sha256"] == adapter_sha256(
        tmp_path / "ad"
    )


# ------------------------------------------------------------------------------ damage


def _first_shard(cache: Path, teacher: str = "v1") -> Path:
    return cache / "teachers" / teacher / "logprobs" / "c" / "0" / "0"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_chunk_is_named(cache, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    f = _first_shard(bad)
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))
    rep = verify_cache(bad)
    assert not rep.ok
    assert any("teachers/v1/logprobs" in e and "chunk" in e for e in rep.errors), rep.errors
    reader = CacheReader(bad)
    with pytest.raises(MuscleError, match=r"chunk \d+ of teachers/v1/logprobs"):
        for _ in reader.iter_batches("train", 8, temperature=2.0, shuffle=False):
            pass


def test_missing_shard_file_refused(cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    _first_shard(bad, "v2").unlink()
    with pytest.raises(MuscleError, match="shard file .*missing"):
        CacheReader(bad, teachers=("v1", "v2"))
    assert any("missing" in e for e in verify_cache(bad).errors)


def test_disk_full_is_clean_and_resumable(cache, models, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    out = tmp_path / "c"
    shutil.copytree(cache, out)
    shutil.rmtree(out / "teachers" / "v2")
    real_set, calls = LocalStore.set, {"n": 0}

    async def flaky_set(self, key, value):
        if key.startswith("teachers/v2/") and "/c/" in key:
            calls["n"] += 1
            if calls["n"] == 7:  # part-way through the second unit
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", flaky_set)
    with pytest.raises(MuscleError, match="No space left.*resumable"):
        build(out, models["m2"], "v2")
    monkeypatch.setattr(LocalStore, "set", real_set)
    with pytest.raises(MuscleError, match="incomplete"):
        CacheReader(out, teachers=("v2",))
    res = build(out, models["m2"], "v2")
    assert res.resumed and 0 < res.units_built < res.units_total
    assert_same_cache(out, cache)


def test_top_k_mass_equals_dense_softmax(cache, models):
    # inspect's diagnostic: the teacher's probability on its top-K at each cached T, median and
    # p10 over all labelled positions (this cache is smaller than the sample), against a dense
    # softmax of the model's own logits.
    from muscle.teacher_cache import top_k_mass

    reader = CacheReader(cache)
    n_ex = reader.stream.n_examples
    masses = {1.0: [], 2.0: []}
    for e in range(n_ex):
        lo, hi = reader.stream.offsets[e], reader.stream.offsets[e + 1]
        logits = dense(models["m1"], reader.stream.input_ids[lo:hi].tolist()).double()  # (L, V)
        keep = torch.from_numpy(reader.stream.labels[lo:hi].astype(np.int64)) != -100
        for t in masses:
            p = (logits / t).softmax(1)[keep]  # (L', V)
            masses[t].append(p.topk(K, dim=1).values.sum(1))
    got = top_k_mass(cache, "v1", max_rows=10**9)
    assert set(got) == {"1.0", "2.0"}
    for t, parts in masses.items():
        m = torch.cat(parts).numpy()
        assert got[str(t)]["tokens"] == m.size
        assert got[str(t)]["median"] == pytest.approx(float(np.median(m)), abs=2e-3)
        assert got[str(t)]["p10"] == pytest.approx(float(np.quantile(m, 0.1)), abs=2e-3)
    assert got["2.0"]["median"] < got["1.0"]["median"]  # tempering flattens the teacher
    info = inspect_cache(cache)
    assert info["teachers"]["v1"]["top_k_mass"]["2.0"]["tokens"] > 0
    assert f"top-{K} mass T=1:" in render_inspect(info)


# ------------------------------------------------------------------------------ format


def test_arrays_follow_the_schema_and_the_spec(cache):
    """Every array of a built cache is one of the schema's, with its shape, dtype and fill; and
    CACHE_FORMAT.md §2 lists exactly those arrays with the same shapes and fill values."""
    import re

    import zarr

    from muscle.teacher_cache.schema import FORMAT_1, SCHEMAS, CacheConfig, Dims

    root = zarr.open_group(str(cache), mode="r")
    meta = root.attrs["muscle_cache"]
    cfg = CacheConfig(
        k=meta["k"],
        temperatures=tuple(meta["temperatures"]),
        chunk_tokens=meta["chunk_tokens"],
        shard_chunks=meta["shard_chunks"],
    )
    for group, specs in (
        ("stream", FORMAT_1.stream),
        ("teachers/v1", (*FORMAT_1.teacher, FORMAT_1.done)),
    ):
        tm = root[group].attrs.get("muscle_teacher", {})
        dims = Dims(
            cfg, meta["n_tokens"], meta["n_examples"], np.dtype(tm.get("ids_dtype", "uint8"))
        )
        assert sorted(n for n, _ in root[group].arrays()) == sorted(a.name for a in specs)
        for spec in specs:
            arr, want = root[group][spec.name], dims.create_kwargs(spec)
            assert arr.shape == want["shape"] and arr.chunks == want["chunks"], spec.name
            assert arr.shards == want.get("shards"), spec.name
            if spec.dtype != "str":
                assert arr.dtype == np.dtype(want["dtype"]), spec.name
            fill = arr.fill_value
            assert fill == spec.fill or (np.isnan(spec.fill) and np.isnan(fill)), spec.name

    text = (Path(__file__).resolve().parents[1] / "muscle" / "CACHE_FORMAT.md").read_text()
    rows = re.findall(
        r"^\| `(stream|teachers/<n>)/(\w+)` \| (\([^|]*\)) \|[^|]*\|[^|]*\| ([^|]+) \|", text, re.M
    )
    spec_rows = {(g, n): (shape, fill.strip()) for g, n, shape, fill in rows}
    rows_sym = {"N": "N", "E": "E", "E+1": "E+1", "chunks": "ceil(N/C)"}
    fills = {0: "0", IGNORE: "-100", "": '""'}
    want = {}  # every array of every format this muscle reads
    every = [("stream", a) for sc in SCHEMAS.values() for a in sc.stream]
    every += [("teachers/<n>", a) for sc in SCHEMAS.values() for a in (*sc.teacher, sc.done)]
    for g, a in every:
        shape = f"({rows_sym[a.rows]}, {a.cols})" if a.cols else f"({rows_sym[a.rows]},)"
        fill = "NaN" if isinstance(a.fill, float) and np.isnan(a.fill) else fills[a.fill]
        want[(g, a.name)] = (shape, fill)
    assert spec_rows == want


def test_newer_format_is_one_clear_error(cache, models, tmp_path, capsys):
    from muscle.cli.cache import main
    from tiny import run_cli_main

    bad = tmp_path / "newer"
    shutil.copytree(cache, bad)
    zj = bad / "zarr.json"
    j = json.loads(zj.read_text())
    j["attributes"]["muscle_cache"]["format"] = 99
    zj.write_text(json.dumps(j))
    for open_it in (CacheReader, verify_cache, inspect_cache):
        with pytest.raises(MuscleError, match="cache format 99 is newer than this muscle reads"):
            open_it(bad)
    with pytest.raises(MuscleError, match="format 99 is newer.*choose another --out"):
        build(bad, models["m2"], "v2")
    code, _, err = run_cli_main(main, ["verify", str(bad)], capsys)
    assert code == 2 and err.startswith("error: ") and "upgrade muscle" in err
    j["attributes"]["muscle_cache"]["format"] = 0
    zj.write_text(json.dumps(j))
    with pytest.raises(MuscleError, match="cache format 0, this muscle reads format .*: rebuild"):
        CacheReader(bad)
