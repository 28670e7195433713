"""What happens to one unit of work (a pair job, an SQS message, a listed key): one value.

Every source acts on a ``Disposition`` and nothing else: ``done`` (acknowledge: delete the
message, forget the key), ``retry`` (look again at ``at``, or after the recheck policy's back-off
when ``at`` is None) or ``reject`` (it will never succeed: leave it to the dead-letter queue,
log it). Fates are never signalled by exceptions; storage adapters translate their own errors
into these at their edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["done", "retry", "reject"]


@dataclass(frozen=True)
class Disposition:
    kind: Kind
    #: For ``retry``: the Unix time to look again (a lone image's partner is due then); None
    #: means "a failure of the moment: back off per the recheck policy".
    at: float | None = None
    reason: str = ""

    @property
    def is_done(self) -> bool:
        return self.kind == "done"

    @property
    def is_retry(self) -> bool:
        return self.kind == "retry"

    @property
    def is_reject(self) -> bool:
        return self.kind == "reject"

    def visibility_s(self, now: float, receive_count: int | None) -> int:
        """How long SQS keeps a retried message invisible: until it is due (``retry_delay``
        after ``receive_count`` deliveries), in whole seconds rounded up (never early), at most
        SQS's 12 hours (a lone image whose partner is due later comes back, and waits again)."""
        delay = retry_delay(self, now, receive_count or 1)
        return min(int(delay + 0.999), SQS_MAX_VISIBILITY_S)


def done(reason: str = "") -> Disposition:
    return Disposition("done", None, reason)


def retry(reason: str, at: float | None = None) -> Disposition:
    return Disposition("retry", at, reason)


def reject(reason: str) -> Disposition:
    return Disposition("reject", None, reason)


def combine(dispositions: Iterable[Disposition]) -> Disposition:
    """The fate of a delivery holding several records (an SQS message with two S3 records).

    Any retry wins (the delivery must come back), at the earliest time asked for; a back-off
    retry (``at`` None) is earlier than any fixed time, since it asks for "soon". Otherwise any
    reject rejects the whole delivery; an empty delivery is done.
    """
    items = list(dispositions)
    retries = [d for d in items if d.kind == "retry"]
    if retries:
        backoff = [d for d in retries if d.at is None]
        if backoff:
            return retry("; ".join(d.reason for d in retries), None)
        earliest = min(retries, key=lambda d: d.at or 0.0)
        return retry("; ".join(d.reason for d in retries), earliest.at)
    rejects = [d for d in items if d.kind == "reject"]
    if rejects:
        return reject("; ".join(d.reason for d in rejects))
    return done("; ".join(d.reason for d in items if d.reason))


#: The one back-off policy for ``retry`` without ``at`` (failures of the moment): seconds before
#: attempt n+1 after n failed ones; the last delay repeats. In-process rechecks give up after
#: ``MAX_ATTEMPTS`` (logged as ``retries_exhausted``); SQS leaves the end to the queue's
#: ``maxReceiveCount`` and its dead-letter queue.
BACKOFF_S = (5.0, 30.0, 120.0, 300.0)
MAX_ATTEMPTS = 8
#: SQS keeps a message invisible for at most 12 hours (ChangeMessageVisibility).
SQS_MAX_VISIBILITY_S = 12 * 3600


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` (>= 1) failed attempts in a row."""
    return BACKOFF_S[min(max(failures, 1), len(BACKOFF_S)) - 1]


def retry_delay(fate: Disposition, now: float, failures: int) -> float:
    """How long until a ``retry`` is due: its ``at``, or the back-off after ``failures``."""
    if fate.at is not None:
        return max(0.0, fate.at - now)
    return backoff(failures)
