"""Concurrent writers of one cache (#12 item 1), with two long-lived worker processes that
start builds at the same moment: v1 and v2 built at once into one new cache both finish and
the cache equals a sequential build; the same teacher twice: one builds, the other is refused
naming the holder (or finds it complete); a stream still being written is waited for, never
taken for an interrupted build and deleted.

The workers are spawned once (imports paid once), so 20 trials fit in well under a minute.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_teacher_cache import cache_arrays

from muscle.config import DataConfig, ModelSpec
from muscle.teacher_cache import CacheConfig, build_cache, list_teachers, verify_cache
from tiny import FIXTURE_DATA, make_model_dir

DATA = DataConfig(task="piqa", data_dir=str(FIXTURE_DATA), max_examples=8)
# 64-token chunks, one per shard: a dozen units per teacher, so two builds interleave.
CFG = CacheConfig(k=8, chunk_tokens=64, shard_chunks=1, batch_size=4)
TRIALS = 20


def _worker(jobs, results, barrier) -> None:
    """Run build jobs until None: {"out", "name", "base"} and optionally "sync" (start with
    the other worker), "slow_stream" (the stream's writes take a while), "look_mid_stream"
    (take the first look at the cache while its stream is being written), "slow_load" (the
    model load takes a while)."""
    import torch
    from zarr.storage import LocalStore

    import muscle.models
    import muscle.tasks
    from muscle import MuscleError

    torch.set_num_threads(1)
    real_set = LocalStore.set
    real_load, real_fingerprint = muscle.models.load_model, muscle.tasks.dataset_fingerprint

    async def slow_set(self, key, value):
        if key.startswith("stream/"):
            time.sleep(0.05)
        return await real_set(self, key, value)

    def slow_load(*args, **kwargs):  # a big model: seconds between the first look and writing
        time.sleep(2.0)
        return real_load(*args, **kwargs)

    while (job := jobs.get()) is not None:
        LocalStore.set = slow_set if job.get("slow_stream") else real_set
        muscle.models.load_model = slow_load if job.get("slow_load") else real_load
        muscle.tasks.dataset_fingerprint = real_fingerprint
        if job.get("look_mid_stream"):  # the build's last call before its first look

            def fingerprint_mid_stream(*args, out=job["out"], **kwargs):
                deadline = time.monotonic() + 60
                while not _stream_being_written(out) and time.monotonic() < deadline:
                    time.sleep(0.002)
                return real_fingerprint(*args, **kwargs)

            muscle.tasks.dataset_fingerprint = fingerprint_mid_stream
        if job.get("sync"):
            barrier.wait(600)  # both workers start their build at the same moment
        try:
            res = build_cache(
                job["out"], job["name"], ModelSpec(job["base"]), DATA, CFG, progress=False
            )
            results.put((job["name"], "skipped" if res.extra.get("skipped") else "built", ""))
        except MuscleError as e:
            results.put((job["name"], "refused", str(e)))
        except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
            results.put((job["name"], "crashed", f"{type(e).__name__}: {e}"))


def _stream_being_written(root: str) -> bool:
    import json

    try:
        attrs = json.loads((Path(root) / "zarr.json").read_text())["attributes"]
        return attrs["muscle_cache"]["stream_complete"] is False
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "v1": str(make_model_dir(root / "m1", seed=1)),
        "v2": str(make_model_dir(root / "m2", seed=2)),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models) -> dict[str, np.ndarray]:
    """Every array of v1 and v2 built one after the other."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    for name in ("v1", "v2"):
        build_cache(out, name, ModelSpec(models[name]), DATA, CFG, progress=False)
    return cache_arrays(out)


@pytest.fixture(scope="module")
def workers():
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    pool = []
    for _ in range(2):
        jobs, results = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=_worker, args=(jobs, results, barrier), daemon=True)
        p.start()
        pool.append((jobs, results))
    yield pool
    for jobs, _ in pool:
        jobs.put(None)


def _run(workers, *jobs: dict) -> list[tuple[str, str, str]]:
    for (q, _), job in zip(workers, jobs, strict=True):
        q.put(job)
    return [r.get(timeout=600) for _, r in workers]  # generous: a loaded CI box


def _same_arrays(out: Path, reference: dict[str, np.ndarray]) -> None:
    got = cache_arrays(out)
    assert got, out
    for key, arr in got.items():
        want = reference[key]
        assert arr.dtype == want.dtype, key
        assert np.array_equal(arr, want, equal_nan=arr.dtype.kind == "f"), key


@pytest.mark.slow
def test_two_teachers_built_at_once_into_a_new_cache(models, reference, workers, tmp_path):
    t0 = time.monotonic()
    for i in range(TRIALS):
        out = str(tmp_path / f"trial{i}")
        names = ("v1", "v2") if i % 2 == 0 else ("v2", "v1")  # either worker first in line
        got = _run(
            workers, *({"out": out, "name": n, "base": models[n], "sync": True} for n in names)
        )
        assert sorted(got) == [("v1", "built", ""), ("v2", "built", "")], (i, got)
        rep = verify_cache(out)
        assert rep.ok, (i, rep.errors)
        assert list_teachers(out) == ["v1", "v2"]
        _same_arrays(Path(out), reference)
    print(f"{TRIALS} trials in {time.monotonic() - t0:.1f} s")  # the wall time, for the log


@pytest.mark.slow
def test_same_teacher_twice_builds_once(models, reference, workers, tmp_path):
    outcomes = set()
    for i in range(6):
        out = str(tmp_path / f"trial{i}")
        job = {"out": out, "name": "v1", "base": models["v1"], "sync": True}
        got = sorted(_run(workers, job, job), key=lambda r: r[1])
        kinds = [k for _, k, _ in got]
        assert kinds in (["built", "refused"], ["built", "skipped"]), (i, got)
        if kinds[1] == "refused":  # one line naming the holder and what it holds
            msg = got[1][2]
            assert "teacher 'v1'" in msg and "is being written by pid " in msg, msg
            assert "\n" not in msg
        outcomes.add(kinds[1])
        assert verify_cache(out).ok and list_teachers(out) == ["v1"]
        _same_arrays(Path(out), reference)
    assert outcomes  # which of the two happened is up to the scheduler


@pytest.mark.slow
def test_a_stream_being_written_is_not_taken_for_an_interrupted_build(
    models, reference, workers, tmp_path
):
    # v2's build first looks at the cache while v1's stream is being written (the root says
    # stream_complete: false, as after a kill), then loads its (slow) model. By the time it
    # writes, v1 has finished: v2 must add itself to that cache, not discard it.
    out = str(tmp_path / "cache")
    got = _run(
        workers,
        {"out": out, "name": "v1", "base": models["v1"], "sync": True, "slow_stream": True},
        {
            "out": out,
            "name": "v2",
            "base": models["v2"],
            "sync": True,
            "look_mid_stream": True,
            "slow_load": True,
        },
    )
    assert sorted(got) == [("v1", "built", ""), ("v2", "built", "")], got
    assert verify_cache(out).ok
    assert list_teachers(out) == ["v1", "v2"]
    _same_arrays(Path(out), reference)
    assert sorted(os.listdir(out)) == ["stream", "teachers", "zarr.json"]  # locks: beside it
