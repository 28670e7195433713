"""The VL comparator's model seam (``Backend``) and the messages of its local worker process.

``VLComparator`` hands every pair's model call to one ``Backend``: the local worker process
(``local_backend.LocalBackend``) or a remote OpenAI-compatible server. The comparator owns what
is common to both (metrics pre-gate, prompt, answer schema, parsing, result details); a backend
owns getting text out of a model, its own failures and its own timeouts.

Kept apart from both ends of the worker pipe so that neither side imports the other's heavy
dependencies: the worker never loads the metrics stack, the service process never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from handler.result import VLDetails


class Backend(Protocol):
    """Where the model runs. ``generate`` is called from several threads at once (the runner
    keeps ``concurrency`` pairs in flight); a backend may batch concurrent calls.

    Failures: ``generate`` returns a ``Reply`` when the model answered (``kind="ok"``, possibly
    ``out_of_time``) or ran out of memory for good (``kind="oom"``); everything else is raised as
    a ``handler.errors.PairError`` — ``ComparisonTimeout`` (no answer by the pair's deadline),
    ``ModelCrashed``, ``ModelUnavailable`` — with ``details={"vl": VLDetails(...)}`` where known.
    """

    #: ``local`` or ``openai``: the result's ``comparator.backend``.
    name: str
    #: The server's URL for remote backends (the result's ``comparator.endpoint``), else None.
    endpoint: str | None

    @property
    def device(self) -> str:
        """Resolved device (``cuda:0``, ``cpu``) once ready; the configured one before."""
        ...

    def wait_ready(self) -> None:
        """Block until the model can take pairs; raise ``ModelUnavailable`` if it never will."""
        ...

    def generate(self, request: Request) -> Reply:
        """One pair's model call; blocks until about ``request.expires_at`` (plus a grace)."""
        ...

    def close(self) -> None:
        """Free the model, worker processes and connections. Idempotent."""
        ...


@dataclass(frozen=True)
class LabelledImage:
    """One picture of a request and the text that introduces it (``Image A:``)."""

    label: str
    jpeg: bytes


@dataclass(frozen=True)
class Request:
    """One pair: its pictures in order (the two prepared overviews, A first, then a crop of A
    and one of B per changed region shown), the prompt and the bounds to respect.

    ``max_pixels`` caps every picture: the overviews' cap. Crops arrive smaller, sized by the
    comparator so that all pictures together stay within the pair's pixel budget (see
    ``comparator.plan_pictures``); an out-of-memory retry halves every picture's pixels.
    ``schema`` is the answer's JSON Schema (``prompt.answer_schema()``): the local worker
    constrains decoding to it with xgrammar, an OpenAI-compatible backend sends it as
    ``response_format``. ``fault`` is the local worker's test-only hook; others ignore it.

    ``expires_at`` is the pair's deadline as a ``time.monotonic()`` instant (the clock every
    process of the machine shares): it started when the pair was taken, so time spent fetching,
    detecting and waiting for a batch counts. ``timeout_s`` is the pair's whole limit, for
    messages.
    """

    images: tuple[LabelledImage, ...]
    prompt: str
    max_pixels: int
    timeout_s: float
    expires_at: float
    schema: dict[str, Any] | None = None
    fault: Fault | None = None


@dataclass(frozen=True)
class Reply:
    """``ok``: the model answered (``text`` is raw, unparsed); ``oom``: still out of memory
    after the retries; ``error`` (local worker only, never returned by ``Backend.generate``):
    anything else went wrong inside the worker, which is then replaced."""

    kind: Literal["ok", "oom", "error"]
    text: str = ""
    message: str = ""
    visual_tokens: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int = 0
    attempts: int = 0
    max_pixels: int | None = None
    generate_ms: float = 0.0
    #: generate() stopped at the pair's deadline before the answer was complete.
    out_of_time: bool = False
    #: Peak device memory allocated while serving this request's batch (CUDA only).
    peak_memory_mb: float | None = None
    #: Decoding was constrained to ``Request.schema`` (the answer is valid by construction).
    constrained: bool = False
    #: How many pairs shared the ``generate`` call that produced this answer.
    batch_size: int = 1

    def details(self) -> VLDetails:
        """The result's ``vl`` fields this reply fills."""
        return VLDetails(
            raw_text=self.text or None,
            visual_tokens=self.visual_tokens,
            attempts=self.attempts,
            max_pixels=self.max_pixels,
            peak_memory_mb=self.peak_memory_mb,
            constrained=self.constrained,
            batch_size=self.batch_size,
        )


# -- the local worker process ----------------------------------------------------------------


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
    error the retry path must handle; ``oom_above_batch`` does the same while more than that
    many pairs share one ``generate``; ``crash`` dereferences a null pointer (a real SIGSEGV),
    after ``delay_s``.
    """

    delay_s: float = 0.0
    oom_above_pixels: int | None = None
    oom_above_batch: int | None = None
    crash: bool = False


#: Sent as soon as the worker has read a request: a worker that dies before sending it died
#: before the pair reached it (killed while idle), and the pair can go to its successor.
TAKEN = "taken"


@dataclass(frozen=True)
class Row:
    """One pair's reply within a batch (``index`` into the batch the worker took), sent as soon
    as that pair is finished, so a pair never waits for slower batch mates."""

    index: int
    reply: Reply
