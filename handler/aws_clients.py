"""The boto3 clients (S3, SQS), built in one place with bounded timeouts and attempts.

botocore's defaults (60 s connect and read timeouts, several attempts) let an endpoint that
accepts TCP and never answers hold a watcher for minutes with no log line. Every client here
gives up after ``CONNECT_TIMEOUT_S`` to connect, ``READ_TIMEOUT_S`` to answer (SQS: the long
poll's wait on top) and ``MAX_ATTEMPTS`` attempts in all. Every failed attempt is logged
(``aws_call_failed``), so a store that misbehaves is visible at once; the caller logs the
final failure of the call.

An S3 request made while a pair's deadline is the thread's current one (``handler.deadline``)
is bounded by it too: each attempt's read timeout is at most what is left of it, and no
attempt starts once it has passed (``ComparisonTimeout`` in the pair's stage), so a slow or
stalled store cannot hold a pair past its ``processing_timeout``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from handler.deadline import current
from handler.logs import get_logger

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
#: The shortest read timeout an attempt gets from a pair's deadline (0 would mean "none").
MIN_READ_TIMEOUT_S = 0.05
#: Attempts per call, the first included (botocore's "standard" retry mode, with back-off).
MAX_ATTEMPTS = 3


def client_config(*, read_timeout: float = READ_TIMEOUT_S, path_style: bool = False) -> Config:
    return Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        s3={"addressing_style": "path" if path_style else "auto"},
    )


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint in force: the given one, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
    (which boto3 also reads itself); None means AWS."""
    return (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> S3Client:
    """An S3 client from the standard AWS chain (env, profile, instance/role credentials).

    ``endpoint_url`` (or ``AWS_ENDPOINT_URL[_S3]``) points it at MinIO, SeaweedFS or another
    S3-compatible store; those get path-style addressing, which they all serve, rather than
    bucket-name host names, which need DNS set up for them.
    """
    custom = s3_endpoint(endpoint_url)
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=client_config(path_style=bool(custom)),
    )
    _log_failed_attempts(client)
    client.meta.events.register(
        "before-send.s3", _bound_by_deadline, unique_id="pairwatch-pair-deadline"
    )
    return client


def sqs_client(
    endpoint_url: str | None = None, region: str | None = None, *, wait_seconds: int = 0
) -> SQSClient:
    """An SQS client whose read timeout covers a long poll of ``wait_seconds``."""
    client: SQSClient = boto3.client(
        "sqs",
        endpoint_url=endpoint_url,
        region_name=region,
        config=client_config(read_timeout=READ_TIMEOUT_S + wait_seconds),
    )
    _log_failed_attempts(client)
    return client


def _bound_by_deadline(request: Any, **_: Any) -> None:
    """botocore calls this before each attempt: within a pair's deadline, the attempt's read
    timeout is what is left of it (botocore reads ``read_timeout`` from the request's context);
    past it, the attempt (a retry included) is not made."""
    deadline = current()
    if deadline is None:
        return
    deadline.check()
    request.context["read_timeout"] = max(
        MIN_READ_TIMEOUT_S, min(READ_TIMEOUT_S, deadline.remaining())
    )


def _log_failed_attempts(client: Any) -> None:
    client.meta.events.register("needs-retry", _log_attempt, unique_id="pairwatch-log-attempt")


def _log_attempt(
    attempts: int,
    operation: Any = None,
    response: Any = None,
    caught_exception: Exception | None = None,
    **_: Any,
) -> None:
    """botocore asks every handler whether to retry; this one only logs failed attempts
    (returning None leaves the decision to botocore's retry handler)."""
    status = getattr(response[0], "status_code", None) if response else None
    if caught_exception is None and (status is None or status < 500) and status != 429:
        return
    get_logger().warning(
        "aws_call_failed",
        operation=getattr(operation, "name", None),
        attempt=attempts,
        of=MAX_ATTEMPTS,
        status=status,
        error_type=type(caught_exception).__name__ if caught_exception else None,
        error=str(caught_exception) if caught_exception else None,
    )
