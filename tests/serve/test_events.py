"""``POST /v1/events`` of a real ``pairwatch serve`` process, fetching from and writing to a real
S3 server: moto for MinIO-shaped and plain S3 payloads, SeaweedFS for its own filer webhook
(``weed`` posts the notifications itself)."""

from __future__ import annotations

import copy
import itertools
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import anyio
import httpx
import pytest

from handler.compare.metrics import MetricsComparator
from handler.config import Settings
from handler.events import ObjectEvent, Parsed
from handler.result import ComparisonResult
from tests.support import scenes
from tests.support.s3_servers import (
    aws_env,
    client,
    free_port,
    moto_server,
    seaweedfs_server,
    unique,
    wait_for,
)
from tests.support.serve_process import ServeProcess, serve_process
from watcher.runner import Runner, Submitted
from watcher.serve.admission import Admission
from watcher.serve.events import EventsEndpoint
from watcher.shutdown import StopFlag

TOKEN = "events-token-1b9c"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "events"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, moto: str) -> Iterator[ServeProcess]:
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    env = {
        **aws_env(moto),
        "PAIRWATCH_EVENTS_TOKEN_FILE": str(token_file),
        "PAIRWATCH_INPUT_PREFIX": "incoming/",
        "PAIRWATCH_PAIR_TIMEOUT": "2",
        "PAIRWATCH_DIFF_IMAGE": "false",
    }
    with serve_process(tmp_path_factory.mktemp("events"), env) as process:
        yield process


@pytest.fixture(scope="module")
def photos() -> tuple[bytes, bytes]:
    img = scenes.photo("chelsea")
    return scenes.encode(img), scenes.pasted_object(img)


@pytest.fixture
def bucket(moto: str) -> str:
    name = unique("hooks")
    client("s3", moto).create_bucket(Bucket=name)
    return name


def minio_payload(bucket: str, key: str, etag: str = "") -> dict[str, Any]:
    """The recorded MinIO webhook payload, pointed at ``bucket``/``key`` (form-encoded)."""
    doc = copy.deepcopy(json.loads((FIXTURES / "minio_webhook_put.json").read_text()))
    doc["Key"] = f"{bucket}/{key}"
    record = doc["Records"][0]
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"]["key"] = quote_plus(key)
    record["s3"]["object"]["eTag"] = etag
    return doc


def s3_payload(bucket: str, key: str) -> dict[str, Any]:
    doc = copy.deepcopy(json.loads((FIXTURES / "aws_s3_notification.json").read_text()))
    record = doc["Records"][0]
    record["eventName"] = "ObjectCreated:Put"
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"]["key"] = quote_plus(key)
    return doc


