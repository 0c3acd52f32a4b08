"""Writer locks (muscle.locking): a second writer is refused naming the holder; a dead holder's
lock is taken over; wait=True blocks until the holder is done."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from muscle.locking import LockHeld, describe_holder, writer_lock


def _hold(path: str, ready, release) -> None:
    with writer_lock(path, what="test output"):
        ready.set()
        release.wait(30)


def _hold_forever(path: str, ready) -> None:
    with writer_lock(path, what="test output"):
        ready.set()
        time.sleep(60)


def test_second_writer_is_refused_with_holder(tmp_path):
    lock = tmp_path / ".muscle.lock"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(lock), ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockHeld) as e:
            with writer_lock(lock, what="test output"):
                pass
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and "test output" in msg and "\n" not in msg
        assert describe_holder(lock).startswith(f"pid {p.pid} on ")
    finally:
        release.set()
        p.join(30)
    with writer_lock(lock, what="test output"):  # free again once the holder is done
        pass


def test_killed_holder_lock_is_taken_over(tmp_path):
    lock = tmp_path / "sub" / ".muscle.lock"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_forever, args=(str(lock), ready))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with writer_lock(lock, what="test output"):  # no stale lock left behind
        assert describe_holder(lock).startswith(f"pid {os.getpid()} on ")


def test_wait_blocks_until_released(tmp_path):
    lock = tmp_path / ".muscle.lock"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(lock), ready, release))
    p.start()
    assert ready.wait(30)
    t0 = time.monotonic()
    ctx_timer = ctx.Process(target=lambda: (time.sleep(0.5), release.set()))
    ctx_timer.start()
    with writer_lock(lock, what="test output", wait=True):
        waited = time.monotonic() - t0
    p.join(30)
    ctx_timer.join(30)
    assert waited >= 0.4  # it did wait for the holder, not barge in
