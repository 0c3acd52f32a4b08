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


def _flock_then_name_late(path: str, ready, release, name_after_s: float, hold: bool) -> None:
    """A holder caught between taking the lock and writing its text (the CI race of stop 18)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    ready.set()
    time.sleep(name_after_s)
    if hold:
        os.pwrite(fd, b'{"pid": %d, "host": "h", "since": "s"}' % os.getpid(), 0)
        release.wait(30)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@pytest.mark.parametrize("hold", [True, False], ids=["names-itself-late", "lets-go-unnamed"])
def test_holder_between_lock_and_text(tmp_path, hold):
    """Refused in the instant before the holder wrote its text, a writer still names the holder
    (hold=True); if the holder lets go meanwhile, the writer takes the lock (hold=False)."""
    lock = tmp_path / ".muscle.lock"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_flock_then_name_late, args=(str(lock), ready, release, 0.3, hold))
    p.start()
    try:
        assert ready.wait(30)
        if hold:
            with pytest.raises(LockHeld) as e:
                with writer_lock(lock, what="test output"):
                    pass
            assert f"pid {p.pid} on h" in str(e.value)
        else:
            with writer_lock(lock, what="test output"):
                assert describe_holder(lock).startswith(f"pid {os.getpid()} on ")
    finally:
        release.set()
        p.join(30)
