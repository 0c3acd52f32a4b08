"""Writer locks: two processes never write one output at once.

Every output that a second process could write at the same time (a cache root, one teacher of
a cache, a training run directory, a predictions file) is guarded by a lock file beside it.
The lock is an advisory ``fcntl.flock`` on that file, so the kernel releases it when its holder
dies, however it dies (SIGKILL included): a stale lock never needs to be broken by hand, and
the next writer takes it over at once. The file's text names the holder (pid, host, since) so
that a refused writer can say who holds it.

    with writer_lock(run_dir / ".muscle.lock", what="training run runs/piqa/v1"):
        ...  # write

``wait=False`` (the default) refuses at once with a :class:`LockHeld` error (a MuscleError: one
line, exit 2) naming the holder; ``wait=True`` blocks until the holder is done, which is what
short critical sections (creating a cache root both teacher builds need) want.

Locks are per host for network file systems without flock support; that is documented, not
worked around.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from muscle import MuscleError

LOCK_NAME = ".muscle.lock"


class LockHeld(MuscleError):
    """Another live process holds the writer lock of an output."""


def _holder_text() -> str:
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})


def describe_holder(path: Path) -> str | None:
    """'pid 123 on host h since 2026-...' from a lock file's text; None while it is empty."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


# A holder writes its text just after it takes the lock and clears it just before it lets go,
# so a refused writer can look in between and find the file empty. It looks again for this long
# (and takes the lock if it was let go meanwhile) before it names "another process".
_HOLDER_TEXT_WAIT_S = 2.0


def _take(fd: int, path: Path, *, what: str, wait: bool) -> None:
    if wait:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + _HOLDER_TEXT_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = describe_holder(path)
            if holder is None and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise LockHeld(
                f"{what} is being written by {holder or 'another process'} ({path}); wait "
                "for it to finish, or write elsewhere"
            ) from None


@contextmanager
def writer_lock(path: str | Path, *, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` body.

    ``what`` names the guarded output in the refusal ("cache teacher v1 in cache/piqa").
    The lock file itself is left in place afterwards: deleting it would race with a waiter
    that has already opened it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, path, what=what, wait=wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the holder text only while it is held
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def wait_for_lock(path: str | Path, *, poll_s: float = 0.05, timeout_s: float = 60.0) -> None:
    """Block until nobody holds ``path`` (test helper for ordering two writers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                time.sleep(poll_s)
    raise TimeoutError(f"{path} still locked after {timeout_s} s")
