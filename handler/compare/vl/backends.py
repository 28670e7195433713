"""Which ``protocol.Backend`` runs the VL model: one place decides, from the settings."""

from __future__ import annotations

from handler.compare.vl.protocol import Backend
from handler.config import Settings


def create_backend(settings: Settings) -> Backend:
    """The local worker process (the default); remote backends plug in here."""
    from handler.compare.vl.local_backend import LocalBackend

    return LocalBackend(settings)
