"""``S3Storage`` and ``BucketJobs`` against a real S3 server: SeaweedFS on 127.0.0.1.

SeaweedFS checks SigV4 signatures and implements conditional writes, so what passes here is
what the code does against a real store. Requests are counted with botocore's own event hooks
on the real client (nothing is stubbed) to prove what is *not* downloaded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from handler.bucket_jobs import BucketJobs, EventReport
from handler.compare.metrics import MetricsComparator
from handler.config import Settings
from handler.errors import ImageTooLarge, InputNotFound, PathOutsideRoot
from handler.events import ObjectEvent
from handler.result import ComparisonResult
from handler.s3_storage import (
    CHUNK_BYTES,
    PROBE_BYTES,
    PROBE_MIN_BYTES,
    ObjectChanged,
    ResultConflict,
    S3Storage,
    check_key,
    normalise_prefix,
)
from tests.support import scenes
from tests.support.png import png_claiming
from tests.support.s3_servers import client, seaweedfs_server, unique

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as url:
        yield url


class Calls:
    """Counts S3 operations made by one real boto3 client."""

    def __init__(self, s3: Any) -> None:
        self.names: list[str] = []
        s3.meta.events.register("before-call.s3.*", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        self.names.append(model.name)

    def count(self, name: str) -> int:
        return self.names.count(name)


@pytest.fixture
def s3(endpoint: str) -> Any:
    return client("s3", endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = unique("pw")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def comparator() -> MetricsComparator:
    return MetricsComparator()


def get_json(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[no-any-return]


# --- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["../a.jpg", "p/../../a.jpg", "/abs/a.jpg", "p//a.jpg", "p/./a.jpg", "p/a\x07.jpg", "p/\x85x"],
)
def test_hostile_keys_are_refused(key: str) -> None:
    with pytest.raises(PathOutsideRoot):
        check_key(key)


@pytest.mark.parametrize("key", ["p/a b+c/ä.jpg", "x..y.jpg", "p/a.jpg", "folder/"])
def test_plain_keys_pass(key: str) -> None:
    assert check_key(key) == key


def test_prefix_normalisation() -> None:
    assert normalise_prefix("a/b") == normalise_prefix("/a/b/") == "a/b/"
    assert normalise_prefix(None) == normalise_prefix("") == ""
    with pytest.raises(PathOutsideRoot):
        normalise_prefix("a/../b")


# --- storage -------------------------------------------------------------------------------------


def test_size_is_checked_with_head_before_any_download(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="in/p/big.jpg", Body=b"x" * 5000)
    calls = Calls(s3)
    storage = S3Storage(s3, bucket, "in")
    with pytest.raises(ImageTooLarge, match="5000 bytes"):
        storage.read("p/big.jpg", max_bytes=4999)
    assert calls.count("HeadObject") == 1 and calls.count("GetObject") == 0
    assert storage.read("p/big.jpg", max_bytes=5000) == b"x" * 5000
    assert calls.count("HeadObject") == 1  # the HEAD is remembered for the job


def test_pixel_budget_is_checked_from_a_ranged_read_before_download(s3: Any, bucket: str) -> None:
    bomb = png_claiming(40000, 40000, np.random.default_rng(3).bytes(3 << 20))
    s3.put_object(Bucket=bucket, Key="in/p/bomb.png", Body=bomb)
    noise = np.random.default_rng(4).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    real = scenes.encode(Image.fromarray(noise), "PNG")
    assert len(real) > PROBE_MIN_BYTES
    s3.put_object(Bucket=bucket, Key="in/p/real.png", Body=real)
    calls = Calls(s3)
    downloaded: list[int] = []
    s3.meta.events.register(
        "after-call.s3.GetObject",
        lambda parsed, **_: downloaded.append(int(parsed["ContentLength"])),
    )
    storage = S3Storage(s3, bucket, "in", max_pixels=100_000_000)
    with pytest.raises(ImageTooLarge, match=r"1600\.0 megapixels"):
        storage.read("p/bomb.png", max_bytes=64 << 20)
    assert calls.count("GetObject") == 1 and downloaded == [PROBE_BYTES]
    assert storage.read("p/real.png", max_bytes=64 << 20) == real
    assert downloaded[1:] == [PROBE_BYTES, len(real)]


def test_bodies_are_hashed_as_they_stream_in(s3: Any, bucket: str) -> None:
    """Chunk by chunk (3 MB of noise: several chunks), the digest that of the whole body."""
    body = np.random.default_rng(5).bytes(3 * CHUNK_BYTES + 123)
    s3.put_object(Bucket=bucket, Key="in/p/a.png", Body=body)
    storage = S3Storage(s3, bucket, "in")
    assert storage.digest("p/a.png") is None  # not read yet
    assert storage.read("p/a.png", max_bytes=len(body)) == body
    assert storage.digest("p/a.png") == hashlib.sha256(body).hexdigest()


def test_missing_input_and_listing(s3: Any, bucket: str) -> None:
    for key in ("in/p q+r/ä b.jpg", "in/p q+r/b.png", "in/p q+r/sub/c.jpg", "in/other.jpg"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"1")
    storage = S3Storage(s3, bucket, "in/")
    assert storage.list_names("p q+r") == ["b.png", "ä b.jpg"]
    assert storage.list_names("") == ["other.jpg"]
    assert storage.list_names("nothing-here") == []
    with pytest.raises(InputNotFound):
        storage.read("p q+r/missing.jpg", 100)
    assert storage.landed_at("other.jpg") > 0


def test_replaced_between_head_and_get(s3: Any, bucket: str) -> None:
    """The GET carries If-Match on the HEAD's ETag: never compare a version we did not HEAD."""
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=b"first")
    storage = S3Storage(s3, bucket)
    first_tag = storage.etag("p/a.jpg")
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=b"second version")
    with pytest.raises(ObjectChanged):
        storage.read("p/a.jpg", 100)
    assert S3Storage(s3, bucket).etag("p/a.jpg") != first_tag


