"""One log line when a dependency goes away and one when it is back, however many calls fail
in between: an outage of ten minutes is two lines in the log, not one per poll or per job."""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger(__name__)


class Outage:
    """Tracks whether ``dependency`` (``"redis"``, ``"postgres"``) is currently failing, and the
    capped exponential backoff to wait before the next try."""

    def __init__(self, dependency: str, *, first_wait_s: float = 0.1, max_wait_s: float = 5.0):
        self.dependency = dependency
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s
        self.since: float | None = None  # monotonic start of the current outage
        self.failures = 0

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException) -> float:
        """Note a failure; returns how long to wait before trying again."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "dependency_unreachable",
                dependency=self.dependency,
                error=type(error).__name__,
                detail=str(error)[:200],
            )
        wait: float = self.first_wait_s * 2.0 ** min(self.failures - 1, 30)
        return min(self.max_wait_s, wait)

    def succeeded(self) -> None:
        """Note a success; logs the end of an outage once."""
        if self.since is not None:
            log.warning(
                "dependency_reachable_again",
                dependency=self.dependency,
                outage_s=round(time.monotonic() - self.since, 1),
                failed_calls=self.failures,
            )
        self.since = None
        self.failures = 0
