"""Pair storage on S3 (or any S3-compatible store), confined to one bucket and key prefix.

It satisfies ``handler.jobs.PairStorage``, so S3 pairs follow exactly the rules of local pairs.
What differs from a folder, and is handled here:

* Inputs are HEADed first: the ``ContentLength`` is checked against the byte limit before a
  single byte is downloaded, and the GET carries ``If-Match`` on the HEAD's ETag, so what is
  compared is exactly the version whose ETag the result records. Bodies are streamed into
  memory in chunks (never into temp files), hashed (sha256) as they arrive (``digest``), and
  cut off at the limit whatever the server claims.
* A result the credentials may not write (``AccessDenied``) raises ``PermissionError``, as a
  local folder's does: final for the pair (see ``handler.jobs``), never compared again and
  again. Results are written with a conditional PUT: ``If-None-Match: *`` where no result was seen,
  ``If-Match`` on the seen result's ETag otherwise. Two workers racing on one pair therefore
  cannot both write; the loser gets ``ResultConflict`` and treats the pair as done.
* Errors are translated here, at the edge: missing and forbidden objects become ``PairError``s
  (an error result); throttling, 5xx, timeouts and unreachable endpoints (``BotoCoreError``)
  become ``StorageUnavailable`` (the unit of work is retried), never a bare botocore error.
* Outputs (results, diff images) may live elsewhere: ``output_bucket`` and/or ``output_prefix``
  (the output key is ``output_prefix + input key``).
* Keys are checked before any request: ``..``/``.``/empty segments, a leading ``/`` and control
  characters are refused with ``PathOutsideRoot``.
* Within a pair's deadline (``handler.deadline``) every request is bounded by it
  (``handler.aws_clients``: each attempt's read timeout is what is left of it) and so is a
  body being read (checked between chunks), so a store that trickles or stalls stops the pair
  with ``timeout`` in its stage instead of holding it.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from handler.deadline import current
from handler.errors import (
    BucketRefused,
    ImageTooLarge,
    InputNotFound,
    InputUnreadable,
    ResultConflict,
    StorageUnavailable,
)
from handler.events import normalise_etag
from handler.images import check_pixels, header_dimensions
from handler.pairs import check_key, is_output_name, normalise_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Bodies are read in chunks of this size: the pair's deadline is checked between two.
CHUNK_BYTES = 256 * 1024
#: Objects larger than this get their image header read (a ranged GET of PROBE_BYTES) and
#: checked against the pixel budget before the download; smaller ones are simply downloaded.
PROBE_MIN_BYTES = 1024 * 1024
PROBE_BYTES = 64 * 1024
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
#: The event's own bucket is missing or unusable: the event is refused, there is no pair. (A
#: missing output bucket is the deployment's problem: its results are unwritable, retried.)
_NO_BUCKET = frozenset({"NoSuchBucket", "InvalidBucketName"})
_DENIED = frozenset({"403", "AccessDenied", "Forbidden", "AllAccessDisabled"})
_PRECONDITION = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict"})
_CONTENT_TYPES = {".json": "application/json", ".png": "image/png"}


__all__ = [
    "ObjectChanged",
    "ResultConflict",
    "S3Storage",
    "StorageUnavailable",
    "check_key",
    "normalise_prefix",
]


class ObjectChanged(StorageUnavailable):
    """An input was replaced between its HEAD and its GET: retried, the new version is read."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    last_modified: datetime | None


def error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status or "")


def _status(exc: ClientError) -> str:
    return str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _is(exc: ClientError, codes: frozenset[str]) -> bool:
    return error_code(exc) in codes or _status(exc) in codes


