"""Hand-built PNG files whose header says what a test needs, whatever their pixels are."""

from __future__ import annotations

import struct
import zlib


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_claiming(width: int, height: int, idat: bytes = b"", *, end: bool = False) -> bytes:
    """An 8-bit RGB PNG whose IHDR claims ``width`` x ``height``, followed by ``idat`` as its
    only data chunk (junk, or nothing, to stand for a bomb or a truncated file), then IEND
    when ``end``: header checks must reject or accept it before anything is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + chunks + (png_chunk(b"IEND", b"") if end else b"")


def png_header_only(width: int, height: int) -> bytes:
    """A complete, valid PNG announcing ``width`` x ``height`` whose one data chunk holds only
    a few pixels' worth: a decompression bomb's header, rejected (or not) before decoding."""
    return png_claiming(width, height, zlib.compress(b"\0" * 64), end=True)


def flat_png(width: int, height: int, grey: int = 0) -> bytes:
    """A valid 8-bit RGB PNG of one flat colour: ``width`` x ``height`` pixels (196 MP are
    ~0.6 MB and ~2 s to make) that decode, compare and shrink at full cost, like a huge
    screenshot, without a huge file."""
    deflate = zlib.compressobj(6)
    row = b"\0" + bytes([grey]) * (width * 3)  # filter type 0, then the pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
