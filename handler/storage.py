"""Storage access confined to one root: a local folder (``LocalStorage``) or a bucket prefix.

Inputs are only ever read; outputs are written atomically (a reader sees the old file or the
new one, never half of one). Paths/keys are relative to the root and cannot escape it.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from handler.errors import ImageTooLarge, InputNotFound, InputUnreadable, PathOutsideRoot
from handler.pairs import join_relative


class LocalStorage:
    """A folder on a local or network filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, relative: str) -> Path:
        """The real path of ``relative``; symlinks that lead outside the root are refused."""
        clean = join_relative("", relative)
        real = (self.root / clean).resolve()
        if real != self.root and not real.is_relative_to(self.root):
            raise PathOutsideRoot(f"{relative!r} resolves outside the watched root")
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
        clean = join_relative("", relative)
        target = self.path(posixpath.dirname(clean) or ".") / posixpath.basename(clean)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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
            data = handle.read(max_bytes + 1) if size <= max_bytes else b""
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
