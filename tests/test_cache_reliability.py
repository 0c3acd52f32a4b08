"""What the cache guarantees when things go wrong (#12, the cache items; concurrent builds are
in test_cache_concurrency.py): --overwrite removes only what muscle wrote, a damaged stream
shard is one line (exit 2) in verify, inspect and train --cache, a refusal leaves no output
behind, an error never shares the progress bar's line, and in a 2-rank build no rank sees a
half-made cache."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import zarr
from test_teacher_cache import assert_same_cache

from muscle import MuscleError
from muscle.cli.cache import main
from muscle.teacher_cache import CacheReader, list_teachers, verify_cache
from tiny import FIXTURE_DATA, make_model_dir, run_cli_main

COMMON = [
    "--task",
    "piqa",
    "--data-dir",
    str(FIXTURE_DATA),
    "--max-examples",
    "10",
    "--k",
    "8",
    "--chunk-tokens",
    "64",
    "--shard-chunks",
    "2",
    "--batch-size",
    "4",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    m1 = make_model_dir(root / "m1", seed=1)
    m2 = make_model_dir(root / "m2", seed=2)
    ref = root / "ref"
    for name, m in (("v1", m1), ("v2", m2)):
        args = ["build", "--base", str(m), "--name", name, "--out", str(ref), *COMMON, "--quiet"]
        assert main(args) == 0
    return {"root": root, "m1": m1, "m2": m2, "ref": ref}


def build_args(setup, out: Path, *extra: str, name: str = "v1", quiet: bool = True) -> list[str]:
    base = setup["m1"] if name == "v1" else setup["m2"]
    args = ["build", "--base", str(base), "--name", name, "--out", str(out), *COMMON, *extra]
    return args + (["--quiet"] if quiet else [])


def files(d: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.rglob("*") if p.is_file()}


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------------ --overwrite


def test_overwrite_refuses_a_zarr_store_muscle_did_not_write(setup, tmp_path, capsys):
    store = tmp_path / "mine"
    g = zarr.open_group(str(store), mode="w", attributes={"owner": "me"})
    g.create_array("x", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    before = files(store)
    code, _, err = run_cli_main(main, build_args(setup, store, "--overwrite"), capsys)
    line = one_error_line(code, err)
    assert "not a muscle teacher cache" in line and "refusing" in line, line
    assert files(store) == before  # untouched, byte for byte


def test_overwrite_refuses_a_directory_that_is_not_a_cache(setup, tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"\xff\xd8")
    code, _, err = run_cli_main(main, build_args(setup, d, "--overwrite"), capsys)
    assert "not a muscle teacher cache" in one_error_line(code, err)
    assert [p.name for p in d.iterdir()] == ["a.jpg"]


def test_overwrite_removes_only_what_muscle_wrote(setup, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(setup["ref"], out)
    (out / "NOTES.txt").write_text("my notes")
    # Another K does not match the cache: --overwrite discards the cache, nothing else.
    code, _, err = run_cli_main(main, build_args(setup, out, "--overwrite", "--k", "4"), capsys)
    assert code == 0, err
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.txt", "stream", "teachers", "zarr.json"]
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["muscle_cache"]
    assert meta["k"] == 4 and list_teachers(out) == ["v1"]
    assert verify_cache(out).ok


# ------------------------------------------------------------------------ damaged stream


def _damage(f: Path, how: str) -> None:
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(("array", "how"), [("input_ids", "flip"), ("labels", "truncate")])
def test_damaged_stream_shard_is_one_line(setup, tmp_path, capsys, array, how):
    bad = tmp_path / "bad"
    shutil.copytree(setup["ref"], bad)
    _damage(bad / "stream" / array / "c" / "0", how)
    named = rf"corrupted chunk \d+ of stream/{array} \(.*file stream/{array}/c/0\)"
    with pytest.raises(MuscleError, match=named):  # what train --cache reads through
        CacheReader(bad)
    rep = verify_cache(bad)
    assert not rep.ok and any(re.search(named, e) for e in rep.errors), rep.errors
    code, _, err = run_cli_main(main, ["verify", str(bad)], capsys)
    assert f"stream/{array}" in one_error_line(code, err)
    # inspect reads the labels only (for the top-K mass): an error if it meets the damage
    code, _, err = run_cli_main(main, ["inspect", str(bad)], capsys)
    assert "Traceback" not in err and (code == 0 or f"stream/{array}" in one_error_line(code, err))


def test_train_from_a_damaged_stream_is_one_line(setup, tmp_path, capsys):
    from muscle.cli.train import main as train_main

    bad = tmp_path / "bad"
    shutil.copytree(setup["ref"], bad)
    _damage(bad / "stream" / "input_ids" / "c" / "0", "flip")
    args = ["--cache", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1"]
    code, _, err = run_cli_main(train_main, args, capsys)
    assert re.search(r"corrupted chunk \d+ of stream/input_ids", one_error_line(code, err))


def test_missing_stream_shard_is_refused(setup, tmp_path):
    # A missing shard file reads as fill values (labels -100): silently wrong, unless refused.
    bad = tmp_path / "bad"
    shutil.copytree(setup["ref"], bad)
    (bad / "stream" / "labels" / "c" / "0").unlink()
    with pytest.raises(MuscleError, match=r"stream/labels/c/0 is missing"):
        CacheReader(bad)
    assert any("stream/labels/c/0 is missing" in e for e in verify_cache(bad).errors)


# ------------------------------------------------------------------------ refusals, output


def test_a_refusal_leaves_no_output_behind(setup, tmp_path, capsys):
    out = tmp_path / "new" / "cache"
    code, _, err = run_cli_main(main, build_args(setup, out, "--k", "100000"), capsys)
    assert "larger than the vocabulary" in one_error_line(code, err)
    assert not (tmp_path / "new").exists()  # not the cache, its parent, or its lock folder


def test_an_error_starts_on_its_own_line(setup, tmp_path, capsys, monkeypatch):
    from zarr.storage import LocalStore

    real_set, calls = LocalStore.set, {"n": 0}

    async def disk_full(self, key, value):  # the second unit of the teacher cannot be written
        if key.startswith("teachers/v1/") and "/c/" in key:
            calls["n"] += 1
            if calls["n"] == 6:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", disk_full)
    code, _, err = run_cli_main(main, build_args(setup, tmp_path / "c", quiet=False), capsys)
    assert code == 2 and "cache v1:" in err  # the progress bar was drawn
    # Split on \r too: a terminal draws what follows a \r over the bar.
    assert re.search(r"(^|\n)error: writing the cache", err), repr(err[-400:])
    assert not re.search(r"[^\n]error: ", err), repr(err[-400:])


# ------------------------------------------------------------------------ 2 ranks


def _rank(rank: int, port: int, out: str, base: str, q) -> None:
    """One torchrun-like rank of a 2-rank build. Rank 0 is slow to remove the files it makes
    in the output directory: a rank that looked at it before rank 0 has made the cache would
    find a directory without zarr.json, as in the flaky CI failure."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import time

    import torch

    from muscle.config import DataConfig, ModelSpec
    from muscle.teacher_cache import CacheConfig, build_cache

    torch.set_num_threads(1)
    if rank == 0:
        real_unlink = Path.unlink

        def slow_unlink(self, *args, **kwargs):
            if Path(self).parent == Path(out):
                time.sleep(2.0)
            return real_unlink(self, *args, **kwargs)

        Path.unlink = slow_unlink
    data = DataConfig(task="piqa", data_dir=str(FIXTURE_DATA), max_examples=10)
    cfg = CacheConfig(k=8, chunk_tokens=64, shard_chunks=2, batch_size=4)
    try:
        build_cache(out, "v1", ModelSpec(base), data, cfg, progress=False)
        q.put((rank, "ok"))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put((rank, f"{type(e).__name__}: {e}"))


