"""The VL model behind an OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama,
LM Studio, ``transformers serve``): ``vl_backend = "openai"``.

Why a server: a serving engine batches continuously, caches prefixes and encoder outputs and
scales across GPUs, so the watchers stay small CPU processes without torch. This module only
turns one pair into one HTTP request and every way that request can fail into the pair error
types the rest of pairwatch already handles:

| what happens                                   | error                                   |
|------------------------------------------------|-----------------------------------------|
| connection refused, DNS, connect timeout, 5xx  | retried with back-off, then             |
|                                                | ``ModelUnavailable`` (retryable)        |
| 429                                            | waits per ``Retry-After`` (bounded)     |
| no answer by the pair's deadline               | ``ComparisonTimeout`` (connection shut) |
| any other 4xx                                  | ``ModelCrashed``, the server's message  |

Whether the server constrains answers to a JSON Schema is found out once, by a probe that no
unconstrained model passes (see ``_probe``): engines that honour ``response_format`` (vLLM,
SGLang, Ollama, LM Studio) get it with every pair; one that refuses it with a 4xx or ignores it
(``transformers serve``) is asked without it. The answer parser stays the second line either way.

Thread-safe: ``ask`` is called from the runner's ``concurrency`` threads at once and never holds
a lock across a request; at most ``max_in_flight`` requests are open at any moment.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai
from pydantic import SecretStr

from handler.compare.vl.protocol import Reply, Request
from handler.config import Settings
from handler.errors import ComparisonTimeout, ModelCrashed, ModelUnavailable
from handler.logs import elapsed_ms, get_logger
from handler.result import VLDetails

#: Pauses between attempts after a connection failure or a 5xx: a restarting server gets ~3.5 s
#: to come back before the pair is given up as ``model_unavailable`` (and retried later).
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
#: ``wait_ready``'s pauses between probes of a server that cannot answer yet (a cold engine still
#: loading its model); the last one repeats until ``vl_load_timeout`` has passed.
READY_RETRY_DELAYS_S = (1.0, 2.0, 5.0)
#: A 429 is waited out per ``Retry-After`` at most this many times, each wait at most
#: ``MAX_RETRY_AFTER_S`` and never past the pair's deadline.
MAX_BUSY_WAITS = 5
MAX_RETRY_AFTER_S = 30.0
#: Used when a 429 names no (readable) ``Retry-After``.
DEFAULT_RETRY_AFTER_S = 1.0
#: A server that does not accept the TCP connection within this is treated as down, not slow.
CONNECT_TIMEOUT_S = 5.0
#: Server messages quoted in results are cut to this many characters.
MESSAGE_LIMIT = 300
#: Sent as the bearer token when no key is configured (vLLM's documented placeholder).
NO_API_KEY = "EMPTY"

#: The probe: a schema whose only valid answer is ``{"probe": PROBE_WORD}``, with a prompt that
#: asks for something else, so only a server that really constrains decoding answers it.
PROBE_WORD = "pairwatch-probe"
PROBE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"probe": {"type": "string", "enum": [PROBE_WORD]}},
    "required": ["probe"],
    "additionalProperties": False,
}
PROBE_PROMPT = "Say hello in one word."
PROBE_MAX_TOKENS = 16


@dataclass(frozen=True)
class EngineReply:
    """The model's raw answer to one pair and how it was obtained."""

    text: str
    #: ``response_format`` with the answer schema was sent and the server honours it.
    constrained: bool
    #: HTTP requests sent for this pair (retries and 429 waits included).
    attempts: int
    prompt_tokens: int | None
    new_tokens: int
    #: ``stop``, or ``length`` when ``max_tokens`` cut the answer off.
    finish_reason: str | None
    generate_ms: float


