"""One shape for every source command's ``run`` (``watch DIR``, ``watch sqs``, ``watch minio``,
``watch poll``).

Settings and logging are ready when a command's ``run`` is called (``watcher.cli``). Each
``run`` checks its own arguments first (a usage error must not wait for a model to load), then
hands ``watch`` what differs: how to build its source on the runner, what its start and stop
log lines say and, where it needs one, its own loop. ``watch`` does the rest the same way for
all of them: the runner with the configured comparator (a VL model starts loading at once),
the source, SIGINT/SIGTERM handlers, and the comparator closed at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from handler.config import Settings
from watcher.runner import ComparatorUnavailable, Runner, Source, runner_for
from watcher.shutdown import StopFlag, stop_on_signals

S = TypeVar("S", bound=Source)


class CannotWatch(Exception):
    """A source's loop could not go on (said on stderr already): the command exits 1."""


@dataclass(frozen=True)
class Watched(Generic[S]):
    """A watch that ran to its end: the source (its counters) and how it was stopped."""

    source: S
    stop: StopFlag


def run_source(runner: Runner[Any], source: Source, stop: StopFlag) -> None:
    """The usual loop: the runner drives the source until it finishes or ``stop`` is set."""
    runner.run(stop, source)


def watch(
    settings: Settings,
    build: Callable[[Runner[Any]], S],
    *,
    log: Any = None,
    started: Callable[[Runner[Any]], Mapping[str, Any]] = lambda runner: {},
    stopped: Callable[[S], Mapping[str, Any]] = lambda source: {},
    loop: Callable[[Runner[Any], S, StopFlag], None] = run_source,
) -> Watched[S] | None:
    """Build the runner and the source on it, and run ``loop`` under signal handlers.

    With ``log``, ``watch_started`` (with ``started``'s fields) is logged once the source is
    built and ``watch_stopped`` (with ``stopped``'s) once the comparator is closed; a source
    that logs its own (the folder's) passes none. None when the comparator can never be ready
    (logged as ``comparator_unavailable``) or the loop raised ``CannotWatch``: exit 1.
    """
    with runner_for(settings) as runner:
        source = build(runner)
        if log is not None:
            log.info("watch_started", **started(runner))
        with stop_on_signals() as stop:
            try:
                loop(runner, source, stop)
            except (ComparatorUnavailable, CannotWatch):
                return None
    if log is not None:
        log.info("watch_stopped", **stopped(source))
    return Watched(source, stop)
