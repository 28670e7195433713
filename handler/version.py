"""pairwatch's version, on a floor of its own: results record it (``handler.result``) and the
package exports it (``handler.__version__``) without the core importing its own ``__init__``."""

__version__ = "0.1.0"