def _post(server: ServeProcess, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/events", json=payload, headers=AUTH, timeout=60)


def _result(s3: Any, bucket: str, key: str) -> ComparisonResult:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return ComparisonResult.model_validate_json(body)


def test_token_is_required_and_compared(server: ServeProcess) -> None:
    url = server.url + "/v1/events"
    body = json.dumps({"Records": []})
    assert httpx.post(url, content=body).status_code == 401
    wrong = httpx.post(url, content=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    basic = httpx.post(url, content=body, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    assert httpx.post(url, content=body, headers=AUTH).status_code == 200
    assert TOKEN not in server.log_path.read_text()


def test_minio_webhook_writes_the_result_into_the_bucket(
    server: ServeProcess, moto: str, bucket: str, photos: tuple[bytes, bytes]
) -> None:
    s3 = client("s3", moto)
    s3.put_object(Bucket=bucket, Key="incoming/shop front/a.jpg", Body=photos[0])
    first = _post(server, minio_payload(bucket, "incoming/shop front/a.jpg"))
    assert first.status_code == 200
    assert [o["outcome"] for o in first.json()["outcomes"]] == ["waiting"]

    s3.put_object(Bucket=bucket, Key="incoming/shop front/b.jpg", Body=photos[1])
    second = _post(server, minio_payload(bucket, "incoming/shop front/b.jpg"))
    assert second.status_code == 200
    assert second.json()["outcomes"] == [
        {"bucket": bucket, "key": "incoming/shop front/b.jpg", "outcome": "written"}
    ]
    # Answered only once the result is in the bucket.
    result = _result(s3, bucket, "incoming/shop front/result.json")
    assert (result.pair_id, result.status, result.is_similar) == ("shop front", "ok", False)
    assert [i.name for i in result.inputs] == ["a.jpg", "b.jpg"]

    again = _post(server, minio_payload(bucket, "incoming/shop front/b.jpg"))
    assert again.json()["outcomes"][0]["outcome"] == "skipped"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'pairwatch_events_total{outcome="written",source="minio:s3"}' in metrics
    assert 'pairwatch_pairs_total{comparator="metrics",source="webhook",status="ok"}' in metrics


def test_plain_s3_event_json(
    server: ServeProcess, moto: str, bucket: str, photos: tuple[bytes, bytes]
) -> None:
    s3 = client("s3", moto)
    s3.put_object(Bucket=bucket, Key="incoming/p/a.jpg", Body=photos[0])
    s3.put_object(Bucket=bucket, Key="incoming/p/b.jpg", Body=photos[0])
    answer = _post(server, s3_payload(bucket, "incoming/p/b.jpg"))
    assert answer.status_code == 200
    assert _result(s3, bucket, "incoming/p/result.json").is_similar is True


def test_a_lone_image_is_looked_at_again_when_its_partner_is_due(
    server: ServeProcess, moto: str, bucket: str, photos: tuple[bytes, bytes]
) -> None:
    s3 = client("s3", moto)
    s3.put_object(Bucket=bucket, Key="incoming/alone/a.jpg", Body=photos[0])
    answer = _post(server, minio_payload(bucket, "incoming/alone/a.jpg"))
    assert answer.status_code == 200 and answer.json()["outcomes"][0]["outcome"] == "waiting"

    result = wait_for(
        lambda: _written(s3, bucket, "incoming/alone/result.json"),
        15,
        0.2,
        "incomplete_pair to be written",
    )
    assert result.error is not None and result.error.type == "incomplete_pair"


def test_a_manifest_before_its_images_asks_for_redelivery(
    server: ServeProcess, moto: str, bucket: str
) -> None:
    s3 = client("s3", moto)
    s3.put_object(
        Bucket=bucket, Key="incoming/m.pair.json", Body=b'{"a": "x/a.jpg", "b": "x/b.jpg"}'
    )
    answer = _post(server, minio_payload(bucket, "incoming/m.pair.json"))
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"Records": "x"}',
        b'{"Records": [{"eventSource": "aws:s3"}]}',
        b'{"event_type": "create", "message": {}}',
        b"\xff\xfe",
    ],
    ids=["text", "list", "records_not_list", "record_fields", "seaweedfs_no_key", "bytes"],
)
def test_malformed_bodies_are_400_and_the_server_carries_on(
    server: ServeProcess, body: bytes
) -> None:
    answer = httpx.post(server.url + "/v1/events", content=body, headers=AUTH)
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "malformed_event"
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_hostile_key_is_refused_for_that_record(server: ServeProcess, bucket: str) -> None:
    answer = _post(server, minio_payload(bucket, "incoming/p/../../etc/x.jpg"))
    assert answer.status_code == 200
    assert answer.json()["refused"] == 1 and answer.json()["outcomes"] == []
    assert server.events("event_rejected")


def test_seaweedfs_filer_webhook_end_to_end(tmp_path: Path, photos: tuple[bytes, bytes]) -> None:
    """``weed mini`` posts its own filer notifications to ``serve``, which fetches the pair
    from SeaweedFS's S3 gateway and writes the result back there."""
    port = free_port()
    weed_dir = tmp_path / "weed"
    weed_dir.mkdir()
    (weed_dir / "notification.toml").write_text(
        "[notification.webhook]\n"
        "enabled = true\n"
        f'endpoint = "http://127.0.0.1:{port}/v1/events"\n'
        f'bearer_token = "{TOKEN}"\n'
        "timeout_seconds = 60\n"
        'event_types = ["create", "update"]\n'
        'path_prefixes = ["/buckets/"]\n'
    )
    with seaweedfs_server(weed_dir) as endpoint:
        env = {
            **aws_env(endpoint),
            "PAIRWATCH_EVENTS_TOKEN": TOKEN,
            "PAIRWATCH_DIFF_IMAGE": "false",
        }
        with serve_process(tmp_path, env, port=port) as server:
            s3 = client("s3", endpoint)
            s3.create_bucket(Bucket="photos")
            s3.put_object(Bucket="photos", Key="in/pair 1/a.jpg", Body=photos[0])
            s3.put_object(Bucket="photos", Key="in/pair 1/b.jpg", Body=photos[1])

            def written() -> ComparisonResult | None:
                try:
                    return _result(s3, "photos", "in/pair 1/result.json")
                except s3.exceptions.NoSuchKey:
                    return None

            result = wait_for(written, 30, 0.2, "SeaweedFS's webhook to produce a result")
            assert result.status == "ok" and result.is_similar is False
            assert result.inputs[0].etag is not None
            sources = {line.get("path") for line in server.events("http_request")}
            assert sources == {"/readyz", "/v1/events"}


