"""Messages between the comparator and its model worker process (pickled over a pipe).

Kept apart from both ends so that neither side imports the other's heavy dependencies: the
worker never loads the metrics stack, the service process never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class WorkerOptions:
    model: str
    device: str
    max_new_tokens: int


@dataclass(frozen=True)
class Ready:
    """Sent once the weights are loaded; ``device`` is the resolved one (``auto`` -> cuda:0)."""

    device: str
    load_ms: float


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Fault:
    """Test-only fault injection, applied inside the worker (never set in production).

    ``delay_s`` sleeps before the model call, like a prefill that runs past the deadline;
    ``oom_above_pixels`` makes a real, impossible tensor allocation on the model's device while
    an image's resized pixel count exceeds it, so the allocator itself raises the out-of-memory
    error the retry path must handle; ``crash`` dereferences a null pointer (a real SIGSEGV).
    """

    delay_s: float = 0.0
    oom_above_pixels: int | None = None
    crash: bool = False


@dataclass(frozen=True)
class Request:
    """One pair: the two prepared JPEGs (A first), the prompt and the bounds to respect."""

    jpegs: tuple[bytes, bytes]
    prompt: str
    max_pixels: int
    timeout_s: float
    fault: Fault | None = None


#: Sent as soon as the worker has read a request: a worker that dies before sending it died
#: before the pair reached it (killed while idle), and the pair can go to its successor.
TAKEN = "taken"


@dataclass(frozen=True)
class Reply:
    """``ok``: the model answered (``text`` is raw, unparsed); ``oom``: still out of memory
    after the retry; ``error``: anything else went wrong (the worker is then replaced)."""

    kind: Literal["ok", "oom", "error"]
    text: str = ""
    message: str = ""
    visual_tokens: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int = 0
    attempts: int = 0
    max_pixels: int | None = None
    generate_ms: float = 0.0
    #: generate() stopped at its time limit before the answer was complete.
    out_of_time: bool = False
    #: Peak device memory allocated while serving this request (CUDA only).
    peak_memory_mb: float | None = None
