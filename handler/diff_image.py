"""Diff image: A and B side by side with the changed regions boxed (placeholder, see issue 7)."""

from __future__ import annotations

import io

from PIL import Image

from handler.images import PreparedImage
from handler.result import ComparisonResult


def render_diff(a: PreparedImage, b: PreparedImage, result: ComparisonResult) -> bytes:
    del result
    canvas = Image.new("RGB", (a.size[0] + b.size[0], max(a.size[1], b.size[1])), "white")
    canvas.paste(a.image, (0, 0))
    canvas.paste(b.image, (a.size[0], 0))
    out = io.BytesIO()
    canvas.save(out, "PNG")
    return out.getvalue()
