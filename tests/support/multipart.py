"""A ``multipart/form-data`` body written by hand, for raw-socket clients of ``pairwatch serve``
(a well-behaved library would not send it slowly, stop half-way or use any boundary)."""

from __future__ import annotations


def form_body(a: bytes, b: bytes, boundary: str, **fields: str) -> bytes:
    """Files ``a`` and ``b`` (``a.jpg``, ``b.jpg``) after the text ``fields``."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for name, data in (("a", a), ("b", b)):
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{name}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()
