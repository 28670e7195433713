"""What the endpoints of one ``pairwatch serve`` process share, made by the app's lifespan."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from handler.compare import Comparator
from handler.config import Settings
from watcher.runner import Runner
from watcher.serve.admission import Admission
from watcher.serve.events import EventsEndpoint
from watcher.serve.readiness import Readiness


@dataclass
class ServeState:
    """What the endpoints share: settings, the comparator, the process's one runner, the
    admission in front of it, readiness."""

    settings: Settings
    runner: Runner[Any]
    admission: Admission
    readiness: Readiness
    events: EventsEndpoint | None = None
    #: Runner keys of uploads (each its own unit of work: never coalesced with another).
    upload_ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def comparator(self) -> Comparator:
        """The runner's comparator."""
        return self.runner.comparator
