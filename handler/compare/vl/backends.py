"""Which ``protocol.Backend`` runs the VL model: one place decides, from the settings."""

from __future__ import annotations

from handler.compare.vl.protocol import Backend
from handler.config import Settings


def create_backend(settings: Settings) -> Backend:
    """The local worker process (the default), or an OpenAI-compatible server
    (``vl_backend = "openai"``). Imported lazily: neither needs the other's dependencies."""
    if settings.vl_backend == "openai":
        from handler.compare.vl.openai_backend import OpenAIBackend

        return OpenAIBackend.from_settings(settings)
    from handler.compare.vl.local_backend import LocalBackend

    return LocalBackend(settings)
