"""Every sub-command's options, and where its implementation lives (imported only when run).

Kept apart from the implementations so that building the parser costs argparse alone: the
``pairwatch schema`` and ``compare`` start-up does not pay for boto3, minio, watchdog or jinja2.
An option whose ``dest`` is a ``Settings`` field (``pair_timeout``, ``poll_interval``...) is a
setting: ``watcher.cli`` passes it to ``load_settings``, validated with the other sources.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watcher.args import parse_s3_url, port_number, positive_int, positive_seconds, seconds


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    #: ``module:function`` taking ``(args, settings)`` and returning the exit status.
    run: str


def _compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="image A")
    parser.add_argument("b", type=Path, help="image B")
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        help="also write the result JSON here (atomically; never over image A or B)",
    )


def _runner_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help=(
            "pairs in progress at once (default: 8 for vl, the usable CPU cores for metrics; "
            "PAIRWATCH_CONCURRENCY)"
        ),
    )


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics on PORT (metrics_port; on serve_host)",
    )


def _watch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to watch (recursively)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="process every pending pair, then exit (status 1 if any pair failed)",
    )
    parser.add_argument(
        "--polling",
        action="store_true",
        help="poll for changes instead of inotify (network filesystems: NFS, SMB, sshfs)",
    )
    parser.add_argument(
        "--pair-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="how long a lone image waits for its partner (default 600; PAIRWATCH_PAIR_TIMEOUT)",
    )
    parser.add_argument(
        "--settle-time",
        type=seconds,
        metavar="SECONDS",
        help="how long a file written in place must stay unchanged before it is read "
        "(default 0.5; PAIRWATCH_SETTLE_TIME)",
    )
    _runner_options(parser)
    _metrics_options(parser)


def _serve(parser: argparse.ArgumentParser) -> None:
    # dest = the settings field: the flags become Settings like every other option's.
    parser.add_argument(
        "--host",
        dest="serve_host",
        metavar="HOST",
        help="address to listen on (serve_host; default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        dest="serve_port",
        type=port_number,
        metavar="PORT",
        help="TCP port (serve_port; default 8080)",
    )
    _endpoint_options(parser)


def _endpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint (MinIO, SeaweedFS, moto...); default: AWS_ENDPOINT_URL, "
        "else AWS itself",
    )
    parser.add_argument(
        "--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)"
    )
    _runner_options(parser)


def _watch_sqs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue_url", metavar="QUEUE_URL", help="the SQS queue's URL")
    _endpoint_options(parser)
    _metrics_options(parser)
    parser.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit (status 0) as soon as the queue is empty and nothing is in flight: for "
        "batch runs, cron jobs and tests",
    )
    parser.add_argument(
        "--input-prefix",
        metavar="PREFIX",
        help="only keys under PREFIX are pairs, and manifests cannot reach outside it "
        "(default: PAIRWATCH_INPUT_PREFIX, else the whole bucket)",
    )


def _watch_minio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", type=parse_s3_url, metavar="s3://BUCKET/PREFIX")
    _endpoint_options(parser)
    _metrics_options(parser)


def _watch_poll(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", type=parse_s3_url, metavar="s3://BUCKET/PREFIX")
    _endpoint_options(parser)
    _metrics_options(parser)
    parser.add_argument(
        "--interval",
        dest="poll_interval",
        type=positive_seconds,
        metavar="SECONDS",
        help="seconds between two listings (default 10; PAIRWATCH_POLL_INTERVAL)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="list and process once, then exit (status 1 if a listing or delivery failed or "
        "a pair's result is not ok)",
    )


def _report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to search for results")
    parser.add_argument(
        "--output", "-o", type=Path, help="HTML file to write (default: DIR/report.html)"
    )
    parser.add_argument(
        "--thumb-size",
        type=int,
        default=128,
        metavar="PX",
        help="edge of the embedded A/B previews in pixels, 0 for none (default 128)",
    )
    parser.add_argument("--title", help="page title (default: the folder's name)")


#: ``watch sqs|minio|poll`` are spelled ``watch-<source>`` here (see ``watcher.cli``).
COMMANDS = {
    "compare": Command(
        "Compare two image files and print the result JSON on stdout.",
        _compare,
        "watcher.compare_command:run",
    ),
    "watch": Command(
        "Watch a folder: every image pair dropped into it gets a result.json beside it.",
        _watch,
        "watcher.sources.folder:run",
    ),
    "watch-sqs": Command(
        "Work an SQS queue of S3 notifications: results are written back to the bucket.",
        _watch_sqs,
        "watcher.sources.sqs:run",
    ),
    "watch-minio": Command(
        "Listen to a MinIO bucket's notifications and write results back beside the pairs.",
        _watch_minio,
        "watcher.sources.minio:run",
    ),
    "watch-poll": Command(
        "Poll an S3 prefix (ListObjectsV2) for stores without bucket notifications.",
        _watch_poll,
        "watcher.sources.poll:run",
    ),
    "serve": Command(
        "Serve the HTTP API: uploads, object-store webhooks, health checks and Prometheus metrics.",
        _serve,
        "watcher.serve.command:run",
    ),
    "report": Command(
        "Write a self-contained HTML report of every result under a folder.",
        _report,
        "watcher.report:run",
    ),
}
