"""``handler.buckets.check_bucket``: the one rule for what a bucket name may be."""

from __future__ import annotations

import pytest

from handler.buckets import check_bucket
from handler.config import ConfigFileError, load_settings
from handler.errors import BucketRefused


@pytest.mark.parametrize("name", ["photos", "My_Legacy.bucket-1", "a" * 255])
def test_bucket_names_s3_minio_and_seaweedfs_accept_pass(name: str) -> None:
    assert check_bucket(name) == name


@pytest.mark.parametrize(
    "name", ["", "../../etc", "a..b", "http://evil/x", "-dash", "a" * 256, "a/b", "sp ace"]
)
def test_a_path_a_url_or_a_malformed_name_is_refused(name: str) -> None:
    with pytest.raises(BucketRefused, match="is not a bucket name"):
        check_bucket(name)


@pytest.mark.usefixtures("no_pairwatch_env")
def test_allowed_buckets_are_checked_by_the_same_rule() -> None:
    assert load_settings(allowed_buckets=["photos"]).allowed_buckets == ["photos"]
    with pytest.raises(ConfigFileError, match="is not a bucket name"):
        load_settings(allowed_buckets=["photos", "../etc"])
