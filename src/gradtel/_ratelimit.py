"""One log line per key at most every ``interval`` seconds: failures that repeat every
update (or every scrape) must not flood a training log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["ERROR_LOG_INTERVAL", "RateLimitedLog"]

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log lines about failures of the same kind."""


class RateLimitedLog:
    """Logs through ``logger``, at most once per ``interval`` seconds per key.

    Args:
        logger: Where the lines go.
        interval: Seconds between two lines of one key.
        clock: Monotonic seconds; the interval is measured on it.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = ERROR_LOG_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, message: str, *args: object) -> bool:
        """Log unless ``key`` was logged within the interval; returns whether it logged."""
        now = self.clock()
        with self._lock:
            if now - self._last.get(key, float("-inf")) < self._interval:
                return False
            self._last[key] = now
        self._logger.log(level, message, *args)
        return True
