"""Storage access confined to one root: a local folder (``LocalStorage``) or a bucket prefix.

Inputs are only ever read; outputs are written atomically (a reader sees the old file or the
new one, never half of one). Paths/keys are relative to the root and cannot escape it.

A local atomic write goes through ``.NAME.XXXXXXXX.tmp`` beside its target (``XXXXXXXX``:
``tempfile``'s random part); a process killed mid-write leaves it behind, and
``remove_stale_temporaries`` is what clears those up when a watcher starts.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from handler.errors import ImageTooLarge, InputNotFound, InputUnreadable, PathOutsideRoot
from handler.logs import get_logger
from handler.pairs import (
    DIFF_SUFFIX,
    NAME_MAX_BYTES,
    RESULT_SUFFIX,
    encoded_size,
    is_ignored_name,
    is_output_name,
    join_relative,
    truncate_to_bytes,
)

#: ``tempfile.mkstemp`` puts this many random characters between prefix and suffix.
_TEMP_RANDOM_CHARS = 8
_TEMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(rf"\.(?P<name>.+)\.[a-z0-9_]{{{_TEMP_RANDOM_CHARS}}}\.tmp", re.DOTALL)
#: Reads of a file that grows while it is read.
_CHUNK = 1024 * 1024
#: A write takes milliseconds; a temporary this old belongs to a process that died mid-write.
STALE_TEMPORARY_S = 600.0


class LocalStorage:
    """A folder on a local or network filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, relative: str) -> Path:
        """The real path of ``relative``; symlinks that lead outside the root are refused.

        So are names ``check_name`` refuses (``UnsupportedName``), except for pairwatch's own
        outputs: the error result of a folder named ``new\\nline`` is written, and found
        again, inside it, where its user looks for it.
        """
        return self._real(self._clean(relative), relative)

    def _clean(self, relative: str) -> str:
        return join_relative("", relative, check_names=not is_output_name(relative))

    def _real(self, clean: str, label: str) -> Path:
        try:
            real = (self.root / clean).resolve()
        except RuntimeError:  # Python < 3.13 reports a symlink loop so, not as an OSError
            raise InputUnreadable(f"{label}: symlink loop") from None
        except OSError as exc:
            raise InputUnreadable(f"{label}: {exc.strerror or exc}") from None
        if real != self.root and not real.is_relative_to(self.root):
            raise PathOutsideRoot(f"{label!r} resolves outside the watched root")
        return real

    def relative(self, path: Path) -> str:
        """``path`` (inside the root) as a POSIX path relative to the root."""
        return Path(os.path.abspath(path)).relative_to(self.root).as_posix()

    def read(self, relative: str, max_bytes: int) -> bytes:
        return read_file(self.path(relative), max_bytes, label=relative)

    def list_names(self, folder: str) -> list[str]:
        """Sorted names of the non-folder entries directly in ``folder`` ("" is the root).

        A folder that vanished lists as empty: whatever was in it is no longer a pair.
        """
        base = self.path(folder) if folder else self.root
        try:
            with os.scandir(base) as entries:
                return sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except PermissionError:
            raise InputUnreadable(f"{folder or '.'}: permission denied") from None
        except OSError as exc:
            raise InputUnreadable(f"{folder or '.'}: {exc.strerror or exc}") from None

    def landed_at(self, relative: str) -> float:
        """When ``relative`` arrived, as a Unix time: its inode change time, which copying tools
        (``cp -p``, ``rsync -a``) cannot back-date the way they back-date mtime."""
        try:
            return self.path(relative).stat().st_ctime
        except FileNotFoundError:
            raise InputNotFound(f"{relative} does not exist (vanished?)") from None
        except OSError as exc:
            raise InputUnreadable(f"{relative}: {exc.strerror or exc}") from None

    def write_atomic(self, relative: str, data: bytes) -> Path:
        """Write via a hidden temporary file in the same folder, fsync, then rename over.

        Only the folder is resolved: a symlink planted under the output's name is replaced,
        never followed (it could point at an input, or outside the root).
        """
        clean = self._clean(relative)
        folder = self._real(posixpath.dirname(clean) or ".", relative)
        target = folder / posixpath.basename(clean)
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=_temporary_prefix(target.name), suffix=_TEMP_SUFFIX
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


def _temporary_prefix(name: str) -> str:
    """``.NAME.``, NAME cut so that the whole temporary name fits in NAME_MAX_BYTES.

    A target name may itself be up to 255 bytes, and the temporary is 14 bytes longer. An
    output suffix (``.result.json``, ``.diff.png``) survives the cut, so that a shortened
    temporary is still recognised as pairwatch's own by ``remove_stale_temporaries``.
    """
    budget = NAME_MAX_BYTES - len("..") - _TEMP_RANDOM_CHARS - len(_TEMP_SUFFIX)
    if encoded_size(name) > budget:
        kept = next((s for s in (RESULT_SUFFIX, DIFF_SUFFIX) if name.endswith(s)), "")
        head = name[: len(name) - len(kept)]
        name = truncate_to_bytes(head, budget - encoded_size(kept)) + kept
    return f".{name}."


