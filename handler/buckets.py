"""What a bucket name may be: the one check for settings (``allowed_buckets``) and events.

Kept apart from ``handler.s3_storage`` so that the settings can check names without importing
the storage (which imports the settings).
"""

from __future__ import annotations

import re

from handler.errors import BucketRefused

#: What S3, MinIO and SeaweedFS accept as a bucket name (AWS's legacy names included: capitals,
#: underscores); never a path or a URL.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_bucket(name: str) -> str:
    """``name`` if it can be a bucket's name, else ``BucketRefused`` (``../../etc``, a URL)."""
    if not _BUCKET_NAME.fullmatch(name) or ".." in name:
        raise BucketRefused(f"{name[:100]!r} is not a bucket name")
    return name