class S3Storage:
    """``bucket``/``prefix`` as a pair root. One instance per job: it remembers HEADs and the
    ETags of results it read, which is what makes its result writes conditional."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        output_bucket: str | None = None,
        output_prefix: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.client = client
        self.max_pixels = max_pixels
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.output_bucket = output_bucket or bucket
        self.output_prefix = normalise_prefix(output_prefix)
        self._heads: dict[str, ObjectInfo] = {}
        self._listings: dict[str, list[str]] = {}
        #: Result key -> ETag seen when read (None: seen absent). Drives conditional writes.
        self._seen_results: dict[str, str | None] = {}
        #: Input key -> sha256 of the body last read.
        self._digests: dict[str, str] = {}

    # --- addressing ------------------------------------------------------------------------

    def key(self, relative: str) -> str:
        """The input key of ``relative`` (checked)."""
        return self.prefix + check_key(relative)

    def relative(self, key: str) -> str | None:
        """``key`` relative to the root, or None when it is not under the root."""
        if not key.startswith(self.prefix) or key == self.prefix:
            return None
        return key[len(self.prefix) :]

    def location(self, relative: str) -> tuple[str, str]:
        """(bucket, key) where ``relative`` lives: outputs may be redirected."""
        key = self.key(relative)
        if is_output_name(relative):
            return self.output_bucket, self.output_prefix + key
        return self.bucket, key

    def is_own_output(self, bucket: str, key: str) -> bool:
        """Is ``bucket/key`` something this handler writes (recursion guard)?"""
        if is_output_name(key):
            return True
        return bool(self.output_prefix) and (
            bucket == self.output_bucket and key.startswith(self.output_prefix)
        )

    # --- PairStorage -----------------------------------------------------------------------

    def head(self, relative: str) -> ObjectInfo:
        """HEAD ``relative`` once per instance (size, ETag, LastModified)."""
        bucket, key = self.location(relative)
        cached = self._heads.get(key)
        if cached is not None:
            return cached
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise self._error(exc, relative, bucket) from None
        except BotoCoreError as exc:
            raise _unreachable(exc, relative) from None
        info = ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            etag=normalise_etag(response.get("ETag")),
            last_modified=response.get("LastModified"),
        )
        self._heads[key] = info
        return info

    def etag(self, relative: str) -> str | None:
        return self.head(relative).etag

    def digest(self, relative: str) -> str | None:
        return self._digests.get(self.key(relative))

    def landed_at(self, relative: str) -> float:
        modified = self.head(relative).last_modified
        if modified is None:
            raise InputUnreadable(f"{relative}: the store reports no LastModified")
        return modified.timestamp()

    def read(self, relative: str, max_bytes: int) -> bytes:
        """The object's bytes, at most ``max_bytes`` (``ImageTooLarge`` before downloading)."""
        if is_output_name(relative):
            return self._read_output(relative, max_bytes)
        info = self.head(relative)
        if info.size > max_bytes:
            raise ImageTooLarge(
                f"{relative} is {info.size} bytes, over the limit of {max_bytes}; not downloaded"
            )
        if self.max_pixels is not None and info.size > PROBE_MIN_BYTES:
            self._check_header(info, relative, self.max_pixels)
        try:
            if info.etag:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=info.key, IfMatch=f'"{info.etag}"'
                )
            else:
                response = self.client.get_object(Bucket=self.bucket, Key=info.key)
        except ClientError as exc:
            if _is(exc, _PRECONDITION):
                raise ObjectChanged(f"{relative} changed while being read") from None
            raise self._error(exc, relative) from None
        except BotoCoreError as exc:
            raise _unreachable(exc, relative) from None
        hasher = hashlib.sha256()
        data = _drain(response, relative, max_bytes, hasher)
        self._digests[info.key] = hasher.hexdigest()
        return data

    def _check_header(self, info: ObjectInfo, relative: str, max_pixels: int) -> None:
        """Read the first ``PROBE_BYTES`` and refuse an image whose header dimensions are over
        ``max_pixels`` before downloading the rest (a bomb need not be small in bytes)."""
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=info.key, Range=f"bytes=0-{PROBE_BYTES - 1}"
            )
        except ClientError as exc:
            raise self._error(exc, relative) from None
        except BotoCoreError as exc:
            raise _unreachable(exc, relative) from None
        dimensions = header_dimensions(_drain(response, relative, PROBE_BYTES))
        if dimensions is not None:
            check_pixels(*dimensions, max_pixels)

    def _read_output(self, relative: str, max_bytes: int) -> bytes:
        bucket, key = self.location(relative)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is(exc, _NOT_FOUND):
                self._seen_results[key] = None
            raise self._error(exc, relative, bucket) from None
        except BotoCoreError as exc:
            raise _unreachable(exc, relative) from None
        self._seen_results[key] = normalise_etag(response.get("ETag"))
        return _drain(response, relative, max_bytes)

    def write_atomic(self, relative: str, data: bytes) -> str:
        """PUT (atomic on S3). A result already read through this instance is replaced only if
        it is still the version read; one seen absent is created only if still absent."""
        bucket, key = self.location(relative)
        content_type = _CONTENT_TYPES.get(posixpath.splitext(key)[1].lower(), "")
        content_type = content_type or "application/octet-stream"
        try:
            if key in self._seen_results:
                seen = self._seen_results[key]
                if seen is None:
                    self.client.put_object(
                        Bucket=bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*"
                    )
                else:
                    self.client.put_object(
                        Bucket=bucket,
                        Key=key,
                        Body=data,
                        ContentType=content_type,
                        IfMatch=f'"{seen}"',
                    )
            else:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except ClientError as exc:
            if _is(exc, _PRECONDITION):
                raise ResultConflict(f"{key}: another worker wrote it first") from None
            reason = f"cannot write s3://{bucket}/{key}: {error_code(exc)}"
            if _is(exc, _DENIED):
                # As a local folder's: the job treats it as final for the pair (no re-compare).
                raise PermissionError(reason) from None
            raise StorageUnavailable(reason) from None
        except BotoCoreError as exc:
            raise _unreachable(exc, relative) from None
        return key

    def list_names(self, folder: str) -> list[str]:
        """Sorted object names directly under ``folder`` (no "sub-folders"); listed once per
        instance, like the HEADs, since an instance serves one job."""
        if folder not in self._listings:
            self._listings[folder] = self._list(folder)
        return self._listings[folder]

    def _list(self, folder: str) -> list[str]:
        base = self.key(folder).rstrip("/") + "/" if folder else self.prefix
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                for item in page.get("Contents", []):
                    name = item["Key"][len(base) :]
                    if name:
                        names.append(name)
        except ClientError as exc:
            raise self._error(exc, folder or ".") from None
        except BotoCoreError as exc:
            raise _unreachable(exc, folder or ".") from None
        return sorted(names)

    def _error(self, exc: ClientError, relative: str, bucket: str | None = None) -> Exception:
        """The pair error (or refusal) for a failed request about ``relative`` in ``bucket``
        (default: the input bucket)."""
        if (bucket or self.bucket) == self.bucket and error_code(exc) in _NO_BUCKET:
            return BucketRefused(f"bucket {self.bucket!r}: {error_code(exc)}")
        if _is(exc, _NOT_FOUND):
            return InputNotFound(f"{relative} does not exist in the bucket")
        if _is(exc, _DENIED):
            return InputUnreadable(f"{relative}: access denied")
        # Throttling, 5xx: transient, the unit of work is retried.
        return StorageUnavailable(f"{relative}: {error_code(exc)} ({exc})")


