"""The Python API for code that embeds pairwatch (tests, notebooks, pipelines): one call.

``compare_files`` runs the pipeline ``pairwatch compare`` runs (the CLI calls it), so an
embedder gets the same result JSON, the same limits and the same error types as every other
entry point, without a watcher, a server or a subprocess.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TypeAlias

from handler.compare import create_comparator
from handler.config import ComparisonConfig, Settings
from handler.deadline import current_or_new
from handler.errors import ImageTooLarge
from handler.pipeline import ImageInput, compare_pair_with_settings
from handler.result import ComparisonResult
from handler.storage import read_file

#: An input: a file's path, or the encoded image itself (the bytes of a PNG, a JPEG...).
FileOrBytes: TypeAlias = str | os.PathLike[str] | bytes


def compare_files(
    a: FileOrBytes,
    b: FileOrBytes,
    config: ComparisonConfig | None = None,
    settings: Settings | None = None,
) -> ComparisonResult:
    """Compare image ``a`` with image ``b``, as ``pairwatch compare A B`` does.

    ``config`` is how this pair is compared (``ignore_regions``, ``match_level``,
    ``similarity_threshold``...; default: the settings' ``comparison``); it may shorten the
    settings' ``processing_timeout``, never lengthen it. ``settings`` are the deployment's
    (default: ``Settings()``, i.e. the defaults and the ``PAIRWATCH_*`` environment): its
    limits bound the pair as in every entry point (``max_input_bytes``, ``max_input_pixels``,
    ``decode_budget_mp``, ``cache_mb``) and its ``comparator`` picks metrics (the default) or
    the VL model. The VL comparator is started and stopped inside each call (seconds for a
    local model): to compare many pairs with it, run ``pairwatch watch`` or ``serve``.

    A bad input never raises: a missing or unreadable file, a non-image, a truncated file, a
    bomb or a pair past its deadline comes back as a result with ``status`` "error" or
    "timeout" and ``error.type`` naming what went wrong (``error.input``: which one). What
    raises is the caller's mistake (an ``a`` that is neither a path nor bytes: ``TypeError``)
    or the deployment's (invalid ``PAIRWATCH_*`` variables, a VL model that cannot load).

    Logs go through structlog, as everywhere in pairwatch: configure it in the embedding
    program (``handler.logs.configure_logging`` sends them to stderr), else structlog's
    defaults print them.

    >>> import io
    >>> from PIL import Image
    >>> from handler import ComparisonConfig, compare_files
    >>> from handler.logs import configure_logging
    >>> configure_logging("json", "WARNING")
    >>> def png(colour):
    ...     out = io.BytesIO()
    ...     Image.new("RGB", (64, 48), colour).save(out, "PNG")
    ...     return out.getvalue()
    >>> page = Image.new("RGB", (64, 48), "white")
    >>> page.paste("black", (40, 30, 56, 40))
    >>> result = compare_files(png("white"), png("white"))
    >>> result.status, result.is_similar, result.similarity
    ('ok', True, 1.0)
    >>> edited = io.BytesIO()
    >>> page.save(edited, "PNG")
    >>> result = compare_files(png("white"), edited.getvalue())
    >>> result.status, result.is_similar, [r.kind for r in result.changed_regions]
    ('ok', False, ['changed'])
    >>> ignored = ComparisonConfig(ignore_regions=[{"x": 32, "y": 24, "width": 32, "height": 24}])
    >>> compare_files(png("white"), edited.getvalue(), ignored).is_similar
    True
    >>> broken = compare_files(png("white"), b"not an image")
    >>> broken.status, broken.error.type, broken.error.input
    ('error', 'invalid_image', 'b')
    """
    settings = settings if settings is not None else Settings()
    config = config if config is not None else settings.comparison
    inputs = _input(a, "a", settings.max_input_bytes), _input(b, "b", settings.max_input_bytes)
    comparator = create_comparator(settings)
    try:
        return compare_pair_with_settings(
            settings,
            f"{inputs[0].name}~{inputs[1].name}",
            *inputs,
            config,
            comparator,
            # The deployment's time, from when the pair starts (not the comparator's start-up).
            deadline=current_or_new(settings.comparison.processing_timeout),
        ).result
    finally:
        comparator.close()


def _input(source: FileOrBytes, slot: str, max_bytes: int) -> ImageInput:
    """``source`` as the pipeline's input, read only when the pipeline gets to it: a path by
    its file name (as ``pairwatch compare`` names it), bytes by their slot ("a" or "b")."""
    if isinstance(source, bytes):
        return ImageInput(name=slot, load=partial(_checked, source, slot, max_bytes))
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return ImageInput(name=path.name, load=partial(read_file, path, max_bytes))
    raise TypeError(f"compare_files: {slot} must be a path or bytes, not {type(source).__name__}")


def _checked(data: bytes, slot: str, max_bytes: int) -> bytes:
    """Bytes held to ``max_input_bytes`` as a file of that size would be."""
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{slot} is over the limit of {max_bytes} bytes")
    return data