def is_own_temporary(name: str) -> bool:
    """A temporary ``write_atomic`` leaves behind when killed: ``.OUTPUT.XXXXXXXX.tmp``, where
    OUTPUT is a result or diff image name. Other hidden ``*.tmp`` files are not ours to touch."""
    match = _TEMPORARY.fullmatch(name)
    return match is not None and is_output_name(match["name"])


def remove_stale_temporaries(root: Path, older_than_s: float = STALE_TEMPORARY_S) -> list[Path]:
    """Delete pairwatch's own temporaries under ``root`` last written over ``older_than_s`` ago.

    Run when a watcher starts: a ``kill -9`` mid-write would otherwise leave them forever.
    Only regular files that match ``is_own_temporary`` are removed; hidden folders (never
    written into) and symlinked folders (possibly outside ``root``) are not entered. Each
    removal is logged (``stale_temporary_removed``); a failure is logged and skipped.
    """
    log = get_logger(root=str(root))
    cutoff = time.time() - older_than_s
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]
        for name in filenames:
            if not is_own_temporary(name):
                continue
            path = Path(dirpath, name)
            try:
                status = path.lstat()
                if not stat.S_ISREG(status.st_mode) or status.st_mtime > cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue  # another process cleared it first
            except OSError as exc:
                log.warning("stale_temporary_unremovable", path=str(path), error=exc.strerror)
                continue
            age_s = round(time.time() - status.st_mtime, 1)
            log.info("stale_temporary_removed", path=str(path), bytes=status.st_size, age_s=age_s)
            removed.append(path)
    return removed


def read_file(path: Path, max_bytes: int, *, label: str | None = None) -> bytes:
    """Read a whole input file, mapping OS failures onto per-pair errors."""
    label = label or str(path)
    try:
        # O_NONBLOCK: opening a FIFO planted under an image's name must not wait for a writer.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            status = os.fstat(handle.fileno())
            if stat.S_ISDIR(status.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(status.st_mode):
                raise InputUnreadable(f"{label} is not a regular file")
            size = status.st_size
            data = _read_all(handle, size, max_bytes) if size <= max_bytes else b""
    except FileNotFoundError:
        raise InputNotFound(f"{label} does not exist (vanished?)") from None
    except IsADirectoryError:
        raise InputUnreadable(f"{label} is a folder, not a file") from None
    except PermissionError:
        raise InputUnreadable(f"{label}: permission denied") from None
    except OSError as exc:
        raise InputUnreadable(f"{label}: {exc.strerror or exc}") from None
    if size > max_bytes or len(data) > max_bytes:
        raise ImageTooLarge(f"{label} is over the limit of {max_bytes} bytes")
    return data


def _read_all(handle: BinaryIO, size: int, max_bytes: int) -> bytes:
    """The file's bytes, at most ``max_bytes`` + 1 (a file that grew past the limit).

    Asked for by its size: ``read(max_bytes + 1)`` would allocate a buffer of the whole limit
    (512 MB) for every file, and glibc, once such a block is freed, raises its mmap threshold
    and keeps later image-sized blocks in its heaps (measured: ~70 MB more peak RSS in a
    folder run). A file that grew since its size was taken is read on in chunks.
    """
    data = handle.read(size + 1)
    if len(data) <= size:
        return data
    chunks = [data]
    total = len(data)
    while total <= max_bytes and (chunk := handle.read(min(_CHUNK, max_bytes + 1 - total))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


class PairStorage(Protocol):
    """What a job needs from where the pairs live; paths are POSIX, relative to the root.

    Failures of the pair (missing, unreadable, outside the root) raise ``PairError``; failures
    of the moment (throttling, an unreachable endpoint) raise ``StorageUnavailable``.
    """

    def read(self, relative: str, max_bytes: int) -> bytes:
        """The whole file; ``PairError`` (``InputNotFound``, ``PathOutsideRoot``...) otherwise."""
        ...

    def write_atomic(self, relative: str, data: bytes) -> object:
        """Replace ``relative`` so that readers see the old file or the new one, never half."""
        ...

    def list_names(self, folder: str) -> list[str]:
        """Sorted file names directly in ``folder`` ("" is the root); [] if it is gone."""
        ...

    def landed_at(self, relative: str) -> float:
        """Unix time ``relative`` arrived (a lone image's partner is awaited from then)."""
        ...


@runtime_checkable
class VersionedStorage(Protocol):
    """A storage whose files carry a version tag (S3's ETag), recorded in results."""

    def etag(self, relative: str) -> str | None: ...


@runtime_checkable
class HashingStorage(Protocol):
    """A storage that hashes what it reads as it streams in (a bucket's body, chunk by chunk),
    so the pipeline need not hash the bytes again."""

    def digest(self, relative: str) -> str | None:
        """The sha256 of what the last ``read`` of ``relative`` returned (None: not read)."""
        ...