def test_an_oversized_event_body_is_413(server: ServeProcess) -> None:
    answer = httpx.post(
        server.url + "/v1/events", content=b" " * (2 * 1024 * 1024), headers=AUTH, timeout=60
    )
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "body_too_large"
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "bucket",
    ["pairwatch-no-such-bucket", "../../etc", "http://evil.example/x"],
    ids=["missing", "path", "url"],
)
def test_an_event_for_a_missing_or_invalid_bucket_is_rejected_and_acknowledged(
    server: ServeProcess, bucket: str
) -> None:
    """A permanent failure: 200 (MinIO and SeaweedFS deliver anything else again, forever),
    logged and counted as ``rejected``; never a 500 traceback nor a 503 asking for more."""
    answer = _post(server, minio_payload(bucket, "incoming/p/a.jpg"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["refused"], body["outcomes"]) == (1, [])
    assert body["rejected"][0]["bucket"] == bucket and body["rejected"][0]["reason"]
    rejected = [e for e in server.events("event_rejected") if e.get("bucket") == bucket]
    assert rejected and rejected[-1]["error_type"] == "bucket_refused"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'pairwatch_events_total{outcome="rejected",source="minio:s3"}' in metrics
    assert "Traceback" not in server.log_path.read_text()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, moto: str) -> Iterator[ServeProcess]:
    """A server that takes events for one bucket only, and whose deployment config ignores a
    box that no small image holds (a settings mistake the pair reports)."""
    env = {
        **aws_env(moto),
        "PAIRWATCH_EVENTS_TOKEN": TOKEN,
        "PAIRWATCH_ALLOWED_BUCKETS": "hooks-allowed,hooks-other",
        "PAIRWATCH_COMPARISON__IGNORE_REGIONS": '[{"x": 0, "y": 0, "width": 9000, "height": 5}]',
        "PAIRWATCH_DIFF_IMAGE": "false",
    }
    with serve_process(tmp_path_factory.mktemp("guarded"), env) as process:
        yield process


def test_allowed_buckets_refuses_events_for_any_other_bucket(
    guarded: ServeProcess, moto: str, bucket: str, photos: tuple[bytes, bytes]
) -> None:
    """The token alone once let an event name any bucket the credentials reach, and the
    results were written there."""
    s3 = client("s3", moto)
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=photos[0])
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=photos[1])
    answer = _post(guarded, minio_payload(bucket, "p/b.jpg"))
    assert answer.status_code == 200 and answer.json()["refused"] == 1
    assert "allowed_buckets" in answer.json()["rejected"][0]["reason"]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="p/result")

    s3.create_bucket(Bucket="hooks-allowed")
    s3.put_object(Bucket="hooks-allowed", Key="p/a.jpg", Body=photos[0])
    s3.put_object(Bucket="hooks-allowed", Key="p/b.jpg", Body=photos[1])
    allowed = _post(guarded, minio_payload("hooks-allowed", "p/b.jpg"))
    assert allowed.status_code == 200 and allowed.json()["outcomes"][0]["outcome"] == "written"
    # The deployment's ignore box does not fit these images: the pair says so, naming it.
    result = _result(s3, "hooks-allowed", "p/result.json")
    assert result.error is not None
    assert (result.error.type, result.error.field) == (
        "invalid_manifest",
        "config.ignore_regions[0]",
    )


