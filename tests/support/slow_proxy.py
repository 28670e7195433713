"""A TCP proxy on 127.0.0.1 that makes a real server slow: the answers to GET requests come
back a few KB at a time (``trickle``) or not at all (``stall``), as from an overloaded or
half-broken store. Requests go through untouched."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.support.s3_servers import free_port


@dataclass
class SlowProxy:
    url: str
    #: "trickle": ``piece`` bytes every ``pause`` seconds; "stall": nothing; "": as it comes.
    mode: str = ""
    piece: int = 16 * 1024
    pause: float = 0.1
    closed: threading.Event = field(default_factory=threading.Event)


@contextmanager
def slow_proxy(upstream: str, **options: object) -> Iterator[SlowProxy]:
    """``upstream`` (``http://host:port``) behind a slow proxy; ``mode`` can change any time."""
    target = urlsplit(upstream)
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    proxy = SlowProxy(f"http://127.0.0.1:{port}", **options)  # type: ignore[arg-type]

    def accept() -> None:
        while not proxy.closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((target.hostname, target.port))
            get = threading.Event()
            threading.Thread(target=_requests, args=(client, server, get), daemon=True).start()
            threading.Thread(
                target=_answers, args=(server, client, get, proxy), daemon=True
            ).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.closed.set()
        listener.close()


def _requests(client: socket.socket, server: socket.socket, get: threading.Event) -> None:
    with suppress(OSError):
        while data := client.recv(65536):
            if data[:4] in (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE"):
                (get.set if data.startswith(b"GET ") else get.clear)()
            server.sendall(data)
    _close(server)


def _answers(
    server: socket.socket, client: socket.socket, get: threading.Event, proxy: SlowProxy
) -> None:
    with suppress(OSError):
        while data := server.recv(65536):
            while data:
                if get.is_set() and proxy.mode == "stall":
                    proxy.closed.wait(0.05)
                    if proxy.closed.is_set():
                        return
                    continue
                size = proxy.piece if get.is_set() and proxy.mode == "trickle" else len(data)
                if size != len(data):
                    time.sleep(proxy.pause)
                client.sendall(data[:size])
                data = data[size:]
    _close(client)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
