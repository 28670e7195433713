"""One error family for everything that can go wrong with one pair.

Every error carries a stable ``type`` string: it is what ends up in ``result.error.type`` and
what users and other tools match on, so the strings never change once released.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PairError(Exception):
    """A failure that concerns one pair only: it becomes an error result, never a crash."""

    type: ClassVar[str] = "internal_error"
    #: ``error`` or ``timeout``: the result status this error produces.
    status: ClassVar[str] = "error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class InvalidImage(PairError):
    """The bytes are not a decodable image (empty, garbage, truncated, corrupt)."""

    type = "invalid_image"


class UnsupportedFormat(InvalidImage):
    type = "unsupported_format"


class ImageTooLarge(InvalidImage):
    """Dimensions or byte size above the configured limits (decompression-bomb guard)."""

    type = "image_too_large"


class InputNotFound(PairError):
    type = "input_not_found"


class InputUnreadable(PairError):
    """The input exists but cannot be read (permissions, I/O error)."""

    type = "input_unreadable"


class PathOutsideRoot(PairError):
    """A path or key would leave the configured folder or bucket prefix."""

    type = "path_outside_root"


class UnsupportedName(PairError):
    """A file or folder name pairwatch does not handle (control characters such as a newline,
    bytes that are not UTF-8): refused with a name of its own, so that the user learns to
    rename it instead of reading a misleading ``path_outside_root`` or ``internal_error``."""

    type = "unsupported_name"


class InvalidManifest(PairError):
    type = "invalid_manifest"


class IncompletePair(PairError):
    type = "incomplete_pair"


class AmbiguousPair(PairError):
    type = "ambiguous_pair"


class ModelOutputInvalid(PairError):
    """The VL model answered, but not with the JSON we asked for (raw text kept in details)."""

    type = "model_output_invalid"


class OutOfMemory(PairError):
    type = "out_of_memory"


class ModelCrashed(PairError):
    type = "model_crashed"


class ModelUnavailable(PairError):
    """The configured model could not be loaded (missing files, offline hub, bad id)."""

    type = "model_unavailable"


class ComparisonTimeout(PairError):
    type = "timeout"
    status = "timeout"


#: Failures of the moment, not of the inputs: a result recording one of these does not count as
#: "already done", so the next run (a restart, a rescan, a redelivery) compares the pair again.
RETRYABLE_ERROR_TYPES = frozenset(
    error.type
    for error in (ComparisonTimeout, OutOfMemory, ModelCrashed, ModelUnavailable, InputUnreadable)
)


class StorageUnavailable(Exception):
    """The store failed for the moment (throttling, a 5xx, a timeout, an unreachable endpoint,
    an object replaced while it was read). Not a ``PairError``: nothing is written, the unit of
    work is retried (``handler.disposition.retry``)."""


class BucketRefused(Exception):
    """An event names a bucket pairwatch will not touch: not a valid bucket name, not in
    ``allowed_buckets``, or one that does not exist. Not a ``PairError`` (there is no pair to
    write a result beside) and not a failure of the moment: the event is rejected for good
    (logged, counted, acknowledged), never delivered again and again."""


class ResultConflict(Exception):
    """Another worker stored this result first (a conditional write was refused): the pair is
    answered, so the unit of work is done."""