def test_an_ignore_box_from_the_settings_outside_image_a_is_422_naming_it(
    guarded: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    answer = httpx.post(
        guarded.url + "/v1/compare",
        files={"a": ("a.jpg", photos[0]), "b": ("b.jpg", photos[1])},
        timeout=60,
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "config.ignore_regions[0]"


def test_a_lone_images_recheck_is_the_runners(
    moto: str, bucket: str, photos: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, on the parts serve wires together: the webhook hands a lone image to the
    process's runner's rechecks (no loop of its own), and the runner's recheck writes
    ``incomplete_pair`` once the partner is due, then forgets the key."""
    for name, value in aws_env(moto).items():
        monkeypatch.setenv(name, value)
    settings = Settings(events_token=TOKEN, pair_timeout=1, diff_image=False)
    runner: Runner[Any] = Runner(MetricsComparator(), concurrency=1, queue_size=4, wait_ready=False)
    endpoint = EventsEndpoint.build(settings, Admission(runner, 4), moto, None)
    s3 = client("s3", moto)
    s3.put_object(Bucket=bucket, Key="lone/a.jpg", Body=photos[0])
    event = ObjectEvent(bucket=bucket, key="lone/a.jpg", kind="created")
    stop = StopFlag()
    loop = threading.Thread(target=runner.run, args=(stop, Submitted()))
    loop.start()
    try:
        delivery = anyio.run(endpoint.deliver, Parsed(events=[event]))
        assert delivery.disposition.is_retry and (bucket, "lone/a.jpg") in runner.rechecks
        result = wait_for(
            lambda: _written(s3, bucket, "lone/result.json"), 15, 0.2, "the runner's recheck"
        )
        assert result.error is not None and result.error.type == "incomplete_pair"
        wait_for(lambda: not len(runner.rechecks) and runner.idle(), 5, 0.05, "the key forgotten")
    finally:
        stop.request()
        loop.join(10)


def test_uploads_and_events_share_one_in_flight_limit(
    tmp_path: Path, moto: str, bucket: str
) -> None:
    """``concurrency=1``: uploads and webhook events arriving together are compared one at a
    time, never side by side (each pair's compare interval, from its ``pair_compared`` line's
    end and duration, overlaps no other), and every one of them is answered."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {
        **aws_env(moto),
        "PAIRWATCH_EVENTS_TOKEN_FILE": str(token_file),
        "PAIRWATCH_CONCURRENCY": "1",
        "PAIRWATCH_QUEUE_SIZE": "8",
        "PAIRWATCH_DIFF_IMAGE": "false",
    }
    img = scenes.photo("astronaut").resize((1500, 1500))
    a, b = scenes.encode(img), scenes.pasted_object(img)
    s3 = client("s3", moto)
    for n in range(3):
        s3.put_object(Bucket=bucket, Key=f"p{n}/a.jpg", Body=a)
        s3.put_object(Bucket=bucket, Key=f"p{n}/b.jpg", Body=b)
    with serve_process(tmp_path, env) as server:

        def upload(n: int) -> int:
            files = {"a": ("a.jpg", a), "b": ("b.jpg", b)}
            data = {"pair_id": f"upload-{n}"}
            url = server.url + "/v1/compare"
            return httpx.post(url, files=files, data=data, timeout=120).status_code

        def event(n: int) -> int:
            return _post(server, minio_payload(bucket, f"p{n}/b.jpg")).status_code

        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(send, n) for n in range(3) for send in (upload, event)]
            codes = [answer.result() for answer in answers]
        compared = server.events("pair_compared")
    assert codes == [200] * 6
    assert len(compared) == 6
    spans = sorted(
        (end - line["duration_ms"] / 1000, end)
        for line in compared
        for end in [datetime.fromisoformat(line["timestamp"]).timestamp()]
    )
    # Log timestamps and durations are taken a moment apart: 20 ms of slack.
    overlaps = [(x, y) for x, y in itertools.pairwise(spans) if y[0] < x[1] - 0.02]
    assert not overlaps, overlaps


def _written(s3: Any, bucket: str, key: str) -> ComparisonResult | None:
    try:
        return _result(s3, bucket, key)
    except s3.exceptions.NoSuchKey:
        return None