def public_endpoint(url: str) -> str:
    """``url`` without user info, query or fragment: what results and logs may show."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIBackend:
    """One OpenAI-compatible endpoint serving ``model``; see the module docstring."""

    name = "openai"

    def __init__(
        self,
        *,
        endpoint: str,
        model: str,
        api_key: SecretStr | None = None,
        max_tokens: int = 512,
        max_in_flight: int = 8,
        probe_timeout_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint: str | None = public_endpoint(endpoint)
        self.device = "remote"
        self._model = model
        self._max_tokens = max_tokens
        self._secret = api_key.get_secret_value() if api_key else None
        self._probe_timeout_s = probe_timeout_s
        self._sleep = sleep
        # Retries are ours (bounded by the pair's deadline, 429 and 5xx told apart), not the
        # client's; the key goes into the client only, never into a message or log line.
        self._client = openai.OpenAI(
            base_url=endpoint, api_key=self._secret or NO_API_KEY, max_retries=0
        )
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._probe_lock = threading.Lock()
        #: None until the probe has run: then whether ``response_format`` is honoured.
        self._constrained: bool | None = None
        self._log = get_logger(comparator="vl", backend=self.name, endpoint=self.endpoint)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIBackend:
        from handler.compare import resolve_concurrency  # the package imports this lazily

        if not settings.vl_endpoint or not settings.model:
            raise ValueError("the openai VL backend needs vl_endpoint and model")
        return cls(
            endpoint=settings.vl_endpoint,
            model=settings.model,
            api_key=settings.vl_api_key,
            max_tokens=settings.vl_max_new_tokens,
            max_in_flight=resolve_concurrency(settings),
            probe_timeout_s=settings.vl_load_timeout,
        )

    # -- the seam (protocol.Backend) ---------------------------------------------------------

    def generate(self, request: Request) -> Reply:
        """One pair's model call: every picture (overviews, then crops) as an ``image_url``
        part after its label, as the local worker labels them, then the prompt."""
        answer = self.ask(
            [(image.label, image.jpeg) for image in request.images],
            request.prompt,
            schema=request.schema,
            max_tokens=self._max_tokens,
            # The pair's deadline started when it was taken: what is left of it.
            timeout_s=request.expires_at - time.monotonic(),
        )
        return Reply(
            kind="ok",
            text=answer.text,
            prompt_tokens=answer.prompt_tokens,
            new_tokens=answer.new_tokens,
            attempts=answer.attempts,
            generate_ms=answer.generate_ms,
            constrained=answer.constrained,
        )

    def wait_ready(self) -> None:
        """Block until the server has answered the readiness probe once (reachable, serves the
        model; whether it constrains answers is found out on the way), so that a queue consumer
        takes no work while a cold engine starts.

        A server that cannot answer yet (unreachable, 5xx: each probe already retries per
        ``RETRY_DELAYS_S``) is probed again after ``READY_RETRY_DELAYS_S``, each failed try
        logged as ``vl_engine_not_ready``, until ``vl_load_timeout``: then ``ModelUnavailable``,
        as for a local model that cannot load. A refused probe (a 4xx: wrong model name, bad
        key) raises at once. Once ready, a server that goes away fails pairs one by one as
        ``model_unavailable`` (retryable) until it is back.
        """
        deadline = time.monotonic() + self._probe_timeout_s
        tries = 0
        while True:
            tries += 1
            try:
                self._schema_support(deadline)
                return
            except _ProbeRefused:
                raise
            except ModelUnavailable as exc:
                error = exc.message
            except RuntimeError:  # httpx: "the client has been closed", by close() meanwhile
                if not self._client.is_closed():
                    raise
            if self._client.is_closed():
                raise ModelUnavailable("the VL backend was closed while waiting for its server")
            delay = READY_RETRY_DELAYS_S[min(tries, len(READY_RETRY_DELAYS_S)) - 1]
            if time.monotonic() + delay >= deadline:
                message = (
                    f"the model server at {self.endpoint} did not answer within "
                    f"vl_load_timeout ({self._probe_timeout_s:g} s): {error}"
                )
                self._log.error("vl_engine_unavailable", tries=tries, error=message)
                raise ModelUnavailable(message)
            self._log.warning("vl_engine_not_ready", attempt=tries, retry_in_s=delay, error=error)
            self._sleep(delay)

    def ask(
        self,
        images: Sequence[tuple[str, bytes]],
        prompt: str,
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
        timeout_s: float,
    ) -> EngineReply:
        """One pair: ``images`` as (label, JPEG bytes), in order, then ``prompt``; greedy.

        Raises ``ModelUnavailable``, ``ComparisonTimeout`` or ``ModelCrashed``; the whole call,
        probe and retries included, ends by about ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        constrained = schema is not None and self._schema_support(deadline)
        body = _chat_body(self._model, _content(images, prompt), max_tokens)
        started = time.perf_counter()
        try:
            completion, attempts = self._send(
                _constrain(body, schema if constrained else None), deadline
            )
        except _Rejected as exc:
            if not (constrained and exc.status in (400, 422)):
                raise ModelCrashed(f"the model server rejected the request: {exc}") from None
            # It accepted the probe's schema but refuses this one: ask without, from now on.
            self._log.warning("vl_engine_schema_refused", status=exc.status, error=str(exc))
            self._constrained = constrained = False
            completion, attempts = self._send(body, deadline)
        choice = completion.choices[0] if completion.choices else None
        usage = completion.usage
        return EngineReply(
            text=(choice.message.content if choice else None) or "",
            constrained=constrained,
            attempts=attempts,
            prompt_tokens=usage.prompt_tokens if usage else None,
            new_tokens=usage.completion_tokens if usage else 0,
            finish_reason=choice.finish_reason if choice else None,
            generate_ms=elapsed_ms(started),
        )

    def close(self) -> None:
        self._client.close()

    # -- schema support, found out once ------------------------------------------------------

    def _schema_support(self, deadline: float | None = None) -> bool:
        """Whether to send ``response_format``; the first caller probes, the others wait for
        it — but not past their own deadline (a probe of a down server takes its retries)."""
        if self._constrained is not None:
            return self._constrained
        if deadline is None:
            deadline = time.monotonic() + self._probe_timeout_s
        if not self._probe_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise ModelUnavailable("the model server has not answered its readiness probe yet")
        try:
            if self._constrained is None:
                self._constrained = self._probe(deadline)
            return self._constrained
        finally:
            self._probe_lock.release()

    def _probe(self, deadline: float) -> bool:
        started = time.perf_counter()
        body = _chat_body(self._model, PROBE_PROMPT, PROBE_MAX_TOKENS)
        try:
            try:
                completion, _ = self._send(_constrain(body, PROBE_SCHEMA), deadline)
                constrained = _is_probe_answer(completion)
            except _Rejected as refused:
                if refused.status not in (400, 422):
                    raise
                completion, _ = self._send(body, deadline)
                constrained = False
        except _Rejected as exc:
            message = f"the model server refuses requests for {self._model!r}: {exc}"
            raise self._unavailable(message, _ProbeRefused) from None
        except ComparisonTimeout:
            message = "the model server did not answer the readiness probe in time"
            raise self._unavailable(message) from None
        # An unreachable server (ModelUnavailable from _send) is logged by whoever asked:
        # wait_ready per try, a pair as its pair_failed.
        self._log.info("vl_engine_ready", constrained=constrained, probe_ms=elapsed_ms(started))
        return constrained

    def _unavailable(
        self, message: str, kind: type[ModelUnavailable] = ModelUnavailable
    ) -> ModelUnavailable:
        self._log.error("vl_engine_unavailable", error=message)
        return kind(message)

    # -- one request, with bounded retries ---------------------------------------------------

    def _send(self, body: dict[str, Any], deadline: float) -> tuple[Any, int]:
        """POST ``body`` until it is answered, retrying what a server's restart or overload
        explains; returns the completion and the number of requests sent."""
        attempts = failures = waits = 0
        while True:
            attempts += 1
            try:
                return self._post(body, deadline), attempts
            except ComparisonTimeout as exc:
                exc.details.setdefault("vl", VLDetails(attempts=attempts))
                raise
            except _Retryable as exc:
                if exc.retry_after is not None:
                    waits += 1
                    delay = min(exc.retry_after, MAX_RETRY_AFTER_S)
                    if waits > MAX_BUSY_WAITS or time.monotonic() + delay >= deadline:
                        raise _given_up(
                            f"the model server stayed busy after {attempts} requests ({exc})",
                            attempts,
                        ) from None
                else:
                    if failures == len(RETRY_DELAYS_S):
                        raise _given_up(
                            f"cannot reach the model server at {self.endpoint} after "
                            f"{attempts} attempts: {exc}",
                            attempts,
                        ) from None
                    delay = RETRY_DELAYS_S[failures]
                    failures += 1
                    if time.monotonic() + delay >= deadline:
                        raise _given_up(
                            f"cannot reach the model server at {self.endpoint} before the "
                            f"pair's deadline: {exc}",
                            attempts,
                        ) from None
                self._log.warning(
                    "vl_engine_retry", attempt=attempts, delay_s=delay, error=str(exc)
                )
                self._sleep(delay)

    def _post(self, body: dict[str, Any], deadline: float) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._slots.acquire(timeout=remaining):
            raise ComparisonTimeout("no answer from the model server before the pair's deadline")
        try:
            remaining = max(deadline - time.monotonic(), 0.001)
            timeout = httpx2.Timeout(remaining, connect=min(CONNECT_TIMEOUT_S, remaining))
            return self._client.chat.completions.create(**body, timeout=timeout)
        except openai.APITimeoutError as exc:
            if isinstance(exc.__cause__, httpx2.ConnectTimeout):
                raise _Retryable("connect timeout") from None
            # httpx drops a connection whose read timed out, so the server sees the request
            # cancelled (a client disconnect) instead of a connection we keep waiting on.
            raise ComparisonTimeout(
                "the model server did not answer before the pair's deadline (processing_timeout)"
            ) from None
        except openai.APIConnectionError as exc:
            raise _Retryable(_describe_connection_error(exc)) from None
        except openai.APIStatusError as exc:
            message = self._server_message(exc)
            if exc.status_code == 429:
                raise _Retryable(message, retry_after=_retry_after(exc.response)) from None
            if exc.status_code >= 500:
                raise _Retryable(message) from None
            raise _Rejected(exc.status_code, message) from None
        finally:
            self._slots.release()

    def _server_message(self, exc: openai.APIStatusError) -> str:
        """``429 Too Many Requests: <body>``, truncated, with the key blanked should a server
        echo it back."""
        try:
            text = exc.response.text
        except Exception:  # a body that cannot be read must not hide the status
            text = ""
        message = f"{exc.status_code} {exc.response.reason_phrase}: {' '.join(text.split())}"
        if self._secret:
            message = message.replace(self._secret, "***")
        return message[:MESSAGE_LIMIT]