def test_result_writes_are_conditional(s3: Any, bucket: str) -> None:
    """Two workers that both saw no result: only the first write lands."""
    first, second = S3Storage(s3, bucket), S3Storage(s3, bucket)
    for storage in (first, second):
        with pytest.raises(InputNotFound):
            storage.read("p/result.json", 1000)
    first.write_atomic("p/result.json", b'{"n": 1}')
    with pytest.raises(ResultConflict):
        second.write_atomic("p/result.json", b'{"n": 2}')
    # Both now read version 1; one replaces it, the other's If-Match is then stale.
    third, fourth = S3Storage(s3, bucket), S3Storage(s3, bucket)
    assert third.read("p/result.json", 1000) == fourth.read("p/result.json", 1000) == b'{"n": 1}'
    third.write_atomic("p/result.json", b'{"n": 3}')
    with pytest.raises(ResultConflict):
        fourth.write_atomic("p/result.json", b'{"n": 4}')
    head = s3.head_object(Bucket=bucket, Key="p/result.json")
    assert head["ContentType"] == "application/json"
    assert get_json(s3, bucket, "p/result.json") == {"n": 3}


def test_outputs_can_go_elsewhere(s3: Any, bucket: str) -> None:
    out = unique("pw-out")
    s3.create_bucket(Bucket=out)
    storage = S3Storage(s3, bucket, "in", output_bucket=out, output_prefix="results")
    assert storage.location("p/result.json") == (out, "results/in/p/result.json")
    assert storage.location("p/x.diff.png") == (out, "results/in/p/x.diff.png")
    assert storage.location("p/a.jpg") == (bucket, "in/p/a.jpg")
    storage.write_atomic("p/diff.png", b"\x89PNG")
    assert s3.head_object(Bucket=out, Key="results/in/p/diff.png")["ContentType"] == "image/png"
    assert storage.is_own_output(out, "results/in/p/anything.jpg")
    assert not storage.is_own_output(bucket, "results/in/p/anything.jpg")
    assert storage.is_own_output(bucket, "in/p/result.json")


# --- jobs ----------------------------------------------------------------------------------------


def created(bucket: str, key: str) -> ObjectEvent:
    return ObjectEvent(bucket=bucket, key=key, kind="created", source="test")


def handle(jobs: BucketJobs, event: ObjectEvent) -> EventReport:
    return jobs.handle(event, now=time.time())


def actions(report: EventReport) -> list[str]:
    """What the event's jobs did, in order (``[]``: the event was ignored or rejected)."""
    return [job.action for job in report.reports]


