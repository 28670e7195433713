"""pairwatch core: compare one image pair with bounded memory and a hard timeout.

Importable on its own (also as an AWS Lambda handler via ``handler.app.lambda_handler``);
it knows nothing of the event sources in ``watcher``.

The public Python API (``docs/python-api.md``) is ``compare_files`` and the models it takes
and returns, exported here lazily: ``import handler`` stays light (no pydantic, Pillow, numpy
or libvips until one of them is asked for), which the Lambda's cold start and the CLI's
start-up rely on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from handler.version import __version__

if TYPE_CHECKING:
    from handler.api import compare_files
    from handler.config import ComparisonConfig, Settings
    from handler.result import ComparisonResult

__all__ = ["ComparisonConfig", "ComparisonResult", "Settings", "__version__", "compare_files"]

#: Each public name, and the module that defines it.
_EXPORTS = {
    "compare_files": "handler.api",
    "ComparisonConfig": "handler.config",
    "Settings": "handler.config",
    "ComparisonResult": "handler.result",
}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'handler' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