def _unreachable(exc: BotoCoreError, relative: str) -> Exception:
    """Timeouts, refused or reset connections (after the client's bounded attempts); a timeout
    that the pair's deadline cut short is the pair's ``timeout``."""
    deadline = current()
    if deadline is not None and deadline.expired():
        return deadline.timeout(f"the object store did not answer for {relative}")
    return StorageUnavailable(f"{relative}: {type(exc).__name__}: {exc}")


def _drain(response: Any, relative: str, max_bytes: int, hasher: Any = None) -> bytes:
    """Read a GET body in chunks, refusing more than ``max_bytes`` whatever the headers said;
    ``hasher`` (a ``hashlib`` object) is fed each chunk as it arrives."""
    declared = int(response.get("ContentLength", 0) or 0)
    body = response["Body"]
    try:
        if declared > max_bytes:
            raise ImageTooLarge(f"{relative} is {declared} bytes, over the limit of {max_bytes}")
        chunks: list[bytes] = []
        total = 0
        deadline = current()
        while True:
            if deadline is not None:
                deadline.check()  # (each read waits at most the request's bounded read timeout)
            chunk = body.read(CHUNK_BYTES)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageTooLarge(f"{relative} is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
            if hasher is not None:
                hasher.update(chunk)
        return b"".join(chunks)
    except BotoCoreError as exc:  # the body stalled or the connection dropped mid-read
        raise _unreachable(exc, relative) from None
    finally:
        body.close()
