"""``hopgate.client``'s retry rule: which answers are retried and how long to wait.

429 and 503 (queue full, overloaded, draining) mean "come back later"; the service says when
in ``Retry-After`` (docs/serving.md). A refused connection is retried the same way (a
server restarting). Everything else is answered at once.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Retry:
    attempts: int = 5  # tries in all, the first included
    budget_s: float = 60.0  # total waiting between tries
    backoff_s: float = 0.5  # first wait when the server gives no Retry-After; doubles
    max_wait_s: float = 30.0  # no single wait is longer

    def delay(self, attempt: int, retry_after: str | None) -> float:
        told = retry_after_seconds(retry_after)
        wait = told if told is not None else self.backoff_s * 2 ** attempt
        return min(max(wait, 0.0), self.max_wait_s)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()