def _given_up(message: str, attempts: int) -> ModelUnavailable:
    return ModelUnavailable(message, details={"vl": VLDetails(attempts=attempts)})


class _Retryable(Exception):
    """A failure a later attempt may not meet (down, restarting, overloaded)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Set for a 429: how long the server asked us to wait.
        self.retry_after = retry_after


class _Rejected(Exception):
    """A 4xx other than 429: the server will refuse this request again."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ProbeRefused(ModelUnavailable):
    """The server answered the readiness probe with a 4xx (wrong model name, bad key): probing
    again will not help, so ``wait_ready`` raises at once."""


def _content(images: Sequence[tuple[str, bytes]], prompt: str) -> list[dict[str, Any]]:
    """A label before each image, so the model can tell which is which, then the prompt."""
    parts: list[dict[str, Any]] = []
    for label, jpeg in images:
        parts.append({"type": "text", "text": label})
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": prompt})
    return parts


def _chat_body(model: str, content: str | list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def _constrain(body: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        return body
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": schema.get("title", "answer"), "schema": schema, "strict": True},
    }
    return {**body, "response_format": response_format}


def _is_probe_answer(completion: Any) -> bool:
    text = (completion.choices[0].message.content or "") if completion.choices else ""
    try:
        return bool(json.loads(text) == {"probe": PROBE_WORD})
    except ValueError:
        return False


def _retry_after(response: Any) -> float:
    """Seconds from a ``Retry-After`` header: a number or an HTTP date."""
    value = response.headers.get("retry-after", "")
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S


def _describe_connection_error(exc: openai.APIConnectionError) -> str:
    """The transport's reason (``Connection refused``, a DNS failure) rather than openai's
    generic "Connection error."."""
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause else str(exc)
