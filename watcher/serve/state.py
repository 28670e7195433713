"""What the endpoints of one ``pairwatch serve`` process share, made by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from handler.compare import Comparator
from handler.config import Settings
from watcher.serve.admission import Admission
from watcher.serve.events import EventsEndpoint
from watcher.serve.readiness import Readiness


@dataclass
class ServeState:
    """What the endpoints share: settings, the comparator, the admission control, readiness."""

    settings: Settings
    comparator: Comparator
    admission: Admission
    limiter: anyio.CapacityLimiter
    readiness: Readiness
    events: EventsEndpoint | None = None
