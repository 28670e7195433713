"""The same pair is never run twice at once: in this process, nor (locally) across processes.

``pair_lock`` is taken by ``handler.jobs`` around everything that reads and writes one pair's
result; under it the job checks the result again, so the second of two jobs of one pair finds
it up to date and each pair is compared once.

* In-process (threads of one runner, the Lambda's batch pool): a keyed lock the second job
  *waits* for. The holder is a sibling thread whose pair is bounded by its own timeouts, and
  waiting costs nothing else, whereas a retry would cost a redelivery (on SQS one of the
  message's ``maxReceiveCount``) when two events of one pair (its two images) are in flight.
* ``LocalStorage``: a non-blocking ``fcntl.flock`` on a hidden ``.NAME.lock`` beside the
  result: a pair in hand in another process is "busy" and the job answers ``retry`` soon
  instead of holding a worker slot for another process's pair. So two
  ``pairwatch watch`` processes on one folder (or one on each of two machines sharing a local
  filesystem) do not compare a pair twice. Dot-files are ignored by the watchers, so the lock
  files never trigger anything. They are unlinked on release; the unlink race (another process
  opened the old file and locks it after we unlinked it) is closed by checking, once locked,
  that the path still names the locked file, and starting over when it does not.
* Object stores need no lock file: their conditional result writes (``ResultConflict``) already
  let only one of two racing workers write.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from handler.errors import PairError
from handler.storage import LocalStorage

#: Linux file names are at most 255 bytes; a lock name that would not fit is hashed.
_MAX_NAME_BYTES = 255
_LOCK_SUFFIX = ".lock"

#: (root, result path) -> its lock and how many jobs hold or wait for it.
_locks: dict[tuple[str, str], tuple[threading.Lock, list[int]]] = {}
_locks_guard = threading.Lock()


def lock_name(result_path: str) -> str:
    """The hidden lock file beside ``result_path``: ``a/result.json`` -> ``a/.result.json.lock``."""
    folder, name = posixpath.split(result_path)
    candidate = f".{name}{_LOCK_SUFFIX}"
    if len(candidate.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        candidate = f".{digest}{_LOCK_SUFFIX}"
    return posixpath.join(folder, candidate)


def _scope(storage: object) -> str:
    if isinstance(storage, LocalStorage):
        return str(storage.root)
    bucket, prefix = getattr(storage, "bucket", None), getattr(storage, "prefix", "")
    return f"s3://{bucket}/{prefix}" if bucket is not None else f"id:{id(storage)}"


@contextmanager
def pair_lock(storage: object, result_path: str) -> Iterator[bool]:
    """Hold ``result_path``'s pair for the block (waiting for another thread of this process
    that holds it); yields False (held nothing) when another process holds it."""
    key = (_scope(storage), result_path)
    with _locks_guard:
        lock, users = _locks.setdefault(key, (threading.Lock(), [0]))
        users[0] += 1
    try:
        with lock:
            if isinstance(storage, LocalStorage):
                with _file_lock(storage, result_path) as locked:
                    yield locked
            else:
                yield True
    finally:
        with _locks_guard:
            users[0] -= 1
            if not users[0]:
                del _locks[key]


@contextmanager
def _file_lock(storage: LocalStorage, result_path: str) -> Iterator[bool]:
    try:
        relative = lock_name(result_path)
        folder = posixpath.dirname(relative)
        base = storage.path(folder) if folder else storage.root
        path = os.path.join(base, posixpath.basename(relative))
    except (PairError, OSError, RuntimeError):
        yield True  # the folder is gone or unusable: the job meets that and reports it
        return
    busy, fd = _acquire(path)
    if busy:
        yield False
        return
    try:
        yield True
    finally:
        if fd is not None:
            with suppress(OSError):
                os.unlink(path)  # still ours: checked when locked, and only holders unlink it
            os.close(fd)  # releases the flock


def _acquire(path: str) -> tuple[bool, int | None]:
    """(busy, locked descriptor). The descriptor is None when no lock file can be made here
    (a read-only share, a folder that vanished): the pair then runs without the cross-process
    lock, as it would have before locks existed, and its own result write meets the problem."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:
            return False, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return True, None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return False, fd
        os.close(fd)  # unlinked by its previous holder between our open and our lock: again