def test_pair_folder_end_to_end(
    s3: Any, bucket: str, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    settings = Settings(diff_image=True, pair_timeout=60)
    jobs = BucketJobs(settings, comparator, s3, prefix="in")
    folder = "in/pair one+ü"
    s3.put_object(Bucket=bucket, Key=f"{folder}/a.jpg", Body=photos["a"])
    first = handle(jobs, created(bucket, f"{folder}/a.jpg"))
    assert actions(first) == ["waiting"]  # no work: looked at again when its partner is due
    assert first.disposition.kind == "retry" and first.disposition.at is not None
    assert first.disposition.at > time.time() + 50
    s3.put_object(Bucket=bucket, Key=f"{folder}/b.jpg", Body=photos["a_copy"])
    second = handle(jobs, created(bucket, f"{folder}/b.jpg"))
    assert actions(second) == ["written"] and second.disposition.kind == "done"

    result = ComparisonResult.model_validate(get_json(s3, bucket, f"{folder}/result.json"))
    assert result.status == "ok" and result.is_similar
    assert [i.sha256 for i in result.inputs] == [
        hashlib.sha256(photos[name]).hexdigest() for name in ("a", "a_copy")
    ]
    assert result.diff_image == "diff.png"
    heads = [s3.head_object(Bucket=bucket, Key=f"{folder}/{n}") for n in ("a.jpg", "b.jpg")]
    assert [i.etag for i in result.inputs] == [h["ETag"].strip('"') for h in heads]
    diff = s3.get_object(Bucket=bucket, Key=f"{folder}/diff.png")
    assert diff["ContentType"] == "image/png" and diff["Body"].read(4) == b"\x89PNG"

    # The partner's duplicate event (or a redelivery): same ETags recorded -> skipped, and
    # neither image is downloaded to find that out.
    calls = Calls(s3)
    again = handle(jobs, created(bucket, f"{folder}/a.jpg"))
    assert actions(again) == ["skipped"]
    gets = calls.count("GetObject")
    assert gets == 1  # the result itself

    # Replacing an input changes its ETag: compared again.
    s3.put_object(Bucket=bucket, Key=f"{folder}/b.jpg", Body=photos["other"])
    assert actions(handle(jobs, created(bucket, f"{folder}/b.jpg"))) == ["written"]
    assert get_json(s3, bucket, f"{folder}/result.json")["is_similar"] is False


def test_manifest_output_prefix_and_guards(
    s3: Any, bucket: str, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    settings = Settings(diff_image=False, output_prefix="results/", pair_timeout=60)
    jobs = BucketJobs(settings, comparator, s3)
    s3.put_object(Bucket=bucket, Key="shots/x 1.jpg", Body=photos["a"])
    s3.put_object(Bucket=bucket, Key="shots/y+2.png", Body=photos["other"])
    manifest = {"a": "x 1.jpg", "b": "y+2.png", "config": {"similarity_threshold": 0.5}}
    s3.put_object(Bucket=bucket, Key="shots/cmp.pair.json", Body=json.dumps(manifest).encode())
    assert actions(handle(jobs, created(bucket, "shots/cmp.pair.json"))) == ["written"]
    result = get_json(s3, bucket, "results/shots/cmp.result.json")
    assert result["status"] == "ok" and result["config"]["similarity_threshold"] == 0.5
    assert [i["name"] for i in result["inputs"]] == ["x 1.jpg", "y+2.png"]

    # Recursion guard: outputs and anything under output_prefix never start work.
    calls = Calls(s3)
    for key in ("results/shots/cmp.result.json", "results/shots/q/a.jpg", "shots/result.json"):
        assert ignored(handle(jobs, created(bucket, key)))
    assert calls.names == []
    # Not a creation, not an image: ignored too.
    removed = ObjectEvent(bucket=bucket, key="shots/x 1.jpg", kind="removed")
    assert ignored(handle(jobs, removed))
    assert ignored(handle(jobs, created(bucket, "shots/notes.txt")))
    assert calls.names == []


def ignored(report: EventReport) -> bool:
    return report.disposition.kind == "done" and report.disposition.reason.startswith("ignored")


def test_replacing_an_image_reruns_the_manifests_beside_it(
    s3: Any, bucket: str, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    jobs = BucketJobs(Settings(diff_image=False, pair_timeout=60), comparator, s3)
    s3.put_object(Bucket=bucket, Key="m/x.jpg", Body=photos["a"])
    s3.put_object(Bucket=bucket, Key="m/y.jpg", Body=photos["a_copy"])
    manifest = json.dumps({"a": "x.jpg", "b": "y.jpg"}).encode()
    s3.put_object(Bucket=bucket, Key="m/cmp.pair.json", Body=manifest)
    assert actions(handle(jobs, created(bucket, "m/cmp.pair.json"))) == ["written"]
    assert get_json(s3, bucket, "m/cmp.result.json")["is_similar"] is True

    calls = Calls(s3)
    # The folder holds a manifest, so it is no pair folder; the manifest: same ETags.
    assert actions(handle(jobs, created(bucket, "m/y.jpg"))) == ["none", "skipped"]
    assert calls.count("ListObjectsV2") == 1  # the folder, listed once for both pair rules

    s3.put_object(Bucket=bucket, Key="m/y.jpg", Body=photos["other"])
    assert actions(handle(jobs, created(bucket, "m/y.jpg"))) == ["none", "written"]
    assert get_json(s3, bucket, "m/cmp.result.json")["is_similar"] is False


def test_hostile_key_is_an_error_for_that_record(
    s3: Any, bucket: str, comparator: MetricsComparator
) -> None:
    jobs = BucketJobs(Settings(), comparator, s3)
    calls = Calls(s3)
    for key in ("p/../../etc/a.jpg", "p/bad\x01/a.jpg", "/p/a.jpg"):
        report = handle(jobs, created(bucket, key))
        assert report.disposition.kind == "reject" and not report.reports
    assert calls.names == []  # refused before any request


def test_manifest_before_its_images_asks_for_a_retry(
    s3: Any, bucket: str, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    jobs = BucketJobs(Settings(diff_image=False, pair_timeout=60), comparator, s3)
    s3.put_object(Bucket=bucket, Key="m/early.pair.json", Body=b'{"a": "a.jpg", "b": "b.jpg"}')
    early = handle(jobs, created(bucket, "m/early.pair.json"))
    # The state is written for users to see, but the record is not done: it comes back.
    assert actions(early) == ["written"] and early.disposition.kind == "retry"
    assert get_json(s3, bucket, "m/early.result.json")["error"]["type"] == "input_not_found"
    # Past pair_timeout the same answer is final.
    late = jobs.handle(created(bucket, "m/early.pair.json"), now=time.time() + 61)
    assert late.disposition.kind == "done"
    for name in ("a.jpg", "b.jpg"):
        s3.put_object(Bucket=bucket, Key=f"m/{name}", Body=photos["a"])
    assert actions(handle(jobs, created(bucket, "m/early.pair.json"))) == ["written"]
    assert get_json(s3, bucket, "m/early.result.json")["status"] == "ok"


def test_oversized_image_gets_an_error_result_without_download(
    s3: Any, bucket: str, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    settings = Settings(diff_image=False, max_input_bytes=len(photos["a"]) + 10)
    jobs = BucketJobs(settings, comparator, s3)
    s3.put_object(Bucket=bucket, Key="big/a.jpg", Body=photos["a"])
    s3.put_object(Bucket=bucket, Key="big/b.jpg", Body=photos["a"] + b"\0" * 100)
    calls = Calls(s3)
    assert actions(handle(jobs, created(bucket, "big/b.jpg"))) == ["written"]
    assert calls.count("GetObject") == 2  # the old result (absent) and image a; never b
    result = get_json(s3, bucket, "big/result.json")
    assert result["error"]["type"] == "image_too_large" and result["error"]["input"] == "b"


def test_workers_racing_on_one_pair_write_once(
    endpoint: str, s3: Any, bucket: str, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    """Worker B compares while worker A writes the result first: B's conditional PUT fails
    and B reports the pair as done by someone else, leaving A's result in place."""
    s3.put_object(Bucket=bucket, Key="race/a.jpg", Body=photos["a"])
    s3.put_object(Bucket=bucket, Key="race/b.jpg", Body=photos["other"])
    worker_b = client("s3", endpoint)
    winner = b'{"written_by": "worker A"}'

    def worker_a_wins(params: dict[str, Any], **_: Any) -> None:
        if params["Key"] == "race/result.json" and not winner_written:
            winner_written.append(True)
            s3.put_object(Bucket=bucket, Key="race/result.json", Body=winner)

    winner_written: list[bool] = []
    worker_b.meta.events.register("before-parameter-build.s3.PutObject", worker_a_wins)
    jobs = BucketJobs(Settings(diff_image=False), comparator, worker_b)
    raced = handle(jobs, created(bucket, "race/b.jpg"))
    assert actions(raced) == ["skipped"] and raced.disposition.kind == "done"
    assert raced.disposition.reason == "another worker wrote it"
    assert s3.get_object(Bucket=bucket, Key="race/result.json")["Body"].read() == winner


def test_from_settings_takes_the_watched_prefix_else_input_prefix() -> None:
    """The one way a process builds its bucket jobs: the watched ``s3://BUCKET/PREFIX`` wins,
    else ``input_prefix`` normalised as a folder; a hostile one is refused before any use."""
    comparator = MetricsComparator()
    settings = Settings(input_prefix="in/a")
    built = BucketJobs.from_settings(
        settings, comparator, endpoint_url="http://127.0.0.1:9", region="eu-west-1"
    )
    assert built.prefix == "in/a/"
    assert built.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert built.client.meta.region_name == "eu-west-1"
    assert BucketJobs.from_settings(settings, comparator, prefix="watched/").prefix == "watched/"
    with pytest.raises(PathOutsideRoot):
        BucketJobs.from_settings(Settings(input_prefix="in/../up"), comparator)
