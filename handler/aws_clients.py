"""The boto3 clients (S3, SQS), built in one place with bounded timeouts and attempts.

botocore's defaults (60 s connect and read timeouts, several attempts) let an endpoint that
accepts TCP and never answers hold a watcher for minutes with no log line. Every client here
gives up after ``CONNECT_TIMEOUT_S`` to connect, ``READ_TIMEOUT_S`` to answer (SQS: the long
poll's wait on top) and ``MAX_ATTEMPTS`` attempts in all; the caller logs the failure.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
#: Attempts per call, the first included (botocore's "standard" retry mode, with back-off).
MAX_ATTEMPTS = 3


def client_config(*, read_timeout: float = READ_TIMEOUT_S, path_style: bool = False) -> Config:
    return Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
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
    return client
