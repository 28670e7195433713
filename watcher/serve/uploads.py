"""Streaming multipart uploads for ``pairwatch serve``, held in memory only and capped per file.

Starlette's own form parser spools files over 1 MB to temporary files and reads the whole body
before the endpoint sees it. This one feeds the body to ``python-multipart`` chunk by chunk as it
arrives and stops at the first byte past ``max_file_bytes`` (``UploadTooLarge``), so the rest of
an oversized upload is never read. Once a file's first ``HEADER_BYTES`` are in, its header
dimensions are checked against the pixel budget: a decompression bomb's body is not kept. Each
file is hashed (sha256) as it streams in, so the pipeline need not hash it again.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from handler.errors import PairError
from handler.images import check_pixels, header_dimensions

#: Enough for the frame header of nearly every image (a JPEG's can sit behind EXIF/ICC data;
#: those are still checked from the header by ``prepare`` before decoding).
HEADER_BYTES = 64 * 1024
#: Form fields (``config``, ``pair_id``, the original API's settings) are small text.
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
#: A file name longer than this is cut: it only labels the input in the result.
MAX_NAME_CHARS = 200


class UploadTooLarge(Exception):
    """A part passed its cap; nothing after that byte was read."""

    def __init__(self, field_name: str, limit: int) -> None:
        super().__init__(f"{field_name!r} is larger than the limit of {limit} bytes")
        self.field_name = field_name
        self.limit = limit
        #: Body bytes read from the connection when the cap was passed (set by ``read_upload``).
        self.bytes_read = 0


class MalformedUpload(Exception):
    """Not a multipart form this server can read (no boundary, broken framing, bad fields)."""


class TooManyFiles(MalformedUpload):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} files in the form")
        self.limit = limit


@dataclass
class UploadedFile:
    """One file part. ``error`` is set (and ``data`` dropped) when its header was refused."""

    field_name: str
    filename: str
    data: bytearray = field(default_factory=bytearray)
    size: int = 0
    error: PairError | None = None
    #: Fed with every byte kept in ``data``, as it arrives.
    hasher: Any = field(default_factory=hashlib.sha256)

    @property
    def sha256(self) -> str:
        return str(self.hasher.hexdigest())


@dataclass
class Upload:
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    #: Body bytes read from the connection (for the log line of a refused upload).
    bytes_read: int = 0


def safe_filename(raw: str, fallback: str) -> str:
    """The last path segment of a client's file name, without control characters, cut short:
    it only labels an input in the result and the logs, and is never used as a path."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return cleaned[:MAX_NAME_CHARS] or fallback


class _FormReader:
    """``python-multipart`` callbacks that collect parts into an ``Upload`` under the caps."""

    def __init__(self, max_file_bytes: int, max_files: int, max_pixels: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.max_pixels = max_pixels
        self.upload = Upload()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._file: UploadedFile | None = None
        self._field_name = ""
        self._field = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._file = None
        self._field = bytearray()

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = _decode(options.get(b"name"), "a part without a name")
        if b"filename" in options:
            if len(self.upload.files) >= self.max_files:
                raise TooManyFiles(self.max_files)
            filename = _decode(options[b"filename"], "a file name")
            self._file = UploadedFile(name, filename)
            self.upload.files.append(self._file)
        else:
            if len(self.upload.fields) >= MAX_FIELDS:
                raise MalformedUpload(f"more than {MAX_FIELDS} form fields")
            self._field_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        part = self._file
        if part is None:
            if len(self._field) + len(chunk) > MAX_FIELD_BYTES:
                raise UploadTooLarge(self._field_name, MAX_FIELD_BYTES)
            self._field.extend(chunk)
            return
        part.size += len(chunk)
        if part.size > self.max_file_bytes:
            raise UploadTooLarge(part.field_name, self.max_file_bytes)
        if part.error is not None:
            return  # refused from its header: the rest is counted, not kept
        before = len(part.data)
        part.data.extend(chunk)
        part.hasher.update(chunk)
        if before < HEADER_BYTES <= len(part.data):
            self._check_header(part)

    def _check_header(self, part: UploadedFile) -> None:
        dimensions = header_dimensions(bytes(part.data[:HEADER_BYTES]))
        if dimensions is None:
            return  # not enough to tell: ``prepare`` checks the header before decoding
        try:
            check_pixels(*dimensions, self.max_pixels)
        except PairError as exc:
            part.error = exc
            part.data = bytearray()

    def _part_end(self) -> None:
        if self._file is None:
            self.upload.fields[self._field_name] = _decode(bytes(self._field), "a form field")
        self._file = None


def _decode(raw: bytes | None, what: str) -> str:
    if raw is None:
        raise MalformedUpload(f"{what} is missing")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedUpload(f"{what} is not UTF-8") from None


async def read_upload(
    content_type: str,
    body: AsyncIterator[bytes],
    *,
    max_file_bytes: int,
    max_files: int,
    max_pixels: int,
) -> Upload:
    """Parse a ``multipart/form-data`` body as it streams in.

    Raises ``UploadTooLarge`` as soon as a part passes its cap (the rest of the body is left
    unread), ``MalformedUpload`` for anything that is not a readable form. What a client's
    disconnect raises (Starlette's ``ClientDisconnect``) passes through.
    """
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise MalformedUpload("the body must be multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedUpload("multipart/form-data without a boundary")
    reader = _FormReader(max_file_bytes, max_files, max_pixels)
    try:
        # (The parser refuses some boundaries itself: over 256 characters, for one.)
        parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
        async for chunk in body:
            reader.upload.bytes_read += len(chunk)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:  # every python-multipart failure (MultipartParseError...)
        raise MalformedUpload(f"broken multipart body: {exc}") from None
    except UploadTooLarge as exc:
        exc.bytes_read = reader.upload.bytes_read
        raise
    return reader.upload