def _two_ranks(out: Path, base: Path, stop_at_first_error: bool = True) -> list:
    """Run a 2-rank build of v1 into ``out``: [(rank, "ok" or its error)], in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(out), str(base), q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got: list = []
    try:
        while len(got) < 2 and not (stop_at_first_error and any(r[1] != "ok" for r in got)):
            got.append(q.get(timeout=300))  # (a rank that refused: do not wait for the other)
    finally:
        for p in procs:
            p.join(30 if len(got) == 2 else 0)
            if p.is_alive():
                p.kill()
    return sorted(got)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_build_no_rank_sees_a_half_made_cache(setup, tmp_path):
    out = tmp_path / "two"
    got = _two_ranks(out, setup["m1"])
    assert got == [(0, "ok"), (1, "ok")], got
    one = tmp_path / "one"
    assert main(build_args(setup, one)) == 0
    assert_same_cache(out, one)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_refusal_reaches_every_rank(setup, tmp_path):
    # Rank 0 alone looks at the output; its refusal must reach rank 1 (which would otherwise
    # wait for rank 0 forever), as the same one line.
    out = tmp_path / "photos"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"\xff\xd8")
    got = _two_ranks(out, setup["m1"], stop_at_first_error=False)
    assert [r for r, _ in got] == [0, 1], got
    assert all("not a muscle teacher cache" in msg for _, msg in got), got
    assert [p.name for p in out.iterdir()] == ["a.jpg"]
