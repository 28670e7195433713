"""Serve the HTTP API: uploads, object-store webhooks, health checks and Prometheus metrics."""

from __future__ import annotations

import argparse
from types import FrameType

import uvicorn

from handler.config import Settings
from handler.logs import get_logger
from watcher.args import EXIT_FAILED, EXIT_OK
from watcher.serve.app import create_app
from watcher.serve.protocol import head_timeout_protocol

#: Seconds past ``processing_timeout`` that a SIGTERM waits for in-flight requests.
SHUTDOWN_GRACE = 30.0


class _Server(uvicorn.Server):
    """uvicorn's server with the watchers' signal contract.

    uvicorn re-raises a captured SIGTERM once it has shut down, so the process would die of
    the signal (status -15) after a clean stop; here the first SIGINT/SIGTERM stops gracefully
    (exit 0) and a second one stops at once, as in every ``watch`` command. Like
    ``watcher.shutdown``'s handler, this one only flips flags.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        del sig, frame
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run until SIGTERM/SIGINT: then stop accepting, finish in-flight requests, exit 0."""
    host, port = settings.serve_host, settings.serve_port  # --host/--port are in settings
    app = create_app(settings, endpoint_url=args.endpoint_url, region=args.region)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # structlog writes the access log (watcher.serve.middleware.AccessLog)
        access_log=False,
        lifespan="on",
        # A request head must arrive within upload_idle_timeout (uvicorn alone waits forever).
        http=head_timeout_protocol(settings.upload_idle_timeout),
        timeout_graceful_shutdown=int(settings.comparison.processing_timeout + SHUTDOWN_GRACE),
    )
    server = _Server(config)
    get_logger().info("serve_listening", host=host, port=port)
    server.run()
    return EXIT_OK if server.started else EXIT_FAILED
